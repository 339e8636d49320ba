"""End-to-end benchmark: `recsys run` (the whole recsys_training DAG through `airflow dags test`) on a fresh
RECSYS_HOME, under `/usr/bin/time -v`, with the peak memory of every process it starts sampled on the side.

Prints the wall time, each task's seconds (from the run's manifest), the largest process's peak RSS as
`/usr/bin/time -v` reports it, the peak RSS of the largest Python process and of the Spark JVM (sampled
every 0.5 s), and the core count. Default: 500,000 synthetic events (20k users, 5k items, 180 days).

    .venv/bin/python tests/benchmarks/bench_training_dag.py
    .venv/bin/python tests/benchmarks/bench_training_dag.py --data /path/to/contract_dir -- --horizon-days 5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

log = logging.getLogger("bench_training_dag")


class TreeSampler:
    """Peak RSS per process of a process tree, split into Spark JVMs and everything else."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.peak_java = 0
        self.peak_python = 0
        self.peak_tree = 0
        self.peak_process = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.root_pid)
                total = 0
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        rss = proc.memory_info().rss
                        total += rss
                        name = proc.name()
                        if "java" in name:
                            self.peak_java = max(self.peak_java, rss)
                        elif rss > self.peak_python:
                            self.peak_python = rss
                            self.peak_process = " ".join(proc.cmdline()[1:4])[:120]
                self.peak_tree = max(self.peak_tree, total)
            self._stop.wait(0.5)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="synthetic", help="the --data of recsys run (default synthetic)")
    parser.add_argument("--events", type=int, default=500_000, help="synthetic: events")
    parser.add_argument("--users", type=int, default=20_000, help="synthetic: users")
    parser.add_argument("--items", type=int, default=5_000, help="synthetic: items")
    parser.add_argument("--days", type=int, default=180, help="synthetic: days")
    parser.add_argument("--home", default=None, help="RECSYS_HOME to use (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary RECSYS_HOME")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("extra", nargs="*", help="more `recsys run` options (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="recsys-bench-dag-"))
    cmd = [sys.executable, "-m", "pipeline_tasks.cli", "run", "--data", args.data]
    if args.data == "synthetic":
        cmd += ["--events", str(args.events), "--users", str(args.users), "--items", str(args.items),
                "--days", str(args.days)]
    cmd += args.extra
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    env["RECSYS_HOME"] = str(home)
    log.info("running %s with RECSYS_HOME=%s", " ".join(cmd), home)
    started = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid) as sampler:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    max_rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    manifest_match = re.search(r"^\s+manifest\s+: (\S+)$", stdout, flags=re.M)
    tasks: dict[str, float] = {}
    manifest: dict = {}
    if manifest_match and Path(manifest_match.group(1)).exists():
        manifest = json.loads(Path(manifest_match.group(1)).read_text())
        tasks = {t: info.get("seconds") for t, info in manifest.get("tasks", {}).items()}
    figures = {
        "command": " ".join(cmd), "returncode": proc.returncode, "wall_seconds": round(wall, 1),
        "tasks_seconds": tasks, "time_v_max_rss_gib": round(max_rss_kb / 2**20, 2),
        "peak_python_process_gib": round(sampler.peak_python / 2**30, 2), "peak_python_process": sampler.peak_process,
        "peak_spark_jvm_gib": round(sampler.peak_java / 2**30, 2), "peak_tree_gib": round(sampler.peak_tree / 2**30, 2),
        "cores": os.cpu_count(), "input_rows": manifest.get("input_rows"),
        "test_metrics": (manifest.get("tasks", {}).get("train_two_tower", {}).get("outputs", {}) or {}).get("test"),
    }
    if proc.returncode != 0:
        log.error("recsys run failed (exit %s); output tail:\n%s\n%s", proc.returncode, stdout[-3000:], stderr[-3000:])
    lines = [f"recsys run: exit {proc.returncode}, wall {wall / 60:.1f} min on {os.cpu_count()} cores",
             f"largest process (/usr/bin/time -v max RSS): {_gib(max_rss_kb * 1024)}",
             f"peak Python process (sampled): {_gib(sampler.peak_python)} ({sampler.peak_process})",
             f"peak Spark JVM (sampled): {_gib(sampler.peak_java)}; whole tree at once: {_gib(sampler.peak_tree)}",
             "task seconds: " + ", ".join(f"{t} {s}" for t, s in tasks.items())]
    for line in lines:
        log.info(line)
    sys.stdout.write(json.dumps(figures) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    if not args.home and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
