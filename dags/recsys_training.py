"""
### recsys_training — train the two-stage recommender from raw events

Daily. A run looks at all events up to its `as_of` and writes everything under
`$RECSYS_HOME/runs/<run>/<task>/` (see each task's doc and the run's `manifest.json`).

- `ingest`: reads the data source (`synthetic`, `movielens:PATH` or a contract directory) into the
  canonical tables -> `ingest/*.parquet`.
- `validate`: Great Expectations suites from `expectations/`; bad rows quarantined with all their
  reasons; fails at once (no retry) below `quality_threshold` -> `validate/accepted/`,
  `validate/quarantine/`, `validate/report.json`, `validate/data_docs/index.html` (GX Data Docs).
- `split`: time-based train / validation / test split (DATA_CONTRACT.md) -> `split/*.parquet`,
  `split/split.json`.

**Params**: `source`, `synthetic` (generator settings, `faults`), `as_of` (ISO-8601; empty = contract default),
`t_val`/`t_test` (explicit split boundaries), `quality_threshold`, `horizon_days`, `bot_events_per_day`.

**Extending**: write a function in `pipeline_tasks/<stage>.py` that takes `out_dir` and returns a small dict,
add a one-line stage in `pipeline_tasks/training.py`, and wire a task here that calls it with its upstream
task's output. Data errors raise `AirflowFailException` (no retry); anything else is retried.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowFailException

from pipeline_tasks.constants import DEFAULT_PARAMS  # a plain dict: no heavy import at parse time

DEFAULT_ARGS = {
    "owner": "recsys",
    "retries": 2,  # for transient failures (I/O, a busy store); data errors fail at once
    "retry_delay": timedelta(minutes=1),
}

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
    "horizon_days": Param(None, type=["null", "integer"], minimum=1, description="oldest allowed event age"),
    "bot_events_per_day": Param(None, type=["null", "integer"], minimum=1,
                                description="events per user per UTC day above which that day is a bot's"),
}


@dag(
    dag_id="recsys_training",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["recsys", "training"],
    doc_md=__doc__,
)
def recsys_training() -> None:
    @task(doc_md="Read the data source into the canonical contract tables (nothing dropped).")
    def ingest(params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.training import ingest_stage

        return ingest_stage(run_id, params)

    @task(doc_md="Validate with Great Expectations, quarantine bad rows with reasons, apply the quality gate.")
    def validate(ingested: dict, params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.training import validate_stage
        from pipeline_tasks.validate import DataQualityError

        try:
            return validate_stage(run_id, params, ingested)
        except DataQualityError as exc:  # bad data: retrying cannot help
            raise AirflowFailException(str(exc)) from exc

    @task(doc_md="Time-based train / validation / test split of the accepted interactions.")
    def split(validated: dict, params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.training import split_stage

        return split_stage(run_id, params, validated)

    split(validate(ingest()))


recsys_training()
