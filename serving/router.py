"""The canary router (BentoML): one front door for the champion's and the challenger's services.

``bentoml serve serving.router:RecsysRouter`` (``recsys canary router`` starts it detached). A user goes to the
challenger when ``hash(salt + user_id) % 10000 < share_bp`` (:mod:`pipeline_tasks.online.routing`), else to the
champion, the same in every request; ``/feedback`` follows the user's variant, so a variant's feedback reaches the
service that served it (and is copied, as history only, to the other variant's service: a user whom a share change
moves keeps their recent events). Every answer carries ``variant`` and ``model_version``, and the router logs each
request (``ab_requests``: request id, user, variant, model version, items, latency, outcome) and each feedback
event (``ab_feedback``) to its own append-only log, which the canary analysis reads.

The route (target URLs and versions, ``share_bp``, ``salt``) lives in a JSON file (``RECSYS_ROUTER_STATE``,
default ``$RECSYS_HOME/canary/route.json``). ``POST /canary/route`` changes it: it is validated, written
atomically and swapped in with one reference assignment, so a request in flight finishes on the route it started
with and none is dropped; the file is also re-read when another process rewrote it. A challenger that errors (5xx,
connection) or takes longer than ``RECSYS_CHALLENGER_TIMEOUT_S`` (default 1 s) is answered by the champion instead
(``recsys_router_fallbacks``); a 4xx (the request's own fault) is passed through as is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Any

import bentoml
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field
from starlette.responses import JSONResponse

from pipeline_tasks.online.routing import BUCKETS, CHALLENGER, CHAMPION, Route, read_route, write_route

log = logging.getLogger("bentoml.recsys.router")

routed = Counter("recsys_router_requests", "Requests by endpoint, variant and outcome", ["endpoint", "variant",
                                                                                           "outcome"])
mirrored = Counter("recsys_router_feedback_mirrored", "Feedback copied as history to the other variant's service",
                   ["variant", "outcome"])
router_fallbacks = Counter("recsys_router_fallbacks", "Challenger requests answered by the champion, by reason",
                           ["endpoint", "reason"])
router_latency = Histogram("recsys_router_latency_seconds", "Latency of /recommend through the router, by variant",
                           ["variant"], buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
share_gauge = Gauge("recsys_router_share_bp", "The challenger's share of users (basis points)",
                    multiprocess_mode="max")
version_gauge = Gauge("recsys_router_model_version", "The model version behind each variant", ["variant"],
                      multiprocess_mode="max")


def state_path() -> Path:
    """The route file: ``RECSYS_ROUTER_STATE``, else ``$RECSYS_HOME/canary/route.json``."""
    given = os.environ.get("RECSYS_ROUTER_STATE")
    if given:
        return Path(given)
    from pipeline_tasks.core.settings import load_settings

    return load_settings().home / "canary" / "route.json"


@bentoml.service(workers=1, traffic={"timeout": 30})
class RecsysRouter:
    """Sticky champion/challenger routing with fallback (see the module docstring)."""

    def __init__(self) -> None:
        import httpx

        from pipeline_tasks.core.settings import load_settings
        from pipeline_tasks.online.feedback_log import FeedbackLog

        self.path = state_path()
        if not self.path.exists():
            raise RuntimeError(f"no route at {self.path}: start the router with `recsys canary router` (it writes "
                               "the champion's route first) or set RECSYS_ROUTER_STATE")
        self.route = read_route(self.path)
        self._mtime = self.path.stat().st_mtime_ns
        self._lock = threading.Lock()
        self.timeout = float(os.environ.get("RECSYS_CHALLENGER_TIMEOUT_S", "1.0"))
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0),
                                        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
        log_dir = os.environ.get("RECSYS_ROUTER_LOG_DIR") or load_settings().home / "canary" / "log"
        self.log = FeedbackLog(log_dir)
        self._mirrors: set[asyncio.Task[None]] = set()
        self._publish(self.route)
        log.info("router ready: %s", asdict(self.route))

    def _publish(self, route: Route) -> None:
        share_gauge.set(route.share_bp)
        version_gauge.labels(variant=CHAMPION).set(route.champion_version)
        version_gauge.labels(variant=CHALLENGER).set(route.challenger_version or 0)

    def _current(self) -> Route:
        """The route in force, re-read when another process rewrote the file (a stat per request)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return self.route
        if mtime != self._mtime:
            with self._lock:
                if mtime != self._mtime:
                    try:
                        self.route, self._mtime = read_route(self.path), mtime
                        self._publish(self.route)
                    except (OSError, ValueError, TypeError, KeyError) as exc:  # a half-edited file by hand
                        log.error("route file %s unreadable (%s); keeping %s", self.path, exc, asdict(self.route))
        return self.route

    async def _forward(self, route: Route, variant: str, endpoint: str, body: dict[str, Any]
                       ) -> tuple[str, Any, str | None]:
        """POST ``body`` to the variant's service; a failing challenger falls back to the champion.
        Returns (variant that answered, response, fallback reason)."""
        import httpx

        url, _ = route.target(variant)
        if variant == CHALLENGER:
            try:
                res = await self.client.post(f"{url}{endpoint}", json={**body, "variant": variant},
                                             timeout=self.timeout)
                if res.status_code < 500:
                    return variant, res, None
                reason = f"status_{res.status_code}"
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.HTTPError:
                reason = "connection"
            router_fallbacks.labels(endpoint=endpoint.strip("/"), reason=reason).inc()
            url, _ = route.target(CHAMPION)
            res = await self.client.post(f"{url}{endpoint}", json={**body, "variant": CHAMPION})
            return CHAMPION, res, reason
        res = await self.client.post(f"{url}{endpoint}", json={**body, "variant": variant})
        return variant, res, None

    @staticmethod
    def _unanswered(endpoint: str, assigned: str) -> JSONResponse:
        """A 502 when even the champion did not answer (counted; the traceback goes to the router log)."""
        routed.labels(endpoint=endpoint, variant=assigned, outcome="error").inc()
        log.exception("%s: the champion's service did not answer", endpoint)
        return JSONResponse({"error": "the champion's service did not answer; see the router log"}, status_code=502)

    @bentoml.api(route="/recommend")
    async def recommend(self, user_id: Annotated[str, Field(min_length=1, max_length=256)],
                        num_items: Annotated[int, Field(ge=1, le=100)] = 20,
                        context: dict[str, Any] | None = None,
                        exclude: Annotated[list[str] | None, Field(max_length=1000)] = None) -> dict[str, Any]:
        """The user's variant answers (the champion when the challenger fails); the answer names both."""
        started = time.perf_counter()
        route = self._current()
        assigned = route.variant(user_id)
        body = {"user_id": user_id, "num_items": num_items, "context": context, "exclude": exclude}
        try:
            variant, res, fallback = await self._forward(route, assigned, "/recommend", body)
        except Exception:
            return self._unanswered("recommend", assigned)  # type: ignore[return-value]
        latency = time.perf_counter() - started
        outcome = "ok" if res.status_code < 400 else ("bad_request" if res.status_code < 500 else "error")
        routed.labels(endpoint="recommend", variant=variant, outcome=outcome).inc()
        router_latency.labels(variant=variant).observe(latency)
        if res.status_code >= 300:
            return JSONResponse(res.json() if res.content else {}, status_code=res.status_code)  # type: ignore
        answer = res.json()
        request_id = answer.get("request_id") or uuid.uuid4().hex
        version = answer.get("model_version")
        self.log.append("ab_requests", [{
            "request_id": request_id, "user_id": user_id, "variant": variant, "assigned": assigned,
            "model_version": version, "items": [i["item_id"] for i in answer.get("items", [])],
            "latency_ms": round(latency * 1000, 3), "fallback": fallback, "share_bp": route.share_bp}])
        return {**answer, "variant": variant, "fallback": fallback}

    @bentoml.api(route="/feedback")
    async def feedback(self, request_id: Annotated[str, Field(min_length=1, max_length=128)],
                       user_id: Annotated[str, Field(min_length=1, max_length=256)],
                       item_id: Annotated[str, Field(min_length=1, max_length=256)],
                       event_type: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z_]+$")],
                       timestamp: str | None = None, context: dict[str, Any] | None = None) -> dict[str, Any]:
        """Logged with the user's variant, then forwarded to that variant's service."""
        route = self._current()
        assigned = route.variant(user_id)
        body = {"request_id": request_id, "user_id": user_id, "item_id": item_id, "event_type": event_type,
                "timestamp": timestamp, "context": context}
        try:
            variant, res, fallback = await self._forward(route, assigned, "/feedback", body)
        except Exception:
            return self._unanswered("feedback", assigned)  # type: ignore[return-value]
        if res.status_code >= 300:
            routed.labels(endpoint="feedback", variant=variant, outcome="bad_request").inc()
            return JSONResponse(res.json() if res.content else {}, status_code=res.status_code)  # type: ignore
        self.log.append("ab_feedback", [{"request_id": request_id, "user_id": user_id, "item_id": item_id,
                                         "event_type": event_type, "variant": variant, "assigned": assigned,
                                         "model_version": route.target(variant)[1], "fallback": fallback}])
        routed.labels(endpoint="feedback", variant=variant, outcome="ok").inc()
        if route.challenger_url and fallback is None:  # both variants run: the other one learns the event too
            task = asyncio.create_task(self._mirror(route, CHAMPION if variant == CHALLENGER else CHALLENGER, body))
            self._mirrors.add(task)  # a reference until done (the loop keeps only weak ones)
            task.add_done_callback(self._mirrors.discard)
        return {**res.json(), "variant": variant}

    async def _mirror(self, route: Route, variant: str, body: dict[str, Any]) -> None:
        """The event to the other variant's service as history only (not logged there): a user whom a share change
        moves keeps their recent events, however the services keep state. A failure is counted, never raised."""
        import httpx

        url, _ = route.target(variant)
        try:
            res = await self.client.post(f"{url}/feedback", json={**body, "variant": variant, "history_only": True},
                                         timeout=self.timeout)
            outcome = "ok" if res.status_code < 300 else f"status_{res.status_code}"
        except httpx.HTTPError:
            outcome = "connection"
        mirrored.labels(variant=variant, outcome=outcome).inc()

    @bentoml.api(route="/canary/route")
    def change_route(self, share_bp: Annotated[int | None, Field(ge=0, le=BUCKETS)] = None,
                     champion_url: Annotated[str | None, Field(max_length=512)] = None,
                     champion_version: Annotated[int | None, Field(ge=1)] = None,
                     challenger_url: Annotated[str | None, Field(max_length=512)] = None,
                     challenger_version: Annotated[int | None, Field(ge=1)] = None,
                     salt: Annotated[str | None, Field(min_length=1, max_length=128)] = None,
                     clear_challenger: bool = False) -> dict[str, Any]:
        """Change the share, the targets or the salt without a restart (validated, persisted, swapped); fields
        left out keep their values; ``clear_challenger`` sends everyone to the champion."""
        fields = {k: v for k, v in {"share_bp": share_bp, "champion_url": champion_url,
                                    "champion_version": champion_version, "challenger_url": challenger_url,
                                    "challenger_version": challenger_version, "salt": salt}.items() if v is not None}
        if clear_challenger:
            fields.update(challenger_url=None, challenger_version=None, share_bp=0)
        current = self._current()  # another process may have rewritten the file since the last request
        with self._lock:
            try:
                route = replace(current, **fields)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=422)  # type: ignore[return-value]
            write_route(self.path, route)
            self.route, self._mtime = route, self.path.stat().st_mtime_ns
            self._publish(route)
        log.info("route changed: %s", asdict(route))
        return asdict(route)

    @bentoml.api(route="/canary/state")
    def state(self) -> dict[str, Any]:
        """The route in force."""
        return asdict(self._current())
