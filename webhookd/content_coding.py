"""Content-Encoding: a request body's gzip or deflate undone, never inflated past a limit.

aiohttp's own decoding is off for the receiver: it answers a bad encoding with a plain-text
500 and two tracebacks and accepts a truncated gzip body. Here every failure is a
``DecodeError`` carrying the status to answer (400, or 413 for a body that inflates too far).
"""

from __future__ import annotations

import zlib


class DecodeError(Exception):
    """A body that cannot be decoded: ``status`` is the answer (400 or 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# zlib's wbits for each coding's container (gzip header and trailer, or zlib's).
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


# Gzip members one after another in one body: senders write one; thousands of empty ones
# would only cost the event loop time, each before any signature is checked.
_MAX_MEMBERS = 16
# Codings stacked on one body ("gzip, gzip"): as rare, and a header of thousands of them
# would have the loop inflate each layer in turn.
_MAX_LAYERS = 2


def decode(body: bytes, encoding: str, limit_bytes: int) -> bytes:
    """``body`` with its Content-Encoding undone: 400 if malformed, truncated, unknown or
    coded more than twice, 413 if it inflates past ``limit_bytes`` (never inflating more than
    that: a bomb costs nothing)."""
    # An empty list element ("gzip, ,") is no coding (RFC 9110 §5.6.1.2), nor counted as one.
    listed = (c.strip().lower() for c in encoding.split(","))
    codings = [c for c in listed if c and c != "identity"]
    if len(codings) > _MAX_LAYERS:  # each layer is undone on the event loop
        raise DecodeError(400, f"more than {_MAX_LAYERS} Content-Encodings")
    for coding in reversed(codings):  # applied in the order listed, so undone in reverse
        wbits = _WBITS.get(coding)
        if wbits is None:
            raise DecodeError(400, f"unsupported Content-Encoding {coding[:40]!r}")
        if coding == "deflate" and body and body[0] & 0x0F != 8:
            wbits = -zlib.MAX_WBITS  # a raw deflate stream without the zlib header, as sent by some
        body = _inflate(body, coding, wbits, limit_bytes)
    return body


def _inflate(data: bytes, coding: str, wbits: int, limit_bytes: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while data:  # gzip allows several members one after another
        if len(parts) == _MAX_MEMBERS:
            raise DecodeError(400, f"body has more than {_MAX_MEMBERS} {coding} members")
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(data, limit_bytes + 1 - size)
        except zlib.error:
            raise DecodeError(400, f"body is not valid {coding}") from None
        size += len(part)
        if size > limit_bytes:
            raise DecodeError(413, f"body larger than {limit_bytes} bytes once decoded")
        if not inflater.eof:
            raise DecodeError(400, f"body is truncated {coding}")
        parts.append(part)
        data = inflater.unused_data if wbits > 16 else b""
        if not data and inflater.unused_data:
            raise DecodeError(400, f"data after the end of the {coding} body")
    return b"".join(parts)
