"""The HTTP client the actions deliver through: one aiohttp session for the daemon, whose host
name lookups run on threads of its own, and which tells a request whether its connection was
a reused one.

Hazard: aiohttp's default resolver asks the event loop (``loop.getaddrinfo``), and uvloop runs
that on libuv's thread pool, 4 threads of which at most 2 take lookups at once. Two targets
whose DNS hung (20 s) held every other lookup behind them, and every connect too: uvloop's
connect looks up even an IP literal there (below). Healthy targets timed out in the meantime.
On the stock loop the lookups share the default executor with whatever else uses it.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from webhookd.threads import CallThreads

# ``socket.getaddrinfo``'s shape: (host, port, family, type, proto, flags) -> its 5-tuples.
Lookup = Callable[[str, int, int, int, int, int], Sequence[tuple[Any, Any, int, str, Any]]]

# Lookups under way at once (threads start as needed): only more names than this stuck in DNS
# at once would hold up the others' lookups.
LOOKUP_THREADS = 16
# The addresses found are numbers: the connect that follows need not look them up again.
_NUMERIC = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
_AS_NUMBERS = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
# The longest line of an answer's head (its status line, a header) the client reads: Python's
# http.client's (what requests and urllib read). aiohttp's own 8190 bytes refused a service's
# 2xx that set a 9 KB cookie or policy header: the delivery it had taken was sent again at
# every attempt, then dead. 128 headers at most, as aiohttp has it (http.client: 100).
HEAD_LINE_BYTES = 65536


class Resolver(AbstractResolver):
    """Host names looked up with ``lookup`` (``socket.getaddrinfo``) on ``LOOKUP_THREADS``
    daemon threads of their own: a lookup stuck in DNS holds up neither the others nor the
    process's exit. The connector in front keeps its DNS cache (10 s) and asks once
    for a name many requests wait on.

    uvloop's connect still looks up the address found here on libuv's pool (a number, so no
    DNS, but in the same queue): fast while that pool is free. What else webhookd looks up
    there is its own journal's host (PostgreSQL) and an openai action's API host (httpx).
    """

    def __init__(self, lookup: Lookup = socket.getaddrinfo) -> None:
        self._lookup = lookup
        self._threads = CallThreads(LOOKUP_THREADS, "webhookd-dns")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found: list[ResolveResult] = await self._threads.call(
            self._addresses, (host, port, family)
        ).future
        return found

    def _addresses(self, asked: tuple[str, int, int]) -> list[ResolveResult]:
        host, port, family = asked
        found = self._lookup(host, port, family, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)
        addresses: list[ResolveResult] = []
        for af, _, proto, _, address in found:
            if af == socket.AF_INET6 and address[3]:
                # A link-local address is only reachable through its interface: the scope id
                # goes with it, "fe80::1%eth0".
                number, service = socket.getnameinfo(address, _AS_NUMBERS)
                address = (number, int(service))
            addresses.append(
                ResolveResult(
                    hostname=host,
                    host=address[0],
                    port=address[1],
                    family=af,
                    proto=proto,
                    flags=_NUMERIC,
                )
            )
        return addresses

    async def close(self) -> None:
        # A lookup stuck in DNS is not waited for: its thread is a daemon, which the
        # interpreter's exit does not wait for either.
        self._threads.close()


@dataclass(slots=True)
class ConnectionUsed:
    """A request's ``trace_request_ctx``: whether the connection it went out on last was an
    idle one reused. Only the session ``open_session`` makes sets it; False elsewhere."""

    reused: bool = False


def _noting(reused: bool) -> Callable[[Any, SimpleNamespace, Any], Awaitable[None]]:
    async def note(_session: Any, context: SimpleNamespace, _params: Any) -> None:
        if isinstance(used := context.trace_request_ctx, ConnectionUsed):
            used.reused = reused

    return note


def _connections_noted() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_noting(True))
    # At the start of a new one: one that then fails to connect was not a reused one either.
    trace.on_connection_create_start.append(_noting(False))
    return trace


@contextlib.asynccontextmanager
async def open_session(
    connections: int, lookup: Lookup = socket.getaddrinfo
) -> AsyncIterator[aiohttp.ClientSession]:
    """The daemon's HTTP session: at most ``connections`` open, host names looked up by a
    ``Resolver`` with ``lookup``, closed with it; a request's ``ConnectionUsed`` noted."""
    resolver = Resolver(lookup)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, resolver=resolver),
            max_line_size=HEAD_LINE_BYTES,
            max_field_size=HEAD_LINE_BYTES,
            timeout=aiohttp.ClientTimeout(total=None),
            # No cookies: one target's Set-Cookie would go back with every later delivery to
            # its host, whatever the event, tenant or source.
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[_connections_noted()],
        ) as http:
            # aiohttp sends an idempotent method (PUT, DELETE) again itself after any dropped
            # connection, a fresh one too, and after part of an answer had come: a PUT reached
            # its target twice. Off, as aiohttp's own test client has it: every method goes by
            # webhookd's rule (deliver: once more, on a reused connection closed unanswered).
            http._retry_connection = False
            yield http
    finally:
        await resolver.close()  # the connector does not close a resolver it was given
