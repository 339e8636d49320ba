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

from pipeline_tasks.core.settings import airflow_env, disable_telemetry, load_settings

app = typer.Typer(help="DAG-first recommender platform: run the training DAG, open Airflow, run stages.",
                  no_args_is_help=True, add_completion=False)
log = logging.getLogger("recsys")

DAG_ID = "recsys_training"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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


def _print_summary(manifest_path: Path) -> None:
    manifest = json.loads(manifest_path.read_text())
    typer.echo("\nArtifacts of this run:")
    typer.echo(f"  run directory : {manifest['run_dir']}")
    typer.echo(f"  manifest      : {manifest_path}")
    for task, info in manifest.get("tasks", {}).items():
        outputs = info.get("outputs") or {}
        shown = {k: v for k, v in outputs.items() if isinstance(v, str) and ("/" in v)}
        typer.echo(f"  {task:<14}: {info.get('status')}" + (f" ({info.get('error')})" if info.get("error") else ""))
        for key, value in shown.items():
            typer.echo(f"      {key:<14} {value}")
    if "data" in manifest:
        typer.echo(f"  data snapshot : sha256 {manifest['data']['snapshot_sha256']}")
        c = manifest["data"]["counts"]["interactions"]
        typer.echo(f"  interactions  : {c['input']:,} input = {c['accepted']:,} accepted + "
                   f"{c['quarantined']:,} quarantined")


def _json_option(value: str | None, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{name} must be a JSON object, e.g. '{{\"kind\": \"hnsw\"}}': {exc}") from exc
    if not isinstance(parsed, dict):
        raise typer.BadParameter(f"{name} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _dags_test(dag_id: str, conf: dict[str, Any], extra: list[str], settings: Any) -> tuple[int, str | None]:
    """``airflow dags test DAG_ID`` on the shared AIRFLOW_HOME; returns the exit code and the run id."""
    env = airflow_env(settings)
    os.environ.update({k: env[k] for k in ("RECSYS_HOME", "AIRFLOW_HOME")})
    ensure_airflow_home(env)
    logical_date = datetime.now(UTC).isoformat()
    typer.echo(f"Running DAG {dag_id} (logical date {logical_date}) ...")
    res = _airflow(["dags", "test", dag_id, logical_date, "--conf", json.dumps(conf), *extra], env)
    return res.returncode, find_run_id(env, logical_date, dag_id)


@app.command()
def run(
    data: Annotated[str, typer.Option(help="synthetic | movielens:PATH | DIR with the contract tables")] = "synthetic",
    as_of: Annotated[str | None, typer.Option(help="ISO-8601 moment the run looks from (default: contract rule)")]
    = None,
    t_val: Annotated[str | None, typer.Option(help="explicit validation boundary (give --t-test too)")] = None,
    t_test: Annotated[str | None, typer.Option(help="explicit test boundary")] = None,
    quality_threshold: Annotated[float | None, typer.Option(help="minimum accepted share (default 0.95)")] = None,
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every log line, not only the summary")] = False,
) -> None:
    """Run the recsys_training DAG end to end with `airflow dags test` (visible in `recsys ui`)."""
    from pipeline_tasks.core.constants import DEFAULT_PARAMS
    from pipeline_tasks.core.runs import MANIFEST, run_dir

    _setup_logging(verbose)
    settings = load_settings()
    conf: dict[str, Any] = {"source": _source_option(data), "as_of": as_of, "t_val": t_val, "t_test": t_test,
                            "quality_threshold": quality_threshold, "drift_mode": drift_mode,
                            "horizon_days": horizon_days, "bot_events_per_day": bot_events_per_day,
                            "drift_threshold": drift_threshold,
                            "two_tower": _json_option(two_tower, "--two-tower"),
                            "index": _json_option(index, "--index")}
    synthetic = dict(DEFAULT_PARAMS["synthetic"])
    for key, value in (("n_events", events), ("n_users", users), ("n_items", items), ("n_days", days)):
        if value is not None:
            synthetic[key] = value
    if seed is not None:
        synthetic["seed"] = seed
    if faults is not None:
        synthetic["faults"] = faults if faults in ("all", "none") else {"rate": float(faults)}
    conf["synthetic"] = synthetic
    conf = {k: v for k, v in conf.items() if v is not None}
    typer.echo(f"Data source: {conf['source']}")
    extra = ["--mark-success-pattern", mark_success] if mark_success else []
    returncode, run_id = _dags_test(DAG_ID, conf, extra, settings)
    manifest = run_dir(run_id, settings) / MANIFEST if run_id else None
    if manifest and manifest.exists():
        _print_summary(manifest)
    _print_footer(run_id, returncode, DAG_ID)


def _print_footer(run_id: str | None, returncode: int, dag_id: str) -> None:
    typer.echo(f"\nRun id        : {run_id}")
    typer.echo(f"Airflow home  : {airflow_env(load_settings())['AIRFLOW_HOME']}")
    typer.echo(f"Airflow UI    : `recsys ui`, then open http://localhost:8080 (DAG {dag_id}, this run)")
    if returncode != 0:
        typer.echo(f"\nThe run FAILED (airflow exit {returncode}). The failing task's error is above and in "
                   f"the manifest; fix the cause and run again.", err=True)
        raise typer.Exit(1)
    typer.echo("The run succeeded.")


@app.command()
def refresh(
    source: Annotated[str | None, typer.Option(
        help="catalog: contract DIR, items file or built-in source (default: the serving model's training source)"
    )] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every log line, not only the summary")] = False,
) -> None:
    """Run the recsys_item_refresh DAG once: embed new catalog items and publish the next index version."""
    from pipeline_tasks.core.runs import MANIFEST, run_dir

    _setup_logging(verbose)
    settings = load_settings()
    conf = {"source": _source_option(source)} if source else {}
    returncode, run_id = _dags_test("recsys_item_refresh", conf, [], settings)
    manifest = run_dir(run_id, settings) / MANIFEST if run_id else None
    if manifest and manifest.exists():
        _print_summary(manifest)
        out = json.loads(manifest.read_text()).get("tasks", {}).get("refresh_items", {}).get("outputs") or {}
        if out:
            typer.echo(f"  refresh       : {out.get('status')}, {out.get('added', 0)} new items, index "
                       f"{out.get('index_dir')}")
    _print_footer(run_id, returncode, "recsys_item_refresh")


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
                            "faults": faults if faults in ("all", "none") else {"rate": float(faults)}}
    try:
        out = ingest("synthetic", out_dir, synthetic=spec)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(out["counts"]))


@app.command()
def validate(
    input_dir: Annotated[Path, typer.Argument(help="a contract directory")],
    out_dir: Annotated[Path, typer.Argument(help="where accepted/, quarantine/, report.json, data_docs/ go")],
    as_of: Annotated[str | None, typer.Option(help="ISO-8601 as_of")] = None,
    quality_threshold: Annotated[float, typer.Option(help="minimum accepted share of interactions")] = 0.95,
) -> None:
    """Validate a contract directory with the GX suites (no Airflow); exit 1 if the gate fails."""
    from pipeline_tasks.data.validate import DataQualityError, ValidationConfig, to_utc, validate_contract_dir

    _setup_logging(False)
    disable_telemetry()
    cfg = ValidationConfig(as_of=to_utc(as_of) if as_of else None, quality_threshold=quality_threshold)
    try:
        out = validate_contract_dir(input_dir, out_dir, cfg)
    except DataQualityError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
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
    from pipeline_tasks.data.split import SplitConfig, split_contract_dir

    _setup_logging(False)
    out = split_contract_dir(accepted_dir, out_dir, SplitConfig(t_val=t_val, t_test=t_test))
    typer.echo(json.dumps({k: out[k] for k in ("t_val", "t_test", "counts")}, indent=2))


if __name__ == "__main__":
    app()
