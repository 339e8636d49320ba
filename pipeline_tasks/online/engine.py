"""The request path of a serving process: one user's recommendations from a prepared moment, plus fresh signals.

:class:`Engine` wraps :class:`~pipeline_tasks.online.two_stage.Prepared` (the bundle's fit and the catalog,
history and features at the service's snapshot moment) and answers one request through the same
:func:`~pipeline_tasks.online.two_stage.user_blocks` and :func:`~pipeline_tasks.online.two_stage.rank_block`
as ``evaluate`` and ``recsys recommend``: two-tower, i2i, content, trending and popularity candidates,
servability and region filters, feature assembly, the LightGBM ranker and the business rules. Around that it
adds what only a live service has:

- **fresh events**: a feedback event enters the user's history at once (as their newest event; the snapshot
  moment does not move) and drops the user's cached embedding, so the next request reflects it;
- **recently shown**: items returned to a user in the last ``shown_ttl_s`` seconds are not returned again
  (off per request or per service);
- **safety flags**: items an operator flagged (:mod:`pipeline_tasks.online.safety`) are not servable in the
  engine's catalog (:func:`with_blocked_items`, redone when the flags change), so they are never served: not
  ranked, not as popularity fill, not in a cold user's trending list, not by exploration;
- **exploration** (off by default): with probability ``epsilon`` a position below the first is swapped with a
  random later candidate of the ranked list (epsilon-greedy), seeded per request id.

State shared between workers (embedding cache, fresh events, recently-shown lists) goes through a
:class:`StateStore`: :class:`LocalState` in process (the embedded default, one worker), Redis in the production
profile (``serving/state.py``). A store that fails is skipped for that call and counted; the request is still
answered.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd

from pipeline_tasks.core.constants import ITEM_ID, TIMESTAMP, USER_ID
from pipeline_tasks.online.candidates import DEMOGRAPHIC_COLUMNS, SOURCES
from pipeline_tasks.online.two_stage import (
    Prepared,
    block_size,
    item_age_days,
    rank_block,
    user_blocks,
    with_blocked_items,
    with_user_state,
)

log = logging.getLogger(__name__)

EMBEDDING_TTL_S = 3600.0
SHOWN_TTL_S = 7 * 86_400.0

# Where a request's user embedding came from: the per-snapshot precomputed user state (no cache lookup), the cache
# (hit), or the user tower now (miss: then cached); "none" when the fit has no two-tower model.
EmbeddingSource = Literal["precomputed", "hit", "miss", "none"]


class StateStore(Protocol):
    """Per-user state a service keeps between requests (see the module docstring)."""

    def get_vectors(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]: ...

    def set_vectors(self, vectors: Mapping[str, np.ndarray], ttl_s: float) -> None: ...

    def drop_vector(self, user_id: str) -> None: ...

    def add_event(self, user_id: str, event: Mapping[str, Any]) -> None: ...

    def events(self, user_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]: ...

    def shown(self, user_id: str) -> set[str]: ...

    def add_shown(self, user_id: str, item_ids: Sequence[str], ttl_s: float) -> None: ...


class LocalState:
    """:class:`StateStore` in process memory (one worker); embeddings in a bounded LRU."""

    def __init__(self, max_vectors: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._vectors: OrderedDict[str, tuple[float, np.ndarray]] = OrderedDict()
        self._max = max_vectors
        self._events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._shown: dict[str, dict[str, float]] = defaultdict(dict)

    def get_vectors(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        now, out = time.monotonic(), {}
        with self._lock:
            for u in user_ids:
                hit = self._vectors.get(u)
                if hit is not None and hit[0] > now:
                    self._vectors.move_to_end(u)
                    out[u] = hit[1]
        return out

    def set_vectors(self, vectors: Mapping[str, np.ndarray], ttl_s: float) -> None:
        until = time.monotonic() + ttl_s
        with self._lock:
            for u, v in vectors.items():
                self._vectors[u] = (until, np.asarray(v, np.float32))
                self._vectors.move_to_end(u)
            while len(self._vectors) > self._max:
                self._vectors.popitem(last=False)

    def drop_vector(self, user_id: str) -> None:
        with self._lock:
            self._vectors.pop(user_id, None)

    def add_event(self, user_id: str, event: Mapping[str, Any]) -> None:
        with self._lock:
            self._events[user_id].append(dict(event))

    def events(self, user_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            return {u: list(self._events[u]) for u in user_ids if self._events.get(u)}

    def shown(self, user_id: str) -> set[str]:
        now = time.time()
        with self._lock:
            return {i for i, until in self._shown.get(user_id, {}).items() if until > now}

    def add_shown(self, user_id: str, item_ids: Sequence[str], ttl_s: float) -> None:
        until = time.time() + ttl_s
        with self._lock:
            mine = self._shown[user_id]
            for i in item_ids:
                mine[i] = until


@dataclass
class Recommendation:
    """One served item."""

    item_id: str
    score: float
    rank: int
    category: str
    source: str  # the candidate source contributing most to its fused score (or "popularity_fill", "trending")


@dataclass
class Answer:
    """A request's answer and how it was produced."""

    items: list[Recommendation]
    stages_ms: dict[str, float] = field(default_factory=dict)
    cold: bool = False
    embedding: EmbeddingSource = "none"  # where the user's embedding came from
    fallbacks: list[str] = field(default_factory=list)  # state stores that failed during the call
    batch: int = 1  # requests answered in the same block as this one

    @property
    def cache_hit(self) -> bool:
        """The user's embedding came from the cache (what the service code of Bentos built before ``embedding``
        reads: a Bento carries its service code, the engine comes from the installed package)."""
        return self.embedding == "hit"


@dataclass
class Request:
    """One ``/recommend`` call (see :meth:`Engine.recommend`)."""

    user_id: str
    k: int = 20
    context: Mapping[str, Any] | None = None
    exclude: Sequence[str] = ()
    filter_shown: bool | None = None
    request_id: str | None = None


@dataclass
class _Pending:
    """A request once its per-user state is read: what its block needs."""

    user: str
    k: int
    request_id: str | None
    device: Any
    location: Any
    has_context: bool  # a device or a location was given: the request's context replaces the latest event's
    demographics: dict[str, Any]
    blocked: set[str]  # excluded and recently shown items
    fresh: dict[str, list[dict[str, Any]]]
    shown_on: bool
    guarded: _Guarded
    failures: list[str]
    precomputed: bool  # a known user without fresh events: the precomputed user state serves them


class _Guarded:
    """Calls a store, swallowing and counting its errors (a down Redis must never fail a request)."""

    def __init__(self, store: StateStore | None, failures: list[str]) -> None:
        self.store, self.failures = store, failures

    def __call__(self, method: str, *args: Any, default: Any = None) -> Any:
        if self.store is None:
            return default
        try:
            return getattr(self.store, method)(*args)
        except Exception as exc:  # noqa: BLE001 - any store failure degrades to "no state"
            log.warning("state store %s failed (%s: %s); answering without it", method, type(exc).__name__, exc)
            self.failures.append(method)
            return default


class _CacheAdapter:
    """The two-stage path's vector cache over a guarded store."""

    def __init__(self, guarded: _Guarded, ttl_s: float) -> None:
        self.guarded, self.ttl_s = guarded, ttl_s
        self.found: set[str] = set()

    def get_many(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        found = self.guarded("get_vectors", list(user_ids), default={}) or {}
        self.found.update(found)
        return found

    def set_many(self, vectors: Mapping[str, np.ndarray]) -> None:
        self.guarded("set_vectors", dict(vectors), self.ttl_s)


class Engine:
    """One user's two-stage recommendations at the prepared moment, with fresh events and recently-shown state."""

    def __init__(self, state: Prepared, store: StateStore | None = None, rules: bool = True,
                 filter_shown: bool = True, epsilon: float = 0.0, embedding_ttl_s: float = EMBEDDING_TTL_S,
                 shown_ttl_s: float = SHOWN_TTL_S, drill: str | None = None, precompute_users: bool = True,
                 compiled_ranker: bool = False, ranker_cache_dir: str | None = None,
                 flagged: Callable[[], Set[str]] | None = None) -> None:
        """``flagged`` gives the items never to serve (the safety flags), asked at each request, so a change
        applies from the next one."""
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon={epsilon}: use a probability in [0, 1]")
        if drill not in DRILLS:
            raise ValueError(f"drill={drill!r}: use one of {DRILLS} (None: serve normally)")
        self.drill = drill
        if precompute_users and state.user_state is None:
            state = with_user_state(state)  # each user's history-only part, once per snapshot
        if compiled_ranker:
            state = _with_compiled_ranker(state, ranker_cache_dir)
        _ = state.orders, state.item_rows_of, state.two_tower_items  # computed once here, not by the first request
        self.state, self.store, self.rules = state, store, rules
        self._base, self._flags_seen, self._flags_in_force = state, None, frozenset()
        self.filter_shown, self.epsilon = filter_shown, epsilon
        self.flagged = flagged
        self.embedding_ttl_s, self.shown_ttl_s = embedding_ttl_s, shown_ttl_s
        # The freshness rule's item ages by catalog index (rank_block reads them by the pool's catalog index).
        self.ages = item_age_days(state.moment.items, state.moment.at).reindex(state.item_array).to_numpy(float)
        # Users whose precomputed state a block uses (user_blocks' test): users with history and users-table users.
        self._precomputed = frozenset(state.user_state.index) if state.user_state is not None else frozenset()
        self._max_block = block_size(state.fit)  # user_blocks' users per block: a group is one block
        self._columns = list(state.history.columns)
        self._lock = threading.Lock()  # one request at a time (the work holds the GIL; interleaving only adds latency)

    @property
    def at(self) -> pd.Timestamp:
        return self.state.moment.at

    def _fresh_frame(self, events: dict[str, list[dict[str, Any]]]) -> pd.DataFrame | None:
        rows = [e for evs in events.values() for e in evs]
        if not rows:
            return None
        frame = pd.DataFrame(rows)
        # Events after the snapshot moment count as the user's newest events at it (the moment does not move).
        frame[TIMESTAMP] = self.at - pd.Timedelta(microseconds=1)
        for col in self._columns:
            if col not in frame:
                frame[col] = None
        return frame[self._columns].astype({USER_ID: str, ITEM_ID: str})

    def recommend(self, user_id: str, k: int = 20, context: Mapping[str, Any] | None = None,
                  exclude: Sequence[str] = (), filter_shown: bool | None = None,
                  request_id: str | None = None) -> Answer:
        """The user's top ``k`` (see the module docstring)."""
        return self.recommend_many([Request(user_id, k, context, tuple(exclude), filter_shown, request_id)])[0]

    def _apply_flags(self) -> None:
        """The catalog without the flagged items, rebuilt only when the flags changed."""
        flags = self.flagged() if self.flagged is not None else None
        if isinstance(flags, frozenset) and flags is self._flags_seen:
            return  # the same immutable set (a service's FlagsFile replaces it on a change): nothing to compare
        self._flags_seen = flags
        now = frozenset(flags or ())
        if now != self._flags_in_force:
            self._flags_in_force = now
            self.state = with_blocked_items(self._base, now)

    def recommend_many(self, requests: Sequence[Request]) -> list[Answer]:
        """Answers to several requests, in their order: the same answers as :meth:`recommend` one at a time.

        Requests that can share a block of the shared path (distinct users on the precomputed user state, the same
        ``k``, each with or each without a device / location; at most a block of :func:`block_size` users) go through
        :func:`user_blocks` and :func:`rank_block` together, as ``recsys recommend`` and ``evaluate`` rank
        blocks of users: most of a request's cost is per call, not per candidate, so a block of a few users
        costs much less than the same requests one by one. A user asking twice is answered in order (the second
        request after the first's items count as shown). A service hands it the requests that queued while the
        previous ones were answered (``serving/service.py``); alone it is one request.
        """
        answers: list[Answer | None] = [None] * len(requests)
        self._apply_flags()  # the flags in force for this batch
        # A user's second request in the batch comes in the next round, after the first one's answer is recorded as
        # shown (one at a time, it would not get those items again).
        seen: dict[str, int] = {}
        rounds: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            user = str(request.user_id)
            rounds.setdefault(seen.get(user, 0), []).append(i)
            seen[user] = seen.get(user, 0) + 1
        for indices in rounds.values():
            t0 = time.perf_counter()
            prepared = [self._prepare(requests[i]) for i in indices]
            state_ms = (time.perf_counter() - t0) * 1000 / len(indices)
            done: list[Answer] = [None] * len(indices)  # type: ignore[list-item]
            for group in self._groups(prepared):
                for j, answer in zip(group, self._answer_group([prepared[j] for j in group]), strict=True):
                    answer.stages_ms["state"] += state_ms
                    done[j] = answer
            for i, item, answer in zip(indices, prepared, done, strict=True):
                t3 = time.perf_counter()
                if item.shown_on:
                    item.guarded("add_shown", item.user, [r.item_id for r in answer.items], self.shown_ttl_s)
                answer.stages_ms["state"] += (time.perf_counter() - t3) * 1000
                answer.fallbacks = item.failures
                answers[i] = answer
        return answers  # type: ignore[return-value]

    def _prepare(self, request: Request) -> _Pending:
        """A request's per-user state reads (fresh events, recently shown) and its block parameters."""
        failures: list[str] = []
        guarded = _Guarded(self.store, failures)
        user = str(request.user_id)
        fresh = guarded("events", [user], default={}) or {}
        shown_on = self.filter_shown if request.filter_shown is None else request.filter_shown
        blocked = set(map(str, request.exclude))
        if shown_on:
            blocked |= guarded("shown", user, default=set()) or set()
        context = dict(request.context or {})
        demographics = {key: context[key] for key in DEMOGRAPHIC_COLUMNS if context.get(key) not in (None, "")}
        return _Pending(user, request.k, request.request_id, context.get("device"), context.get("location"),
                        bool(context.get("device") or context.get("location")), demographics, blocked, fresh,
                        shown_on, guarded, failures, precomputed=user in self._precomputed and not fresh)

    def _groups(self, pending: Sequence[_Pending]) -> list[list[int]]:
        """Indices of the requests of one round (distinct users) that share a block (see :meth:`recommend_many`)."""
        groups: dict[tuple[Any, ...], list[list[int]]] = {}
        for i, p in enumerate(pending):
            fill_k = p.k + len(p.blocked)
            key = (p.k, p.has_context, fill_k > self.state.fit.config.pool_size, self.drill is not None)
            if key[-2] or key[-1] or not p.precomputed:
                # Alone, exactly as one request is answered: a long fill, a drill, and a user whose embedding is
                # computed now (unknown, or with fresh events: the user tower's float32 results may depend on how
                # many users it embeds at once, and the embedding is cached for later requests).
                key = (*key, i)
            open_groups = groups.setdefault(key, [])  # a round's users are distinct (recommend_many)
            if open_groups and len(open_groups[-1]) < self._max_block:
                open_groups[-1].append(i)
            else:
                open_groups.append([i])
        return sorted((g for gs in groups.values() for g in gs), key=lambda g: g[0])

    def _answer_group(self, group: Sequence[_Pending]) -> list[Answer]:
        """One block of the shared path for requests that can share it."""
        failures: list[str] = []
        users = [p.user for p in group]
        k = group[0].k
        requests = None
        if group[0].has_context:  # a group is all with or all without (see _groups)
            requests = pd.DataFrame({USER_ID: users, "device": [p.device for p in group],
                                     "location": [p.location for p in group]})
        demographics = {p.user: p.demographics for p in group if p.demographics}
        fresh = {u: evs for p in group for u, evs in p.fresh.items()}
        exclude = {p.user: p.blocked for p in group if p.blocked}
        with self._lock:
            t1 = time.perf_counter()
            cache = _CacheAdapter(_Guarded(self.store, failures), self.embedding_ttl_s)
            block = next(user_blocks(self.state, users, fill_k=max(p.k + len(p.blocked) for p in group),
                                     requests=requests, vectors=cache, fresh=self._fresh_frame(fresh),
                                     demographics=demographics or None))
            t2 = time.perf_counter()
            if self.drill:  # a deliberately degraded model (canary drills): the candidates, shuffled or worst first
                ranked = {}
                for p in group:
                    every = rank_block(self.state.fit, block, len(block.column(ITEM_ID)), rules=False,
                                       exclude={p.user: p.blocked} if p.blocked else None)[p.user]
                    pooled = set(map(str, block.column(ITEM_ID)))
                    every = [pair for pair in every if pair[0] in pooled]  # no popularity fill
                    ranked[p.user] = random.Random(p.request_id or p.user).sample(every, min(k, len(every))) \
                        if self.drill == "random_ranking" else every[::-1][:k]
            else:
                ranked = rank_block(self.state.fit, block, k, rules=self.rules, age_days=self.ages,
                                    exclude=exclude or None)
            t3 = time.perf_counter()
        if self.epsilon > 0:
            ranked = {p.user: explore(ranked[p.user], self.epsilon, random.Random(p.request_id or p.user))
                      for p in group}
        stages = {"candidates_features": (t2 - t1) * 1000, "rank_rules": (t3 - t2) * 1000}
        for p in group:
            p.failures.extend(failures)
        return [Answer(self._describe(block, p.user, ranked[p.user]), {"state": 0.0, **stages},
                       cold=p.user in block.cold, embedding=self._embedding_source(p, cache), batch=len(group))
                for p in group]

    def _embedding_source(self, pending: _Pending, cache: _CacheAdapter) -> EmbeddingSource:
        if self.state.fit.model is None:
            return "none"
        if pending.precomputed and self.state.user_state is not None and self.state.user_state.vectors is not None:
            return "precomputed"  # user_blocks reads it from the user state: no cache lookup
        return "hit" if pending.user in cache.found else "miss"

    def _describe(self, block: Any, user: str, ranked: list[tuple[str, float]]) -> list[Recommendation]:
        weights = self.state.fit.config.weights
        rrf_k = self.state.fit.config.rrf_k
        mine = np.flatnonzero(np.asarray(block.column(USER_ID), dtype=object) == user)
        row_of = dict(zip(np.asarray(block.column(ITEM_ID), dtype=object)[mine].tolist(), mine.tolist(), strict=True))
        rows = np.array([row_of.get(item, -1) for item, _ in ranked], dtype=np.int64)
        # Each served item's source: the one contributing most to its fused score (ties: the first in SOURCES).
        contrib = np.stack([weights.get(s, 0.0) / (rrf_k + np.asarray(block.column(f"{s}_rank"), dtype=float)[rows])
                            for s in SOURCES], axis=1) if len(rows) else np.zeros((0, len(SOURCES)))
        contrib = np.where(np.isnan(contrib), -np.inf, contrib)
        best = contrib.argmax(axis=1) if len(rows) else np.zeros(0, np.int64)
        category = self.state.category
        out = []
        for rank, ((item, score), row, i) in enumerate(zip(ranked, rows.tolist(), best.tolist(), strict=True),
                                                       start=1):
            if user in block.cold:
                source = "trending"
            elif row < 0:
                source = "popularity_fill"
            else:
                source = SOURCES[i] if np.isfinite(contrib[rank - 1, i]) else "pool"
            out.append(Recommendation(item, float(score), rank, str(category.get(item, "unknown")), source))
        return out

    def add_event(self, user_id: str, item_id: str, event_type: str, context: Mapping[str, Any] | None = None
                  ) -> list[str]:
        """Put a feedback event into the user's history and drop their cached embedding; returns failures."""
        failures: list[str] = []
        guarded = _Guarded(self.store, failures)
        event = {USER_ID: str(user_id), ITEM_ID: str(item_id), "event_type": event_type,
                 **{k: v for k, v in (context or {}).items() if k in ("device", "location")}}
        guarded("add_event", str(user_id), event)
        guarded("drop_vector", str(user_id))
        return failures


def _with_compiled_ranker(state: Prepared, cache_dir: str | None, users: int = 8) -> Prepared:
    """``state`` with its fit's ranker compiled (:mod:`pipeline_tasks.online.compiled_ranker`) when the compiled
    model gives the Booster's scores on the candidates of a few of the snapshot's users; else ``state``."""
    from pipeline_tasks.online.compiled_ranker import CompiledRanker, compile_ranker, verified
    from pipeline_tasks.online.ranking_features import FEATURE_COLUMNS

    booster = state.fit.ranker
    if booster is None or isinstance(booster, CompiledRanker):
        return state
    compiled = compile_ranker(booster, cache_dir)
    if compiled is None:
        return state
    sample = sorted(state.rows_of)[:users]
    rows = [block.features[FEATURE_COLUMNS].to_numpy(np.float32) for block in user_blocks(state, sample, fill_k=0)]
    if not rows or not verified(compiled, booster, np.vstack(rows)):
        return state
    return dataclasses.replace(state, fit=dataclasses.replace(state.fit, ranker=compiled))


# Canary drills: serve a deliberately degraded ranking of the candidates (random order, or the ranker's worst first).
DRILLS = (None, "random_ranking", "reverse_ranking")


def explore(ranked: list[tuple[str, float]], epsilon: float, rng: random.Random) -> list[tuple[str, float]]:
    """Epsilon-greedy: each position after the first is, with probability ``epsilon``, swapped with a random
    later position (scores travel with their items)."""
    out = list(ranked)
    for pos in range(1, len(out) - 1):
        if rng.random() < epsilon:
            other = rng.randrange(pos + 1, len(out))
            out[pos], out[other] = out[other], out[pos]
    return out
