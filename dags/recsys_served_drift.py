"""
### recsys_served_drift — is what users do with the served models still like what the champion learned from?

Daily. For every registered model with a `champion` (or the `model` param), the feedback events its services logged
in the last `window_days` (`$RECSYS_HOME/feedback/<namespace>`: `recsys serve`, the canary's champion and
challenger, Bentos on that home) are compared with the champion's training data by the same Evidently PSI check as
`recsys_training`'s `drift_check` (event mix, device, category, hour, item popularity, activity per user-day).

- `served_drift` -> `$RECSYS_HOME/runs/<run>/served_drift/<model>/drift_report.html` (open it: which values moved),
  `drift_report.json`, `served_drift.json` (window, counts, PSI, verdict); `$RECSYS_HOME/runs/<run>/manifest.json`.
  A model with fewer than `min_events` events in the window gets `too_few_events` (no verdict).
- `trigger_training`: one `recsys_training` run per model that drifted above `threshold`, only when `retrain` is
  on (off by default): the champion's source and settings, windows resolved anew, plus this feedback log
  (`feedback_log`), so what was served and clicked joins the next model's data. Skipped otherwise. Where a
  scheduler runs (`recsys ui`, production) it runs the triggered run; `recsys drift` runs it in place when none does.

**Params**: `model`, `window_days` (1), `threshold` (PSI, 0.2), `min_events` (200), `features` (default all),
`retrain` (false).
"""

from __future__ import annotations

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task
from recsys_common import RETRY_ARGS, fail_fast


@dag(
    dag_id="recsys_served_drift",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=RETRY_ARGS,
    params={
        "model": Param(None, type=["null", "string"],
                       description="registered model (default: every model with a champion)"),
        "window_days": Param(1.0, type="number", exclusiveMinimum=0,
                             description="the current window: feedback logged in the last this many days"),
        "threshold": Param(0.2, type="number", exclusiveMinimum=0,
                           description="PSI above which a feature counts as drifted"),
        "min_events": Param(200, type="integer", minimum=1,
                            description="fewer events in the window: no verdict (too_few_events)"),
        "features": Param([], type="array", items={"type": "string"},
                          description="features to compare (empty = all: event_type, device, category, hour, "
                                      "value, item_popularity, user_activity)"),
        "retrain": Param(False, type="boolean",
                         description="trigger recsys_training for a model whose served traffic drifted"),
    },
    tags=["recsys", "monitoring", "drift"],
    doc_md=__doc__,
)
def recsys_served_drift() -> None:
    @task(doc_md="PSI of each champion's served feedback (the last `window_days`) against its training data; "
                 "HTML report per model; the retraining runs to trigger when `retrain` is on and a feature drifted.")
    @fail_fast
    def served_drift(params: dict | None = None, run_id: str | None = None) -> list[dict]:
        from pipeline_tasks.stages.evaluation import served_drift_stage

        return served_drift_stage(run_id, params)["trigger"]

    # One mapped task instance per model to retrain (none: the task is skipped). Where no scheduler runs,
    # `recsys drift` runs the queued run in place.
    TriggerDagRunOperator.partial(
        task_id="trigger_training", trigger_dag_id="recsys_training", wait_for_completion=False,
        skip_when_already_exists=True,
        doc_md="Triggers `recsys_training` for each model whose served traffic drifted (only with `retrain`); its "
               "conf: the champion's run params, new windows, and the feedback log as `feedback_log`.",
    ).expand_kwargs(served_drift())


recsys_served_drift()
