"""Load benchmark of the recommendation service: open-loop requests at fixed rates over loopback.

Starts `recsys serve` (or `bentoml serve <tag>` with --bento) in the current RECSYS_HOME, waits for /readyz,
then for each rate sends POST /recommend {user_id, num_items} on a fixed schedule (open loop: a late answer
does not delay the next request) for --duration seconds from an asyncio client in this process, which shares
the machine's cores with the service (``--client raw``, the default: a minimal keep-alive HTTP/1.1 client;
``--client httpx``: httpx's async client, the generator of the figures before 2026-12-02). Users are drawn
from the snapshot's users (a --cold-share of unknown ones). Prints, per rate: achieved rate, p50 / p95 / p99
client latency counted from each request's scheduled send time (since 2026-12-02; before, from when the client got
to send it, which hid the client's own delays near saturation), errors, the client's own CPU per request and the
p99 of its send slip (how late it sent); the highest rate held with p99 <= --slo-ms; the
service's mean time per stage and requests per block (micro-batches) from its /metrics; peak RSS of the
service's processes; the core count.

    RECSYS_HOME=... .venv/bin/python tests/benchmarks/bench_serving.py --rates 10,25,50,100,200
    RECSYS_HOME=... .venv/bin/python tests/benchmarks/bench_serving.py --state redis --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil

log = logging.getLogger("bench_serving")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeakRss:
    """Peak summed RSS of a process tree, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class RawClient:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams, for the load generator.

    The load generator shares the 2 cores with the service, so its own CPU per request is taken from the service's
    budget: httpx's async client costs several times what this does (``--client`` chooses; each rate's row reports
    the client's CPU per request). It only POSTs JSON and reads answers with a Content-Length (uvicorn's)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, payload: dict) -> int:
        body = json.dumps(payload).encode()
        reused = bool(self.idle)
        conn = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                         b"\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length is None:
                raise ValueError("an answer without Content-Length")
            await reader.readexactly(int(length.group(1)))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            if reused and not getattr(exc, "partial", b""):  # the server closed an idle keep-alive connection
                return await self.post(path, payload)  # as any HTTP client does: once more on another one
            raise
        except BaseException:
            writer.close()
            raise
        self.idle.append(conn)
        return int(head[9:12])

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def _run_rate(url: str, rate: float, duration: float, users: list[str], k: int, client_kind: str = "raw"
                    ) -> dict:
    latencies: list[float] = []
    errors = 0
    kinds: dict[str, int] = {}
    cpu0 = time.process_time()
    if client_kind == "raw":
        raw = RawClient(url)

        async def post(payload: dict) -> int:
            return await asyncio.wait_for(raw.post("/recommend", payload), timeout=10)
        close = raw.aclose
    else:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        client = httpx.AsyncClient(base_url=url, limits=limits, timeout=10)

        async def post(payload: dict) -> int:
            return (await client.post("/recommend", json=payload)).status_code
        close = client.aclose

    slips: list[float] = []

    async def one(user: str, scheduled: float) -> None:
        # Latency counts from the scheduled send time, not from when the task got to run: a request the client
        # sends late (its loop busy) is charged its wait (no coordinated omission).
        nonlocal errors
        t = scheduled
        slips.append((time.perf_counter() - scheduled) * 1000)
        try:
            status = await post({"user_id": user, "num_items": k})
            kind = "" if status == 200 else f"HTTP {status}"
        except (TimeoutError, httpx.HTTPError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
            kind = type(exc).__name__
        if not kind:
            latencies.append((time.perf_counter() - t) * 1000)
        else:
            errors += 1
            kinds[kind] = kinds.get(kind, 0) + 1

    n = int(rate * duration)
    start = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(users[i % len(users)], start + i / rate)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    await close()
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"rate": rate, "sent": n, "achieved_rps": round(len(latencies) / elapsed, 1), "errors": errors,
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), **({"error_kinds": kinds} if kinds else {}),
            "client_cpu_ms_per_request": round(1000 * (time.process_time() - cpu0) / max(n, 1), 2),
            "client_send_slip_ms_p99": round(float(np.percentile(slips, 99)), 1) if slips else None}


def _stage_means(metrics: str) -> dict[str, float]:
    sums = dict(re.findall(r'^recsys_stage_latency_seconds_sum\{stage="([^"]+)"\} (\S+)$', metrics, re.M))
    counts = dict(re.findall(r'^recsys_stage_latency_seconds_count\{stage="([^"]+)"\} (\S+)$', metrics, re.M))
    return {s: round(1000 * float(sums[s]) / float(counts[s]), 2) for s in sums if float(counts.get(s, 0)) > 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="10,25,50,100,200", help="requests per second, comma-separated")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    parser.add_argument("--k", type=int, default=20, help="num_items")
    parser.add_argument("--model", default=None, help="registered model (default: the only one)")
    parser.add_argument("--model-version", default=None, help="bundle version (default: champion)")
    parser.add_argument("--bento", default=None, help="serve this Bento tag with `bentoml serve` instead")
    parser.add_argument("--state", default="local", choices=["local", "redis"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cold-share", type=float, default=0.05, help="share of requests for unknown users")
    parser.add_argument("--slo-ms", type=float, default=50.0, help="p99 bound of the highest held rate")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="RECSYS_MAX_BATCH of the service (requests per block; 1 = one at a time; default 8)")
    parser.add_argument("--client", default="raw", choices=["raw", "httpx"],
                        help="load generator: a minimal keep-alive HTTP/1.1 client (default) or httpx's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    port = _free_port()
    env = {**os.environ, "BENTOML_HOME": os.environ.get("BENTOML_HOME",
                                                        str(Path(os.environ["RECSYS_HOME"]) / "bentoml")),
           "RECSYS_FEEDBACK_DIR": tempfile.mkdtemp(prefix="bench-serving-feedback-")}
    if args.max_batch is not None:  # `bentoml serve` reads it from the environment, `recsys serve` from its option
        env["RECSYS_MAX_BATCH"] = str(args.max_batch)
    if args.bento:
        env.update(RECSYS_STATE=args.state, BENTOML_CONFIG_OPTIONS=f"services.RecsysService.workers={args.workers}")
        cmd = [str(Path(sys.executable).with_name("bentoml")), "serve", args.bento, "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "pipeline_tasks.cli", "serve", "--port", str(port), "--state", args.state,
               "--workers", str(args.workers), "--no-shown-filter"]
        cmd += ["--max-batch", str(args.max_batch)] if args.max_batch is not None else []
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--model-version", str(args.model_version)] if args.model_version else []
    logfile = tempfile.NamedTemporaryFile("w", prefix="bench-serving-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() - started > 600:
                raise SystemExit(f"the service did not become ready; log: {logfile.name}")
            time.sleep(0.5)
        ready_s = time.monotonic() - started
        snapshot = re.search(r"\(snapshot (\S+)\)", Path(logfile.name).read_text())
        users = _users(snapshot.group(1) if snapshot else None, args.cold_share)
        sampler = PeakRss(proc.pid)
        asyncio.run(_run_rate(url, 5, 4, users, args.k, args.client))  # warm-up
        rows = []
        for rate in [float(r) for r in args.rates.split(",")]:
            row = asyncio.run(_run_rate(url, rate, args.duration, users, args.k, args.client))
            log.info("rate %s", row)
            rows.append(row)
        metrics = httpx.get(f"{url}/metrics").text
        stages = _stage_means(metrics)
        batch = re.search(r"^recsys_batch_size_sum (\S+)$", metrics, re.M), \
            re.search(r"^recsys_batch_size_count (\S+)$", metrics, re.M)
        peak = sampler.stop()
    finally:
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()
    held = [r["rate"] for r in rows if r["p99_ms"] <= args.slo_ms and r["errors"] == 0
            and r["achieved_rps"] >= 0.95 * r["rate"]]
    figures = {"cores": os.cpu_count(), "client": args.client, "max_batch": args.max_batch,
               "state": args.state, "workers": args.workers, "ready_s": round(ready_s, 1),
               "k": args.k, "duration_s": args.duration, "rates": rows,
               f"highest_rate_p99_le_{int(args.slo_ms)}ms": max(held) if held else None,
               "mean_stage_ms": stages, "peak_rss_gib": round(peak / 2**30, 2),
               "mean_requests_per_block": round(float(batch[0].group(1)) / float(batch[1].group(1)), 2)
               if all(batch) and float(batch[1].group(1)) else None}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _users(snapshot_dir: str | None, cold_share: float) -> list[str]:
    rng = random.Random(7)
    known: list[str] = []
    if snapshot_dir:
        known = pd.read_parquet(Path(snapshot_dir) / "history.parquet", columns=["user_id"])["user_id"] \
            .astype(str).unique().tolist()
    known = known or [str(i) for i in range(1, 1000)]
    users = [rng.choice(known) if rng.random() >= cold_share else f"cold-{rng.randrange(10**9)}"
             for _ in range(20_000)]
    return users


if __name__ == "__main__":
    sys.exit(main())
