"""Benchmark: point-in-time (historical) feature retrieval through Feast, the project's real code path.

Synthetic daily user and item snapshots (the build_features layout: hive-partitioned parquet, one row
per active entity per day, valid from the end of its UTC day) are written into a temporary
RECSYS_HOME, the repo is applied, and :func:`pipeline_tasks.features.history.training_set` is timed
for ranker_v1 (views user_stats_fv and item_stats_fv, TTL 3 days) at each requested size.

Entities are active on a random subset of days (so TTL misses happen); requests include unknown
user/item ids, times before the first and after the last snapshot, and exact midnights (a snapshot is
valid from its midnight on; the TTL bound is inclusive). Each size is verified:
- one output row per request, in order (a ``label`` column = the request's position);
- for every row, the id-encoding feature of each view (``user_total_interactions``, ``item_n_view``
  = entity index * (days + 1) + snapshot day) against the expected snapshot day from the activity matrix;
- for ``--check`` random rows, every user and item feature against a brute-force as-of lookup over the
  snapshots read back from parquet (the newest row with request time - TTL <= event_timestamp <= request time).

Usage: .venv/bin/python tests/benchmarks/bench_point_in_time.py [--rows 1000000,5000000] [--users 100000]
       [--items 50000] [--days 60] [--profile embedded|production] [--check 2000] [--seed 0]
Prints a table and one JSON line (wall seconds, rows/s, peak RSS, cores); exits 1 if a check fails.
The production profile needs Redis (RECSYS_REDIS_URL) and Java for Spark. Not run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

log = logging.getLogger("bench")

START = pd.Timestamp("1998-03-01", tz="UTC")  # like MovieLens: far older than now - TTL
DAY_US = 86_400_000_000
TTL_DAYS = 3
SERVICE = "ranker_v1"

USER_INT = ["user_total_interactions", "user_unique_items", "user_n_view", "user_n_click", "user_n_add_to_cart",
            "user_n_purchase", "user_n_favorite"]
USER_FLOAT = ["user_ctr", "user_conversion_rate", "user_days_since_last_event", "user_top1_share", "user_top2_share",
              "user_top3_share", "user_mean_session_events", "user_mean_session_minutes"]
USER_STR = ["user_top1_category", "user_top2_category", "user_top3_category", "user_last_items"]
ITEM_INT = ["item_n_view", "item_n_click", "item_n_purchase", "item_total_interactions", "item_unique_users",
            "item_interactions_30d"]
ITEM_FLOAT = ["item_ctr", "item_conversion_rate", "item_popularity", "item_trending_score", "item_age_days"]
ITEM_STR = ["item_category"]
# The view schemas' order (feature_repo/feature_views.py).
USER_FEATURES = [*USER_INT, "user_ctr", "user_conversion_rate", "user_days_since_last_event", "user_top1_category",
                 "user_top2_category", "user_top3_category", "user_top1_share", "user_top2_share", "user_top3_share",
                 "user_mean_session_events", "user_mean_session_minutes", "user_last_items"]
ITEM_FEATURES = ITEM_INT + ITEM_FLOAT + ITEM_STR
USER_KEY_FEATURE = "user_total_interactions"  # = user index * (days + 1) + snapshot day
ITEM_KEY_FEATURE = "item_n_view"  # = item index * (days + 1) + snapshot day

_TS = pa.timestamp("us", tz="UTC")
USER_SCHEMA = pa.schema([("user_id", pa.string()), ("event_timestamp", _TS), ("created_timestamp", _TS),
                         *((c, pa.int64()) for c in USER_INT), *((c, pa.float64()) for c in USER_FLOAT),
                         *((c, pa.string()) for c in USER_STR)])
ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("event_timestamp", _TS), ("created_timestamp", _TS),
                         *((c, pa.int64()) for c in ITEM_INT), *((c, pa.float64()) for c in ITEM_FLOAT),
                         *((c, pa.string()) for c in ITEM_STR)])


# --- synthetic snapshots ----------------------------------------------------------------------

def entity_ids(prefix: str, indexes: np.ndarray) -> pa.Array:
    """``prefix`` + index as strings, vectorised (``u17``, ``i4``)."""
    return pc.binary_join_element_wise(pa.scalar(prefix), pc.cast(pa.array(indexes, pa.int64()), pa.string()), "")


def activity(n: int, days: int, rng: np.random.Generator) -> np.ndarray:
    """Which days each entity has a snapshot: a per-entity activity rate in [0.15, 1), some start late."""
    rate = rng.uniform(0.15, 1.0, n)
    first = np.where(rng.random(n) < 0.2, rng.integers(0, days, n), 0)
    active = rng.random((n, days), dtype=np.float32) < rate[:, None]
    active &= np.arange(days)[None, :] >= first[:, None]
    return active


def _nullable(values: np.ndarray, rng: np.random.Generator, p_null: float, type_: pa.DataType) -> pa.Array:
    return pa.array(values, type=type_, mask=rng.random(len(values)) < p_null)


def _strings(pool: pa.Array, rng: np.random.Generator, n: int, p_null: float) -> pa.Array:
    picked = pool.take(pa.array(rng.integers(0, len(pool), n)))
    return pc.if_else(pa.array(rng.random(n) < p_null), pa.scalar(None, pa.string()), picked)


def user_day(idx: np.ndarray, day: int, days: int, item_pool: pa.Array, rng: np.random.Generator) -> pa.Table:
    """One day's user snapshot for the active users ``idx``."""
    n = len(idx)
    stamp = pa.array(np.full(n, _midnight_us(day + 1)), _TS)
    cats = entity_ids("cat", np.arange(50))
    cols: dict[str, pa.Array] = {"user_id": entity_ids("u", idx), "event_timestamp": stamp, "created_timestamp": stamp}
    cols[USER_INT[0]] = pa.array(idx.astype(np.int64) * (days + 1) + day)
    for c in USER_INT[1:]:
        cols[c] = pa.array(rng.integers(0, 10_000, n))
    for c in USER_FLOAT:
        p_null = {"user_top2_share": 0.2, "user_top3_share": 0.4}.get(c, 0.0)
        cols[c] = _nullable(rng.random(n) * 100, rng, p_null, pa.float64())
    cols["user_top1_category"] = _strings(cats, rng, n, 0.0)
    cols["user_top2_category"] = _strings(cats, rng, n, 0.2)
    cols["user_top3_category"] = _strings(cats, rng, n, 0.4)
    recent = [item_pool.take(pa.array(rng.integers(0, len(item_pool), n))) for _ in range(20)]
    cols["user_last_items"] = pc.binary_join_element_wise(*recent, "|")
    return pa.Table.from_pydict(cols, schema=USER_SCHEMA)


def item_day(idx: np.ndarray, day: int, days: int, rng: np.random.Generator) -> pa.Table:
    """One day's item snapshot for the active items ``idx``."""
    n = len(idx)
    stamp = pa.array(np.full(n, _midnight_us(day + 1)), _TS)
    cols: dict[str, pa.Array] = {"item_id": entity_ids("i", idx), "event_timestamp": stamp, "created_timestamp": stamp}
    cols[ITEM_INT[0]] = pa.array(idx.astype(np.int64) * (days + 1) + day)
    for c in ITEM_INT[1:]:
        cols[c] = pa.array(rng.integers(0, 100_000, n))
    for c in ITEM_FLOAT:
        cols[c] = _nullable(rng.random(n), rng, 0.05 if c == "item_trending_score" else 0.0, pa.float64())
    cols["item_category"] = _strings(entity_ids("genre", np.arange(30)), rng, n, 0.02)
    return pa.Table.from_pydict(cols, schema=ITEM_SCHEMA)


def _midnight_us(k: int) -> int:
    """Microseconds since the epoch of the midnight ``k`` days after START."""
    return START.value // 1000 + k * DAY_US


def write_snapshots(settings: Any, user_active: np.ndarray, item_active: np.ndarray,
                    rng: np.random.Generator) -> dict[str, int]:
    """Write ``<offline>/<table>/snapshot_date=YYYY-MM-DD/part-0.parquet`` for every day; returns row counts."""
    from pipeline_tasks.features import store as fs_store
    from pipeline_tasks.online import feature_store as fs

    days = user_active.shape[1]
    item_pool = entity_ids("i", np.arange(item_active.shape[0]))
    counts = {"user_features": 0, "item_features": 0}
    with fs_store.feature_store_lock(settings):
        for day in range(days):
            date = (START + pd.Timedelta(days=day)).strftime("%Y-%m-%d")
            tables = {"user_features": user_day(np.flatnonzero(user_active[:, day]), day, days, item_pool, rng),
                      "item_features": item_day(np.flatnonzero(item_active[:, day]), day, days, rng)}
            for table, t in tables.items():
                part = fs.offline_table_dir(table, settings) / f"snapshot_date={date}"
                part.mkdir(parents=True, exist_ok=True)
                pq.write_table(t, part / "part-0.parquet")
                counts[table] += t.num_rows
    return counts


# --- requests and expectations ----------------------------------------------------------------

@dataclasses.dataclass
class Requests:
    frame: pd.DataFrame
    user_idx: np.ndarray  # -1 = unknown id
    item_idx: np.ndarray
    t_us: np.ndarray


def make_requests(n: int, n_users: int, n_items: int, days: int, rng: np.random.Generator) -> Requests:
    """``n`` entity rows: 1 % unknown users, 1 % unknown items, times from a day before the first snapshot
    to 4 days after the last, 5 % at exact midnights and 1 % a microsecond before one."""
    user_idx = rng.integers(0, n_users, n)
    item_idx = rng.integers(0, n_items, n)
    unknown_user = rng.random(n) < 0.01
    unknown_item = rng.random(n) < 0.01
    user_num = np.where(unknown_user, n_users + rng.integers(0, 10_000, n), user_idx)
    item_num = np.where(unknown_item, n_items + rng.integers(0, 10_000, n), item_idx)
    lo, hi = _midnight_us(0) - DAY_US, _midnight_us(days + 4)
    t_us = rng.integers(lo, hi, n)
    kind = rng.random(n)
    midnight = (t_us // DAY_US) * DAY_US
    t_us = np.where(kind < 0.05, midnight, np.where(kind < 0.06, midnight - 1, t_us))
    frame = pd.DataFrame({
        "user_id": entity_ids("u", user_num).to_numpy(zero_copy_only=False),
        "item_id": entity_ids("i", item_num).to_numpy(zero_copy_only=False),
        "event_timestamp": pd.to_datetime(t_us, unit="us", utc=True),
        "label": np.arange(n, dtype=np.int64),
    })
    return Requests(frame, np.where(unknown_user, -1, user_idx), np.where(unknown_item, -1, item_idx), t_us)


def expected_key(active: np.ndarray, idx: np.ndarray, t_us: np.ndarray) -> np.ndarray:
    """The id-encoding feature each request should get (-1 = null), from the activity matrix.

    Day d's row has event_timestamp = midnight(d + 1); valid iff t - TTL <= it <= t. So the candidates
    are d in [ceil(x) - 1 - TTL, floor(x) - 1] with x = (t - START) in days (4 days at a midnight, else 3).
    """
    days = active.shape[1]
    rel = t_us - _midnight_us(0)
    d_max = rel // DAY_US - 1
    d_min = -(-rel // DAY_US) - 1 - TTL_DAYS
    out = np.full(len(idx), -1, dtype=np.int64)
    found = np.zeros(len(idx), dtype=bool)
    for off in range(TTL_DAYS + 1):
        d = d_max - off
        ok = ~found & (idx >= 0) & (d >= d_min) & (d >= 0) & (d < days)
        ok[ok] = active[idx[ok], d[ok]]
        out[ok] = idx[ok] * (days + 1) + d[ok]
        found |= ok
    return out


def brute_force(table_dir: Path, key: str, ids: list[str]) -> dict[str, pd.DataFrame]:
    """Every snapshot row of ``ids`` read back from the parquet files, grouped by id."""
    dataset = ds.dataset(table_dir, format="parquet", partitioning="hive")
    df = dataset.to_table(filter=pc.field(key).isin(ids)).to_pandas()
    return {k: g for k, g in df.groupby(key, sort=False)}


def as_of(rows: pd.DataFrame | None, at: pd.Timestamp) -> pd.Series | None:
    """The newest row with at - TTL <= event_timestamp <= at (created_timestamp breaks ties), else None."""
    if rows is None:
        return None
    ok = rows[(rows["event_timestamp"] <= at) & (rows["event_timestamp"] >= at - pd.Timedelta(days=TTL_DAYS))]
    return None if ok.empty else ok.sort_values(["event_timestamp", "created_timestamp"]).iloc[-1]


def _same(got: Any, want: Any) -> bool:
    if want is None or (not isinstance(want, str) and pd.isna(want)):
        return got is None or (not isinstance(got, str) and pd.isna(got))
    if got is None or (not isinstance(got, str) and pd.isna(got)):
        return False
    if isinstance(want, float):
        return math.isclose(float(got), want, rel_tol=1e-12, abs_tol=0.0)
    return got == want


# --- measuring --------------------------------------------------------------------------------

class RssSampler:
    """Peak RSS of this process plus its descendants (the Spark JVM), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def reset_peak_rss() -> None:
    """Reset this process's VmHWM (Linux >= 4.0), so the next reading is the peak of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.warning("cannot reset the peak RSS; per-size peaks are process-lifetime peaks")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ru_maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def verify(out: pd.DataFrame, req: Requests, user_active: np.ndarray, item_active: np.ndarray,
           settings: Any, n_check: int, rng: np.random.Generator) -> dict[str, Any]:
    """All the checks of one size; returns counts and the first failures."""
    from pipeline_tasks.online import feature_store as fs

    failures: list[str] = []
    n = len(req.frame)
    if len(out) != n:
        failures.append(f"{len(out)} output rows for {n} requests")
        return {"failures": failures}
    if not out.index.equals(req.frame.index) or not np.array_equal(out["label"].to_numpy(), np.arange(n)):
        failures.append("output order/index differs from the requests")
    for c in ("user_id", "item_id", "event_timestamp"):
        if not out[c].equals(req.frame[c]):
            failures.append(f"request column {c} changed")
    missing = [c for c in USER_FEATURES + ITEM_FEATURES if c not in out.columns]
    if missing:
        failures.append(f"missing feature columns {missing}")
        return {"failures": failures}

    stats: dict[str, Any] = {}
    for name, active, idx, col in (("user", user_active, req.user_idx, USER_KEY_FEATURE),
                                   ("item", item_active, req.item_idx, ITEM_KEY_FEATURE)):
        want = expected_key(active, idx, req.t_us)
        got = out[col].to_numpy(dtype="int64", na_value=-1)
        bad = np.flatnonzero(got != want)
        stats[f"{name}_coverage"] = round(float((want >= 0).mean()), 4)
        stats[f"{name}_full_mismatches"] = int(len(bad))
        if len(bad):
            i = int(bad[0])
            failures.append(f"{name}: {len(bad)} of {n} rows have the wrong snapshot ({col}); first row {i}: "
                            f"{req.frame.iloc[i][['user_id', 'item_id', 'event_timestamp']].to_dict()} "
                            f"got {got[i]} want {want[i]}")

    sample = np.sort(rng.choice(n, size=min(n_check, n), replace=False))
    rows = req.frame.iloc[sample]
    users = brute_force(fs.offline_table_dir("user_features", settings), "user_id", rows["user_id"].unique().tolist())
    items = brute_force(fs.offline_table_dir("item_features", settings), "item_id", rows["item_id"].unique().tolist())
    checked = {"user_null": 0, "item_null": 0, "midnight": 0, "mismatches": 0}
    for pos, (_, req_row) in zip(sample, rows.iterrows(), strict=True):
        at = req_row["event_timestamp"]
        checked["midnight"] += int(at == at.floor("D"))
        got_row = out.iloc[pos]
        for what, snap, features in (("user", users.get(req_row["user_id"]), USER_FEATURES),
                                     ("item", items.get(req_row["item_id"]), ITEM_FEATURES)):
            want_row = as_of(snap, at)
            checked[f"{what}_null"] += want_row is None
            for f in features:
                want = None if want_row is None else want_row[f]
                if not _same(got_row[f], want):
                    checked["mismatches"] += 1
                    if checked["mismatches"] <= 5:
                        failures.append(f"row {pos} ({req_row[what + '_id']} at {at}): {f} = {got_row[f]!r}, "
                                        f"brute force {want!r}")
    stats["checked_rows"] = len(sample)
    stats["checked"] = checked
    if checked["mismatches"] > 5:
        failures.append(f"... {checked['mismatches']} value mismatches in the checked rows")
    stats["failures"] = failures
    return stats


def run_size(n: int, args: argparse.Namespace, settings: Any, store: Any, user_active: np.ndarray,
             item_active: np.ndarray) -> dict[str, Any]:
    """Time one training_set call of ``n`` rows, then verify it."""
    from pipeline_tasks.features import history

    rng = np.random.default_rng([args.seed, n])
    req = make_requests(n, args.users, args.items, args.days, rng)
    log.info("%d requests built (%.0f MB in pandas); calling training_set", n,
             req.frame.memory_usage(deep=True).sum() / 2**20)
    reset_peak_rss()
    with RssSampler() as sampler:
        started = time.perf_counter()
        out = history.training_set(req.frame, SERVICE, store=store)
        seconds = time.perf_counter() - started
    result = {"rows": n, "seconds": round(seconds, 2), "rows_per_s": round(n / seconds),
              "peak_rss_mb": round(vm_hwm_mb()), "peak_tree_rss_mb": round(sampler.peak / 2**20)}
    log.info("%d rows in %.1f s (%.0f rows/s), peak RSS %d MB (process tree %d MB)", n, seconds, n / seconds,
             result["peak_rss_mb"], result["peak_tree_rss_mb"])
    started = time.perf_counter()
    result |= verify(out, req, user_active, item_active, settings, args.check, rng)
    log.info("verified in %.1f s: %s", time.perf_counter() - started,
             "ok" if not result["failures"] else f"{len(result['failures'])} failures")
    for failure in result["failures"]:
        log.error("%s", failure)
    return result


def load_bench_settings(home: Path, profile: str) -> Any:
    """Settings for a fresh RECSYS_HOME (the repo's data sources read the environment when imported)."""
    os.environ["RECSYS_HOME"] = str(home)
    os.environ["RECSYS_PROFILE"] = profile
    os.environ.pop("RECSYS_ARTIFACT_ROOT", None)
    from pipeline_tasks.core.settings import load_settings

    settings = load_settings()
    if profile == "production":  # a unique project: never touch another run's Redis keys
        settings = dataclasses.replace(settings, extra={**settings.extra,
                                                        "feast_project": f"recsys_bench_{uuid.uuid4().hex[:10]}"})
    return settings


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'rows':>10} {'seconds':>9} {'rows/s':>10} {'peak RSS MB':>12} {'tree RSS MB':>12} " \
           f"{'user cov':>9} {'item cov':>9} {'checks':>7}"
    print(head)
    for r in results:
        print(f"{r['rows']:>10,} {r['seconds']:>9.2f} {r['rows_per_s']:>10,} {r['peak_rss_mb']:>12,} "
              f"{r['peak_tree_rss_mb']:>12,} {r.get('user_coverage', float('nan')):>9.3f} "
              f"{r.get('item_coverage', float('nan')):>9.3f} {'ok' if not r['failures'] else 'FAIL':>7}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="5000000", help="entity rows per call; a comma list runs several sizes")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--profile", choices=["embedded", "production"], default="embedded")
    parser.add_argument("--check", type=int, default=2000, help="random rows checked against a brute-force lookup")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary RECSYS_HOME")
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.rows.split(",") if s.strip()]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    home = Path(tempfile.mkdtemp(prefix="bench-pit-"))
    settings = load_bench_settings(home, args.profile)
    from pipeline_tasks.features import store as fs_store
    from pipeline_tasks.online import feature_store as fs

    summary: dict[str, Any] = {"bench": "point_in_time", "profile": args.profile, "cores": os.cpu_count(),
                               "users": args.users, "items": args.items, "days": args.days, "seed": args.seed}
    store = None
    try:
        rng = np.random.default_rng(args.seed)
        started = time.perf_counter()
        user_active, item_active = activity(args.users, args.days, rng), activity(args.items, args.days, rng)
        summary["snapshot_rows"] = write_snapshots(settings, user_active, item_active, rng)
        summary["write_snapshots_s"] = round(time.perf_counter() - started, 2)
        log.info("snapshots written in %.1f s: %s", summary["write_snapshots_s"], summary["snapshot_rows"])
        started = time.perf_counter()
        fs_store.apply_repo(settings)
        store = fs.get_store(settings)
        summary["offline_store"] = store.config.offline_store.type
        summary["apply_s"] = round(time.perf_counter() - started, 2)
        log.info("repo applied in %.1f s (offline store %s)", summary["apply_s"], summary["offline_store"])

        started = time.perf_counter()
        warm = run_size(1000, argparse.Namespace(**{**vars(args), "check": 200}), settings, store,
                        user_active, item_active)
        summary["warmup_1000_s"] = round(time.perf_counter() - started, 2)
        results = [run_size(n, args, settings, store, user_active, item_active) for n in sizes]
    finally:
        if store is not None and args.profile == "production":
            store.teardown()  # the unique project's Redis keys
        if args.keep:
            log.info("kept %s", home)
        else:
            shutil.rmtree(home, ignore_errors=True)

    summary["results"] = results
    summary["max_rss_mb"] = round(ru_maxrss_mb(resource.RUSAGE_SELF))
    summary["children_max_rss_mb"] = round(ru_maxrss_mb(resource.RUSAGE_CHILDREN))
    ok = not warm["failures"] and not any(r["failures"] for r in results)
    summary["checks_passed"] = ok
    print_table(results)
    print(f"cores {summary['cores']}, offline store {summary['offline_store']}, process max RSS "
          f"{summary['max_rss_mb']} MB (children {summary['children_max_rss_mb']} MB), snapshots "
          f"{summary['snapshot_rows']}, checks {'passed' if ok else 'FAILED'}")
    print(json.dumps(summary, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
