"""A traffic simulator for canary demos and tests: users who ask for recommendations and click what they really
went on to use.

The users are those of a held-out window (a run's test window: ``split/test.parquet``); each one's ground truth is
the set of items they interacted with in it (or the first ``max_items`` of them: what they used next). A simulated
request picks a user at random, asks ``/recommend`` for ``num_items`` items (through the canary router, so it is
assigned like real traffic) and clicks each returned item the user really met with probability
``click_prob * position_decay ** (rank - 1)``, any other item with probability ``noise_click``; a click becomes a
purchase with probability ``purchase_prob``. Clicks and purchases go to ``/feedback`` with the request id. A better
model puts more of the users' real items on top, so it earns a measurably higher CTR. Seeded: the same seed and
answers give the same clicks.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """What the simulated users did, per variant the router reported."""

    requests: int = 0
    failed: int = 0
    by_variant: dict[str, dict[str, int]] = field(default_factory=dict)
    status_codes: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, variant: str, clicked: bool, purchased: bool) -> None:
        row = self.by_variant.setdefault(variant, {"requests": 0, "clicked": 0, "purchased": 0})
        row["requests"] += 1
        row["clicked"] += int(clicked)
        row["purchased"] += int(purchased)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clicks_for(items: list[str], truth: set[str], rng: random.Random, click_prob: float = 0.9,
               position_decay: float = 0.9, noise_click: float = 0.005) -> list[str]:
    """The items of one answer the simulated user clicks (see the module docstring)."""
    out = []
    for rank, item in enumerate(items, start=1):
        p = click_prob * position_decay ** (rank - 1) if item in truth else noise_click
        if rng.random() < p:
            out.append(item)
    return out


def simulate(url: str, truth: Mapping[str, set[str]], requests: int, seed: int = 0, num_items: int = 10,
             concurrency: int = 4, rate: float | None = None, purchase_prob: float = 0.3,
             click_prob: float = 0.9, noise_click: float = 0.005, timeout_s: float = 30.0,
             stop: threading.Event | None = None) -> SimulationResult:
    """Send ``requests`` simulated requests to ``url`` (a router or a service) from ``concurrency`` threads, at
    ``rate`` requests/s overall when given (else as fast as answered). Returns the counts per variant."""
    import httpx

    users = sorted(truth)
    if not users:
        raise ValueError("no users with ground truth: give a window with interactions")
    result = SimulationResult()
    lock = threading.Lock()
    counter = iter(range(requests))
    started = time.monotonic()
    interval = concurrency / rate if rate else 0.0

    def worker(n: int) -> None:
        rng = random.Random(seed * 1_000 + n)
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            while stop is None or not stop.is_set():
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                tick = time.monotonic()
                user = users[rng.randrange(len(users))]
                try:
                    res = client.post("/recommend", json={"user_id": user, "num_items": num_items})
                except httpx.HTTPError:
                    with lock:
                        result.failed += 1
                    continue
                with lock:
                    result.status_codes[res.status_code] = result.status_codes.get(res.status_code, 0) + 1
                if res.status_code != 200:
                    with lock:
                        result.failed += 1
                    continue
                answer = res.json()
                items = [it["item_id"] for it in answer["items"]]
                clicked = clicks_for(items, truth[user], rng, click_prob=click_prob, noise_click=noise_click)
                purchased = [it for it in clicked if rng.random() < purchase_prob]
                for item, event in [*((c, "click") for c in clicked), *((p, "purchase") for p in purchased)]:
                    try:
                        client.post("/feedback", json={"request_id": answer["request_id"], "user_id": user,
                                                       "item_id": item, "event_type": event})
                    except httpx.HTTPError:
                        log.warning("feedback for %s lost", answer["request_id"])
                with lock:
                    result.requests += 1
                    result.add(answer.get("variant", "direct"), bool(clicked), bool(purchased))
                if interval:
                    time.sleep(max(0.0, interval - (time.monotonic() - tick)))

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = round(time.monotonic() - started, 2)
    return result


def window_truth(path: str, min_items: int = 1, max_items: int | None = None) -> dict[str, set[str]]:
    """User -> items of a held-out window (a parquet or csv with ``user_id``, ``item_id`` and, for ``max_items``,
    ``timestamp``): with ``max_items``, each user's first that many distinct items of the window (what they went on
    to use next, rather than everything over the window)."""
    import pandas as pd

    frame = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path)
    frame = frame.astype({"user_id": str, "item_id": str})
    if max_items is not None:
        frame = frame.sort_values("timestamp", kind="stable").drop_duplicates(["user_id", "item_id"])
        frame = frame.groupby("user_id", sort=False).head(max_items)
    grouped = frame.groupby("user_id")["item_id"].agg(set)
    return {u: items for u, items in grouped.items() if len(items) >= min_items}
