"""The training pipeline's stages as single calls (what each ``recsys_training`` task runs).

Each stage takes the run id, the run's params and its upstream task's small output dict, writes
under ``<artifact_root>/<run>/<task>/`` via :func:`pipeline_tasks.core.runs.run_stage`, and returns a
small dict of URIs and figures (the XCom). No Airflow import: tests and the CLI call these too.
"""
