"""FAISS item index (pipeline_tasks/index.py): exact Flat, tuned IVF and HNSW on clustered embeddings,
versioned files with checksums, refusal of corrupt files, incremental versions and input errors.

The vectors look like item-tower output: a mixture of Gaussian clusters on the unit sphere whose spread
is comparable to the distance between centres, so IVF needs nprobe > 1 and HNSW efSearch > k.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.online.index import IndexChecksumError, ItemIndex, file_sha256, load_index
from pipeline_tasks.retrieval.index_build import IndexConfig, add_items, build_index

DIM = 64
N_CENTRES = 300
NOISE = 1.2  # noise norm relative to the unit-norm centres
K = 100
N_LARGE = 50_000
N_SMALL = 2_000
# Fast but realistic tuning: 200 held-out queries for recall, 100 for latency; a cheaper HNSW graph.
FAST = {"k": K, "max_tuning_queries": 200, "latency_queries": 100, "hnsw_m": 16, "hnsw_ef_construction": 40}


def mixture(n: int, seed: int) -> np.ndarray:
    """``n`` L2-normalised points from one fixed Gaussian mixture (the centres never change)."""
    centres = np.random.default_rng(12345).standard_normal((N_CENTRES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, N_CENTRES, n)]
    points = points + NOISE * rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def ids_for(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def exact_top(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product in numpy (independent of faiss)."""
    scores = queries @ x.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, axis=1), top


def recall(found: list[list[str]], truth_rows: np.ndarray, ids: list[str]) -> float:
    k = truth_rows.shape[1]
    return float(np.mean([len(set(f) & {ids[j] for j in t}) / k for f, t in zip(found, truth_rows, strict=True)]))


@pytest.fixture(scope="module")
def small() -> dict[str, Any]:
    return {"x": mixture(N_SMALL, seed=1), "ids": ids_for(N_SMALL), "q": mixture(50, seed=2)}


@pytest.fixture(scope="module")
def large() -> dict[str, Any]:
    return {"x": mixture(N_LARGE, seed=3), "ids": ids_for(N_LARGE), "q": mixture(200, seed=4)}


@pytest.fixture(scope="module")
def flat_dir(small: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flat")
    build_index(small["x"], small["ids"], small["q"], out, IndexConfig(kind="flat", **FAST))
    return out


@pytest.fixture(scope="module")
def ivf(large: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_index(large["x"], large["ids"], large["q"], tmp_path_factory.mktemp("ivf"),
                       IndexConfig(kind="ivf", **FAST), parent={"item_tower_run": "run-1"})


@pytest.fixture(scope="module")
def hnsw(large: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_index(large["x"], large["ids"], large["q"], tmp_path_factory.mktemp("hnsw"),
                       IndexConfig(kind="hnsw", **FAST))


def copy_version(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- Flat and auto ---------------------------------------------------------------------------------


def test_flat_is_exact_and_writes_a_checksummed_version(small: dict[str, Any], flat_dir: Path) -> None:
    meta = json.loads((flat_dir / "index.json").read_text())
    assert sorted(p.name for p in flat_dir.iterdir()) == ["index.faiss", "index.json", "item_ids.parquet"]
    assert meta["kind"] == "flat" and meta["metric"] == "inner_product"
    assert (meta["dim"], meta["n_items"], meta["k"]) == (DIM, N_SMALL, K)
    assert meta["recall_at_k"] == 1.0 and meta["target_reached"] is True
    assert meta["sha256"] == {"index.faiss": file_sha256(flat_dir / "index.faiss"),
                              "item_ids.parquet": file_sha256(flat_dir / "item_ids.parquet")}
    assert meta["memory_bytes"] == (flat_dir / "index.faiss").stat().st_size
    assert meta["threads_for_latency"] == 1 and meta["gpu"] is False and meta["parent"] is None
    assert 0 < meta["latency_ms_p50"] <= meta["latency_ms_p99"]
    assert meta["faiss_version"] == faiss.__version__ and meta["created_at"].endswith("+00:00")
    assert pd.read_parquet(flat_dir / "item_ids.parquet")["item_id"].tolist() == small["ids"]

    loaded = load_index(flat_dir)
    scores, found = loaded.search(small["q"], 10)
    want_scores, want_rows = exact_top(small["x"], small["q"], 10)
    assert found == [[small["ids"][j] for j in row] for row in want_rows]
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_build_returns_meta_and_paths(small: dict[str, Any], tmp_path: Path) -> None:
    out = build_index(small["x"], small["ids"], small["q"], tmp_path / "v1", IndexConfig(kind="flat", **FAST),
                      parent={"run_id": "r1"})
    assert out["index_dir"] == str(tmp_path / "v1")
    assert out["index_path"] == str(tmp_path / "v1" / "index.faiss")
    assert out["meta_path"] == str(tmp_path / "v1" / "index.json")
    on_disk = json.loads(Path(out["meta_path"]).read_text())
    assert {k: v for k, v in out.items() if k not in ("index_dir", "index_path", "meta_path")} == on_disk
    assert on_disk["parent"] == {"run_id": "r1"}


def test_rebuild_into_the_same_directory_replaces_the_version(small: dict[str, Any], tmp_path: Path) -> None:
    first = build_index(small["x"], small["ids"], small["q"], tmp_path, IndexConfig(kind="flat", **FAST))
    half = N_SMALL // 2
    second = build_index(small["x"][:half], small["ids"][:half], small["q"], tmp_path,
                         IndexConfig(kind="flat", **FAST))
    assert second["sha256"] != first["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss", "index.json", "item_ids.parquet"]
    assert len(load_index(tmp_path).item_ids) == half


def test_auto_picks_flat_for_a_small_catalogue(small: dict[str, Any], tmp_path: Path) -> None:
    meta = build_index(small["x"], small["ids"], small["q"], tmp_path, IndexConfig(kind="auto", **FAST))
    assert meta["kind"] == "flat" and meta["requested_kind"] == "auto"
    assert "candidates" not in meta


def test_auto_above_flat_max_tunes_ivf_and_hnsw_and_keeps_the_faster(small: dict[str, Any], tmp_path: Path) -> None:
    meta = build_index(small["x"], small["ids"], small["q"], tmp_path,
                       IndexConfig(kind="auto", flat_max_items=1_000, **FAST))
    cands = {c["kind"]: c for c in meta["candidates"]}
    assert set(cands) == {"ivf", "hnsw"}
    assert "nprobe" in cands["ivf"] and "ef_search" in cands["hnsw"]
    reached = [c for c in cands.values() if c["target_reached"]]
    assert reached, cands
    best = min(reached, key=lambda c: c["latency_ms_p99"])
    assert meta["kind"] == best["kind"] and meta["latency_ms_p99"] == best["latency_ms_p99"]
    assert load_index(tmp_path).meta["kind"] == best["kind"]


# --- tuned IVF and HNSW ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ivf", "hnsw"])
def test_tuning_reaches_the_recall_target(name: str, request: pytest.FixtureRequest, large: dict[str, Any]) -> None:
    meta = request.getfixturevalue(name)
    assert meta["kind"] == name and meta["n_items"] == N_LARGE
    assert meta["recall_at_k"] >= 0.95 and meta["target_reached"] is True
    if name == "ivf":
        assert meta["nprobe"] > 1 and meta["nlist"] == round(4 * np.sqrt(N_LARGE))
        assert meta["parent"] == {"item_tower_run": "run-1"}
    else:
        assert meta["ef_search"] >= K and meta["hnsw_m"] == FAST["hnsw_m"]
    assert meta["latency_ms_p99"] > 0 and meta["build_seconds"] > 0 and meta["memory_bytes"] > 0

    # The loaded version carries the tuned parameter: its recall on the same queries, measured here
    # against numpy brute force, is the recorded figure.
    loaded = load_index(meta["index_dir"])
    if name == "ivf":
        assert faiss.extract_index_ivf(loaded.index).nprobe == meta["nprobe"]
    else:
        assert loaded.index.hnsw.efSearch == meta["ef_search"]
    _, truth = exact_top(large["x"], large["q"], K)
    _, found = loaded.search(large["q"], K)
    assert recall(found, truth, large["ids"]) == pytest.approx(meta["recall_at_k"], abs=1e-9)


def test_unreachable_target_is_recorded_and_warned(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    x, q = mixture(20_000, seed=5), mixture(50, seed=6)
    cfg = IndexConfig(kind="hnsw", target_recall=1.0, k=K, max_tuning_queries=50, latency_queries=20, hnsw_m=2,
                      hnsw_ef_construction=8)
    with caplog.at_level(logging.WARNING, logger="pipeline_tasks.online.index"):
        meta = build_index(x, ids_for(len(x)), q, tmp_path, cfg)
    assert meta["target_reached"] is False and meta["recall_at_k"] < 1.0
    assert meta["ef_search"] >= K
    assert any("stays below the target" in r.getMessage() for r in caplog.records)


def test_latency_measurement_restores_the_thread_count(small: dict[str, Any], tmp_path: Path) -> None:
    before = faiss.omp_get_max_threads()
    build_index(small["x"], small["ids"], small["q"], tmp_path, IndexConfig(kind="hnsw", **FAST))
    assert faiss.omp_get_max_threads() == before


# --- loading and searching -------------------------------------------------------------------------


def test_load_round_trip_gives_the_same_ids_and_results(small: dict[str, Any], flat_dir: Path) -> None:
    first, second = load_index(flat_dir), load_index(flat_dir)
    assert isinstance(first, ItemIndex)
    assert first.item_ids.dtype == object and first.item_ids.tolist() == small["ids"]
    assert first.sha256 == json.loads((flat_dir / "index.json").read_text())["sha256"]
    s1, f1 = first.search(small["q"], K)
    s2, f2 = second.search(small["q"], K)
    assert f1 == f2
    np.testing.assert_array_equal(s1, s2)
    assert first.search(small["q"][0], 5)[1][0] == f1[0][:5]  # a single 1-D query works too


def test_exclude_drops_items_and_still_returns_k(small: dict[str, Any], flat_dir: Path) -> None:
    index = load_index(flat_dir)
    _, full = index.search(small["q"], 13)
    exclude = [set(row[:3]) | {"not-an-item"} for row in full]
    scores, found = index.search(small["q"], 10, exclude=exclude)
    assert found == [row[3:13] for row in full]
    assert all(not set(f) & e for f, e in zip(found, exclude, strict=True))
    assert scores.shape == (len(small["q"]), 10) and np.all(np.diff(scores, axis=1) <= 1e-6)
    with pytest.raises(ValueError, match="one collection of item ids per query"):
        index.search(small["q"], 10, exclude=[set()])


def test_search_pads_when_fewer_items_remain(small: dict[str, Any], tmp_path: Path) -> None:
    build_index(small["x"][:5], small["ids"][:5], small["q"], tmp_path, IndexConfig(kind="flat", **FAST))
    scores, found = load_index(tmp_path).search(small["q"][:2], 4, exclude=[{small["ids"][0]}, set()])
    assert [len(f) for f in found] == [4, 4]
    scores, found = load_index(tmp_path).search(small["q"][:1], 10)
    assert len(found[0]) == 5 and np.isneginf(scores[0, 5:]).all()


# --- checksums -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["index.faiss", "item_ids.parquet"])
def test_a_flipped_byte_is_refused(name: str, flat_dir: Path, tmp_path: Path) -> None:
    version = copy_version(flat_dir, tmp_path / "v")
    path = version / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    expected = json.loads((version / "index.json").read_text())["sha256"][name]
    with pytest.raises(IndexChecksumError) as err:
        load_index(version)
    message = str(err.value)
    assert name in message and expected in message and file_sha256(path) in message
    assert "rebuilt" in message and "build_index" in message


@pytest.mark.parametrize("name", ["index.faiss", "item_ids.parquet", "index.json"])
def test_a_missing_file_is_refused(name: str, flat_dir: Path, tmp_path: Path) -> None:
    version = copy_version(flat_dir, tmp_path / "v")
    (version / name).unlink()
    with pytest.raises(IndexChecksumError, match=f"{name}.*missing.*rebuilt"):
        load_index(version)


# --- incremental versions --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ivf", "hnsw"])
def test_add_items_writes_a_new_version_and_keeps_the_base(
    name: str, request: pytest.FixtureRequest, large: dict[str, Any], tmp_path: Path
) -> None:
    base = request.getfixturevalue(name)
    base_dir = Path(base["index_dir"])
    before = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    new_x, new_ids = mixture(500, seed=7), ids_for(500, prefix="new")

    out = add_items(base_dir, new_x, new_ids, tmp_path / "v2", queries=large["q"])

    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == before
    assert out["kind"] == name and out["n_items"] == N_LARGE + 500 and out["added_items"] == 500
    assert out["sha256"]["index.faiss"] != base["sha256"]["index.faiss"]
    assert out["parent"] == {"index_dir": str(base_dir), "sha256": base["sha256"], "n_items": N_LARGE}
    assert out["recall_measured"] is True and out["recall_at_k"] >= 0.95 and out["target_reached"] is True
    if name == "ivf":
        assert out["nlist"] == base["nlist"]
    loaded = load_index(tmp_path / "v2")
    assert loaded.item_ids.tolist() == large["ids"] + new_ids
    _, found = loaded.search(new_x[:20], 5)
    assert [row[0] for row in found] == new_ids[:20]  # a new item's own vector finds it first


def test_add_items_without_queries_keeps_the_search_parameter(ivf: dict[str, Any], tmp_path: Path) -> None:
    out = add_items(ivf["index_dir"], mixture(10, seed=8), ids_for(10, prefix="more"), tmp_path)
    assert out["nprobe"] == ivf["nprobe"] and out["recall_at_k"] is None and out["recall_measured"] is False
    assert out["target_reached"] is None and out["latency_ms_p99"] is None
    assert faiss.extract_index_ivf(load_index(tmp_path).index).nprobe == ivf["nprobe"]


def test_add_items_to_flat_chains_versions(small: dict[str, Any], flat_dir: Path, tmp_path: Path) -> None:
    v2 = add_items(flat_dir, mixture(3, seed=9), ["a", "b", "c"], tmp_path / "v2")
    v3 = add_items(tmp_path / "v2", mixture(2, seed=10), ["d", "e"], tmp_path / "v3")
    assert v3["parent"]["sha256"] == v2["sha256"] and v3["n_items"] == N_SMALL + 5
    assert v2["recall_at_k"] == 1.0
    assert load_index(tmp_path / "v3").item_ids.tolist()[-5:] == ["a", "b", "c", "d", "e"]


def test_add_items_rejects_known_ids_and_the_base_directory(small: dict[str, Any], flat_dir: Path,
                                                            tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"already in the base index.*item-7"):
        add_items(flat_dir, mixture(2, seed=11), ["fresh", "item-7"], tmp_path / "v2")
    with pytest.raises(ValueError, match="is the base directory"):
        add_items(flat_dir, mixture(1, seed=12), ["fresh"], flat_dir)
    with pytest.raises(ValueError, match="dimension 8 but the base index has 64"):
        add_items(flat_dir, np.ones((1, 8), dtype=np.float32), ["fresh"], tmp_path / "v3")
    assert not (tmp_path / "v2").exists()


def test_add_items_refuses_a_corrupt_base(flat_dir: Path, tmp_path: Path) -> None:
    base = copy_version(flat_dir, tmp_path / "base")
    (base / "item_ids.parquet").write_bytes(b"not parquet")
    with pytest.raises(IndexChecksumError, match="item_ids.parquet"):
        add_items(base, mixture(1, seed=13), ["fresh"], tmp_path / "v2")


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ids": ids_for(N_SMALL - 1)}, "item_ids has 1999 entries but embeddings have 2000 rows"),
        ({"ids": ["dup", *ids_for(N_SMALL - 2), "dup"]}, r"1 ids occur more than once \(first: \['dup'\]\)"),
        ({"ids": ["", *ids_for(N_SMALL - 1)]}, r"item_ids\[0\] is an empty string"),
        ({"ids": [7, *ids_for(N_SMALL - 1)]}, r"item_ids\[0\] is int 7, not str; convert"),
        ({"q": np.ones((3, 32), dtype=np.float32)}, "queries have dimension 32 but embeddings have 64"),
        ({"x": np.ones(N_SMALL, dtype=np.float32)}, "embeddings must be a 2-D array"),
        ({"x": np.full((N_SMALL, DIM), np.nan)}, "2000 rows hold NaN or infinite values"),
        ({"config": IndexConfig(kind="lsh")}, "kind='lsh' is not one of auto, flat, ivf, hnsw"),
        ({"config": IndexConfig(target_recall=1.5)}, r"target_recall=1.5 must be in \(0, 1\]"),
    ],
)
def test_bad_input_is_refused_with_a_helpful_message(change: dict[str, Any], message: str, small: dict[str, Any],
                                                     tmp_path: Path) -> None:
    args = {"x": small["x"], "ids": small["ids"], "q": small["q"], "config": IndexConfig(kind="flat", **FAST)}
    args.update(change)
    with pytest.raises(ValueError, match=message):
        build_index(args["x"], args["ids"], args["q"], tmp_path, args["config"])
    assert not (tmp_path / "index.json").exists()


def test_float64_and_non_contiguous_input_is_converted(small: dict[str, Any], tmp_path: Path) -> None:
    x64 = np.asfortranarray(small["x"].astype(np.float64))
    meta = build_index(x64, np.array(small["ids"]), small["q"].astype(np.float64), tmp_path,
                       IndexConfig(kind="flat", **FAST))
    assert meta["n_items"] == N_SMALL and load_index(tmp_path).search(small["q"][:1], 1)[1][0]


# --- GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gpu_build_matches_cpu(kind: str, large: dict[str, Any], tmp_path: Path) -> None:
    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss sees no GPU (faiss-cpu installed or no CUDA device)")
    cfg = IndexConfig(kind=kind, **FAST)
    cpu = build_index(large["x"], large["ids"], large["q"], tmp_path / "cpu", replace(cfg, use_gpu=False))
    gpu = build_index(large["x"], large["ids"], large["q"], tmp_path / "gpu", replace(cfg, use_gpu=True))
    assert gpu["gpu"] is True and cpu["gpu"] is False
    assert gpu["recall_at_k"] >= 0.95 and gpu["target_reached"] is True
    _, truth = exact_top(large["x"], large["q"], K)
    on_gpu = load_index(gpu["index_dir"], use_gpu=True)
    _, found = on_gpu.search(large["q"], K)
    if kind == "flat":
        _, cpu_found = load_index(cpu["index_dir"], use_gpu=False).search(large["q"], K)
        assert recall(found, truth, large["ids"]) == pytest.approx(1.0, abs=1e-3)
        assert recall(cpu_found, truth, large["ids"]) == pytest.approx(1.0, abs=1e-3)
    else:
        assert recall(found, truth, large["ids"]) >= 0.95
