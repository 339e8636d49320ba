"""Building and tuning FAISS item indexes (Flat / IVF / HNSW) to a recall target; new versions with added items.

:func:`build_index` builds a Flat, IVF or HNSW index, tunes its search parameter (``nprobe`` /
``efSearch``) until recall@k against exact search on held-out user embeddings reaches a target,
measures single-thread query latency and writes one index version: ``index.faiss``,
``item_ids.parquet`` (row i = vector i) and ``index.json`` (figures, checksums, parent version).
:func:`load_index` refuses files whose SHA-256 differs from ``index.json``; :func:`add_items` writes
a new version from a base version plus new items and never touches the base.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline_tasks.core.constants import ITEM_ID, SEED
from pipeline_tasks.core.errors import InvalidParamsError
from pipeline_tasks.online.index import (
    EF_SEARCH_MAX,
    IDS_FILE,
    INDEX_FILE,
    KINDS,
    LATENCY_WARMUP,
    META_FILE,
    METRIC,
    MIN_POINTS_PER_LIST,
    _as_ids,
    _as_matrix,
    _check_normalised,
    _set_search_param,
    _use_gpu,
    file_sha256,
    load_index,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    """How to build and tune an item index.

    ``kind="auto"`` builds Flat up to ``flat_max_items`` items; above it builds IVF and HNSW, tunes
    both and keeps the one with the lower single-query p99 latency that reaches ``target_recall``.
    ``ivf_nlist=None`` means about 4*sqrt(n) lists with at least 39 training points each.
    ``use_gpu=None`` uses a GPU when faiss sees one (Flat and IVF only; HNSW is CPU-only).
    """

    kind: str = "auto"
    target_recall: float = 0.95
    k: int = 100
    flat_max_items: int = 100_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    ivf_nlist: int | None = None
    max_tuning_queries: int = 1000
    latency_queries: int = 500
    seed: int = SEED
    use_gpu: bool | None = None

    def validate(self) -> None:
        """Raise ValueError on an unusable setting."""
        if self.kind not in KINDS:
            raise InvalidParamsError(f"IndexConfig.kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if not 0.0 < self.target_recall <= 1.0:
            raise InvalidParamsError(f"IndexConfig.target_recall={self.target_recall} must be in (0, 1]")
        for name in ("k", "hnsw_m", "hnsw_ef_construction", "max_tuning_queries", "latency_queries"):
            if getattr(self, name) < 1:
                raise InvalidParamsError(f"IndexConfig.{name}={getattr(self, name)} must be >= 1")
        if self.flat_max_items < 0:
            raise InvalidParamsError(f"IndexConfig.flat_max_items={self.flat_max_items} must be >= 0")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise InvalidParamsError(f"IndexConfig.ivf_nlist={self.ivf_nlist} must be >= 1 "
                                     "(or None for about 4*sqrt(n))")


def _nlist(n: int, requested: int | None) -> int:
    if requested is not None:
        if requested > n:
            raise ValueError(f"ivf_nlist={requested} exceeds the {n} items; use fewer lists (or None for auto)")
        if n < MIN_POINTS_PER_LIST * requested:
            log.warning("ivf_nlist=%d leaves fewer than %d training points per list for %d items",
                        requested, MIN_POINTS_PER_LIST, n)
        return requested
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def _search_values(kind: str, nlist: int, k: int) -> list[int]:
    """The tuning ladder: nprobe 1, 2, 4, ... nlist; efSearch 16, 32, ... 4096, never below k."""
    if kind == "ivf":
        values = [1 << i for i in range(nlist.bit_length()) if 1 << i < nlist]
        return [*values, nlist]
    return sorted({max(1 << i, k) for i in range(4, EF_SEARCH_MAX.bit_length())})


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k (``truth`` has no -1 labels)."""
    k = truth.shape[1]
    step = max(1, (1 << 24) // max(1, found.shape[1] * k))  # bound the broadcast's memory
    hits = sum(int((found[i : i + step, :, None] == truth[i : i + step, None, :]).any(axis=2).sum())
               for i in range(0, len(truth), step))
    return hits / (len(truth) * k)


def _latency_ms(index: Any, queries: np.ndarray, k: int) -> tuple[float, float]:
    """p50 and p99 latency (ms) of one-query searches on one thread; restores the thread count."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for i in range(min(LATENCY_WARMUP, len(queries))):
            index.search(queries[i : i + 1], k)
        times = np.empty(len(queries))
        for i in range(len(queries)):
            t0 = time.perf_counter()
            index.search(queries[i : i + 1], k)
            times[i] = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(previous)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def _sample_rows(x: np.ndarray, n: int, seed: int, cycle: bool = False) -> np.ndarray:
    """``n`` rows of ``x`` in a seeded random order (repeating rows only when ``cycle`` and x is short)."""
    order = np.random.default_rng(seed).permutation(len(x))
    if cycle and n > len(x):
        order = np.resize(order, n)
    return np.ascontiguousarray(x[order[:n]])


def _stored_vectors(index: Any, kind: str) -> np.ndarray:
    """All vectors held by a CPU index, in id order (IVF gets a temporary direct map)."""
    if kind != "ivf":
        return index.reconstruct_n(0, index.ntotal)
    ivf = faiss.extract_index_ivf(index)
    ivf.make_direct_map(True)
    try:
        return ivf.reconstruct_n(0, ivf.ntotal)
    finally:
        ivf.make_direct_map(False)  # keep the written index free of the map


def _ground_truth(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    return exact.search(queries, k)[1]


@dataclass
class _Candidate:
    kind: str
    index: Any
    build_seconds: float
    nlist: int | None = None
    hnsw_m: int | None = None
    search_param: int | None = None
    recall_at_k: float | None = None
    target_reached: bool | None = None
    tuning_seconds: float = 0.0
    memory_bytes: int = 0
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None

    def figures(self) -> dict[str, Any]:
        """The candidate's figures for ``index.json`` (no index object)."""
        out = {key: value for key, value in asdict(self).items() if key not in ("index", "search_param")}
        out.update(_param_fields(self.kind, self.search_param))
        if self.kind != "ivf":
            out.pop("nlist")
        if self.kind != "hnsw":
            out.pop("hnsw_m")
        return out


def _param_name(kind: str) -> str | None:
    """The meta key of a kind's tuned search parameter (Flat has none)."""
    return {"ivf": "nprobe", "hnsw": "ef_search"}.get(kind)


def _param_fields(kind: str, value: int | None) -> dict[str, Any]:
    name = _param_name(kind)
    return {name: value} if name else {}


def _build(kind: str, x: np.ndarray, config: IndexConfig, gpu: bool) -> _Candidate:
    """Build (and for IVF train) one CPU index over ``x``; Flat and IVF run on the GPU when ``gpu``."""
    d = x.shape[1]
    t0 = time.perf_counter()
    nlist = hnsw_m = None
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = _nlist(len(x), config.ivf_nlist)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = config.seed  # k-means initialisation
    elif kind == "hnsw":
        hnsw_m = config.hnsw_m
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if gpu and kind in ("flat", "ivf"):
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        if hasattr(gpu_index, "cp"):
            gpu_index.cp.seed = config.seed
        if kind == "ivf":
            gpu_index.train(x)
        gpu_index.add(x)
        index = faiss.index_gpu_to_cpu(gpu_index)
    else:
        if kind == "ivf":
            index.train(x)
        index.add(x)
    seconds = time.perf_counter() - t0
    log.info("built %s index over %d items (dim %d) in %.2f s", kind, len(x), d, seconds)
    return _Candidate(kind=kind, index=index, build_seconds=seconds, nlist=nlist, hnsw_m=hnsw_m)


def _tune(cand: _Candidate, tuning_queries: np.ndarray, truth: np.ndarray | None, target: float) -> None:
    """Raise nprobe / efSearch until mean recall@k reaches ``target`` (else keep the best value, warn)."""
    if cand.kind == "flat" or truth is None:  # exact search
        cand.recall_at_k, cand.target_reached, cand.tuning_seconds = 1.0, True, 0.0
        return
    k = truth.shape[1]
    t0 = time.perf_counter()
    ladder = _search_values(cand.kind, cand.nlist or 0, k)
    best_value, best_recall = ladder[0], -1.0
    for value in ladder:
        _set_search_param(cand.index, cand.kind, value)
        recall = _recall(cand.index.search(tuning_queries, k)[1], truth)
        log.info("%s %s=%d: recall@%d %.4f", cand.kind, _param_name(cand.kind), value, k, recall)
        if recall > best_recall:
            best_value, best_recall = value, recall
        if recall >= target:
            break
    _set_search_param(cand.index, cand.kind, best_value)
    cand.search_param, cand.recall_at_k = best_value, best_recall
    cand.target_reached = best_recall >= target
    cand.tuning_seconds = time.perf_counter() - t0
    if not cand.target_reached:
        log.warning("%s index: recall@%d %.4f stays below the target %.4f even at %s=%d; the index is kept "
                    "with target_reached=false (raise hnsw_m / ef_construction or nlist, or lower the target)",
                    cand.kind, k, best_recall, target, _param_name(cand.kind), best_value)


def _measure(cand: _Candidate, latency_queries: np.ndarray, k: int) -> None:
    cand.memory_bytes = int(faiss.serialize_index(cand.index).size)
    cand.latency_ms_p50, cand.latency_ms_p99 = _latency_ms(cand.index, latency_queries, k)
    log.info("%s index: %.1f MB, latency p50 %.3f ms / p99 %.3f ms (1 thread)", cand.kind,
             cand.memory_bytes / 1e6, cand.latency_ms_p50, cand.latency_ms_p99)


def _choose(cands: list[_Candidate]) -> _Candidate:
    """Lowest p99 among candidates that reach the target; otherwise the highest recall."""
    reached = [c for c in cands if c.target_reached]
    if reached:
        return min(reached, key=lambda c: math.inf if c.latency_ms_p99 is None else c.latency_ms_p99)
    if len(cands) > 1:
        log.warning("no candidate reaches the recall target; keeping the one with the highest recall")
    return max(cands, key=lambda c: c.recall_at_k or 0.0)


def _tune_and_measure(
    cands: list[_Candidate], x: np.ndarray, queries: np.ndarray, k: int, config: IndexConfig
) -> float:
    """Tune and measure every candidate against exact search; returns the ground-truth seconds."""
    tuning_queries = _sample_rows(queries, min(len(queries), config.max_tuning_queries), config.seed)
    latency_queries = _sample_rows(queries, config.latency_queries, config.seed + 1, cycle=True)
    t0 = time.perf_counter()
    truth = _ground_truth(x, tuning_queries, k) if any(c.kind != "flat" for c in cands) else None
    gt_seconds = time.perf_counter() - t0
    for cand in cands:
        _tune(cand, tuning_queries, truth, config.target_recall)
        _measure(cand, latency_queries, k)
    return gt_seconds


def _write_version(
    out_dir: Path, index: Any, item_ids: Sequence[str], meta: dict[str, Any]
) -> dict[str, Any]:
    """Write index, ids and meta (meta last, with the checksums of the final bytes); returns the meta."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_FILE
    # An old index.json must not describe the new data files if we stop half way: drop it first.
    meta_path.unlink(missing_ok=True)
    tmp_suffix = f".tmp-{os.getpid()}"
    index_tmp = out_dir / (INDEX_FILE + tmp_suffix)
    ids_tmp = out_dir / (IDS_FILE + tmp_suffix)
    meta_tmp = out_dir / (META_FILE + tmp_suffix)
    try:
        faiss.write_index(index, str(index_tmp))
        pq.write_table(pa.table({ITEM_ID: pa.array(list(item_ids), type=pa.string())}), ids_tmp)
        meta = {
            **meta,
            "memory_bytes": index_tmp.stat().st_size,
            "sha256": {INDEX_FILE: file_sha256(index_tmp), IDS_FILE: file_sha256(ids_tmp)},
        }
        meta_tmp.write_text(json.dumps(meta, indent=2, default=str))
        index_tmp.replace(out_dir / INDEX_FILE)
        ids_tmp.replace(out_dir / IDS_FILE)
        meta_tmp.replace(meta_path)
    finally:
        for tmp in (index_tmp, ids_tmp, meta_tmp):
            tmp.unlink(missing_ok=True)
    log.info("wrote %s index version to %s (%d items, sha256 %s)", meta["kind"], out_dir, meta["n_items"],
             meta["sha256"][INDEX_FILE][:12])
    return {**meta, "index_dir": str(out_dir), "index_path": str(out_dir / INDEX_FILE),
            "meta_path": str(meta_path)}


def _base_meta(cand: _Candidate, dim: int, n_items: int, k: int, config: IndexConfig, gpu: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "kind": cand.kind,
        "requested_kind": config.kind,
        "dim": dim,
        "metric": METRIC,
        "n_items": n_items,
        "k": k,
        "target_recall": config.target_recall,
        "recall_at_k": cand.recall_at_k,
        "target_reached": cand.target_reached,
        **_param_fields(cand.kind, cand.search_param),
    }
    if cand.kind == "ivf":
        meta["nlist"] = cand.nlist
    if cand.kind == "hnsw":
        meta["hnsw_m"] = cand.hnsw_m
        meta["hnsw_ef_construction"] = config.hnsw_ef_construction
    meta.update({
        "build_seconds": round(cand.build_seconds, 4),
        "tuning_seconds": round(cand.tuning_seconds, 4),
        "latency_ms_p50": cand.latency_ms_p50,
        "latency_ms_p99": cand.latency_ms_p99,
        "threads_for_latency": 1,
        "gpu": gpu and cand.kind in ("flat", "ivf"),
        "faiss_version": faiss.__version__,
        "seed": config.seed,
        "created_at": datetime.now(UTC).isoformat(),
    })
    return meta


def build_index(
    embeddings: np.ndarray,
    item_ids: Sequence[str],
    queries: np.ndarray,
    out_dir: str | Path,
    config: IndexConfig = IndexConfig(),
    parent: dict | None = None,
) -> dict[str, Any]:
    """Build, tune and write one index version of the item embeddings into ``out_dir``.

    Args:
        embeddings: item vectors (n_items x dim), L2-normalised; converted to float32.
        item_ids: one unique, non-empty string id per embedding row.
        queries: held-out user embeddings (n x dim) for recall@k against exact search and latency.
        out_dir: directory of this version (created; its index files are replaced).
        config: kind, recall target and tuning limits.
        parent: provenance to record (e.g. the item tower's run and checksum), or None.

    Returns:
        The ``index.json`` content plus ``index_dir``, ``index_path`` and ``meta_path``.
    """
    config.validate()
    x = _as_matrix(embeddings, "embeddings")
    ids = _as_ids(item_ids, len(x))
    q = _as_matrix(queries, "queries")
    if q.shape[1] != x.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but embeddings have {x.shape[1]}; "
                         "use user and item embeddings from the same model version")
    _check_normalised(x, "embeddings")
    n = len(x)
    k = min(config.k, n)
    if k < config.k:
        log.warning("k=%d exceeds the %d items; recall is measured at k=%d", config.k, n, k)
    gpu = _use_gpu(config.use_gpu)
    kinds = [config.kind]
    if config.kind == "auto":
        kinds = ["flat"] if n <= config.flat_max_items else ["ivf", "hnsw"]

    t0 = time.perf_counter()
    cands = [_build(kind, x, config, gpu) for kind in kinds]
    gt_seconds = _tune_and_measure(cands, x, q, k, config)
    chosen = _choose(cands)
    meta = _base_meta(chosen, x.shape[1], n, k, config, gpu)
    meta["ground_truth_seconds"] = round(gt_seconds, 4)
    if len(cands) > 1:
        meta["candidates"] = [c.figures() for c in cands]
        meta["selection_seconds"] = round(time.perf_counter() - t0, 4)
        log.info("auto: chose %s (p99 %.3f ms, recall@%d %.4f) over %s", chosen.kind, chosen.latency_ms_p99, k,
                 chosen.recall_at_k, ", ".join(c.kind for c in cands if c is not chosen))
    meta["parent"] = parent
    return _write_version(Path(out_dir), chosen.index, ids, meta)


def add_items(
    base_dir: str | Path,
    embeddings: np.ndarray,
    item_ids: Sequence[str],
    out_dir: str | Path,
    queries: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write a new index version in ``out_dir``: the (verified) base version plus new items.

    IVF assigns the new vectors with the base's trained quantizer; Flat and HNSW just add them. With
    ``queries`` the search parameter is re-tuned and recall@k and latency re-measured; without, the
    base's search parameter is kept and recall / latency are recorded as not measured (null).
    The base directory's files are never modified.
    """
    base_path, out_path = Path(base_dir), Path(out_dir)
    if base_path.resolve() == out_path.resolve():
        raise ValueError(f"out_dir {out_path} is the base directory; write the new version to a new directory "
                         "so the base stays intact")
    base = load_index(base_path, use_gpu=False)
    x = _as_matrix(embeddings, "embeddings")
    if x.shape[1] != base.dim:
        raise ValueError(f"new embeddings have dimension {x.shape[1]} but the base index has {base.dim}; "
                         "a new model version needs a full rebuild with build_index")
    new_ids = _as_ids(item_ids, len(x))
    clash = pd.Index(new_ids).intersection(pd.Index(base.item_ids))
    if len(clash):
        raise ValueError(f"{len(clash)} item ids are already in the base index {base_path} (first: "
                         f"{list(clash[:5])}); add only new items (changed items need a rebuild)")
    _check_normalised(x, "embeddings")
    bm = base.meta
    kind = bm["kind"]
    index = base.index  # a fresh in-memory copy deserialised from the verified bytes
    n_base = int(index.ntotal)
    t0 = time.perf_counter()
    index.add(x)
    add_seconds = time.perf_counter() - t0
    if kind == "ivf" and len(x) > n_base:
        log.warning("adding %d items to an IVF index trained on %d: the quantizer may no longer fit the data; "
                    "consider a full rebuild with build_index", len(x), n_base)
    all_ids = [*base.item_ids.tolist(), *new_ids]
    n = len(all_ids)
    k = min(int(bm["k"]), n)
    param_key = _param_name(kind)
    cand = _Candidate(kind=kind, index=index, build_seconds=add_seconds, nlist=bm.get("nlist"),
                      hnsw_m=bm.get("hnsw_m"), search_param=bm.get(param_key) if param_key else None)
    config = IndexConfig(kind=kind, target_recall=float(bm["target_recall"]), k=k,
                         hnsw_ef_construction=int(bm.get("hnsw_ef_construction", IndexConfig.hnsw_ef_construction)),
                         seed=int(bm.get("seed", SEED)), use_gpu=False)
    measured = queries is not None
    if queries is not None:
        q = _as_matrix(queries, "queries")
        if q.shape[1] != base.dim:
            raise ValueError(f"queries have dimension {q.shape[1]} but the index has {base.dim}")
        gt_seconds = _tune_and_measure([cand], _stored_vectors(index, kind), q, k, config)
    else:
        gt_seconds = None
        cand.recall_at_k = 1.0 if kind == "flat" else None
        cand.target_reached = True if kind == "flat" else None
        cand.memory_bytes = 0
    meta = _base_meta(cand, base.dim, n, k, config, gpu=False)
    meta.update({
        "build_seconds": round(add_seconds, 4),
        "added_items": len(new_ids),
        "recall_measured": measured or kind == "flat",
        "ground_truth_seconds": None if gt_seconds is None else round(gt_seconds, 4),
        "parent": {"index_dir": str(base_path), "sha256": bm["sha256"], "n_items": n_base},
    })
    return _write_version(out_path, index, all_ids, meta)
