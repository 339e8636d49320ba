"""Index extensions of a bundle (layout, parent chain, checksums, never overwritten) and the refresh's input
checks. Pure files here (a bundle directory without a registry); the registry and the two-tower model are in
test_refresh_bundles.py, the DAG run in tests/integration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.core.errors import InvalidParamsError, VersionExistsError
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.online.bundle import Bundle
from pipeline_tasks.online.index import (
    IndexChecksumError,
    extension_dir,
    extension_dirs,
    file_sha256,
    load_index,
    load_serving_index,
    serving_index_dir,
)
from pipeline_tasks.retrieval import refresh
from pipeline_tasks.retrieval.index_build import IndexConfig, build_index
from pipeline_tasks.retrieval.refresh import (
    _valid_ids,
    bundle_catalog,
    catalog_items,
    refresh_items,
    write_extension,
)

DIM = 16


def _unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _bundle(tmp_path: Path, name: str = "recsys_test", version: int = 1, n: int = 50) -> Bundle:
    """A bundle directory with its own index (as ``register`` assembles it), not registered anywhere."""
    path = tmp_path / "bundles" / f"{name}_v{version}"
    meta = build_index(_unit(n, version), [f"i{k:03d}" for k in range(n)], _unit(20, 99), path / "index",
                       IndexConfig(kind="flat", k=10), parent={"run_id": "manual__1", "source": "synthetic",
                                                                "synthetic": {"n_items": n, "seed": 1}})
    bundle_meta = {"run_id": "manual__1", "index": {"sha256": meta["sha256"], "kind": "flat", "n_items": n}}
    (path / "bundle.json").write_text(json.dumps(bundle_meta))
    return Bundle(name, version, path, bundle_meta, {}, ["champion"])


def _extend(bundle: Bundle, settings: Settings, ids: list[str], seed: int) -> dict:
    base = serving_index_dir(bundle, settings)
    with refresh.index_lock(settings):
        return write_extension(bundle, base, _unit(len(ids), seed), ids, settings, {"source": "test"})


def _bundle_files(bundle: Bundle) -> dict[str, str]:
    return {str(p.relative_to(bundle.path)): file_sha256(p) for p in sorted(Path(bundle.path).rglob("*"))
            if p.is_file()}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings({"RECSYS_HOME": str(tmp_path / "home")})


def test_invalid_and_duplicate_item_ids_are_rejected_with_a_reason():
    items = pd.DataFrame({"item_id": ["a", "a", "", "bad\x07id", "x" * 129, None, "b"], "title": list("1234567")})
    ok, rejected = _valid_ids(items)
    assert ok["item_id"].tolist() == ["a", "b"]
    assert len(ok) + len(rejected) == len(items)  # nothing lost
    assert rejected["reason"].tolist() == ["duplicate_item_id"] + ["invalid_item_id"] * 4


def test_extension_layout(settings):
    assert extension_dir("recsys_default", 3, 2, settings) == settings.index_dir / "recsys_default" / "v0003" / "r0002"
    with pytest.raises(ValueError, match=">= 1"):
        extension_dir("recsys_default", 3, 0, settings)
    assert extension_dirs("recsys_default", 3, settings) == []


def test_extensions_chain_back_to_the_bundle_and_leave_it_untouched(tmp_path, settings):
    bundle = _bundle(tmp_path)
    before = _bundle_files(bundle)
    assert serving_index_dir(bundle, settings) == bundle.path / "index"  # nothing extended yet

    first = _extend(bundle, settings, ["new_a", "new_b"], seed=10)
    r1 = extension_dir(bundle.name, bundle.version, 1, settings)
    assert first["index_dir"] == str(r1) and first["extension"] == 1 and first["n_items"] == 52
    bundle_sha = json.loads((bundle.path / "index" / "index.json").read_text())["sha256"]
    assert first["parent"]["sha256"] == bundle_sha
    assert first["parent"]["index_dir"] == str(bundle.path / "index")
    assert first["parent"]["bundle"] == {"name": "recsys_test", "version": 1}
    assert first["sha256"]["index.faiss"] != bundle_sha["index.faiss"]  # its own checksum
    assert serving_index_dir(bundle, settings) == r1

    second = _extend(bundle, settings, ["new_c"], seed=11)
    r2 = extension_dir(bundle.name, bundle.version, 2, settings)
    assert second["parent"]["index_dir"] == str(r1) and second["parent"]["sha256"] == first["sha256"]
    assert serving_index_dir(bundle, settings) == r2
    assert extension_dirs(bundle.name, bundle.version, settings) == [r1, r2]

    index = load_serving_index(bundle, settings, use_gpu=False)
    assert index.index_dir == r2 and len(index.item_ids) == 53
    assert {"new_a", "new_b", "new_c"} <= set(index.item_ids.tolist())
    _, top = index.search(_unit(1, 11), 1)  # new_c's own vector finds it
    assert top[0] == ["new_c"]
    load_index(r1)  # the earlier extension still verifies
    assert _bundle_files(bundle) == before  # the bundle is immutable
    assert not list(r2.parent.glob("*.tmp-*"))  # nothing half-written left behind


def test_extensions_are_never_overwritten_and_only_extend_the_newest_link(tmp_path, settings, monkeypatch):
    bundle = _bundle(tmp_path)
    _extend(bundle, settings, ["new_a"], seed=10)
    r1 = extension_dir(bundle.name, bundle.version, 1, settings)
    files = {p.name: file_sha256(p) for p in r1.iterdir()}
    with pytest.raises(ValueError, match="newest"):  # the bundle's index is no longer the newest link
        write_extension(bundle, bundle.path / "index", _unit(1, 3), ["new_b"], settings)
    # A writer that read the chain before r0001 appeared (outside the lock) is refused, and r0001 stays as it was.
    monkeypatch.setattr(refresh, "extension_dirs", lambda *args, **kwargs: [])
    with pytest.raises(VersionExistsError, match="never overwritten"):
        write_extension(bundle, bundle.path / "index", _unit(1, 3), ["new_b"], settings)
    assert {p.name: file_sha256(p) for p in r1.iterdir()} == files


def test_a_broken_chain_is_refused_with_what_to_do(tmp_path, settings):
    bundle = _bundle(tmp_path)
    _extend(bundle, settings, ["new_a"], seed=10)
    _extend(bundle, settings, ["new_b"], seed=11)
    r1, r2 = extension_dirs(bundle.name, bundle.version, settings)

    # Bytes of the newest extension changed: the chain's records still agree, loading refuses the file.
    data = bytearray((r2 / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (r2 / "index.faiss").write_bytes(bytes(data))
    assert serving_index_dir(bundle, settings) == r2
    with pytest.raises(IndexChecksumError, match=r"sha256 mismatch.*move r0002.*falls back to .*r0001.*recsys refresh"):
        load_serving_index(bundle, settings)
    shutil.rmtree(r2)  # what the message says to do: serving falls back to r0001
    assert serving_index_dir(bundle, settings) == r1

    # An extension rewritten on another base: its parent checksum no longer matches the bundle's index.
    meta = json.loads((r1 / "index.json").read_text())
    meta["parent"]["sha256"] = {"index.faiss": "0" * 64, "item_ids.parquet": "0" * 64}
    (r1 / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexChecksumError, match=r"r0001: its parent sha256 .* differs .*move r0001"):
        serving_index_dir(bundle, settings)

    # An extension of another bundle version copied in.
    other = _bundle(tmp_path, version=2)
    shutil.rmtree(r1)
    _extend(other, settings, ["new_a"], seed=10)
    shutil.copytree(extension_dir(other.name, 2, 1, settings), r1)
    with pytest.raises(IndexChecksumError, match="names bundle .*version': 2.*not recsys_test version 1"):
        serving_index_dir(bundle, settings)

    # A gap in the numbering: r0002 without r0001.
    shutil.rmtree(r1)
    shutil.copytree(extension_dir(other.name, 2, 1, settings), r2)
    with pytest.raises(IndexChecksumError, match="expected r0001"):
        serving_index_dir(bundle, settings)


def test_a_replaced_bundle_index_is_refused(tmp_path, settings):
    bundle = _bundle(tmp_path)
    built = build_index(_unit(50, 7), [f"i{k:03d}" for k in range(50)], _unit(20, 99), tmp_path / "other",
                        IndexConfig(kind="flat", k=10))
    shutil.rmtree(bundle.path / "index")
    shutil.copytree(built["index_dir"], bundle.path / "index")  # self-consistent files, not the registered ones
    with pytest.raises(IndexChecksumError, match="was registered with .*re-register"):
        serving_index_dir(bundle, settings)


def test_refresh_without_a_registered_model_says_what_to_do(tmp_path, settings):
    out = refresh_items(tmp_path, source=None, settings=settings)
    assert out["status"] == "no_model" and "recsys_training" in out["message"]
    assert out["added"] == 0 and out["aliases"] == []


def test_a_bundle_names_its_training_catalog(tmp_path):
    bundle = _bundle(tmp_path)
    assert bundle_catalog(bundle) == {"source": "synthetic", "synthetic": {"n_items": 50, "seed": 1}}
    meta = json.loads((bundle.path / "index" / "index.json").read_text())
    meta["parent"] = None  # an index without provenance: the run config in bundle.json is the fallback
    (bundle.path / "index" / "index.json").write_text(json.dumps(meta))
    bundle.meta["config"] = {"source": str(tmp_path / "shop")}
    assert bundle_catalog(bundle) == {"source": str(tmp_path / "shop")}
    bundle.meta.pop("config")
    with pytest.raises(InvalidParamsError, match="--source"):
        bundle_catalog(bundle)


def test_catalog_items_from_a_file(tmp_path):
    pd.DataFrame({"item_id": ["i1", "i2"], "title": ["a", "b"], "category": ["c", None]}).to_csv(
        tmp_path / "items.csv", index=False)
    items = catalog_items(str(tmp_path / "items.csv"))
    assert items["item_id"].tolist() == ["i1", "i2"]
    assert "available" in items


def test_the_catalog_recipe_reproduces_a_runs_catalog(tmp_path, monkeypatch):
    """The refresh reads the catalog the model was trained from: synthetic settings or an absolute location."""
    from pipeline_tasks.retrieval.refresh import catalog_recipe

    settings = {"n_users": 50, "n_items": 77, "n_days": 10, "n_events": 2000, "seed": 3, "faults": "none"}
    recipe = catalog_recipe("synthetic", settings)
    items = catalog_items(recipe["source"], recipe["synthetic"])
    assert len(items) == 77 and len(catalog_items("synthetic")) != 77  # not the default generator's catalog
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shop").mkdir()
    assert catalog_recipe("shop") == {"source": str(tmp_path / "shop")}  # survives another working directory
    assert catalog_recipe("movielens:ml") == {"source": f"movielens:{tmp_path / 'ml'}"}
