"""Loading and searching a FAISS item index version (what serving needs; building lives in
:mod:`pipeline_tasks.retrieval.index_build`).

A version is a directory with ``index.faiss``, ``item_ids.parquet`` (row i = vector i) and
``index.json`` (figures, checksums, parent). :func:`load_index` refuses files whose SHA-256 differs
from ``index.json``; :class:`ItemIndex` searches by inner product over L2-normalised embeddings,
excluding given items; :func:`current_index` reads the pointer to the version serving loads.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline_tasks.core.constants import ITEM_ID
from pipeline_tasks.core.errors import PermanentError
from pipeline_tasks.core.settings import Settings, load_settings

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.parquet"
META_FILE = "index.json"
KINDS = ("auto", "flat", "ivf", "hnsw")
METRIC = "inner_product"
MIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid
EF_SEARCH_MAX = 4096
LATENCY_WARMUP = 10
GPU_MAX_NPROBE = 2048  # faiss GPU IVF search limit
CURRENT = "current.json"  # names the index version serving loads
REBUILD_HINT = "the index must be rebuilt: re-run build_index (the item index refresh) into a fresh directory"


class IndexChecksumError(PermanentError, RuntimeError):
    """An index file is missing or its bytes differ from the SHA-256 recorded in ``index.json``."""


@dataclass
class ItemIndex:
    """A loaded, checksum-verified index version."""

    index: Any
    item_ids: np.ndarray
    meta: dict[str, Any]
    index_dir: Path

    @property
    def sha256(self) -> dict[str, str]:
        """The verified SHA-256 of ``index.faiss`` and ``item_ids.parquet``."""
        return dict(self.meta["sha256"])

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Collection[str]] | None = None
    ) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` items per query: scores ``(n_queries, k)`` and item ids per query.

        ``exclude`` holds one collection of item ids per query (e.g. items already seen) that must not
        be returned; the search then asks for more neighbours so each row still has up to ``k`` items.
        Rows with fewer than ``k`` results are padded with ``-inf`` scores (their id lists are shorter).
        """
        arr = np.asarray(queries)
        x = _as_matrix(arr.reshape(1, -1) if arr.ndim == 1 else arr, "queries")
        if x.shape[1] != self.dim:
            raise ValueError(f"queries have dimension {x.shape[1]} but the index has {self.dim}; "
                             "embed the queries with the same model version as the items")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if exclude is not None and len(exclude) != len(x):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(x)} queries; pass one collection "
                             "of item ids per query (an empty one for none)")
        n_total = int(self.index.ntotal)
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        k_search = min(k + extra, n_total)
        if k_search == 0:
            return np.full((len(x), k), -np.inf, dtype=np.float32), [[] for _ in range(len(x))]
        scores, labels = self.index.search(x, k_search)
        out_scores = np.full((len(x), k), -np.inf, dtype=np.float32)
        out_ids: list[list[str]] = []
        for row in range(len(x)):
            drop = set(exclude[row]) if exclude is not None else set()
            ids: list[str] = []
            for score, label in zip(scores[row], labels[row], strict=True):
                if label < 0:  # IVF returns -1 when the probed lists hold fewer than k vectors
                    continue
                item = self.item_ids[label]
                if item in drop:
                    continue
                out_scores[row, len(ids)] = score
                ids.append(item)
                if len(ids) == k:
                    break
            out_ids.append(ids)
        return out_scores, out_ids


# --- helpers ---------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _as_matrix(x: Any, name: str) -> np.ndarray:
    """A 2-D, finite, float32, C-contiguous copy-if-needed of ``x``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dimension), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one row of dimension >= 1")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name}: {len(bad)} rows hold NaN or infinite values (first: row {bad[0]}); "
                         "fix the embedding step that produced them")
    return arr


def _check_normalised(x: np.ndarray, name: str) -> None:
    """Warn (not fail) when rows are not unit length: inner product then is not cosine similarity."""
    norms = np.linalg.norm(x, axis=1)
    off = np.abs(norms - 1.0) > 1e-3
    if off.any():
        log.warning("%s: %d of %d rows are not L2-normalised (norms %.3g..%.3g); inner-product scores are "
                    "not cosine similarities", name, int(off.sum()), len(x), norms.min(), norms.max())


def _as_ids(item_ids: Sequence[str], n_rows: int, name: str = "item_ids") -> list[str]:
    """Item ids as a list of unique, non-empty strings matching ``n_rows`` vectors."""
    ids = list(item_ids)
    if len(ids) != n_rows:
        raise ValueError(f"{name} has {len(ids)} entries but embeddings have {n_rows} rows; "
                         "pass exactly one item id per embedding row, in row order")
    for pos, item in enumerate(ids):
        if not isinstance(item, str):
            raise ValueError(f"{name}[{pos}] is {type(item).__name__} {item!r}, not str; "
                             "convert the ids to strings (e.g. [str(i) for i in ids])")
        if not item:
            raise ValueError(f"{name}[{pos}] is an empty string; every item needs a non-empty id")
    dup = pd.Index(ids)
    dup = dup[dup.duplicated()].unique()
    if len(dup):
        raise ValueError(f"{name}: {len(dup)} ids occur more than once (first: {list(dup[:5])}); "
                         "deduplicate the items (one vector per item) before building the index")
    return ids


def _use_gpu(requested: bool | None) -> bool:
    available = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if requested is None:
        return available > 0
    if requested and available == 0:
        raise ValueError("use_gpu=True but faiss sees no GPU (is faiss-cpu installed instead of faiss-gpu?); "
                         "pass use_gpu=None or False to build on the CPU")
    return bool(requested)


def _set_search_param(index: Any, kind: str, value: int) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = value
    elif kind == "hnsw":
        index.hnsw.efSearch = value


# --- building and tuning ---------------------------------------------------------------------------


# --- writing and loading ---------------------------------------------------------------------------


def _verified_bytes(path: Path, expected: str | None) -> bytes:
    """The file's bytes, after checking them against the recorded SHA-256."""
    if not path.exists():
        raise IndexChecksumError(f"{path}: file is missing (expected sha256 {expected}); {REBUILD_HINT}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise IndexChecksumError(f"{path}: sha256 mismatch: expected {expected}, actual {actual}; the file is "
                                 f"corrupt or was replaced; {REBUILD_HINT}")
    return data


def load_index(index_dir: str | Path, use_gpu: bool | None = None) -> ItemIndex:
    """Load one index version after verifying both files' SHA-256 against ``index.json``.

    Raises:
        IndexChecksumError: a file is missing or its bytes differ from the recorded checksum.
    """
    root = Path(index_dir)
    meta_path = root / META_FILE
    if not meta_path.exists():
        raise IndexChecksumError(f"{meta_path}: file is missing, so the index cannot be verified; {REBUILD_HINT}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexChecksumError(f"{meta_path}: not valid JSON ({exc}); {REBUILD_HINT}") from exc
    recorded = meta.get("sha256") or {}
    # The verified bytes are the ones deserialised: nothing can swap the file between check and load.
    index_bytes = _verified_bytes(root / INDEX_FILE, recorded.get(INDEX_FILE))
    ids_bytes = _verified_bytes(root / IDS_FILE, recorded.get(IDS_FILE))
    index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
    del index_bytes
    ids = pq.read_table(io.BytesIO(ids_bytes)).column(ITEM_ID).to_numpy(zero_copy_only=False).astype(object)
    if index.ntotal != len(ids) or len(ids) != meta.get("n_items"):
        raise IndexChecksumError(f"{root}: index holds {index.ntotal} vectors, {IDS_FILE} {len(ids)} ids, "
                                 f"{META_FILE} says {meta.get('n_items')}; {REBUILD_HINT}")
    kind = meta["kind"]
    param = meta.get("nprobe") if kind == "ivf" else meta.get("ef_search")
    if param is not None:
        _set_search_param(index, kind, int(param))
    if kind in ("flat", "ivf") and _use_gpu(use_gpu):
        if kind == "ivf" and int(param or 0) > GPU_MAX_NPROBE:
            log.warning("nprobe=%s exceeds the GPU limit of %d; the IVF index stays on the CPU", param,
                        GPU_MAX_NPROBE)
        else:
            index = faiss.index_cpu_to_all_gpus(index)
    log.info("loaded %s index from %s (%d items)", kind, root, len(ids))
    return ItemIndex(index=index, item_ids=ids, meta=meta, index_dir=root)


def current_index(settings: Settings | None = None) -> dict[str, Any] | None:
    """The pointer to the serving index version, or None before the first ``build_index``."""
    path = (settings or load_settings()).index_dir / CURRENT
    return json.loads(path.read_text()) if path.exists() else None


def version_dir(model_key: str, version: int, settings: Settings | None = None) -> Path:
    """``$RECSYS_HOME/indexes/<model_key>/v0001``."""
    return (settings or load_settings()).index_dir / model_key / f"v{version:04d}"
