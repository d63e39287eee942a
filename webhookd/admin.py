"""The admin API: health, readiness, stats, the events API, replay, cancel, metrics, dashboard.

Bound to loopback by default. When ``admin.token`` is set every request but ``GET /healthz``
needs ``Authorization: Bearer <token>`` (compared in constant time). Without a token (loopback
only: config refuses a public admin address without one) the loopback address is the only
guard, so a browser must not be turned against it: a request whose ``Host`` is not the admin's
own address or a loopback name is refused (DNS rebinding), and a state-changing request must
show it is not a cross-site form (see ``_same_origin``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import sys
from dataclasses import asdict
from importlib import resources
from typing import Any

from aiohttp import HttpVersion11, web

from webhookd.errors import JournalError, NotFound
from webhookd.journal.base import BULK_BATCH, present_only
from webhookd.journal.polled import ADMIN_READ_S, answer_within
from webhookd.journal.schema import EVENT_STATES
from webhookd.json_errors import Handler, json_error, json_errors
from webhookd.models import EVENT_ID
from webhookd.pauses import name_of, refused_pause
from webhookd.retention import kept_s
from webhookd.stats import AdminContext, collect_stats, readiness_problems, summary_dict
from webhookd.throttle import Throttle

log = logging.getLogger("webhookd.admin")

_MAX_LIMIT = 1000
_MAX_SERIES_MINUTES = 1440  # a day: retention keeps finished work 24 h by default
_MAX_SOURCE_CHARS = 200
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _unknown_parameters(request: web.Request, known: tuple[str, ...]) -> web.Response | None:
    """A 400 naming a query parameter the endpoint does not take, else None. Ignored, a typo
    or a filter this endpoint lacks widened the request: ``replay-dead?action=x&since=...``
    replayed every dead job of the source, ``/events?since=...`` listed every event."""
    for name in request.query:
        if name not in known:
            takes = f"it takes {', '.join(known)}" if known else "it takes none"
            return json_error(400, f"unknown parameter {name!r}: {takes}")
    return None


def _split_host(host: str) -> tuple[str, str]:
    """``name[:port]`` (an IPv6 name in brackets) as ``(name, port)``; port "" when absent."""
    if host.startswith("["):
        end = host.find("]") + 1
        return host[:end], host[end + 1 :] if host[end : end + 1] == ":" else ""
    name, _, port = host.partition(":")
    return name, port


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sent by the dashboard and accepted from any API client: a header no HTML form can set, and
# one a cross-site script cannot add without a CORS preflight, which this API never grants.
INTENT_HEADER = "X-Webhookd"
# What a 503 for a journal outage asks a poller to wait: about a PostgreSQL restart's length.
_OUTAGE_RETRY_AFTER_S = 5.0
# What reads no journal, or bounds its own reads (``Admin._bounded``).
_UNBOUNDED = frozenset({"/", "/healthz", "/metrics"})


async def _expect(request: web.Request) -> web.Response | None:
    """``Expect: 100-continue`` as aiohttp answers it; any other expectation a JSON 417, as
    every error here is (aiohttp's own said it in plain text, echoing the header, before the
    token was asked for)."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's own bytes are counted from here
        return None
    return json_error(417, "unknown expectation: only 100-continue is met")  # the route's not run


async def _private(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer holds journal data (bodies, results) or the page that shows it: no cache
    keeps a copy, and no browser reads a JSON answer as anything else."""
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


class Admin:
    def __init__(self, ctx: AdminContext) -> None:
        self.ctx = ctx
        token = ctx.config.admin.token
        self._token = token.reveal().encode() if token else None
        self._log_unexpected = Throttle(log, logging.ERROR, "unexpected errors")
        # A wrong token is someone guessing, or a poller left with an old one: news either way
        # (a missing one is a dashboard before its token is typed in, and is not).
        self._log_wrong_token = Throttle(log, logging.WARNING, "requests with a wrong token")

    def _unexpected(self, request: web.Request) -> web.Response:
        error = sys.exception()
        if isinstance(error, JournalError):
            # An outage (PostgreSQL restarting, a failing disk) that a read met: logged once by
            # the journal, not once per request of a dashboard or a poller while it lasts.
            return json_error(503, str(error), _OUTAGE_RETRY_AFTER_S)
        # One record with the traceback, and a JSON answer like every other error of this API.
        self._log_unexpected(
            "unexpected error answering %s %r: 500",
            request.method,
            request.path[:200],
            exc_info=True,
        )
        return json_error(500, "internal error")

    def app(self) -> web.Application:
        guard = self._auth if self._token is not None else self._same_origin
        # The JSON errors outermost, so what the guard passes on and a route then refuses
        # (no such path, wrong method) is JSON too.
        app = web.Application(
            middlewares=[json_errors(unexpected=self._unexpected), guard, self._bounded]
        )
        app.on_response_prepare.append(_private)
        r = app.router
        # Each with an expectation handler of its own: aiohttp's answers in plain text.
        routes = (
            (r.add_get, "/healthz", self.healthz),
            (r.add_get, "/readyz", self.readyz),
            (r.add_get, "/stats", self.stats),
            (r.add_get, "/stats/series", self.series),
            (r.add_get, "/metrics", self.metrics),
            (r.add_get, "/events", self.events),
            (r.add_get, "/events/{id}", self.event),
            (r.add_get, "/keys/{key:.+}", self.key),
            (r.add_post, "/events/{id}/replay", self.replay),
            (r.add_post, "/events/{id}/cancel", self.cancel),
            (r.add_post, "/sources/{source}/pause", self.pause),
            (r.add_post, "/sources/{source}/resume", self.resume),
            (r.add_post, "/sources/{source}/replay-dead", self.replay_dead),
        )
        for add, path, handler in routes:
            add(path, handler, expect_handler=_expect)
        if self.ctx.dashboard:
            r.add_get("/", self.dashboard, expect_handler=_expect)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # The dashboard page itself holds no data: it asks for the token and sends it with
        # every API call it makes, so a browser can load it without a header. /healthz says
        # only "alive", so a container's health probe needs no copy of the token.
        if self._token is not None and not (
            request.method in ("GET", "HEAD") and request.path in ("/", "/healthz")
        ):
            # "Bearer" in any case (RFC 9110 §11.1); a header's undecodable bytes come back as
            # surrogates, which only a wrong token has.
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            given_bytes = given.strip(" ").encode("utf-8", "surrogateescape")
            if not (hmac.compare_digest(given_bytes, self._token) and scheme.lower() == "bearer"):
                if given_bytes:
                    self._log_wrong_token(
                        "admin API refused a request with a wrong bearer token: %s %r from %s",
                        request.method,
                        request.path[:200],
                        request.remote,
                    )
                return web.json_response(
                    {"error": "missing or wrong bearer token"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    @web.middleware
    async def _bounded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A read answers within ``ADMIN_READ_S`` or is a 503, as when the journal fails: a
        database that hangs would hold a dashboard's poll, ``/readyz`` or ``webhookd stats``
        for the pool's minute. ``/metrics`` bounds its own reads and still answers, with the
        last figures; a change (``POST``) is not cut short."""
        if request.method != "GET" or request.path in _UNBOUNDED:
            return await handler(request)
        return await answer_within(handler(request), ADMIN_READ_S)

    @web.middleware
    async def _same_origin(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Without a token: only requests addressed to this listener, and no cross-site writes.

        A page on another site can point its own name at 127.0.0.1 (DNS rebinding) and then
        read this API as same-origin; its requests still carry its name in ``Host``. A form or
        ``fetch`` from another site can POST here without reading the answer: it carries that
        site's ``Origin``, or, where a browser omits it, no header that a form cannot send.
        """
        names = self._own_names()
        host = _split_host(request.host.lower())
        if host[0] not in names:
            return json_error(421, "Host is not this admin listener's address")
        # A method or path with no route changes nothing: its 405 or 404 says more than a 403.
        if request.method not in _SAFE_METHODS and request.match_info.http_exception is None:
            origin = request.headers.get("Origin")
            if origin is not None:
                # Same origin as the page the request targets: one of our names, on the port
                # the request was addressed to (an SSH tunnel's local port, say).
                scheme, _, rest = origin.lower().partition("://")
                name, port = _split_host(rest)
                if scheme != "http" or name not in names or port != host[1]:
                    return json_error(403, "cross-origin request refused")
            elif not (
                request.headers.get(INTENT_HEADER) or request.content_type == "application/json"
            ):
                return json_error(
                    403,
                    f"send an {INTENT_HEADER} header (or Content-Type: application/json): "
                    "a request without one could be a cross-site form",
                )
        return await handler(request)

    def _own_names(self) -> frozenset[str]:
        """The names a request to this listener may carry in ``Host``: its configured address
        and the loopback names, on any port. A rebinding page's requests carry its own name; a
        port of our own would refuse an SSH tunnel from another local port for nothing."""
        listen = self.ctx.config.admin.listen
        names = {*_LOOPBACK_NAMES}
        if listen is not None:
            names.add(f"[{listen.host}]" if ":" in listen.host else listen.host)
        return frozenset(name.lower() for name in names)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "boot_id": self.ctx.boot_id})

    async def readyz(self, request: web.Request) -> web.Response:
        if problems := await readiness_problems(self.ctx):
            return web.json_response({"ready": False, "problems": problems}, status=503)
        return web.json_response({"ready": True})

    async def stats(self, request: web.Request) -> web.Response:
        # /stats?source=shop answered every source's figures as if filtered.
        if refused := _unknown_parameters(request, ()):
            return refused
        return web.json_response(await collect_stats(self.ctx))

    async def series(self, request: web.Request) -> web.Response:
        """Per-minute accepted, done and dead counts and the backlog, read from the journal (so
        a restart loses nothing): ``?minutes=`` (default 60) ending now, ``?source=`` or all."""
        q = request.query
        if refused := _unknown_parameters(request, ("minutes", "source")):
            return refused
        try:
            minutes = int(q.get("minutes", "60"))
        except ValueError:
            return json_error(400, "minutes must be an integer")
        if not 1 <= minutes <= _MAX_SERIES_MINUTES:
            return json_error(400, f"minutes must be between 1 and {_MAX_SERIES_MINUTES}")
        source = q.get("source") or None
        if source is not None and len(source) > _MAX_SOURCE_CHARS:
            return json_error(400, f"source must be at most {_MAX_SOURCE_CHARS} characters")
        assert self.ctx.counts is not None  # set by __post_init__
        series, age_s = await self.ctx.counts.series(minutes, source)
        keeps_s = kept_s(self.ctx.config.journal)
        return web.json_response(
            {
                "source": source,
                **asdict(series),
                "age_s": round(age_s, 3),
                # A window longer than retention keeps counts only the events still kept.
                "cut_by_retention": minutes * 60 > keeps_s,
                "retention_keeps_s": keeps_s,
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        if self.ctx.metrics is None:
            return json_error(404, "metrics are not enabled")
        body, content_type = await self.ctx.metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def dashboard(self, request: web.Request) -> web.Response:
        page, policy = _dashboard_page()
        return web.Response(
            text=page,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "X-Frame-Options": "DENY",
                "Content-Security-Policy": policy,
            },
        )

    async def events(self, request: web.Request) -> web.Response:
        q = request.query
        if refused := _unknown_parameters(
            request, ("state", "limit", "before", "source", "tenant")
        ):
            return refused
        state = q.get("state") or None
        if state is not None and state not in EVENT_STATES:
            return json_error(400, f"state must be one of {', '.join(EVENT_STATES)}")
        try:
            limit = int(q.get("limit", "50"))
        except ValueError:
            return json_error(400, "limit must be an integer")
        if not 1 <= limit <= _MAX_LIMIT:
            return json_error(400, f"limit must be between 1 and {_MAX_LIMIT}")
        # Compared as text, a cursor that is no event id would list every event, or none.
        before = q.get("before") or None
        if before is not None and not EVENT_ID.fullmatch(before):
            return json_error(400, "before must be an event id (evt_ and 26 characters)")
        rows = await self.ctx.journal.list_events(
            state=state,
            source=q.get("source") or None,
            tenant=q.get("tenant"),  # empty: the events of no tenant, as --tenant ""
            limit=limit,
            before=before,
        )
        return web.json_response(self.ctx.masker.deep({"events": [summary_dict(r) for r in rows]}))

    async def event(self, request: web.Request) -> web.Response:
        if refused := _unknown_parameters(request, ()):
            return refused
        try:
            detail = await self.ctx.journal.get_event(request.match_info["id"])
        except NotFound:
            return json_error(404, "no such event")
        source = self.ctx.config.source_for(detail.event.source)
        doc = detail.as_dict(source.verify if source is not None else None)
        # An attempt's error, result or output may quote a secret (an API's error message, a
        # command's stderr), and so may a body: masked as the log masks it.
        return web.json_response(self.ctx.masker.deep(doc))

    async def key(self, request: web.Request) -> web.Response:
        """The event a dedup key (``source:key``: a provider's delivery id) names, and whether
        that event is still in the journal (a key is kept longer than a done event)."""
        if refused := _unknown_parameters(request, ()):
            return refused
        key = request.match_info["key"]
        found = await self.ctx.journal.event_by_key(key)
        if found is None:
            return json_error(404, "no event has this dedup key (or it is past keep_dedup_d)")
        event_id, first_seen_at, detail = found
        doc = {
            "key": key,
            "event_id": event_id,
            "first_seen_at": first_seen_at,
            "pruned": detail is None,
        }
        return web.json_response(self.ctx.masker.deep(doc))

    async def replay(self, request: web.Request) -> web.Response:
        """The event's finished jobs run again; with ``?dead=1`` (``replay --dead``, the
        dashboard's dead letters) its dead jobs alone, so a delivered forward is not sent twice;
        with ``?dismissed=1`` (``replay --dismissed``) its dismissed dead jobs alone, with
        ``?done=1`` (``replay --done``) its done ones; with ``?action=NAME`` (``--action``)
        only the jobs of that action."""
        event_id = request.match_info["id"]
        if refused := _unknown_parameters(
            request, ("dead", "dismissed", "done", "cancelled", "action")
        ):
            return refused
        flags = {}
        for name in ("dead", "dismissed", "done", "cancelled"):
            value = request.query.get(name, "0")
            if value not in ("0", "1"):
                return json_error(400, f"{name} must be 0 or 1")
            flags[name] = value == "1"
        if sum(flags.values()) > 1:
            return json_error(400, "give one of dead=1, dismissed=1, done=1 and cancelled=1")
        action = request.query.get("action")
        if action == "":
            return json_error(400, "action must name an action")
        try:
            counts = await self.ctx.journal.replay(
                [event_id],
                dead_only=flags["dead"],
                dismissed_only=flags["dismissed"],
                done_only=flags["done"],
                cancelled_only=flags["cancelled"],
                action=action,
            )
        except NotFound:
            return json_error(404, "no such event")
        except JournalError as exc:
            return json_error(503, str(exc), _OUTAGE_RETRY_AFTER_S)
        self.ctx.pool.poke()
        done = counts[event_id]
        return web.json_response(
            {"id": event_id, "requeued": done.requeued, "run_now": done.run_now}, status=202
        )

    async def cancel(self, request: web.Request) -> web.Response:
        """The event's queued jobs are cancelled (a running one once its attempt ends); with
        ``?dead=1`` (``cancel --dead``, the dashboard's Dismiss) its dead jobs alone; with
        ``?action=NAME`` (``--action``) only the jobs of that action."""
        event_id = request.match_info["id"]
        if refused := _unknown_parameters(request, ("dead", "action")):
            return refused
        dead = request.query.get("dead", "0")
        if dead not in ("0", "1"):
            return json_error(400, "dead must be 0 or 1")
        action = request.query.get("action")
        if action == "":
            return json_error(400, "action must name an action")
        try:
            counts = await self.ctx.journal.cancel([event_id], dead_only=dead == "1", action=action)
        except NotFound:
            return json_error(404, "no such event")
        except JournalError as exc:
            return json_error(503, str(exc), _OUTAGE_RETRY_AFTER_S)
        done = counts[event_id]
        return web.json_response(
            {"id": event_id, "cancelled": done.cancelled, "running": done.running}
        )

    async def pause(self, request: web.Request) -> web.Response:
        return await self._pause_or_resume(request, pausing=True)

    async def resume(self, request: web.Request) -> web.Response:
        return await self._pause_or_resume(request, pausing=False)

    async def _pause_or_resume(self, request: web.Request, *, pausing: bool) -> web.Response:
        """``webhookd pause``/``resume`` for one source. Answered once this process's
        dispatcher has the change: a webhook sent after the answer to a paused source starts
        no job here (other nodes hear of it within milliseconds, or at their next sweep)."""
        source = request.match_info["source"]
        if refused := _unknown_parameters(request, ()):
            return refused
        if pausing and (said := refused_pause(source)):
            return json_error(400, said)
        journal = self.ctx.journal
        try:
            # One the config no longer has is resumed while paused: its jobs go dead at their
            # turn, as other removed sources' do, instead of waiting for good.
            if self.ctx.config.source_for(source) is None and (
                pausing or source not in await journal.paused_sources()
            ):
                return json_error(404, "no such source")
            if pausing and (said := self.ctx.config.by_other_names(source)):
                return json_error(400, said)
            paused = source in await journal.paused_sources()
            named = await name_of(self.ctx.config, journal, source, pausing=pausing, paused=paused)
            if named.refused is not None:  # a slip the catch-all would take: not a 404
                return json_error(400, named.refused)
            changed = await (journal.pause(source) if pausing else journal.resume(source))
        except JournalError as exc:
            return json_error(503, str(exc), _OUTAGE_RETRY_AFTER_S)
        await self.ctx.pool.pause_applied()
        return web.json_response(
            {"source": source, "paused": pausing, "changed": changed, **named.fields()}
        )

    async def replay_dead(self, request: web.Request) -> web.Response:
        """``webhookd replay --dead --source <name> [--tenant T]``: the dead jobs of every
        event of the source (and of ``?tenant=``, as sent) that has one, ``BULK_BATCH`` events
        at a time; an event pruned since it was listed is skipped."""
        source = request.match_info["source"]
        if refused := _unknown_parameters(request, ("tenant",)):
            return refused
        if self.ctx.config.source_for(source) is None:
            return json_error(404, "no such source")
        # "*" or "Shop" beside "shop": nothing is journaled under it, and "0 re-queued" would
        # read as nothing to replay while the names the catch-all took hold dead letters.
        if said := self.ctx.config.by_other_names(source):
            return json_error(400, said)
        journal = self.ctx.journal
        replay_dead = functools.partial(journal.replay, dead_only=True)
        events = requeued = 0
        try:
            pages = journal.pages_of_event_ids_with_jobs(
                # Empty: the events of no tenant, as --tenant "" (a script's unset variable
                # replayed every tenant's).
                "dead",
                source,
                None,
                tenant=request.query.get("tenant"),
            )
            async for ids in pages:
                for start in range(0, len(ids), BULK_BATCH):
                    done = await present_only(replay_dead, ids[start : start + BULK_BATCH])
                    # Those another replay took meanwhile are not this one's.
                    events += sum(1 for r in done.values() if r.requeued)
                    requeued += sum(r.requeued for r in done.values())
                    self.ctx.pool.poke()
        except JournalError as exc:
            return json_error(503, str(exc), _OUTAGE_RETRY_AFTER_S)
        answer: dict[str, Any] = {"source": source, "events": events, "requeued": requeued}
        most = self.ctx.config.server.max_backlog
        if requeued and (backlog := journal.backlog_jobs) > most:
            # Dead jobs do not count towards the cap: a replay of many closes intake.
            answer["warning"] = (
                f"the backlog is now {backlog} job(s), past server.max_backlog ({most}): new"
                " webhooks to any source are answered 503 until it drains below"
            )
        return web.json_response(answer, status=202)


@functools.cache
def _dashboard_page() -> tuple[str, str]:
    """The dashboard page, read once from the package (it ships in the wheel), and its
    Content-Security-Policy: the page's own inline script runs (named by its hash) and it
    talks to this API, nothing else. The page builds its DOM from text nodes only; should a
    webhook's field ever reach it as markup, a script in it would still not run."""
    page = resources.files("webhookd").joinpath("dashboard.html").read_text("utf-8")
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline';"
        " connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )
    return page, policy
