"""The production profile's per-user serving state in Redis, shared by every worker.

Keys (``<prefix>`` = ``recsys:<namespace>:``): ``vec:<user>`` the cached user embedding (float32 bytes, TTL
1 h); ``ev:<user>`` the user's fresh events (a list of JSON objects, kept 7 days); ``shown:<user>`` the
recently-shown items (a sorted set scored by expiry time, 7 days). Timeouts are short and a failed call opens
a breaker for ``retry_s`` seconds: while Redis is down every call fails at once, the engine answers without
the state and counts the fallback, and no request waits on a dead socket.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EVENTS_TTL_S = 7 * 86_400


class RedisUnavailableError(ConnectionError):
    """Redis failed recently; calls are skipped until the breaker's retry time."""


class RedisState:
    """:class:`pipeline_tasks.online.engine.StateStore` on Redis."""

    def __init__(self, url: str, prefix: str = "recsys:", timeout_s: float = 0.05, retry_s: float = 2.0) -> None:
        import redis

        host, _, port = url.removeprefix("redis://").partition(":")
        self.client = redis.Redis(host=host or "127.0.0.1", port=int(port or 6379), socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s, retry_on_timeout=False)
        self.prefix, self.retry_s = prefix, retry_s
        self._down_until = 0.0

    def _call(self, fn: Any) -> Any:
        if time.monotonic() < self._down_until:
            raise RedisUnavailableError("redis was unreachable moments ago; retrying later")
        try:
            return fn()
        except Exception:
            self._down_until = time.monotonic() + self.retry_s
            raise

    def get_vectors(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        keys = [f"{self.prefix}vec:{u}" for u in user_ids]
        values = self._call(lambda: self.client.mget(keys))
        return {u: np.frombuffer(v, dtype=np.float32) for u, v in zip(user_ids, values, strict=True) if v}

    def set_vectors(self, vectors: Mapping[str, np.ndarray], ttl_s: float) -> None:
        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            for u, v in vectors.items():
                pipe.set(f"{self.prefix}vec:{u}", np.asarray(v, np.float32).tobytes(), ex=max(1, int(ttl_s)))
            pipe.execute()
        self._call(run)

    def drop_vector(self, user_id: str) -> None:
        self._call(lambda: self.client.delete(f"{self.prefix}vec:{user_id}"))

    def add_event(self, user_id: str, event: Mapping[str, Any]) -> None:
        key = f"{self.prefix}ev:{user_id}"

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(key, json.dumps(dict(event), default=str))
            pipe.expire(key, EVENTS_TTL_S)
            pipe.execute()
        self._call(run)

    def events(self, user_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for u in user_ids:
                pipe.lrange(f"{self.prefix}ev:{u}", 0, -1)
            return pipe.execute()
        lists = self._call(run)
        return {u: [json.loads(x) for x in items] for u, items in zip(user_ids, lists, strict=True) if items}

    def shown(self, user_id: str) -> set[str]:
        values = self._call(lambda: self.client.zrangebyscore(f"{self.prefix}shown:{user_id}", time.time(), "+inf"))
        return {v.decode() for v in values}

    def add_shown(self, user_id: str, item_ids: Sequence[str], ttl_s: float) -> None:
        key = f"{self.prefix}shown:{user_id}"
        now = time.time()

        def run() -> None:
            pipe = self.client.pipeline(transaction=False)
            if item_ids:
                pipe.zadd(key, {i: now + ttl_s for i in item_ids})
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.expire(key, max(1, int(ttl_s)))
            pipe.execute()
        self._call(run)
