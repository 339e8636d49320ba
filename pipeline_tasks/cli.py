"""The ``recsys`` command line: run the training DAG, open the UI, and run single stages by hand."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline_tasks.core.constants import DEFAULT_MAX_STUB_SHARE, DEFAULT_QUALITY_THRESHOLD
from pipeline_tasks.core.settings import airflow_env, disable_telemetry, load_settings
from pipeline_tasks.core.task_logs import DagTestLog, TaskAttempt

app = typer.Typer(help="DAG-first recommender platform: run the training DAG, open Airflow, run stages.",
                  no_args_is_help=True, add_completion=False)
log = logging.getLogger("recsys")

DAG_ID = "recsys_training"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _abs(path: Path) -> Path:
    """A path argument as an absolute path (relative ones are taken from the current directory)."""
    return path.expanduser().resolve()


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print one ``error:`` line (no traceback) and return the exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _airflow(args: list[str], env: dict[str, str], capture: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "airflow"), *args]
    log.debug("running %s", " ".join(cmd))
    return subprocess.run(cmd, env=env, text=True, capture_output=capture, check=False)


def ensure_airflow_home(env: dict[str, str]) -> None:
    """Create / migrate the Airflow metadata DB under AIRFLOW_HOME (SQLite by default); idempotent."""
    home = Path(env["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    marker = home / ".recsys_db_ready"
    if marker.exists():
        return
    typer.echo(f"Initialising Airflow home {home} (first run only) ...")
    res = _airflow(["db", "migrate"], env, capture=True)
    if res.returncode != 0:
        typer.echo(res.stdout[-4000:] + res.stderr[-4000:], err=True)
        raise typer.Exit(f"airflow db migrate failed (exit {res.returncode}); see the output above")
    marker.write_text(datetime.now(UTC).isoformat())


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    """The JSON list an ``airflow ... -o json`` command printed (log lines may come before it)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("[") and line.rstrip().endswith("]"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return []


def find_run_id(env: dict[str, str], logical_date: str, dag_id: str = DAG_ID) -> str | None:
    """The run id Airflow gave the run with this logical date (``airflow dags list-runs``)."""
    res = _airflow(["dags", "list-runs", dag_id, "-o", "json"], env, capture=True)
    runs = _json_lines(res.stdout) if res.returncode == 0 else []
    target = datetime.fromisoformat(logical_date)
    for r in runs:
        if r.get("logical_date") and datetime.fromisoformat(r["logical_date"]) == target:
            return r["run_id"]
    return None


def _source_option(data: str) -> str:
    if data in ("synthetic",) or data.startswith("movielens:"):
        if data.startswith("movielens:"):
            return "movielens:" + str(Path(data.removeprefix("movielens:")).expanduser().resolve())
        return data
    return str(Path(data).expanduser().resolve())


def _json_option(value: str | None, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise _fail(f"{name} must be a JSON object, e.g. '{{\"kind\": \"hnsw\"}}': {exc}") from None
    if not isinstance(parsed, dict):
        raise _fail(f"{name} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _faults_option(faults: str) -> str | dict[str, float]:
    if faults in ("all", "none"):
        return faults
    try:
        return {"rate": float(faults)}
    except ValueError:
        raise _fail(f"--faults {faults!r}: use all, none or a rate such as 0.01") from None


def check_run(conf: dict[str, Any]) -> dict[str, Any]:
    """The run's config as its ingest task will resolve it, every stage's settings built from it and the
    source checked (headers and first rows); raises PermanentError (invalid params, bad source)."""
    from pipeline_tasks.data.source_check import check_source
    from pipeline_tasks.stages.common import resolve_config

    config = resolve_config(conf)
    if config["source"].startswith("movielens:"):  # resolve_config checks the other kinds
        check_source(config["source"])
    return dict(config)


class _Progress:
    """One line per task attempt as it finishes: state, seconds and the task's key figure from the manifest."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.log: DagTestLog | None = None

    def __call__(self, attempt: TaskAttempt) -> None:
        from pipeline_tasks.core.run_summary import key_figure
        from pipeline_tasks.core.runs import MANIFEST, run_dir

        if attempt.state == "marked_success":
            typer.echo(f"  {attempt.task_id:<17}marked success (not run: --mark-success)")
            return
        info: dict[str, Any] = {}
        run_id = self.log.run_id if self.log else None
        manifest = run_dir(run_id, self.settings) / MANIFEST if run_id else None
        if manifest is not None and manifest.exists():
            info = json.loads(manifest.read_text()).get("tasks", {}).get(attempt.task_id) or {}
        state = attempt.state or info.get("status") or "unknown"
        figure = key_figure(attempt.task_id, info) if state == "success" else ""
        retry = f" (attempt {attempt.attempt})" if attempt.attempt > 1 else ""
        typer.echo(f"  {attempt.task_id:<17}{state:<14}{attempt.seconds:7.1f} s  {figure}{retry}".rstrip())
        if state != "success" and attempt.error:
            typer.echo("      " + attempt.error.replace("\n", "\n      "))
        if state == "up_for_retry":
            typer.echo("      (a transient error: Airflow retries the task after its retry delay)")


def _dags_test(dag_id: str, conf: dict[str, Any], extra: list[str], settings: Any, full_log: Path,
               verbose: bool, logical_date: str | None = None) -> tuple[int, str | None, list[TaskAttempt]]:
    """``airflow dags test DAG_ID`` on the shared AIRFLOW_HOME, its output routed by :class:`DagTestLog`.

    Every line goes to ``full_log`` (and to the console with ``verbose``); each task's lines go to its
    Airflow log file, so the UI shows them; a line per finished task is printed. Returns the exit code,
    the run id and the task attempts. ``logical_date`` (default now): a queued run with that logical date (one a
    ``TriggerDagRunOperator`` created) is replaced by this run, with the conf given here.
    """
    env = airflow_env(settings)
    os.environ.update({k: env[k] for k in ("RECSYS_HOME", "AIRFLOW_HOME")})
    ensure_airflow_home(env)
    env["AIRFLOW__LOGGING__JSON_LOGS"] = "True"  # the lines a worker writes to a task log file
    env["AIRFLOW__LOGGING__COLORED_CONSOLE_LOG"] = "False"
    logical_date = logical_date or datetime.now(UTC).isoformat()
    cmd = [str(Path(sys.executable).parent / "airflow"), "dags", "test", dag_id, logical_date,
           "--conf", json.dumps(conf), *extra]
    typer.echo(f"Running DAG {dag_id} with `airflow dags test` (logical date {logical_date}) ...")
    full_log.parent.mkdir(parents=True, exist_ok=True)
    progress = _Progress(settings)
    with full_log.open("w", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        router = DagTestLog(dag_id, Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]), out,
                            echo=typer.echo if verbose else None, on_task=progress)
        progress.log = router
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                router.feed(line)
            returncode = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=60)
            raise
        finally:
            router.close()
    return returncode, router.run_id or find_run_id(env, logical_date, dag_id), router.attempts


def _full_log_path(settings: Any, command: str) -> Path:
    return settings.home / "logs" / f"recsys-{command}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.log"


def _report(dag_id: str, run_id: str | None, returncode: int, attempts: list[TaskAttempt], full_log: Path,
            settings: Any, seconds: float) -> None:
    """The summary after a run (artifacts, model quality, MLflow, UI) and the exit for a failed run."""
    from urllib.parse import quote

    from pipeline_tasks.core.run_summary import summary_lines
    from pipeline_tasks.core.runs import MANIFEST, run_dir

    manifest_path = run_dir(run_id, settings) / MANIFEST if run_id else None
    manifest = json.loads(manifest_path.read_text()) if manifest_path and manifest_path.exists() else None
    if manifest_path and manifest:
        for line in summary_lines(manifest, manifest_path, settings.mlflow_tracking_uri):
            typer.echo(line)
    typer.echo(f"\nRun id        : {run_id}")
    typer.echo(f"Full log      : {full_log}")
    typer.echo(f"Airflow home  : {airflow_env(settings)['AIRFLOW_HOME']}")
    page = f"http://localhost:8080/dags/{dag_id}" + (f"/runs/{quote(run_id, safe='')}" if run_id else "")
    recsys = Path(sys.executable).parent / "recsys"
    typer.echo(f"Airflow UI    : {recsys} ui, then open {page} (graph, task logs)")
    typer.echo(f'Airflow CLI   : eval "$({recsys} env)"; airflow tasks states-for-dag-run {dag_id} \'{run_id}\'')
    took = f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds >= 60 else f"{seconds:.0f} s"
    if returncode == 0:
        typer.echo(f"The run succeeded in {took}.")
        return
    failed = [a.task_id for a in attempts if a.state == "failed"]
    if not attempts:  # Airflow stopped before any task: show why
        typer.echo("".join(full_log.read_text(errors="replace").splitlines(keepends=True)[-30:]), err=True)
    where = f" at task {failed[-1]}" if failed else ""
    typer.echo(f"\nThe run FAILED{where} after {took} (airflow exit {returncode}). The error is above; the task's "
               f"log is in the Airflow UI and in {full_log}. Fix the cause and run again.", err=True)
    raise typer.Exit(1)


@app.command()
def run(
    data: Annotated[str, typer.Option(help="synthetic | movielens:PATH | DIR with the contract tables")] = "synthetic",
    as_of: Annotated[str | None, typer.Option(help="ISO-8601 moment the run looks from (default: contract rule)")]
    = None,
    t_val: Annotated[str | None, typer.Option(help="explicit validation boundary (give --t-test too)")] = None,
    t_test: Annotated[str | None, typer.Option(help="explicit test boundary")] = None,
    quality_threshold: Annotated[float | None, typer.Option(help="minimum accepted share (default 0.95)")] = None,
    max_stub_share: Annotated[float | None, typer.Option(
        help="largest share of interactions whose item (or user) had to be stubbed before the quality gate fails "
             "(default 0.05, RECSYS_MAX_STUB_SHARE)")] = None,
    horizon_days: Annotated[int | None, typer.Option(help="oldest allowed event age in days, counted back from "
                                                         "the newest event (default 730)")] = None,
    bot_events_per_day: Annotated[int | None, typer.Option(
        help="events per user per UTC day above which that day is a bot's (default 1000)")] = None,
    drift_threshold: Annotated[float | None, typer.Option(help="PSI above which a feature counts as drifted "
                                                               "(default 0.2)")] = None,
    events: Annotated[int | None, typer.Option(help="synthetic: number of events")] = None,
    users: Annotated[int | None, typer.Option(help="synthetic: number of users")] = None,
    items: Annotated[int | None, typer.Option(help="synthetic: number of catalog items")] = None,
    days: Annotated[int | None, typer.Option(help="synthetic: days of history")] = None,
    faults: Annotated[str | None, typer.Option(help="synthetic: all | none | a rate such as 0.01")] = None,
    seed: Annotated[int | None, typer.Option(help="synthetic: seed")] = None,
    mark_success: Annotated[str | None, typer.Option(
        help="regex of task ids to mark successful without running them (airflow dags test "
             "--mark-success-pattern), e.g. to iterate on early stages; the UI shows them as success")] = None,
    drift_mode: Annotated[str | None, typer.Option(help="warn | fail on drift above the threshold")] = None,
    two_tower: Annotated[str | None, typer.Option(
        help="JSON retrieval overrides, e.g. '{\"base\": {\"max_epochs\": 10}, \"grid\": [{\"id_dropout\": 0.3}]}'"
    )] = None,
    index: Annotated[str | None, typer.Option(
        help="JSON FAISS index overrides, e.g. '{\"kind\": \"hnsw\", \"target_recall\": 0.95}'")] = None,
    candidates: Annotated[str | None, typer.Option(
        help="JSON candidate pool overrides, e.g. '{\"pool_size\": 500, \"trending_days\": 7}'")] = None,
    ranker: Annotated[str | None, typer.Option(
        help="JSON ranker / Optuna overrides, e.g. '{\"n_trials\": 20, \"timeout_s\": 300}'")] = None,
    gate: Annotated[str | None, typer.Option(
        help="JSON registry gate overrides, e.g. '{\"metrics\": [\"ndcg@10\", \"pool_recall\"], "
             "\"tolerance\": 0.01}'")] = None,
    feedback_log: Annotated[str | None, typer.Option(
        help="a service's feedback log DIR (default none; `recsys serve` writes $RECSYS_HOME/feedback/<namespace>):"
             " its events of contract types join the source's interactions")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="if another `recsys run` is running on this RECSYS_HOME, queue behind it instead of refusing")]
    = False,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="print every log line of the run (always written to the full log file)")] = False,
) -> None:
    """Run the recsys_training DAG end to end with `airflow dags test` (visible in `recsys ui`, with task logs)."""
    from pipeline_tasks.core.constants import DEFAULT_PARAMS
    from pipeline_tasks.core.errors import PermanentError
    from pipeline_tasks.core.run_lock import RunInProgressError, describe, run_lock

    _setup_logging(verbose)
    settings = load_settings()
    conf: dict[str, Any] = {"source": _source_option(data), "as_of": as_of, "t_val": t_val, "t_test": t_test,
                            "quality_threshold": quality_threshold, "max_stub_share": max_stub_share,
                            "drift_mode": drift_mode, "horizon_days": horizon_days,
                            "bot_events_per_day": bot_events_per_day, "drift_threshold": drift_threshold,
                            "two_tower": _json_option(two_tower, "--two-tower"),
                            "index": _json_option(index, "--index"),
                            "candidates": _json_option(candidates, "--candidates"),
                            "ranker": _json_option(ranker, "--ranker"), "gate": _json_option(gate, "--gate"),
                            "feedback_log": str(_abs(Path(feedback_log))) if feedback_log else None}
    synthetic = dict(DEFAULT_PARAMS["synthetic"])
    for key, value in (("n_events", events), ("n_users", users), ("n_items", items), ("n_days", days),
                       ("seed", seed)):
        if value is not None:
            synthetic[key] = value
    if faults is not None:
        synthetic["faults"] = _faults_option(faults)
    conf["synthetic"] = synthetic
    conf = {k: v for k, v in conf.items() if v is not None}
    try:  # before Airflow starts: invalid params or a bad source fail in seconds, in one line
        config = check_run(conf)
    except PermanentError as exc:
        raise _fail(str(exc)) from None
    full_log = _full_log_path(settings, "run")
    extra = ["--mark-success-pattern", mark_success] if mark_success else []

    def queued(holder: dict[str, Any]) -> None:
        typer.echo(f"Waiting for the running `recsys run` to end ({describe(holder)}) ...")

    started = datetime.now(UTC)
    try:
        with run_lock(settings.home, {"source": conf["source"], "log": str(full_log)}, wait=wait, on_wait=queued):
            started = datetime.now(UTC)
            typer.echo(f"Data source   : {conf['source']} (namespace {config['namespace']})")
            typer.echo(f"Full log      : {full_log}" + ("" if verbose else " (-v prints it here too)"))
            returncode, run_id, attempts = _dags_test(DAG_ID, conf, extra, settings, full_log, verbose)
    except RunInProgressError as exc:
        raise _fail(str(exc), code=3) from None
    _report(DAG_ID, run_id, returncode, attempts, full_log, settings, (datetime.now(UTC) - started).total_seconds())
    _start_canary(run_id, settings)


def _start_canary(run_id: str | None, settings: Any) -> None:
    """After a run that registered a challenger: walk it with the canary when the model's canary router runs
    (`recsys canary start` in the background, its output in the canary's directory), else say how to."""
    from pipeline_tasks.bundle.canary import canary_dir, process_info
    from pipeline_tasks.core.runs import MANIFEST
    from pipeline_tasks.core.runs import run_dir as _run_dir

    if not run_id:
        return
    path = _run_dir(run_id, settings) / MANIFEST
    registered = ((json.loads(path.read_text()).get("tasks") or {}).get("register") or {}).get("outputs") \
        if path.exists() else None
    if not registered or registered.get("alias") != "challenger":
        return
    name = registered["model"]
    router = process_info(name, "router", settings)
    if not router or not router["alive"]:
        typer.echo(f"Challenger    : {name} v{registered['version']}; walk it on live traffic with "
                   f"`recsys canary start --model {name}`")
        return
    out = canary_dir(name, settings) / "canary-start.log"
    with open(out, "ab") as fh:
        subprocess.Popen([sys.executable, "-m", "pipeline_tasks.cli", "canary", "start", "--model", name,
                          "--challenger-version", str(registered["version"])], stdout=fh, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    typer.echo(f"Canary        : {name} v{registered['version']} is walking 5 -> 25 -> 50 -> 100 % on the running "
               f"router (`recsys canary status`; output {out})")


@app.command()
def refresh(
    source: Annotated[str | None, typer.Option(
        help="catalog: contract DIR, items file or built-in source (default: the serving model's training source)"
    )] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="print every log line of the run (always written to the full log file)")] = False,
) -> None:
    """Run the recsys_item_refresh DAG once: add new catalog items to the index of every champion/challenger bundle
    and publish a fresh serving snapshot to their running services when anything changed."""
    _setup_logging(verbose)
    _run_dag("recsys_item_refresh", {"source": _source_option(source)} if source else {}, "refresh", verbose)


def _run_dag(dag_id: str, conf: dict[str, Any], command: str, verbose: bool) -> str | None:
    """``airflow dags test`` of a DAG with its full log, a line per task and the summary (exit 1 when it failed);
    returns the run id."""
    settings = load_settings()
    full_log = _full_log_path(settings, command)
    typer.echo(f"Full log      : {full_log}" + ("" if verbose else " (-v prints it here too)"))
    started = datetime.now(UTC)
    returncode, run_id, attempts = _dags_test(dag_id, conf, [], settings, full_log, verbose)
    _report(dag_id, run_id, returncode, attempts, full_log, settings, (datetime.now(UTC) - started).total_seconds())
    return run_id


@app.command()
def drift(
    model: Annotated[str | None, typer.Option(help="registered model (default: every model with a champion)")]
    = None,
    window_days: Annotated[float | None, typer.Option(help="feedback logged in the last this many days (default 1)")]
    = None,
    threshold: Annotated[float | None, typer.Option(help="PSI above which a feature drifted (default 0.2)")] = None,
    min_events: Annotated[int | None, typer.Option(help="fewer events in the window: no verdict (default 200)")]
    = None,
    features: Annotated[str | None, typer.Option(
        help="comma-separated features to compare (default all: event_type, device, category, hour, value, "
             "item_popularity, user_activity)")] = None,
    retrain: Annotated[bool, typer.Option(
        "--retrain", help="retrain a model whose served traffic drifted (recsys_training with the champion's "
                          "params plus the feedback log)")] = False,
    run_triggered: Annotated[bool, typer.Option(
        "--run-triggered/--no-run-triggered",
        help="when no scheduler runs, run a triggered training run here at once (else it stays queued)")] = True,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="print every log line of the run (always written to the full log file)")] = False,
) -> None:
    """Run the recsys_served_drift DAG once: PSI of the services' feedback log against each champion's training
    data, an HTML report per model; with --retrain, a drifted model is retrained (in place when no scheduler runs)."""
    from pipeline_tasks.core.errors import PermanentError
    from pipeline_tasks.evaluation.served_drift import ServedDriftConfig

    _setup_logging(verbose)
    conf: dict[str, Any] = {"model": model, "window_days": window_days, "threshold": threshold,
                            "min_events": min_events, "retrain": retrain,
                            "features": [f.strip() for f in features.split(",") if f.strip()] if features else None}
    conf = {k: v for k, v in conf.items() if v is not None}
    try:
        ServedDriftConfig.from_params(conf)
    except PermanentError as exc:
        raise _fail(str(exc)) from None
    from pipeline_tasks.core.runs import MANIFEST
    from pipeline_tasks.core.runs import run_dir as _run_dir

    settings = load_settings()
    run_id = _run_dag("recsys_served_drift", conf, "drift", verbose)
    path = _run_dir(run_id, settings) / MANIFEST if run_id else None
    if path is None or not path.exists():
        return
    outputs = ((json.loads(path.read_text()).get("tasks") or {}).get("served_drift") or {}).get("outputs") or {}
    for name, res in (outputs.get("models") or {}).items():
        where = res.get("report_html") or res.get("message", "")
        typer.echo(f"Served drift  : {name}: {res['status']}" + (f" {res['flagged']}" if res.get("flagged") else "")
                   + f" -- {where}")
    _run_triggered(outputs.get("trigger") or [], settings, verbose, run_here=run_triggered)


def _scheduler_alive(env: dict[str, str]) -> bool:
    """Whether an Airflow scheduler heartbeats on this AIRFLOW_HOME's database (`airflow jobs check`)."""
    return _airflow(["jobs", "check", "--job-type", "SchedulerJob", "--limit", "1"], env, capture=True).returncode == 0


def _run_triggered(triggered: list[dict[str, Any]], settings: Any, verbose: bool, run_here: bool = True) -> None:
    """The recsys_training runs a served-drift run triggered (``conf``, ``logical_date``, ``trigger_run_id``): left
    to the scheduler when one runs, else each run in place (`airflow dags test` at its logical date, which replaces
    the queued run) under the run lock."""
    from pipeline_tasks.core.run_lock import run_lock

    if not triggered:
        return
    env = airflow_env(settings)
    if not run_here or _scheduler_alive(env):
        who = "the running scheduler starts it (unpause recsys_training in the UI if it is paused)" if run_here \
            else "a scheduler starts it (`recsys ui`, unpause recsys_training), or `recsys drift` without " \
                 "--no-run-triggered runs it here"
        for t in triggered:
            typer.echo(f"Retraining    : recsys_training run {t['trigger_run_id']} is queued; {who}")
        return
    for t in triggered:
        typer.echo(f"Retraining    : no scheduler runs; running the triggered recsys_training run in place "
                   f"(logical date {t['logical_date']}, source {t['conf'].get('source')} + feedback log "
                   f"{t['conf'].get('feedback_log')})")
        full_log = _full_log_path(settings, "drift-retrain")
        started = datetime.now(UTC)
        with run_lock(settings.home, {"source": t["conf"].get("source"), "log": str(full_log)}, wait=True):
            returncode, run_id, attempts = _dags_test(DAG_ID, t["conf"], [], settings, full_log, verbose,
                                                      logical_date=t["logical_date"])
        _report(DAG_ID, run_id, returncode, attempts, full_log, settings,
                (datetime.now(UTC) - started).total_seconds())
        _start_canary(run_id, settings)


@app.command()
def ui(port: Annotated[int, typer.Option(help="API server / UI port")] = 8080) -> None:
    """Start `airflow standalone` on the same AIRFLOW_HOME that `recsys run` uses (Ctrl-C stops it)."""
    settings = load_settings()
    env = airflow_env(settings)
    env["AIRFLOW__API__PORT"] = str(port)
    ensure_airflow_home(env)
    typer.echo(f"Airflow UI at http://localhost:{port} (AIRFLOW_HOME={env['AIRFLOW_HOME']}); Ctrl-C to stop.")
    raise typer.Exit(_airflow(["standalone"], env).returncode)


@app.command("env")
def env_cmd() -> None:
    """Print the environment as `export` lines, to run `airflow ...` yourself: eval "$(recsys env)"."""
    env = airflow_env(load_settings())
    keys = sorted(k for k in env if k.startswith(("AIRFLOW", "RECSYS")) or k == "PATH")
    for key in keys:
        typer.echo(f"export {key}={json.dumps(env[key])}")


@app.command()
def generate(
    out_dir: Annotated[Path, typer.Argument(help="directory to write interactions/items/users.parquet to")],
    users: Annotated[int, typer.Option(help="number of users")] = 1000,
    items: Annotated[int, typer.Option(help="number of catalog items")] = 2000,
    days: Annotated[int, typer.Option(help="days of history")] = 60,
    events: Annotated[int, typer.Option(help="number of interaction events")] = 100_000,
    faults: Annotated[str, typer.Option(help="all | none | a rate such as 0.01")] = "none",
    seed: Annotated[int, typer.Option(help="generator seed (same seed, same data)")] = 42,
) -> None:
    """Write a synthetic contract directory (a valid `--data DIR` source)."""
    from pipeline_tasks.data.ingest import ingest

    _setup_logging(False)
    disable_telemetry()
    spec: dict[str, Any] = {"n_users": users, "n_items": items, "n_days": days, "n_events": events, "seed": seed,
                            "faults": _faults_option(faults)}
    try:
        out = ingest("synthetic", _abs(out_dir), synthetic=spec)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(out["counts"]))


@app.command()
def validate(
    input_dir: Annotated[Path, typer.Argument(help="a contract directory")],
    out_dir: Annotated[Path, typer.Argument(help="where accepted/, quarantine/, report.json, data_docs/ go")],
    as_of: Annotated[str | None, typer.Option(help="ISO-8601 as_of")] = None,
    quality_threshold: Annotated[float, typer.Option(help="minimum accepted share of interactions")]
    = DEFAULT_QUALITY_THRESHOLD,
    max_stub_share: Annotated[float, typer.Option(
        help="largest share of interactions whose item (or user) had to be stubbed before the gate fails")]
    = DEFAULT_MAX_STUB_SHARE,
) -> None:
    """Validate a contract directory with the GX suites (no Airflow); exit 1 if the gate fails."""
    from pipeline_tasks.core.errors import PermanentError
    from pipeline_tasks.data.source_check import check_contract_dir
    from pipeline_tasks.data.validate import DataQualityError, ValidationConfig, to_utc, validate_contract_dir

    _setup_logging(False)
    disable_telemetry()
    try:
        anchor = to_utc(as_of) if as_of else None
    except ValueError as exc:
        raise _fail(f"--as-of {as_of!r} is not an ISO-8601 moment ({exc})") from None
    try:
        check_contract_dir(_abs(input_dir))
        cfg = ValidationConfig(as_of=anchor, quality_threshold=quality_threshold, max_stub_share=max_stub_share)
        out = validate_contract_dir(_abs(input_dir), _abs(out_dir), cfg)
    except DataQualityError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    except PermanentError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps({k: out[k] for k in ("counts", "quality_rate", "report", "data_docs")}, indent=2))


@app.command()
def split(
    accepted_dir: Annotated[Path, typer.Argument(help="a contract directory of accepted data")],
    out_dir: Annotated[Path, typer.Argument(help="where train/validation/test.parquet and split.json go")],
    t_val: Annotated[str | None, typer.Option(help="explicit validation boundary (ISO-8601; give --t-test too)")]
    = None,
    t_test: Annotated[str | None, typer.Option(help="explicit test boundary (ISO-8601)")] = None,
) -> None:
    """Time-based split of a contract directory (no Airflow)."""
    from pipeline_tasks.core.errors import PermanentError
    from pipeline_tasks.data.source_check import check_contract_dir
    from pipeline_tasks.data.split import SplitConfig, split_contract_dir

    _setup_logging(False)
    try:
        check_contract_dir(_abs(accepted_dir))
        out = split_contract_dir(_abs(accepted_dir), _abs(out_dir), SplitConfig(t_val=t_val, t_test=t_test))
    except (PermanentError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps({k: out[k] for k in ("t_val", "t_test", "counts")}, indent=2))


def _model_name(data: str | None, model: str | None) -> str:
    """The registered model to use: ``--model``, else the one of ``--data``'s source, else the only one."""
    from pipeline_tasks.core.namespace import source_namespace
    from pipeline_tasks.online.bundle import model_name, registered_models

    if model:
        return model
    if data:
        return model_name(source_namespace(_source_option(data), None))
    names = registered_models()
    if len(names) == 1:
        return names[0]
    if not names:
        raise _fail("no registered model yet: `recsys run` registers one (its register task)")
    raise _fail(f"several registered models {names}: choose one with --model (or --data)")


@app.command()
def recommend(
    users: Annotated[Path, typer.Option(help="user ids: parquet/csv with a user_id column, or one id per line")],
    output: Annotated[Path, typer.Option(help="parquet file to write user_id, item_id, rank, score to")],
    as_of: Annotated[str, typer.Option(help="ISO-8601 request time: history before it, features valid at it")],
    k: Annotated[int, typer.Option(help="items per user (1..1000)")] = 20,
    data: Annotated[str | None, typer.Option(
        help="contract DIR for histories and servability (default: the bundle's accepted data)")] = None,
    model: Annotated[str | None, typer.Option(help="registered model name (default: the one of --data, or the "
                                                   "only one)")] = None,
    model_version: Annotated[int | None, typer.Option(help="bundle version (default: the champion)")] = None,
    fit: Annotated[str, typer.Option(help="serving (default) or protocol (trained up to t_test)")] = "serving",
    no_rules: Annotated[bool, typer.Option("--no-rules", help="ranker order without business rules")] = False,
    no_safety_flags: Annotated[bool, typer.Option(
        "--no-safety-flags", help="recommend items under a safety flag too (`recsys flag`; by default they are "
                                  "never recommended, as in the service)")] = False,
) -> None:
    """Recommend k items to each user with a registered bundle (candidates, ranker and rules as in evaluate)."""
    from pipeline_tasks.bundle.recommend import describe, read_users
    from pipeline_tasks.bundle.recommend import recommend as run_recommend
    from pipeline_tasks.data.validate import to_utc
    from pipeline_tasks.online.bundle import load_bundle
    from pipeline_tasks.online.safety import SafetyFlagsError, flags_path, read_flags

    _setup_logging(False)
    disable_telemetry()
    try:
        at = to_utc(as_of)
    except ValueError as exc:
        raise _fail(f"--as-of {as_of!r} is not an ISO-8601 moment ({exc})") from None
    if not 1 <= k <= 1000:
        raise _fail(f"--k {k}: use 1..1000")
    if fit not in ("serving", "protocol"):
        raise _fail(f"--fit {fit!r}: use serving or protocol")
    name = _model_name(data, model)
    try:
        bundle = load_bundle(name, version=model_version)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    data_dir = _abs(Path(data)) if data and not data.startswith(("movielens:", "synthetic")) else None
    ids = read_users(_abs(users))
    try:
        flagged = None if no_safety_flags else len(read_flags(flags_path(bundle.name)))
        recs = run_recommend(bundle, ids, k, at, data_dir=data_dir, fit=fit, rules=not no_rules,
                             safety_flags=not no_safety_flags)
    except SafetyFlagsError as exc:
        raise _fail(f"{exc} (or pass --no-safety-flags)") from None
    out = _abs(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    recs.to_parquet(out, index=False)
    typer.echo(json.dumps({**describe(bundle), "fit": fit, "users": len(ids), "rows": len(recs),
                           "safety_flagged_items": flagged, "output": str(out)}, indent=2))


@app.command()
def flag(
    items: Annotated[list[str] | None, typer.Argument(help="item ids to flag (or, with --remove, to unflag)")] = None,
    reason: Annotated[str | None, typer.Option(help="why (recorded with each event; required to flag)")] = None,
    remove: Annotated[bool, typer.Option("--remove", help="lift the flag of ITEMS (they may be served again)")] =
        False,
    list_flags: Annotated[bool, typer.Option("--list", help="print the flagged items with reason and time")] = False,
    model: Annotated[str | None, typer.Option(help="registered model name (default: the one of --data, or the "
                                                   "only one)")] = None,
    data: Annotated[str | None, typer.Option(help="the model's data source, to find its name (instead of "
                                                  "--model)")] = None,
) -> None:
    """Flag items that must never be served (safety), lift flags, or list them; running services apply a change
    within about a second, `recsys recommend` at its next call."""
    from pipeline_tasks.online.safety import SafetyFlagsError, append_flags, flags_path, read_flags

    disable_telemetry()
    if list_flags and (items or remove or reason):
        raise _fail("--list takes no ITEMS, --remove or --reason")
    if not list_flags and not items:
        raise _fail("give the ITEMS to flag (with --reason), --remove ITEMS, or --list")
    if items and not remove and not (reason or "").strip():
        raise _fail("--reason is required to flag items: say why they must not be served (it is recorded)")
    name = _model_name(data, model)
    path = flags_path(name)
    try:
        current = read_flags(path)
    except SafetyFlagsError as exc:
        raise _fail(str(exc)) from None
    if list_flags:
        typer.echo(json.dumps({"model": name, "file": str(path), "flagged": [
            {"item_id": e.item_id, "reason": e.reason, "at": e.at} for e in current.values()]}, indent=2))
        return
    assert items is not None
    if remove:
        unknown = [i for i in items if i not in current]
        if unknown:
            typer.echo(f"warning: not flagged, nothing to lift: {', '.join(unknown)}", err=True)
    written = append_flags(path, items, flagged=not remove, reason=(reason or "").strip())
    typer.echo(json.dumps({"model": name, "file": str(path), "flagged": not remove,
                           "items": [e.item_id for e in written], "now_flagged": len(read_flags(path))}, indent=2))


def _served_bundle(model: str | None, version: int | None, alias: str, data: str | None) -> tuple[Any, Path | None]:
    """The registered bundle a service serves, and the contract DIR of ``--data`` (None: the bundle's data)."""
    from pipeline_tasks.online.bundle import load_bundle

    try:
        bundle = load_bundle(_model_name(data, model), version=version, alias=alias)
    except LookupError as exc:
        raise _fail(str(exc)) from None
    return bundle, _abs(Path(data)) if data and not data.startswith(("movielens:", "synthetic")) else None


def serving_snapshot(bundle: Any, as_of: str | None, data_dir: Path | None, rebuild: bool, fit: str = "serving"
                     ) -> Path:
    """The bundle's serving snapshot at ``as_of`` under ``$RECSYS_HOME/serving/``, written when missing."""
    from pipeline_tasks.bundle.publish import serving_dir
    from pipeline_tasks.bundle.recommend import snapshot_moment, write_snapshot
    from pipeline_tasks.data.validate import to_utc

    at = to_utc(as_of) if as_of else snapshot_moment(bundle)
    key = at.strftime("%Y%m%dT%H%M%S") + ("" if data_dir is None else "-" + data_dir.name) + \
        ("" if fit == "serving" else f"-{fit}")
    target = serving_dir(bundle) / f"snapshot-{key}"
    if rebuild or not (target / "snapshot.json").exists():
        write_snapshot(bundle, target, at, data_dir=data_dir, fit=fit)
    return target


def serve_env(bundle_dir: Path, snapshot_dir: Path, state: str, epsilon: float, shown_filter: bool,
              workers: int, drill: str | None = None) -> dict[str, str]:
    """The environment ``serving.service`` reads (see its docstring)."""
    from pipeline_tasks.bundle.publish import point_snapshot

    env = dict(os.environ)
    env.update(RECSYS_BUNDLE_DIR=str(bundle_dir), RECSYS_SNAPSHOT_DIR=str(snapshot_dir), RECSYS_STATE=state,
               RECSYS_SNAPSHOT_POINTER=str(point_snapshot(snapshot_dir)),
               RECSYS_EPSILON=str(epsilon), RECSYS_FILTER_SHOWN="1" if shown_filter else "0",
               RECSYS_DRILL=drill or "",
               RECSYS_HOME=str(load_settings().home),
               BENTOML_CONFIG_OPTIONS=f"services.RecsysService.workers={workers}")
    env.setdefault("RECSYS_REDIS_URL", load_settings().redis_url)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one request at a time per worker
        env.setdefault(var, "1")
    return env


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="registered model name (default: the one of --data, or the "
                                                   "only one)")] = None,
    model_version: Annotated[int | None, typer.Option(help="bundle version (default: the alias's)")] = None,
    alias: Annotated[str, typer.Option(help="alias to serve when no --model-version is given")] = "champion",
    data: Annotated[str | None, typer.Option(
        help="contract DIR for histories and servability (default: the bundle's accepted data)")] = None,
    as_of: Annotated[str | None, typer.Option(help="the snapshot moment (default: the bundle's as_of)")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 3000,
    state: Annotated[str, typer.Option(help="local (one worker, state in process) or redis (production)")] =
        "local",
    workers: Annotated[int, typer.Option(help="worker processes (more than 1 needs --state redis)")] = 1,
    epsilon: Annotated[float, typer.Option(help="epsilon-greedy exploration (0 = off)")] = 0.0,
    no_shown_filter: Annotated[bool, typer.Option("--no-shown-filter",
                                                  help="serve recently shown items again")] = False,
    rebuild_snapshot: Annotated[bool, typer.Option("--rebuild-snapshot",
                                                   help="rewrite the serving snapshot")] = False,
    fit: Annotated[str, typer.Option(help="serving (every window up to as_of) or protocol (trained up to t_test: "
                                          "replays the test window honestly in simulations)")] = "serving",
    drill: Annotated[str | None, typer.Option(help="canary drill, a deliberately degraded model: random_ranking "
                                                   "(candidates in random order) or reverse_ranking (worst first)")]
        = None,
    max_batch: Annotated[int, typer.Option(help="requests that queued while a worker computed are answered "
                                                "together, up to this many (1 = one at a time)")] = 8,
) -> None:
    """Serve a registered bundle over HTTP (BentoML): POST /recommend, POST /feedback, /readyz, /metrics."""

    _setup_logging(False)
    disable_telemetry()
    if state not in ("local", "redis"):
        raise _fail(f"--state {state!r}: use local or redis")
    if workers < 1 or (workers > 1 and state == "local"):
        raise _fail(f"--workers {workers}: use 1 with --state local (workers share state only through Redis)")
    if not 0.0 <= epsilon <= 1.0:
        raise _fail(f"--epsilon {epsilon}: use a probability in [0, 1]")
    if fit not in ("serving", "protocol"):
        raise _fail(f"--fit {fit!r}: use serving or protocol")
    bundle, data_dir = _served_bundle(model, model_version, alias, data)
    snapshot = serving_snapshot(bundle, as_of, data_dir, rebuild_snapshot, fit)
    if drill not in (None, "random_ranking", "reverse_ranking"):
        raise _fail(f"--drill {drill!r}: use random_ranking or reverse_ranking (or leave it out)")
    if max_batch < 1:
        raise _fail(f"--max-batch {max_batch}: use 1 (one request at a time) or more")
    env = serve_env(bundle.path, snapshot, state, epsilon, not no_shown_filter, workers, drill)
    env["RECSYS_MAX_BATCH"] = str(max_batch)
    # BentoML keeps its Prometheus files in $BENTOML_HOME/prometheus_multiproc_dir and wipes it at start: each
    # service (a canary runs three) needs its own home, or their /metrics mix and clobber each other.
    env.setdefault("BENTOML_HOME", str(load_settings().home / "serving" / f"bentoml-{port}"))
    typer.echo(f"serving {bundle.name} version {bundle.version} on http://{host}:{port} (snapshot {snapshot})")
    bentoml = Path(sys.executable).with_name("bentoml")
    os.execve(str(bentoml), [str(bentoml), "serve", "serving.service:RecsysService", "--host", host,
                             "--port", str(port)], env)


@app.command()
def snapshot(
    model: Annotated[str | None, typer.Option(help="registered model name (default: the one of --data, or the "
                                                   "only one)")] = None,
    model_version: Annotated[int | None, typer.Option(help="bundle version (default: the alias's)")] = None,
    alias: Annotated[str, typer.Option(help="alias whose version to refresh when no --model-version is given")] =
        "champion",
    data: Annotated[str | None, typer.Option(
        help="contract DIR for histories and servability (default: the bundle's accepted data)")] = None,
    as_of: Annotated[str | None, typer.Option(help="the new snapshot's moment (default: now)")] = None,
) -> None:
    """Write a new serving snapshot (history, catalog, Feast rows at --as-of) and point the version's running
    services at it: they load it in the background and swap it in within RECSYS_REFRESH_S (default 30 s)."""
    from pipeline_tasks.bundle.publish import point_snapshot

    _setup_logging(False)
    disable_telemetry()
    bundle, data_dir = _served_bundle(model, model_version, alias, data)
    moment = as_of or _now_iso()
    target = serving_snapshot(bundle, moment, data_dir, rebuild=True)
    pointer = point_snapshot(target)
    typer.echo(json.dumps({"model": bundle.name, "version": bundle.version, "snapshot": str(target),
                           "as_of": moment, "pointer": str(pointer)}, indent=2))


def _now_iso() -> str:
    """Now (UTC) as ISO-8601, to the second."""
    import datetime as dt

    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


models_app = typer.Typer(help="Registered bundle versions: list them, promote one to champion.",
                         invoke_without_command=True)
app.add_typer(models_app, name="models")


@models_app.callback()
def models(ctx: typer.Context,
           model: Annotated[str | None, typer.Option(help="registered model name (default: all)")] = None) -> None:
    """List versions, aliases, gate and protocol-fit test metrics of the registered models."""
    from pipeline_tasks.bundle.registry import list_versions
    from pipeline_tasks.online.bundle import registered_models

    if ctx.invoked_subcommand is not None:
        return
    disable_telemetry()
    names = [model] if model else registered_models()
    if not names:
        typer.echo("no registered model yet: `recsys run` registers one")
        return
    for name in names:
        typer.echo(f"{name}  (metrics: protocol fit, test window)")
        for row in list_versions(name):
            metrics = ", ".join(f"{k.removeprefix('protocol.')}={v}" for k, v in sorted(row["metrics"].items())
                                if k.startswith("protocol.two-stage.") or k.startswith("protocol.two_stage."))
            aliases = ",".join(row["aliases"]) or "-"
            typer.echo(f"  v{row['version']:<4} {aliases:<20} gate={row['gate']:<7} run={row['run_id']}  {metrics}")
            if row["gate"] != "passed":
                typer.echo(f"        reason: {row['reason']}")


@models_app.command("promote")
def models_promote(
    version: Annotated[int, typer.Argument(help="version to make champion")],
    model: Annotated[str | None, typer.Option(help="registered model name (default: the only one)")] = None,
) -> None:
    """Move the champion alias to VERSION (refused, with the reason, when its gate failed)."""
    from pipeline_tasks.bundle.registry import PromotionRefusedError, promote

    disable_telemetry()
    name = _model_name(None, model)
    try:
        moved = promote(name, version)
    except PromotionRefusedError as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(json.dumps(moved))


canary_app = typer.Typer(help="The canary: the challenger on a share of traffic beside the champion, promoted step by "
                              "step or rolled back (the recsys_canary DAG), and the operator's controls.")
app.add_typer(canary_app, name="canary")


def _canary_model(model: str | None) -> str:
    from pipeline_tasks.bundle.canary import resolve_model
    from pipeline_tasks.core.errors import PermanentError

    disable_telemetry()
    try:
        return resolve_model(model)
    except PermanentError as exc:
        raise _fail(str(exc)) from None


@canary_app.command("start")
def canary_start(
    model: Annotated[str | None, typer.Option(help="registered model (default: the only one)")] = None,
    challenger_version: Annotated[int | None, typer.Option(help="version to canary (default: the challenger "
                                                                 "alias)")] = None,
    data: Annotated[str | None, typer.Option(help="contract DIR both services serve (default: each bundle's "
                                                  "data)")] = None,
    steps: Annotated[str, typer.Option(help="the challenger's share at each analysed step, basis points")] =
        "500,2500,5000",
    mde: Annotated[float, typer.Option(help="relative minimum detectable effect on CTR")] = 0.10,
    base_ctr: Annotated[float, typer.Option(help="the champion's expected CTR")] = 0.05,
    max_sample: Annotated[int | None, typer.Option(help="cap each step's sample (short demo steps)")] = None,
    challenger_drill: Annotated[str | None, typer.Option(
        help="rehearse a rollback: random_ranking / reverse_ranking serve the challenger's candidates in random "
             "order / worst first")] = None,
    champion_drill: Annotated[str | None, typer.Option(help="the same for the champion (rehearse a promotion)")] =
        None,
    no_shown_filter: Annotated[bool, typer.Option("--no-shown-filter", help="both services serve recently shown "
                                                  "items again (simulated users ask many times)")] = False,
    as_of: Annotated[str | None, typer.Option(help="both services answer at this moment (a simulation replays a "
                                                   "held-out window from its start)")] = None,
    fit: Annotated[str, typer.Option(help="the fit both services serve: serving, or protocol (trained up to "
                                          "t_test) to replay the test window without leakage")] = "serving",
    base_port: Annotated[int | None, typer.Option(help="router port; the champion gets +1, the challenger +2 "
                                                       "(default: the running router's, else 3100)")] = None,
    no_dag: Annotated[bool, typer.Option("--no-dag", help="start the services and the router only")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="print every log line of the DAG run")] = False,
) -> None:
    """Start the champion's and challenger's services and the router (detached, pid files under
    $RECSYS_HOME/canary/<model>/), then walk the challenger with the recsys_canary DAG."""
    from pipeline_tasks.bundle.canary import (
        DEFAULT_PORTS,
        CanaryError,
        check_promotable,
        ensure_service,
        process_info,
        start_router,
        url_of,
        wait_service,
        write_targets,
    )
    from pipeline_tasks.bundle.registry import PromotionRefusedError
    from pipeline_tasks.online.bundle import aliases_of

    _setup_logging(verbose)
    name = _canary_model(model)
    aliases = aliases_of(name)
    champion_v = aliases.get("champion")
    challenger_v = challenger_version or aliases.get("challenger")
    if champion_v is None:
        raise _fail(f"{name} has no champion yet: run `recsys run` first")
    if challenger_v is not None:
        try:
            check_promotable(name, challenger_v)
        except PromotionRefusedError as exc:
            raise _fail(str(exc), code=1) from None
    running = process_info(name, "router")
    if base_port is None:
        base_port = int(running["port"]) if running and running["alive"] else DEFAULT_PORTS["router"]
    try:
        shown = not no_shown_filter
        # The three start before any is waited for: the services load their bundles at the same time.
        champion = ensure_service(name, "champion", champion_v, base_port + 1, data, champion_drill, shown, as_of,
                                  fit, wait=False)
        challenger = ensure_service(name, "challenger", challenger_v, base_port + 2, data, challenger_drill,
                                    shown, as_of, fit, wait=False) if challenger_v is not None else None
        write_targets(name, champion, challenger, share_bp=0)
        router = start_router(name, base_port, wait=False)
        for info in (champion, challenger, router):
            if info:
                wait_service(info)
    except CanaryError as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(f"champion v{champion_v} {url_of(champion)}; " +
               (f"challenger v{challenger_v} {url_of(challenger)}; " if challenger else "no challenger; ") +
               f"router {url_of(router)} (send traffic there)")
    if no_dag or challenger is None:
        return
    conf = {"model": name, "challenger_version": challenger_v, "steps": [int(x) for x in steps.split(",") if x],
            "mde": mde, "base_ctr": base_ctr, "max_sample": max_sample}
    _run_dag("recsys_canary", conf, "canary", verbose)


@canary_app.command("status")
def canary_status(model: Annotated[str | None, typer.Option(help="registered model")] = None) -> None:
    """The walk's record, the router's route and the serving processes."""
    from pipeline_tasks.bundle.canary import ROLES, process_info, read_record, route_state, url_of

    name = _canary_model(model)
    out: dict[str, Any] = {"model": name, "canary": read_record(name), "processes": {}}
    for role in ROLES:
        info = process_info(name, role)
        out["processes"][role] = None if info is None else {k: info.get(k) for k in ("pid", "port", "version",
                                                                                     "alive", "log")}
    router = process_info(name, "router")
    if router and router["alive"]:
        out["route"] = route_state(url_of(router))
    typer.echo(json.dumps(out, indent=2, default=str))


@canary_app.command("set-share")
def canary_set_share(
    share_bp: Annotated[int, typer.Argument(help="the challenger's share of users in basis points (500 = 5 %)")],
    model: Annotated[str | None, typer.Option(help="registered model")] = None,
) -> None:
    """Change the challenger's share at once (no restart, no request dropped)."""
    from pipeline_tasks.bundle.canary import CanaryError, change_route, record, router_url

    name = _canary_model(model)
    try:
        route = change_route(router_url(name), share_bp=share_bp)
    except CanaryError as exc:
        raise _fail(str(exc), code=1) from None
    record(name, share_bp=share_bp)
    typer.echo(json.dumps(route))


@canary_app.command("promote")
def canary_promote(
    model: Annotated[str | None, typer.Option(help="registered model")] = None,
    version: Annotated[int | None, typer.Option(help="the challenger version (default: the router's)")] = None,
) -> None:
    """100 % to the challenger and the champion alias moved to it (refused for a failed gate or a rollback)."""
    from pipeline_tasks.bundle.canary import CanaryError, promote_challenger, route_state, router_url
    from pipeline_tasks.bundle.registry import PromotionRefusedError

    name = _canary_model(model)
    try:
        url = router_url(name)
        target = version or route_state(url).get("challenger_version")
        if not target:
            raise CanaryError("the router has no challenger to promote")
        out = promote_challenger(name, int(target), url)
    except (CanaryError, PromotionRefusedError) as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(json.dumps(out, default=str))


@canary_app.command("rollback")
def canary_rollback(
    model: Annotated[str | None, typer.Option(help="registered model")] = None,
    reason: Annotated[str, typer.Option(help="why (recorded on the model version)")] = "rolled back by hand",
) -> None:
    """No more traffic to the challenger; its alias removed and the version tagged with the reason."""
    from pipeline_tasks.bundle.canary import CanaryError, rollback_challenger, route_state, router_url

    name = _canary_model(model)
    try:
        url = router_url(name)
        target = route_state(url).get("challenger_version")
        if not target:
            raise CanaryError("the router has no challenger to roll back")
        out = rollback_challenger(name, int(target), url, [reason])
    except CanaryError as exc:
        raise _fail(str(exc), code=1) from None
    typer.echo(json.dumps(out, default=str))


@canary_app.command("stop")
def canary_stop(model: Annotated[str | None, typer.Option(help="registered model")] = None) -> None:
    """Stop the router and both services."""
    from pipeline_tasks.bundle.canary import ROLES, stop_process

    name = _canary_model(model)
    stopped = [role for role in ROLES if stop_process(name, role)]
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@canary_app.command("simulate")
def canary_simulate(
    truth: Annotated[str, typer.Option(help="held-out window: a parquet/csv with user_id, item_id (e.g. a run's "
                                            "split/test.parquet)")],
    requests: Annotated[int, typer.Option(help="requests to send")] = 2000,
    url: Annotated[str | None, typer.Option(help="where to send them (default: the model's router)")] = None,
    model: Annotated[str | None, typer.Option(help="registered model")] = None,
    rate: Annotated[float | None, typer.Option(help="requests/s overall (default: as fast as answered)")] = None,
    concurrency: Annotated[int, typer.Option(help="client threads")] = 4,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    next_items: Annotated[int | None, typer.Option(help="each user's truth: the first N distinct items of the "
                                                        "window (default: all of them)")] = None,
) -> None:
    """Simulated users who request recommendations and click the items they really met in the window."""
    from pipeline_tasks.bundle.canary import CanaryError, router_url
    from serving.simulator import simulate, window_truth

    _setup_logging(False)
    try:
        target = url or router_url(_canary_model(model))
    except CanaryError as exc:
        raise _fail(str(exc), code=1) from None
    result = simulate(target, window_truth(str(_abs(Path(truth))), max_items=next_items), requests, seed=seed,
                      rate=rate, concurrency=concurrency)
    typer.echo(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    app()
