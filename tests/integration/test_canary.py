"""The canary for real: `recsys canary start` runs the champion's and the challenger's services and the router as
detached processes, the traffic simulator sends users through the router, and `recsys_canary` runs in
`airflow dags test` against them.

One walk per case with short steps (20 %, 50 %, 80 % of users, a 40-request sample each) and a large effect:
- a deliberately degraded challenger (the same bundle served with `--drill reverse_ranking`: its candidates worst
  first) is rolled back (at the first step that reaches significance), its alias removed, and the champion
  keeps serving; promoting it by hand is refused;
- the same bundle served properly against a degraded champion walks every step and is promoted (the champion
  alias moves).
The simulated users are the test window's users with a history before it, clicking the items they met in it (in
process, on the ml-100k bundle, that gives the champion a CTR near 0.42 and a worst-first ranking near 0.05); the
services answer at the window's start
with the protocol fit (trained up to it). Between the two walks, the router's own guarantees: sticky assignment, the
observed split within tolerance of the share, a share change under load that drops no request, a dead challenger
answered by the champion.
The registry is put back as the session's other tests expect it (version 1 champion, no challenger).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pandas as pd
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

WALK = ["--steps", "2000,5000,8000", "--base-ctr", "0.3", "--mde", "0.5"]
# Challenger requests per step: a rollback needs a significant CTR drop (about 0.25 against 0.1 once the few users
# have asked a few times: 120 gives ~90 % power at the first step, more over the three); a promotion only needs the
# challenger not to be significantly worse.
ROLLBACK_SAMPLE, PROMOTE_SAMPLE = "120", "40"


def _base_port() -> int:
    """A port p with p, p+1, p+2 free."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 2 < 65535 and all(_free(base + i) for i in (1, 2)):
            return base
    raise AssertionError("no three free ports in a row")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cli(*args: str, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline_tasks.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


def _register_again(name: str, version: int, reason: str) -> int:
    """The champion's bundle registered as a new version that passed its gate as challenger (a registry operation
    like `register`'s; the canary does not care how a version was trained)."""
    from pipeline_tasks.bundle.registry import GateDecision, register_version
    from pipeline_tasks.online.bundle import client

    mv = client().get_model_version(name, str(version))
    tags = {k: v for k, v in (mv.tags or {}).items() if not k.startswith(("recsys.gate", "recsys.bento",
                                                                           "recsys.canary"))}
    return register_version(name, mv.source, mv.run_id, tags, GateDecision(True, "challenger", reason, {}))


class Traffic:
    """The simulator in a background thread, through the router, until stopped."""

    def __init__(self, url: str, truth: dict[str, set[str]]) -> None:
        from serving.simulator import simulate

        self.stop = threading.Event()
        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.update(
            simulate(url, truth, 1_000_000, seed=7, num_items=10, concurrency=3, stop=self.stop).to_dict()),
            daemon=True)
        self.thread.start()

    def end(self) -> dict:
        self.stop.set()
        self.thread.join(timeout=120)
        return self.result


def _walk(router: str, truth: dict[str, set[str]], env: dict[str, str], *args: str
          ) -> tuple[subprocess.CompletedProcess[str], dict, dict]:
    """`recsys canary start ARGS` (the DAG) while the simulator sends traffic: (the command, what the simulated
    users did, the walk's record)."""
    from pipeline_tasks.bundle.canary import read_record

    traffic = Traffic(router, truth)
    try:
        walk = _cli("canary", "start", *args, env=env)
    finally:
        sent = traffic.end()
    assert walk.returncode == 0, walk.stdout[-4000:] + walk.stderr[-4000:]
    return walk, sent, read_record(args[args.index("--model") + 1])


def test_canary_rolls_back_a_degraded_challenger_and_promotes_a_better_one(ml100k_run):
    from pipeline_tasks.bundle.canary import route_state
    from pipeline_tasks.bundle.registry import promote
    from pipeline_tasks.online.bundle import aliases_of, client
    from serving.simulator import window_truth

    registered = ml100k_run.registered
    name, v1 = registered["model"], int(registered["version"])
    split = ml100k_run.run.run_dir / "split"
    known = set(pd.concat([pd.read_parquet(split / f"{w}.parquet", columns=["user_id"]) for w in ("train",
                                                                                               "validation")]
                          )["user_id"].astype(str))
    truth = {u: items for u, items in window_truth(str(split / "test.parquet")).items() if u in known}
    # The services answer at the test window's start with the protocol fit (trained up to it): what the simulated
    # users met in the window is unseen by the model and by the history.
    t_test = json.loads((ml100k_run.run.run_dir / "split" / "split.json").read_text())["t_test"]
    walk_args = [*WALK, "--as-of", t_test, "--fit", "protocol"]
    base = _base_port()
    router = f"http://127.0.0.1:{base}"
    env = {**os.environ, "RECSYS_CANARY_POKE_S": "2"}
    try:
        # 1. A degraded challenger: rolled back; the champion keeps serving.
        v2 = _register_again(name, v1, "canary test: a challenger served with a random order")
        started = _cli("canary", "start", "--model", name, "--no-dag", "--challenger-drill", "reverse_ranking",
                       "--base-port", str(base), *walk_args, env=env)
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        walk, sent, rec = _walk(router, truth, env, "--model", name, "--challenger-drill", "reverse_ranking",
                                "--base-port", str(base), *walk_args, "--max-sample", ROLLBACK_SAMPLE)
        assert rec["status"] == "rolled_back" and rec["steps"][-1]["decision"] == "rollback", rec
        assert all(s["decision"] == "advance" for s in rec["steps"][:-1])
        why = " ".join(rec["reasons"])  # worse CTR, or a guardrail (the worst items are few: coverage collapses)
        assert "CTR significantly worse" in why or "guardrail coverage_ratio" in why, rec["reasons"]
        assert f"rollback_{len(rec['steps'])}" in walk.stdout and "report" in walk.stdout
        assert aliases_of(name) == {"champion": v1}  # alias removed, champion untouched
        assert client().get_model_version(name, str(v2)).tags["recsys.canary"] == "rolled_back"
        state = route_state(router)
        assert state["challenger_url"] is None and state["share_bp"] == 0
        answer = httpx.post(f"{router}/recommend", json={"user_id": "1", "num_items": 5}, timeout=30).json()
        assert answer["variant"] == "champion" and answer["model_version"] == v1
        assert sent["by_variant"]["champion"]["clicked"] / sent["by_variant"]["champion"]["requests"] > \
            sent["by_variant"]["challenger"]["clicked"] / sent["by_variant"]["challenger"]["requests"], sent
        refused = _cli("canary", "promote", "--model", name, "--version", str(v2), env=env)
        assert refused.returncode == 1 and "rolled back" in refused.stderr, refused.stderr  # guarded
        report = [line.split()[-1] for line in walk.stdout.splitlines() if line.strip().startswith("report ")]
        assert report and Path(report[0]).exists() and "rollback" in Path(report[0]).read_text(), walk.stdout[-3000:]

        # 2. The router itself: sticky, split within tolerance, share changes under load, dead-challenger fallback.
        v3 = _register_again(name, v1, "canary test: the bundle against a degraded champion")
        restarted = _cli("canary", "start", "--model", name, "--no-dag", "--champion-drill", "reverse_ranking",
                         "--base-port", str(base), *walk_args, env=env)
        assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
        assert route_state(router)["challenger_version"] == v3
        with httpx.Client(base_url=router, timeout=30) as c:
            assert c.post("/canary/route", json={"share_bp": 2000}).status_code == 200
            users = [str(u) for u in range(1, 401)]
            first = {u: c.post("/recommend", json={"user_id": u, "num_items": 5}).json()["variant"] for u in users}
            on = [u for u, v in first.items() if v == "challenger"]
            assert abs(len(on) - 80) <= 32, len(on)  # 400 users at 20 %: sd 8, four of them the tolerance
            assert all(c.post("/recommend", json={"user_id": u, "num_items": 5}).json()["variant"] == first[u]
                       for u in users[:40])  # sticky
            failures, stop = [], threading.Event()

            def load() -> None:
                with httpx.Client(base_url=router, timeout=30) as lc:
                    i = 0
                    while not stop.is_set():
                        res = lc.post("/recommend", json={"user_id": users[i % 400], "num_items": 5})
                        failures.extend([res.status_code] if res.status_code != 200 else [])
                        i += 1

            threads = [threading.Thread(target=load) for _ in range(2)]
            for t in threads:
                t.start()
            for share in (5000, 0, 2000):  # the operator's command, under load
                res = _cli("canary", "set-share", str(share), "--model", name, env=env)
                assert res.returncode == 0 and json.loads(res.stdout)["share_bp"] == share, res.stderr
            stop.set()
            for t in threads:
                t.join(timeout=60)
            assert not failures, failures
            # A challenger user's feedback reaches the champion's service too, as history only (logged once there is
            # nothing: the challenger logged it): moved back by a share change, the user keeps their recent events.
            mover = on[0]
            champion_url = f"http://127.0.0.1:{base + 1}"
            check = f"mirror-check-{os.getpid()}-{threading.get_ident()}-{id(c)}"
            fed = c.post("/feedback", json={"request_id": check, "user_id": mover, "item_id": "50",
                                            "event_type": "click"})
            assert fed.status_code == 200 and fed.json()["variant"] == "challenger"
            copied = 'recsys_requests_total{endpoint="feedback",outcome="history_only"}'
            for _ in range(50):  # the copy is sent after the answer
                if copied in httpx.get(f"{champion_url}/metrics", timeout=30).text:
                    break
                threading.Event().wait(0.1)
            assert copied in httpx.get(f"{champion_url}/metrics", timeout=30).text
            from pipeline_tasks.online.feedback_log import read_log

            logged, _ = read_log(Path(os.environ["RECSYS_HOME"]) / "feedback" / name.removeprefix("recsys_"),
                                 "feedback")
            mine = logged[logged["request_id"] == check]
            assert len(mine) == 1 and mine["variant"].tolist() == ["challenger"], mine
            assert 'recsys_router_feedback_mirrored_total{outcome="ok",variant="champion"}' in c.get("/metrics").text
            assert c.post("/canary/route", json={"share_bp": 20_000}).status_code in (400, 422)
            assert c.post("/canary/route", json={}).json()["share_bp"] == 2000
            metrics = c.get("/metrics").text
            assert "recsys_router_requests_total" in metrics and "recsys_router_share_bp 2000.0" in metrics

        # 3. The better challenger walks every step and is promoted.
        walk, sent, rec = _walk(router, truth, env, "--model", name, "--champion-drill", "reverse_ranking",
                                "--base-port", str(base), *walk_args, "--max-sample", PROMOTE_SAMPLE)
        assert rec["status"] == "promoted", rec
        assert [s["decision"] for s in rec["steps"]] == ["advance"] * 3, rec["steps"]
        assert [s["share_bp"] for s in rec["steps"]] == [2000, 5000, 8000]
        assert aliases_of(name) == {"champion": v3}
        state = route_state(router)
        assert state["champion_version"] == v3 and state["challenger_url"] is None and state["share_bp"] == 0
        answer = httpx.post(f"{router}/recommend", json={"user_id": "2", "num_items": 5}, timeout=30).json()
        assert answer["model_version"] == v3 and answer["variant"] == "champion"
        report = [line.split()[-1] for line in walk.stdout.splitlines() if line.strip().startswith("report ")]
        assert report and "promoted" in Path(report[0]).read_text(), walk.stdout[-3000:]

        # 4. A dead challenger's users get the champion's answer (counted), never an error.
        v4 = _register_again(name, v1, "canary test: a challenger that dies")
        again = _cli("canary", "start", "--model", name, "--no-dag", "--base-port", str(base), *walk_args, env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        from pipeline_tasks.bundle.canary import process_info, stop_process

        with httpx.Client(base_url=router, timeout=30) as c:
            assert c.post("/canary/route", json={"share_bp": 10_000}).json()["challenger_version"] == v4
            stop_process(name, "challenger")
            assert not process_info(name, "challenger")["alive"]
            res = c.post("/recommend", json={"user_id": "3", "num_items": 5})
            assert res.status_code == 200 and res.json()["variant"] == "champion", res.text
            assert res.json()["fallback"] == "connection"
            assert c.post("/feedback", json={"request_id": "x", "user_id": "3", "item_id": "50",
                                             "event_type": "click"}).status_code == 200
            assert "recsys_router_fallbacks_total" in c.get("/metrics").text
        # Every request and feedback event the router logged names its variant and model version.
        from pipeline_tasks.bundle.canary import read_router_log

        requests, feedback = read_router_log(name)
        assert set(requests["variant"]) == {"champion", "challenger"}
        assert requests["model_version"].notna().all() and feedback["variant"].notna().all()
        assert {"click"} <= set(feedback["event_type"])
    finally:
        _cli("canary", "stop", "--model", name, env=env)
        c = client()
        if aliases_of(name).get("champion") != v1:
            promote(name, v1)
        if "challenger" in aliases_of(name):
            c.delete_registered_model_alias(name, "challenger")
