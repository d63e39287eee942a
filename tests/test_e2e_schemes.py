"""Every signature scheme end to end through a running daemon with a real forward target.

Each scheme's request is built by ``webhookd.send.build`` (the code path of ``webhookd send``):
signed → accepted, forwarded, its verdict stored; forged → 401 and nothing journaled; the same
delivery again → 200 duplicate. Also the handshakes, stale timestamps, and replays long after
the signature's tolerance has passed.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from conftest import Running, Target, make_config

from webhookd import send
from webhookd.clock import ManualClock
from webhookd.config import Config, Secret, SourceConfig
from webhookd.errors import VerificationError
from webhookd.signatures import verify

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
    r: Running, name: str, *, delivery_id: str, now: float | None = None, **verify_changes: Any
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
        body=BODIES.get(name),
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
    name: str, tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A correctly signed request an hour old is refused and leaves no row."""
    r = await run_daemon(config(tmp_path, target))
    stale = delivery(r, name, delivery_id="dlv-old", now=r.daemon.clock.time() - 3600)
    status, err = await post(r, stale)
    assert (status, err) == (401, {"error": "timestamp outside tolerance"})
    assert await events_of(r, name) == 0


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
    ("token", "status", "answer"),
    [(META_TOKEN, 200, "challenge-4711"), ("guess", 403, None), (None, 403, None)],
)
async def test_meta_subscribe_handshake(
    token: str | None,
    status: int,
    answer: str | None,
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
) -> None:
    """Meta's GET handshake echoes hub.challenge for the right token, else 403; nothing stored."""
    r = await run_daemon(config(tmp_path, target))
    query = {"hub.mode": "subscribe", "hub.challenge": "challenge-4711"}
    if token is not None:
        query["hub.verify_token"] = token
    async with r.http.get(f"{r.url}/hooks/meta", params=query) as resp:
        assert resp.status == status
        text = await resp.text()
    if answer is not None:
        assert text == answer
    assert "challenge-4711" not in text or status == 200
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
