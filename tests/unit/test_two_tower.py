"""Two-tower model: shapes, normalisation, loss, history without leakage, determinism, persistence, cold items."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline_tasks.data.split import SplitConfig, time_split
from pipeline_tasks.data.synthetic import FaultConfig, SyntheticConfig, generate
from pipeline_tasks.evaluation.metrics import targets
from pipeline_tasks.online.encoder import Encoder, first_interactions
from pipeline_tasks.online.two_tower import TwoTowerConfig, load_model
from pipeline_tasks.retrieval.content import embed_texts, item_texts
from pipeline_tasks.retrieval.two_tower_training import (
    Window,
    example_histories,
    fit,
    grid_configs,
    in_batch_softmax_loss,
    recall_at,
    recommend,
)

SMALL = TwoTowerConfig(dim=32, id_dim=16, cat_dim=8, content_proj_dim=16, hidden=(64,), batch_size=256,
                       max_epochs=3, patience=2, eval_k=50)


@pytest.fixture(scope="module")
def data():
    cfg = SyntheticConfig(n_users=200, n_items=300, n_days=30, n_events=15_000, faults=FaultConfig())
    tables = generate(cfg).tables
    windows = time_split(tables.interactions, SplitConfig())
    content, method = embed_texts(item_texts(tables.items), method="hashed")
    return tables, windows, content, method


@pytest.fixture(scope="module")
def trained(data):
    tables, w, content, method = data
    truth, _ = targets(w["train"], w["validation"])
    model = fit(w["train"], tables.items, tables.users, content, method, SMALL,
                validation=Window(w["train"], truth))
    return model


def test_loss_logq_and_accidental_hits():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    i = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    items = torch.tensor([1, 2, 3, 4])
    plain = in_batch_softmax_loss(u, i, items, torch.tensor(10.0), None)
    logits = 10.0 * u @ i.T
    assert torch.isclose(plain, torch.nn.functional.cross_entropy(logits, torch.arange(4)))
    # log-Q: a popular item (high q) is penalised as a negative -> loss changes.
    log_q = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    corrected = in_batch_softmax_loss(u, i, items, torch.tensor(10.0), log_q)
    assert torch.isclose(corrected, torch.nn.functional.cross_entropy(logits - log_q, torch.arange(4)))
    # The same item twice in a batch is not its own negative.
    dup = torch.tensor([1, 1, 3, 4])
    masked = in_batch_softmax_loss(u, i, dup, torch.tensor(10.0), None)
    m = logits.clone()
    m[0, 1] = m[1, 0] = float("-inf")
    assert torch.isclose(masked, torch.nn.functional.cross_entropy(m, torch.arange(4)))


def test_example_histories_only_look_back():
    ts = pd.to_datetime(["2025-01-01", "2025-01-02", "2025-01-03", "2025-01-01", "2025-01-04"], utc=True)
    ex = pd.DataFrame({"user_id": ["a", "a", "a", "b", "a"], "item_id": ["x", "y", "z", "x", "x"], "timestamp": ts})
    first = first_interactions(ex)  # the repeat of (a, x) is dropped
    assert len(first) == 4
    items = pd.DataFrame({"item_id": ["x", "y", "z"], "category": ["c1", "c2", "c1"]})
    enc = Encoder.fit(items, first, None, "hashed", 4)
    hist = example_histories(first, enc, history_len=3)
    rows = {(u, i): h for u, i, h in zip(first.user_id, first.item_id, hist.tolist(), strict=True)}
    ix = {v: k for k, v in enumerate(enc.item_ids, start=1)}
    assert rows[("a", "x")] == [0, 0, 0]  # nothing before the first event
    assert rows[("a", "y")] == [ix["x"], 0, 0]
    assert rows[("a", "z")] == [ix["y"], ix["x"], 0]  # newest first, never the item itself or later ones
    assert rows[("b", "x")] == [0, 0, 0]  # other users' events never leak in


def test_embeddings_are_normalised_with_expected_shapes(trained, data):
    tables, w, _, _ = data
    items = trained.item_embeddings()
    assert items.shape == (len(tables.items), SMALL.dim)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-5)
    users = trained.user_embeddings(["u000001", "u000002"], w["train"])
    assert users.shape == (2, SMALL.dim)
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, rtol=1e-5)
    assert trained.info["best_epoch"] >= 1 and trained.info["best_val_recall"] is not None
    # The temperature is learned: training moved it away from its initial value (1 / init_temperature).
    initial = 1.0 / SMALL.init_temperature
    assert abs(trained.net.scale.item() - initial) > 1e-3 * initial


def test_user_tower_reads_history_at_request_time(trained, data):
    """Events after training change the user's embedding: the tower reads the history, not a stored vector."""
    tables, w, _, _ = data
    user = w["train"]["user_id"].iloc[0]
    before = trained.user_embeddings([user], w["train"])
    later = pd.concat([w["train"], w["test"][w["test"]["user_id"] == user]], ignore_index=True)
    newer = pd.DataFrame({"user_id": [user] * 5, "item_id": tables.items["item_id"].iloc[:5],
                          "timestamp": pd.Timestamp("2030-01-01", tz="UTC"), "event_type": "view"})
    after = trained.user_embeddings([user], pd.concat([later, newer], ignore_index=True))
    assert not np.allclose(before, after)


def test_training_is_deterministic_with_a_seed(data):
    tables, w, content, method = data
    cfg = TwoTowerConfig.from_dict({**SMALL.to_dict(), "max_epochs": 1})
    a = fit(w["train"], tables.items, tables.users, content, method, cfg, epochs=1).item_embeddings()
    b = fit(w["train"], tables.items, tables.users, content, method, cfg, epochs=1).item_embeddings()
    np.testing.assert_array_equal(a, b)
    c = fit(w["train"], tables.items, tables.users, content, method,
            TwoTowerConfig.from_dict({**cfg.to_dict(), "seed": 7}), epochs=1).item_embeddings()
    assert not np.allclose(a, c)


def test_save_and_load_round_trip(trained, data, tmp_path):
    _, w, _, _ = data
    trained.save(tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    np.testing.assert_allclose(loaded.item_embeddings(), trained.item_embeddings(), atol=1e-6)
    users = ["u000003", "u000004"]
    np.testing.assert_allclose(loaded.user_embeddings(users, w["train"]), trained.user_embeddings(users, w["train"]),
                               atol=1e-6)


def test_new_item_is_embedded_from_content_alone(trained, data):
    tables, _, _, method = data
    known = tables.items.iloc[:1]
    new = known.assign(item_id="brand_new_item")
    content, _ = embed_texts(item_texts(new), method=method)
    cold = trained.new_item_embeddings(new, content)
    np.testing.assert_allclose(np.linalg.norm(cold, axis=1), 1.0, rtol=1e-5)
    warm = trained.item_embeddings()[:1]
    assert not np.allclose(cold, warm)  # the known item also has its id embedding
    assert float((cold @ warm.T)[0, 0]) > 0.5  # ... but the same content and category land nearby


def test_recommend_excludes_seen_items(trained, data):
    _, w, _, _ = data
    truth, seen = targets(w["train"], w["validation"])
    recs = recommend(trained, Window(w["train"], truth), None, k=20)
    assert recs and all(len(r) == 20 for r in recs.values())
    for user, items in recs.items():
        assert not set(items) & seen[user]


def test_mf_model_trains_the_same_way(data):
    """MF learns: after training it ranks the validation items far better than the same model untrained."""
    tables, w, content, method = data
    truth, _ = targets(w["train"], w["validation"])
    window = Window(w["train"], truth)
    # ids only and ~50 steps an epoch: MF needs a larger step size than the towers to move in 10 epochs
    mf_config = TwoTowerConfig.from_dict({**SMALL.to_dict(), "model": "mf", "id_dropout": 0.0, "lr": 0.01})
    mf = fit(w["train"], tables.items, tables.users, content, method, mf_config, epochs=10)
    emb = mf.item_embeddings()
    assert emb.shape == (len(tables.items), SMALL.dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    untrained = fit(w["train"], tables.items, tables.users, content, method, mf_config, epochs=0)
    assert recall_at(mf, window, None, k=50) > 1.4 * recall_at(untrained, window, None, k=50)


def test_grid_rejects_unknown_hyper_parameters():
    assert [c.id_dropout for c in grid_configs(SMALL, [{"id_dropout": 0.1}, {"id_dropout": 0.4}])] == [0.1, 0.4]
    with pytest.raises(ValueError, match="unknown two-tower hyper-parameters"):
        grid_configs(SMALL, [{"learning_rate": 0.1}])


ONLINE_PROBE = """
import json, os, sys
import pandas as pd
from pipeline_tasks.online.index import load_index
from pipeline_tasks.online.two_tower import load_model

model = load_model(sys.argv[1])
history = pd.read_parquet(sys.argv[3])
users = model.user_embeddings([sys.argv[4]], history)
_, ids = load_index(sys.argv[2]).search(users, k=10)
heavy = ("pyspark", "airflow", "optuna", "great_expectations", "evidently", "lightgbm.sklearn_optuna",
         "pipeline_tasks.retrieval", "pipeline_tasks.stages", "pipeline_tasks.features", "pipeline_tasks.data",
         "pipeline_tasks.evaluation")
loaded = sorted({m for m in sys.modules if m.split(".")[0] in heavy or m.startswith(heavy)})
print(json.dumps({"ids": ids[0], "loaded": loaded}), flush=True)
os._exit(0)  # torch's and faiss's OpenMP runtimes can abort at interpreter teardown; the answer is out
"""


def test_online_embeds_and_searches_without_training_or_pipeline_modules(trained, data, tmp_path):
    """A serving process (fresh interpreter) loads the model and an index through ``online`` alone."""
    import json
    import subprocess
    import sys

    from pipeline_tasks.retrieval.index_build import IndexConfig, build_index

    _, w, _, _ = data
    trained.save(tmp_path / "model")
    queries = trained.user_embeddings(sorted(w["train"]["user_id"].unique())[:50], w["train"])
    build_index(trained.item_embeddings(), trained.encoder.item_ids, queries, tmp_path / "index",
                IndexConfig(kind="flat", k=10))
    w["train"].to_parquet(tmp_path / "history.parquet")
    user = str(w["train"]["user_id"].iloc[0])
    res = subprocess.run([sys.executable, "-c", ONLINE_PROBE, str(tmp_path / "model"), str(tmp_path / "index"),
                          str(tmp_path / "history.parquet"), user], capture_output=True, text=True, check=False,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    expected = trained.user_embeddings([user], w["train"])
    _, local_ids = (lambda idx: idx.search(expected, k=10))(__import__(
        "pipeline_tasks.online.index", fromlist=["load_index"]).load_index(tmp_path / "index"))
    assert out["ids"] == local_ids[0] and len(out["ids"]) == 10
    assert out["loaded"] == [], f"the online path imported {out['loaded']}"


def test_a_spent_time_budget_stops_training_after_the_current_epoch(data):
    import time

    tables, w, content, method = data
    truth, _ = targets(w["train"], w["validation"])
    cfg = TwoTowerConfig.from_dict({**SMALL.to_dict(), "max_epochs": 5, "patience": 5})
    model = fit(w["train"], tables.items, tables.users, content, method, cfg, validation=Window(w["train"], truth),
                deadline=time.monotonic())
    assert model.info["epochs"] == 1 and model.info["stopped_by_budget"] and model.info["best_epoch"] == 1
    unlimited = fit(w["train"], tables.items, tables.users, content, method, cfg, epochs=2)
    assert unlimited.info["epochs"] == 2 and not unlimited.info["stopped_by_budget"]
