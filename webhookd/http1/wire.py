"""The receiver's HTTP/1.1 server's requests and answers: the ``Request`` a handler reads, the
``Ack`` it answers, the head's size limit, and the answers' bytes on the wire."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy, MultiMapping
from yarl import URL

_SKIPPED = frozenset(("content-length", "date", "connection", "transfer-encoding", "server"))
# A request's line and headers together, at most. The parser's own limits (a line or field of
# 8190 bytes, 100 headers) let one request bring ~800 KB of headers, all of it parsed, kept
# with its event in the journal and held in memory meanwhile; nginx's default is about this
# (large_client_header_buffers 4 8k), and no provider sends a tenth of it.
MAX_HEAD_BYTES = 32 * 1024
# A Host header's value as RFC 9112 §3.2 has it: RFC 3986's host (an IP literal in brackets, or
# a name of unreserved, sub-delims and %-escapes) and an optional port. A "/", "?", "#", "@" or
# a space in it would move the URL's path, query or fragment: the URL a signature covers
# (Twilio's) would then hold a query the request did not come with.
_HOST = re.compile(r"(\[[0-9A-Za-z:._~%!$&'()*+,;=-]*\]|[0-9A-Za-z._~%!$&'()*+,;=-]*)(:[0-9]*)?")


class HeadTooLarge(HttpProcessingError):
    """A request whose line and headers pass ``MAX_HEAD_BYTES``: 431, then the connection
    closes (its body, if any, is never read)."""

    code = 431

    def __init__(self) -> None:
        super().__init__(message=f"request line and headers larger than {MAX_HEAD_BYTES} bytes")


def head_bytes(message: RawRequestMessage, max_field_size: int) -> int:
    """The size of a parsed request's line and headers on the wire (less any spaces around
    header values): ``METHOD target HTTP/1.1``, ``name: value`` each, CRLFs. ``LineTooLong``
    (400, as the parser answers) for a header whose name and value pass ``max_field_size``:
    the parser checks them together for the first header only, the value alone for others."""
    size = len(message.method) + len(message.path) + 14  # " ", " HTTP/1.1\r\n", last CRLF
    for name, value in message.raw_headers:
        field = len(name) + len(value)
        if field > max_field_size:
            raise LineTooLong("a header", max_field_size)
        size += field + 4
    return size


class Ack:
    """The receiver's answer to a webhook taken: a status and a JSON body, nothing else."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body


Answer = Ack | web.Response
Handler = Callable[["Request"], Awaitable[Answer]]


class Peer(Protocol):
    """What a request reads of the connection it came on."""

    local_host: str  # ``host:port`` the connection came in on
    peer: str | None  # the client's address

    def write(self, data: bytes) -> None: ...


class Request:
    """One request as the receiver reads it: the parsed head, the body's stream, the peer."""

    __slots__ = ("_conn", "_message", "content")

    def __init__(self, message: RawRequestMessage, content: StreamReader, conn: Peer):
        self._message = message
        self.content = content
        self._conn = conn

    @property
    def method(self) -> str:
        """The request's method, but ``GET`` for a ``HEAD``: a HEAD is answered as the GET it
        stands for, status and headers alike, without the body (RFC 9110 §9.3.2), so the
        handler never needs to know it is one."""
        method = self._message.method
        return "GET" if method == "HEAD" else method

    @property
    def path(self) -> str:
        """The percent-decoded path, without the query (an absolute-form target's too)."""
        return self._message.url.path

    @property
    def version(self) -> tuple[int, int]:
        return self._message.version

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._message.headers

    @property
    def chunked(self) -> bool:
        """Whether the body is framed by chunks (its Transfer-Encoding ends with ``chunked``)."""
        return bool(self._message.chunked)

    @property
    def content_length(self) -> int | None:
        value = self._message.headers.get("Content-Length")
        return None if value is None else int(value)  # the parser accepts digits only

    @property
    def url(self) -> URL:
        """The URL the client asked for, as aiohttp's ``request.url`` gives it: ``http``, the
        Host header (else the address the connection came in on), the path and query; for an
        absolute-form target (``POST http://host/path``) the target's own authority, which
        HTTP/1.1 says wins over the Host header. ``ValueError`` for a Host that is no
        ``host[:port]``."""
        target = self._message.url
        if target.absolute:
            return target.with_scheme("http")
        host = self._message.headers.get("Host")
        if host is None:
            host = self._conn.local_host
        elif not _HOST.fullmatch(host):
            raise ValueError("a Host header that is no host[:port]")
        return URL.build(scheme="http", authority=host).join(target)

    @property
    def query(self) -> MultiMapping[str]:
        return self._message.url.query

    @property
    def query_string(self) -> str:
        """The query as received, still percent-encoded, without the ``?`` (``""`` when none).
        Bounded by the parser: a request target over ``max_line_size`` (8190 bytes, app.py's
        ``_HANDLER``) is refused with a 400 before any handler runs, as is (by aiohttp's C
        parser) a query with a byte that is not ASCII."""
        return self._message.url.raw_query_string

    @property
    def remote(self) -> str | None:
        return self._conn.peer

    def body_received(self) -> bytes:
        """The whole body, once ``content.is_eof()``: what the parser already buffered."""
        return self.content.read_nowait(-1)

    def send_continue(self) -> None:
        """``100 Continue``, for a client that sent ``Expect: 100-continue`` and waits."""
        self._conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _DateHeader:
    """The ``Date`` header line, formatted at most once a second."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_ACK = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n%s"
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


_CLOSE = b"Connection: close\r\n"
_KEEP_ALIVE = b"Connection: keep-alive\r\n"  # said to HTTP/1.0 clients, who assume a close


def _format(answer: Answer, connection: bytes, date: bytes, head: bool = False) -> bytes:
    """The answer's bytes on the wire: status line, headers (``connection``: the Connection
    header line or nothing), body (not for ``HEAD``, whose answer has the headers a ``GET``
    would have had, and no body)."""
    status = answer.status
    reason = _REASONS.get(status, b"Unknown")
    if type(answer) is Ack:
        body = answer.body
        return _ACK % (status, reason, len(body), date, connection, b"" if head else body)
    assert isinstance(answer, web.Response)
    raw = answer.body
    body = bytes(raw) if isinstance(raw, bytes | bytearray) else b""  # webhookd's are bytes
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, value in answer.headers.items():
        if name.lower() not in _SKIPPED:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines += [b"Content-Length: %d\r\n" % len(body), date, connection, b"\r\n"]
    if not head:
        lines.append(body)
    return b"".join(lines)
