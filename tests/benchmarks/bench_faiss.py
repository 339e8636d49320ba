"""Benchmark: FAISS item index kinds (Flat, IVF, HNSW) on real item-tower embeddings.

For each kind, :func:`pipeline_tasks.index.build_index` builds into a temporary directory and tunes the
search parameter until recall@k against exact search on the held-out user embeddings reaches the target
(Flat is exact: recall 1.0 by definition). Logs one line per kind: build time, index size, recall@k,
single-query latency p50/p99 on one thread, and the machine's core count; writes all figures as JSON.

Usage: .venv/bin/python tests/benchmarks/bench_faiss.py --embeddings ITEMS.npy --queries USERS.npy
       [--k 100] [--target 0.95] [--kinds flat,ivf,hnsw] [--out results.json]
Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline_tasks.retrieval.index_build import IndexConfig, build_index

log = logging.getLogger("bench")

KINDS = ("flat", "ivf", "hnsw")


def load_matrix(path: Path, name: str) -> np.ndarray:
    """A 2-D float32 matrix from a ``.npy`` file."""
    arr = np.load(path)
    if arr.ndim != 2:
        raise SystemExit(f"{name} {path}: expected a 2-D array (rows x dimension), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def bench_kind(kind: str, items: np.ndarray, ids: list[str], queries: np.ndarray, args: argparse.Namespace,
               ) -> dict[str, Any]:
    """Build, tune and measure one index kind in a temporary directory; returns its figures."""
    config = IndexConfig(kind=kind, k=args.k, target_recall=args.target, max_tuning_queries=args.tuning_queries,
                         latency_queries=args.latency_queries, hnsw_m=args.hnsw_m,
                         hnsw_ef_construction=args.ef_construction)
    with tempfile.TemporaryDirectory(prefix=f"bench-faiss-{kind}-") as tmp:
        t0 = time.perf_counter()
        meta = build_index(items, ids, queries, Path(tmp), config)
        wall = time.perf_counter() - t0
    return {
        "kind": kind,
        "build_s": round(meta["build_seconds"], 3),
        "tuning_s": round(meta["tuning_seconds"], 3),
        "wall_s": round(wall, 3),
        "memory_mb": round(meta["memory_bytes"] / 2**20, 2),
        "recall_at_k": meta["recall_at_k"],
        "target_reached": meta["target_reached"],
        "nprobe": meta.get("nprobe"),
        "nlist": meta.get("nlist"),
        "ef_search": meta.get("ef_search"),
        "hnsw_m": meta.get("hnsw_m"),
        "gpu": meta["gpu"],
        "latency_ms_p50": round(meta["latency_ms_p50"], 4),
        "latency_ms_p99": round(meta["latency_ms_p99"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", type=Path, required=True, help="item embeddings (.npy, n_items x dim)")
    parser.add_argument("--queries", type=Path, required=True, help="held-out user embeddings (.npy, n x dim)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--target", type=float, default=0.95, help="recall@k target for IVF / HNSW tuning")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of flat,ivf,hnsw")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("--tuning-queries", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=500)
    parser.add_argument("--hnsw-m", type=int, default=IndexConfig.hnsw_m)
    parser.add_argument("--ef-construction", type=int, default=IndexConfig.hnsw_ef_construction)
    parser.add_argument("--verbose", action="store_true", help="also log each tuning step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pipeline_tasks.online.index").setLevel(logging.INFO if args.verbose else logging.WARNING)

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    items = load_matrix(args.embeddings, "--embeddings")
    queries = load_matrix(args.queries, "--queries")
    ids = [str(i) for i in range(len(items))]
    cores = os.cpu_count()
    log.info("%d items x %d dims, %d queries, k=%d, target=%.3f, %s cores, faiss %s", len(items), items.shape[1],
             len(queries), args.k, args.target, cores, faiss.__version__)

    results = []
    for kind in kinds:
        r = bench_kind(kind, items, ids, queries, args)
        results.append(r)
        param = {"ivf": f"nlist={r['nlist']} nprobe={r['nprobe']}", "hnsw": f"M={r['hnsw_m']} ef={r['ef_search']}"}
        log.info("%-4s build %7.2f s | %8.1f MB | recall@%d %.4f%s | p50 %.3f ms p99 %.3f ms (1 thread) | %s | "
                 "%s cores", kind, r["build_s"], r["memory_mb"], args.k, r["recall_at_k"],
                 "" if r["target_reached"] else " (target NOT reached)", r["latency_ms_p50"], r["latency_ms_p99"],
                 param.get(kind, "exact"), cores)

    report = {
        "cores": cores,
        "faiss_version": faiss.__version__,
        "n_items": len(items),
        "dim": items.shape[1],
        "n_queries": len(queries),
        "k": args.k,
        "target_recall": args.target,
        "embeddings": str(args.embeddings),
        "queries": str(args.queries),
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
