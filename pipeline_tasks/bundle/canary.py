"""The canary's control plane: the serving processes, the router's route and log, the walk's record.

In the embedded default the three serving processes of a model -- the champion's service, the challenger's
service and the canary router (``serving/router.py``) -- run detached from whoever started them (``recsys canary
start``), each with a pid file ``$RECSYS_HOME/canary/<model>/<role>.json`` (pid, port, version, log). In
production the deployment runs them; the ``recsys_canary`` DAG and the operator commands only talk to the router
over HTTP and read its log (``$RECSYS_HOME/canary/<model>/log``). ``canary.json`` beside them records the walk:
its status, the steps analysed so far and the decision.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.online.routing import Route, read_route, write_route

log = logging.getLogger(__name__)

ROLES = ("champion", "challenger", "router")
DEFAULT_PORTS = {"router": 3100, "champion": 3101, "challenger": 3102}
READY_TIMEOUT_S = 300.0


class CanaryError(RuntimeError):
    """The canary cannot do what was asked; the message says what to do."""


def canary_dir(model: str, settings: Settings | None = None) -> Path:
    return (settings or load_settings()).home / "canary" / model


def route_file(model: str, settings: Settings | None = None) -> Path:
    return canary_dir(model, settings) / "route.json"


def log_dir(model: str, settings: Settings | None = None) -> Path:
    return canary_dir(model, settings) / "log"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, ValueError):  # a zombie (exited, not reaped) is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def process_info(model: str, role: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """The role's pid file with ``alive`` (None when it was never started)."""
    path = canary_dir(model, settings) / f"{role}.json"
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring %s: not a pid file of a canary process", path)
        return None
    return {**info, "alive": _alive(pid)}


def url_of(info: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{info['port']}"


def wait_ready(url: str, timeout: float = READY_TIMEOUT_S, pid: int | None = None, log_path: str | None = None
               ) -> float:
    """Seconds until ``url``/readyz answers 200; raises naming the log when the process died or time ran out."""
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if pid is not None and not _alive(pid):
            tail = Path(log_path).read_text()[-3000:] if log_path and Path(log_path).exists() else ""
            raise CanaryError(f"the process behind {url} exited; its log {log_path}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        time.sleep(0.5)
    raise CanaryError(f"{url} not ready after {timeout:.0f} s; see {log_path}")


def start_process(model: str, role: str, cmd: list[str], port: int, version: int | None,
                  env: dict[str, str] | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Start ``cmd`` detached (own session, output to ``<role>.log``) and write its pid file."""
    root = canary_dir(model, settings)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / f"{role}.log"
    # Its own BentoML home: BentoML wipes $BENTOML_HOME/prometheus_multiproc_dir when a server starts, and /metrics
    # reads every file there, so three servers on one home would clobber and mix each other's metrics.
    env = {**(env or dict(os.environ)), "BENTOML_HOME": str(root / f"bentoml-{role}")}
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    info = {"pid": proc.pid, "port": port, "version": version, "role": role, "log": str(log_path),
            "cmd": cmd, "started_at": datetime.now(UTC).isoformat()}
    tmp = root / f".{role}.json.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, root / f"{role}.json")
    log.info("started %s of %s (pid %d, port %d, log %s)", role, model, proc.pid, port, log_path)
    return info


def stop_process(model: str, role: str, settings: Settings | None = None, timeout: float = 20.0) -> bool:
    """SIGTERM the role's process group (SIGKILL after ``timeout``); False when it was not running."""
    info = process_info(model, role, settings)
    if not info or not info["alive"]:
        return False
    pid = int(info["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    started = time.monotonic()
    while _alive(pid) and time.monotonic() - started < timeout:
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    log.info("stopped %s of %s (pid %d)", role, model, pid)
    return True


def serve_cmd(model: str, version: int, port: int, data: str | None = None, drill: str | None = None,
              shown_filter: bool = True, as_of: str | None = None, fit: str = "serving") -> list[str]:
    """``recsys serve`` of one version (embedded profile, one worker)."""
    cmd = [sys.executable, "-m", "pipeline_tasks.cli", "serve", "--model", model, "--model-version", str(version),
           "--port", str(port)]
    if data:
        cmd += ["--data", data]
    if drill:
        cmd += ["--drill", drill]
    if not shown_filter:
        cmd += ["--no-shown-filter"]
    if as_of:
        cmd += ["--as-of", as_of]
    if fit != "serving":
        cmd += ["--fit", fit]
    return cmd


def _same_options(a: list[str], b: list[str]) -> bool:
    """Two ``recsys serve`` commands alike but for the port."""
    def strip(cmd: list[str]) -> list[str]:
        out, skip = [], False
        for arg in cmd:
            if skip:
                skip = False
                continue
            if arg == "--port":
                skip = True
                continue
            out.append(arg)
        return out

    return strip(a) == strip(b)


def ensure_service(model: str, role: str, version: int, port: int | None = None, data: str | None = None,
                   drill: str | None = None, shown_filter: bool = True, as_of: str | None = None,
                   fit: str = "serving", settings: Settings | None = None, wait: bool = True) -> dict[str, Any]:
    """The role's service for ``version`` started with these options, (re)started when it is not running that way;
    ready (with ``wait=False`` only started: call :func:`wait_service`, so that two services load at once)."""
    info = process_info(model, role, settings)
    cmd_args = serve_cmd(model, version, 0, data, drill, shown_filter, as_of, fit)
    same = info is not None and info.get("version") == version and _same_options(info.get("cmd", []), cmd_args)
    if info and info["alive"] and same and (port is None or port == info["port"]):
        return wait_service(info) if wait else info
    if info and info["alive"]:
        stop_process(model, role, settings)
    port = port or (info or {}).get("port") or DEFAULT_PORTS[role]
    # Feedback goes to the namespace's log ($RECSYS_HOME/feedback/<namespace>, each line with its variant and
    # version) like any service's: the served-traffic drift check and `recsys run --feedback-log` read it there.
    env = dict(os.environ)
    info = start_process(model, role, serve_cmd(model, version, port, data, drill, shown_filter, as_of, fit), port,
                         version, env, settings)
    return wait_service(info) if wait else info


def wait_service(info: dict[str, Any]) -> dict[str, Any]:
    """A started service's pid-file info, once it answers ``/readyz``."""
    seconds = wait_ready(url_of(info), pid=int(info["pid"]), log_path=info["log"])
    log.info("%s (version %s) ready on %s after %.1f s", info["role"], info.get("version"), url_of(info), seconds)
    return info


def write_targets(model: str, champion: dict[str, Any], challenger: dict[str, Any] | None, share_bp: int = 0,
                  salt: str | None = None, settings: Settings | None = None) -> Any:
    """Write the route file: the champion's and challenger's URLs and versions, the share (atomic)."""
    path = route_file(model, settings)
    old = read_route(path) if path.exists() else None
    route = Route(url_of(champion), int(champion["version"]),
                         url_of(challenger) if challenger else None,
                         int(challenger["version"]) if challenger else None, share_bp,
                         salt or (old.salt if old else f"{model}-{datetime.now(UTC):%Y%m%d%H%M%S}"))
    write_route(path, route)
    return route


def start_router(model: str, port: int | None = None, settings: Settings | None = None, wait: bool = True
                 ) -> dict[str, Any]:
    """The router process, started when not running; ready (with ``wait=False`` only started)."""
    info = process_info(model, "router", settings)
    if info and info["alive"]:
        return wait_service(info) if wait else info
    if not route_file(model, settings).exists():
        raise CanaryError(f"no route file {route_file(model, settings)}: start the services first "
                          "(`recsys canary start`)")
    port = port or (info or {}).get("port") or DEFAULT_PORTS["router"]
    env = {**os.environ, "RECSYS_ROUTER_STATE": str(route_file(model, settings)),
           "RECSYS_ROUTER_LOG_DIR": str(log_dir(model, settings))}
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    info = start_process(model, "router", [bentoml, "serve", "serving.router:RecsysRouter", "--port", str(port)],
                         port, None, env, settings)
    return wait_service(info) if wait else info


def router_url(model: str, settings: Settings | None = None) -> str:
    """The running router's URL (``RECSYS_ROUTER_URL`` overrides, e.g. a deployment's)."""
    given = os.environ.get("RECSYS_ROUTER_URL")
    if given:
        return given.rstrip("/")
    info = process_info(model, "router", settings)
    if not info or not info["alive"]:
        raise CanaryError(f"no canary router is running for {model}: start it with `recsys canary start` (or set "
                          "RECSYS_ROUTER_URL to a deployed router)")
    return url_of(info)


def change_route(url: str, **fields: Any) -> dict[str, Any]:
    """POST the router's ``/canary/route``; raises with the router's message when refused."""
    import httpx

    res = httpx.post(f"{url}/canary/route", json=fields, timeout=30)
    if res.status_code != 200:
        raise CanaryError(f"the router refused {fields}: {res.status_code} {res.text[:500]}")
    return res.json()


def route_state(url: str) -> dict[str, Any]:
    import httpx

    return httpx.post(f"{url}/canary/state", json={}, timeout=30).json()


def read_router_log(model: str, started: pd.Timestamp | None = None, settings: Settings | None = None
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The router's ``ab_requests`` and ``ab_feedback`` logged since ``started``."""
    from pipeline_tasks.evaluation.canary import since
    from pipeline_tasks.online.feedback_log import read_log

    root = log_dir(model, settings)
    requests, _ = read_log(root, "ab_requests")
    feedback, _ = read_log(root, "ab_feedback")
    if started is not None:
        requests, feedback = since(requests, started), since(feedback, started)
    return requests, feedback


def record(model: str, settings: Settings | None = None, /, **fields: Any) -> dict[str, Any]:
    """Update ``canary.json`` (the walk's record) with ``fields``; returns the whole record."""
    path = canary_dir(model, settings) / "canary.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(fields, updated_at=datetime.now(UTC).isoformat())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".canary.json.{os.getpid()}")
    tmp.write_text(json.dumps(current, indent=2, default=str))
    os.replace(tmp, path)
    return current


def read_record(model: str, settings: Settings | None = None) -> dict[str, Any]:
    path = canary_dir(model, settings) / "canary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def resolve_model(model: str | None, settings: Settings | None = None) -> str:
    """``model``, else the only registered recsys model."""
    from pipeline_tasks.online.bundle import registered_models

    if model:
        return model
    names = registered_models(settings)
    if len(names) != 1:
        raise InvalidParamsError(f"{len(names)} registered models ({', '.join(names) or 'none'}): name one with "
                                 "--model")
    return names[0]


def check_promotable(model: str, version: int, settings: Settings | None = None) -> None:
    """Refuse (with the reason) a version whose gate failed or whose canary was rolled back."""
    from pipeline_tasks.bundle.registry import PromotionRefusedError
    from pipeline_tasks.online.bundle import client

    tags = dict(client(settings).get_model_version(model, str(version)).tags or {})
    if tags.get("recsys.gate") != "passed":
        raise PromotionRefusedError(f"refusing {model} version {version}: its gate failed "
                                    f"({tags.get('recsys.gate_reason', 'no gate recorded')})")
    if tags.get("recsys.canary") == "rolled_back":
        raise PromotionRefusedError(f"refusing {model} version {version}: its canary was rolled back "
                                    f"({tags.get('recsys.canary_reason', 'no reason recorded')})")


def promote_challenger(model: str, version: int, url: str, settings: Settings | None = None) -> dict[str, Any]:
    """100 % to ``version``, the ``champion`` alias moved to it (atomic), the router's champion target switched."""
    from pipeline_tasks.bundle.registry import promote

    check_promotable(model, version, settings)
    current = route_state(url).get("challenger_version")
    if current != version:
        raise CanaryError(f"the router's challenger is version {current}, not {version}: "
                          "`recsys canary start --challenger-version` it first")
    state = change_route(url, share_bp=10_000)
    moved = promote(model, version, settings)
    route = change_route(url, champion_url=state["challenger_url"], champion_version=version, clear_challenger=True)
    stop_process(model, "champion", settings)  # the challenger's process is the champion's now
    path = canary_dir(model, settings) / "challenger.json"
    if path.exists():
        info = {**json.loads(path.read_text()), "role": "champion"}
        (canary_dir(model, settings) / "champion.json").write_text(json.dumps(info, indent=2))
        path.unlink()
    record(model, settings, status="promoted", decision="promoted", share_bp=10_000, champion_version=version)
    log.info("promoted %s version %d to champion (was %s); the router sends everyone to it", model, version,
             moved["from"])
    return {"decision": "promoted", "alias": moved, "route": route}


def rollback_challenger(model: str, version: int, url: str, reasons: list[str], settings: Settings | None = None
                        ) -> dict[str, Any]:
    """No more traffic to ``version``; its ``challenger`` alias removed and the version tagged with why."""
    from pipeline_tasks.online.bundle import aliases_of, client

    route = change_route(url, clear_challenger=True)
    c = client(settings)
    c.set_model_version_tag(model, str(version), "recsys.canary", "rolled_back")
    c.set_model_version_tag(model, str(version), "recsys.canary_reason", "; ".join(reasons)[:4000] or "by hand")
    if aliases_of(model, settings).get("challenger") == version:
        c.delete_registered_model_alias(model, "challenger")
    record(model, settings, status="rolled_back", decision="rolled_back", reasons=reasons, share_bp=0)
    log.warning("rolled back %s version %d: %s; the champion serves everyone", model, version,
                "; ".join(reasons) or "by hand")
    return {"decision": "rolled_back", "reasons": reasons, "route": route}
