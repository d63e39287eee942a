"""The receiver: one handler on webhookd's HTTP/1.1 server for ``/hooks/...`` — size limit,
verify, dedup key, intake limit, journal, and the 2xx only after the commit.

Order of checks, cheapest first: route → method (a 405 names the path's in ``Allow``; a HEAD
is answered as a GET) → draining → size → bodies in flight → body read (with
its deadline) → Content-Encoding → handshake → signature → intake limit → backlog → values that
cannot be stored → journal. A request that fails a check leaves no trace in the journal.

Every answer is JSON, and the only 5xx is 503: an unexpected error in a request is that
request's 503 (logged once with its traceback), never a plain-text 500.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from webhookd import content_coding
from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.config.sections import (
    ALERT_SOURCE,
    CATCH_ALL,
    SOURCE_NAME,
    Config,
    SourceConfig,
)
from webhookd.errors import JournalUnavailable, VerificationError
from webhookd.http1 import Ack, Answer, Http1Server, Request
from webhookd.journal.base import BaseJournal
from webhookd.journal.records import NewEvent, NewJob
from webhookd.json_errors import json_error
from webhookd.models import (
    Event,
    new_event_id,
    new_job_id,
    query_body_key,
    sha256_key,
    signed_key,
)
from webhookd.receiver.limits import TokenBucket, _CommitTimeout, _Deadlines
from webhookd.receiver.reading import (
    _kept,
    _Payload,
    _Refused,
    _storable,
    _too_large,
    _within,
    client_of,
    extract,
    sift,
)
from webhookd.redact import redact_request_headers, secret_headers
from webhookd.schemes import SCHEMES, Scheme
from webhookd.state import BUSY_WAITING, IntakeState
from webhookd.throttle import Throttle

log = logging.getLogger("webhookd.receiver")


def allowed_methods(src: SourceConfig) -> tuple[str, ...]:
    """The methods ``src``'s path takes, sorted: POST, and those of its provider's handshake
    (``Scheme.handshake_methods``); with GET, HEAD, which the server answers as a GET."""
    scheme = SCHEMES.get(src.verify.scheme) if src.verify is not None else None
    methods = {"POST", *(scheme.handshake_methods if scheme is not None else ())}
    if "GET" in methods:
        methods.add("HEAD")
    return tuple(sorted(methods))


_NO_SOURCE = "no such source"
# Dedup lookups at once for webhooks that meet a full backlog (``_backlog_full``), and how
# many more may wait their turn (a provider's retries of one delivery come many at once: with
# no queue, 106,489 of 110,122 in a trial were told 503 instead of the 200 of a duplicate).
_FULL_LOOKUPS = 4
_FULL_WAITING = 256


def _case_sensitive(names: tuple[str, ...]) -> str:
    """The 404's words for a source name sent in another case than ``names`` (configured, or
    the reserved ``webhookd``): ``... (configured: "github")``."""
    configured = [f'"{name}"' for name in names if name != ALERT_SOURCE]
    said = [f"configured: {', '.join(configured)}"] if configured else []
    if ALERT_SOURCE in names:
        said.append(f'"{ALERT_SOURCE}" is reserved')
    return f"no such source: source names are case-sensitive ({'; '.join(said)})"


class Receiver:
    """Builds the aiohttp application that takes webhooks."""

    def __init__(
        self,
        config: Config,
        journal: BaseJournal,
        state: IntakeState,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.journal = journal
        self.state = state
        self.clock = clock
        self._ack_deadlines = _Deadlines(config.server.ack_timeout_s)
        # Bytes of bodies being read now: Content-Length reserved up front, chunked bodies
        # counted as they grow (server.max_inflight_body_bytes).
        self._inflight_bytes = 0
        self._full_lookups = asyncio.Semaphore(_FULL_LOOKUPS)
        self._full_waiting = 0
        self._buckets: dict[str, TokenBucket] = {}
        # Lines a sender can cause by the thousand: a few a minute, the rest summed up.
        self._log_rejected = Throttle(
            log, logging.WARNING, "rejected webhooks", clock=clock.monotonic
        )
        self._log_slow = Throttle(
            log, logging.WARNING, "503s for a slow journal commit", clock=clock.monotonic
        )
        self._slow_told = False  # a commit past ack_timeout_s was answered 503 since the last
        # Shedding load is news: a provider's retries are what carry those webhooks now.
        self._log_shed = Throttle(
            log, logging.WARNING, "webhooks refused over a limit", clock=clock.monotonic
        )
        # Requests refused before anything was stored (404, 400, 408, 413, 417): without a
        # line, a provider's "we sent it" had only /metrics to be checked against.
        self._log_refused = Throttle(log, logging.INFO, "refused requests", clock=clock.monotonic)
        # A defect a request can reach would otherwise log a traceback per request.
        self._log_unexpected = Throttle(
            log, logging.ERROR, "unexpected errors", clock=clock.monotonic
        )
        self.reconfigure(config)

    def flush_logs(self) -> None:
        """Write what the throttled lines held back (at the drain's end)."""
        self._log_rejected.flush()
        self._log_refused.flush()
        self._log_slow.flush()
        self._log_shed.flush()
        self._log_unexpected.flush()

    def reconfigure(self, config: Config) -> None:
        """Take (a reload's) sources. A request already past ``_resolve`` goes on with the
        source it was resolved to; its maps' entries are read before its first await. A source
        whose ``intake_per_s`` is unchanged keeps its bucket, and so what it has used."""
        self.config = config
        sources = config.sources.values()
        self._by_path = {src.path: src for src in sources if src.name != CATCH_ALL}
        self._catch_all = config.sources.get(CATCH_ALL)
        # Configured and reserved names by their lower case: a name sent in another case is
        # refused, not taken by the catch-all as another source. The 404 names those at
        # /hooks/<name> (or one more 404); one at a path of its own is not told of there.
        folded: dict[str, list[str]] = {ALERT_SOURCE: [ALERT_SOURCE]}
        for src in sources:
            if src.name != CATCH_ALL:
                names = folded.setdefault(src.name.lower(), [])
                if src.path == f"/hooks/{src.name}":
                    names.append(src.name)
        self._folded = {key: tuple(sorted(names)) for key, names in folded.items()}
        # Which headers are stored masked, per source: worked out once, not per webhook.
        self._secret_headers = {src.name: secret_headers(src.verify) for src in sources}
        old = self._buckets
        self._buckets = {
            src.name: (
                old[src.name]
                if src.name in old and old[src.name].rate == src.intake_per_s
                else TokenBucket(src.intake_per_s, self.clock)
            )
            for src in sources
            if src.intake_per_s
        }
        # Sources with an action that has a `when`: only their requests pay for matching.
        self._sifted = {src.name for src in sources if any(a.when for a in src.actions)}
        # The methods each source's path takes (a 405's Allow header names them).
        self._methods = {src.name: allowed_methods(src) for src in sources}

    def server(self, max_connections: int | None = None, **limits: Any) -> Http1Server:
        """The HTTP server for the webhooks (``webhookd.http1``): every request goes straight to
        ``handle``, which finds its source itself. ``limits``: keep-alive timeout and header
        limits; ``max_connections``: fewer connections than ``server.max_connections``, as
        many as the open-files limit leaves room for. What the HTTP parser refuses (a header
        over the limit, TLS on the plain port) is a JSON 4xx, logged in one line. Bodies are
        inflated by content_coding, not the parser; no access log (webhookd logs what it
        refuses; a line per webhook costs intake).
        """
        server = self.config.server
        most = server.max_connections
        limit_said = ""
        if max_connections is not None and max_connections < most:
            # The refusals' and evictions' lines say why the figure is not the config's.
            limit_said = (
                f"at most {max_connections} under the open-files limit,"
                f" server.max_connections = {most}"
            )
            most = max_connections
        return Http1Server(
            self.handle,
            self._unexpected,
            shutdown_timeout_s=server.ack_timeout_s + 1,
            send_timeout_s=server.body_timeout_s,
            linger_s=server.body_timeout_s,
            max_connections=most,
            limit_said=limit_said,
            retry_after_s=server.retry_after_s,
            refused=self._refused_by_server,
            **limits,
        )

    def _refused_by_server(self, status: int) -> None:
        # An answer of the server's, under no source: a 503 past server.max_connections, a
        # 400 or 431 for a request it could not parse.
        if status == 503:
            self.state.unavailable["max_connections"] += 1
        for observer in self.state.observers:
            observer("", status, 0.0)

    def _not_allowed(self, src: SourceConfig) -> web.Response:
        """405, with ``Allow`` naming the methods the source's path takes (RFC 9110 §15.5.6)."""
        allow = ", ".join(self._methods.get(src.name) or allowed_methods(src))
        return json_error(405, "webhooks are POSTed", headers={"Allow": allow})

    def _unexpected(self, request: Request) -> web.Response:
        # One record with the traceback; never the body or header values (secrets live there).
        self._log_unexpected(
            "unexpected error answering %s %r: 503",
            request.method,
            request.path[:200],
            exc_info=True,
        )
        return self._unavailable("internal_error", "internal error, retry later")

    def _unavailable(self, reason: str, message: str) -> web.Response:
        """A 503 with ``Retry-After``, counted by ``reason`` (one of ``state.UNAVAILABLE``)."""
        self.state.unavailable[reason] += 1
        return json_error(503, message, self.config.server.retry_after_s)

    def _bodies_in_flight(self) -> _Refused:
        self.state.unavailable["bodies_in_flight"] += 1
        return _Refused(503, "too many bodies in flight", self.config.server.retry_after_s)

    def _resolve(self, path: str) -> tuple[str, SourceConfig] | str:
        """The source a path is for (the name it is journalled under, and its config), else
        why there is none."""
        src = self._by_path.get(path)
        if src is not None:
            return src.name, src
        if not path.startswith("/hooks/"):
            return _NO_SOURCE
        name = path[len("/hooks/") :]
        if not SOURCE_NAME.fullmatch(name):  # a name no source could be configured with
            return _NO_SOURCE
        taken = self._folded.get(name.lower())
        if taken is not None and name not in taken:
            # /hooks/GitHub beside a source "github": without this, a catch-all would take it
            # as a source of its own, unverified, and its events would miss github's actions.
            return _case_sensitive(taken) if taken else _NO_SOURCE
        # A configured source is only reachable at its own path, never through the catch-all
        # (which would skip its verification). Nor is the alerts' own source: only the daemon
        # makes its events.
        if self._catch_all is not None and name not in self.config.sources and name != ALERT_SOURCE:
            return name, self._catch_all
        return _NO_SOURCE

    async def handle(self, request: Request) -> Answer:
        """Answer one request to the receiver's port (the server's only handler)."""
        started = self.clock.monotonic()
        name = ""
        response: Answer
        resolved = self._resolve(request.path)
        if isinstance(resolved, str):
            response = json_error(404, resolved)
            if request.method == "POST":  # a webhook; a probe's GET / is no news, each minute
                self._refused(request, 404, resolved)
        else:
            name, src = resolved
            try:
                response = await self._take(request, name, src)
            except _Refused as refused:
                response = refused.response
                if response.status < 500:
                    self._refused(request, response.status, str(refused))
                if refused.close:
                    response.force_close()  # the server closes the connection after it
            except Exception:
                response = self._unexpected(request)
            # Metrics label by source: the catch-all's own name ("*"), not each name it takes,
            # or every junk path would become a series of its own.
            name = src.name
        for observer in self.state.observers:
            observer(name, response.status, self.clock.monotonic() - started)
        return response

    def _refused(self, request: Request, status: int, reason: str) -> None:
        self._log_refused(
            "refused webhook status=%d path=%r reason=%r peer=%s",
            status,
            request.path[:200],
            reason,
            client_of(request, self.config.server.trusted_proxies),
        )

    async def _read(self, request: Request, most_bytes: int) -> bytes:
        """The raw body, at most ``most_bytes`` (else 413), read within
        ``server.body_timeout_s`` while the bytes of all bodies being read stay under
        ``server.max_inflight_body_bytes`` (else 408 or 503).

        A body is counted by the bytes that have arrived, not by the length its head announces:
        counted up front, 64 connections announcing 1 MB each and sending a byte a second held
        the whole 64 MiB, and every other webhook sent with its body behind its head got 503."""
        server = self.config.server
        content = request.content
        if content.is_eof():  # it came with the headers (the usual case): nothing to wait for
            body = request.body_received()
            if len(body) > most_bytes:  # chunked, so not refused by its length
                raise _too_large(most_bytes)
            return body
        if self._inflight_bytes >= server.max_inflight_body_bytes:
            raise self._bodies_in_flight()
        counted = 0
        parts: list[bytes] = []
        try:
            async with asyncio.timeout(server.body_timeout_s):
                await self._go_on(request)
                while chunk := await content.readany():
                    if counted + len(chunk) > most_bytes:  # chunked, or longer than announced
                        raise _too_large(most_bytes)
                    self._inflight_bytes += len(chunk)
                    counted += len(chunk)
                    if self._inflight_bytes > server.max_inflight_body_bytes:
                        raise self._bodies_in_flight()
                    parts.append(chunk)
        except TimeoutError:
            raise _Refused(408, "body not received in time", close=True) from None
        except (ConnectionError, web.RequestPayloadError):
            # The client went away or broke the chunked framing: no one to tell, nothing stored.
            raise _Refused(400, "body could not be read") from None
        finally:
            self._inflight_bytes -= counted
        return b"".join(parts)

    @staticmethod
    async def _go_on(request: Request) -> None:
        """Answer ``Expect: 100-continue`` (curl sends it before large bodies): only now,
        once the request has passed the checks that need no body, is the client told to send it.
        """
        expect = request.headers.get("Expect")
        if expect is None or request.version < (1, 1):
            return
        if expect.lower() != "100-continue":
            raise _Refused(417, "unsupported Expect header", close=True)
        request.send_continue()

    def _check(
        self,
        request: Request,
        name: str,
        src: SourceConfig,
        scheme: Scheme | None,
        body: bytes,
        url: str,
        now: float,
    ) -> web.Response | dict[str, Any] | None:
        """Handshake, method and signature: an answer to give now, or the verdict to store."""
        if src.verify is None:  # unsigned: POST only, which _take has already checked
            return None
        try:
            if scheme is None:  # config only names registered schemes; a hand-built one may not
                raise VerificationError("unknown scheme")
            # A handshake may itself be signed (Slack's url_verification): same 401 path.
            shake = scheme.handshake(
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
            if request.method != "POST":  # a handshake's method, but not its handshake
                return self._not_allowed(src)
            verdict = scheme.verify(
                src.verify, headers=request.headers, body=body, url=url, now=now
            )
        except VerificationError as exc:
            self.state.verify_failures += 1
            self._log_rejected(
                "rejected webhook source=%s reason=%r peer=%s%s",
                name,
                exc.reason,
                client_of(request, self.config.server.trusted_proxies),
                f" detail={exc.detail!r}" if exc.detail else "",
            )
            return json_error(401, exc.reason)
        return verdict.as_dict()

    async def _backlog_full(self, name: str, source: str, key: str, second: str | None) -> Answer:
        """Past ``server.max_backlog``: a delivery the journal already holds is answered as the
        duplicate it is (a provider retrying one whose answer it lost would otherwise be told to
        come back until the backlog drains); anything else is refused with 503. A few lookups
        at a time, a bounded few more waiting their turn for up to ``server.ack_timeout_s``: a
        flood while the backlog is full gets its 503s without queueing reads without end."""
        if self._full_waiting < _FULL_WAITING:
            self._full_waiting += 1
            try:
                async with asyncio.timeout(self.config.server.ack_timeout_s):
                    async with self._full_lookups:
                        for k in (key, second):
                            owner = await self.journal.key_owner(k) if k is not None else None
                            if owner is not None:
                                self.state.duplicates[source] += 1  # a catch-all's: "*"
                                said = b'{"id": "%s", "duplicate": true}' % owner[0].encode()
                                return Ack(200, said)
            except (JournalUnavailable, TimeoutError):
                pass  # the 503 below says the same: come back later
            finally:
                self._full_waiting -= 1
        server = self.config.server
        self._log_shed(
            "refused webhook status=503 source=%s reason='backlog full' backlog=%d max_backlog=%d",
            name,
            self.journal.backlog_jobs,
            server.max_backlog,
        )
        return self._unavailable("backlog_full", "backlog full")

    async def _take(self, request: Request, name: str, src: SourceConfig) -> Answer:
        server = self.config.server
        if request.method not in self._methods[src.name]:  # a HEAD reads as GET
            return self._not_allowed(src)
        if src.allow_from:
            client = client_of(request, server.trusted_proxies)
            if client is None or not _within(client, src.allow_from):
                raise _Refused(403, "sender not allowed (the source's allow_from)")
        # Read before the first await: a reload may drop this source from the maps meanwhile.
        bucket = self._buckets.get(src.name)
        masked = self._secret_headers[src.name]
        sifted = src.name in self._sifted
        if self.state.draining:
            return self._unavailable("shutting_down", "shutting down")
        if request.chunked and request.headers["Transfer-Encoding"].strip().lower() != "chunked":
            # The parser frames a body by its last coding alone: "gzip, chunked" would be
            # journaled still compressed, for the actions to take as the body.
            raise _Refused(400, "unsupported Transfer-Encoding: only chunked is taken")
        length = request.content_length
        most_bytes = src.max_body_bytes or server.max_body_bytes
        if length is not None and length > most_bytes:
            raise _too_large(most_bytes)
        body = await self._read(request, most_bytes)
        headers = request.headers
        # A list header's lines are one list (RFC 9110 §5.3): two "gzip" lines are "gzip, gzip".
        encoding = ", ".join(headers.getall("Content-Encoding", ()))
        if encoding:
            try:
                body = content_coding.decode(body, encoding, most_bytes)
            except content_coding.DecodeError as exc:
                raise _Refused(exc.status, exc.message) from None
        now = self.clock.time()
        verify = src.verify
        scheme = SCHEMES.get(verify.scheme) if verify is not None else None
        url = ""  # what a signature may cover: only a verified source needs it
        if verify is not None:
            try:
                url = str(request.url)
            except ValueError:  # a Host header that is no host[:port] (RFC 9112 §3.2: a 400)
                raise _Refused(400, "malformed Host header") from None
        checked = self._check(request, name, src, scheme, body, url, now)
        if isinstance(checked, web.Response):
            return checked
        if bucket is not None:
            wait_s = bucket.take()
            if wait_s:
                self._log_shed(
                    "refused webhook status=429 source=%s reason='over intake_per_s'", name
                )
                return json_error(429, "intake limit reached", wait_s)
        # Only the extracted values are bound to SQLite as text (headers are stored as ASCII
        # JSON, the body as bytes, the source name matched SOURCE_NAME or is configured).
        payload = _Payload(body, headers)
        key = None
        if src.dedup is not None:
            found = extract(src.dedup, headers, payload, typed=True)
            key = _storable(_kept(src.dedup, found, masked), "dedup", src.dedup)
        if key is None and scheme is not None:
            key = _storable(scheme.dedup_key(headers, body), "the delivery id header")
        body_key = None
        if verify and scheme and scheme.keeps_signed_key(verify):
            # Nothing signed expires (or the body is not signed), so a captured signature re-sent
            # under a fresh delivery id would verify as a new event: what was signed (the body,
            # for most) is a second dedup key.
            body_key = scheme.replay_key(verify, headers, body, url)
        sent_tenant = extract(src.tenant, headers, payload) if src.tenant else None
        tenant = ""
        if src.tenant and sent_tenant is not None:
            tenant = _storable(_kept(src.tenant, sent_tenant, masked), "tenant", src.tenant) or ""
        # Read once; stored as sent, like the headers (shown masked where it names a credential).
        query = request.query_string
        # Kept as sent (%00 stays three characters); only aiohttp's pure-Python parser lets a
        # non-ASCII or NUL byte through.
        if query and (not query.isascii() or "\x00" in query):
            _storable(query, "the query")
        if key is None:
            # A body's hash is its tenant's: two tenants posting one body are two deliveries.
            # With a query it is the query's too (``/hooks/shop?store=eu`` and ``?store=us``);
            # without one, the key is what it always was, so a retry across an upgrade is
            # still a duplicate. A signed body's key (``body_key``) leaves the query out: it
            # is not signed, and a captured request re-sent under a fresh query would verify.
            digest = query_body_key(query, body) if query else sha256_key(body)
            key = body_key or (f"{tenant}:{digest}" if tenant else digest)
            stamp = checked["timestamp"] if checked is not None else None
            if body_key is None and stamp is not None:
                # A signed timestamp bounds a replay to the tolerance window, not to one event:
                # the same signed request re-sent under another query (or an unsigned tenant
                # header) had a key of its own. What was signed, its time and body, is a second
                # key (for a source whose provider sends no delivery id); a provider's retry
                # signs a new time and is judged by the first.
                body_key = signed_key(stamp, body)
        second = f"{name}:{body_key}" if body_key is not None and body_key != key else None
        # A source without actions adds no job: the backlog's bound is not its to keep.
        if self.journal.backlog_jobs >= server.max_backlog and src.actions:
            return await self._backlog_full(name, src.name, f"{name}:{key}", second)
        rule = src.priority
        # Priority rules name tenants as sent, whatever the journal keeps of them.
        by = extract(rule.by, headers, payload) if rule.by is not None else sent_tenant or None
        event = Event(
            id=new_event_id(),
            source=name,
            received_at=now,
            dedup_key=f"{name}:{key}",
            tenant=tenant,
            priority=rule.classify(by),
            headers=redact_request_headers(headers, masked),
            body=body,
            verified=checked,
            query=query,
        )
        actions = src.actions
        filtered: tuple[str, ...] = ()
        if sifted:
            actions, filtered = sift(actions, headers, payload)
        jobs = tuple(
            NewJob(
                id=new_job_id(),
                action=a.name,
                type=a.type,
                max_attempts=a.retry.max_attempts,
                order_key=(
                    _storable(
                        _kept(a.ordered_by, extract(a.ordered_by, headers, payload), masked),
                        "ordered_by",
                        a.ordered_by,
                    )
                    if a.ordered_by
                    else None
                ),
            )
            for a in actions
        )
        # Queued for the writer, the commit completes even if we stop waiting (timeout, client
        # gone): the provider's retry then finds a duplicate instead of creating a second event.
        journal = self.journal
        if (
            journal.queued_body_bytes > server.max_inflight_body_bytes
            or journal.queued_ingests > server.max_connections
        ):
            # The writer is not keeping up (a stalled disk, a database gone silent): what each
            # webhook answered 503 leaves queued stays in memory until it is written. Bodies
            # bound it, and so does their count: empty ones with 32 KB of headers piled up.
            self._log_slow(
                "journal writer behind by more than server.max_inflight_body_bytes or"
                " server.max_connections of webhooks: answering 503",
            )
            return self._unavailable("writer_behind", "journal busy, retry later")
        state = self.state
        state.waiting += 1
        crowded = state.waiting >= BUSY_WAITING
        try:
            commit = self.journal.submit_ingest(NewEvent(event, jobs, second, filtered))
            self._ack_deadlines.watch(commit)
            result = await commit
        except _CommitTimeout:
            self._log_slow("journal commit slower than %.1fs: answering 503", server.ack_timeout_s)
            self._slow_told = True
            return self._unavailable("commit_timeout", "journal busy, retry later")
        except JournalUnavailable:
            return self._unavailable("journal_unavailable", "journal unavailable, retry later")
        finally:
            state.waiting -= 1
        if self._slow_told:  # the end of a stall is news too: the 503s' lines stopped with it
            self._slow_told = False
            self._log_slow.flush()
            log.warning("journal commits answer within %.1fs again", server.ack_timeout_s)
        # Ids are [0-9A-Z_] only, so the answer is formatted, not encoded: this is the hot path.
        if result.duplicate:
            # A crowd of duplicates (a sender retrying one delivery in a loop) leaves no job
            # behind: it does not hold every source's jobs as a burst of webhooks does.
            state.duplicates[src.name] += 1
            return Ack(200, b'{"id": "%s", "duplicate": true}' % result.event_id.encode())
        state.accepted += 1
        if crowded:
            state.busy_at = self.clock.monotonic()
        return Ack(src.ack_status, b'{"id": "%s", "duplicate": false}' % event.id.encode())
