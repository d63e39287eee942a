"""The receiver's HTTP/1.1 server: a connection (parse, queue, answer in order) and the listener
(binds, holds the connections to their limit, drains)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import StreamReader

from webhookd.http1.wire import (
    _CLOSE,
    _KEEP_ALIVE,
    MAX_HEAD_BYTES,
    Handler,
    HeadTooLarge,
    Request,
    _DateHeader,
    _format,
    head_bytes,
    host_port,
)
from webhookd.json_errors import json_error, refusal
from webhookd.throttle import Throttle

log = logging.getLogger("webhookd.http")

_REFUSAL_LOG_S = 10.0  # connections refused past the limit are logged at most this often
# At the connection limit, a connection idle this long is closed for a new one: a provider's
# keep-alive connection between its requests, or one opened and left silent.
_EVICT_IDLE_S = 1.0
# Parsed requests one connection holds, the one being answered among them, before it stops
# reading: the parser counts each until it is answered, and past this many holds back what it
# reads (aiohttp's pure-Python parser all of it, unparsed), so no read may come then.
_QUEUE_MAX = 32
_QUEUE_RESUME = 16
_READ_LIMIT = 2**16  # body bytes buffered per request before the parser pauses the socket
# Whole bodies of the requests waiting on one connection (pipelined behind the one being
# answered) past which it stops reading: no in-flight bound counts them (the receiver counts a
# body as it reads it), and 32 waiting requests of ~128 KiB each (each under the parser's own
# pause) held 4 MB per connection, 4 GB at 1,024 connections. Checked as requests are parsed
# and answered: a read of one request costs nothing more.
_QUEUED_BODIES_MAX = 2 * _READ_LIMIT


def _no_head_ends_in(data: bytes) -> bool:
    """Whether no request head can have been completed by ``data`` (no blank line ends in
    it, nor one begun in the read before). Not for b"": the parser went on with bytes it had
    held back, which may hold whole requests."""
    return b"\n\r\n" not in data and not data.startswith((b"\n", b"\r\n"))


class _Connection(BaseProtocol):
    """One client connection: parse, queue, answer in order."""

    __slots__ = (
        "_broken",
        "_closing",
        "_current",
        "_cut",
        "_fresh",
        "_handling",
        "_head_at_least",
        "_head_at_most",
        "_last_active",
        "_last_body",
        "_last_read",
        "_linger",
        "_queue",
        "_server",
        "_task",
        "_waiter",
        "local_host",
        "peer",
        "request_parser",
    )

    def __init__(self, server: Http1Server) -> None:
        loop = server.loop
        # It stops between requests once this many wait (the rest stays in its buffer until
        # ``message_consumed`` frees a slot): a pipelining client cannot make one connection
        # hold more parsed requests than this.
        parser = server.parser(self, max_queued=_QUEUE_MAX)
        super().__init__(loop, parser)
        self.request_parser = parser
        self._server = server
        self._queue: deque[tuple[RawRequestMessage, StreamReader] | HttpProcessingError] = deque()
        # One task per connection, started by its first request and waiting between requests
        # (a task per request cost ~5 µs more on the hot path: its creation and registration).
        self._task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._handling = False  # a request is being answered
        self._closing = False  # answer what is in flight, then close
        self._broken = False  # the parser gave up: nothing more is read
        self._current: StreamReader | None = None  # the body of the request being answered
        # The body of the request parsed last: while it is not at its end, bytes read are its.
        self._last_body: StreamReader | None = None
        # Bounds on the bytes of the next request's head received so far: those surely its
        # (read while no body was) refuse it once past MAX_HEAD_BYTES; the upper bound, all
        # read since the read that completed the last head, says when heads must be measured.
        self._head_at_least = 0
        self._head_at_most = 0
        # The next byte read begins a request: nothing read yet, or the last read ended where
        # a request did (see data_received).
        self._fresh = True
        self._last_active = loop.time()
        self._last_read = -math.inf  # when part of a head last arrived
        self._linger: asyncio.TimerHandle | None = None  # closes a lingering connection
        self._cut: asyncio.TimerHandle | None = None  # aborts a close its client never drains
        self.peer: str | None = None
        self.local_host = ""

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple | list) else None
        sock = transport.get_extra_info("sockname")
        if isinstance(sock, tuple | list):
            self.local_host = host_port(str(sock[0]), sock[1])
        server = self._server
        if len(server.connections) >= server.max_connections and not server.make_room():
            server.refuse(self)
            return
        server.connections[self] = None
        if server.closing:
            self._closing = True
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._server.connections.pop(self, None)
        self._closing = True
        if self._linger is not None:
            self._linger.cancel()
        if self._cut is not None:
            self._cut.cancel()
        # A body still being read ends with an error; the request's handler is not cancelled
        # (a webhook queued for its commit is written all the same).
        lost = exc if exc is not None else ConnectionResetError("connection lost")
        self._fail_bodies(lost, whole_too=True)
        self._queue.clear()
        with contextlib.suppress(Exception):
            self.request_parser.feed_eof()
        self._wake()

    def eof_received(self) -> bool:
        """The client has sent all it will (a half-close, ``shutdown(SHUT_WR)``): answer what
        it sent, then close. A body it left unfinished ends with an error."""
        self._closing = True
        cut = ConnectionResetError("the client closed its side before the body ended")
        self._fail_bodies(cut)
        if (self._task is None and not self._queue) or self._linger is not None:
            self.close()
        self._wake()
        return True  # keep the transport open for the answers

    def pause_writing(self) -> None:
        # A client that does not read its answers: read nothing more from it (no more parsed
        # requests to hold) until it does.
        super().pause_writing()
        if not self._buffer_paused:
            self._pause_reading_for_buffer()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._read_on(_QUEUE_MAX - 1)

    def _read_on(self, queued_at_most: int) -> None:
        """Read again, once the client takes its answers and no more than ``queued_at_most``
        requests wait: first what the parser held back, then the socket."""
        if (
            self._buffer_paused
            and not self._paused
            and not self._broken
            and len(self._queue) <= queued_at_most
            and not self._bodies_held()
        ):
            self.data_received(b"")
            if len(self._queue) < _QUEUE_MAX - 1 and not self._bodies_held():
                self._resume_reading_for_buffer()

    def _bodies_held(self) -> bool:
        """Whether the requests waiting hold more than ``_QUEUED_BODIES_MAX`` in whole bodies
        (one still arriving is bounded by its own flow control, and is read on when its turn
        comes whatever this says)."""
        held = 0
        for item in self._queue:
            if type(item) is tuple and item[1].is_eof():
                held += item[1].total_bytes
        return held > _QUEUED_BODIES_MAX

    def _fail_bodies(self, exc: BaseException, *, whole_too: bool = False) -> None:
        """End every body still being read (the one being answered, those queued) with ``exc``;
        ``whole_too``: those received whole as well (the connection is gone: no answer can
        be given for them)."""
        bodies = [item[1] for item in self._queue if not isinstance(item, HttpProcessingError)]
        if self._current is not None:
            bodies.append(self._current)
        for body in bodies:
            if whole_too or not body.is_eof():
                body.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        last = self._last_body
        in_body = last is not None and not last.is_eof()  # what comes first is that body's
        before = last.total_bytes if last is not None and in_body else 0
        fresh = self._fresh
        try:
            messages, upgraded, _tail = self.request_parser.feed_data(data)
        except HttpProcessingError as exc:
            if fresh and not self._closing:  # requests before it in the read are answered first
                self._queue.extend(self._taken_before(data))
                self._queue.append(exc)
            elif data and _no_head_ends_in(data):  # none completed here: the 400 answers next
                self._queue.append(exc)
            else:  # those completed in this read are lost, and a 400 would answer one of them
                self._server.log_malformed(
                    "closed the connection from %s without answering a malformed request (%d %s):"
                    " the requests before it in the same read are lost",
                    self.peer,
                    *refusal(exc),
                )
            self._broken = self._closing = True  # nothing after it can be trusted
            self._pause_transport_reading()
            # A body's framing broke after its head (a bad chunk size): its reader fails now
            # (a 400) instead of waiting out server.body_timeout_s for bytes that cannot come.
            self._fail_bodies(web.RequestPayloadError(f"malformed body: {exc.message}"))
            self._start()
            return
        if not messages:
            if last is not None and not last.is_eof():  # all of it was that body's
                self._head_at_most = 0
                return
            if data:  # a read that ends a request is all of its body's (nothing else came)
                self._fresh = (
                    last is not None and in_body and len(data) == last.total_bytes - before
                )
            self._last_read = self._loop.time()  # a head under way: not idle, see make_room
            self._head_at_most += len(data)
            # Bytes surely of a head: read while no body was (and the parser held none back:
            # reading stops before it would, see _QUEUE_MAX).
            if not in_body and not self._closing:
                self._head_at_least += len(data)
                if self._head_at_least > MAX_HEAD_BYTES:  # refused before the head is all in
                    self._refuse_head([], HeadTooLarge())
            return
        if self._closing:  # closing: bodies in progress are read, no new request
            return
        # b"": bytes the parser held back (a full queue, a paused body) are parsed now; their
        # heads were never counted, so each is measured. Else the heads here hold no more than
        # the bytes since the last whole head, less the bodies' among them, and are measured
        # while that room could hold one too large (past MAX_HEAD_BYTES) or with a header the
        # parser let through (past max_field_size: see head_bytes).
        server = self._server
        room = self._head_at_most + len(data)
        if room > server.measured_past:  # measuring costs ~1 us a request: only where needed
            if last is not None and in_body:
                room -= last.total_bytes - before
            for _message, body in messages:
                room -= body.total_bytes
        if not data or room > server.measured_past:
            for i, (message, _body) in enumerate(messages):
                try:
                    size = head_bytes(message, server.max_field_size)
                except LineTooLong as exc:
                    self._refuse_head(messages[:i], exc)
                    return
                if size > MAX_HEAD_BYTES:
                    self._refuse_head(messages[:i], HeadTooLarge())
                    return
                room -= size - len(message.raw_headers)  # at least, "name:value" lines
                if data and room <= server.measured_past:
                    break  # the heads after it have no more room than that
        last = self._last_body = messages[-1][1]
        self._head_at_least = 0
        ended = last.is_eof()
        self._queue.extend(messages)
        # Whether the next read begins a request: the parser held none of this one back (it
        # does once _QUEUE_MAX wait, the one being answered counted), and it ended with its last
        # request whole: with its body (the parser's copy of its bytes from this read), or with
        # the blank line that ends a head if it has none, not with the next head begun (that
        # cannot end in a blank line; b"", a read of bytes the parser held, ends with neither).
        self._fresh = (
            ended
            and len(self._queue) < _QUEUE_MAX - 1
            and data.endswith(last._buffer[-1] if last.total_bytes else b"\r\n\r\n")
        )
        if data:  # the next head may have begun in this read, unless it begins the next one
            self._head_at_most = len(data) if ended and not self._fresh else 0
        if upgraded:  # no other protocol is spoken here: answer, then close
            self._closing = True
            self._pause_transport_reading()
        elif (
            len(self._queue) >= _QUEUE_MAX - 1  # with the one being answered, _QUEUE_MAX
            or (len(self._queue) > 1 and self._bodies_held())
        ) and not self._buffer_paused:
            self._pause_reading_for_buffer()
        self._start()

    def _taken_before(self, data: bytes) -> list[tuple[RawRequestMessage, StreamReader]]:
        """The whole, well-formed requests ``data`` begins with, before what the parser refused.

        aiohttp's parser drops the requests it completed in a read when it raises on a later
        one in the same read. Parsed again by a parser that stops after each request, they are
        found one by one until the error. Only for a read that begins a request (``_fresh``):
        elsewhere a read may begin inside a request, and parsing it afresh could take a body
        for a request.
        """
        server = self._server
        parser = server.parser(self, max_queued=1)  # stops after each request; each feed goes on
        taken: list[tuple[RawRequestMessage, StreamReader]] = []
        max_field = server.max_field_size  # a header past it ends them too, as a refusal
        with contextlib.suppress(HttpProcessingError):
            messages, _, _ = parser.feed_data(data)
            while messages and len(taken) < _QUEUE_MAX:
                for message, body in messages:
                    if not body.is_eof() or head_bytes(message, max_field) > MAX_HEAD_BYTES:
                        return taken  # its body broke, or its head is refused anyway
                    taken.append((message, body))
                messages, _, _ = parser.feed_data(b"")
        return taken

    def _refuse_head(
        self, before: list[tuple[RawRequestMessage, StreamReader]], refused: HttpProcessingError
    ) -> None:
        """Answer the requests ``before`` a head refused (over ``MAX_HEAD_BYTES``: 431; with a
        header over ``max_field_size``: 400), then refuse it, and read nothing more."""
        self._broken = self._closing = True
        self._pause_transport_reading()
        self._queue.extend(before)
        self._queue.append(refused)
        self._start()

    # -- answering --

    def _start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        else:
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _serve(self) -> None:
        """Answer each request in turn; between them, wait for the next."""
        try:
            while self.transport is not None:
                if self._queue:
                    self._handling = True
                    try:
                        if not await self._answer_next():
                            return
                    finally:
                        self._handling = False
                        self._last_active = self._loop.time()
                        self._server.request_done(self)
                    continue
                if self._closing:
                    self.close()
                    return
                self._waiter = self._loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self._task = None

    async def _answer_next(self) -> bool:
        """Answer the next request; False when the connection closes after it."""
        server = self._server
        item = self._queue.popleft()
        if isinstance(item, HttpProcessingError):
            self._refuse(item)
            return False
        message, payload = item
        self._current = payload
        request = Request(message, payload, self)
        try:
            answer = await server.handler(request)
        except Exception:
            answer = server.unexpected(request)
        self._current = None
        if self.transport is None:
            return False
        keep_alive = (
            not message.should_close
            and not message.upgrade  # no other protocol is spoken here
            and not server.closing
            and payload.is_eof()  # an unread body leaves the stream out of step
            # aiohttp's C parser hands a chunked request's last trailer field on to the next
            # request's headers: a connection does not outlive a chunked request.
            and not message.chunked
            and not (isinstance(answer, web.Response) and answer.keep_alive is False)
            and not (self._closing and not self._queue)
        )
        connection = _CLOSE
        if keep_alive:  # HTTP/1.1 keeps alive unless told; HTTP/1.0 only when told
            connection = b"" if message.version >= (1, 1) else _KEEP_ALIVE
        head = message.method == "HEAD"
        self.transport.write(_format(answer, connection, server.date.line(), head))
        if not keep_alive:
            if payload.is_eof():
                self.close()
            else:  # answered before its body was all in: the client may be sending it still
                self.linger()
            return False
        self.request_parser.message_consumed()
        if self._buffer_paused:  # checked here: the call is off every ack's path
            self._read_on(_QUEUE_RESUME)
        if self._paused:  # the client reads slowly: wait for the socket to drain, a while
            try:
                async with asyncio.timeout(server.send_timeout_s):
                    await self._drain_helper()
            except ConnectionError:
                pass
            except TimeoutError:  # it takes no answers: its slot and buffers go to others
                if self.transport is not None:
                    self.transport.abort()
                return False
        return True

    def _refuse(self, exc: HttpProcessingError) -> None:
        """A JSON answer to a request the parser refused; the connection closes after it."""
        code, reason = (exc.code, exc.message) if isinstance(exc, HeadTooLarge) else refusal(exc)
        self._server.log_malformed(
            "refused a malformed request from %s: %d %s", self.peer, code, reason
        )
        answer = json_error(code, reason)
        self.write(_format(answer, _CLOSE, self._server.date.line()))
        self.linger()
        if self._server.refused is not None:
            self._server.refused(code)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close_after_answers(self) -> None:
        self._closing = True

    def close(self) -> None:
        """Close once the answers written are sent; a client that takes none of them for
        ``send_timeout_s`` is cut off (else, reading nothing, it holds the socket for ever)."""
        self._closing = True
        transport = self.transport
        if transport is None:
            return
        if self._cut is None and transport.get_write_buffer_size():
            self._cut = self._loop.call_later(self._server.send_timeout_s, transport.abort)
        transport.close()

    def abort(self) -> None:
        """Close now, dropping whatever answers are not sent yet (with none, a plain close:
        an idle client sees its connection end, not a reset)."""
        self._closing = True
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def linger(self) -> None:
        """Close once the client has stopped sending, as nginx's lingering close: after this
        side's last answer, send a FIN and read and drop what still comes, until the client
        closes its side or ``server.linger_s`` has passed. Closed at once, a socket with bytes
        unread makes the kernel send a reset, and a client still sending (an HTTP library
        posting its whole body before it reads) loses the answer to it: a 413 or a 503's
        ``Retry-After`` becomes a connection reset."""
        transport = self.transport
        self._closing = self._broken = True  # data_received drops what comes now
        if transport is None or self._linger is not None:
            return
        if not transport.can_write_eof():
            self.close()
            return
        try:
            transport.write_eof()
        except OSError:
            # The client is gone: its reset came while its reading was paused, so asyncio's
            # transport has not seen it and raises here (uvloop's does not). Closed now, else
            # nothing ever would: the connection, its socket and descriptor were kept for good.
            transport.abort()
            return
        self._reading_paused = self._buffer_paused = False  # a body's flow control: moot
        self._resume_transport_reading()
        self._linger = self._loop.call_later(self._server.linger_s, self.close)

    def idle_since(self) -> float | None:
        """When this connection last finished an answer, if it waits for nothing now."""
        return None if self.busy() else self._last_active

    def busy(self) -> bool:
        return self._handling or bool(self._queue)

    def read_since(self, when: float) -> bool:
        """Whether part of a request's head arrived after ``when`` (a loop time)."""
        return self._last_read > when


class Http1Server:
    """The receiver's listener: ``start`` binds, ``close`` drains and closes."""

    def __init__(
        self,
        handler: Handler,
        unexpected: Callable[[Request], web.Response],
        *,
        shutdown_timeout_s: float = 10.0,
        keepalive_timeout: float = 75.0,
        send_timeout_s: float = 10.0,
        linger_s: float = 10.0,
        max_line_size: int = 8190,
        max_field_size: int = 8190,
        max_headers: int = 100,
        max_connections: int = 1024,
        limit_said: str = "",
        retry_after_s: int = 5,
        refused: Callable[[int], None] | None = None,
    ) -> None:
        self.handler = handler
        self.unexpected = unexpected
        # Open connections at most: each holds a descriptor and its buffers (~5 KB idle, more
        # with a partial head), and the descriptors the process may open are shared with the
        # admin API, the actions' connections and the journal. One past the limit is answered
        # 503 (``refused`` is told) and closed, so a flood of connections cannot take them all.
        self.max_connections = max_connections
        # How the log lines name that limit (lowered below the config's, they say why).
        self.limit_said = limit_said or f"server.max_connections = {max_connections}"
        self.retry_after_s = retry_after_s
        self.refused = refused
        self._refused_since_log = 0
        self._open_at_refusal = 0  # connections open at the last one refused
        self._refusal_logged_at = -math.inf
        # Logs the refusals held back when their time is up, should no later one come to.
        self._refusal_timer: asyncio.TimerHandle | None = None
        self.log_malformed = Throttle(log, logging.INFO, "malformed requests refused")
        self.shutdown_timeout_s = shutdown_timeout_s
        self.keepalive_timeout = keepalive_timeout
        # A client that has not taken an answer this long after the socket's buffers filled
        # is cut off: else it holds a connection slot, and what it sent, for ever.
        self.send_timeout_s = send_timeout_s
        # A client still sending after its connection's last answer (a refused body, a
        # malformed request) gets this long to stop before the close: see ``linger``.
        self.linger_s = linger_s
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        # Past this many bytes since the last whole head, the heads a read completes are
        # measured: one may pass MAX_HEAD_BYTES, or hold a header over max_field_size.
        self.measured_past = min(max_field_size, MAX_HEAD_BYTES)
        self.max_headers = max_headers
        # Open connections, the one that finished an answer (or connected) longest ago first.
        self.connections: OrderedDict[_Connection, None] = OrderedDict()
        # At max_connections, one idle at least this long is closed to make room for a new one.
        self.evict_idle_s = _EVICT_IDLE_S
        self.log_evicted = Throttle(log, logging.WARNING, "idle connections closed")
        self.closing = False
        self.date = _DateHeader()
        self.loop = asyncio.get_running_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._idle: asyncio.Event | None = None

    def parser(self, protocol: BaseProtocol, *, max_queued: int) -> HttpRequestParser:
        """A request parser for ``protocol`` with the server's limits, holding at most
        ``max_queued`` parsed requests before it stops between two."""
        return HttpRequestParser(
            protocol,
            self.loop,
            _READ_LIMIT,
            max_line_size=self.max_line_size,
            max_field_size=self.max_field_size,
            max_headers=self.max_headers,
            payload_exception=web.RequestPayloadError,
            auto_decompress=False,
            max_msg_queue_size=max_queued,
        )

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> list[str]:
        """Listen on ``host:port``; returns the ``host:port`` of each socket bound."""
        server = await self.loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        self._servers.append(server)
        self._sweep_later()
        names = [sock.getsockname() for sock in server.sockets]
        return [host_port(str(name[0]), name[1]) for name in names]

    def refuse(self, conn: _Connection) -> None:
        """Answer a connection past ``max_connections`` with a 503 before it sends anything,
        and close it; a warning at most every ``_REFUSAL_LOG_S`` says how many were."""
        conn._broken = conn._closing = True  # nothing it sends is read
        answer = json_error(503, "too many connections, retry later", self.retry_after_s)
        conn.write(_format(answer, _CLOSE, self.date.line()))
        conn.close()
        if self.refused is not None:
            self.refused(503)
        self._refused_since_log += 1
        self._open_at_refusal = len(self.connections)
        if self.loop.time() - self._refusal_logged_at >= _REFUSAL_LOG_S:
            self.log_refusals()
        elif self._refusal_timer is None:
            # Else a flood's refusals after its first line went untold until the next flood,
            # or for ever.
            self._refusal_timer = self.loop.call_at(
                self._refusal_logged_at + _REFUSAL_LOG_S, self.log_refusals
            )

    def log_refusals(self) -> None:
        """Say how many connections were refused since the last such line, if any: at a
        refusal ``_REFUSAL_LOG_S`` after that line, else when those are up, and at the close."""
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
            self._refusal_timer = None
        if not self._refused_since_log:
            return
        log.warning(
            "%d connection(s) answered 503: %d open, %s",
            self._refused_since_log,
            self._open_at_refusal,
            self.limit_said,
        )
        self._refusal_logged_at = self.loop.time()
        self._refused_since_log = 0

    def make_room(self) -> bool:
        """At ``max_connections``: close the connection idle longest, if one has been for
        ``evict_idle_s`` (no request in flight: between keep-alive requests, or none sent yet,
        and no byte of a head in that time), as nginx reuses its keep-alive connections.
        Without this, connections opened and left silent hold every slot for
        ``keepalive_timeout``, and providers get 503s meanwhile.
        False if there is none to close: the new connection is refused."""
        cutoff = self.loop.time() - self.evict_idle_s
        for conn in self.connections:  # oldest first: the first one not busy is idle longest
            since = conn.idle_since()
            if since is None:
                continue
            if since > cutoff:
                return False  # the rest were answered later still
            if conn.read_since(cutoff):  # a head arriving slowly: a request under way
                continue
            del self.connections[conn]
            conn.abort()  # a close would wait for its answers to be taken: maybe for ever
            self.log_evicted(
                "closed the connection from %s, idle for %.1f s, to make room for a new one (%s)",
                conn.peer,
                self.loop.time() - since,
                self.limit_said,
            )
            return True
        return False

    def request_done(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.move_to_end(conn)
        if self._idle is not None and not any(c.busy() for c in self.connections):
            self._idle.set()

    def _sweep_later(self) -> None:
        step = min(max(self.keepalive_timeout / 4, 0.05), 5.0)
        self._sweeper = self.loop.call_later(step, self._sweep)

    def _sweep(self) -> None:
        """Close connections with no complete request for ``keepalive_timeout``."""
        cutoff = self.loop.time() - self.keepalive_timeout
        for conn in list(self.connections):
            since = conn.idle_since()
            if since is not None and since <= cutoff:
                conn.close()  # answers it has not taken by now are cut off after send_timeout_s
        if not self.closing:
            self._sweep_later()

    async def cleanup(self) -> None:
        """``close`` with the server's own ``shutdown_timeout_s`` (as aiohttp's runners)."""
        await self.close(self.shutdown_timeout_s)

    async def close(self, timeout_s: float) -> None:
        """Stop accepting; close idle connections; give the requests in flight ``timeout_s``
        to be answered; then close whatever is left."""
        self.closing = True
        for server in self._servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.busy():
                conn.close_after_answers()
            else:
                conn.close()
        self._idle = asyncio.Event()
        if any(c.busy() for c in self.connections):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._idle.wait()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
        self.log_malformed.flush()
        self.log_evicted.flush()
        self.log_refusals()
