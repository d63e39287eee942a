"""The receiver: aiohttp routes for ``/hooks/...`` — size limit, verify, dedup key, intake limit,
journal, and the 2xx only after the commit.

Order of checks, cheapest first: route → draining → size → handshake → signature → intake
limit → backlog → journal. A request that fails a check leaves no trace in the journal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from webhookd import signatures
from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.config import CATCH_ALL, Config, Extractor, SourceConfig
from webhookd.errors import JournalUnavailable, VerificationError
from webhookd.journal import Journal, NewEvent, NewJob
from webhookd.models import Event, new_event_id, new_job_id

log = logging.getLogger("webhookd.receiver")

_JSON = "application/json"


class TokenBucket:
    """A plain token bucket for per-source intake limits (one second of burst)."""

    def __init__(self, rate_per_s: float, clock: Clock) -> None:
        self.rate = rate_per_s
        self.capacity = max(rate_per_s, 1.0)
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 if granted, else the seconds until one will be there."""
        now = self.clock.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class IntakeState:
    """What the receiver shares with the rest of the daemon."""

    draining: bool = False
    # Observers of every answer: (source or "", status, seconds spent). Metrics subscribe here.
    observers: list[Callable[[str, int, float], None]] = field(default_factory=list)
    verify_failures: int = 0


def _error(status: int, message: str, retry_after_s: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s else None
    return web.json_response({"error": message}, status=status, headers=headers)


class _Payload:
    """Lazily parsed views of a body, shared by every extractor of one request."""

    __slots__ = ("_form", "_json", "body")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self._json: Any = _UNSET
        self._form: dict[str, str] | None = None

    def json(self) -> Any:
        if self._json is _UNSET:
            try:
                self._json = json.loads(self.body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                self._json = None
        return self._json

    def form(self) -> dict[str, str]:
        if self._form is None:
            self._form = dict(
                parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True)
            )
        return self._form


_UNSET: Any = object()


def _ack(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def extract(spec: Extractor, headers: Any, payload: _Payload) -> str | None:
    """The value ``spec`` points at in a request, as a string, or ``None`` if absent."""
    if spec.kind == "header":
        value = headers.get(spec.arg)
        return value if value else None
    if spec.kind == "form":
        return payload.form().get(spec.arg) or None
    if spec.kind == "body":
        return "sha256:" + hashlib.sha256(payload.body).hexdigest()
    node = payload.json()
    for part in spec.arg.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    if node is None or isinstance(node, dict | list):
        return None
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


class _CommitTimeout(Exception):
    """The journal did not commit within ``server.ack_timeout_s``."""


class _Deadlines:
    """Fails commit futures still pending after ``timeout_s``, with one timer for all of them.

    A timeout per request (``asyncio.timeout``) costs a timer handle and a context manager on
    the hot path; webhooks reach the journal in order, so their deadlines are in order too and a
    queue with a single timer at its head does the same work. Failing a future only ends the
    waiting: the journal commits the event anyway, and the provider's retry is a duplicate.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pending: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, future: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        self._pending.append((deadline, future))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        pending = self._pending
        while pending and (pending[0][1].done() or pending[0][0] <= now):
            _, future = pending.popleft()
            if not future.done():
                future.set_exception(_CommitTimeout())
        self._timer = loop.call_at(pending[0][0], self._expire, loop) if pending else None


class Receiver:
    """Builds the aiohttp application that takes webhooks."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        state: IntakeState,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.journal = journal
        self.state = state
        self.clock = clock
        self._by_path = {src.path: src for src in config.sources.values() if src.name != CATCH_ALL}
        self._catch_all = config.sources.get(CATCH_ALL)
        self._ack_deadlines = _Deadlines(config.server.ack_timeout_s)
        self._too_large = f"body larger than {config.server.max_body_bytes} bytes"
        self._buckets = {
            src.name: TokenBucket(src.intake_per_s, clock)
            for src in config.sources.values()
            if src.intake_per_s
        }

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.config.server.max_body_bytes,
            middlewares=[self._json_errors],
        )
        app.router.add_route("*", "/{path:.*}", self._handle)
        return app

    @web.middleware
    async def _json_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)

    def _resolve(self, path: str) -> tuple[str, SourceConfig] | None:
        src = self._by_path.get(path)
        if src is not None:
            return src.name, src
        if self._catch_all is not None and path.startswith("/hooks/"):
            name = path[len("/hooks/") :]
            # A configured source is only reachable at its own path, never through the
            # catch-all (which would skip its verification).
            if name and "/" not in name and name not in self.config.sources:
                return name, self._catch_all
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = self.clock.monotonic()
        name = ""
        resolved = self._resolve(request.path)
        if resolved is None:
            response = _error(404, "no such source")
        else:
            name = resolved[0]
            response = await self._take(request, name, resolved[1])
        for observer in self.state.observers:
            observer(name, response.status, self.clock.monotonic() - started)
        return response

    def _check(
        self, request: web.Request, name: str, src: SourceConfig, body: bytes, now: float
    ) -> web.Response | dict[str, Any] | None:
        """Handshake, method and signature: an answer to give now, or the verdict to store."""
        if src.verify is None:  # the common unsigned case skips building the URL
            return None if request.method == "POST" else _error(405, "webhooks are POSTed")
        url = str(request.url)
        try:
            # A handshake may itself be signed (Slack's url_verification): same 401 path.
            shake = signatures.handshake(
                src.verify,
                method=request.method,
                query=request.query,
                headers=request.headers,
                body=body,
                url=url,
                now=now,
            )
            if shake is not None:
                return web.Response(
                    status=shake.status, body=shake.body, content_type=shake.content_type
                )
            if request.method != "POST":
                return _error(405, "webhooks are POSTed")
            verdict = signatures.verify(
                src.verify, headers=request.headers, body=body, url=url, now=now
            )
        except VerificationError as exc:
            self.state.verify_failures += 1
            log.warning(
                "rejected webhook source=%s reason=%r peer=%s", name, exc.reason, request.remote
            )
            return _error(401, exc.reason)
        return verdict.as_dict()

    async def _take(self, request: web.Request, name: str, src: SourceConfig) -> web.Response:
        server = self.config.server
        if request.method not in ("POST", "GET", "PUT"):
            return _error(405, "method not allowed")
        if self.state.draining:
            return _error(503, "shutting down", server.retry_after_s)
        length = request.content_length
        if length is not None and length > server.max_body_bytes:
            return _error(413, self._too_large)
        try:
            body = await request.read()  # a chunked body is cut off at client_max_size
        except web.HTTPRequestEntityTooLarge:
            return _error(413, self._too_large)
        now = self.clock.time()
        headers = request.headers
        checked = self._check(request, name, src, body, now)
        if isinstance(checked, web.Response):
            return checked
        bucket = self._buckets.get(src.name)
        if bucket is not None:
            wait_s = bucket.take()
            if wait_s:
                return _error(429, "intake limit reached", wait_s)
        if self.journal.backlog_jobs >= server.max_backlog:
            return _error(503, "backlog full", server.retry_after_s)

        payload = _Payload(body)
        key = extract(src.dedup, headers, payload) if src.dedup is not None else None
        if key is None and src.verify is not None:
            key = signatures.default_dedup(src.verify.scheme, headers, body)
        if key is None:
            key = "sha256:" + hashlib.sha256(body).hexdigest()
        tenant = (extract(src.tenant, headers, payload) if src.tenant else None) or ""
        rule = src.priority
        by = extract(rule.by, headers, payload) if rule.by is not None else tenant or None
        event = Event(
            id=new_event_id(),
            source=name,
            received_at=now,
            dedup_key=f"{name}:{key}",
            tenant=tenant,
            priority=rule.classify(by),
            headers=tuple(headers.items()),
            body=body,
            verified=checked,
        )
        jobs = tuple(
            NewJob(
                id=new_job_id(),
                action=a.name,
                type=a.type,
                max_attempts=a.retry.max_attempts,
                order_key=extract(a.ordered_by, headers, payload) if a.ordered_by else None,
            )
            for a in src.actions
        )
        # Queued for the writer, the commit completes even if we stop waiting (timeout, client
        # gone): the provider's retry then finds a duplicate instead of creating a second event.
        try:
            commit = self.journal.submit_ingest(NewEvent(event, jobs))
            self._ack_deadlines.watch(commit)
            result = await commit
        except _CommitTimeout:
            log.warning("journal commit slower than %.1fs: answering 503", server.ack_timeout_s)
            return _error(503, "journal busy, retry later", server.retry_after_s)
        except JournalUnavailable:
            return _error(503, "journal unavailable, retry later", server.retry_after_s)
        # Ids are [0-9A-Z_] only, so the answer is formatted, not encoded: this is the hot path.
        if result.duplicate:
            return _ack(200, b'{"id": "%s", "duplicate": true}' % result.event_id.encode())
        return _ack(src.ack_status, b'{"id": "%s", "duplicate": false}' % event.id.encode())
