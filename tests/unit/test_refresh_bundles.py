"""The hourly item refresh against a real registry: MLflow (SQLite under the test's home) holds bundles built from
a small real two-tower model; the refresh extends the index of every version a live alias points at, never
touches a bundle, chains extensions and refuses a corrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.bundle.registry import GateDecision, register_version
from pipeline_tasks.core.run_summary import key_figure
from pipeline_tasks.core.settings import Settings, load_settings
from pipeline_tasks.core.tracking import log_artifacts, mlflow_run
from pipeline_tasks.data.synthetic import FaultConfig, SyntheticConfig, generate
from pipeline_tasks.online.bundle import BUNDLE_FILE, load_bundle, model_name
from pipeline_tasks.online.index import (
    IndexChecksumError,
    extension_dir,
    extension_dirs,
    file_sha256,
    load_index,
    load_serving_index,
    serving_index_dir,
)
from pipeline_tasks.online.two_tower import TwoTowerConfig, TwoTowerModel
from pipeline_tasks.retrieval.content import embed_texts, item_texts
from pipeline_tasks.retrieval.index_build import IndexConfig, build_index
from pipeline_tasks.retrieval.refresh import catalog_recipe, refresh_items
from pipeline_tasks.retrieval.two_tower_training import fit

NAME = model_name("refresh_test")
HELD_BACK = 8  # catalog items the models never saw: they arrive after training
TINY = TwoTowerConfig(dim=16, id_dim=8, cat_dim=4, content_proj_dim=8, hidden=(32,), batch_size=128, max_epochs=2,
                      patience=1, eval_k=20)


@pytest.fixture(scope="module")
def world():
    """A synthetic catalog (the last items held back) and two tiny two-tower models trained on a few hundred
    interactions with hashed content embeddings (nothing downloads)."""
    tables = generate(SyntheticConfig(n_users=60, n_items=80, n_days=20, n_events=600, faults=FaultConfig())).tables
    items = tables.items.reset_index(drop=True)
    known, new = items.iloc[:-HELD_BACK].reset_index(drop=True), items.iloc[-HELD_BACK:].reset_index(drop=True)
    events = tables.interactions[tables.interactions["item_id"].isin(known["item_id"])].reset_index(drop=True)
    assert 300 <= len(events) <= 1000
    content, method = embed_texts(item_texts(known), method="hashed")
    models = [fit(events, known, tables.users, content, method, TwoTowerConfig.from_dict({**TINY.to_dict(),
                                                                                        "seed": seed}), epochs=2)
              for seed in (1, 2)]
    return {"known": known, "new": new, "events": events, "models": models}


def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECSYS_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RECSYS_ARTIFACT_ROOT", raising=False)
    return load_settings()


def _register(world: dict, model: TwoTowerModel, catalog: Path, tmp_path: Path, settings: Settings,
              decision: GateDecision, label: str) -> int:
    """Assemble a bundle as ``register`` does (index/ with provenance, serving/two_tower/, bundle.json), log it to
    an MLflow run and register it as a version."""
    bundle = tmp_path / f"bundle_{label}"
    users = sorted(world["events"]["user_id"].unique())[:30]
    provenance = {"model_dir": "serving/two_tower", "run_id": f"manual__{label}", "content_method": "hashed",
                  **catalog_recipe(str(catalog))}
    meta = build_index(model.item_embeddings(), model.encoder.item_ids, model.user_embeddings(users, world["events"]),
                       bundle / "index", IndexConfig(kind="flat", k=10), parent=provenance)
    model.save(bundle / "serving" / "two_tower")
    (bundle / BUNDLE_FILE).write_text(json.dumps({"run_id": f"manual__{label}", "namespace": "refresh_test",
                                                  "index": {"sha256": meta["sha256"], "kind": meta["kind"],
                                                            "n_items": meta["n_items"]}}))
    with mlflow_run("recsys_refresh_test", run_name=f"register {label}", settings=settings) as run:
        log_artifacts({"bundle": bundle})
        return register_version(NAME, f"{run.info.artifact_uri}/bundle", run.info.run_id,
                                {"recsys.run_id": f"manual__{label}"}, decision, settings)


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _write_catalog(path: Path, items: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    items.to_parquet(path, index=False)


def _run(tmp_path: Path, name: str, settings: Settings, source: str | None = None) -> tuple[dict, Path]:
    out = tmp_path / "runs" / name
    out.mkdir(parents=True)
    return refresh_items(out, source=source, settings=settings), out


def _by_version(result: dict) -> dict[int, dict]:
    return {e["version"]: e for e in result["aliases"]}


def _cold_vectors(model: TwoTowerModel, rows: pd.DataFrame) -> np.ndarray:
    return model.new_item_embeddings(rows, embed_texts(item_texts(rows), method="hashed")[0])


def test_the_refresh_extends_every_live_alias_and_never_a_bundle(world, tmp_path, monkeypatch):
    settings = _home(tmp_path, monkeypatch)
    catalog = tmp_path / "shop" / "items.parquet"
    _write_catalog(catalog, world["known"])
    champion_model, challenger_model = world["models"]
    assert _register(world, champion_model, catalog, tmp_path, settings,
                     GateDecision(passed=True, alias="champion", reason="test", comparisons={}), "a") == 1
    assert _register(world, challenger_model, catalog, tmp_path, settings,
                     GateDecision(passed=False, alias=None, reason="test: failed gate", comparisons={}), "b") == 2
    assert _register(world, challenger_model, catalog, tmp_path, settings,
                     GateDecision(passed=True, alias="challenger", reason="test", comparisons={}), "c") == 3
    bundles = {v: load_bundle(NAME, version=v, settings=settings) for v in (1, 3)}
    for bundle in bundles.values():  # read from the registry's artifact store, not from where it was assembled
        assert settings.mlflow_dir.resolve() in Path(bundle.path).resolve().parents
    models = {1: champion_model, 3: challenger_model}
    before = {v: _files(b.path) for v, b in bundles.items()}

    # Nothing new: nothing is written, each alias keeps its bundle's own index.
    idle, idle_dir = _run(tmp_path, "idle", settings)
    assert idle["status"] == "up_to_date" and idle["added"] == 0
    assert {v: (e["aliases"], e["status"]) for v, e in _by_version(idle).items()} == {
        1: (["champion"], "up_to_date"), 3: (["challenger"], "up_to_date")}  # version 2 has no alias
    assert not (idle_dir / "added_items.parquet").exists()
    for v, bundle in bundles.items():
        assert serving_index_dir(bundle, settings) == bundle.path / "index"
        assert extension_dirs(NAME, v, settings) == []

    # New items (and a row with an invalid id) arrive in the catalog the bundles were trained from.
    first_new, later_new = world["new"].iloc[:5], world["new"].iloc[5:]
    bad = world["new"].iloc[:1].assign(item_id="bad\x07id")
    _write_catalog(catalog, pd.concat([world["known"], first_new, bad], ignore_index=True))
    out, out_dir = _run(tmp_path, "first", settings)
    assert out["status"] == "published" and out["added"] == 5
    assert key_figure("refresh_items", {"outputs": out}) == "published, 5 new items"
    for v, bundle in bundles.items():
        entry = _by_version(out)[v]
        r1 = extension_dir(NAME, v, 1, settings)
        assert entry["status"] == "published" and entry["added"] == 5 and entry["index_dir"] == str(r1)
        assert entry["base_index_dir"] == str(bundle.path / "index") and entry["source"] == str(catalog)
        assert serving_index_dir(bundle, settings) == r1
        meta = json.loads((r1 / "index.json").read_text())
        assert meta["parent"]["bundle"] == {"name": NAME, "version": v}
        assert meta["parent"]["sha256"] == bundle.meta["index"]["sha256"]
        assert entry["sha256"] == meta["sha256"] != bundle.meta["index"]["sha256"]
        # The new items are retrievable: each one's cold-start vector finds it first.
        index = load_serving_index(bundle, settings)
        assert len(index.item_ids) == len(world["known"]) + 5
        _, top = index.search(_cold_vectors(models[v], first_new), 1)
        assert [t[0] for t in top] == first_new["item_id"].tolist()
    added = pd.read_parquet(out_dir / "added_items.parquet")
    assert sorted(zip(added["version"], added["item_id"], strict=True)) == sorted(
        (v, i) for v in (1, 3) for i in first_new["item_id"])
    assert pd.read_parquet(out_dir / "rejected_items.parquet")["reason"].tolist() == ["invalid_item_id"]
    assert {v: _files(b.path) for v, b in bundles.items()} == before  # bundles are immutable

    # More items (catalog named explicitly this time): r0002 extends r0001.
    _write_catalog(catalog, pd.concat([world["known"], first_new, later_new.iloc[:2]], ignore_index=True))
    again, _ = _run(tmp_path, "second", settings, source=str(catalog))
    assert again["status"] == "published" and again["added"] == 2
    for v, bundle in bundles.items():
        r1, r2 = extension_dir(NAME, v, 1, settings), extension_dir(NAME, v, 2, settings)
        assert _by_version(again)[v]["base_index_dir"] == str(r1)
        assert serving_index_dir(bundle, settings) == r2
        parent = json.loads((r2 / "index.json").read_text())["parent"]
        assert parent["index_dir"] == str(r1) and parent["sha256"] == load_index(r1).sha256
        assert len(load_serving_index(bundle, settings).item_ids) == len(world["known"]) + 7
    assert _run(tmp_path, "third", settings)[0]["status"] == "up_to_date"

    # A corrupted extension is refused; the other alias still gets the next new item.
    r2 = extension_dir(NAME, 1, 2, settings)
    data = bytearray((r2 / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (r2 / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexChecksumError, match="move r0002"):
        load_serving_index(bundles[1], settings)
    _write_catalog(catalog, pd.concat([world["known"], first_new, later_new], ignore_index=True))
    with pytest.raises(IndexChecksumError, match="sha256 mismatch"):
        _run(tmp_path, "corrupt", settings)
    assert serving_index_dir(bundles[3], settings) == extension_dir(NAME, 3, 3, settings)
    assert extension_dirs(NAME, 1, settings) == [extension_dir(NAME, 1, n, settings) for n in (1, 2)]
    assert {v: _files(b.path) for v, b in bundles.items()} == before
