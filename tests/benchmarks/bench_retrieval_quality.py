"""Retrieval quality of a training run beside every baseline of ../shared/bench/baselines.py, same split.

Usage (after a `recsys run`):
    python tests/benchmarks/bench_retrieval_quality.py RUN_DIR [--out results.json] [--n-boot 1000]

RUN_DIR is a run directory printed by `recsys run` (it holds `validate/accepted/` and
`train_two_tower/metrics.json`). The baselines are fitted exactly as baselines.py does (grid on the
validation window by NDCG@10, refit on train + validation, score on test) on the run's accepted
contract directory; every figure gets a 95 % bootstrap CI over test users from
`pipeline_tasks.evaluation.metrics` (the project's one metrics implementation, checked here against protocol.py).
Needs the `bench` extra (implicit, scipy): `pip install -c constraints.txt -e ".[cpu,dev,bench]"`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd

from pipeline_tasks.evaluation.metrics import evaluate, format_metric

log = logging.getLogger("bench_retrieval_quality")
BENCH = Path(__file__).resolve().parents[3] / "shared" / "bench"
SHOWN = ("recall@100", "recall@500", "ndcg@10", "recall@10")


def run_baselines(contract_dir: Path, n_boot: int) -> dict[str, dict]:
    """Every baseline of baselines.py, selected and scored as it does, with CIs from our metrics."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.path.insert(0, str(BENCH))
    import baselines
    import protocol

    items = pd.read_parquet(contract_dir / "items.parquet").item_id.astype(str).tolist()
    train, val, test, _, _ = protocol.split(contract_dir)
    val_truth, _ = protocol.targets(train, val)
    hist = pd.concat([train, val])
    test_truth, _ = protocol.targets(hist, test)
    out = {}
    for kind, grid in baselines.GRID.items():
        if kind == "ease" and len(items) > 20_000:
            log.info("ease skipped: %d items (baselines.py runs it up to 20 000)", len(items))
            continue
        scores = []
        for p in grid:
            recs = baselines.fit_predict(kind, p, train, list(val_truth), items)
            scores.append(protocol.metrics(recs, val_truth, len(items))["ndcg@10"])
        best = grid[max(range(len(grid)), key=scores.__getitem__)]
        recs = baselines.fit_predict(kind, best, hist, list(test_truth), items)
        theirs = protocol.metrics(recs, test_truth, len(items))
        ours = evaluate(recs, test_truth, len(items), n_boot=n_boot)
        for key in ("recall@100", "recall@500", "ndcg@10"):  # one metrics implementation, checked
            assert abs(ours[key] - theirs[key]) < 1e-12, (kind, key, ours[key], theirs[key])
        out[kind] = {**ours, "params": best}
        log.info("%-10s recall@100 %s  recall@500 %s", kind,
                 format_metric(ours["recall@100"], ours["ci95"]["recall@100"]),
                 format_metric(ours["recall@500"], ours["ci95"]["recall@500"]))
    return out


def table(rows: dict[str, dict]) -> str:
    head = "| model | " + " | ".join(SHOWN) + " |\n|---|" + "---|" * len(SHOWN) + "\n"
    body = "".join(f"| {name} | " + " | ".join(format_metric(m[k], m.get("ci95", {}).get(k)) for k in SHOWN) + " |\n"
                   for name, m in rows.items())
    return head + body


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    ours = json.loads((args.run_dir / "train_two_tower" / "metrics.json").read_text())
    rows = {f"{name} (ours)": m["test"] for name, m in ours["models"].items()}
    rows.update(run_baselines(args.run_dir / "validate" / "accepted", args.n_boot))
    text = (f"{ours['test_users']} test users, {ours['items']} items, content {ours['content_method']}, "
            f"{os.cpu_count()} cores\n\n" + table(rows))
    log.info("\n%s", text)
    if args.out:
        args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "models": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
