"""The admin API: health, readiness, stats, the events API, replay, metrics and the dashboard.

Bound to loopback by default. When ``admin.token`` is set every request needs
``Authorization: Bearer <token>`` (compared in constant time), the health probes included.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from webhookd.config import Config
from webhookd.errors import JournalError, NotFound
from webhookd.journal import EVENT_STATES, EventSummary, Journal
from webhookd.receiver import IntakeState
from webhookd.workers import WorkerPool

_MAX_LIMIT = 1000


@dataclass
class AdminContext:
    config: Config
    journal: Journal
    pool: WorkerPool
    intake: IntakeState
    boot_id: str
    started_at: float
    metrics: Callable[[], tuple[bytes, str]] | None = None
    dashboard: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class Admin:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        token = ctx.config.admin.token
        self._token = f"Bearer {token.reveal()}".encode() if token else None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/stats", self.stats)
        r.add_get("/metrics", self.metrics)
        r.add_get("/events", self.events)
        r.add_get("/events/{id}", self.event)
        r.add_post("/events/{id}/replay", self.replay)
        if self.ctx.dashboard is not None:
            r.add_get("/", self.ctx.dashboard)
        return app

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self._token is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._token):
                return web.json_response(
                    {"error": "missing or wrong bearer token"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "boot_id": self.ctx.boot_id})

    async def readyz(self, request: web.Request) -> web.Response:
        problems = []
        if self.ctx.intake.draining:
            problems.append("draining")
        if self.ctx.journal.last_write_error:
            problems.append(f"journal: {self.ctx.journal.last_write_error}")
        if problems:
            return web.json_response({"ready": False, "problems": problems}, status=503)
        return web.json_response({"ready": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(await collect_stats(self.ctx))

    async def metrics(self, request: web.Request) -> web.Response:
        if self.ctx.metrics is None:
            return _error(404, "metrics are not enabled")
        body, content_type = self.ctx.metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def events(self, request: web.Request) -> web.Response:
        q = request.query
        state = q.get("state") or None
        if state is not None and state not in EVENT_STATES:
            return _error(400, f"state must be one of {', '.join(EVENT_STATES)}")
        try:
            limit = int(q.get("limit", "50"))
        except ValueError:
            return _error(400, "limit must be an integer")
        if not 1 <= limit <= _MAX_LIMIT:
            return _error(400, f"limit must be between 1 and {_MAX_LIMIT}")
        rows = await self.ctx.journal.list_events(
            state=state,
            source=q.get("source") or None,
            limit=limit,
            before=q.get("before") or None,
        )
        return web.json_response({"events": [summary_dict(r) for r in rows]})

    async def event(self, request: web.Request) -> web.Response:
        try:
            detail = await self.ctx.journal.get_event(request.match_info["id"])
        except NotFound:
            return _error(404, "no such event")
        return web.json_response(detail.as_dict())

    async def replay(self, request: web.Request) -> web.Response:
        event_id = request.match_info["id"]
        try:
            counts = await self.ctx.journal.replay([event_id])
        except NotFound:
            return _error(404, "no such event")
        except JournalError as exc:
            return _error(503, str(exc))
        self.ctx.pool.poke()
        return web.json_response({"id": event_id, "requeued": counts[event_id]}, status=202)


def summary_dict(row: EventSummary) -> dict[str, Any]:
    return {**asdict(row), "tenant": row.tenant or None}


async def collect_stats(ctx: AdminContext) -> dict[str, Any]:
    """The ``/stats`` document (also what ``webhookd stats`` prints when the daemon runs)."""
    counts = await ctx.journal.counts()
    pool = ctx.pool.statistics()
    now = ctx.pool.clock.time()
    oldest = counts.oldest_queued_at
    return {
        "boot_id": ctx.boot_id,
        "uptime_s": round(now - ctx.started_at, 3),
        "draining": ctx.intake.draining,
        "jobs": dict(counts.jobs_by_state),
        "sources": {k: dict(v) for k, v in counts.jobs_by_source.items()},
        "events": counts.events,
        "backlog": ctx.journal.backlog_jobs,
        "oldest_queued_age_s": round(now - oldest, 3) if oldest is not None else None,
        "workers": {
            "concurrency": pool.concurrency,
            "busy": pool.busy,
            "claiming": pool.claiming,
            "window": pool.window,
            "started": pool.started,
            "outcomes": dict(pool.outcomes),
        },
        "scheduler": [asdict(s) for s in ctx.pool.scheduler.statistics()],
        "intake": {"verify_failures": ctx.intake.verify_failures},
        "lanes": {},
    }
