"""
### recsys_item_refresh — new items retrievable and running services fresh within the hour, without retraining

Hourly. What is served is decided by the MLflow registry's aliases alone (`champion`, `challenger` of each
`recsys_<namespace>` model), and a registered bundle is never edited. For every version a live alias points at,
the refresh reads the catalog (by default the data source that version's training run recorded), finds items
its serving index lacks, embeds them with that bundle's own serving item tower from their content (title,
description), category and genres — no interactions needed — and writes the next extension of its index under
`$RECSYS_HOME/indexes/recsys_<namespace>/v<version>/r0001/`, `r0002/` ... with its own SHA-256 and a `parent`
naming the bundle version and the checksums of what it extends (the bundle's `index/` or the previous
extension). Serving loads the newest extension whose chain verifies back to the bundle; extensions are written
complete under a temporary name and never overwritten or edited. Moving an alias switches serving to that
version's own chain at once; the refresh takes the index lock, so two refreshes never write at once.

- `refresh_items` -> `$RECSYS_HOME/runs/<run>/refresh_items/` (`added_items.parquet` with the model and version
  each item went to, `rejected_items.parquet` for rows with an invalid or duplicate id) and the run's
  `manifest.json` (overall `status`, `added`, one entry per aliased version under `aliases`).
  Skipped when no champion/challenger exists yet (run `recsys_training` first); succeeds without a new extension
  when there is nothing new. A broken or corrupted extension chain fails the task at once (the error says which
  directory to move away); the other aliases are still refreshed first.

- `publish_snapshots` -> `$RECSYS_HOME/runs/<run>/publish_snapshots/snapshots.json`: for every aliased version,
  a new serving snapshot under `$RECSYS_HOME/serving/<model>/v<version>/published-*` when its data (newest event),
  the namespace's newest materialised feature day or its index extension changed since the snapshot its
  `current.json` names (`changed` lists which), else `up_to_date`. A running service (`recsys serve`, or
  `bentoml serve` with the same `RECSYS_HOME`) reads `current.json` every `RECSYS_REFRESH_S` seconds and swaps the
  new snapshot in atomically, new items included. The data is `source` when it is a contract directory, else the
  one the version's services were started on (`recsys serve --data`), else the version's training source when that
  is a contract directory, else the bundle's accepted data.

**Params**: `source` — a contract directory, an items file (`.parquet`/`.csv`) or a built-in source, used for
every alias; empty = each bundle's training source.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException
from recsys_common import RETRY_ARGS, fail_fast

# Transient failures (a busy lock, I/O) retry; a corrupted index chain or an extension in the way fails at once.
DEFAULT_ARGS = {**RETRY_ARGS, "execution_timeout": timedelta(minutes=50)}  # done before the next hourly run


@dag(
    dag_id="recsys_item_refresh",
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={"source": Param(None, type=["null", "string"],
                            description="catalog: contract dir, items file or built-in source; empty = each "
                                        "live bundle's training source")},
    tags=["recsys", "serving", "items"],
    doc_md=__doc__,
)
def recsys_item_refresh() -> None:
    @task(doc_md="For every champion/challenger bundle: embed the catalog items its serving index lacks (item "
                 "tower, cold start) and write the next index extension.")
    @fail_fast
    def refresh_items(params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.retrieval import refresh_items_stage

        out = refresh_items_stage(run_id, params)
        if out["status"] == "no_model":
            raise AirflowSkipException(out["message"])
        return out

    # all_done: one version's failed extension must not keep every live version's services stale.
    @task(trigger_rule="all_done",
          doc_md="For every champion/challenger bundle: write a fresh serving snapshot (history, catalog, Feast "
                 "rows at the data's newest moment) when the data, the feature store or the index extensions "
                 "changed, and point `current.json` at it; running services swap it in within RECSYS_REFRESH_S.")
    @fail_fast
    def publish_snapshots(params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.bundle import publish_snapshots_stage

        out = publish_snapshots_stage(run_id, params)
        if out["status"] == "no_model":
            raise AirflowSkipException("no champion or challenger to publish a snapshot for")
        return out

    refresh_items() >> publish_snapshots()


recsys_item_refresh()
