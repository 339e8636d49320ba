"""Loading and searching a FAISS item index version (what serving needs; building lives in
:mod:`pipeline_tasks.retrieval.index_build`).

A version is a directory with ``index.faiss``, ``item_ids.parquet`` (row i = vector i) and
``index.json`` (figures, checksums, parent). :func:`load_index` refuses files whose SHA-256 differs
from ``index.json``; :class:`ItemIndex` searches by inner product over L2-normalised embeddings,
excluding given items.

What is served comes from a registered bundle (:mod:`pipeline_tasks.online.bundle`): its own ``index/``, or the
newest *extension* of it that the hourly item refresh wrote under
``$RECSYS_HOME/indexes/<model>/v<version>/r0001/``, ``r0002/`` ... (:func:`extension_dir`). Each extension is the
previous version plus new items, with its own checksums and a ``parent`` (``index_dir``, ``sha256``, ``bundle``)
pointing back at what it extends; :func:`serving_index_dir` verifies that chain back to the bundle and
:func:`load_serving_index` loads its newest link.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline_tasks.core.constants import ITEM_ID
from pipeline_tasks.core.errors import PermanentError
from pipeline_tasks.core.settings import Settings, load_settings

if TYPE_CHECKING:
    from pipeline_tasks.online.bundle import Bundle

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
EXTENSION_RE = re.compile(r"r(\d{4,})")  # r0001, r0002 ...: extensions of one bundle version's index
REBUILD_HINT = "the index must be rebuilt: re-run build_index (recsys_training) into a fresh directory"


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


def extension_dir(model_name: str, version: int, n: int, settings: Settings | None = None) -> Path:
    """``$RECSYS_HOME/indexes/<model_name>/v<version:04d>/r<n:04d>``: the ``n``-th extension of a bundle version's
    index (``r0001`` extends the bundle's own ``index/``, ``r0002`` extends ``r0001``, ...)."""
    if n < 1:
        raise ValueError(f"extension number {n} must be >= 1 (r0001 extends the bundle's own index)")
    return (settings or load_settings()).index_dir / model_name / f"v{int(version):04d}" / f"r{n:04d}"


def extension_dirs(model_name: str, version: int, settings: Settings | None = None) -> list[Path]:
    """The extensions written for a bundle version, oldest first (``r0001``, ``r0002``, ...; other entries such as
    an interrupted write's temporary directory are ignored)."""
    root = (settings or load_settings()).index_dir / model_name / f"v{int(version):04d}"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := EXTENSION_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _recorded_meta(index_dir: Path, fix: str) -> dict[str, Any]:
    path = index_dir / META_FILE
    if not path.exists():
        raise IndexChecksumError(f"{path}: file is missing, so this index version cannot be verified; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IndexChecksumError(f"{path}: not valid JSON ({exc}); {fix}") from exc


def _bundle_fix(where: str) -> str:
    return f"the bundle of {where} is damaged: re-register it (run recsys_training) or promote another version"


def _extension_fix(where: str, ext: Path, fallback: Path) -> str:
    return (f"the index extensions of {where} are broken from {ext}: move {ext.name} and every later r* directory "
            f"out of {ext.parent} (serving then falls back to {fallback}), then run `recsys refresh` to add the new "
            "items again")


def _verified_chain(bundle: Bundle, settings: Settings | None) -> tuple[Path, str]:
    """The newest verified link of the bundle's index chain and what to do if its files fail to verify."""
    own = Path(bundle.path) / "index"
    where = f"{bundle.name} version {bundle.version}"
    base = _recorded_meta(own, _bundle_fix(where))
    registered = ((bundle.meta or {}).get("index") or {}).get("sha256")
    if registered and registered != base.get("sha256"):
        raise IndexChecksumError(f"{own}: index.json records sha256 {base.get('sha256')} but {where} was registered "
                                 f"with {registered}; {_bundle_fix(where)}")
    parent_dir, parent_sha, fix = own, base.get("sha256"), _bundle_fix(where)
    for expected, ext in enumerate(extension_dirs(bundle.name, bundle.version, settings), start=1):
        fix = _extension_fix(where, ext, parent_dir)
        if int(EXTENSION_RE.fullmatch(ext.name).group(1)) != expected:
            raise IndexChecksumError(f"{ext}: expected r{expected:04d} next (extensions are numbered without gaps, "
                                     f"each extending the one before); {fix}")
        meta = _recorded_meta(ext, fix)
        parent = meta.get("parent") or {}
        if parent.get("bundle") != {"name": bundle.name, "version": int(bundle.version)}:
            raise IndexChecksumError(f"{ext}: its parent names bundle {parent.get('bundle')}, not {where}; {fix}")
        if parent.get("sha256") != parent_sha:
            raise IndexChecksumError(f"{ext}: its parent sha256 {parent.get('sha256')} differs from the sha256 "
                                     f"{parent_sha} that {parent_dir} records; {fix}")
        parent_dir, parent_sha = ext, meta.get("sha256")
    return parent_dir, fix


def serving_index_dir(bundle: Bundle, settings: Settings | None = None) -> Path:
    """The index directory serving loads for ``bundle``: its newest extension, else the bundle's own ``index/``.

    The chain is verified from the bundle up: the bundle's ``index/index.json`` must record the checksums the
    bundle was registered with (``bundle.json``), extensions must be numbered ``r0001`` .. ``rN`` without gaps, and
    each extension's ``parent`` must name this bundle (model and version) and the SHA-256 its predecessor records.
    The chosen directory's file bytes are verified when it is loaded (:func:`load_serving_index`).

    Raises:
        IndexChecksumError: the chain is broken (the message names the link and what to do).
    """
    return _verified_chain(bundle, settings)[0]


def load_serving_index(bundle: Bundle, settings: Settings | None = None, use_gpu: bool | None = None) -> ItemIndex:
    """The index serving uses for ``bundle`` (:func:`serving_index_dir`), its files verified by their SHA-256.

    Raises:
        IndexChecksumError: the chain is broken or a file of the chosen version is corrupt (with what to do).
    """
    target, fix = _verified_chain(bundle, settings)
    try:
        return load_index(target, use_gpu=use_gpu)
    except IndexChecksumError as exc:
        what = str(exc).replace(f"; {REBUILD_HINT}", "")  # the chain knows the better remedy
        raise IndexChecksumError(f"{what}; {fix}") from exc


def extension_items(bundle: Bundle, known: Sequence[str], settings: Settings | None = None
                    ) -> tuple[list[str], np.ndarray]:
    """The items the bundle's newest index extension holds beyond ``known`` and their vectors, read from the
    verified chain (:func:`load_serving_index`); none when the bundle has no extension."""
    if not extension_dirs(bundle.name, bundle.version, settings):
        return [], np.zeros((0, 0), dtype=np.float32)
    index = load_serving_index(bundle, settings, use_gpu=False)
    ids = [str(i) for i in index.item_ids]
    positions = np.flatnonzero(pd.Index(known, dtype=object).get_indexer(ids) < 0)
    if not len(positions):
        return [], np.zeros((0, index.index.d), dtype=np.float32)
    faiss_index = index.index
    with contextlib.suppress(AttributeError, RuntimeError):
        faiss.extract_index_ivf(faiss_index).make_direct_map()  # IVF reconstructs only with a direct map
    vectors = np.vstack([faiss_index.reconstruct(int(p)) for p in positions]).astype(np.float32)
    return [ids[p] for p in positions], vectors
