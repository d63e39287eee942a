"""HTTP/1.1 spoken by hand over a socket, for requests no client library will send.

Stalled bodies, raw non-UTF-8 header bytes, ``Expect: 100-continue`` handshakes and lying
Content-Lengths need the exact bytes on the wire; ``RawConn`` writes them and reads answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def doc(self) -> Any:
        return json.loads(self.body)


class RawConn:
    """One client connection to ``host:port``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: str) -> RawConn:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(
        self, path: bytes, headers: list[tuple[bytes, bytes]], method: bytes = b"POST"
    ) -> None:
        """The request line and header block (``Host`` added), without any body."""
        lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: test"]
        lines += [name + b": " + value for name, value in headers]
        await self.send(b"\r\n".join(lines) + b"\r\n\r\n")

    async def answer(self) -> RawAnswer:
        """The next answer; a ``100 Continue`` is returned like any other."""
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await self.reader.readexactly(length) if length else b""
        return RawAnswer(status, headers, body)

    async def closed_by_peer(self) -> bool:
        """True once the server has closed its side (EOF, or a reset after it closed)."""
        try:
            return await self.reader.read(1) == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def post(
    address: str, path: bytes, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> RawAnswer:
    """One complete request with a Content-Length, answered, on a fresh connection."""
    conn = await RawConn.open(address)
    try:
        await conn.head(path, [*(headers or []), (b"Content-Length", b"%d" % len(body))])
        await conn.send(body)
        return await conn.answer()
    finally:
        await conn.close()
