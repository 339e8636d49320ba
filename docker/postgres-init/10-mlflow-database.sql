-- Run by the postgres image on the first start of an empty data volume (docker-entrypoint-initdb.d),
-- as POSTGRES_USER (airflow), which then owns the database: MLflow's tracking store
-- (RECSYS_MLFLOW_TRACKING_URI in compose.production.yaml). Airflow's metadata is in "airflow".
CREATE DATABASE mlflow;
