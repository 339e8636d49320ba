"""Two-tower training time per epoch, and item embeddings from the trained item tower for the FAISS benchmark.

Usage:
    python tests/benchmarks/bench_two_tower.py movielens PATH_TO_ML100K [--epochs 3]
    python tests/benchmarks/bench_two_tower.py synthetic --events 1000000 --items 1000000 --users 50000 \\
        [--epochs 1] [--save-embeddings DIR]

Trains on the train window of the contract's time split (no early stopping: fixed epochs) and prints
the median seconds per epoch. With ``--save-embeddings`` it writes ``items.npy`` (every catalog item
embedded by the trained item tower) and ``users.npy`` (held-out users: test-window users embedded from
their history) for ``bench_faiss.py``. Content embeddings use ``--content`` (default ``hashed``:
MiniLM embeds about 60 texts/s on 2 CPU cores, too slow for a million items).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from pipeline_tasks.data.split import SplitConfig, time_split
from pipeline_tasks.online.two_tower import TwoTowerConfig
from pipeline_tasks.retrieval.content import embed_texts, item_texts
from pipeline_tasks.retrieval.two_tower_training import fit

log = logging.getLogger("bench_two_tower")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["movielens", "synthetic"])
    p.add_argument("path", nargs="?")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=50_000)
    p.add_argument("--users", type=int, default=50_000)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--content", default="hashed")
    p.add_argument("--query-users", type=int, default=2000)
    p.add_argument("--save-embeddings", type=Path)
    a = p.parse_args()

    t0 = time.perf_counter()
    if a.source == "movielens":
        from pipeline_tasks.data.movielens import load_movielens

        tables = load_movielens(Path(a.path))
    else:
        from pipeline_tasks.data.synthetic import FaultConfig, SyntheticConfig, generate

        tables = generate(SyntheticConfig(n_users=a.users, n_items=a.items, n_days=a.days, n_events=a.events,
                                          faults=FaultConfig())).tables
    windows = time_split(tables.interactions, SplitConfig())
    log.info("data: %d events, %d items, %d users in %.1f s", len(tables.interactions), len(tables.items),
             len(tables.users), time.perf_counter() - t0)
    t0 = time.perf_counter()
    content, method = embed_texts(item_texts(tables.items), method=a.content)
    content_s = time.perf_counter() - t0
    config = TwoTowerConfig(batch_size=a.batch_size)
    t0 = time.perf_counter()
    model = fit(windows["train"], tables.items, tables.users, content, method, config, epochs=a.epochs)
    per_epoch = [h["seconds"] for h in model.info["history"]]
    result = {"source": a.source, "events": len(tables.interactions), "train_events": len(windows["train"]),
              "examples": model.info["examples"], "items": len(tables.items), "users": len(tables.users),
              "cores": os.cpu_count(), "batch_size": a.batch_size, "content_method": method,
              "content_seconds": round(content_s, 1), "epochs": a.epochs,
              "seconds_per_epoch_median": round(float(np.median(per_epoch)), 1),
              "seconds_per_epoch": [round(s, 1) for s in per_epoch],
              "fit_seconds_total": round(time.perf_counter() - t0, 1)}
    if a.save_embeddings:
        out = a.save_embeddings
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        items = model.item_embeddings()
        result["item_embedding_seconds"] = round(time.perf_counter() - t0, 1)
        rng = np.random.default_rng(0)
        test_users = windows["test"]["user_id"].drop_duplicates().to_numpy()
        users = rng.choice(test_users, min(a.query_users, len(test_users)), replace=False).tolist()
        history = windows["train"]
        queries = model.user_embeddings(users, history, None, tables.users)
        np.save(out / "items.npy", items.astype(np.float32))
        np.save(out / "users.npy", queries.astype(np.float32))
        result["embeddings"] = {"items": str(out / "items.npy"), "users": str(out / "users.npy"),
                                "shape": list(items.shape)}
    log.info("%s", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
