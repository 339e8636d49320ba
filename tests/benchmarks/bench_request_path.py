"""In-process benchmark of one request's path, stage by stage: where a `/recommend` spends its time.

Loads a bundle and its serving snapshot as the service does, builds the service's `Engine`, and answers the
first request of --requests users (random known users and a --cold-share of unknown ones; no cache, no state
store, recently-shown filter off) one at a time in this thread. Each stage function of the shared path is
timed by wrapping it for the run (candidate sources, fusion, feature assembly, the ranker, the rules, the
answer's description). Prints the request's median / p99 / mean, each stage's mean, the core count and the
peak RSS; with --compare-compiled it also runs the LightGBM Booster and the compiled ranker back to back and
checks that their answers are identical; with --batches 2,4,8 it also answers the same requests that many at a
time (``Engine.recommend_many``, what the service does with requests that queue under load) and reports each
request's share of its block's time, checking that the answers are the same.

    .venv/bin/python tests/benchmarks/bench_request_path.py BUNDLE_DIR [--snapshot DIR] [--requests 400]

BUNDLE_DIR: a registered bundle (the Bento's `src/serving/bundle`, or `recsys models`' bundle directory).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_request_path")


class _Stages:
    """Stage timings of the variant being run (the wrappers write where :attr:`current` points)."""

    def __init__(self) -> None:
        self.current: dict[str, list[float]] = defaultdict(list)


@contextlib.contextmanager
def _timed(stages: _Stages) -> Iterator[None]:
    """Wrap the shared path's stage functions where the request path looks them up; restore them after."""
    from pipeline_tasks.online import candidates, engine, two_stage

    targets = [(two_stage, "source_lists", "sources"), (two_stage, "fuse_arrays", "fusion"),
               (two_stage, "assemble_features", "features"), (two_stage, "apply_rules", "rules"),
               (candidates, "top_k", "sources.top_k_dense"), (candidates, "top_k_sparse", "sources.top_k_sparse"),
               (candidates.TwoTowerItems, "top_k", "sources.two_tower"), (engine.Engine, "_describe", "describe")]
    saved = []

    def wrap(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                stages.current[name].append((time.perf_counter() - t0) * 1000)
        return timed

    for owner, attr, name in targets:
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))
        setattr(owner, attr, wrap(fn, name))
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def _ranker_timer(state: Any, stages: _Stages) -> None:
    ranker = state.fit.ranker
    predict = ranker.predict

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return predict(*args, **kwargs)
        finally:
            stages.current["ranker"].append((time.perf_counter() - t0) * 1000)

    ranker.predict = timed  # an instance attribute: this state's ranker only


def _run(engines: list[Any], users: list[str], k: int
         ) -> list[tuple[list[float], dict[str, list[float]], list[list[str]]]]:
    """Each user's first request to every engine, interleaved (user by user, the engines' order alternating),
    so that a drift of the machine's speed falls on every variant alike."""
    stages = _Stages()
    per = [([], defaultdict(list), []) for _ in engines]
    for engine in engines:
        _ranker_timer(engine.state, stages)
    with _timed(stages):
        for n, user in enumerate(users):
            order = range(len(engines)) if n % 2 == 0 else reversed(range(len(engines)))
            for i in order:
                totals, timings, answers = per[i]
                stages.current = timings
                t0 = time.perf_counter()
                answer = engines[i].recommend(user, k=k, filter_shown=False)
                totals.append((time.perf_counter() - t0) * 1000)
                answers.append([r.item_id for r in answer.items])
    for engine in engines:
        with contextlib.suppress(AttributeError):
            del engine.state.fit.ranker.predict
    return per


def _run_batched(engine: Any, users: list[str], k: int, batch: int) -> tuple[list[float], list[list[str]]]:
    """The same first requests answered ``batch`` at a time (``Engine.recommend_many``, the service's
    micro-batches under load): each request's share of its block's time, and the answers."""
    from pipeline_tasks.online.engine import Request

    shares, answers = [], []
    for start in range(0, len(users), batch):
        chunk = users[start:start + batch]
        t0 = time.perf_counter()
        got = engine.recommend_many([Request(u, k, filter_shown=False) for u in chunk])
        shares.extend([(time.perf_counter() - t0) * 1000 / len(chunk)] * len(chunk))
        answers.extend([r.item_id for r in a.items] for a in got)
    return shares, answers


def _summary(label: str, totals: list[float], stages: dict[str, list[float]], n: int) -> dict[str, Any]:
    out = {"label": label, "requests": n, "p50_ms": float(np.median(totals)),
           "p99_ms": float(np.percentile(totals, 99)), "mean_ms": float(np.mean(totals)),
           "stages_mean_ms_per_request": {name: float(np.sum(v) / n) for name, v in sorted(stages.items())}}
    log.info("%s: %d requests, p50 %.2f ms, p99 %.2f ms, mean %.2f ms", label, n, out["p50_ms"], out["p99_ms"],
             out["mean_ms"])
    for name, ms in out["stages_mean_ms_per_request"].items():
        log.info("    %-22s %6.2f ms per request", name, ms)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="a registered bundle directory")
    parser.add_argument("--snapshot", default=None, help="serving snapshot (default: BUNDLE/snapshot)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--cold-share", type=float, default=0.05)
    parser.add_argument("--compare-compiled", action="store_true",
                        help="run the Booster and the compiled ranker back to back; check identical answers")
    parser.add_argument("--compare-scan", action="store_true",
                        help="also run the full two-tower scan (no pruning); check identical answers")
    parser.add_argument("--batches", default="",
                        help="also answer the requests N at a time (Engine.recommend_many), e.g. 2,4,8; check answers")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch
    from threadpoolctl import threadpool_limits

    from pipeline_tasks.online.bundle import open_bundle
    from pipeline_tasks.online.candidates import TwoTowerItems
    from pipeline_tasks.online.engine import Engine
    from pipeline_tasks.online.snapshot import load_snapshot
    from pipeline_tasks.online.two_stage import load_fit, prepare, with_extension_items

    torch.set_num_threads(1)
    bundle = open_bundle(args.bundle)
    moment, info = load_snapshot(args.snapshot or Path(args.bundle) / "snapshot")
    fit_name = info.get("fit", "serving")
    base = load_fit(bundle.fit_dir(fit_name))
    fit = with_extension_items(base, bundle) if fit_name == "serving" else base
    t0 = time.perf_counter()
    state = prepare(fit, moment)
    log.info("prepared %d users x %d items in %.1f s", len(state.rows_of), len(fit.item_ids),
             time.perf_counter() - t0)
    rng = random.Random(7)
    known = sorted(state.rows_of)
    users = [rng.choice(known) if rng.random() >= args.cold_share else f"cold-{rng.randrange(10**9)}"
             for _ in range(args.requests)]
    users = list(dict.fromkeys(users))  # each user's first request
    results = []
    # (label, pruned two-tower top-k, compiled ranker)
    variants = [("compiled ranker, pruned two-tower top-k", True, True)]
    if args.compare_compiled:
        variants.insert(0, ("LightGBM Booster, pruned two-tower top-k", True, False))
    if args.compare_scan:
        variants.insert(0, ("compiled ranker, full two-tower scan", False, True))
    with threadpool_limits(1):
        engines = []
        for label, pruned, compiled in variants:
            t0 = time.perf_counter()
            engines.append(Engine(state, None, filter_shown=False, compiled_ranker=compiled))
            if not pruned and state.item_vectors is not None:  # the request path reads this cached property
                engines[-1].state.__dict__["two_tower_items"] = TwoTowerItems(state.item_vectors, prune=False)
            log.info("%s: engine ready in %.1f s (ranker: %s)", label, time.perf_counter() - t0,
                     type(engines[-1].state.fit.ranker).__name__)
        for engine in engines:
            for user in users[:20]:  # warm-up
                engine.recommend(user, k=args.k, filter_shown=False)
        gc.collect()
        gc.freeze()  # as the service does after loading: no full collection walks the loaded state mid-request
        per = _run(engines, users, args.k)
        batched = {int(b): _run_batched(engines[-1], users, args.k, int(b)) for b in args.batches.split(",") if b}
    answers = []
    for (label, _, _), (totals, stages, got) in zip(variants, per, strict=True):
        results.append(_summary(label, totals, stages, len(users)))
        answers.append(got)
    for b, (shares, got) in batched.items():
        results.append(_summary(f"{variants[-1][0]}, {b} requests per block", shares, {}, len(users)))
        answers.append(got)
    identical = None
    if len(answers) > 1:
        identical = all(a == answers[0] for a in answers[1:])
        log.info("answers identical across the variants: %s", identical)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log.info("cores: %d, peak RSS %.2f GiB", os.cpu_count() or 0, peak_gib)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "identical": identical, "cores": os.cpu_count(),
                                               "peak_rss_gib": peak_gib}, indent=2))
    return 0 if identical in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
