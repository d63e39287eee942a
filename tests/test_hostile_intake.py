"""Hostile requests at the receiver: values SQLite cannot store, typed dedup keys, junk source
names, stalled and oversized bodies in flight, bad Content-Encodings, malformed HTTP,
unexpected errors.

Each test serves the real receiver application on a loopback port over a real journal file and
talks to it over raw sockets where a client library would refuse to send the bytes.
"""

from __future__ import annotations

import asyncio
import encodings
import gzip
import json
import logging
import random
import sqlite3
import string
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, HttpRequestParserPy
from conftest import make_config, serving
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from procs import poll
from rawhttp import RawAnswer, RawConn, post

from webhookd.clock import SYSTEM_CLOCK, Clock, SystemClock
from webhookd.config import Extractor
from webhookd.errors import ConfigError
from webhookd.journal import Journal
from webhookd.json_errors import refusal
from webhookd.models import Priority, sha256_key
from webhookd.receiver import Receiver, _Payload, extract
from webhookd.state import IntakeState


@dataclass
class Intake:
    address: str
    db: Path
    journal: Journal
    receiver: Receiver

    async def post(
        self, path: bytes, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> RawAnswer:
        return await post(self.address, path, body, headers)

    def row(self, sql: str, *args: Any) -> Any:
        """A committed value as another process would read it."""
        with closing(sqlite3.connect(self.db)) as conn:
            return conn.execute(sql, args).fetchone()

    async def events(self) -> int:
        return (await self.journal.counts()).events


StartIntake = Callable[..., Awaitable[Intake]]


@pytest.fixture
async def make_intake(tmp_path: Path) -> AsyncIterator[StartIntake]:
    """Start a receiver for a config built from TOML snippets (see ``make_config``)."""
    async with AsyncExitStack() as stack:

        async def start(extra: str, *, server: str = "", clock: Clock = SYSTEM_CLOCK) -> Intake:
            cfg = make_config(tmp_path, extra, server=server)
            journal = await stack.enter_async_context(Journal(cfg.journal.path))
            receiver = Receiver(cfg, journal, IntakeState(), clock=clock)
            address = await stack.enter_async_context(serving(receiver))
            return Intake(address, cfg.journal.path, journal, receiver)

        yield start


def assert_json_error(answer: RawAnswer, status: int) -> str:
    """A refusal with the status and a JSON ``{"error": ...}`` body; returns the message."""
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    message = answer.doc["error"]
    assert isinstance(message, str)
    return message


JSON_SOURCE = """
[sources.j]
dedup = "json:id"
tenant = "json:t"
priority = { by = "json:p", high = ["1", "true"] }
[[sources.j.actions]]
type = "log"
ordered_by = "json:o"
"""
FORM_SOURCE = """
[sources.f]
dedup = "form:id"
tenant = "form:t"
[[sources.f.actions]]
type = "log"
ordered_by = "form:o"
"""
HEADER_SOURCE = """
[sources.h]
dedup = "header:X-Id"
tenant = "header:X-Tenant"
[[sources.h.actions]]
type = "log"
ordered_by = "header:X-Order"
"""
MAILGUN_SOURCE = """
[sources.mg]
verify = { scheme = "mailgun", secret = "mailgun-signing-key-0123456789" }
[[sources.mg.actions]]
type = "log"
"""
CATCH_ALL = """
[sources."*"]
[[sources."*".actions]]
type = "log"
"""
EXTRACTORS = {
    "j": ("json:id", "json:t", "json:o"),
    "f": ("form:id", "form:t", "form:o"),
    "h": ("header:X-Id", "header:X-Tenant", "header:X-Order"),
}


def storable(value: str | None) -> bool:
    """Text both journals hold: no lone surrogate, and no NUL (PostgreSQL's text has none)."""
    if value is None:
        return True
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def spec(text: str) -> Extractor:
    kind, _, arg = text.partition(":")
    return Extractor(kind, arg)  # type: ignore[arg-type]


# Any code point, lone surrogates included: they reach the receiver as JSON escapes ("\udcff"),
# as raw bytes in a form body, or as raw non-UTF-8 bytes in a header.
anything = st.text(st.characters(exclude_categories=()), max_size=12)
scalars = anything | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.none()
# Header bytes the HTTP parser lets through (no controls but tab), non-UTF-8 ones included.
header_bytes = st.binary(max_size=12).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127).strip(b" \t")
)


def json_body(values: dict[str, Any], escaped: bool) -> bytes:
    # Escaped: surrogates as \udcff escapes (valid JSON text); raw: their bytes, invalid UTF-8.
    if escaped:
        return json.dumps(values).encode()
    return json.dumps(values, ensure_ascii=False).encode("utf-8", "surrogatepass")


def form_body(values: dict[str, Any]) -> bytes:
    return b"&".join(
        k.encode() + b"=" + quote_from_bytes(str(v).encode("utf-8", "surrogatepass")).encode()
        for k, v in values.items()
        if v is not None
    )


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, list[tuple[bytes, bytes]]]:
    source = draw(st.sampled_from(["j", "f", "h"]))
    if source == "h":
        values = {n: draw(header_bytes) for n in (b"X-Id", b"X-Tenant", b"X-Order")}
        return source, b"{}", [(n, v) for n, v in values.items() if v]
    fields = {k: draw(scalars if source == "j" else anything) for k in ("id", "t", "o", "p")}
    if source == "j":
        return source, json_body(fields, draw(st.booleans())), []
    return source, form_body(fields), []


@pytest.fixture
async def mixed_intake(make_intake: StartIntake) -> Intake:
    """One receiver with JSON, form and header extractors, shared by every example."""
    return await make_intake(JSON_SOURCE + FORM_SOURCE + HEADER_SOURCE)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
async def test_any_unicode_in_extracted_fields_is_stored_or_refused_with_400(
    mixed_intake: Intake, request: tuple[str, bytes, list[tuple[bytes, bytes]]]
) -> None:
    """Arbitrary text (lone surrogates too) in JSON, form and header fields is stored or a 400."""
    intake = mixed_intake
    source, body, headers = request
    answer = await intake.post(b"/hooks/" + source.encode(), body, headers)
    assert answer.status in (200, 202, 400), answer

    # What each extractor sees, the way the receiver's request gives it (aiohttp decodes header
    # bytes as UTF-8 with surrogateescape).
    seen_headers = {n.decode(): v.decode("utf-8", "surrogateescape") for n, v in headers}
    payload = _Payload(body, CIMultiDict(seen_headers))
    dedup, tenant, order = (
        extract(spec(s), seen_headers, payload, typed=(n == 0))
        for n, s in enumerate(EXTRACTORS[source])
    )
    for value in (dedup, tenant, order):
        assert value is None or isinstance(value, str)
    if answer.status == 400:
        error = answer.doc["error"]
        assert "is not valid UTF-8 text" in error or "holds a NUL character" in error
        assert not all(storable(v) for v in (dedup, tenant, order))
        return
    assert all(storable(v) for v in (dedup, tenant, order))
    event_id = answer.doc["id"]
    stored = intake.row(
        "SELECT e.dedup_key, e.tenant, j.order_key FROM events e JOIN jobs j ON j.event_id = e.id"
        " WHERE e.id = ?",
        event_id,
    )
    assert stored is not None
    if answer.status == 202 and dedup is not None:
        assert stored[0] == f"{source}:{dedup}"
    if answer.status == 202:
        assert (stored[1], stored[2]) == (tenant or "", order)


async def test_raw_header_bytes_are_stored_and_read_back_as_received(
    make_intake: StartIntake,
) -> None:
    """A header with raw 0xff bytes that no rule uses is journaled; used as dedup it is a 400."""
    intake = await make_intake(HEADER_SOURCE + CATCH_ALL)
    answer = await intake.post(b"/hooks/h", b"{}", [(b"X-Note", b"caf\xe9\xff"), (b"X-Id", b"1")])
    assert answer.status == 202, answer
    event = (await intake.journal.get_event(answer.doc["id"])).event
    # aiohttp hands header bytes over as UTF-8 with surrogateescape: the bytes are recoverable.
    note = event.header("X-Note")
    assert note is not None and note.encode("utf-8", "surrogateescape") == b"caf\xe9\xff"
    refused = await intake.post(b"/hooks/h", b"{}", [(b"X-Id", b"a\xffb")])
    assert assert_json_error(refused, 400) == "dedup (header:X-Id) is not valid UTF-8 text"
    assert (await intake.post(b"/hooks/h", b"{}", [(b"X-Id", b"2")])).status == 202
    assert await intake.events() == 2


async def test_json_true_and_the_string_true_are_different_deliveries(
    make_intake: StartIntake,
) -> None:
    """Dedup keeps JSON types apart (true/"true", 1/"1"); tenant and priority read them as text."""
    intake = await make_intake(JSON_SOURCE)
    bodies = [
        b'{"id": true, "t": true, "p": 1}',
        b'{"id": "true"}',
        b'{"id": 1}',
        b'{"id": "1"}',
        b'{"id": "=1"}',
        b'{"id": 1.0}',
    ]
    answers = [await intake.post(b"/hooks/j", body) for body in bodies]
    assert [a.status for a in answers] == [202] * len(bodies), answers
    keys = [
        intake.row("SELECT dedup_key FROM events WHERE id = ?", a.doc["id"])[0] for a in answers
    ]
    assert keys == ["j:=true", "j:true", "j:=1", "j:1", 'j:="=1"', "j:=1.0"]
    first = (await intake.journal.get_event(answers[0].doc["id"])).event
    assert (first.tenant, first.priority) == ("true", Priority.HIGH)
    again = await intake.post(b"/hooks/j", b'{"id": true, "other": 2}')
    assert (again.status, again.doc) == (200, {"id": answers[0].doc["id"], "duplicate": True})


async def test_an_empty_string_is_no_value_for_a_dedup_tenant_or_order_rule(
    make_intake: StartIntake,
) -> None:
    """``"id": ""`` is read as no id, as an empty header or form field is: the body's hash is
    the key. Read as the key ``j:``, it made every later webhook with an empty id a duplicate
    of the first, and no job ran for them; an empty order key serialised unrelated events."""
    intake = await make_intake(JSON_SOURCE)
    bodies = [b'{"id": "", "t": "", "o": "", "n": 1}', b'{"id": "", "t": "", "o": "", "n": 2}']
    answers = [await intake.post(b"/hooks/j", body) for body in bodies]
    assert [(a.status, a.doc["duplicate"]) for a in answers] == [(202, False), (202, False)]
    for answer in answers:
        row = intake.row("SELECT dedup_key, tenant FROM events WHERE id = ?", answer.doc["id"])
        assert row[0] != "j:" and row[1] == ""
        [order_key] = intake.row("SELECT order_key FROM jobs WHERE event_id = ?", answer.doc["id"])
        assert order_key is None


async def test_a_form_rule_finds_no_value_in_a_json_body_and_falls_back_to_the_hash(
    make_intake: StartIntake,
) -> None:
    """``dedup = "form:id"`` on a body sent as JSON reads no field, as for a form without
    ``id``: the key is the body's hash. Split on "&", two different JSON events whose text
    holds ``&id=7&`` had the key ``f:7``, and the second was answered a duplicate and lost."""
    intake = await make_intake(FORM_SOURCE)
    bodies = [b'{"n": 1, "text": "a&id=7&t=x&o=y&"}', b'{"n": 2, "text": "b&id=7&t=x&o=y&"}']
    json_type = [(b"Content-Type", b"application/json")]
    answers = [await intake.post(b"/hooks/f", body, json_type) for body in bodies]
    assert [(a.status, a.doc["duplicate"]) for a in answers] == [(202, False), (202, False)]
    for body, answer in zip(bodies, answers, strict=True):
        row = intake.row("SELECT dedup_key, tenant FROM events WHERE id = ?", answer.doc["id"])
        assert tuple(row) == (f"f:{sha256_key(body)}", "")
        [order_key] = intake.row("SELECT order_key FROM jobs WHERE event_id = ?", answer.doc["id"])
        assert order_key is None


@pytest.mark.parametrize(
    "path",
    [
        b"/hooks/a%00b",
        b"/hooks/a;b",
        b"/hooks/%1b%5b31mred",
        b"/hooks/a%20b",
        b"/hooks/caf%C3%A9",
        b"/hooks/%ff",
        b"/hooks/.hidden",
        b"/hooks/" + b"n" * 65,
    ],
    ids=["nul", "semicolon", "escape-code", "space", "non-ascii", "bad-utf8", "dots", "too-long"],
)
async def test_catch_all_refuses_source_names_outside_the_safe_set(
    make_intake: StartIntake, path: bytes
) -> None:
    """A catch-all name with NUL, ';', escape codes or over 64 characters is a JSON 404."""
    intake = await make_intake(CATCH_ALL)
    assert_json_error(await intake.post(path, b"{}"), 404)
    ok = await intake.post(b"/hooks/Shop-1.eu_" + b"n" * 54, b"{}")
    assert ok.status == 202, ok
    assert await intake.events() == 1


# ---------------------------------------------------------------------------------------------
# Bodies in flight


async def stalled(address: str, length: int, sent: bytes = b"x") -> RawConn:
    """A request whose handler has started reading (100 Continue seen), stalled after ``sent``."""
    conn = await RawConn.open(address)
    await conn.head(
        b"/hooks/slow", [(b"Content-Length", b"%d" % length), (b"Expect", b"100-continue")]
    )
    go_on = await conn.answer()
    assert go_on.status == 100, go_on
    await conn.send(sent)
    return conn


async def test_expect_100_continue_is_answered_and_any_other_expectation_refused(
    make_intake: StartIntake,
) -> None:
    """`Expect: 100-continue` gets its 100, then the webhook its 202; an expectation the
    receiver cannot meet gets a JSON 417 and the connection closes, with nothing stored."""
    intake = await make_intake(CATCH_ALL)
    conn = await stalled(intake.address, 2, sent=b"{}")
    assert (await conn.answer()).status == 202
    await conn.close()
    odd = await RawConn.open(intake.address)
    await odd.head(b"/hooks/slow", [(b"Content-Length", b"2"), (b"Expect", b"200-ok")])
    assert_json_error(await odd.answer(), 417)
    assert await odd.closed_by_peer()
    await odd.close()
    assert await intake.events() == 1


async def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(
    make_intake: StartIntake,
) -> None:
    """Headers and one byte, then nothing: a JSON 408 within `body_timeout_s`, then closed."""
    intake = await make_intake(CATCH_ALL, server="body_timeout_s = 0.5")
    started = time.monotonic()
    conn = await RawConn.open(intake.address)
    await conn.head(b"/hooks/slow", [(b"Content-Length", b"1000")])
    await conn.send(b"{")
    answer = await conn.answer()
    assert_json_error(answer, 408)
    assert await conn.closed_by_peer()
    assert 0.5 <= time.monotonic() - started < 3.0
    await conn.close()
    # The same for a chunked body that stops mid-chunk.
    chunked = await RawConn.open(intake.address)
    await chunked.head(b"/hooks/slow", [(b"Transfer-Encoding", b"chunked")])
    await chunked.send(b"10\r\n{")
    assert_json_error(await chunked.answer(), 408)
    await chunked.close()
    assert (await intake.post(b"/hooks/fast", b"{}")).status == 202
    assert await intake.events() == 1


async def test_bodies_in_flight_over_the_cap_get_503_until_they_are_gone(
    make_intake: StartIntake,
) -> None:
    """Past `max_inflight_body_bytes` of bodies' bytes arrived, a body is refused 503 +
    Retry-After; later ones get in. A body counts by what has arrived, not by the length its
    head announces: heads announcing large bodies and sending a byte each hold a byte each."""
    intake = await make_intake(
        CATCH_ALL,
        server="max_body_bytes = 100_000\nmax_inflight_body_bytes = 500_000\n"
        "body_timeout_s = 3\nretry_after_s = 4",
    )

    async def counted(n: int) -> None:
        async def held() -> bool:
            return intake.receiver._inflight_bytes == n

        await poll(held, timeout_s=10)

    idle = [await stalled(intake.address, 100_000) for _ in range(20)]  # 4 times the cap
    await counted(20)
    body = json.dumps({"pad": "x" * 50_000}).encode()
    past_idle = await stalled(intake.address, len(body), body[:10])
    await past_idle.send(body[10:])
    assert (await past_idle.answer()).status == 202
    await past_idle.close()
    # Five bodies nearly whole: with the idle ones' bytes, the cap.
    holding = [*idle, *[await stalled(intake.address, 100_000, b"x" * 99_996) for _ in range(5)]]
    await counted(500_000)
    refused = []
    for _ in range(3):
        conn = await RawConn.open(intake.address)
        await conn.head(b"/hooks/big", [(b"Content-Length", b"100000")])
        refused.append(await conn.answer())
        await conn.close()
    for answer in refused:
        assert_json_error(answer, 503)
        assert answer.headers["retry-after"] == "4"
    # A chunked body is counted as it grows: its first bytes over the cap get the 503.
    chunked = await RawConn.open(intake.address)
    await chunked.head(b"/hooks/big", [(b"Transfer-Encoding", b"chunked")])
    await chunked.send(b"100\r\n" + b"x" * 0x100 + b"\r\n")
    assert_json_error(await chunked.answer(), 503)
    await chunked.close()
    # The stalled ones end with 408 at their deadline, and give their share back.
    for conn in holding:
        assert_json_error(await conn.answer(), 408)
        await conn.close()
    bodies = [json.dumps({"n": n, "pad": "x" * 99_000}).encode() for n in range(5)]
    conns = [await stalled(intake.address, len(body), body[:10]) for body in bodies]
    for conn, body in zip(conns, bodies, strict=True):
        await conn.send(body[10:])
    answers = [await conn.answer() for conn in conns]
    assert [a.status for a in answers] == [202] * 5, answers
    for conn in conns:
        await conn.close()
    assert await intake.events() == 6


# ---------------------------------------------------------------------------------------------
# Content-Encoding

PAYLOAD = json.dumps({"hello": "world", "pad": "x" * 2000}).encode()
GZIPPED = gzip.compress(PAYLOAD)


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        (b"gzip", b"this is not gzip", "body is not valid gzip"),
        (b"gzip", GZIPPED[: len(GZIPPED) // 2], "body is truncated gzip"),
        (b"gzip", GZIPPED[:-4], "body is truncated gzip"),
        (b"deflate", b"\x78\x9c not deflate", "body is not valid deflate"),
        (b"gzip", GZIPPED + b"garbage", "body is not valid gzip"),
        (b"bogus", PAYLOAD, "unsupported Content-Encoding 'bogus'"),
        (b"br", PAYLOAD, "unsupported Content-Encoding 'br'"),
        # Each layer or member is undone on the event loop, before any signature is checked.
        (
            b"gzip, gzip, gzip",
            gzip.compress(gzip.compress(GZIPPED)),
            "more than 2 Content-Encodings",
        ),
        (b"gzip", gzip.compress(b"") * 16 + GZIPPED, "body has more than 16 gzip members"),
    ],
    ids=[
        "not-gzip",
        "half-gzip",
        "no-trailer",
        "bad-deflate",
        "trailing",
        "unknown",
        "br",
        "three-layers",
        "17-members",
    ],
)
async def test_bad_content_encoding_is_a_json_400_without_a_traceback(
    make_intake: StartIntake,
    caplog: pytest.LogCaptureFixture,
    encoding: bytes,
    body: bytes,
    message: str,
) -> None:
    """Malformed, truncated or unknown Content-Encoding: JSON 400, nothing stored, no traceback."""
    intake = await make_intake(CATCH_ALL)
    caplog.set_level(logging.DEBUG)
    answer = await intake.post(b"/hooks/z", body, [(b"Content-Encoding", encoding)])
    assert assert_json_error(answer, 400) == message
    assert await intake.events() == 0
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "Traceback" not in caplog.text


async def test_a_transfer_coding_but_chunked_is_a_400_not_a_body_stored_still_coded(
    make_intake: StartIntake,
) -> None:
    """``Transfer-Encoding: gzip, chunked`` is framed by its chunks alone: taken, the gzip bytes
    would be the journaled body. It is refused; plain chunked (any case) is taken."""
    intake = await make_intake(CATCH_ALL)
    packed = gzip.compress(b'{"te": "gzip"}')
    for coding, status in ((b"gzip, chunked", 400), (b"Chunked", 202)):
        conn = await RawConn.open(intake.address)
        await conn.head(b"/hooks/z", [(b"Transfer-Encoding", coding)])
        await conn.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(packed), packed))
        answer = await conn.answer()
        await conn.close()
        if status == 400:
            error = assert_json_error(answer, 400)
            assert error == "unsupported Transfer-Encoding: only chunked is taken"
        else:
            assert answer.status == 202
    assert await intake.events() == 1


async def test_valid_encodings_are_stored_decoded_and_bombs_are_413(
    make_intake: StartIntake,
) -> None:
    """gzip (also two members), deflate and identity bodies are stored decoded; a bomb is 413."""
    intake = await make_intake(CATCH_ALL, server="max_body_bytes = 10_000")
    cases = [
        (b"gzip", GZIPPED, PAYLOAD),
        (b"x-gzip", gzip.compress(b"a") + gzip.compress(b"b"), b"ab"),
        (b"deflate", zlib.compress(PAYLOAD), PAYLOAD),
        (b"identity", PAYLOAD, PAYLOAD),
        (b"gzip, gzip", gzip.compress(GZIPPED), PAYLOAD),
    ]
    for n, (encoding, body, stored) in enumerate(cases):  # one source each: bodies repeat
        answer = await intake.post(b"/hooks/z%d" % n, body, [(b"Content-Encoding", encoding)])
        assert answer.status == 202, (encoding, answer)
        assert (await intake.journal.get_event(answer.doc["id"])).event.body == stored
    bomb = gzip.compress(b"\0" * 10_001)
    refused = await intake.post(b"/hooks/z", bomb, [(b"Content-Encoding", b"gzip")])
    assert_json_error(refused, 413)
    assert await intake.events() == len(cases)


async def test_a_content_encoding_in_several_header_lines_is_undone_whole(
    make_intake: StartIntake,
) -> None:
    """A list header's lines are one list (RFC 9110 §5.3): ``gzip`` on two lines is ``gzip,
    gzip``, and ``identity`` then ``gzip`` is ``gzip``. Only the first line was read: one
    layer was undone, or none, and the still compressed bytes were journaled as the body."""
    intake = await make_intake(CATCH_ALL)
    cases = [
        ([b"gzip", b"gzip"], gzip.compress(GZIPPED)),
        ([b"identity", b"gzip"], GZIPPED),
        ([b"gzip", b"identity"], GZIPPED),
    ]
    for n, (lines, body) in enumerate(cases):  # one source each: bodies repeat
        answer = await intake.post(
            b"/hooks/z%d" % n, body, [(b"Content-Encoding", c) for c in lines]
        )
        assert answer.status == 202, (lines, answer)
        assert (await intake.journal.get_event(answer.doc["id"])).event.body == PAYLOAD, lines
    thrice = [(b"Content-Encoding", b"gzip")] * 3
    refused = await intake.post(b"/hooks/z", gzip.compress(gzip.compress(GZIPPED)), thrice)
    assert assert_json_error(refused, 400) == "more than 2 Content-Encodings"
    assert await intake.events() == len(cases)


async def test_empty_list_elements_are_no_content_codings(make_intake: StartIntake) -> None:
    """RFC 9110 §5.6.1.2: empty list elements are ignored. They were counted toward the limit
    of two codings: ``gzip,,`` on a body gzipped once was a 400 "more than 2"."""
    intake = await make_intake(CATCH_ALL)
    cases = [(b"gzip,,", GZIPPED), (b", gzip, ,gzip ,", gzip.compress(GZIPPED))]
    for n, (encoding, body) in enumerate(cases):  # one source each: bodies repeat
        answer = await intake.post(b"/hooks/z%d" % n, body, [(b"Content-Encoding", encoding)])
        assert answer.status == 202, (encoding, answer)
        assert (await intake.journal.get_event(answer.doc["id"])).event.body == PAYLOAD
    three = [(b"Content-Encoding", b"gzip, ,gzip,, gzip")]
    refused = await intake.post(b"/hooks/z", gzip.compress(gzip.compress(GZIPPED)), three)
    assert assert_json_error(refused, 400) == "more than 2 Content-Encodings"
    assert await intake.events() == len(cases)


# ---------------------------------------------------------------------------------------------
# Unexpected errors


class BrokenClock(SystemClock):
    """The wall clock raises: stands in for any bug in the request path."""

    def time(self) -> float:
        raise RuntimeError("clock broke")


async def test_an_unexpected_error_is_a_json_503_with_one_log_record(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the handler answers 503 + Retry-After JSON and logs once, without the body."""
    intake = await make_intake(CATCH_ALL, clock=BrokenClock(), server="retry_after_s = 6")
    caplog.set_level(logging.INFO)
    answer = await intake.post(b"/hooks/z", b'{"card": "4111-SECRET"}')
    assert_json_error(answer, 503)
    assert answer.headers["retry-after"] == "6"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None, caplog.text
    assert "RuntimeError: clock broke" in caplog.text
    assert "4111-SECRET" not in caplog.text


async def test_a_flood_of_unexpected_errors_logs_a_few_tracebacks_a_minute(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    """A defect any request reaches cannot fill the log: ten tracebacks a minute, then a count."""
    intake = await make_intake(CATCH_ALL, clock=BrokenClock())
    caplog.set_level(logging.INFO)
    for _ in range(25):
        assert_json_error(await intake.post(b"/hooks/z", b"{}"), 503)
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 10, caplog.text
    intake.receiver.flush_logs()
    assert "suppressed=15 more unexpected errors in the last 60 s" in caplog.text


MALFORMED = {
    "header over 8 KB": b"POST /hooks/z HTTP/1.1\r\nX-Junk: " + b"j" * 9000 + b"\r\n\r\n",
    "bad method": b"PO(ST /hooks/z HTTP/1.1\r\nX-Junk: jjj\r\n\r\n",
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03jjj" + bytes(40),
    "bad Content-Length": b"POST /hooks/z HTTP/1.1\r\nContent-Length: jjj\r\n\r\n",
    "bad chunk size": b"POST /hooks/z HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\njjj\r\n",
}


async def assert_refused_quietly(
    address: str, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Malformed HTTP (``data``, from ``MALFORMED``) sent to ``address`` gets a JSON 400 that
    does not echo it, a closed connection, and one INFO line without its bytes, nothing louder."""
    caplog.set_level(logging.INFO)
    conn = await RawConn.open(address)
    await conn.send(data)
    assert "jjj" not in assert_json_error(await conn.answer(), 400)
    assert await conn.closed_by_peer()
    await conn.close()
    refusals = [r for r in caplog.records if r.name == "webhookd.http"]
    assert len(refusals) == 1 and refusals[0].levelno == logging.INFO, caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "jjj" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_http_is_a_json_400_logged_in_one_line_without_its_bytes(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """What aiohttp's parser refuses gets a JSON 400 and a closed connection, one INFO line
    without the request's bytes (aiohttp's own: a plain-text echo and an ERROR traceback),
    nothing stored, and the receiver goes on."""
    intake = await make_intake(CATCH_ALL)
    await assert_refused_quietly(intake.address, data, caplog)
    assert (await intake.post(b"/hooks/z", b"{}")).status == 202
    assert await intake.events() == 1


# Request targets the parser refuses, each carrying text of the sender's ("EVIL", escape
# codes) where the parser's message would quote it.
MALFORMED_TARGETS = {
    "control chars": b"POST /hooks/z\x01\x1b[31mEVIL HTTP/1.1\r\nHost: t\r\n\r\n",
    "NUL in query": b"POST /hooks/z?\x00EVIL HTTP/1.1\r\nHost: t\r\n\r\n",
    "no authority": b"POST http://[EVIL/x HTTP/1.1\r\nHost: t\r\n\r\n",
    "CONNECT": b"CONNECT \xe2\x80\xaeEVIL" + b"E" * 4000 + b":x HTTP/1.1\r\nHost: t\r\n\r\n",
    "asterisk": b"POST * HTTP/1.1\r\nHost: t\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED_TARGETS.values(), ids=MALFORMED_TARGETS.keys())
async def test_a_malformed_request_target_is_answered_and_logged_in_fixed_words(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """The parser's message for a bad target is the target itself (before any colon): the
    answer and the log line say "malformed request target" and quote none of it."""
    intake = await make_intake(CATCH_ALL)
    caplog.set_level(logging.INFO)
    conn = await RawConn.open(intake.address)
    await conn.send(data)
    assert assert_json_error(await conn.answer(), 400) == "malformed request target"
    await conn.close()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "webhookd.http"]
    assert line == "refused a malformed request from 127.0.0.1: 400 malformed request target"
    assert await intake.events() == 0


# Besides the targets: a request line, a method and headers the parser refuses, with "EVIL".
MALFORMED_HEADS = {
    **MALFORMED_TARGETS,
    "version": b"POST /hooks/z HTTP/9.9EVIL\r\nHost: t\r\n\r\n",
    "method": b"P\x01EVIL /hooks/z HTTP/1.1\r\nHost: t\r\n\r\n",
    "header value": b"POST /hooks/z HTTP/1.1\r\nHost: t\r\nX: EVIL\x00\r\n\r\n",
    "header name": b"POST /hooks/z HTTP/1.1\r\nHost: t\r\nX-EVIL\x01: 1\r\n\r\n",
    "Content-Length": b"POST /hooks/z HTTP/1.1\r\nHost: t\r\nContent-Length: 1EVIL\r\n\r\n",
}


@pytest.mark.parametrize(
    "parser", [HttpRequestParser, HttpRequestParserPy], ids=["C parser", "Python parser"]
)
@pytest.mark.parametrize("data", MALFORMED_HEADS.values(), ids=MALFORMED_HEADS.keys())
async def test_no_parser_refusal_is_answered_with_the_requests_bytes(
    parser: Any, data: bytes
) -> None:
    """Whichever parser aiohttp uses (its pure-Python one, without the C extension, puts a bad
    request line or method after its words with no colon), the reason quotes nothing sent."""
    loop = asyncio.get_running_loop()
    with pytest.raises(HttpProcessingError) as refused:
        parser(BaseProtocol(loop), loop, 2**16, max_line_size=8190).feed_data(data)
    code, reason = refusal(refused.value)
    assert code == 400 and reason
    assert "EVIL" not in reason and "*" not in reason and reason.isprintable(), reason


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ("body_timeout_s = nan", "server.body_timeout_s"),
        ("body_timeout_s = inf", "server.body_timeout_s"),
        ("body_timeout_s = 0", "server.body_timeout_s"),
        ("body_timeout_s = -1", "server.body_timeout_s"),
        ('body_timeout_s = "10"', "server.body_timeout_s"),
        ("max_inflight_body_bytes = 0", "server.max_inflight_body_bytes"),
        ("max_inflight_body_bytes = 1e9", "server.max_inflight_body_bytes"),
        ("max_inflight_body_bytes = 1000", "server.max_inflight_body_bytes"),
    ],
)
def test_body_limits_must_be_positive_finite_and_fit_one_body(
    tmp_path: Path, server: str, key: str
) -> None:
    """A bad body deadline or in-flight cap is a config error naming its dotted key."""
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, server=server)
    assert caught.value.key == key


def test_body_limits_default_to_ten_seconds_and_64_mib(tmp_path: Path) -> None:
    """Without the keys, a body has 10 s to arrive and bodies in flight may hold 64 MiB."""
    server = make_config(tmp_path).server
    assert (server.body_timeout_s, server.max_inflight_body_bytes) == (10.0, 64 * 1024 * 1024)


@pytest.mark.parametrize(
    "data",
    [
        b"POST /hooks/z HTTP/1.1\r\nX-Junk: " + b"j" * 9000 + b"\r\n\r\n",
        b"POST /hooks/" + b"j" * 9000 + b" HTTP/1.1\r\n\r\n",
    ],
    ids=["header", "URL"],
)
async def test_a_line_over_the_limit_is_refused_saying_so(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """The parser's own reason ends where it would quote the line ("Got more than 8190 bytes
    when reading"): the answer says which limit was passed instead, and quotes nothing."""
    intake = await make_intake(CATCH_ALL)
    caplog.set_level(logging.INFO)
    conn = await RawConn.open(intake.address)
    await conn.send(data)
    said = assert_json_error(await conn.answer(), 400)
    await conn.close()
    assert said == "a line of the request is longer than 8190 bytes"
    assert "jjj" not in caplog.text and "a line of the request is longer" in caplog.text


async def test_a_nul_in_a_key_is_a_400_naming_it(make_intake: StartIntake) -> None:
    """A NUL (``"\\u0000"`` in JSON) is no PostgreSQL text: there one webhook with it in its
    dedup key failed the group commit it shared, 503 for every other webhook in it. It is
    refused alone, on both journals alike, naming the field."""
    intake = await make_intake(JSON_SOURCE + CATCH_ALL)
    answer = await intake.post(b"/hooks/j", b'{"id": "evt-\\u0000-1", "t": "a", "o": "b"}')
    assert (answer.status, answer.doc) == (400, {"error": "dedup (json:id) holds a NUL character"})
    answer = await intake.post(b"/hooks/j?store=%00eu", b'{"id": "2", "t": "a", "o": "b"}')
    assert answer.status == 202, answer  # the query is kept as sent: %00 is three characters
    assert (await intake.journal.get_event(answer.doc["id"])).event.query == "store=%00eu"
    answer = await intake.post(b"/hooks/j", b'{"id": "3", "t": "a", "o": "b"}')
    assert answer.status == 202, answer


def charsets_made_up(seed: int) -> bytes:
    """A multipart body of 1,000 parts, ~340 KB, each naming a made-up charset in its name and
    its Content-Type; one of them is the field ``id``."""
    rnd = random.Random(seed)
    body = b""
    for n in range(1_000):
        made_up = "".join(rnd.choices(string.ascii_letters, k=200)).encode()
        name = b"id" if n == 500 else b"f%d" % n
        body += (
            b"--XyZ\r\nContent-Disposition: form-data; name*=%s''%s\r\n"
            b"Content-Type: text/plain; charset*=%s''x\r\n\r\nv%d\r\n"
            % (made_up, name, made_up, seed)
        )
    return body + b"--XyZ--\r\n"


async def test_no_charset_a_form_names_is_looked_up(make_intake: StartIntake) -> None:
    """Unsigned multipart posts to a Mailgun source (read for its signature fields) and to a
    source with ``form:`` rules, each part naming a charset no codec has: refused or taken as
    before, and the ``encodings`` module's cache (which keeps every name it was asked for, for
    the life of the process: +148 MB after 120 such posts of 1 MB) does not grow."""
    intake = await make_intake(MAILGUN_SOURCE + FORM_SOURCE)
    headers = [(b"Content-Type", b"multipart/form-data; boundary=XyZ")]
    assert (await intake.post(b"/hooks/f", charsets_made_up(0), headers)).status == 202
    before = dict(encodings._cache)  # type: ignore[attr-defined]
    for seed in (1, 2):
        body = charsets_made_up(seed)
        answer = await intake.post(b"/hooks/mg", body, headers)
        assert assert_json_error(answer, 401) == "missing signature"
        answer = await intake.post(b"/hooks/f", body, headers)
        assert answer.status == 202, answer
        assert (await intake.journal.get_event(answer.doc["id"])).event.dedup_key == f"f:v{seed}"
    assert encodings._cache == before  # type: ignore[attr-defined]


async def test_rfc_2231_parameters_numbered_and_not_are_no_error(make_intake: StartIntake) -> None:
    """A part parameter sent both whole and in numbered pieces (``name*=a; name*0=b``), which
    the email package's parameter decoding fails on with a TypeError: an unsigned post to a
    Mailgun source was answered 503 (and logged as an unexpected error); now the part's
    parameters are unreadable, as ones past their limits are, and the post is a 401."""
    intake = await make_intake(MAILGUN_SOURCE + FORM_SOURCE)
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name*=a; name*0=b\r\n\r\nv\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="id"\r\n'
        b"Content-Type: text/plain; charset*=utf-8''x; charset*1=y\r\n\r\nw\r\n--XyZ--\r\n"
    )
    headers = [(b"Content-Type", b"multipart/form-data; boundary=XyZ")]
    answer = await intake.post(b"/hooks/mg", body, headers)
    assert assert_json_error(answer, 401) == "missing signature"
    answer = await intake.post(b"/hooks/f", body, headers)
    assert answer.status == 202, answer
    assert (await intake.journal.get_event(answer.doc["id"])).event.dedup_key == "f:w"
    numbered = [(b"Content-Type", b"multipart/form-data; boundary*=XyZ; boundary*0=XyZ")]
    answer = await intake.post(b"/hooks/mg", body, numbered)
    assert assert_json_error(answer, 401) == "missing signature"


async def least_cpu_refused(send: Callable[[], Awaitable[RawAnswer]], times: int = 2) -> float:
    """The least CPU time of ``times`` posts made by ``send`` (the receiver and its client share
    the process and its loop), each refused with 401: its cost less a busy machine's noise."""
    spent = []
    for _ in range(times):
        started = time.process_time()
        answer = await send()
        spent.append(time.process_time() - started)
        assert assert_json_error(answer, 401) == "missing signature"
    return min(spent)


MAILGUN_FOR_ATTACHMENTS = """
[sources.mg]
verify = { scheme = "mailgun", secret = "mailgun-signing-key-0123456789" }
max_body_bytes = 26_214_400
[[sources.mg.actions]]
type = "log"
"""


async def test_an_unsigned_gzip_form_of_25_mib_costs_a_mailgun_source_what_plain_letters_do(
    make_intake: StartIntake,
) -> None:
    """A Mailgun source taking 25 MiB, as the example's does (attachments): 25 KB of gzip on
    the wire inflate to 25 MiB of ``%41=``, whose escapes were all undone before the missing
    signature was noticed, ~1 s of the event loop with every other webhook waiting. Its 401
    now costs what 25 MiB of plain letters' does (~0.15 s: inflating and splitting it)."""
    intake = await make_intake(MAILGUN_FOR_ATTACHMENTS)
    headers = [
        (b"Content-Type", b"application/x-www-form-urlencoded"),
        (b"Content-Encoding", b"gzip"),
    ]
    size = 26_214_400
    forged = gzip.compress(b"a=" + b"%41=" * ((size - 2) // 4))
    plain = gzip.compress(b"a=" + b"A" * (size - 2))
    assert len(forged) < 30_000
    spent = await least_cpu_refused(lambda: intake.post(b"/hooks/mg", forged, headers))
    usual = await least_cpu_refused(lambda: intake.post(b"/hooks/mg", plain, headers))
    assert spent < 2 * usual, f"{spent:.3f} s of CPU, where plain letters take {usual:.3f} s"


async def test_an_unsigned_form_of_names_in_pieces_costs_a_mailgun_source_little(
    make_intake: StartIntake,
) -> None:
    """1,000 parts (963 KB, 4.9 KB gzipped, under the default body limit), each part's name
    sent as 32 RFC 2231 pieces the email package decodes one by one in Python: the missing
    signature was noticed after ~0.4 s of the event loop, ten times what a provider's form of
    as many parts takes. A body's parameters are parsed for 4,096 pieces in all: its 401 costs
    about what the provider's form's does (1-1.6 times measured; the bound is three)."""
    intake = await make_intake(MAILGUN_SOURCE)
    pieces = b"".join(b"; name*%d*=%s" % (n, b"''" * (n == 0) + b"%41" * 6) for n in range(32))
    part = b"--XyZ\r\nContent-Disposition: form-data" + pieces + b"\r\n\r\nx\r\n"
    forged = gzip.compress(part * 999 + b"--XyZ--\r\n")
    provider = gzip.compress(part.replace(pieces, b'; name="subject"') * 999 + b"--XyZ--\r\n")
    assert len(forged) < 5_000
    headers = [
        (b"Content-Type", b"multipart/form-data; boundary=XyZ"),
        (b"Content-Encoding", b"gzip"),
    ]
    spent = await least_cpu_refused(lambda: intake.post(b"/hooks/mg", forged, headers))
    usual = await least_cpu_refused(lambda: intake.post(b"/hooks/mg", provider, headers))
    assert spent < 3 * usual, f"{spent:.3f} s of CPU, where a provider's form takes {usual:.3f} s"
