"""How far strong collaborative scorers get on recall@500 of a split: the ceiling behind the quality bar.

Usage:
    python tests/benchmarks/bench_recall_ceiling.py DATA [--out results.json] [--n-boot 1000]

DATA is a contract directory (a run's ``validate/accepted/``, or any directory with ``interactions.parquet`` and
``items.parquet``) or ``movielens:PATH`` (read with the project's MovieLens importer). The split, the test users
and their relevant items are ``../shared/bench/protocol.py``'s, as for the baselines. Each family below is fitted
on train, its parameters chosen on the validation window by recall@500, refitted on train + validation and
scored on test (full ranking, seen items excluded, 95 % bootstrap CIs from ``pipeline_tasks.evaluation.metrics``):

- ``ease``: EASE's closed form at lambda 100 ... 30,000 (baselines.py searches 100 / 500 / 2,000);
- ``ease+popularity``: EASE scores scaled per user to [-1, 1] plus a weight times all-time popularity;
- ``ease+recent``: the same with the item's distinct users in the last 7 or 30 days (the trending source);
- ``ease-recency``: EASE with each history event weighted ``0.5 ** (age_days / half_life)``;
- ``rp3beta``: random walks user -> item -> user -> item, divided by item popularity ** beta.

It prints each family's chosen parameters, its validation and test recall@500 and NDCG@10, and the best test
recall@500 of any configuration tried (chosen on test: an upper bound no honest selection reaches), beside the
bar of the ranking issue (1.05 x the best baseline's recall@500 of baselines.py). Catalogs up to 20,000 items
(EASE inverts an items x items matrix, as baselines.py does). Needs the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from pipeline_tasks.evaluation.metrics import evaluate, format_metric  # noqa: E402

log = logging.getLogger("bench_recall_ceiling")
BENCH = Path(__file__).resolve().parents[3] / "shared" / "bench"
K = 500
MAX_ITEMS = 20_000

Scorer = Callable[[sp.csr_matrix, pd.DataFrame, dict[str, int]], np.ndarray]


def ease_weights(m: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE's item-item weights (closed form, zero diagonal)."""
    g = (m.T @ m).toarray().astype(np.float64)
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return b


def _per_user_scaled(scores: np.ndarray) -> np.ndarray:
    return scores / (np.abs(scores).max(axis=1, keepdims=True) + 1e-12)


def ease(lam: float) -> Scorer:
    return lambda m, hist, iidx: np.asarray(m @ ease_weights(m, lam))


def ease_popularity(lam: float, weight: float, days: float | None) -> Scorer:
    def score(m: sp.csr_matrix, hist: pd.DataFrame, iidx: dict[str, int]) -> np.ndarray:
        if days is None:
            counts = np.asarray(m.sum(axis=0)).ravel()
        else:
            recent = hist[hist.timestamp >= hist.timestamp.max() - pd.Timedelta(days=days)]
            recent = recent.drop_duplicates(["user_id", "item_id"])
            counts = np.bincount(recent.item_id.map(iidx).to_numpy(), minlength=m.shape[1]).astype(float)
        return _per_user_scaled(np.asarray(m @ ease_weights(m, lam))) + weight * counts / max(counts.max(), 1.0)
    return score


def ease_recency(lam: float, half_life_days: float) -> Scorer:
    def score(m: sp.csr_matrix, hist: pd.DataFrame, iidx: dict[str, int]) -> np.ndarray:
        h = hist.sort_values("timestamp").drop_duplicates(["user_id", "item_id"], keep="last")
        age = (h.groupby("user_id").timestamp.transform("max") - h.timestamp).dt.total_seconds() / 86_400
        w = sp.csr_matrix((0.5 ** (age.to_numpy() / half_life_days),
                           (h["row"].to_numpy(), h.item_id.map(iidx).to_numpy())), shape=m.shape)
        return np.asarray(w @ ease_weights(m, lam))
    return score


def rp3beta(alpha: float, beta: float) -> Scorer:
    def score(m: sp.csr_matrix, hist: pd.DataFrame, iidx: dict[str, int]) -> np.ndarray:
        user_deg = np.maximum(np.asarray(m.sum(axis=1)).ravel(), 1)
        item_deg = np.maximum(np.asarray(m.sum(axis=0)).ravel(), 1)
        p_ui = (sp.diags(1 / user_deg) @ m).power(alpha)
        p_iu = (sp.diags(1 / item_deg) @ m.T.tocsr()).power(alpha)
        w = (p_iu @ p_ui).toarray() / (item_deg ** beta)[None, :]
        np.fill_diagonal(w, 0.0)
        return np.asarray(m @ w)
    return score


FAMILIES: dict[str, list[tuple[dict[str, Any], Scorer]]] = {
    "ease": [({"lambda": lam}, ease(lam)) for lam in (100.0, 500.0, 2000.0, 5000.0, 10_000.0, 30_000.0)],
    "ease+popularity": [({"lambda": lam, "weight": w}, ease_popularity(lam, w, None))
                        for lam in (500.0, 2000.0) for w in (0.1, 0.3, 1.0)],
    "ease+recent": [({"lambda": lam, "weight": w, "days": d}, ease_popularity(lam, w, d))
                    for lam in (500.0, 2000.0) for w in (0.1, 0.3, 1.0) for d in (7.0, 30.0)],
    "ease-recency": [({"lambda": lam, "half_life_days": hl}, ease_recency(lam, hl))
                     for lam in (500.0, 2000.0) for hl in (7.0, 30.0, 365.0)],
    "rp3beta": [({"alpha": a, "beta": b}, rp3beta(a, b)) for a in (0.8, 1.0) for b in (0.0, 0.3, 0.5, 0.7)],
}


def top_lists(scorer: Scorer, hist: pd.DataFrame, users: list[str], items: list[str]) -> dict[str, list[str]]:
    """Each user's top K unseen items by ``scorer`` fitted on ``hist``."""
    iidx = {it: i for i, it in enumerate(items)}
    hist = hist[hist.item_id.isin(iidx)].copy()
    uidx = {u: i for i, u in enumerate(hist.user_id.unique())}
    hist["row"] = hist.user_id.map(uidx)
    m = sp.csr_matrix((np.ones(len(hist)), (hist["row"].to_numpy(), hist.item_id.map(iidx).to_numpy())),
                      shape=(len(uidx), len(items)))
    m.data[:] = 1.0
    scores = scorer(m, hist, iidx)
    out = {}
    for u in users:
        row = np.array(scores[uidx[u]], dtype=np.float64)
        row[m[uidx[u]].indices] = -np.inf
        top = np.argsort(-row, kind="stable")[:K]
        out[u] = [items[i] for i in top]
    return out


def found_vs_missed(lists: dict[str, list[str]], truth: dict[str, set[str]], hist: pd.DataFrame) -> dict[str, Any]:
    """Median training users of the relevant test items a scorer's top K finds and of those it misses."""
    users_per_item = hist.drop_duplicates(["user_id", "item_id"]).item_id.value_counts()
    found, missed = [], []
    for u, relevant in truth.items():
        top = set(lists.get(u, []))
        for item in relevant:
            (found if item in top else missed).append(int(users_per_item.get(item, 0)))
    out = {"found": len(found), "missed": len(missed), "median_users_found": float(np.median(found or [0])),
           "median_users_missed": float(np.median(missed or [0]))}
    log.info("EASE's top %d: %d relevant test items found (median %.0f training users), %d missed (median %.0f)",
             K, out["found"], out["median_users_found"], out["missed"], out["median_users_missed"])
    return out


def contract_dir(spec: str, scratch: Path) -> Path:
    """A directory with interactions.parquet and items.parquet for ``spec``."""
    if not spec.startswith("movielens:"):
        return Path(spec)
    from pipeline_tasks.data.movielens import load_movielens

    tables = load_movielens(spec.split(":", 1)[1])
    inter = tables.interactions.copy()
    inter["timestamp"] = pd.to_datetime(inter["timestamp"], utc=True)
    inter.to_parquet(scratch / "interactions.parquet")
    tables.items.to_parquet(scratch / "items.parquet")
    return scratch


def run(data: Path, n_boot: int) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH))
    import baselines
    import protocol

    items = pd.read_parquet(data / "items.parquet").item_id.astype(str).tolist()
    if len(items) > MAX_ITEMS:
        raise SystemExit(f"{len(items)} items: this benchmark inverts an items x items matrix (up to {MAX_ITEMS})")
    train, val, test, t_val, t_test = protocol.split(data)
    for frame in (train, val, test):
        frame["user_id"] = frame.user_id.astype(str)
        frame["item_id"] = frame.item_id.astype(str)
    val_truth, _ = protocol.targets(train, val)
    hist = pd.concat([train, val])
    test_truth, _ = protocol.targets(hist, test)
    log.info("split: t_val %s, t_test %s; %d validation users, %d test users, %d items, %d cores",
             t_val, t_test, len(val_truth), len(test_truth), len(items), os.cpu_count())

    # The bar: 1.05 x the best recall@500 among baselines.py's baselines, selected as it selects them.
    best_baseline, best_name = 0.0, ""
    for kind, grid in baselines.GRID.items():
        scores = [protocol.metrics(baselines.fit_predict(kind, p, train, list(val_truth), items), val_truth,
                                   len(items))["ndcg@10"] for p in grid]
        chosen = grid[int(np.argmax(scores))]
        r = protocol.metrics(baselines.fit_predict(kind, chosen, hist, list(test_truth), items), test_truth,
                             len(items))["recall@500"]
        log.info("baseline %-10s %s recall@500 %.4f", kind, chosen, r)
        if r > best_baseline:
            best_baseline, best_name = r, kind

    report: dict[str, Any] = {"validation_users": len(val_truth), "test_users": len(test_truth),
                              "items": len(items), "best_baseline": {best_name: best_baseline},
                              "bar_recall@500": 1.05 * best_baseline, "families": {}}
    oracle = (0.0, "")
    for family, grid in FAMILIES.items():
        rows = []
        for params, scorer in grid:
            v = protocol.metrics(top_lists(scorer, train, list(val_truth), items), val_truth, len(items))
            t = protocol.metrics(top_lists(scorer, hist, list(test_truth), items), test_truth, len(items))
            rows.append((params, v, t))
            if t["recall@500"] > oracle[0]:
                oracle = (t["recall@500"], f"{family} {params}")
        chosen = max(range(len(rows)), key=lambda i: rows[i][1]["recall@500"])  # first best on validation
        params, v, _ = rows[chosen]
        lists = top_lists(grid[chosen][1], hist, list(test_truth), items)
        scored = evaluate(lists, test_truth, len(items), ks=(10, 100, 500), n_boot=n_boot)
        if family == "ease":
            report["ease_found_vs_missed"] = found_vs_missed(lists, test_truth, hist)
        report["families"][family] = {"params": params, "validation": {k: v[k] for k in ("recall@500", "ndcg@10")},
                                      "test": {k: scored[k] for k in ("recall@500", "ndcg@10")},
                                      "ci95": {k: scored["ci95"].get(k) for k in ("recall@500", "ndcg@10")}}
        log.info("%-16s %s: validation recall@500 %.4f | test recall@500 %s, NDCG@10 %s", family, params,
                 v["recall@500"], format_metric(scored["recall@500"], scored["ci95"].get("recall@500")),
                 format_metric(scored["ndcg@10"], scored["ci95"].get("ndcg@10")))
    report["best_test_recall@500_any_configuration"] = {"value": oracle[0], "configuration": oracle[1]}
    log.info("bar: recall@500 >= 1.05 x %s's %.4f = %.4f; best test recall@500 of any configuration tried "
             "(chosen on test): %.4f (%s)", best_name, best_baseline, 1.05 * best_baseline, oracle[0], oracle[1])
    return report


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a contract directory or movielens:PATH")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        report = run(contract_dir(args.data, Path(scratch)), args.n_boot)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
