"""A small HTTP proxy on 127.0.0.1 for the tests of the ``proxy`` option: CONNECT tunnels for
https targets, absolute-form requests for plain http ones, optional Basic credentials (a 407
without them), and a record of what it was asked for. One request per client connection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field


@dataclass
class Asked:
    """What one client connection asked the proxy for."""

    method: str
    target: str  # host:port for CONNECT, the absolute URL otherwise
    authorization: str | None  # the Proxy-Authorization header as sent


@dataclass
class EgressProxy:
    credentials: tuple[str, str] | None = None  # (user, password) it asks for, or none
    asked: list[Asked] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _open: set[asyncio.StreamWriter] = field(default_factory=set)

    url: str = ""  # once started

    async def start(self) -> EgressProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):  # the tunnels still open end, and so their tasks
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._open.add(writer)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            self._open.discard(writer)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
        method, target, version = request_line.split(" ")
        headers = [line.split(":", 1) for line in header_lines]
        found = [v.strip() for k, v in headers if k.lower() == "proxy-authorization"]
        self.asked.append(Asked(method, target, found[0] if found else None))
        if self.credentials is not None and found != [_basic(*self.credentials)]:
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="egress"\r\nContent-Length: 0\r\n'
                b"Connection: close\r\n\r\n"
            )
            await writer.drain()
            return
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            self._open.add(up_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await _pipe_both(reader, writer, up_reader, up_writer)
            return
        # An absolute-form request: sent on to its origin in origin form, the proxy's own
        # header left out, and closed after its answer.
        rest = target.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port or 80))
        self._open.add(up_writer)
        kept = [
            f"{k}:{v}"
            for k, v in headers
            if k.lower() not in ("proxy-authorization", "connection", "proxy-connection")
        ]
        sent = [f"{method} /{path} {version}", *kept, "Connection: close", "", ""]
        up_writer.write("\r\n".join(sent).encode("latin-1"))
        await _pipe_both(reader, writer, up_reader, up_writer)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError):
            dst.write_eof()

    try:
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    finally:
        up_writer.close()
