"""The recommendation service (BentoML): one registered bundle version, answered in process memory.

Start it with ``recsys serve [--model-version V]`` (it resolves the bundle, writes its serving snapshot once and
runs ``bentoml serve serving.service:RecsysService``) or ``bentoml serve <bento tag>`` for a Bento that
``build_bento`` built. Configuration is read from the environment (``recsys serve`` sets it):

- ``RECSYS_BUNDLE_DIR``: the bundle directory (in a Bento: ``serving/bundle`` next to this file);
- ``RECSYS_SNAPSHOT_DIR``: the serving snapshot (default ``<bundle>/snapshot``);
- ``RECSYS_SNAPSHOT_POINTER``: a ``current.json`` naming the snapshot to serve (``recsys serve`` sets it; default
  ``$RECSYS_HOME/serving/<model>/v<version>/current.json``, where the hourly ``recsys_item_refresh`` DAG publishes
  a fresh snapshot when the data, the feature store or the index extensions change, and ``recsys snapshot`` writes
  one by hand). Every ``RECSYS_REFRESH_S`` seconds (default 30) a background thread reads it; a new snapshot is
  loaded beside the one in use and swapped in atomically with the newest index extension's items (requests in
  flight finish on the old one); a snapshot that fails to load is logged and counted, and the old one stays;
- ``RECSYS_FEEDBACK_DIR``: the impressions / feedback log (default ``$RECSYS_HOME/feedback/<namespace>``);
- ``RECSYS_SAFETY_FLAGS``: the safety flags file (default ``$RECSYS_HOME/serving/<model>/safety_flags.jsonl``,
  written by ``recsys flag``; :mod:`pipeline_tasks.online.safety`). It is read before the service is ready (a file
  that fails to parse fails the load, naming the line) and re-read within about a second of every change by a
  thread of its own; flagged items join every request's blocked set, so none is ever served. A change that fails
  to parse is logged and counted, and the flags in force stay;
- ``RECSYS_STATE``: ``local`` (one worker, state in process; the embedded default) or ``redis``
  (``RECSYS_REDIS_URL``; any number of workers share embedding cache, fresh events and recently-shown lists);
- ``RECSYS_DRILL=random_ranking|reverse_ranking``: a canary drill -- serve the candidate pool in random order or
  worst first (a deliberately degraded model, for rehearsing a rollback); unset in normal service;
- ``RECSYS_EPSILON`` (exploration, default 0 = off), ``RECSYS_FILTER_SHOWN`` (default 1), ``RECSYS_RULES``
  (default 1), ``RECSYS_ACCESS_LOG`` (BentoML's access log, default 1).

Endpoints: ``POST /recommend``, ``POST /feedback``, BentoML's ``/readyz`` (ready once bundle, index, snapshot and
features are loaded), ``/livez``, ``/healthz`` and ``/metrics`` (with the ``recsys_*`` metrics below).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import bentoml
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

log = logging.getLogger("bentoml.recsys")  # BentoML logs its own tree at INFO, the root at WARNING

BUNDLE_IN_BENTO = Path(__file__).resolve().parent / "bundle"
STAGES = ("state", "candidates_features", "rank_rules", "log")
VARIANT = r"^[a-z_]+$"  # the canary router's variant (champion / challenger), logged with every event

# Custom Prometheus metrics on BentoML's /metrics (workers run prometheus_client's multiprocess mode).
requests_total = Counter("recsys_requests", "Requests by endpoint and outcome", ["endpoint", "outcome"])
latency = Histogram("recsys_stage_latency_seconds", "Latency of each stage of /recommend (and the total)",
                    ["stage"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
model_info = Gauge("recsys_model_version", "The bundle version served, by model", ["model"],
                   multiprocess_mode="max")
cache_lookups = Counter("recsys_embedding_cache", "Where each /recommend's user embedding came from: hit / miss (a "
                        "cache lookup; a miss computes and caches it) or precomputed (the snapshot's per-user state, "
                        "no lookup). Cache hit rate: hit / (hit + miss)", ["result"])
fallbacks = Counter("recsys_fallbacks", "Answers given without a part of the path, by kind", ["kind"])
freshness_lag = Gauge("recsys_freshness_lag_seconds", "Seconds from the serving snapshot's moment to now",
                      multiprocess_mode="max")
snapshot_moment = Gauge("recsys_snapshot_moment_seconds", "The serving snapshot's moment (Unix seconds)",
                        multiprocess_mode="max")
ranker_compiled = Gauge("recsys_ranker_compiled", "1 when the ranker runs as compiled trees (lleaves), 0 when as "
                        "a LightGBM Booster", multiprocess_mode="min")
refreshes = Counter("recsys_snapshot_refreshes", "Background snapshot swaps by outcome", ["outcome"])
safety_flagged = Gauge("recsys_safety_flagged_items", "Items under a safety flag, never served",
                       multiprocess_mode="livemax")
safety_reloads = Counter("recsys_safety_flag_reloads", "Re-reads of the safety flags file after a change, by outcome",
                         ["outcome"])
batch_sizes = Histogram("recsys_batch_size", "Requests answered together in one block of the shared path",
                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))


class MicroBatcher:
    """Answers the ``/recommend`` requests that queued while the previous ones were computed, together.

    A worker computes one block at a time on its event loop; the requests that arrive meanwhile wait in the
    loop. When a block is done, everything queued by then (at most ``max_batch``) goes into the next one
    (:meth:`Engine.recommend_many`: the same answers as one at a time, at a lower cost per request). Nothing
    waits for a batch to fill: an idle service answers each request at once, alone. A block that raises is
    answered again one request at a time, so one bad request fails alone.
    """

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max(1, max_batch)
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.running = False
        self._task: asyncio.Task | None = None  # the loop keeps only a weak reference to a task

    async def answer(self, engine: Any, request: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((request, future))
        if not self.running:
            self.running = True
            self._task = loop.create_task(self._drain(engine))
        return await future

    async def _drain(self, engine: Any) -> None:
        batch: list[tuple[Any, asyncio.Future]] = []
        try:
            while self.pending:
                await asyncio.sleep(0)  # requests already read from the sockets join this block
                batch, self.pending = self.pending[:self.max_batch], self.pending[self.max_batch:]
                batch = [(r, f) for r, f in batch if not f.done()]  # a cancelled request (client gone)
                if batch:
                    self._run(engine(), batch)
        finally:
            self.running = False
            # Whatever stopped the drain early (it should not), no request waits forever.
            for _, future in [*batch, *self.pending]:
                if not future.done():
                    future.set_exception(RuntimeError("the request was not answered: the batcher stopped"))
            self.pending = []

    @staticmethod
    def _run(engine: Any, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            answers = engine.recommend_many([r for r, _ in batch])
        except Exception:  # noqa: BLE001 - answered again one by one below; the failing request gets its error
            answers = None
        if answers is not None:
            batch_sizes.observe(len(batch))
            for (_, future), answer in zip(batch, answers, strict=True):
                future.set_result(answer)
            return
        for request, future in batch:
            try:
                future.set_result(engine.recommend_many([request])[0])
            except Exception as exc:  # noqa: BLE001 - this request's own failure, raised in its handler
                future.set_exception(exc)


class Context(BaseModel):
    """The request's context; unknown keys are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    device: str | None = Field(default=None, max_length=64)
    location: str | None = Field(default=None, max_length=128)


class Item(BaseModel):
    item_id: str
    score: float
    rank: int
    category: str
    source: str


class RecommendResponse(BaseModel):
    request_id: str
    user_id: str
    items: list[Item]
    model_version: int
    latency_ms: float


class FeedbackResponse(BaseModel):
    accepted: bool
    request_id: str


class JsonBodyOnly:
    """ASGI middleware: a POST to the API with a body type other than JSON gets a 415 naming the header
    (BentoML's own parsing answers a multipart type without a boundary with a 500)."""

    def __init__(self, app: Any, paths: tuple[str, ...] = ("/recommend", "/feedback")) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("method") == "POST" and scope.get("path") in self.paths:
            raw = dict(scope.get("headers") or []).get(b"content-type", b"")
            kind = raw.split(b";")[0].strip().lower().decode("latin-1")
            if kind and kind != "application/json":
                response = JSONResponse({"error": f"content-type {kind!r} is not supported: send application/json",
                                         "field": "content-type"}, status_code=415)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _pointer(bundle: Any) -> Path:
    """``RECSYS_SNAPSHOT_POINTER``, else the version's own ``$RECSYS_HOME/serving/<model>/v<version>/current.json``
    (where ``recsys_item_refresh`` publishes fresh snapshots)."""
    from pipeline_tasks.bundle.publish import POINTER, serving_dir

    given = os.environ.get("RECSYS_SNAPSHOT_POINTER")
    return Path(given) if given else serving_dir(bundle) / POINTER


def _pointed_snapshot(pointer: Path | None) -> Path | None:
    """The snapshot directory ``pointer`` names (None when unset or missing)."""
    import json

    if pointer is None or not pointer.exists():
        return None
    return Path(json.loads(pointer.read_text())["snapshot"])


def _one_thread_per_worker() -> None:
    """BLAS and OpenMP pools of one thread, like torch's: a worker answers one request at a time, and their threads
    only contended with the other workers and the load (two workers on 2 cores saturated near 50 requests/s with
    them, near 100/s without)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _freeze_heap() -> None:
    """Collect once, then keep the loaded state out of the garbage collector's passes (``gc.freeze``).

    The state is millions of long-lived objects; a full collection walked all of them and stalled a request for
    100-200 ms now and then (the p99 at 40 requests/s and more). Called again after a snapshot swap, after an
    ``unfreeze``, so that the replaced state is collected."""
    import gc

    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _bundle_dir() -> Path:
    given = os.environ.get("RECSYS_BUNDLE_DIR")
    if given:
        return Path(given)
    if BUNDLE_IN_BENTO.exists():
        return BUNDLE_IN_BENTO
    raise RuntimeError("no bundle: set RECSYS_BUNDLE_DIR or start the service with `recsys serve`")


# BentoML's access log writes a line per request; /metrics counts requests and the feedback log records every
# impression, so a deployment may turn it off (RECSYS_ACCESS_LOG=0) for a little less CPU per request.
@bentoml.service(workers=1, traffic={"timeout": 30}, logging={"access": {"enabled": _flag("RECSYS_ACCESS_LOG", "1")}})
class RecsysService:
    """Two-stage recommendations from one bundle version (see the module docstring)."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.error: str | None = None
        self.bundle: Any = None
        self.log: Any = None
        self._flags: Any = None
        self._batcher = MicroBatcher(int(os.environ.get("RECSYS_MAX_BATCH", "8")))
        self._loader = threading.Thread(target=self._load, daemon=True, name="recsys-load")
        self._loader.start()

    def _load(self) -> None:
        try:
            import torch

            from pipeline_tasks.core.settings import load_settings
            from pipeline_tasks.online.bundle import open_bundle
            from pipeline_tasks.online.engine import LocalState
            from pipeline_tasks.online.feedback_log import FeedbackLog
            from pipeline_tasks.online.feedback_log import feedback_dir as served_feedback_dir
            from pipeline_tasks.online.safety import FlagsFile, flags_path
            from pipeline_tasks.online.snapshot import load_snapshot
            from pipeline_tasks.online.two_stage import load_fit, prepare, with_extension_items

            torch.set_num_threads(1)  # one request at a time per worker: intra-op threads only add overhead
            started = time.perf_counter()
            bundle = open_bundle(_bundle_dir())
            pointer = _pointer(bundle) if bundle.version else None
            snapshot_dir = _pointed_snapshot(pointer) or Path(os.environ.get("RECSYS_SNAPSHOT_DIR") or
                                                              bundle.path / "snapshot")
            moment, info = load_snapshot(snapshot_dir)
            if not bundle.version:  # a registry download's bundle.json has no version: the snapshot names it
                bundle.version, bundle.name = int(info.get("version") or 0), info.get("model") or bundle.name
                pointer = _pointer(bundle)
                pointed = _pointed_snapshot(pointer)
                if pointed not in (None, snapshot_dir):  # the version's current snapshot, not the one built in
                    snapshot_dir = pointed
                    moment, info = load_snapshot(snapshot_dir)
            self._pointer_path = pointer
            self._flags = FlagsFile(flags_path(bundle.name))
            self._flags.poll()  # before ready: a flagged item is never served, not even by the first request
            safety_flagged.set(len(self._flags.items))
            self._fit_name = info.get("fit", "serving")
            base_fit = load_fit(bundle.fit_dir(self._fit_name))
            # Index extensions hold serving-tower vectors: only the serving fit serves their items.
            fit = with_extension_items(base_fit, bundle) if self._fit_name == "serving" else base_fit
            state = prepare(fit, moment)
            kind = os.environ.get("RECSYS_STATE", "local")
            if kind == "redis":
                from serving.state import RedisState

                store: Any = RedisState(os.environ.get("RECSYS_REDIS_URL", "127.0.0.1:6379"),
                                        prefix=f"recsys:{bundle.meta.get('namespace', '')}:")
            elif kind == "local":
                store = LocalState()
            else:
                raise ValueError(f"RECSYS_STATE={kind!r}: use 'local' or 'redis'")
            self._base_fit, self._fit, self._store, self.snapshot_dir = base_fit, fit, store, snapshot_dir
            self._shared_state = kind == "redis"
            self.engine = self._engine(state)
            _one_thread_per_worker()
            _freeze_heap()
            snapshot_moment.set(moment.at.timestamp())
            settings = load_settings()
            feedback_dir = served_feedback_dir(bundle.meta.get("namespace", "default"), settings)
            self.log = FeedbackLog(feedback_dir)
            self.bundle = bundle
            model_info.labels(model=bundle.name).set(bundle.version)
            log.info("ready: %s version %d, snapshot at %s (%d users, %d items), state %s, log %s, %d safety-flagged "
                     "items (%s), in %.1f s", bundle.name, bundle.version, moment.at.isoformat(), len(state.rows_of),
                     len(fit.item_ids), kind, feedback_dir, len(self._flags.items), self._flags.path,
                     time.perf_counter() - started)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and every request
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the service failed to load its bundle")
            return
        threading.Thread(target=self._watch, daemon=True, name="recsys-refresh").start()
        threading.Thread(target=self._watch_flags, daemon=True, name="recsys-safety-flags").start()

    def _engine(self, state: Any) -> Any:
        from pipeline_tasks.core.settings import load_settings
        from pipeline_tasks.online.engine import Engine

        engine = Engine(state, self._store, rules=_flag("RECSYS_RULES", "1"),
                        filter_shown=_flag("RECSYS_FILTER_SHOWN", "1"),
                        epsilon=float(os.environ.get("RECSYS_EPSILON", "0")),
                        drill=os.environ.get("RECSYS_DRILL") or None,
                        compiled_ranker=_flag("RECSYS_COMPILED_RANKER", "1"),
                        ranker_cache_dir=str(load_settings().home / "cache" / "lleaves"),
                        flagged=lambda: self._flags.items)  # the set in force at each request
        ranker_compiled.set(float(type(engine.state.fit.ranker).__name__ == "CompiledRanker"))  # refreshes too
        return engine

    def _watch(self) -> None:
        """Swap in the snapshot the pointer names whenever it changes (see the module docstring)."""
        every = float(os.environ.get("RECSYS_REFRESH_S", "30"))
        while True:
            time.sleep(every)
            try:
                target = _pointed_snapshot(self._pointer_path)
                if target is None or target == self.snapshot_dir:
                    continue
                self.refresh(target)
            except Exception:  # noqa: BLE001 - the old snapshot keeps serving; the log says why
                refreshes.labels(outcome="failed").inc()
                log.exception("snapshot refresh failed; still serving %s", self.snapshot_dir)

    def _watch_flags(self) -> None:
        """Re-read the safety flags file whenever it changes (every ``POLL_S``, whatever ``RECSYS_REFRESH_S``)."""
        from pipeline_tasks.online.safety import POLL_S

        while True:
            time.sleep(POLL_S)
            try:
                if self._flags.poll():
                    safety_flagged.set(len(self._flags.items))
                    safety_reloads.labels(outcome="changed").inc()
                    log.info("safety flags: %d items flagged (%s)", len(self._flags.items), self._flags.path)
            except Exception:  # noqa: BLE001 - the flags in force stay; the log names the bad line
                safety_reloads.labels(outcome="failed").inc()
                log.exception("safety flags file changed but could not be read; the %d flags in force stay",
                              len(self._flags.items))

    def refresh(self, snapshot_dir: Path) -> None:
        """Load ``snapshot_dir`` beside the snapshot in use, then swap it in (one reference assignment)."""
        from pipeline_tasks.online.snapshot import load_snapshot
        from pipeline_tasks.online.two_stage import prepare, with_extension_items

        started = time.perf_counter()
        moment, info = load_snapshot(snapshot_dir)
        if int(info.get("version") or self.bundle.version) != self.bundle.version:
            raise ValueError(f"snapshot {snapshot_dir} is of version {info.get('version')}, this service serves "
                             f"version {self.bundle.version}")
        if info.get("fit", "serving") != self._fit_name:
            raise ValueError(f"snapshot {snapshot_dir} is of the {info.get('fit', 'serving')} fit, this service serves "
                             f"the {self._fit_name} fit")
        # Items of index extensions written since the last load come with the new snapshot (the fit is not reloaded).
        if self._fit_name == "serving":
            self._fit = with_extension_items(self._base_fit, self.bundle)
        engine = self._engine(prepare(self._fit, moment))
        self.engine, self.snapshot_dir = engine, snapshot_dir
        _freeze_heap()
        snapshot_moment.set(moment.at.timestamp())
        refreshes.labels(outcome="swapped").inc()
        log.info("refreshed: snapshot %s at %s swapped in after %.1f s of loading", snapshot_dir,
                 moment.at.isoformat(), time.perf_counter() - started)

    def __is_ready__(self) -> bool:
        return self.engine is not None

    def _not_ready(self, endpoint: str) -> JSONResponse | None:
        """A 503 naming why, while the bundle is loading or failed to load (BentoML masks 5xx messages)."""
        if self.engine is not None:
            return None
        requests_total.labels(endpoint=endpoint, outcome="unavailable").inc()
        reason = f"the bundle failed to load: {self.error}" if self.error else "the bundle is still loading"
        return JSONResponse({"error": f"not ready: {reason}; /readyz turns 200 when it is"}, status_code=503)

    @bentoml.api(route="/recommend")
    async def recommend(self, user_id: Annotated[str, Field(min_length=1, max_length=256)],
                  num_items: Annotated[int, Field(ge=1, le=100)] = 20, context: Context | None = None,
                  exclude: Annotated[list[str] | None, Field(max_length=1000)] = None,
                  variant: Annotated[str | None, Field(max_length=32, pattern=VARIANT)] = None) -> RecommendResponse:
        """The user's top ``num_items``: candidates, filters, features, ranker, business rules.

        It runs on the event loop, not in a thread pool: a worker computes one block at a time anyway (the work
        holds the GIL), and a pool thread competing with the loop for the GIL added latency under load. Requests
        that queue meanwhile are answered together (:class:`MicroBatcher`; ``RECSYS_MAX_BATCH``, default 8, 1 =
        one at a time)."""
        started = time.perf_counter()
        unavailable = self._not_ready("recommend")
        if unavailable is not None:
            return unavailable  # type: ignore[return-value]  # a Response passes through BentoML as is
        try:
            from pipeline_tasks.online.engine import Request

            request_id = uuid.uuid4().hex
            request = Request(user_id, num_items, context.model_dump() if context else None, tuple(exclude or ()),
                              request_id=request_id)
            # The block runs on the engine of the moment it starts: a snapshot swap never splits a block.
            answer = await self._batcher.answer(lambda: self.engine, request)
            engine = self.engine
            t = time.perf_counter()
            self.log.append("impressions", [
                {"request_id": request_id, "user_id": user_id, "item_id": r.item_id, "position": r.rank,
                 "score": r.score, "source": r.source, "model": self.bundle.name,
                 "model_version": self.bundle.version, "variant": variant} for r in answer.items])
            answer.stages_ms["log"] = (time.perf_counter() - t) * 1000
        except Exception:
            requests_total.labels(endpoint="recommend", outcome="error").inc()
            raise
        for stage in STAGES:
            latency.labels(stage=stage).observe(answer.stages_ms.get(stage, 0.0) / 1000)
        total = time.perf_counter() - started
        latency.labels(stage="total").observe(total)
        for kind in answer.fallbacks:
            fallbacks.labels(kind=f"state_{kind}").inc()
        if answer.cold:
            fallbacks.labels(kind="cold_start").inc()
        if answer.embedding != "none":
            cache_lookups.labels(result=answer.embedding).inc()
        freshness_lag.set(time.time() - engine.at.timestamp())
        requests_total.labels(endpoint="recommend", outcome="ok").inc()
        return RecommendResponse(request_id=request_id, user_id=user_id, model_version=self.bundle.version,
                                 latency_ms=round(total * 1000, 3),
                                 items=[Item(item_id=r.item_id, score=r.score, rank=r.rank, category=r.category,
                                             source=r.source) for r in answer.items])

    @bentoml.api(route="/feedback")
    def feedback(self, request_id: Annotated[str, Field(min_length=1, max_length=128)],
                 user_id: Annotated[str, Field(min_length=1, max_length=256)],
                 item_id: Annotated[str, Field(min_length=1, max_length=256)],
                 event_type: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z_]+$")],
                 timestamp: str | None = None, context: Context | None = None,
                 variant: Annotated[str | None, Field(max_length=32, pattern=VARIANT)] = None,
                 history_only: bool = False) -> FeedbackResponse:
        """Log an event (durable before the answer) and put it into the user's history at once.

        ``history_only`` (the canary router's copy of an event another variant's service logged): not logged again;
        it enters the history only when this service keeps it in process (with Redis state the history is shared
        and already has it), so a user moved between variants keeps their recent events."""
        import pandas as pd

        unavailable = self._not_ready("feedback")
        if unavailable is not None:
            return unavailable  # type: ignore[return-value]  # a Response passes through BentoML as is
        if timestamp is not None:
            try:
                ts = pd.Timestamp(timestamp)
                if ts is pd.NaT:
                    raise ValueError("empty time")
            except (ValueError, TypeError) as exc:
                requests_total.labels(endpoint="feedback", outcome="bad_request").inc()
                return JSONResponse({"error": f"timestamp: {timestamp!r} is not an ISO-8601 time ({exc})",
                                     "field": "timestamp"}, status_code=400)  # type: ignore[return-value]
            ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        else:
            ts = pd.Timestamp.now(tz="UTC")
        ctx = context.model_dump() if context else {}
        if history_only:
            if not self._shared_state:
                self.engine.add_event(user_id, item_id, event_type, ctx)
            requests_total.labels(endpoint="feedback", outcome="history_only").inc()
            return FeedbackResponse(accepted=True, request_id=request_id)
        self.log.append("feedback", [{"request_id": request_id, "user_id": user_id, "item_id": item_id,
                                      "event_type": event_type, "timestamp": ts.isoformat(),
                                      "device": ctx.get("device"), "location": ctx.get("location"),
                                      "model_version": self.bundle.version, "variant": variant}])
        for kind in self.engine.add_event(user_id, item_id, event_type, ctx):
            fallbacks.labels(kind=f"state_{kind}").inc()
        requests_total.labels(endpoint="feedback", outcome="ok").inc()
        return FeedbackResponse(accepted=True, request_id=request_id)


RecsysService.add_asgi_middleware(JsonBodyOnly)
