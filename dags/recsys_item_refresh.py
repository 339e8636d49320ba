"""
### recsys_item_refresh — make new catalog items retrievable within the hour, without retraining

Hourly. Reads the catalog (by default the data source of the training run whose model is serving),
finds items that the current FAISS index version does not hold, embeds them with that model's
item tower from their content (title, description), category and genres — no interactions needed —
and publishes the next index version under `$RECSYS_HOME/indexes/<model run>/v000N/` with its own
SHA-256, pointing back at its parent. Published versions are never edited. It takes the same index
lock as `recsys_training`'s `build_index`, so the two never write at once.

- `refresh_items` -> `$RECSYS_HOME/runs/<run>/refresh_items/` (`added_items.parquet`,
  `rejected_items.parquet` for rows with an invalid or duplicate id) and the run's `manifest.json`.
  Skipped when no index exists yet (run `recsys_training` first); succeeds without a new version
  when there is nothing new.

**Params**: `source` — a contract directory, an items file (`.parquet`/`.csv`) or a built-in source;
empty = the serving model's training source.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException
from recsys_common import RETRY_ARGS, fail_fast

# Transient failures (a busy lock, I/O) retry; a corrupted index or a published version in the way fails at once.
DEFAULT_ARGS = {**RETRY_ARGS, "execution_timeout": timedelta(minutes=50)}  # done before the next hourly run


@dag(
    dag_id="recsys_item_refresh",
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"source": Param(None, type=["null", "string"],
                            description="catalog: contract dir, items file or built-in source; empty = the "
                                        "serving model's training source")},
    tags=["recsys", "serving", "items"],
    doc_md=__doc__,
)
def recsys_item_refresh() -> None:
    @task(doc_md="Embed items the current index lacks (item tower, cold start) and publish the next index version.")
    @fail_fast
    def refresh_items(params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.retrieval import refresh_items_stage

        out = refresh_items_stage(run_id, params)
        if out["status"] == "no_index":
            raise AirflowSkipException(out["message"])
        return out

    refresh_items()


recsys_item_refresh()
