"""The receiver: ack only after commit, dedup, 404/405/413/429/503 answers, raw bodies kept.

Each test serves the real receiver application on a loopback port over a real journal file;
no worker pool runs, so what a request leaves in the journal stays there to be inspected.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import json
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import make_config, serving
from procs import poll

from webhookd.clock import SYSTEM_CLOCK, Clock, ManualClock
from webhookd.http1 import Answer as Answered
from webhookd.http1 import Request
from webhookd.journal import MIGRATIONS, Journal
from webhookd.journal.schema import add_functions, key_digest
from webhookd.models import Priority
from webhookd.receiver import Receiver
from webhookd.state import IntakeState

CATCH_ALL_LOG = """
[sources."*"]
[[sources."*".actions]]
type = "log"
"""


@dataclass(frozen=True)
class Answer:
    status: int
    doc: Any
    headers: Any


@dataclass
class Intake:
    """A running receiver over a real journal, and a client to post to it."""

    url: str
    db: Path
    journal: Journal
    state: IntakeState
    http: aiohttp.ClientSession

    async def send(self, method: str, path: str, body: Any = b"{}", **kw: Any) -> Answer:
        async with self.http.request(method, self.url + path, data=body, **kw) as r:
            text = await r.text()
            return Answer(r.status, json.loads(text), r.headers)

    async def post(self, path: str, body: Any = b"{}", **kw: Any) -> Answer:
        return await self.send("POST", path, body, **kw)

    async def events(self) -> int:
        return (await self.journal.counts()).events


StartIntake = Callable[..., Awaitable[Intake]]


@pytest.fixture
async def make_intake(tmp_path: Path) -> AsyncIterator[StartIntake]:
    """Start a receiver for a config built from TOML snippets (see ``make_config``)."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def start(
            extra: str = CATCH_ALL_LOG,
            *,
            server: str = "",
            clock: Clock = SYSTEM_CLOCK,
            answered: Callable[[Answered], Awaitable[None]] | None = None,
        ) -> Intake:
            cfg = make_config(tmp_path, extra, server=server)
            journal = await stack.enter_async_context(Journal(cfg.journal.path, clock=clock))
            state = IntakeState()
            receiver = Receiver(cfg, journal, state, clock=clock)
            if answered is not None:
                watch = answered

                class Watched(Receiver):
                    async def handle(self, request: Request) -> Answered:
                        response = await super().handle(request)
                        await watch(response)  # before the server sends a byte of it
                        return response

                receiver = Watched(cfg, journal, state, clock=clock)
            address = await stack.enter_async_context(serving(receiver))
            return Intake(f"http://{address}", cfg.journal.path, journal, state, http)

        yield start


def assert_error(answer: Answer, status: int, *, retry_after: bool = False) -> None:
    """A refusal: the right status, a JSON ``{"error": ...}`` body, Retry-After when asked.
    Its Content-Type is the acknowledgement's: ``application/json`` has no charset parameter
    (JSON is UTF-8, RFC 8259)."""
    assert answer.status == status, answer
    assert answer.headers["Content-Type"] == "application/json"
    assert isinstance(answer.doc, dict) and isinstance(answer.doc.get("error"), str), answer.doc
    if retry_after:
        assert int(answer.headers["Retry-After"]) >= 1
    else:
        assert "Retry-After" not in answer.headers


def committed_ids(db: Path) -> set[str]:
    """Event ids visible to a separate connection, as another process would see them."""
    with closing(sqlite3.connect(db)) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM events")}


async def test_accepted_webhook_is_on_disk_before_the_answer_is_sent(
    make_intake: StartIntake,
) -> None:
    """202 `{"id", "duplicate": false}` is only made once the event is committed."""
    seen_at_answer: dict[str, bool] = {}

    async def answered(response: Answered) -> None:
        assert isinstance(response.body, bytes)
        doc = json.loads(response.body)
        if "id" in doc:
            seen_at_answer[doc["id"]] = doc["id"] in committed_ids(intake.db)

    intake = await make_intake(answered=answered)
    answer = await intake.post("/hooks/demo", b'{"a": 1}')
    assert answer.status == 202
    assert set(answer.doc) == {"id", "duplicate"} and answer.doc["duplicate"] is False
    assert answer.doc["id"].startswith("evt_")
    assert seen_at_answer == {answer.doc["id"]: True}
    detail = await intake.journal.get_event(answer.doc["id"])
    assert (detail.event.source, detail.state) == ("demo", "queued")
    assert [j.action for j in detail.jobs] == ["log"]


async def test_same_body_twice_is_a_duplicate_keyed_on_its_sha256(make_intake: StartIntake) -> None:
    """By default the dedup key is the body's sha256: a repeat gets 200 and the original id."""
    intake = await make_intake()
    body = b'{"order": 7}'
    first = await intake.post("/hooks/shop", body)
    again = await intake.post("/hooks/shop", body)
    assert first.status == 202
    assert (again.status, again.doc) == (200, {"id": first.doc["id"], "duplicate": True})
    detail = await intake.journal.get_event(first.doc["id"])
    assert detail.event.dedup_key == "shop:sha256:" + hashlib.sha256(body).hexdigest()
    # Another source with the same body is a different delivery.
    other = await intake.post("/hooks/mail", body)
    assert (other.status, other.doc["duplicate"]) == (202, False)
    counts = await intake.journal.counts()
    assert (counts.events, counts.jobs_by_state["queued"]) == (2, 2)


async def test_configured_dedup_header_decides_what_is_a_duplicate(
    make_intake: StartIntake,
) -> None:
    """With `dedup = "header:X-Id"`, the header, not the body, identifies a delivery."""
    intake = await make_intake(
        """
[sources.orders]
dedup = "header:X-Id"
[[sources.orders.actions]]
type = "log"
"""
    )
    first = await intake.post("/hooks/orders", b'{"v": 1}', headers={"X-Id": "d-1"})
    changed_body = await intake.post("/hooks/orders", b'{"v": 2}', headers={"X-Id": "d-1"})
    same_body = await intake.post("/hooks/orders", b'{"v": 1}', headers={"X-Id": "d-2"})
    assert first.status == 202
    assert (changed_body.status, changed_body.doc) == (
        200,
        {"id": first.doc["id"], "duplicate": True},
    )
    assert (same_body.status, same_body.doc["duplicate"]) == (202, False)
    detail = await intake.journal.get_event(first.doc["id"])
    assert detail.event.dedup_key == "orders:d-1"
    # Without the header, the key falls back to the body's hash.
    bare = await intake.post("/hooks/orders", b'{"v": 3}')
    detail = await intake.journal.get_event(bare.doc["id"])
    assert detail.event.dedup_key == "orders:sha256:" + hashlib.sha256(b'{"v": 3}').hexdigest()


async def test_a_value_read_from_a_credential_header_is_kept_as_its_digest(
    make_intake: StartIntake,
) -> None:
    """A dedup key, tenant or order key read from a credential header (Authorization,
    X-Api-Key…) is kept as its SHA-256, as the header itself is stored masked: equal values
    still match (a duplicate, one tenant, one order key), and the credential is nowhere in the
    journal's files."""
    intake = await make_intake(
        """
[sources.api]
dedup = "header:Authorization"
tenant = "header:X-Api-Key"
[[sources.api.actions]]
type = "log"
ordered_by = "header:X-Api-Key"
"""
    )
    sent = {"Authorization": "Bearer tok-delivery-1", "X-Api-Key": "key-of-client-a"}
    first = await intake.post("/hooks/api", b'{"v": 1}', headers=sent)
    again = await intake.post("/hooks/api", b'{"v": 2}', headers=sent)
    assert first.status == 202 and (again.status, again.doc["duplicate"]) == (200, True)
    detail = await intake.journal.get_event(first.doc["id"])

    def digest(text: str) -> str:
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()

    assert detail.event.dedup_key == "api:" + digest("Bearer tok-delivery-1")
    assert detail.event.tenant == digest("key-of-client-a")
    assert dict(detail.event.headers)["Authorization"] == "***"
    [ready] = await intake.journal.ready(2e9, 5)
    assert ready.order_key == digest("key-of-client-a")
    on_disk = b"".join(p.read_bytes() for p in intake.db.parent.glob(intake.db.name + "*"))
    assert b"tok-delivery-1" not in on_disk and b"key-of-client-a" not in on_disk


async def test_one_body_from_two_tenants_is_two_deliveries(make_intake: StartIntake) -> None:
    """With no delivery id, a body's hash is the dedup key, and it is its tenant's: two
    tenants posting the same body are two events (the second was answered as the first's
    duplicate, with the other tenant's event id). The same tenant posting it again is one.
    A priority rule names tenants as sent, though one read from a credential header is kept
    as its digest."""
    intake = await make_intake(
        """
[sources.multi]
tenant = "header:X-Api-Key"
priority = { default = "normal", high = ["key-vip"] }
[[sources.multi.actions]]
type = "log"
"""
    )
    body = b'{"x": 1}'
    alice = await intake.post("/hooks/multi", body, headers={"X-Api-Key": "key-alice"})
    bob = await intake.post("/hooks/multi", body, headers={"X-Api-Key": "key-vip"})
    again = await intake.post("/hooks/multi", body, headers={"X-Api-Key": "key-alice"})
    assert (alice.status, bob.status) == (202, 202)
    assert bob.doc["id"] != alice.doc["id"]
    assert (again.status, again.doc["id"]) == (200, alice.doc["id"])
    vip = (await intake.journal.get_event(bob.doc["id"])).event
    tenant = "sha256:" + hashlib.sha256(b"key-vip").hexdigest()
    assert vip.tenant == tenant and vip.priority == Priority.HIGH
    assert vip.dedup_key == f"multi:{tenant}:sha256:" + hashlib.sha256(body).hexdigest()


async def test_a_query_is_kept_as_sent_and_tells_deliveries_of_one_body_apart(
    make_intake: StartIntake,
) -> None:
    """Where the body's hash is the dedup key, a webhook's URL query is hashed with it: one
    body under ``?event=created`` and ``?event=deleted`` is two events, each keeping its query
    as sent (still percent-encoded), and the same query again is a duplicate. Without a query
    (a bare ``?`` too) the key is the body's hash alone, as it always was."""
    intake = await make_intake()
    body = b'{"order": 7}'
    created = await intake.post("/hooks/plain?event=created&note=a%20b+c", body)
    deleted = await intake.post("/hooks/plain?event=deleted", body)
    again = await intake.post("/hooks/plain?event=created&note=a%20b+c", body)
    bare = await intake.post("/hooks/plain", body)
    empty = await intake.post("/hooks/plain?", body)
    assert (created.status, deleted.status, bare.status) == (202, 202, 202)
    assert len({created.doc["id"], deleted.doc["id"], bare.doc["id"]}) == 3
    assert (again.status, again.doc) == (200, {"id": created.doc["id"], "duplicate": True})
    assert (empty.status, empty.doc) == (200, {"id": bare.doc["id"], "duplicate": True})
    first = (await intake.journal.get_event(created.doc["id"])).event
    assert first.query == "event=created&note=a%20b+c"
    hashed = hashlib.sha256(b"event=created&note=a%20b+c\n" + body).hexdigest()
    assert first.dedup_key == "plain:query+body:sha256:" + hashed
    plain = (await intake.journal.get_event(bare.doc["id"])).event
    assert plain.query == ""
    assert plain.dedup_key == "plain:sha256:" + hashlib.sha256(body).hexdigest()


async def test_a_delivery_journaled_before_the_upgrade_is_still_a_duplicate_after_it(
    tmp_path: Path, make_intake: StartIntake
) -> None:
    """A journal of the version before the query was kept, holding a webhook as that
    webhookd journaled it (its key the body's hash): once upgraded in place, the provider's
    retry of it, with no query, is answered as its duplicate, and the old event reads as
    having none."""
    body = b'{"order": 8}'
    old_key = "plain:sha256:" + hashlib.sha256(body).hexdigest()
    path = tmp_path / "webhookd.db"  # make_config's journal
    with closing(sqlite3.connect(path)) as conn:
        add_functions(conn)
        for migration in MIGRATIONS[:11]:  # up to the version before ``events.query``
            conn.executescript(migration)
        conn.execute("PRAGMA user_version = 11")
        conn.execute(
            "INSERT INTO events (id, source, received_at, dedup_key, tenant, priority, headers,"
            " body) VALUES ('evt_old', 'plain', ?, ?, '', 1, '[]', ?)",
            (time.time(), old_key, body),
        )
        conn.execute(
            "INSERT INTO dedup (digest, event_id, created_at) VALUES (?, 'evt_old', ?)",
            (key_digest(old_key), time.time()),
        )
        conn.commit()
    async with Journal(path, serving=True):  # the daemon's start upgrades it
        pass
    intake = await make_intake()
    retry = await intake.post("/hooks/plain", body)
    assert (retry.status, retry.doc) == (200, {"id": "evt_old", "duplicate": True})
    assert (await intake.journal.get_event("evt_old")).event.query == ""


async def test_a_signed_body_under_a_fresh_query_is_its_first_events_duplicate(
    make_intake: StartIntake,
) -> None:
    """A signature that covers the body and no timestamp (Meta's) keeps the signed body as a
    dedup key: the query is not signed, so a captured request re-sent under another query is
    the first event's duplicate, as it is under a fresh delivery id."""
    secret = "a-meta-app-secret-for-the-test"
    intake = await make_intake(
        f"""
[sources.meta]
verify = {{ scheme = "meta", secret = "{secret}" }}
[[sources.meta.actions]]
type = "log"
"""
    )
    body = b'{"object": "page", "entry": []}'
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    signed = {"X-Hub-Signature-256": f"sha256={mac}", "Content-Type": "application/json"}
    first = await intake.post("/hooks/meta?page=1", body, headers=signed)
    replayed = await intake.post("/hooks/meta?page=2", body, headers=signed)
    assert first.status == 202
    assert (replayed.status, replayed.doc) == (200, {"id": first.doc["id"], "duplicate": True})
    assert (await intake.journal.get_event(first.doc["id"])).event.query == "page=1"


async def test_a_form_of_too_many_fields_is_refused_when_a_rule_reads_it(
    make_intake: StartIntake,
) -> None:
    """A ``form:`` rule reads at most ``forms.MOST_FIELDS`` fields: a body of more is a 400
    naming the limit, nothing stored, instead of holding the event loop while it is split."""
    intake = await make_intake('[sources.mail]\ndedup = "form:id"\n')
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    tiny = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'
    for body, headers in (
        (b"id=1" + b"&x=" * 100_000, {"Content-Type": "application/x-www-form-urlencoded"}),
        (tiny * 15_000 + b"--b--\r\n", multipart),
    ):
        answer = await intake.post("/hooks/mail", body, headers=headers)
        assert (answer.status, answer.doc) == (
            400,
            {"error": "the form has more than 1,000 fields"},
        )
    ok = await intake.post("/hooks/mail", b"id=1" + b"&x=" * 999, headers=headers)
    assert ok.status == 202 and await intake.events() == 1


async def test_form_extractors_read_a_multipart_form_as_well(make_intake: StartIntake) -> None:
    """``form:`` reads a multipart post's fields (a mail route's, with an attachment) as it
    reads an urlencoded one's: tenant, priority and dedup alike; an uploaded file is no field."""
    intake = await make_intake(
        """
[sources.mail]
tenant = "form:recipient"
dedup = "form:Message-Id"
priority = { default = "normal", by = "form:attachment-1", high = ["x.pdf"] }
"""
    )

    def field(name: str, value: bytes, filename: str = "") -> bytes:
        named = f'name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return b"--XyZ\r\nContent-Disposition: form-data; %s\r\n\r\n%s\r\n" % (
            named.encode(),
            value,
        )

    body = (
        field("recipient", b"support@example.com")
        + field("Message-Id", b"<m-1@example.com>")
        + field("attachment-1", b"%PDF-1.4 x.pdf", filename="x.pdf")
        + b"--XyZ--\r\n"
    )
    multipart = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    first = await intake.post("/hooks/mail", body, headers=multipart)
    again = await intake.post("/hooks/mail", body.replace(b"x.pdf", b"y.pdf"), headers=multipart)
    assert first.status == 202
    assert (again.status, again.doc["id"]) == (200, first.doc["id"])  # same Message-Id
    event = (await intake.journal.get_event(first.doc["id"])).event
    assert event.tenant == "support@example.com"
    assert event.dedup_key == "mail:<m-1@example.com>"
    assert event.priority == Priority.NORMAL  # the file's content is not a field's value


async def test_unknown_source_is_404_without_a_catch_all(make_intake: StartIntake) -> None:
    """Without a catch-all, only configured paths exist; anything else is a JSON 404."""
    intake = await make_intake(
        """
[sources.known]
[[sources.known.actions]]
type = "log"
"""
    )
    assert_error(await intake.post("/hooks/unknown"), 404)
    assert_error(await intake.post("/elsewhere"), 404)
    assert (await intake.post("/hooks/known")).status == 202
    assert await intake.events() == 1


@pytest.mark.parametrize("catch_all", [CATCH_ALL_LOG, ""], ids=["catch-all", "no catch-all"])
async def test_a_source_name_in_another_case_is_404_naming_the_configured_one(
    make_intake: StartIntake, catch_all: str
) -> None:
    """/hooks/GitHub beside a source "github" (or /hooks/WEBHOOKD, the alerts' reserved name) is
    not taken by the catch-all as a source of its own: a 404 saying names are case-sensitive.
    A source at a path of its own is not named: /hooks/shop is a plain 404."""
    intake = await make_intake(
        catch_all
        + """
[sources.github]
[[sources.github.actions]]
type = "log"
[sources.Shop]
path = "/shop"
[[sources.Shop.actions]]
type = "log"
"""
    )
    for path, said in [
        ("/hooks/GitHub", '(configured: "github")'),
        ("/hooks/GITHUB", '(configured: "github")'),
        ("/hooks/WebHookD", '("webhookd" is reserved)'),
    ]:
        answer = await intake.post(path)
        assert_error(answer, 404)
        assert answer.doc["error"] == "no such source: source names are case-sensitive " + said
    for path in ("/hooks/shop", "/hooks/Shop", "/hooks/SHOP"):
        answer = await intake.post(path)
        assert_error(answer, 404)
        assert answer.doc["error"] == "no such source"
    assert (await intake.post("/hooks/github")).status == 202
    if catch_all:
        assert (await intake.post("/hooks/gitlab")).status == 202
    assert await intake.events() == (2 if catch_all else 1)
    sources = {e.source for e in await intake.journal.list_events(limit=10)}
    assert sources == ({"github", "gitlab"} if catch_all else {"github"})


async def test_body_over_the_limit_is_413_with_or_without_content_length(
    make_intake: StartIntake,
) -> None:
    """`server.max_body_bytes` is enforced from Content-Length and on a chunked body alike."""
    intake = await make_intake(server="max_body_bytes = 100")

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 60

    assert_error(await intake.post("/hooks/big", b"x" * 101), 413)
    assert_error(await intake.post("/hooks/big", chunks()), 413)
    assert (await intake.post("/hooks/big", b"x" * 100)).status == 202
    assert await intake.events() == 1


async def test_a_sources_own_max_body_bytes_replaces_the_servers_for_it_alone(
    make_intake: StartIntake,
) -> None:
    """A source's ``max_body_bytes`` (mail with attachments, say) holds for its bodies as
    sent, chunked and inflated; every other source keeps the server's."""
    intake = await make_intake(
        "[sources.mail]\nmax_body_bytes = 300\n[sources.small]\n", server="max_body_bytes = 100"
    )

    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"x" * 60

    assert (await intake.post("/hooks/mail", b"x" * 300)).status == 202
    assert (await intake.post("/hooks/mail", chunks(4))).status == 202
    too_large = await intake.post("/hooks/mail", b"x" * 301)
    assert_error(too_large, 413)
    assert too_large.doc == {"error": "body larger than 300 bytes"}
    assert_error(await intake.post("/hooks/mail", chunks(6)), 413)
    inflated = gzip.compress(b"y" * 301)
    gzipped = {"Content-Encoding": "gzip"}
    assert_error(await intake.post("/hooks/mail", inflated, headers=gzipped), 413)
    small = await intake.post("/hooks/small", b"x" * 101)
    assert small.doc == {"error": "body larger than 100 bytes"}
    assert await intake.events() == 2


async def test_a_sender_outside_allow_from_is_403_and_nothing_is_stored(
    make_intake: StartIntake,
) -> None:
    """``allow_from`` takes webhooks from the addresses and networks it lists only (the test's
    client is 127.0.0.1), answered before the body is read; other sources take any sender."""
    intake = await make_intake(
        '[sources.shop]\nallow_from = ["10.0.0.0/8", "::1"]\n'
        '[sources.office]\nallow_from = ["192.0.2.1", "127.0.0.0/8"]\n[sources.open]\n'
    )
    refused = await intake.post("/hooks/shop", b'{"n": 1}')
    assert_error(refused, 403)
    assert refused.doc == {"error": "sender not allowed (the source's allow_from)"}
    assert (await intake.post("/hooks/office", b'{"n": 2}')).status == 202
    assert (await intake.post("/hooks/open", b'{"n": 3}')).status == 202
    assert await intake.events() == 2


async def test_behind_a_trusted_proxy_allow_from_judges_the_client_it_forwards_for(
    make_intake: StartIntake,
) -> None:
    """The client a trusted proxy's ``X-Forwarded-For`` names (the last address that is not a
    proxy's) is judged, not the proxy; what cannot be an address is refused."""
    intake = await make_intake(
        '[sources.shop]\nallow_from = ["203.0.113.0/24"]\n',
        server='trusted_proxies = ["127.0.0.1"]',
    )

    async def status(forwarded: str | None, n: int) -> int:
        headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
        return (await intake.post("/hooks/shop", json.dumps({"n": n}), headers=headers)).status

    assert await status("203.0.113.9", 1) == 202
    assert await status("198.51.100.7, 203.0.113.9", 2) == 202  # the client wrote the first
    assert await status("203.0.113.9, 198.51.100.7", 3) == 403  # the proxy got it from .7
    assert await status("not-an-address", 4) == 403
    assert await status(None, 5) == 403  # the proxy itself
    assert await intake.events() == 2


async def test_get_on_a_hook_path_is_405(make_intake: StartIntake) -> None:
    """Webhooks are POSTed: GET (no handshake scheme) and DELETE are refused with JSON 405."""
    intake = await make_intake()
    assert_error(await intake.send("GET", "/hooks/demo", None), 405)
    assert_error(await intake.send("DELETE", "/hooks/demo", None), 405)
    assert await intake.events() == 0


async def test_draining_answers_503_with_retry_after(make_intake: StartIntake) -> None:
    """While the daemon drains, a webhook is refused with 503 so the provider retries later."""
    intake = await make_intake(server="retry_after_s = 9")
    intake.state.draining = True
    answer = await intake.post("/hooks/demo")
    assert_error(answer, 503, retry_after=True)
    assert answer.headers["Retry-After"] == "9"
    assert await intake.events() == 0
    assert intake.state.unavailable == {"shutting_down": 1}


async def test_backlog_over_max_backlog_answers_503(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    """Past `server.max_backlog` unfinished jobs, intake answers 503, stores nothing, and
    says so in a warning (throttled): shedding load is news. A duplicate is answered 200."""
    intake = await make_intake(CATCH_ALL_LOG + "[sources.audit]\n", server="max_backlog = 2")
    first = [await intake.post("/hooks/demo", f'{{"n": {n}}}') for n in range(2)]
    assert [a.status for a in first] == [202, 202]
    assert_error(await intake.post("/hooks/demo", b'{"n": 2}'), 503, retry_after=True)
    assert await intake.events() == 2
    assert intake.state.unavailable == {"backlog_full": 1}
    # A delivery already journaled is still told it is a duplicate: its retry adds nothing,
    # however many copies come at once (past the lookups at a time, they wait their turn).
    again = await asyncio.gather(*(intake.post("/hooks/demo", b'{"n": 1}') for _ in range(40)))
    assert {(a.status, a.doc["id"], a.doc["duplicate"]) for a in again} == {
        (200, first[1].doc["id"], True)
    }
    assert intake.state.unavailable == {"backlog_full": 1}
    # A source without actions adds no job to the backlog: it is not refused for it.
    assert (await intake.post("/hooks/audit", b'{"n": 3}')).status == 202
    assert await intake.events() == 3
    [said] = [r for r in caplog.records if "backlog full" in r.getMessage()]
    assert said.levelname == "WARNING" and said.getMessage() == (
        "refused webhook status=503 source=demo reason='backlog full' backlog=2 max_backlog=2"
    )


async def test_commit_missing_ack_timeout_answers_503_then_intake_recovers(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal locked past `ack_timeout_s` gets 503; once free, intake works by itself and
    the late commit makes the provider's retry a duplicate rather than a second event. The
    log says when commits answer in time again, once: a stall's lines stop with it."""
    caplog.set_level(logging.WARNING, logger="webhookd.receiver")
    intake = await make_intake(server="ack_timeout_s = 0.3\nretry_after_s = 7")
    body = b'{"slow": true}'
    with closing(sqlite3.connect(intake.db, isolation_level=None, timeout=0)) as blocker:
        blocker.execute("BEGIN IMMEDIATE")  # the journal's busy timeout now makes commits wait
        try:
            answer = await intake.post("/hooks/demo", body)
        finally:
            blocker.execute("ROLLBACK")
    assert_error(answer, 503, retry_after=True)
    assert answer.headers["Retry-After"] == "7"
    assert intake.state.unavailable == {"commit_timeout": 1}

    async def late_commit_landed() -> bool:  # SQLite's busy handler sleeps between its tries
        return len(committed_ids(intake.db)) == 1

    await poll(late_commit_landed, timeout_s=10)
    retried = await intake.post("/hooks/demo", body)
    assert (retried.status, retried.doc["duplicate"]) == (200, True)
    fresh = await intake.post("/hooks/demo", b'{"after": true}')
    assert (fresh.status, fresh.doc["duplicate"]) == (202, False)
    assert committed_ids(intake.db) == {retried.doc["id"], fresh.doc["id"]}
    said = [r.getMessage() for r in caplog.records if "journal commit" in r.getMessage()]
    assert said == [
        "journal commit slower than 0.3s: answering 503",
        "journal commits answer within 0.3s again",
    ]


async def test_webhooks_waiting_for_their_commit_are_counted_and_a_crowd_marks_intake_busy(
    make_intake: StartIntake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``IntakeState.waiting`` counts the webhooks read and waiting for their commit; when
    BUSY_WAITING wait at once, ``busy_at`` says when, as they are answered (the workers then
    hold new jobs back). The count comes back down once they are answered. A crowd of
    duplicates leaves no job behind and holds nothing: a sender looping on one delivery held
    every source's jobs for up to 13 s."""
    monkeypatch.setattr("webhookd.receiver.handler.BUSY_WAITING", 2)
    clock = ManualClock()
    intake = await make_intake(server="ack_timeout_s = 30", clock=clock)
    state = intake.state
    submitted: asyncio.Queue[int] = asyncio.Queue()  # the count as each webhook goes to commit
    real_submit = intake.journal.submit_ingest

    def submit(item: Any) -> Any:
        submitted.put_nowait(state.waiting)
        return real_submit(item)

    monkeypatch.setattr(intake.journal, "submit_ingest", submit)
    with closing(sqlite3.connect(intake.db, isolation_level=None, timeout=0)) as blocker:
        blocker.execute("BEGIN IMMEDIATE")  # commits wait behind this until it ends
        try:
            first = asyncio.create_task(intake.post("/hooks/demo", b'{"n": 1}'))
            assert await submitted.get() == 1
            clock.advance(1.0)
            second = asyncio.create_task(intake.post("/hooks/demo", b'{"n": 2}'))
            assert await submitted.get() == 2
            assert state.busy_at == -math.inf  # not until answered
        finally:
            blocker.execute("ROLLBACK")
    assert [(await first).status, (await second).status] == [202, 202]
    assert state.busy_at == clock.monotonic()  # the second was one of a crowd
    assert state.waiting == 0
    state.busy_at = -math.inf
    clock.advance(1.0)
    with closing(sqlite3.connect(intake.db, isolation_level=None, timeout=0)) as blocker:
        blocker.execute("BEGIN IMMEDIATE")
        try:
            again = [asyncio.create_task(intake.post("/hooks/demo", b'{"n": 1}')) for _ in range(3)]
            assert [await submitted.get() for _ in again] == [1, 2, 3]
        finally:
            blocker.execute("ROLLBACK")
    assert {(await a).status for a in again} == {200}
    assert state.busy_at == -math.inf  # duplicates: no burst to answer first


async def test_intake_limit_answers_429_with_retry_after(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    """`intake_per_s` caps a source: over it, 429 + Retry-After (and a warning); after a
    second, accepted again."""
    clock = ManualClock()
    intake = await make_intake(
        """
[sources.paced]
intake_per_s = 1
[[sources.paced.actions]]
type = "log"
""",
        clock=clock,
    )
    assert (await intake.post("/hooks/paced", b"1")).status == 202
    limited = await intake.post("/hooks/paced", b"2")
    assert_error(limited, 429, retry_after=True)
    assert limited.headers["Retry-After"] == "1"
    assert "refused webhook status=429 source=paced reason='over intake_per_s'" in caplog.text
    clock.advance(1.0)
    assert (await intake.post("/hooks/paced", b"3")).status == 202
    assert await intake.events() == 2


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"a=1&b=%20x&b=2&empty="),
        ("application/octet-stream", bytes(range(256))),
        ("text/plain; charset=latin-1", "caf\xe9 \u20ac?".encode("latin-1", "replace")),
        ("application/json", b'{"not": "parsed", "dup": 1, "dup": 2}'),
    ],
    ids=["form", "binary", "text", "json"],
)
async def test_any_content_type_is_stored_raw(
    make_intake: StartIntake, content_type: str, body: bytes
) -> None:
    """Whatever the content type, the body is journaled byte for byte with its content type."""
    intake = await make_intake()
    answer = await intake.post("/hooks/raw", body, headers={"Content-Type": content_type})
    assert answer.status == 202
    event = (await intake.journal.get_event(answer.doc["id"])).event
    assert event.body == body
    assert event.content_type == content_type


SIGNED_LOG = """
[sources.gh]
verify = { scheme = "github", secret = "a-signing-secret-for-the-test" }
[[sources.gh.actions]]
type = "log"
"""


async def test_a_flood_of_bad_signatures_logs_ten_lines_a_minute_and_counts_the_rest(
    make_intake: StartIntake, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can send bad signatures by the thousand: the log gets ten lines a minute and
    then one that counts what it held back, while ``/stats`` counts every one."""
    clock = ManualClock()
    intake = await make_intake(SIGNED_LOG, clock=clock)
    caplog.set_level(logging.INFO, "webhookd.receiver")
    bad = {"X-Hub-Signature-256": "sha256=" + "00" * 32, "X-GitHub-Delivery": "d-1"}

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "webhookd.receiver"]

    for _ in range(30):
        assert_error(await intake.post("/hooks/gh", headers=bad), 401)
    assert len(lines()) == 10
    assert all(line.startswith("rejected webhook source=gh reason=") for line in lines())
    clock.advance(59.9)
    assert_error(await intake.post("/hooks/gh", headers=bad), 401)
    assert len(lines()) == 10
    clock.advance(0.1)  # a new minute: first the count, then the line itself
    assert_error(await intake.post("/hooks/gh", headers=bad), 401)
    assert lines()[10:] == [
        "suppressed=21 more rejected webhooks in the last 60 s, not logged one by one",
        lines()[0],
    ]
    assert intake.state.verify_failures == 32
    assert await intake.events() == 0


REPLAYED = """
[sources.slack]
verify = { scheme = "slack", secret = "slack-signing-secret-0123456789" }
[[sources.slack.actions]]
type = "log"

[sources.hm]
verify = { scheme = "hmac", secret = "hmac-secret-0123456789abcdef", header = "X-Sig", \
  timestamp_header = "X-Ts", signed = "{timestamp}.{body}" }
tenant = "header:X-Shop"
[[sources.hm.actions]]
type = "log"
"""


async def test_a_signed_request_sent_again_under_another_query_or_tenant_is_a_duplicate(
    tmp_path: Path, run_daemon: Any
) -> None:
    """A scheme that signs a timestamp but no delivery id (a Slack slash command, an hmac
    source with timestamp_header): the body's key took in the query and the tenant, neither
    signed, so a captured request sent again within the tolerance under ``?a=1``, ``?a=2`` or
    another tenant header was a new event each time. What was signed is a second key; the
    provider's retry, signed anew, is still judged by the body."""
    from webhookd.schemes import sign

    cfg = make_config(tmp_path, REPLAYED)
    running = await run_daemon(cfg)
    bodies = {"slack": b"command=%2Fdeploy&text=prod&user_id=U1", "hm": b'{"amount": 100}'}
    for name, body in bodies.items():
        verify = cfg.sources[name].verify
        assert verify is not None
        headers, body = sign(verify, body=body, url="", now=time.time(), delivery_id="x")
        answers = []
        for query, shop in (("", "a"), ("?a=1", "a"), ("?a=2", "b"), ("", "b")):
            status, doc = await running.post(
                f"/hooks/{name}{query}", body, headers={**headers, "X-Shop": shop}
            )
            answers.append((status, doc["duplicate"]))
        assert answers == [(202, False)] + [(200, True)] * 3, (name, answers)
        retry, body = sign(verify, body=body, url="", now=time.time() + 5, delivery_id="x")
        status, doc = await running.post(f"/hooks/{name}", body, headers={**retry, "X-Shop": "a"})
        assert (status, doc["duplicate"]) == (200, True)  # the same body: judged by the first
