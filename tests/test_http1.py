"""The receiver's HTTP/1.1 server (webhookd.http1): keep-alive, pipelining, HEAD, closing rules,
the idle timeout and the drain at shutdown, spoken by hand over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser

from tests.conftest import make_config
from tests.procs import poll
from tests.rawhttp import RawAnswer, RawConn
from webhookd.http1 import MAX_HEAD_BYTES, Answer, Http1Server, Request, _Connection
from webhookd.journal import Journal
from webhookd.receiver import Receiver
from webhookd.state import IntakeState

CATCH_ALL = """
[sources."*"]
"""
# A source whose provider sends a GET handshake (Meta's hub.challenge), beside plain ones.
META = """
[sources.meta]
verify = { scheme = "meta", secret = "app-secret", verify_token = "vt" }
"""


@dataclass
class Served:
    address: str
    server: Http1Server
    db: Path
    entered: asyncio.Event  # a request reached the receiver's handler
    left: asyncio.Event  # ... and its handler returned
    state: IntakeState

    def events(self) -> int:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])


Start = Callable[..., Awaitable[Served]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """A receiver on its own ``Http1Server``, saying when a request enters and leaves its
    handler; ``hold`` (an event) keeps each one in the handler until set."""
    async with contextlib.AsyncExitStack() as stack:

        async def go(
            *,
            keepalive_timeout: float = 75.0,
            hold: asyncio.Event | None = None,
            server_config: str = "",
        ) -> Served:
            cfg = make_config(tmp_path, CATCH_ALL + META, server=server_config)
            journal = await stack.enter_async_context(Journal(cfg.journal.path))
            entered, left = asyncio.Event(), asyncio.Event()

            class Watched(Receiver):
                async def handle(self, request: Request) -> Answer:
                    entered.set()
                    if hold is not None:
                        await hold.wait()
                    try:
                        return await super().handle(request)
                    finally:
                        left.set()

            state = IntakeState()
            server = Watched(cfg, journal, state).server(keepalive_timeout=keepalive_timeout)
            address = (await server.start("127.0.0.1", 0))[0]
            stack.push_async_callback(server.close, 1.0)
            return Served(address, server, cfg.journal.path, entered, left, state)

        yield go


def post(n: int, *extra: bytes) -> bytes:
    body = b'{"n": %d}' % n
    head = [b"POST /hooks/h HTTP/1.1", b"Host: test", b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def test_pipelined_requests_are_answered_in_order_on_one_connection(start: Start) -> None:
    """Two hundred webhooks in one write (past the queue that pauses reading): every one is
    answered, in the order sent, and journaled; the connection stays open."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(b"".join(post(n) for n in range(200)))
    ids = []
    for _ in range(200):
        answer = await conn.answer()
        assert answer.status == 202 and "connection" not in answer.headers, answer
        ids.append(answer.doc["id"])
    assert ids == sorted(ids) and len(set(ids)) == 200  # ids grow with arrival
    await conn.send(post(200))
    assert (await conn.answer()).status == 202
    await conn.close()
    assert served.events() == 201


def sized(head_bytes: int, body: bytes = b"{}") -> bytes:
    """A POST to /hooks/h whose request line and headers (the blank line too) are exactly
    ``head_bytes`` long, padded with ``X-Pad-N`` headers of at most 8,000 bytes each."""
    head = b"POST /hooks/h HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n" % len(body)
    room = head_bytes - len(head) - 2
    pads = []
    while room:
        value = min(room - 12, 8000)  # "X-Pad-NN: " + value + CRLF
        assert value > 0
        pads.append(b"X-Pad-%02d: %s\r\n" % (len(pads), b"v" * value))
        room -= value + 12
    return head + b"".join(pads) + b"\r\n" + body


async def test_a_head_over_32_kib_is_431_before_its_body_is_read(start: Start) -> None:
    """The parser's limits (8,190 bytes a line, 100 headers) let ~800 KB of headers through,
    each request's stored with its event: a request line and headers over 32 KiB get a JSON
    431 without the handler seeing them or the body being waited for, then a close. A head of
    exactly 32 KiB is taken, its headers stored."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(sized(MAX_HEAD_BYTES))
    assert (await conn.answer()).status == 202
    await conn.close()
    conn = await RawConn.open(served.address)
    await conn.send(sized(MAX_HEAD_BYTES + 1, body=b"x" * 100)[:-100])  # the body never comes
    answer = await conn.answer()
    assert (answer.status, answer.headers["connection"]) == (431, "close"), answer
    assert answer.doc == {"error": "request line and headers larger than 32768 bytes"}
    assert await conn.closed_by_peer()
    await conn.close()
    assert served.events() == 1
    with contextlib.closing(sqlite3.connect(served.db)) as db:
        (stored,) = db.execute("SELECT headers FROM events").fetchone()
    assert [name for name, _ in json.loads(stored) if name.startswith("X-Pad-")] == [
        f"X-Pad-0{n}" for n in range(5)
    ]


async def test_a_head_that_grows_past_32_kib_is_431_before_it_ends(start: Start) -> None:
    """Header lines sent without the blank line that ends them are refused once they pass the
    limit, not buffered up to the parser's ~800 KB."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(sized(MAX_HEAD_BYTES + 1000)[: MAX_HEAD_BYTES + 500])
    answer = await conn.answer()
    assert answer.status == 431, answer
    assert await conn.closed_by_peer()
    await conn.close()
    assert not served.entered.is_set() and served.events() == 0


async def test_a_pipelined_head_over_the_limit_is_431_after_the_requests_before_it(
    start: Start,
) -> None:
    """A good request and one with too large a head in one write: the first is answered and
    journaled, the second gets 431, and the connection closes."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(post(1) + sized(MAX_HEAD_BYTES + 1))
    first, second = await conn.answer(), await conn.answer()
    assert (first.status, second.status) == (202, 431), (first, second)
    assert await conn.closed_by_peer()
    await conn.close()
    assert served.events() == 1


async def test_a_big_head_behind_requests_the_parser_held_back_is_431(start: Start) -> None:
    """60 small requests and then a ~96 KiB head in one write: the parser holds back what a
    full queue cannot take and releases it later without new bytes; the big head among those
    is still measured and refused, after the 60 are answered."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(b"".join(post(n) for n in range(60)) + sized(MAX_HEAD_BYTES * 3 + 17))
    statuses = [(await conn.answer()).status for _ in range(61)]
    assert statuses == [202] * 60 + [431], statuses
    assert await conn.closed_by_peer()
    await conn.close()
    assert served.events() == 60


@pytest.mark.parametrize("where", ["first", "second", "pipelined"])
async def test_a_header_over_8190_bytes_is_400_wherever_it_is(start: Start, where: str) -> None:
    """A header's name and value over 8,190 bytes in all (``max_field_size``) is refused with
    the parser's 400 as any header, not only the first: from the second on the parser checks
    the value alone, and a 16 KB header line was taken. One of exactly 8,190 is taken."""
    served = await start()
    long = b"X" * 7800 + b": " + b"a" * 8190  # a 15,992-byte header line
    at_limit = b"X" * 7800 + b": " + b"a" * 390
    heads = {
        "first": b"POST /hooks/h HTTP/1.1\r\n" + long + b"\r\nHost: t\r\n",
        "second": b"POST /hooks/h HTTP/1.1\r\nHost: t\r\n" + long + b"\r\n",
        "pipelined": post(1) + b"POST /hooks/h HTTP/1.1\r\nHost: t\r\n" + long + b"\r\n",
    }
    conn = await RawConn.open(served.address)
    try:
        await conn.send(post(0, at_limit))
        assert (await conn.answer()).status == 202
        await conn.send(heads[where] + b"Content-Length: 2\r\n\r\n{}")
        if where == "pipelined":
            assert (await conn.answer()).status == 202
        answer = await conn.answer()
        assert answer.status == 400, answer
        assert answer.doc == {"error": "a line of the request is longer than 8190 bytes"}
        assert await conn.closed_by_peer()
    finally:
        await conn.close()
    assert served.events() == (2 if where == "pipelined" else 1)


async def test_a_head_growing_behind_a_full_queue_is_still_431(start: Start) -> None:
    """Header lines that never end, sent behind 31 pipelined webhooks while the first is
    answered slowly (``hold``: a slow commit): once read, they are refused past 32 KiB, after
    the 32 answers. Read while 31 waited, they went uncounted (the parser's held-back requests
    were feared), and a head grew to the parser's ~800 KB, held until the keep-alive timeout."""
    hold = asyncio.Event()
    served = await start(hold=hold)
    conn = await RawConn.open(served.address)
    await conn.send(b"".join(post(n) for n in range(31)))
    await served.entered.wait()
    [server_conn] = served.server.connections
    head = b"POST /hooks/h HTTP/1.1\r\nHost: t\r\n"
    head += b"".join(b"X-Pad-%02d: %s\r\n" % (n, b"v" * 8000) for n in range(90))
    await conn.send(post(31) + head)  # ~720 KB of header lines, the blank line never sent

    async def read_or_stopped() -> bool:  # read all of it, or reading stopped before it
        return server_conn._buffer_paused or server_conn._head_at_most >= len(head)

    try:
        await poll(read_or_stopped, timeout_s=10)
        hold.set()
        statuses = [(await conn.answer()).status for _ in range(32)]
        assert statuses == [202] * 32, statuses
        try:
            async with asyncio.timeout(10):
                answer: RawAnswer | None = await conn.answer()
        except TimeoutError:
            answer = None
        assert answer is not None and answer.status == 431, f"a {len(head)}-byte head: {answer}"
        assert await conn.closed_by_peer()
    finally:
        await conn.close()
    assert served.events() == 32


async def test_a_client_still_sending_a_refused_body_gets_its_answer_not_a_reset(
    start: Start,
) -> None:
    """Answered 413 from its Content-Length, a client that posts its whole body before it
    reads (as most HTTP libraries do) gets the 413: the connection lingers, reading and
    dropping the rest, and closes when the client has closed its side. Closed at once, the
    bytes left unread would make the kernel answer with a reset that can destroy the 413
    before it is read."""
    served = await start(server_config="max_body_bytes = 1024")
    body = b"x" * (8 << 20)
    for _ in range(3):
        conn = await RawConn.open(served.address)
        await conn.send(
            b"POST /hooks/h HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await conn.send(body)
        answer = await conn.answer()
        assert (answer.status, answer.headers["connection"]) == (413, "close"), answer
        assert await conn.reader.read(1) == b""  # the server's FIN, after the answer
        conn.writer.write_eof()
        await conn.close()
    assert served.events() == 0

    # A client that sends no more and never closes: closed after server.linger_s.
    served.server.linger_s = 0.05
    conn = await RawConn.open(served.address)
    await conn.send(b"POST /hooks/h HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\nxx")
    assert (await conn.answer()).status == 413
    assert await conn.closed_by_peer()
    await conn.close()

    # The same for garbage: its 400, then what follows it is read and dropped.
    conn = await RawConn.open(served.address)
    await conn.send(b"PO(ST /hooks/h HTTP/1.1\r\nHost: test\r\n\r\n" + b"y" * (4 << 20))
    assert (await conn.answer()).status == 400
    await conn.close()


async def test_bodies_and_pipelines_past_32_kib_are_not_taken_for_a_head(start: Start) -> None:
    """Only head bytes count: a 512 KiB body sent in pieces, then a request with a 32 KiB head
    right behind it on the same connection, then 1,000 pipelined requests (~130 KB in one
    write, more than the parser queues at once) are all taken."""
    served = await start()
    conn = await RawConn.open(served.address)
    body = b'"' + b"x" * 2**19 + b'"'
    pieces = [body[i : i + 2**16] for i in range(0, len(body), 2**16)]
    await conn.send(b"POST /hooks/h HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
    for piece in pieces[:-1]:
        await conn.send(piece)
    await conn.send(pieces[-1] + sized(MAX_HEAD_BYTES))
    assert [(await conn.answer()).status for _ in range(2)] == [202, 202]
    await conn.send(b"".join(post(n, b"X-Pad: " + b"p" * 50) for n in range(1000)))
    statuses = {(await conn.answer()).status for _ in range(1000)}
    assert statuses == {202}
    await conn.close()
    assert served.events() == 1002


async def test_requests_before_garbage_in_the_same_read_are_answered_before_its_400(
    start: Start,
) -> None:
    """Two webhooks and then bytes the parser refuses, in a connection's first write: the
    parser drops the requests it completed when it raises, but both are answered and journaled,
    then the garbage gets its 400 and the connection closes."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(post(1) + post(2) + b"PO(ST /hooks/h HTTP/1.1\r\nHost: test\r\n\r\n")
    answers = [await conn.answer() for _ in range(3)]
    assert [a.status for a in answers] == [202, 202, 400], answers
    assert answers[2].doc == {"error": "malformed request method"}
    assert answers[0].doc["id"] != answers[1].doc["id"]
    assert await conn.closed_by_peer()
    await conn.close()
    assert served.events() == 2


# A request the parser refuses (a duplicate Host header, as a client library might send).
REFUSED = b"POST /hooks/h HTTP/1.1\r\nHost: t\r\nHost: u\r\nContent-Length: 2\r\n\r\n{}"


async def test_a_webhook_before_a_refused_request_in_a_later_read_is_not_answered_400(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """The same past a connection's first read: a webhook and then a refused request in one
    write get 202 (journaled) and 400, in that order; the parser drops what it completed in a
    read when it raises, and a 400 sent in its place is read by the client, in order, as the
    webhook's answer (providers do not retry a 400). Where the read began inside a request
    (its head split across writes), the requests it completed cannot be found again: the
    connection closes after the answers already due, without the 400."""
    served = await start()
    conn = await RawConn.open(served.address)
    try:
        for n in (1, 2):
            await conn.send(post(n))
            assert (await conn.answer()).status == 202
        await conn.send(post(3) + REFUSED)
        third = await conn.answer()
        assert third.status == 202, third
        assert (await conn.answer()).status == 400
        assert await conn.closed_by_peer()
    finally:
        await conn.close()
    assert served.events() == 3

    caplog.set_level(logging.INFO, logger="webhookd.http")
    caplog.clear()  # the first connection's refusal, told where INFO was on already
    conn = await RawConn.open(served.address)
    split = post(5)
    try:
        await conn.send(post(4) + split[:20])
        assert (await conn.answer()).status == 202
        await conn.send(split[20:] + REFUSED)
        assert await conn.closed_by_peer()  # no answer: none would be the right one
    finally:
        await conn.close()
    assert served.events() == 4
    said = [r.getMessage() for r in caplog.records if r.name == "webhookd.http"]
    assert said == [
        "closed the connection from 127.0.0.1 without answering a malformed request (400"
        " Duplicate 'Host' header found.): the requests before it in the same read are lost"
    ], said


async def test_a_refused_request_among_those_the_parser_held_back_gets_no_400(
    start: Start,
) -> None:
    """40 webhooks without a body in one write, the 35th refused: the parser stops at 32 (a
    full queue) and goes on later with the rest, from bytes of its own, when half are answered;
    raising there, it loses the 33rd and 34th it completed, and a 400 would be read as the
    33rd's answer. The 32 are answered, then the connection closes without one."""
    served = await start()
    conn = await RawConn.open(served.address)
    empty = b"POST /hooks/h?n=%d HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
    try:
        await conn.send(b"".join(REFUSED if n == 34 else empty % n for n in range(40)))
        statuses = [(await conn.answer()).status for _ in range(32)]
        assert statuses == [202] * 32, statuses
        assert await conn.closed_by_peer()
    finally:
        await conn.close()
    assert served.events() == 32


async def _head_of(conn: RawConn, method: bytes, target: bytes) -> tuple[bytes, list[bytes]]:
    """The status line and header lines (without ``Date``) of the answer to ``method target``;
    the body, if any, is left unread."""
    await conn.send(b"%s %s HTTP/1.1\r\nHost: test\r\n\r\n" % (method, target))
    status_line = await conn.reader.readuntil(b"\r\n")
    head = (await conn.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[:-2]
    return status_line, [line for line in head if not line.startswith(b"Date: ")]


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"/hooks/h", 405),  # no handshake: webhooks are POSTed
        (b"/hooks/meta?hub.mode=subscribe&hub.verify_token=vt&hub.challenge=c123", 200),
        (b"/hooks/meta?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=c", 403),
        (b"/hooks/meta", 400),  # a GET at Meta's source is its handshake: hub.mode missing
        (b"/nope", 404),
    ],
)
async def test_head_gets_exactly_the_status_and_headers_of_a_get_and_no_body(
    start: Start, target: bytes, status: int
) -> None:
    """HEAD answers with a GET's status line and headers (Content-Length of the GET's body,
    Allow on a 405), and no body: the next answer on the connection follows at once."""
    served = await start()
    conn = await RawConn.open(served.address)
    try:
        get_status, get_head = await _head_of(conn, b"GET", target)
        length = next(int(h[15:]) for h in get_head if h.startswith(b"Content-Length: "))
        assert get_status.split()[1] == b"%d" % status
        get_body = await conn.reader.readexactly(length)
        head_status, head_head = await _head_of(conn, b"HEAD", target)
        assert (head_status, head_head) == (get_status, get_head), get_body
        await conn.send(post(1))
        answer = await conn.answer()  # right after HEAD's headers: no body came between
        assert answer.status == 202, answer
    finally:
        await conn.close()
    assert served.events() == 1


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        (b"GET", b"/hooks/h", b"POST"),
        (b"HEAD", b"/hooks/h", b"POST"),
        (b"PUT", b"/hooks/h", b"POST"),
        (b"DELETE", b"/hooks/h", b"POST"),
        (b"PUT", b"/hooks/meta", b"GET, HEAD, POST"),
        (b"OPTIONS", b"/hooks/meta", b"GET, HEAD, POST"),
    ],
)
async def test_a_405_names_the_methods_the_path_takes_in_allow(
    start: Start, method: bytes, path: bytes, allow: bytes
) -> None:
    """RFC 9110 §15.5.6: a 405 carries Allow. A source takes POST; one whose provider makes a
    GET handshake (Meta) takes GET too, and HEAD, which is answered as a GET."""
    served = await start()
    conn = await RawConn.open(served.address)
    try:
        status_line, head = await _head_of(conn, method, path)
        assert status_line.startswith(b"HTTP/1.1 405 "), (status_line, head)
        assert b"Allow: " + allow in head, head
    finally:
        await conn.close()


async def test_a_connection_past_max_connections_is_answered_503_and_closed(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``server.max_connections`` open connections a new one gets 503 + Retry-After
    before it sends anything, and is closed; the open ones are served as before, and once one
    closes a new connection is taken again."""
    served = await start(server_config="max_connections = 2")
    first, second = await RawConn.open(served.address), await RawConn.open(served.address)
    for n, conn in enumerate((first, second)):
        await conn.send(post(n))
        assert (await conn.answer()).status == 202
    third = await RawConn.open(served.address)
    answer = await third.answer()
    assert (answer.status, answer.headers["retry-after"]) == (503, "5"), answer
    assert answer.doc == {"error": "too many connections, retry later"}
    assert await third.closed_by_peer()
    said = [r.getMessage() for r in caplog.records if "max_connections" in r.getMessage()]
    assert said == ["1 connection(s) answered 503: 2 open, server.max_connections = 2"]
    assert served.state.unavailable == {"max_connections": 1}
    await second.send(post(2))
    assert (await second.answer()).status == 202

    await first.close()

    async def one_open() -> bool:
        return len(served.server.connections) == 1

    await poll(one_open, timeout_s=5)
    fourth = await RawConn.open(served.address)
    await fourth.send(post(3))
    assert (await fourth.answer()).status == 202
    for conn in (second, third, fourth):
        await conn.close()
    assert served.events() == 4


async def test_refusals_after_the_line_are_told_when_their_10_s_are_up_and_at_the_close(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """The first connection refused is logged at once, the ones within 10 s of that line are
    counted; the count is logged when the 10 s are up though no refusal comes after them (a
    timer, run here by hand rather than waited for), and what is left at the close."""
    served = await start(server_config="max_connections = 1")
    server = served.server
    held = await RawConn.open(served.address)
    await held.send(post(0))
    assert (await held.answer()).status == 202

    async def refuse(n: int) -> None:
        for _ in range(n):
            conn = await RawConn.open(served.address)
            assert (await conn.answer()).status == 503
            await conn.close()

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "answered 503" in r.getMessage()]

    await refuse(3)
    line = "connection(s) answered 503: 1 open, server.max_connections = 1"
    assert said() == [f"1 {line}"]
    timer = server._refusal_timer
    # uvloop keeps a timer's time to the millisecond.
    assert timer is not None and timer.when() == pytest.approx(
        server._refusal_logged_at + 10.0, abs=0.002
    )
    server.log_refusals()  # what the timer runs when the 10 s are up
    assert said() == [f"1 {line}", f"2 {line}"] and server._refusal_timer is None
    await refuse(1)  # within 10 s of that line: held until the close, if it comes first
    assert len(said()) == 2
    await held.close()
    await server.close(1.0)
    assert said() == [f"1 {line}", f"2 {line}", f"1 {line}"]
    assert served.state.unavailable == {"max_connections": 4}


async def test_at_max_connections_the_one_idle_longest_makes_room_for_a_new_one(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections opened and left silent (or a provider's, between keep-alive requests) would
    hold every slot for keepalive_timeout: at the limit, the one idle longest is closed for
    the new connection, as nginx does. One in the middle of a request is never closed: with
    every connection busy, the new one is refused as before."""
    hold = asyncio.Event()
    served = await start(server_config="max_connections = 2", hold=hold)
    served.server.evict_idle_s = 0.0  # else idle at least 1 s: what the test would sleep for
    hold.set()
    silent = await RawConn.open(served.address)  # connected first, never sends a thing
    used = await RawConn.open(served.address)
    await used.send(post(0))
    assert (await used.answer()).status == 202
    newcomer = await RawConn.open(served.address)
    assert await silent.closed_by_peer()
    await newcomer.send(post(1))
    assert (await newcomer.answer()).status == 202
    # Now ``used`` answered longest ago: it goes next, and the newer one stays.
    later = await RawConn.open(served.address)
    assert await used.closed_by_peer()
    await newcomer.send(post(2))
    assert (await newcomer.answer()).status == 202
    said = [r.getMessage() for r in caplog.records if "to make room" in r.getMessage()]
    assert len(said) == 2 and all(line.endswith("(server.max_connections = 2)") for line in said)

    # Both connections in the middle of a request: nothing to close, the third is refused.
    hold.clear()
    await newcomer.send(post(3))
    await later.send(post(4))

    async def both_busy() -> bool:
        return all(c.busy() for c in served.server.connections)

    await poll(both_busy, timeout_s=5)
    refused = await RawConn.open(served.address)
    assert (await refused.answer()).status == 503
    hold.set()
    assert (await newcomer.answer()).status == 202 and (await later.answer()).status == 202
    for conn in (silent, used, newcomer, later, refused):
        await conn.close()
    assert served.events() == 5


async def test_a_connection_sending_its_head_slowly_is_not_closed_to_make_room(
    start: Start,
) -> None:
    """A connection whose request head is still arriving is under way, not idle, however long
    ago it last had an answer: at the limit the silent one goes instead, and the slow one's
    request is answered once its head is all in."""
    served = await start(server_config="max_connections = 2")
    slow = await RawConn.open(served.address)
    silent = await RawConn.open(served.address)
    request = post(1)
    await slow.send(request[:20])

    async def head_begun() -> bool:
        return any(c.read_since(0.0) for c in served.server.connections)

    await poll(head_begun, timeout_s=5)
    for conn in served.server.connections:  # as if both were opened a minute ago
        conn._last_active -= 60.0
    newcomer = await RawConn.open(served.address)
    assert await silent.closed_by_peer()
    await slow.send(request[20:])
    assert (await slow.answer()).status == 202
    await newcomer.send(post(2))
    assert (await newcomer.answer()).status == 202
    for conn in (slow, silent, newcomer):
        await conn.close()
    assert served.events() == 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        post(1, b"Connection: close"),
        post(1).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_a_client_that_will_not_keep_alive_gets_its_answer_then_a_close(
    start: Start, request_bytes: bytes
) -> None:
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(request_bytes)
    answer = await conn.answer()
    assert answer.status == 202 and answer.headers["connection"] == "close", answer
    assert await conn.closed_by_peer()
    await conn.close()
    assert served.events() == 1


async def test_an_http_1_0_client_asking_for_keep_alive_is_told_and_kept(start: Start) -> None:
    served = await start()
    conn = await RawConn.open(served.address)
    for n in range(2):
        await conn.send(post(n, b"Connection: keep-alive").replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        answer = await conn.answer()
        assert answer.status == 202 and answer.headers["connection"] == "keep-alive", answer
    await conn.close()
    assert served.events() == 2


async def test_an_answer_before_the_body_closes_the_connection(start: Start) -> None:
    """413 by Content-Length, before the body was sent: the rest of the stream cannot be
    trusted as the next request, so the answer says close and the server closes."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(b"POST /hooks/h HTTP/1.1\r\nHost: test\r\nContent-Length: 999999999\r\n\r\n")
    answer = await conn.answer()
    assert answer.status == 413 and answer.headers["connection"] == "close", answer
    assert await conn.closed_by_peer()
    await conn.close()
    assert served.events() == 0


async def test_an_upgrade_request_is_answered_then_closed(start: Start) -> None:
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(post(1, b"Connection: Upgrade", b"Upgrade: h2c"))
    answer = await conn.answer()
    assert answer.status == 202 and answer.headers["connection"] == "close", answer
    assert await conn.closed_by_peer()
    await conn.close()


@pytest.mark.parametrize("sent", [b"", post(1)], ids=["never-asked", "after-an-answer"])
async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(
    start: Start, sent: bytes
) -> None:
    served = await start(keepalive_timeout=0.2)
    conn = await RawConn.open(served.address)
    if sent:
        await conn.send(sent)
        assert (await conn.answer()).status == 202
    async with asyncio.timeout(10):
        assert await conn.closed_by_peer()
    await conn.close()


async def test_a_request_head_that_never_ends_is_closed_after_the_keepalive_timeout(
    start: Start,
) -> None:
    """Half a request line, then nothing (slowloris): the idle timer is not reset by bytes,
    only by a complete request head."""
    served = await start(keepalive_timeout=0.2)
    conn = await RawConn.open(served.address)
    await conn.send(b"POST /hooks/h HTTP/1.1\r\nHost: te")
    async with asyncio.timeout(10):
        assert await conn.closed_by_peer()
    await conn.close()
    assert not served.server.connections


async def test_shutdown_answers_the_requests_in_flight_and_closes_the_idle(
    start: Start,
) -> None:
    """``close``: no new connection is taken, an idle keep-alive connection is closed at once,
    and a webhook in flight is still journaled and answered (then its connection closes)."""
    hold = asyncio.Event()
    served = await start(hold=hold)
    idle = await RawConn.open(served.address)
    busy = await RawConn.open(served.address)
    await busy.send(post(1))
    await served.entered.wait()
    closing = asyncio.create_task(served.server.close(10.0))
    assert await idle.closed_by_peer()
    host, _, port = served.address.rpartition(":")
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))
    hold.set()
    answer = await busy.answer()
    assert answer.status == 202 and answer.headers["connection"] == "close", answer
    assert await busy.closed_by_peer()
    await closing
    await idle.close()
    await busy.close()
    assert served.events() == 1


async def test_a_request_pipelined_behind_one_in_flight_at_the_drain_gets_no_answer(
    start: Start,
) -> None:
    """At the drain (as app.py does it: ``intake.draining``, then the server's close) a webhook
    whose body is still arriving is taken, and its 202 says ``Connection: close``; one
    pipelined behind it is not taken: no answer, nothing journaled (its provider sends it
    again), and the connection closes after the first's answer."""
    served = await start()
    idle = await RawConn.open(served.address)
    conn = await RawConn.open(served.address)
    first = post(1)
    await conn.send(first[:-3])  # its body under way: the handler is reading it
    await served.entered.wait()
    served.state.draining = True
    closing = asyncio.create_task(served.server.cleanup())
    assert await idle.closed_by_peer()  # the drain has begun
    await conn.send(first[-3:] + post(2))  # the rest of the first, and a second behind it
    answer = await conn.answer()
    assert (answer.status, answer.headers["connection"]) == (202, "close"), answer
    assert await conn.closed_by_peer()  # and nothing more: no answer to the second
    await closing
    await idle.close()
    await conn.close()
    assert served.events() == 1


def chunked_post(n: int, trailer: bytes = b"") -> bytes:
    body = b'{"n": %d}' % n
    head = b"POST /hooks/h HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"%x\r\n%s\r\n0\r\n%s\r\n" % (len(body), body, trailer)


async def test_a_chunked_request_closes_its_connection_so_its_trailer_reaches_nothing(
    start: Start,
) -> None:
    """aiohttp's C parser hands a chunked request's last trailer field to the next request on
    the connection (a trailer ``X-GitHub-Delivery`` would make the next delivery a duplicate):
    a chunked request's answer closes the connection."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(chunked_post(1, b"Content-Encoding: gzip\r\n") + post(2))
    answer = await conn.answer()
    assert answer.status == 202 and answer.headers["connection"] == "close", answer
    assert await conn.closed_by_peer()
    await conn.close()
    other = await RawConn.open(served.address)  # the next request, on a connection of its own
    await other.send(post(2))
    assert (await other.answer()).status == 202
    await other.close()
    assert served.events() == 2


async def test_a_client_that_half_closes_after_its_request_gets_its_answer(start: Start) -> None:
    """``shutdown(SHUT_WR)`` after sending: the answer still comes (the event was stored, and
    a provider that sees no answer retries), then the connection closes."""
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(post(1) + post(2))
    conn.writer.write_eof()
    assert [(await conn.answer()).status for _ in range(2)] == [202, 202]
    assert await conn.closed_by_peer()
    await conn.close()
    assert served.events() == 2


async def test_a_half_close_before_the_body_ends_is_a_400_at_once(start: Start) -> None:
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(b"POST /hooks/h HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{")
    conn.writer.write_eof()
    answer = await conn.answer()
    assert answer.status == 400 and answer.doc == {"error": "body could not be read"}
    await conn.close()
    assert served.events() == 0


async def test_a_body_whose_chunk_framing_breaks_is_a_400_at_once(start: Start) -> None:
    """A bad chunk size after the head: a 400 now, not a 408 after server.body_timeout_s."""
    served = await start(server_config="body_timeout_s = 60")
    conn = await RawConn.open(served.address)
    head = b"POST /hooks/h HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
    await conn.send(head + b"3\r\nabc\r\n")
    await served.entered.wait()
    await conn.send(b"zz\r\n")
    async with asyncio.timeout(10):
        answer = await conn.answer()
    assert answer.status == 400, answer
    assert await conn.closed_by_peer()
    await conn.close()
    assert served.events() == 0


async def test_a_client_that_takes_no_answers_is_cut_off_and_read_no_further(
    start: Start,
) -> None:
    """A client pipelining requests and reading none of the answers: once the socket's buffers
    are full nothing more is read from it, and after server.body_timeout_s (the time a body
    gets) without taking an answer the connection is cut, freeing its slot."""
    served = await start(server_config="body_timeout_s = 0.5")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    host, _, port = served.address.rpartition(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    probe = b"GET /hooks/h HTTP/1.1\r\nHost: test\r\n\r\n" * 500  # 405s, read by no one

    def writes_paused() -> bool:
        return any(c.writing_paused for c in served.server.connections)

    async def stalled() -> bool:
        if not writes_paused() and writer.transport.get_write_buffer_size() < 1 << 20:
            writer.write(probe)
        return writes_paused()

    await poll(stalled, timeout_s=20)
    [conn] = served.server.connections
    assert conn.busy() and conn._buffer_paused  # it reads no more while its answers wait
    paused_at = asyncio.get_running_loop().time()

    async def cut() -> bool:
        return not served.server.connections

    await poll(cut, timeout_s=10)
    assert asyncio.get_running_loop().time() - paused_at >= 0.4
    writer.transport.abort()


PROBE = b"GET /hooks/h HTTP/1.1\r\nHost: test\r\n\r\n"  # a 405 of ~190 bytes


async def unread(served: Served, ending: bytes) -> tuple[RawConn, _Connection]:
    """A client that reads one answer, then sends 200 requests and ``ending`` and reads none
    of their answers: with the socket's buffers made small on both sides, the answers fill
    them and some 25 KB wait in the server's write buffer, below its high-water mark (so
    writing never pauses, and the keep-alive path's send timeout never starts). Returns the
    client (its transport not reading) and the server's side of its connection."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    host, _, port = served.address.rpartition(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    client = RawConn(*await asyncio.open_connection(sock=sock))
    await client.send(PROBE)
    assert (await client.answer()).status == 405  # by now the server has the connection
    client.writer.transport.pause_reading()  # what comes stays in the kernel's buffers
    conn = next(reversed(served.server.connections))  # the one that answered last
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    await client.send(PROBE * 200 + ending)
    return client, conn


async def answers_left(client: RawConn) -> int:
    """How many answers the client still gets, reading to the end."""
    client.writer.transport.resume_reading()
    got = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await client.reader.read(1 << 16):
                got += chunk
    await client.close()
    return got.count(b"HTTP/1.1 405 ")


@pytest.mark.parametrize(
    ("ending", "keepalive_timeout"),
    [
        (b"GET /hooks/h HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", 75.0),
        (b"POST /hooks/h HTTP/1.1\r\nHost: test\r\nContent-Length: 999999999\r\n\r\n", 75.0),
        (b"", 0.2),
    ],
    ids=["connection-close", "answered-before-its-body", "idle"],
)
async def test_a_connection_closed_with_answers_its_client_never_takes_is_cut_off(
    start: Start, ending: bytes, keepalive_timeout: float
) -> None:
    """A close waits for the answers written to be sent: a client that takes none of them
    would keep its socket, and a descriptor, for ever. Closed after ``Connection: close``,
    after a lingering close (a 413 before the body) or for idling past keepalive_timeout, it
    is cut off once server.body_timeout_s (the send timeout) has passed, its answers dropped."""
    served = await start(keepalive_timeout=keepalive_timeout, server_config="body_timeout_s = 0.2")
    client, conn = await unread(served, ending)

    async def cut() -> bool:
        return conn.transport is None

    with contextlib.suppress(TimeoutError):
        await poll(cut, timeout_s=5)
    unsent = None if conn.transport is None else conn.transport.get_write_buffer_size()
    left = await answers_left(client)
    assert unsent is None, f"still open with {unsent} bytes unsent"
    assert left < 200  # what waited in the server's buffer was dropped
    assert not served.server.connections


async def test_a_connection_closed_to_make_room_is_closed_at_once_answers_unsent_or_not(
    start: Start,
) -> None:
    """At max_connections, the connection closed for a new one leaves ``connections`` (it no
    longer counts against the limit): its socket must go with it, though its client takes
    none of its answers, or each such client leaves a descriptor open, past the limit."""
    served = await start(server_config="max_connections = 1")
    served.server.evict_idle_s = 0.0
    client, conn = await unread(served, b"")

    async def idle_with_answers_unsent() -> bool:
        transport = conn.transport
        unsent = transport is not None and transport.get_write_buffer_size() > 0
        return unsent and conn.idle_since() is not None

    await poll(idle_with_answers_unsent, timeout_s=10)
    newcomer = await RawConn.open(served.address)
    await newcomer.send(post(1))
    assert (await newcomer.answer()).status == 202
    await newcomer.close()
    evicted = conn.transport is None
    left = await answers_left(client)
    assert evicted, f"closed to make room, yet open till its client read ({left} answers)"
    assert left < 200  # what waited in the server's buffer was dropped
    assert conn not in served.server.connections


async def test_bodies_pipelined_behind_a_slow_answer_stop_the_reading_past_128_kib(
    start: Start,
) -> None:
    """Requests pipelined behind one answered slowly (``hold``: a stalled commit) wait with
    their bodies, which no in-flight bound counts: past 128 KiB of them the connection reads
    no further (32 waiting bodies of ~120 KB, each under the parser's own pause, held 4 MB per
    connection), and reads on as they are answered: all 40 are, and journaled."""
    hold = asyncio.Event()
    served = await start(hold=hold)
    conn = await RawConn.open(served.address)
    bodies = [b'["%s", %d]' % (b"x" * 120_000, n) for n in range(40)]
    head = b"POST /hooks/h HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
    sending = asyncio.create_task(conn.send(b"".join(head % len(b) + b for b in bodies)))
    try:
        await served.entered.wait()
        [server_conn] = served.server.connections

        async def reading_stopped() -> bool:
            return server_conn._buffer_paused

        await poll(reading_stopped, timeout_s=10)
        waiting = [item for item in server_conn._queue if isinstance(item, tuple)]
        held = sum(body.total_bytes for _, body in waiting)
        # 128 KiB, with the body under way before the read that passed it (up to the 128 KiB
        # at which the parser pauses it) and that read (256 KiB at most).
        assert held <= 512 * 1024, f"{len(waiting)} waiting requests hold {held} body bytes"
        hold.set()
        statuses = [(await conn.answer()).status for _ in range(40)]
        await sending
    finally:
        hold.set()
        sending.cancel()
        await conn.close()
    assert statuses == [202] * 40
    assert served.events() == 40


async def test_a_client_gone_mid_body_leaves_nothing_and_the_server_goes_on(
    start: Start,
) -> None:
    served = await start()
    conn = await RawConn.open(served.address)
    await conn.send(b"POST /hooks/h HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{")
    await served.entered.wait()
    conn.writer.transport.abort()
    async with asyncio.timeout(10):
        await served.left.wait()  # its body read failed: nothing to journal
    other = await RawConn.open(served.address)
    await other.send(post(2))
    assert (await other.answer()).status == 202
    await other.close()
    assert served.events() == 1


async def test_a_client_reset_mid_body_has_its_connection_closed_and_forgotten(
    start: Start,
) -> None:
    """A client that resets its connection mid-body leaves no connection, socket or descriptor
    behind once its request has been answered, under every loop."""
    served = await start(server_config="body_timeout_s = 0.5")
    conn = await RawConn.open(served.address)
    await conn.send(b"POST /hooks/h HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{")
    await served.entered.wait()
    conn.writer.transport.abort()
    async with asyncio.timeout(10):
        await served.left.wait()

    async def forgotten() -> bool:
        return not served.server.connections

    await poll(forgotten, timeout_s=5)


@pytest.mark.parametrize(
    ("head", "url"),
    [
        (
            b"POST /hooks/h?a=1&b=%20 HTTP/1.1\r\nHost: hooks.example:8443\r\n",
            "http://hooks.example:8443/hooks/h?a=1&b=%20",
        ),
        (b"POST /hooks/h HTTP/1.0\r\n", "http://127.0.0.1:9/hooks/h"),
        (
            b"POST http://target.example/hooks/h?x=1 HTTP/1.1\r\nHost: other\r\n",
            "http://target.example/hooks/h?x=1",
        ),
    ],
    ids=["host-header", "no-host", "absolute-form"],
)
async def test_the_url_a_signature_is_checked_against(head: bytes, url: str) -> None:
    """What a URL-signing scheme (Twilio) verifies: the URL as aiohttp's ``request.url`` gives
    it, query kept as sent; without a Host header the address the connection came in on."""
    loop = asyncio.get_running_loop()
    parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16)
    messages, _, _ = parser.feed_data(head + b"Content-Length: 0\r\n\r\n")
    message, payload = messages[0]
    conn = SimpleNamespace(local_host="127.0.0.1:9", peer="127.0.0.1")
    request = Request(message, payload, conn)  # type: ignore[arg-type]
    assert str(request.url) == url
    assert request.path == "/hooks/h"
