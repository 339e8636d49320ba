"""Index version pointer and the refresh's input checks (pure logic; the DAG run is in tests/integration)."""

from __future__ import annotations

import pandas as pd

from pipeline_tasks.core.settings import load_settings
from pipeline_tasks.online.index import current_index, version_dir
from pipeline_tasks.retrieval.refresh import _valid_ids, catalog_items, publish, refresh_items


def test_invalid_and_duplicate_item_ids_are_rejected_with_a_reason():
    items = pd.DataFrame({"item_id": ["a", "a", "", "bad\x07id", "x" * 129, None, "b"], "title": list("1234567")})
    ok, rejected = _valid_ids(items)
    assert ok["item_id"].tolist() == ["a", "b"]
    assert len(ok) + len(rejected) == len(items)  # nothing lost
    assert rejected["reason"].tolist() == ["duplicate_item_id"] + ["invalid_item_id"] * 4


def test_publish_and_current_pointer(tmp_path):
    settings = load_settings({"RECSYS_HOME": str(tmp_path)})
    assert current_index(settings) is None
    settings.index_dir.mkdir(parents=True)
    target = version_dir("run_1", 2, settings)
    assert target == tmp_path / "indexes" / "run_1" / "v0002"
    publish({"index_dir": str(target), "version": 2, "sha256": {"index.faiss": "x"}}, settings)
    assert current_index(settings)["version"] == 2


def test_refresh_without_an_index_says_what_to_do(tmp_path):
    settings = load_settings({"RECSYS_HOME": str(tmp_path)})
    out = refresh_items(tmp_path, source=None, settings=settings)
    assert out["status"] == "no_index" and "recsys_training" in out["message"]


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
