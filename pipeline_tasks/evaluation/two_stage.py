"""The two-stage evaluation (``evaluate`` task): the offline protocol on the test window for every stage and
baseline, beyond-accuracy figures, the champion side by side, and a report a person can read.

Rows: popularity, recent popularity (the trending source), two-tower alone, the merged pool in fusion order, the
two-stage ranking, two-stage + business rules and, when one exists, the champion's protocol fit on this run's test
users. Test users and relevant items are the protocol's (``targets``); cold-start users (no history before the
cut) are a separate row outside the headline and the gate. Lists are checked unique and free of seen items.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, SEED, USER_ID
from pipeline_tasks.evaluation.beyond_accuracy import beyond_accuracy
from pipeline_tasks.evaluation.metrics import evaluate, format_metric, per_user_metrics, targets
from pipeline_tasks.online.two_stage import RULES_ORDER, Fit, Moment, ranked_lists

log = logging.getLogger(__name__)

ROWS = {  # report row -> ranked_lists order
    "popularity": "popularity", "recent popularity": "trending", "two-tower alone": "two_tower",
    "merged pool": "pool", "two-stage": "ranker", "two-stage + rules": RULES_ORDER,
}
HEADLINE = "two-stage"
HEAD_METRICS = ("ndcg@10", "recall@10", "precision@10", "map@10", "hit@10")


class ListCheckError(AssertionError):
    """A recommendation list repeats an item or contains an item the user had seen."""


def check_lists(recs: Mapping[str, Sequence[str]], seen: Mapping[str, set[str]], name: str) -> None:
    """Every list unique and free of the user's seen items (raises :class:`ListCheckError`)."""
    for user, items in recs.items():
        if len(set(items)) != len(items):
            raise ListCheckError(f"{name}: the list of user {user} repeats items")
        bad = set(items) & seen.get(user, set())
        if bad:
            raise ListCheckError(f"{name}: the list of user {user} contains seen items {sorted(bad)[:3]}")


def _ids(lists: Mapping[str, list[tuple[str, float]]]) -> dict[str, list[str]]:
    return {u: [i for i, _ in v] for u, v in lists.items()}


def evaluate_fit(fit: Fit, moment: Moment, future: pd.DataFrame, k_max: int, n_boot: int = 1000, seed: int = SEED,
                 rows: Mapping[str, str] = ROWS, item_vectors: tuple[list[str], np.ndarray] | None = None,
                 extra_orders: Sequence[str] = ()
                 ) -> tuple[dict[str, Any], pd.DataFrame, dict[str, dict[str, list[str]]]]:
    """Metrics of each row on the protocol's test users at ``moment``; per-user metrics (for the paired gate);
    the lists of every row and of each ``extra_orders`` (keyed by order), from one pass over the users."""
    truth, seen = targets(moment.history, future)
    users = list(truth)
    orders = list(dict.fromkeys([*rows.values(), *extra_orders]))
    lists = ranked_lists(fit, moment, users, k_max, orders=orders)
    n_items = len(fit.item_ids)
    pairs = moment.history[[USER_ID, ITEM_ID]].astype(str).drop_duplicates()
    popularity = pairs[ITEM_ID].value_counts().to_dict()
    n_users = int(pairs[USER_ID].nunique())
    categories = dict(zip(moment.items[ITEM_ID].astype(str), moment.items.get("category", pd.Series(dtype=str)),
                          strict=False))
    ks = tuple(sorted({10, 100, k_max}))
    table: dict[str, Any] = {}
    per_user = []
    recs_by_row = {}
    for row, order in rows.items():
        recs = _ids(lists[order])
        check_lists(recs, seen, row)
        metrics = evaluate(recs, truth, n_items, ks=ks, n_boot=n_boot, seed=seed)
        metrics.update(beyond_accuracy(recs, n_items=n_items, item_popularity=popularity, n_users=n_users,
                                       categories=categories, item_vectors=item_vectors))
        table[row] = metrics
        per_user.append(per_user_metrics(recs, truth, ks=ks).add_prefix(f"{row}|"))
        recs_by_row[row] = recs
    for order in extra_orders:
        recs_by_row[order] = _ids(lists[order])
    return table, pd.concat(per_user, axis=1), recs_by_row


def paired_differences(per_user: pd.DataFrame, a: str, b: str, metrics: Sequence[str], n_boot: int = 1000,
                       seed: int = SEED) -> dict[str, dict[str, float]]:
    """Mean per-user difference ``a - b`` of each metric with a paired 95 % bootstrap CI (same users resampled)."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in metrics:
        diff = (per_user[f"{a}|{m}"] - per_user[f"{b}|{m}"]).to_numpy(dtype=float)
        draws = rng.integers(0, len(diff), size=(n_boot, len(diff))) if len(diff) else np.zeros((0, 0), int)
        means = diff[draws].mean(axis=1) if len(diff) else np.array([0.0])
        out[m] = {"difference": float(diff.mean()) if len(diff) else 0.0,
                  "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}
    return out


def cold_start_row(fit: Fit, moment: Moment, future: pd.DataFrame, k_max: int, n_boot: int, seed: int
                   ) -> dict[str, Any] | None:
    """Users of the test window without history: what they got (the trending list) scored on their items."""
    known = set(moment.history[USER_ID].astype(str))
    f = future[~future[USER_ID].astype(str).isin(known)]
    truth = {str(u): set(g[ITEM_ID].astype(str)) for u, g in f.groupby(f[USER_ID].astype(str))}
    if not truth:
        return None
    lists = ranked_lists(fit, moment, list(truth), k_max, orders=["ranker"])
    recs = _ids(lists["ranker"])
    return evaluate(recs, truth, len(fit.item_ids), ks=tuple(sorted({10, 100, k_max})), n_boot=n_boot, seed=seed)


def write_report(report: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """``report.json`` and ``report.html`` (tables and plots) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.html").write_text(_html(report))
    return {"json": str(out / "report.json"), "html": str(out / "report.html")}


def _cell(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return format_metric(float(value), (metrics.get("ci95") or {}).get(key))


def _html(report: Mapping[str, Any]) -> str:
    import plotly.graph_objects as go

    rows = report["rows"]
    k_max = report["k_max"]
    cols = [*HEAD_METRICS, "recall@100", f"recall@{k_max}", "coverage@10", "gini@10", "ild@10",
            "category_diversity@10", "novelty@10"]
    cols = list(dict.fromkeys(cols))
    head = "".join(f"<th>{c}</th>" for c in ["model", *cols])
    body = "".join("<tr><td>{}</td>{}</tr>".format(name, "".join(f"<td>{_cell(m, c)}</td>" for c in cols))
                   for name, m in rows.items())
    src = report.get("source_recall", {})
    src_rows = "".join(f"<tr><td>{s}</td><td>{v:.3f}</td></tr>" for s, v in src.items())
    gate_html = ""
    if report.get("champion"):
        ch = report["champion"]
        diffs = "".join(f"<tr><td>{m}</td><td>{d['difference']:+.4f}</td><td>[{d['ci95'][0]:+.4f}, "
                        f"{d['ci95'][1]:+.4f}]</td></tr>" for m, d in ch.get("paired", {}).items())
        gate_html = (f"<h2>Against the champion (version {ch.get('version')})</h2><p>{ch.get('note', '')}</p>"
                     f"<table><tr><th>metric</th><th>challenger - champion</th><th>paired 95 % CI</th></tr>"
                     f"{diffs}</table>")
    cold = report.get("cold_start")
    cold_html = (f"<h2>Cold-start users ({cold['users']}; trending list; outside the headline and gate)</h2>"
                 f"<p>NDCG@10 {_cell(cold, 'ndcg@10')}, recall@{k_max} {_cell(cold, f'recall@{k_max}')}</p>"
                 if cold else "<h2>Cold-start users</h2><p>none in the test window</p>")
    names = list(rows)
    fig = go.Figure([go.Bar(name=m, x=names, y=[rows[n].get(m, 0) for n in names],
                            error_y={"type": "data", "symmetric": False,
                                     "array": [(rows[n].get("ci95", {}).get(m, [0, 0])[1] - rows[n].get(m, 0))
                                               for n in names],
                                     "arrayminus": [(rows[n].get(m, 0) - rows[n].get("ci95", {}).get(m, [0, 0])[0])
                                                    for n in names]})
                     for m in ("ndcg@10", "recall@10")])
    fig.update_layout(barmode="group", title="Test window, 95 % bootstrap CIs", height=420)
    fig2 = go.Figure([go.Bar(x=list(src), y=list(src.values()))])
    fig2.update_layout(title=f"Each source's recall@{report['pool_size']} alone vs the merged pool", height=360)
    plots = fig.to_html(full_html=False, include_plotlyjs="inline") + fig2.to_html(full_html=False,
                                                                                   include_plotlyjs=False)
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Two-stage evaluation {report['run_id']}"
            f"</title><style>{style}</style></head><body><h1>Two-stage evaluation</h1>"
            f"<p>Run <code>{report['run_id']}</code>, protocol fit (trained up to t_test {report['t_test']}), "
            f"{report['test_users']} test users, catalog {report['n_items']} items, pool N = {report['pool_size']}."
            f" Full ranking of the catalog minus each user's history; 95 % bootstrap CIs over test users.</p>"
            f"<h2>Test window</h2><table><tr>{head}</tr>{body}</table>"
            f"<h2>Candidate sources, recall@{report['pool_size']} on test</h2><table><tr><th>source</th>"
            f"<th>recall</th></tr>{src_rows}</table>{gate_html}{cold_html}{plots}</body></html>")
