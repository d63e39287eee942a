"""The scheme registry: every registered signature scheme has every part the daemon asks it for."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from webhookd import send
from webhookd.config import SourceConfig, VerifyConfig, parse
from webhookd.errors import ConfigError, VerificationError
from webhookd.schemes import SCHEMES, Scheme

NOW = 1_700_000_000.0
URL = "http://127.0.0.1:8080/hooks/s"
DELIVERY = "dlv_0001"
SECRET = "s3cret-of-the-scheme-test"
FORGER = "an-attackers-own-secret"


def verify_table(scheme: Scheme, **changes: Any) -> dict[str, Any]:
    """The smallest ``verify`` table the scheme says it needs, with ``changes`` applied."""
    return {"scheme": scheme.name, "secret": SECRET, **scheme.required_keys, **changes}


def load(table: dict[str, Any]) -> VerifyConfig:
    verify = parse({"sources": {"s": {"verify": table}}}).sources["s"].verify
    assert verify is not None
    return verify


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_registered_scheme_is_complete(name: str) -> None:
    """A scheme missing a part fails: config checks, send's signing, verify, forgery, dedup."""
    scheme = SCHEMES[name]
    assert scheme.name == name
    for part in ("legacy_sha1", "untimed_always", "dedup_headers", "dedup_json"):
        assert hasattr(scheme, part), f"scheme {name!r} does not declare {part}"

    # Config: the declared minimal table loads; without the secret or a required key it fails.
    cfg = load(verify_table(scheme))
    for key in ("secret", *scheme.required_keys):
        table = verify_table(scheme)
        del table[key]
        with pytest.raises(ConfigError) as info:
            load(table)
        assert info.value.key == f"sources.s.verify.{key}"

    # Sending: `webhookd send`'s own path, with the scheme's default body (deterministic).
    src = SourceConfig(name="s", path="/hooks/s", verify=cfg)
    delivery = send.build(src, url=URL, body=None, now=NOW, delivery_id=DELIVERY)
    assert delivery.body == send.build(src, url=URL, body=None, now=NOW, delivery_id=DELIVERY).body
    assert delivery.headers["Content-Type"]
    headers = CIMultiDict(delivery.headers)

    # Receiving: what it signed verifies with the first secret, and is no handshake.
    verdict = scheme.verify(cfg, headers=headers, body=delivery.body, url=delivery.url, now=NOW)
    assert (verdict.scheme, verdict.secret_index, verdict.received_at) == (name, 0, NOW)
    shake = scheme.handshake(
        cfg,
        method="POST",
        query={},
        headers=headers,
        body=delivery.body,
        url=delivery.url,
        now=NOW,
    )
    assert shake is None

    # A forgery (the same request signed with another secret) is refused.
    forger = load(verify_table(scheme, secret=FORGER))
    forged_headers, forged_body = scheme.sign(
        forger, body=delivery.body, url=delivery.url, now=NOW, delivery_id=DELIVERY
    )
    with pytest.raises(VerificationError):
        scheme.verify(
            cfg, headers=CIMultiDict(forged_headers), body=forged_body, url=delivery.url, now=NOW
        )

    # Capabilities: untimed exactly when nothing bounds a replay, and config agrees.
    untimed = scheme.untimed(cfg)
    assert untimed is (verdict.timestamp is None)
    assert untimed is (scheme.untimed_always or scheme.untimed_unless is not None)
    later = NOW + cfg.tolerance_s + 1
    if untimed:
        scheme.verify(cfg, headers=headers, body=delivery.body, url=delivery.url, now=later)
    else:
        with pytest.raises(VerificationError, match="timestamp outside tolerance"):
            scheme.verify(cfg, headers=headers, body=delivery.body, url=delivery.url, now=later)
    for key, applies in (("dedup_body", untimed), ("allow_sha1", scheme.legacy_sha1)):
        table = verify_table(scheme, **{key: False})
        if applies:
            assert getattr(load(table), key) is False
        else:
            with pytest.raises(ConfigError, match=key):
                load(table)

    # Dedup: the delivery id where the provider puts it, or None only if it declares no place.
    declares_dedup = bool(
        scheme.dedup_headers or scheme.dedup_json or type(scheme).dedup_key is not Scheme.dedup_key
    )
    expected = DELIVERY if declares_dedup else None
    assert scheme.dedup_key(headers, delivery.body) == expected


@pytest.mark.parametrize("name", list(SCHEMES))
def test_a_scheme_answers_handshakes_only_on_the_methods_it_declares(name: str) -> None:
    """The receiver refuses, with a 405 naming them in Allow, every method but POST and the
    scheme's ``handshake_methods`` before asking for a handshake: so none may hide elsewhere.
    Meta's challenge and Slack's url_verification, offered on every method, answer only there."""
    scheme = SCHEMES[name]
    assert scheme.handshake_methods <= {"GET", "PUT", "PATCH", "DELETE"}
    cfg = load(verify_table(scheme, verify_token="vt") if name == "meta" else verify_table(scheme))
    query = {"hub.mode": "subscribe", "hub.verify_token": "vt", "hub.challenge": "c"}
    body = b'{"type": "url_verification", "challenge": "c"}'
    url = scheme.delivery_url(URL + "?" + "&".join(f"{k}={v}" for k, v in query.items()), body)
    headers, body = scheme.sign(cfg, body=body, url=url, now=NOW, delivery_id=DELIVERY)
    for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS"):
        shake = scheme.handshake(
            cfg,
            method=method,
            query=query,
            headers=CIMultiDict(headers),
            body=body,
            url=url,
            now=NOW,
        )
        assert shake is None or method in scheme.handshake_methods, (name, method)
    if name == "meta":
        assert scheme.handshake_methods == {"GET"}
