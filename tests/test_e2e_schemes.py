"""Every signature scheme end to end through a running daemon with a real forward target.

Each scheme's request is built by ``webhookd.send.build`` (the code path of ``webhookd send``):
signed → accepted, forwarded, its verdict stored; forged → 401 and nothing journaled; the same
delivery again → 200 duplicate. Also the handshakes, stale timestamps, and replays long after
the signature's tolerance has passed.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from conftest import Running, Target, make_config
from ops_support import event_state
from procs import Procs, write_config

from webhookd import send
from webhookd.clock import ManualClock
from webhookd.config import Config, Secret, SourceConfig, load
from webhookd.errors import VerificationError
from webhookd.schemes import verify

STANDARD_SECRET = "whsec_" + base64.b64encode(b"standard-key-0123456789").decode()
OLD_STANDARD = "whsec_" + base64.b64encode(b"rotated-out-key-98765432").decode()
WRONG_STANDARD = "whsec_" + base64.b64encode(b"an-attackers-key-1234567").decode()
META_TOKEN = "meta-verify-token"

# source name → its inline `verify` table; the source name says which variant it exercises.
VERIFY = {
    "github": '{ scheme = "github", secret = "gh-secret" }',
    "stripe": '{ scheme = "stripe", secret = "whsec_stripe_secret" }',
    "shopify": '{ scheme = "shopify", secret = "shop-secret" }',
    "mailgun_form": '{ scheme = "mailgun", secret = "mg-key" }',
    "mailgun_json": '{ scheme = "mailgun", secret = "mg-key" }',
    "slack": '{ scheme = "slack", secret = "slack-secret" }',
    "standard": f'{{ scheme = "standard", secret = "{STANDARD_SECRET}" }}',
    "svix": f'{{ scheme = "standard", secrets = ["{OLD_STANDARD}", "{STANDARD_SECRET}"] }}',
    "meta": f'{{ scheme = "meta", secret = "app-secret", verify_token = "{META_TOKEN}" }}',
    "twilio_form": (
        '{ scheme = "twilio", secret = "tw-token", url = "https://hooks.example.com/tw/form" }'
    ),
    "twilio_json": (
        '{ scheme = "twilio", secret = "tw-token", url = "https://hooks.example.com/tw/json" }'
    ),
    "hmac": (
        '{ scheme = "hmac", secret = "hm-secret", header = "X-Signature", algorithm = "sha512",'
        ' encoding = "base64", prefix = "v1=", timestamp_header = "X-Timestamp",'
        ' signed = "{timestamp}:{body}" }'
    ),
    "token": '{ scheme = "token", secret = "tok-secret", header = "X-Webhook-Token" }',
}
BODIES = {"mailgun_form": urlencode({"event": "delivered", "recipient": "a@example.com"}).encode()}
TIMESTAMPED = ("stripe", "slack", "standard", "svix", "mailgun_form", "mailgun_json", "hmac")


def config(tmp_path: Path, target: Target) -> Config:
    """One daemon config with a verified source per case, each forwarding to ``target``."""
    parts = []
    for name, table in VERIFY.items():
        parts.append(
            f"[sources.{name}]\nverify = {table}\n"
            f'[[sources.{name}.actions]]\ntype = "forward"\nurl = "{target.url}/{name}"\n'
        )
    return make_config(tmp_path, "\n".join(parts))


def delivery(
    r: Running,
    name: str,
    *,
    delivery_id: str,
    now: float | None = None,
    body: bytes | None = None,
    **verify_changes: Any,
) -> send.Delivery:
    """The request the provider of source ``name`` would send, optionally with other secrets."""
    src: SourceConfig = r.daemon.config.sources[name]
    if name == "svix":  # the sender already uses the new key; the source still lists the old
        verify_changes = {"secrets": (Secret(STANDARD_SECRET),)} | verify_changes
    if verify_changes:
        assert src.verify is not None
        src = dataclasses.replace(src, verify=dataclasses.replace(src.verify, **verify_changes))
    made = send.build(
        src,
        url=r.url + src.path,
        body=BODIES.get(name) if body is None else body,
        now=r.daemon.clock.time() if now is None else now,
        delivery_id=delivery_id,
    )
    if name == "svix":  # Svix sends the same scheme under its own header names
        headers = {k.replace("webhook-", "svix-"): v for k, v in made.headers.items()}
        made = dataclasses.replace(made, headers=headers)
    return made


async def post(r: Running, d: send.Delivery) -> tuple[int, Any]:
    async with r.http.post(d.url, data=d.body, headers=d.headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def admin(r: Running, path: str, method: str = "GET") -> Any:
    async with r.http.request(method, r.admin_url + path, headers={"X-Webhookd": "1"}) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json()


async def events_of(r: Running, name: str) -> int:
    assert r.daemon.journal is not None
    return len(await r.daemon.journal.list_events(source=name, limit=100))


def wrong_secret(name: str) -> Secret:
    return Secret(WRONG_STANDARD if name in ("standard", "svix") else "not-the-secret")


@pytest.mark.parametrize("name", list(VERIFY))
async def test_signed_forged_and_duplicate(
    name: str, tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """Signed: 202, forwarded, verdict stored; forged: 401, no row; same delivery: duplicate."""
    r = await run_daemon(config(tmp_path, target))
    good = delivery(r, name, delivery_id=f"dlv-{name}-1")

    status, doc = await post(r, good)
    assert (status, doc["duplicate"]) == (202, False), doc
    await target.wait_for(lambda t: any(s.path == f"/{name}" for s in t.seen))
    seen = next(s for s in target.seen if s.path == f"/{name}")
    assert seen.body == good.body
    assert seen.headers["webhook-id"] == doc["id"]
    shown = await admin(r, f"/events/{doc['id']}")
    scheme = r.daemon.config.sources[name].verify.scheme
    expected_index = 1 if name == "svix" else 0  # svix's source lists a rotated-out key first
    assert shown["verified"]["scheme"] == scheme
    assert shown["verified"]["secret_index"] == expected_index
    assert shown["verified"]["received_at"] == shown["received_at"]

    forged = delivery(r, name, delivery_id=f"dlv-{name}-2", secrets=(wrong_secret(name),))
    status, err = await post(r, forged)
    assert status == 401
    assert set(err) == {"error"} and err["error"] in ("signature mismatch", "token mismatch")
    assert await events_of(r, name) == 1

    status, again = await post(r, good)
    assert (status, again) == (200, {"id": doc["id"], "duplicate": True})
    assert await events_of(r, name) == 1
    stats = await admin(r, "/stats")
    assert stats["intake"]["verify_failures"] == 1


@pytest.mark.parametrize("name", TIMESTAMPED)
async def test_stale_timestamp_rejected(
    name: str,
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A correctly signed request a day old is refused and leaves no row; the log says by how
    much and which way (the sender is told no more than the reason)."""
    r = await run_daemon(config(tmp_path, target))
    stale = delivery(r, name, delivery_id="dlv-old", now=r.daemon.clock.time() - 86_400)
    with caplog.at_level(logging.WARNING, logger="webhookd"):
        status, err = await post(r, stale)
    assert (status, err) == (401, {"error": "timestamp outside tolerance"})
    assert await events_of(r, name) == 0
    assert re.search(
        r"detail=.the timestamp is 8640\d s behind this server's clock \(tolerance \d+ s\)",
        caplog.text,
    ), caplog.text


async def test_mailgun_spends_a_token_once_and_knows_a_retry_by_its_event_id(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """Mailgun signs a timestamp and a token, not the body. A retry hours later with the first
    delivery's signature is taken; one signed again is a duplicate by its event-data.id; the
    token's signature with another body is a duplicate, not a second event. A form field that
    is not UTF-8 (a latin-1 subject) does not hide the signature fields."""
    r = await run_daemon(config(tmp_path, target))
    now = r.daemon.clock.time()

    def event(event_id: str) -> bytes:
        return json.dumps({"event-data": {"id": event_id, "event": "delivered"}}).encode()

    first = delivery(r, "mailgun_json", delivery_id="tok-1", body=event("ev-1"), now=now - 7 * 3600)
    status, doc = await post(r, first)
    assert (status, doc["duplicate"]) == (202, False), doc
    shown = await admin(r, f"/events/{doc['id']}")
    assert shown["dedup_key"] == "mailgun_json:ev-1"
    resigned = delivery(r, "mailgun_json", delivery_id="tok-2", body=event("ev-1"))
    other_body = delivery(
        r, "mailgun_json", delivery_id="tok-1", body=event("ev-2"), now=now - 7 * 3600
    )
    for again in (resigned, other_body):
        assert await post(r, again) == (200, {"id": doc["id"], "duplicate": True})
    assert await events_of(r, "mailgun_json") == 1

    ts = str(int(now))
    mac = hmac.new(b"mg-key", f"{ts}tok-3".encode(), hashlib.sha256).hexdigest()
    form = (
        b"subject=Caf%E9&"
        + urlencode({"timestamp": ts, "token": "tok-3", "signature": mac}).encode()
    )
    url = r.url + r.daemon.config.sources["mailgun_form"].path
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with r.http.post(url, data=form, headers=headers) as resp:
        assert resp.status == 202, await resp.text()


async def test_failure_reason_reveals_nothing(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A 401 names no secret, digest or expected value, only a generic reason."""
    r = await run_daemon(config(tmp_path, target))
    forged = delivery(r, "github", delivery_id="x", secrets=(Secret("attacker"),))
    async with r.http.post(forged.url, data=forged.body, headers=forged.headers) as resp:
        text = await resp.text()
        assert resp.status == 401
    good = delivery(r, "github", delivery_id="x")
    for secret_or_digest in ("gh-secret", good.headers["X-Hub-Signature-256"][7:]):
        assert secret_or_digest not in text
    assert json.loads(text) == {"error": "signature mismatch"}


@pytest.mark.parametrize(
    ("mode", "token", "challenge", "status", "answer"),
    [
        ("subscribe", META_TOKEN, "challenge-4711", 200, "challenge-4711"),
        ("subscribe", "guess", "challenge-4711", 403, {"error": "verify token mismatch"}),
        ("subscribe", None, "challenge-4711", 403, {"error": "verify token mismatch"}),
        ("unsubscribe", META_TOKEN, "challenge-4711", 403, {"error": "hub.mode must be subscribe"}),
        ("subscribe", META_TOKEN, None, 400, {"error": "missing hub.challenge"}),
    ],
)
async def test_meta_subscribe_handshake(
    mode: str,
    token: str | None,
    challenge: str | None,
    status: int,
    answer: Any,
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
) -> None:
    """Meta's GET handshake echoes hub.challenge for the right token and hub.mode=subscribe,
    else 403 (400 without a challenge) with a JSON error; nothing stored."""
    r = await run_daemon(config(tmp_path, target))
    query = {"hub.mode": mode}
    for key, value in (("hub.verify_token", token), ("hub.challenge", challenge)):
        if value is not None:
            query[key] = value
    async with r.http.get(f"{r.url}/hooks/meta", params=query) as resp:
        assert resp.status == status
        text = await resp.text()
    assert text == answer if status == 200 else json.loads(text) == answer
    assert await events_of(r, "meta") == 0


async def test_slack_url_verification(tmp_path: Path, target: Target, run_daemon: Any) -> None:
    """Slack's signed url_verification POST is answered with its challenge and not stored."""
    r = await run_daemon(config(tmp_path, target))
    src = r.daemon.config.sources["slack"]
    body = json.dumps({"type": "url_verification", "challenge": "ch-99", "token": "t"}).encode()
    d = send.build(src, url=r.url + src.path, body=body, now=r.daemon.clock.time(), delivery_id="")
    assert await post(r, d) == (200, {"challenge": "ch-99"})
    unsigned = dataclasses.replace(d, headers={"Content-Type": "application/json"})
    assert (await post(r, unsigned))[0] == 401
    assert await events_of(r, "slack") == 0


async def test_replay_after_tolerance_still_delivers(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A verified event replayed two days later is delivered: the stored verdict stands."""
    clock = ManualClock(start=1_800_000_000.0)
    r = await run_daemon(config(tmp_path, target), clock=clock)
    good = delivery(r, "stripe", delivery_id="evt_replay")
    status, doc = await post(r, good)
    assert status == 202
    await target.wait_for(lambda t: len(t.seen) == 1)
    before = await admin(r, f"/events/{doc['id']}")
    assert before["verified"]["timestamp"] == 1_800_000_000.0

    await event_state(r.http, r.admin_url, doc["id"], "done")  # a running job is not replayed
    clock.advance(2 * 86400)
    src = r.daemon.config.sources["stripe"]
    assert src.verify is not None
    with pytest.raises(VerificationError, match="timestamp outside tolerance"):
        # Re-checking the stored request now would fail: the replay must not do it.
        verify(src.verify, headers=good.headers, body=good.body, url=good.url, now=clock.time())
    await admin(r, f"/events/{doc['id']}/replay", "POST")
    await target.wait_for(lambda t: len(t.seen) == 2)
    assert target.seen[1].body == good.body
    after = await admin(r, f"/events/{doc['id']}")
    assert after["verified"] == before["verified"]


# A captured request of a scheme whose signature has no timestamp, as an attacker replays it.
CAPTURED = {
    "github": b'{"action": "opened", "number": 7}',
    "shopify": b'{"id": 820982911946154508, "total_price": "19.99"}',
    "twilio_form": urlencode({"MessageSid": "SM1", "From": "+15005550006", "Body": "hi"}).encode(),
    "twilio_json": b'{"CallSid": "CA1", "CallStatus": "completed"}',
}


@pytest.mark.parametrize("name", list(CAPTURED))
async def test_signed_body_under_a_fresh_delivery_id_is_a_duplicate(
    name: str, tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A captured signed body re-sent with a new delivery id is 200 duplicate, forwarded once."""
    r = await run_daemon(config(tmp_path, target))
    first = delivery(r, name, delivery_id="dlv-original", body=CAPTURED[name])
    replayed = delivery(r, name, delivery_id="dlv-forged-fresh-id", body=CAPTURED[name])
    assert first.body == replayed.body and first.headers != replayed.headers

    status, doc = await post(r, first)
    assert (status, doc["duplicate"]) == (202, False)
    assert await post(r, replayed) == (200, {"id": doc["id"], "duplicate": True})
    assert await events_of(r, name) == 1
    # A different body under the replay's delivery id is a new event: that id was not kept.
    other = delivery(r, name, delivery_id="dlv-forged-fresh-id", body=CAPTURED[name] + b" ")
    status, new = await post(r, other)
    assert (status, new["duplicate"]) == (202, False)
    await target.wait_for(lambda t: len([s for s in t.seen if s.path == f"/{name}"]) == 2)
    assert await events_of(r, name) == 2


# The same signed Twilio form, re-encoded: Twilio signs the decoded parameters, sorted, so each
# of these verifies under the original signature.
REENCODED = {
    "a stray &": lambda b: b + b"&",
    "a leading &": lambda b: b"&" + b,
    "reordered": lambda b: b"&".join(reversed(b.split(b"&"))),
    "%20 for +": lambda b: b.replace(b"+", b"%20"),
    "a name repeated with its value": lambda b: b + b"&MessageSid=SM1",
}


@pytest.mark.parametrize("change", list(REENCODED))
async def test_a_twilio_form_reencoded_under_a_fresh_id_is_a_duplicate(
    change: str, tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """The replay key is what Twilio signed, not the bytes: a re-encoding is no new event."""
    r = await run_daemon(config(tmp_path, target))
    body = urlencode({"MessageSid": "SM1", "From": "+15005550006", "Body": "hi there"}).encode()
    first = delivery(r, "twilio_form", delivery_id="dlv-original", body=body)
    forged = dataclasses.replace(
        first,
        body=REENCODED[change](body),
        headers=first.headers | {"I-Twilio-Idempotency-Token": "dlv-forged"},
    )
    assert forged.body != first.body
    src = r.daemon.config.sources["twilio_form"]
    assert src.verify is not None
    verify(src.verify, headers=forged.headers, body=forged.body, url=forged.url, now=0.0)

    status, doc = await post(r, first)
    assert (status, doc["duplicate"]) == (202, False)
    assert await post(r, forged) == (200, {"id": doc["id"], "duplicate": True})
    assert await events_of(r, "twilio_form") == 1


async def test_an_unsigned_webhook_id_beside_svix_headers_does_not_name_the_delivery(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """Svix signs svix-id; a webhook-id added to a captured Svix request is no fresh delivery."""
    r = await run_daemon(config(tmp_path, target))
    good = delivery(r, "svix", delivery_id="msg_svix_1")
    status, doc = await post(r, good)
    assert (status, doc["duplicate"]) == (202, False)
    for forged_id in ("forged-0", "forged-1"):
        forged = dataclasses.replace(good, headers=good.headers | {"webhook-id": forged_id})
        assert await post(r, forged) == (200, {"id": doc["id"], "duplicate": True})
    assert await events_of(r, "svix") == 1


@pytest.mark.parametrize("host", ["a:b", "x:99999", "h:0x50", "x#", "x?a=1#", "x/y", "u@x", "x y"])
async def test_a_malformed_host_is_a_400_on_a_verified_source(
    host: str, tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A Host that is no host[:port] is the client's error, not an internal one (RFC 9112)."""
    r = await run_daemon(config(tmp_path, target))
    good = delivery(r, "github", delivery_id="dlv-host")
    async with r.http.post(good.url, data=good.body, headers=good.headers | {"Host": host}) as resp:
        assert resp.status == 400
        assert await resp.json() == {"error": "malformed Host header"}
    assert not [rec for rec in caplog.records if rec.exc_info]
    assert await events_of(r, "github") == 0


async def test_a_host_header_cannot_stand_in_for_the_query_twilio_signed(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A Host holding "?query#" is a 400: it once put its query in place of the request's own."""
    r = await run_daemon(config(tmp_path, target))
    src = r.daemon.config.sources["twilio_form"]
    signed = send.build(
        src,
        url=f"{r.url}{src.path}?store=eu",
        body=urlencode({"MessageSid": "SM1", "Body": "hi"}).encode(),
        now=r.daemon.clock.time(),
        delivery_id="dlv-host-query",
    )
    forged = signed.url.replace("store=eu", "store=us")
    headers = signed.headers | {"Host": "x?store=eu#"}
    async with r.http.post(forged, data=signed.body, headers=headers) as resp:
        assert (resp.status, await resp.json()) == (400, {"error": "malformed Host header"})
    async with r.http.post(forged, data=signed.body, headers=signed.headers) as resp:
        assert (resp.status, await resp.json()) == (401, {"error": "signature mismatch"})
    assert await events_of(r, "twilio_form") == 0


async def test_token_source_with_header_dedup_catches_a_replayed_body(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A token source keyed on a request-id header still drops the same body under a new id."""
    cfg = make_config(
        tmp_path,
        '[sources.tok]\nverify = { scheme = "token", secret = "t0k", header = "X-Token" }\n'
        'dedup = "header:X-Request-Id"\n'
        f'[[sources.tok.actions]]\ntype = "forward"\nurl = "{target.url}/tok"\n',
    )
    r = await run_daemon(cfg)
    body = b'{"deploy": "v1.2.3"}'
    first = await r.post("/hooks/tok", body, headers={"X-Token": "t0k", "X-Request-Id": "a"})
    again = await r.post("/hooks/tok", body, headers={"X-Token": "t0k", "X-Request-Id": "b"})
    assert first[0] == 202
    assert again == (200, {"id": first[1]["id"], "duplicate": True})


async def test_dedup_body_false_keeps_identical_bodies_as_distinct_events(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """With verify.dedup_body = false, only the delivery id decides: a new id is a new event."""
    cfg = make_config(
        tmp_path,
        '[sources.gh]\nverify = { scheme = "github", secret = "gh-secret", dedup_body = false }\n'
        f'[[sources.gh.actions]]\ntype = "forward"\nurl = "{target.url}/gh"\n',
    )
    r = await run_daemon(cfg)
    body = b'{"zen": "Keep it logically awesome."}'
    answers = [await post(r, delivery(r, "gh", delivery_id=i, body=body)) for i in ("1", "2", "1")]
    assert [a[0] for a in answers] == [202, 202, 200]
    assert answers[2][1] == {"id": answers[0][1]["id"], "duplicate": True}
    assert await events_of(r, "gh") == 2


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_served_daemon_refuses_sha1_downgrade_and_replayed_github_body(
    tmp_path: Path,
) -> None:
    """Under `webhookd serve`: SHA-1-only GitHub requests are 401, a re-sent body a duplicate."""
    path = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "journal.db",
        '[sources.gh]\nverify = { scheme = "github", secret = "gh-secret" }\n'
        '[[sources.gh.actions]]\ntype = "log"\n',
    )
    body_file = tmp_path / "push.json"
    body_file.write_bytes(b'{"ref": "refs/heads/main", "after": "4f1e"}')
    procs = Procs()
    try:
        daemon = await procs.serve(path)
        url = f"{daemon.url}/hooks/gh"
        answers = []
        for delivery_id in ("guid-1", "guid-2"):  # what `webhookd send` signs: both headers
            out = await procs.cli(
                "send", "gh", "--file", str(body_file), "--id", delivery_id, "--url", url,
                "--config", str(path),
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            status_line, answer = out.stdout.splitlines()[:2]
            answers.append((status_line.split()[0], json.loads(answer)))
        assert answers[0][0] == "202" and answers[0][1]["duplicate"] is False
        assert answers[1] == ("200", {"id": answers[0][1]["id"], "duplicate": True})

        # A body not seen yet, so only the signature decides; load needs no env: secrets here.
        body = body_file.read_bytes() + b" "
        made = send.build(load(path).sources["gh"], url=url, body=body, now=0, delivery_id="g3")
        sha1_only = {k: v for k, v in made.headers.items() if k != "X-Hub-Signature-256"}
        blank_sha256 = {**made.headers, "X-Hub-Signature-256": ""}
        async with aiohttp.ClientSession() as http:
            for headers, reason in (
                (sha1_only, "legacy sha1 signature refused"),
                (blank_sha256, "missing signature header"),
            ):
                async with http.post(url, data=body, headers=headers) as resp:
                    assert (resp.status, await resp.json()) == (401, {"error": reason})
    finally:
        await procs.aclose()
