"""
### recsys_training — train the two-stage recommender from raw events

Daily. A run looks at all events up to its `as_of` and writes everything under
`$RECSYS_HOME/runs/<run>/<task>/` (see each task's doc and the run's `manifest.json`).

- `ingest`: reads the data source (`synthetic`, `movielens:PATH` or a contract directory) into the
  canonical tables -> `ingest/*.parquet`.
- `validate`: Great Expectations suites from `expectations/`; bad rows quarantined with all their
  reasons; fails at once (no retry) below `quality_threshold` -> `validate/accepted/`,
  `validate/quarantine/`, `validate/report.json`, `validate/data_docs/index.html` (results page; GX's docs in
  `validate/data_docs/gx/`).
- `split`: time-based train / validation / test split (DATA_CONTRACT.md) -> `split/*.parquet`,
  `split/split.json`.
- `build_features`: PySpark daily user and item feature snapshots (each valid from the end of its
  UTC day, built only from earlier events) into the long-lived offline store
  `$RECSYS_HOME/feature_store/offline/` (a run rewrites its own day partitions).
- `feast_apply`: registers `feature_repo/` (entities, views, services `ranker_v1`, `two_tower_v1`).
- `materialize`: loads the newest snapshot values into the online store (SQLite, or Redis in production).
- `training_set`: Feast point-in-time retrieval for every train/validation interaction plus the
  request-time context features -> `training_set/training_set.parquet`.
- `drift_check`: Evidently PSI of the newest window vs the training window (event mix, popularity,
  hour, value, activity, feature rates) -> `drift_check/drift_report.html` and `.json`; PSI above
  `drift_threshold` warns, or fails the run before any model is trained when `drift_mode` is `fail`.
- `train_two_tower`: PyTorch two-tower retrieval model (and the team's MF beside it): hyper-parameters
  chosen on the validation window, refit on train + validation, scored on the test window with 95 %
  bootstrap CIs; params, learning curves, metrics and the model logged to MLflow
  (`$RECSYS_HOME/mlflow`) -> `train_two_tower/model/`, `metrics.json`.
- `build_index`: FAISS index of the whole catalog (Flat when small, IVF/HNSW when large) tuned to
  recall@k >= target vs exact search on held-out users; written with checksums as version 1 of
  this model's index under `$RECSYS_HOME/indexes/` and made current -> `build_index/index.json`.

The params are resolved once by `ingest` (defaults, then `RECSYS_*` settings, then the run's params) into the
run's `manifest.json`; every later task reads them from there.

**Params**: `source`, `synthetic` (generator settings, `faults`), `as_of` (ISO-8601; empty = contract default),
`t_val`/`t_test` (explicit split boundaries), `quality_threshold`, `max_stub_share`, `horizon_days`,
`bot_events_per_day`, `drift_mode` (warn | fail), `drift_threshold` (PSI, default 0.2), `two_tower` (grid,
epochs, content method, `grid_budget_s`), `index` (kind, target_recall, k).

**Extending**: write a function in `pipeline_tasks/<package>/<module>.py` that takes `out_dir` and returns a
small dict, add a one-line stage in `pipeline_tasks/stages/<package>.py`, and wire a task here (with `@fail_fast`)
that calls it with its upstream task's output. Errors deriving from `PermanentError` (bad data, failed gates,
invalid params, checksum mismatches) fail the task at once; anything else is retried twice. Every task has an
`execution_timeout` (1 h, 4 h for the heavy ones).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from recsys_common import RETRY_ARGS, fail_fast

from pipeline_tasks.core.constants import DEFAULT_PARAMS  # a plain dict: no heavy import at parse time

LONG = timedelta(hours=4)  # Spark features, point-in-time reads, training: minutes to hours at real sizes

PARAMS = {
    "source": Param(DEFAULT_PARAMS["source"], type="string",
                    description="synthetic | movielens:PATH | a directory with the contract tables"),
    "synthetic": Param(
        DEFAULT_PARAMS["synthetic"], type="object",
        description="generator settings when source=synthetic; faults: 'all', 'none' or {'rate': 0.004}",
    ),
    "as_of": Param(None, type=["null", "string"], description="ISO-8601 moment the run looks from; empty = default"),
    "t_val": Param(None, type=["null", "string"], description="explicit validation boundary (with t_test)"),
    "t_test": Param(None, type=["null", "string"], description="explicit test boundary (with t_val)"),
    "quality_threshold": Param(None, type=["null", "number"], minimum=0, maximum=1,
                               description="minimum accepted share of interactions (default 0.95)"),
    "max_stub_share": Param(DEFAULT_PARAMS["max_stub_share"], type=["null", "number"], minimum=0, maximum=1,
                            description="largest share of accepted interactions whose item (or user) is missing "
                                        "from its table and gets a stub row; above it the gate fails (default 0.05, "
                                        "RECSYS_MAX_STUB_SHARE)"),
    "horizon_days": Param(None, type=["null", "integer"], minimum=1, description="oldest allowed event age"),
    "bot_events_per_day": Param(None, type=["null", "integer"], minimum=1,
                                description="events per user per UTC day above which that day is a bot's"),
    "drift_mode": Param(DEFAULT_PARAMS["drift_mode"], enum=["warn", "fail"],
                        description="on PSI above drift_threshold: warn in the log, or fail the run"),
    "drift_threshold": Param(DEFAULT_PARAMS["drift_threshold"], type="number", exclusiveMinimum=0,
                             description="PSI above which a monitored feature counts as drifted"),
    "two_tower": Param(DEFAULT_PARAMS["two_tower"], type="object",
                       description="retrieval training overrides, e.g. {'base': {'max_epochs': 10}, "
                                   "'grid': [{'id_dropout': 0.2}], 'content_method': 'minilm'}"),
    "index": Param(DEFAULT_PARAMS["index"], type="object",
                   description="FAISS index overrides, e.g. {'kind': 'hnsw', 'target_recall': 0.95, 'k': 100}"),
}


@dag(
    dag_id="recsys_training",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=RETRY_ARGS,
    params=PARAMS,
    tags=["recsys", "training"],
    doc_md=__doc__,
)
def recsys_training() -> None:
    @task(doc_md="Read the data source into the canonical contract tables (nothing dropped).")
    @fail_fast
    def ingest(params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.data import ingest_stage

        return ingest_stage(run_id, params)

    @task(doc_md="Validate with Great Expectations, quarantine bad rows with reasons, apply the quality gate.")
    @fail_fast
    def validate(ingested: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.data import validate_stage

        return validate_stage(run_id, ingested)

    @task(doc_md="Time-based train / validation / test split of the accepted interactions.")
    @fail_fast
    def split(validated: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.data import split_stage

        return split_stage(run_id, validated)

    @task(doc_md="PySpark daily user/item feature snapshots into the offline store (serialised writers).",
          execution_timeout=LONG)
    @fail_fast
    def build_features(validated: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.features import build_features_stage

        return build_features_stage(run_id, validated)

    @task(doc_md="`feast apply` of feature_repo/: entities, feature views, feature services.")
    @fail_fast
    def feast_apply(features: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.features import feast_apply_stage

        return feast_apply_stage(run_id)

    @task(doc_md="Incremental materialization of the newest snapshot into the online store.", execution_timeout=LONG)
    @fail_fast
    def materialize(features: dict, applied: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.features import materialize_stage

        return materialize_stage(run_id, features)

    @task(doc_md="Point-in-time training set (Feast historical retrieval) plus request-time context features.",
          execution_timeout=LONG)
    @fail_fast
    def training_set(split_out: dict, materialized: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.features import training_set_stage

        return training_set_stage(run_id, split_out)

    @task(doc_md="Evidently PSI drift check of the newest window vs the reference, before any model is trained; "
                 "in `fail` mode a drifted window stops the run here.")
    @fail_fast
    def drift_check(validated: dict, split_out: dict, features: dict, materialized: dict,
                    run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.evaluation import drift_check_stage

        return drift_check_stage(run_id, validated, split_out, features)

    @task(doc_md="PyTorch two-tower (and MF) retrieval: tune on validation, refit, score on test; log to MLflow.",
          execution_timeout=LONG)
    @fail_fast
    def train_two_tower(validated: dict, split_out: dict, train_set: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.retrieval import train_two_tower_stage

        return train_two_tower_stage(run_id, validated, split_out, train_set)

    @task(doc_md="FAISS index of the catalog tuned to the recall target; published as a checksummed version.",
          execution_timeout=LONG)
    @fail_fast
    def build_index(trained: dict, features: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.retrieval import build_index_stage

        return build_index_stage(run_id, trained, features)

    validated = validate(ingest())
    split_out = split(validated)
    features = build_features(validated)
    split_out >> features
    materialized = materialize(features, feast_apply(features))
    train_set = training_set(split_out, materialized)
    drifted = drift_check(validated, split_out, features, materialized)
    trained = train_two_tower(validated, split_out, train_set)
    drifted >> trained  # a drifted window (drift_mode=fail) stops the run before a model is trained
    build_index(trained, features)

recsys_training()
