"""The hourly item refresh for real: a training run on a contract directory builds the model and index,
new items are added to the catalog, `recsys_item_refresh` runs in `airflow dags test`, and the new items
are retrievable from a new index version (new checksum) — a cold item reaches the top 20 of a user whose
taste matches its category and not of a control user with another taste."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.index import IndexChecksumError, load_index
from pipeline_tasks.synthetic import FaultConfig, SyntheticConfig, generate

pytestmark = pytest.mark.integration

# Spark/Feast are exercised by test_training_dag; here the towers train on the bare interactions.
SKIP_FEATURES = ["--mark-success", "build_features|feast_apply|materialize|training_set|drift_check"]
TWO_TOWER = {"base": {"max_epochs": 12, "patience": 3}, "grid": [{"id_dropout": 0.3}], "mf_grid": [{}],
             "content_method": "minilm", "n_boot": 200}


def _current() -> dict:
    return json.loads((Path(os.environ["RECSYS_HOME"]) / "indexes" / "current.json").read_text())


def _taste(interactions: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Each user's share of interactions per category."""
    cat = interactions.merge(items[["item_id", "category"]], on="item_id")
    counts = cat.groupby(["user_id", "category"]).size().unstack(fill_value=0)
    return counts.div(counts.sum(axis=1), axis=0).assign(_n=counts.sum(axis=1))


def test_refresh_makes_new_items_retrievable(run_recsys, tmp_path):
    from pipeline_tasks.two_tower import load_model

    src = tmp_path / "catalog_source"
    tables = generate(SyntheticConfig(n_users=300, n_items=240, n_days=45, n_events=30_000, seed=11,
                                      faults=FaultConfig())).tables
    src.mkdir()
    tables.interactions.to_parquet(src / "interactions.parquet", index=False)
    tables.items.to_parquet(src / "items.parquet", index=False)
    tables.users.to_parquet(src / "users.parquet", index=False)

    run = run_recsys("run", "--data", str(src), "--two-tower", json.dumps(TWO_TOWER), *SKIP_FEATURES)
    assert run.returncode == 0, run.output[-4000:]
    assert run.manifest["tasks"]["train_two_tower"]["status"] == "success"
    built = run.manifest["tasks"]["build_index"]["outputs"]
    first = _current()
    assert first["version"] == 1 and first["index_dir"] == built["index_dir"]
    assert built["recall_at_k"] >= 0.95 and built["n_items"] == len(tables.items)

    # Nothing new yet: the refresh publishes nothing.
    idle = run_recsys("refresh")
    assert idle.returncode == 0, idle.output[-4000:]
    assert idle.manifest["tasks"]["refresh_items"]["outputs"]["status"] == "up_to_date"
    assert _current()["version"] == 1

    # Two users with clearly different tastes, and a new item in the first one's favourite category.
    accepted = pd.read_parquet(run.run_dir / "validate" / "accepted" / "interactions.parquet")
    taste = _taste(accepted, tables.items)
    taste = taste[taste["_n"] >= 30].drop(columns="_n")
    fan_cat = taste.max().idxmax()
    fan = taste[fan_cat].idxmax()
    control = taste[fan_cat].idxmin()
    assert taste.loc[fan, fan_cat] > 3 * taste.loc[control, fan_cat]
    template = tables.items[tables.items["category"] == fan_cat].iloc[0]
    new_items = pd.DataFrame([
        {**template.to_dict(), "item_id": "new_fan_item", "title": f"{template['title'].rsplit(' ', 1)[0]} 9001",
         "created_at": pd.Timestamp.now(tz="UTC")},
        {**template.to_dict(), "item_id": "new_item_2", "title": "brand new thing 9002",
         "category": "cat_00", "genres": "cat_00", "description": "A brand new thing from cat_00.",
         "created_at": pd.Timestamp.now(tz="UTC")},
    ])
    pd.concat([tables.items, new_items], ignore_index=True).to_parquet(src / "items.parquet", index=False)

    refreshed = run_recsys("refresh")
    assert refreshed.returncode == 0, refreshed.output[-4000:]
    out = refreshed.manifest["tasks"]["refresh_items"]["outputs"]
    assert out["status"] == "published" and out["added"] == 2
    second = _current()
    assert second["version"] == 2 and second["index_dir"] != first["index_dir"]
    assert second["sha256"]["index.faiss"] != first["sha256"]["index.faiss"]
    assert second["parent"] == {"index_dir": first["index_dir"], "sha256": first["sha256"]}
    load_index(first["index_dir"])  # the old version is intact (its checksums still verify)

    index = load_index(second["index_dir"])
    assert {"new_fan_item", "new_item_2"} <= set(index.item_ids.tolist())
    model = load_model(second["model_dir"])
    users = [fan, control]
    queries = model.user_embeddings(users, accepted)
    seen = [set(accepted.loc[accepted["user_id"] == u, "item_id"]) for u in users]
    _, top = index.search(queries, 20, exclude=seen)
    assert "new_fan_item" in top[0], f"cold {fan_cat} item not in the top 20 of {fan_cat} fan {fan}: {top[0]}"
    assert "new_fan_item" not in top[1], f"cold {fan_cat} item in the top 20 of control user {control}"

    # A corrupted version is refused by its checksum.
    path = Path(second["index_dir"]) / "index.faiss"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexChecksumError):
        load_index(second["index_dir"])
    assert np.isfinite(queries).all()
