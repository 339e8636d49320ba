"""
### recsys_canary — the challenger on 5 % of traffic, then 25 %, 50 %, 100 % while it holds; rolled back at a breach

Started when a training run registers a challenger: `register` updates the Asset `recsys_challenger` (a scheduler,
`recsys ui` or production, starts this DAG then), `recsys canary start` runs it by hand in the embedded default.
The serving processes -- the champion's and the challenger's services and the canary router -- run outside the
tasks (`recsys canary start` starts them detached with pid files under `$RECSYS_HOME/canary/<model>/`; a deployment
in production); the tasks talk to the router over HTTP and read its log.

- `plan`: the challenger (the `challenger` alias, or the `challenger_version` param) against the champion, the
  router's route checked against the registry, a version whose gate failed refused; the sample each step waits for,
  computed up front from the minimum detectable effect (`base_ctr`, `mde`, `alpha`, `power`) -- a fixed sample per
  step, no peeking. Skipped when there is no challenger or no router.
- per step (`steps`, basis points; default 500, 2500, 5000): `set_share_N` (the router's share, changed without a
  restart), `wait_N` (a sensor in reschedule mode: no worker slot is held while the sample comes in; it ends early
  when a guardrail is breached), `analyse_N` (CTR and conversion by two-proportion z-tests with p-values and the
  lift's 95 % CI; guardrails error share, p99 latency, coverage) -> the next step, or `rollback_N` at the first
  breach.
- `promote`: after the last step holds, 100 % to the challenger and the MLflow `champion` alias moved atomically.
- `report` -> `$RECSYS_HOME/runs/<run>/report/ab_report.html` (+ `.json`), and an MLflow run in experiment
  `recsys_canary_<model>` with every step's figures.

Set `RECSYS_CANARY_POKE_S` (default 30) to change how often the sensors look at the log.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, PokeReturnValue, dag, task
from airflow.sdk.exceptions import AirflowSkipException
from recsys_common import CHALLENGER_ASSET, RETRY_ARGS, fail_fast

N_STEPS = 3  # the walk's analysed steps (their shares are the `steps` param); passing the last one promotes
POKE_S = float(os.environ.get("RECSYS_CANARY_POKE_S", "30"))
STEP_TIMEOUT = timedelta(hours=float(os.environ.get("RECSYS_CANARY_STEP_TIMEOUT_H", "72")))


@dag(
    dag_id="recsys_canary",
    schedule=[CHALLENGER_ASSET],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=RETRY_ARGS,
    params={
        "model": Param(None, type=["null", "string"], description="registered model (default: the only one)"),
        "challenger_version": Param(None, type=["null", "integer"],
                                    description="version to canary (default: the `challenger` alias)"),
        "steps": Param([500, 2500, 5000], type="array", minItems=N_STEPS, maxItems=N_STEPS,
                       description="the challenger's share at each analysed step, basis points (500 = 5 %); "
                                   "passing the last one promotes to 100 %"),
        "base_ctr": Param(0.05, type="number", description="the champion's expected CTR, for the sample size"),
        "mde": Param(0.10, type="number", description="relative minimum detectable effect on CTR"),
        "alpha": Param(0.05, type="number", description="two-sided significance level"),
        "power": Param(0.8, type="number", description="power at the minimum detectable effect"),
        "max_error_share": Param(0.01, type="number", description="guardrail: challenger requests the champion "
                                                                 "had to answer"),
        "max_p99_ratio": Param(1.5, type="number", description="guardrail: challenger p99 / champion p99 (plus "
                                                               "p99_slack_ms)"),
        "p99_slack_ms": Param(10.0, type="number", description="guardrail: latency slack in ms"),
        "min_coverage_ratio": Param(0.5, type="number", description="guardrail: challenger / champion distinct "
                                                                    "items per request"),
        "min_sample": Param(0, type="integer", description="floor of each step's sample"),
        "max_sample": Param(None, type=["null", "integer"], description="cap of each step's sample (short demo "
                                                                         "steps; the test's power drops)"),
    },
    tags=["recsys", "serving", "canary"],
    doc_md=__doc__,
)
def recsys_canary() -> None:
    @task(doc_md="Challenger vs champion, the router's route checked, failed gates refused, each step's sample "
                 "fixed up front.")
    @fail_fast
    def plan(params: dict | None = None, run_id: str | None = None) -> dict:
        from pipeline_tasks.bundle.canary import CanaryError
        from pipeline_tasks.stages.canary import plan_stage

        try:
            out = plan_stage(run_id, params)
        except CanaryError as exc:  # no router running: nothing to canary through
            raise AirflowSkipException(str(exc)) from exc
        if out["status"] == "no_challenger":
            raise AirflowSkipException(out["message"])
        return out

    @task(doc_md="Promote: 100 % to the challenger, then the MLflow `champion` alias moves to it (atomic).")
    @fail_fast
    def promote(planned: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.canary import promote_stage

        return promote_stage(run_id, planned)

    @task(trigger_rule="none_failed_min_one_success",
          doc_md="The A/B report (HTML, JSON) and the canary's MLflow run.")
    @fail_fast
    def report(planned: dict, run_id: str | None = None) -> dict:
        from pipeline_tasks.stages.canary import report_stage

        return report_stage(run_id, planned)

    planned = plan()
    ends = []
    previous = planned
    for i in range(N_STEPS):
        last = i == N_STEPS - 1

        @task(task_id=f"set_share_{i + 1}", doc_md=f"Step {i + 1}: the router sends the step's share of users "
                                                      "(`steps` param) to the challenger.")
        @fail_fast
        def set_share(planned: dict, i: int = i, run_id: str | None = None) -> dict:
            from pipeline_tasks.stages.canary import set_share_stage

            return set_share_stage(run_id, planned, i)

        @task.sensor(task_id=f"wait_{i + 1}", mode="reschedule", poke_interval=POKE_S, timeout=STEP_TIMEOUT,
                     doc_md=f"Step {i + 1}: until the challenger has the step's sample (or breaches a guardrail); "
                            "reschedule mode holds no worker slot.")
        @fail_fast
        def wait(planned: dict, step: dict) -> PokeReturnValue:
            from pipeline_tasks.stages.canary import step_analysis

            result = step_analysis(planned, step)
            logging.getLogger("recsys.canary").info(
                "challenger %d of %d requests; %s", result["counts"]["challenger"]["requests"], step["needed"],
                result["decision"])
            return PokeReturnValue(is_done=result["decision"] != "wait")

        @task.branch(task_id=f"analyse_{i + 1}", doc_md=f"Step {i + 1}: CTR and conversion z-tests, lift CIs, "
                                                          "guardrails: the next step or a rollback.")
        @fail_fast
        def analyse(planned: dict, step: dict, i: int = i, last: bool = last, run_id: str | None = None) -> str:
            from pipeline_tasks.stages.canary import analyse_stage

            result = analyse_stage(run_id, planned, step, i)
            if result["decision"] == "rollback":
                return f"rollback_{i + 1}"
            return "promote" if last else f"set_share_{i + 2}"

        @task(task_id=f"rollback_{i + 1}", doc_md=f"Step {i + 1} breached: the challenger gets no more traffic, "
                                                     "its alias is removed, the version tagged with why.")
        @fail_fast
        def rollback(planned: dict, i: int = i, run_id: str | None = None) -> dict:
            from pipeline_tasks.stages.canary import rollback_stage, run_manifest

            analysis = run_manifest(run_id)["tasks"][f"analyse_{i + 1}"]["outputs"]
            return rollback_stage(run_id, planned, analysis["reasons"], task=f"rollback_{i + 1}")

        step = set_share(planned)
        previous >> step
        verdict = analyse(planned, step)
        wait(planned, step) >> verdict
        back = rollback(planned)
        verdict >> back
        ends.append(back)
        previous = verdict
    promoted = promote(planned)
    previous >> promoted
    [promoted, *ends] >> report(planned)


recsys_canary()
