"""The hourly item refresh for real: a training run on a contract directory registers its bundle as the champion,
new items are added to the catalog, `recsys_item_refresh` runs in `airflow dags test`, and the new items are
retrievable from a new index extension of the champion (own checksum, parent = the bundle) while the bundle itself
stays as registered — a cold item reaches the top 20 of a user whose taste matches its category and not of a
control user with another taste."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_tasks.online.index import (
    IndexChecksumError,
    extension_dir,
    file_sha256,
    load_index,
    load_serving_index,
    serving_index_dir,
)

pytestmark = pytest.mark.integration

# Spark/Feast are exercised by test_training_dag; here the towers train on the bare interactions.
SKIP_FEATURES = ["--mark-success", "build_features|feast_apply|materialize|training_set|drift_check"]
# A small catalog: the batch-inclusion log-Q correction (plain log q over-corrects when most items are in
# every batch and buries a taste under popular items); id dropout teaches the item tower to do without ids.
TWO_TOWER = {"base": {"max_epochs": 12, "patience": 3, "lr": 0.002, "dropout": 0.1, "id_dropout": 0.3},
             "grid": [{"logq": "batch"}], "mf_grid": [{"lr": 0.005}], "content_method": "minilm", "n_boot": 200}
# CI-sized ranking; a pool well below the 180-item catalog, and the gate on NDCG@10 alone (a pool that holds
# nearly every item ties popularity's recall@N, which the first model must strictly beat).
CANDIDATES = {"pool_size": 50}
RANKER = {"n_trials": 4, "timeout_s": 60}
GATE = {"metrics": ["ndcg@10"]}


def _entry(out: dict | list, model: str) -> dict:
    """The refresh's (or publish's list's) entry for ``model`` (the session's registry may hold other models too)."""
    entries = [e for e in (out if isinstance(out, list) else out["aliases"]) if e["name"] == model]
    assert len(entries) == 1, out
    return entries[0]


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


THEMES = {
    "jazz": ["saxophone", "trumpet", "swing", "bebop", "blues", "piano trio"],
    "horror": ["haunted house", "zombie", "vampire", "ghost story", "slasher", "monster"],
    "cooking": ["pasta recipes", "baking bread", "grilling", "vegan kitchen", "spices", "desserts"],
    "football": ["world cup", "goalkeeper", "premier league", "tactics", "striker", "stadium"],
    "gardening": ["roses", "vegetable patch", "compost", "orchids", "lawn care", "herb garden"],
    "space": ["mars rover", "black holes", "rocket launch", "galaxies", "astronauts", "telescope"],
}


def _catalog_source(src: Path, seed: int = 5) -> pd.DataFrame:
    """A contract directory where each user keeps to one theme (85 % of their items) and items of a theme
    are described in its words: a taste the model can learn, with a known answer."""
    rng = np.random.default_rng(seed)
    items = []
    for theme, words in THEMES.items():
        for k in range(30):
            w = words[k % len(words)]
            items.append({"item_id": f"{theme}_{k:02d}", "title": f"{w.title()} vol. {k}",
                          "category": theme, "genres": theme, "description": f"All about {w}: a {theme} title."})
    items = pd.DataFrame(items)
    themes = list(THEMES)
    rows = []
    start = pd.Timestamp("2025-01-01", tz="UTC")
    for u in range(240):
        own = themes[u % len(themes)]
        for _ in range(int(rng.integers(25, 45))):
            theme = own if rng.random() < 0.85 else themes[int(rng.integers(len(themes)))]
            k = min(int(rng.zipf(1.3)) - 1, 29)
            rows.append({"user_id": f"u{u:03d}", "item_id": f"{theme}_{k:02d}", "event_type": "view",
                         "timestamp": start + pd.Timedelta(seconds=int(rng.integers(0, 60 * 86400)))})
    interactions = pd.DataFrame(rows)
    src.mkdir()
    interactions.to_parquet(src / "interactions.parquet", index=False)
    items.to_parquet(src / "items.parquet", index=False)
    return items


def test_refresh_makes_new_items_retrievable(run_recsys, tmp_path):
    from pipeline_tasks.online.bundle import load_bundle
    from pipeline_tasks.online.two_tower import load_model

    src = tmp_path / "catalog_source"
    items = _catalog_source(src)
    run = run_recsys("run", "--data", str(src), "--two-tower", json.dumps(TWO_TOWER), "--candidates",
                     json.dumps(CANDIDATES), "--ranker", json.dumps(RANKER), "--gate", json.dumps(GATE),
                     *SKIP_FEATURES, timeout=1500)
    assert run.returncode == 0, run.output[-4000:]
    assert run.manifest["tasks"]["train_two_tower"]["status"] == "success"
    built = run.manifest["tasks"]["build_index"]["outputs"]
    assert built["recall_at_k"] >= 0.95 and built["n_items"] == len(items)
    registered = run.manifest["tasks"]["register"]["outputs"]
    assert registered["gate"] == "passed" and registered["alias"] == "champion", registered
    model_name, version = registered["model"], registered["version"]
    bundle = load_bundle(model_name)  # what serving loads: the champion, from the registry's artifact store
    assert bundle.version == version and "champion" in bundle.aliases
    assert bundle.meta["index"]["sha256"] == built["sha256"]
    assert serving_index_dir(bundle) == bundle.path / "index"  # nothing extended yet
    assert not Path(bundle.path).is_relative_to(run.run_dir)  # clearing the run's tasks cannot change what serves
    registered_files = _files(bundle.path)

    # Nothing new yet: the refresh writes nothing.
    idle = run_recsys("refresh")
    assert idle.returncode == 0, idle.output[-4000:]
    idle_out = idle.manifest["tasks"]["refresh_items"]["outputs"]
    entry = _entry(idle_out, model_name)
    assert entry["status"] == "up_to_date" and entry["added"] == 0 and entry["aliases"] == ["champion"]
    assert entry["index_dir"] == str(bundle.path / "index")
    assert serving_index_dir(bundle) == bundle.path / "index"
    # ... but the version's services get their first published snapshot (the training source's data).
    first = _entry(idle.manifest["tasks"]["publish_snapshots"]["outputs"]["snapshots"], model_name)
    assert first["status"] == "published" and first["data_dir"] == str(src), first
    assert json.loads(Path(first["pointer"]).read_text())["snapshot"] == first["snapshot"]

    # A jazz fan and a control user who keeps to horror; two new items nobody has met yet.
    accepted = pd.read_parquet(run.run_dir / "validate" / "accepted" / "interactions.parquet")
    fan, control = "u000", "u001"  # user u keeps to theme u % 6: jazz, horror
    new_items = pd.DataFrame([
        {"item_id": "new_jazz_record", "title": "Saxophone Nights", "category": "jazz", "genres": "jazz",
         "description": "All about saxophone: a jazz title."},
        {"item_id": "new_space_book", "title": "Telescope Guide", "category": "space", "genres": "space",
         "description": "All about telescope: a space title."},
    ])
    pd.concat([items, new_items], ignore_index=True).to_parquet(src / "items.parquet", index=False)

    refreshed = run_recsys("refresh")
    assert refreshed.returncode == 0, refreshed.output[-4000:]
    out = refreshed.manifest["tasks"]["refresh_items"]["outputs"]
    assert out["status"] == "published" and out["added"] >= 2
    entry = _entry(out, model_name)
    extension = extension_dir(model_name, version, 1)
    assert entry["status"] == "published" and entry["added"] == 2 and entry["version"] == version
    assert entry["base_index_dir"] == str(bundle.path / "index") and entry["index_dir"] == str(extension)
    assert serving_index_dir(bundle) == extension
    assert entry["sha256"]["index.faiss"] != built["sha256"]["index.faiss"]  # its own checksum
    parent = load_index(extension).meta["parent"]
    assert parent["bundle"] == {"name": model_name, "version": version}
    assert parent["sha256"] == built["sha256"] and parent["index_dir"] == str(bundle.path / "index")
    assert _files(bundle.path) == registered_files  # the bundle is never edited
    # The new extension is published to running services: a new snapshot, pointed at, naming the extension.
    published = _entry(refreshed.manifest["tasks"]["publish_snapshots"]["outputs"]["snapshots"], model_name)
    assert published["status"] == "published" and published["changed"] == ["index_dir"], published
    assert published["index_dir"] == str(extension) and published["snapshot"] != first["snapshot"]
    assert json.loads(Path(published["pointer"]).read_text())["snapshot"] == published["snapshot"]
    served_items = pd.read_parquet(Path(published["snapshot"]) / "items.parquet")
    assert {"new_jazz_record", "new_space_book"} <= set(served_items["item_id"].astype(str))
    from pipeline_tasks.bundle.publish import publish_snapshot

    assert publish_snapshot(bundle, src)["status"] == "up_to_date"  # nothing new since: nothing written
    load_index(bundle.path / "index")  # ... and still verifies

    index = load_serving_index(bundle)
    assert {"new_jazz_record", "new_space_book"} <= set(index.item_ids.tolist())
    model = load_model(bundle.path / "serving" / "two_tower")  # the model that embedded the bundle's index
    assert model.info["trained_until"] == "as_of"  # the serving fit: the chosen config on every window
    users = [fan, control]
    queries = model.user_embeddings(users, accepted)
    seen = [set(accepted.loc[accepted["user_id"] == u, "item_id"]) for u in users]
    _, top = index.search(queries, 20, exclude=seen)
    assert "new_jazz_record" in top[0], f"cold jazz item not in the top 20 of jazz fan {fan}: {top[0]}"
    assert "new_jazz_record" not in top[1], f"cold jazz item in the top 20 of horror fan {control}: {top[1]}"

    # The request path serves it too: the serving fit plus the extension's items, as `recsys recommend` and the
    # service load them. The new item's two-tower vector retrieves it for the fan, not the control; it is servable
    # and reaches the ranker (whose list it may or may not top: it has no co-occurrence or trending signal yet).
    from pipeline_tasks.bundle.recommend import load_moment
    from pipeline_tasks.online.two_stage import ranked_lists

    as_of = pd.to_datetime(accepted["timestamp"], utc=True).max() + pd.Timedelta(seconds=1)
    fit, moment = load_moment(bundle, as_of, users, data_dir=src)
    assert fit.item_ids[-2:] == ["new_jazz_record", "new_space_book"]
    lists = ranked_lists(fit, moment, users, len(fit.item_ids), orders=("two_tower", "ranker"))
    retrieved = [[i for i, _ in lists["two_tower"][u]] for u in users]
    assert "new_jazz_record" in retrieved[0][:20], f"new jazz item not retrieved for jazz fan {fan}: {retrieved[0]}"
    assert "new_jazz_record" not in retrieved[1][:20], retrieved[1][:20]
    assert "new_jazz_record" in {i for i, _ in lists["ranker"][fan]}

    # A corrupted extension is refused by its checksum (serving says what to do); the files are put back after.
    path = extension / "index.faiss"
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        with pytest.raises(IndexChecksumError):
            load_index(extension)
        with pytest.raises(IndexChecksumError, match="recsys refresh"):
            load_serving_index(bundle)
    finally:
        path.write_bytes(original)
    assert np.isfinite(queries).all()
