"""Tests for webhookd.schemes: providers' published vectors, official libraries, every scheme."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import math
import re
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import pytest
import standardwebhooks
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from webhookd import forms
from webhookd.config import Secret, VerifyConfig
from webhookd.errors import ConfigError, VerificationError
from webhookd.schemes import (
    SCHEMES,
    Handshake,
    Verdict,
    default_dedup,
    handshake,
    sign,
    sign_standard,
    verify,
)

NOW = 1_700_000_000.0
TOL = 300.0
LOCAL_URL = "http://127.0.0.1:8080/hooks/src"
TWILIO_PUBLIC = "https://example.com/hooks/twilio"
STANDARD_SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
JSON_BODY = b'{"id": "evt_1", "event_id": "Ev1", "type": "event_callback", "n": 1}'
FORM_BODY = b"CallSid=CA1&From=%2B15551234567&Body=hello+there"

# Secrets per scheme, in the shape each provider issues them.
SECRET = {
    "standard": STANDARD_SECRET,
    "stripe": "whsec_stripe_test_secret",
    "meta": "app-secret",
    "twilio": "auth-token-12345",
}
EXTRA: dict[str, dict[str, Any]] = {
    "twilio": {"url": TWILIO_PUBLIC},
    "hmac": {"header": "X-Sig", "prefix": "sha256="},
    "token": {"header": "X-Token"},
}
BODY = {"twilio": FORM_BODY}
SIG_HEADERS = {
    "github": ("X-Hub-Signature-256", "X-Hub-Signature"),
    "meta": ("X-Hub-Signature-256", "X-Hub-Signature"),
    "stripe": ("Stripe-Signature",),
    "shopify": ("X-Shopify-Hmac-Sha256",),
    "slack": ("X-Slack-Signature",),
    "standard": ("webhook-signature",),
    "twilio": ("X-Twilio-Signature",),
    "hmac": ("X-Sig",),
    "token": ("X-Token",),
}
BODY_SIGNED = ("github", "meta", "stripe", "shopify", "slack", "standard", "twilio", "hmac")
TIMESTAMPED = ("stripe", "slack", "standard", "mailgun", "hmac-ts")


def make_cfg(scheme: str, *secrets: str, **kw: Any) -> VerifyConfig:
    """A VerifyConfig as webhookd.config would build it."""
    if scheme == "hmac-ts":
        scheme = "hmac"
        kw = {"header": "X-Sig", "timestamp_header": "X-Ts", "signed": "{timestamp}.{body}"} | kw
    else:
        kw = EXTRA.get(scheme, {}) | kw
    values = secrets or (SECRET.get(scheme, "s3cret"),)
    return VerifyConfig(scheme=scheme, secrets=tuple(Secret(s) for s in values), **kw)


def signed(
    cfg: VerifyConfig, body: bytes | None = None, *, now: float = NOW, url: str = LOCAL_URL
) -> tuple[CIMultiDict[str], bytes]:
    """Headers and body exactly as ``sign`` produces them, in the receiver's header type."""
    if body is None:
        body = BODY.get(cfg.scheme, JSON_BODY)
    headers, out = sign(cfg, body=body, url=url, now=now, delivery_id="dlv_1")
    return CIMultiDict(headers), out


def check(
    cfg: VerifyConfig,
    headers: Any,
    body: bytes,
    *,
    now: float = NOW,
    url: str = LOCAL_URL,
) -> Verdict:
    return verify(cfg, headers=headers, body=body, url=url, now=now)


def reason(cfg: VerifyConfig, headers: Any, body: bytes, **kw: Any) -> str:
    with pytest.raises(VerificationError) as info:
        check(cfg, headers, body, **kw)
    return info.value.reason


# -- providers' published examples -------------------------------------------------------------


def test_github_docs_example() -> None:
    """GitHub's documented example delivery verifies."""
    # https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
    cfg = make_cfg("github", "It's a Secret to Everybody")
    sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    headers = CIMultiDict({"X-Hub-Signature-256": sig})
    assert check(cfg, headers, b"Hello, World!").secret_index == 0
    assert reason(cfg, headers, b"Hello, World?") == "signature mismatch"


SLACK_DOC_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow"
    b"&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner"
    b"&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands"
    b"%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
    b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
)


def test_slack_docs_example() -> None:
    """Slack's documented example request verifies at its own timestamp, and our signer agrees."""
    # https://api.slack.com/authentication/verifying-requests-from-slack
    cfg = make_cfg("slack", "8f742231b10e8888abcd99yyyzzz85a5")
    sig = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    headers = CIMultiDict({"X-Slack-Signature": sig, "X-Slack-Request-Timestamp": "1531420618"})
    verdict = check(cfg, headers, SLACK_DOC_BODY, now=1531420618.0)
    assert verdict.timestamp == 1531420618.0
    ours, _ = sign(cfg, body=SLACK_DOC_BODY, url="", now=1531420618.0, delivery_id="x")
    assert ours["X-Slack-Signature"] == sig


# standard-webhooks/standard-webhooks libraries/python/tests/test_webhooks.py (test_sign_function,
# test_multi_sig_payload_is_valid, test_signature_verification_with_and_without_prefix).
SW_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SW_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SW_BODY = b'{"test": 2432232314}'
SW_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def sw_headers(sig: str = SW_SIG, prefix: str = "webhook") -> CIMultiDict[str]:
    return CIMultiDict(
        {f"{prefix}-id": SW_ID, f"{prefix}-timestamp": "1614265330", f"{prefix}-signature": sig}
    )


def test_standard_webhooks_published_vector_signs() -> None:
    """sign_standard reproduces the Standard Webhooks repository's test vector."""
    assert sign_standard([SW_SECRET], msg_id=SW_ID, timestamp=1614265330, body=SW_BODY) == SW_SIG


@pytest.mark.parametrize("secret", [SW_SECRET, SW_SECRET.removeprefix("whsec_")])
def test_standard_webhooks_published_vector_verifies(secret: str) -> None:
    """The published vector verifies with the secret written with or without whsec_."""
    verdict = check(make_cfg("standard", secret), sw_headers(), SW_BODY, now=1614265330.0)
    assert verdict == Verdict("standard", 0, 1614265330.0, 1614265330.0)


def test_standard_webhooks_published_multi_signature_header() -> None:
    """A header listing bad v1, unknown v2 and one good v1 signature is accepted."""
    junk = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
    header = f"{junk} v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {SW_SIG} {junk}"
    assert check(make_cfg("standard", SW_SECRET), sw_headers(header), SW_BODY, now=1614265330.0)


def test_standard_webhooks_published_bad_signature_rejected() -> None:
    """The library's 'invalid signature' fixture is rejected."""
    bad = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="
    cfg = make_cfg("standard", SW_SECRET)
    assert reason(cfg, sw_headers(bad), SW_BODY, now=1614265330.0) == "signature mismatch"


# twilio/twilio-python tests/unit/test_request_validator.py (auth token "12345").
TW_URI = "https://mycompany.com/myapp.php?foo=1&bar=2"
TW_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
    "Caller": "+14158675309",
}
TW_FORM = urlencode(TW_PARAMS).encode()


def twilio(sig: str, *, content_type: str | None = None) -> CIMultiDict[str]:
    headers = CIMultiDict({"X-Twilio-Signature": sig})
    if content_type:
        headers["Content-Type"] = content_type
    return headers


@pytest.mark.parametrize(
    ("url", "sig"),
    [
        (TW_URI, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        (TW_URI.replace(".com", ".com:1234"), "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        (TW_URI, "kvajT1Ptam85bY51eRf/AJRuM3w="),
        (
            TW_URI.replace(".com", ".com:1234").replace("https", "http"),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=",
        ),
        (TW_URI.replace("https", "http"), "0ZXoZLH/DfblKGATFgpif+LLRf4="),
    ],
)
def test_twilio_sdk_vectors(url: str, sig: str) -> None:
    """Twilio's SDK vectors verify, with the URL tried with and without its port."""
    cfg = make_cfg("twilio", "12345", url=None)
    assert check(
        cfg, twilio(sig, content_type="application/x-www-form-urlencoded"), TW_FORM, url=url
    )


def test_twilio_sdk_vector_repeated_keys() -> None:
    """Twilio's repeated-parameter vector verifies: every value of a key counts, sorted."""
    cfg = make_cfg("twilio", "12345", url=None)
    body = b"Sid=CA123&SidAccount=AC123&Digits=5678&Digits=1234"
    assert check(cfg, twilio("IK+Dwps556ElfBT0I3Rgjkr1wJU="), body, url=TW_URI)


def twilio_sdk_signature(token: str, url: str, pairs: list[tuple[str, str]]) -> str:
    """A transcription of twilio-python's ``RequestValidator.compute_signature`` for a form.

    ``params`` there is the framework's MultiDict: names sorted (``sorted(set(params))``), and
    each name's values through ``sorted(set(values))``; twilio-node's ``toFormUrlEncodedParam``
    does the same with ``Array.from(new Set(values)).sort()``.
    """
    values: dict[str, list[str]] = {}
    for k, v in pairs:
        values.setdefault(k, []).append(v)
    s = url
    for name in sorted(set(values)):
        for value in sorted(set(values[name])):
            s += name + value
    mac = hmac.new(token.encode(), s.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def test_twilio_repeated_key_with_equal_values_signed_the_sdk_way() -> None:
    """A form repeating a name with the same value verifies as Twilio's SDKs sign it (once)."""
    cfg = make_cfg("twilio", "12345", url=None)
    pairs = [("To", "+1555"), ("Media", "b"), ("To", "+1555"), ("Media", "a"), ("Media", "b")]
    sig = twilio_sdk_signature("12345", TW_URI, pairs)
    assert check(cfg, twilio(sig), urlencode(pairs).encode(), url=TW_URI)
    # and what `webhookd send` signs for such a form is the same signature
    headers, _ = sign(cfg, body=urlencode(pairs).encode(), url=TW_URI, now=NOW, delivery_id="d")
    assert headers["X-Twilio-Signature"] == sig


def test_twilio_sdk_vector_json_body() -> None:
    """Twilio's JSON-body vector verifies: URL with bodySHA256 signed, body hash checked."""
    cfg = make_cfg("twilio", "12345", url=None)
    body = b'{"property": "value", "boolean": true}'
    url = TW_URI + "&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
    headers = twilio("a9nBmqA0ju/hNViExpshrM61xv4=", content_type="application/json")
    assert check(cfg, headers, body, url=url)
    assert reason(cfg, headers, body + b" ", url=url) == "body hash mismatch"


def test_twilio_shared_key_signed_with_sha256() -> None:
    """A request signed with a shared key names HMAC-SHA256 in its settings header, as
    twilio-python 9.13's ``compute_signature(url, params, "HMAC_SHA256")`` signs it (this
    vector); without the header, or with ``HMAC_SHA1``, the same signature is a mismatch."""
    cfg = make_cfg("twilio", "12345", url=None)
    sig = "033hgUJA9M/hXIZsYjwkerEP/DBm35nEri5FhCYjA5s="
    headers = twilio(sig, content_type="application/x-www-form-urlencoded")
    headers["X-Twilio-Webhooks-Signature-Settings"] = (
        "key=webhooks_sharedkey_1, algorithm=hmac_sha256"
    )
    assert check(cfg, headers, TW_FORM, url=TW_URI)
    headers["X-Twilio-Webhooks-Signature-Settings"] = "key=webhooks_sharedkey_1,algorithm=HMAC_SHA1"
    assert reason(cfg, headers, TW_FORM, url=TW_URI) == "signature mismatch"
    headers["X-Twilio-Webhooks-Signature-Settings"] = "algorithm=HMAC_MD5"
    assert reason(cfg, headers, TW_FORM, url=TW_URI) == (
        "unsupported algorithm in X-Twilio-Webhooks-Signature-Settings"
    )
    del headers["X-Twilio-Webhooks-Signature-Settings"]
    assert reason(cfg, headers, TW_FORM, url=TW_URI) == "signature mismatch"
    sha1 = twilio("RSOYDt4T1cUTdK1PDd93/VVr8B8=", content_type="application/x-www-form-urlencoded")
    sha1["X-Twilio-Webhooks-Signature-Settings"] = "key=webhooks_sharedkey_1"  # no algorithm=
    assert check(cfg, sha1, TW_FORM, url=TW_URI)


def test_twilio_public_url_replaces_local_address() -> None:
    """With verify.url set, the public URL plus the received query string is what is checked."""
    cfg = make_cfg("twilio", "12345", url="https://mycompany.com/myapp.php")
    local = "http://127.0.0.1:8080/hooks/twilio?foo=1&bar=2"
    assert check(cfg, twilio("RSOYDt4T1cUTdK1PDd93/VVr8B8="), TW_FORM, url=local)


def test_mailgun_independent_recomputation() -> None:
    """A Mailgun signature computed by hand (HMAC-SHA256 hex of timestamp+token) verifies."""
    # No fixed Mailgun vector is published; mailgun-go's webhooks_test.go computes its own over
    # timestamp "123456789" and token "token", which is what this mirrors independently.
    key = "mailgun-signing-key"
    sig = hmac.new(key.encode(), b"123456789token", hashlib.sha256).hexdigest()
    body = urlencode({"timestamp": "123456789", "token": "token", "signature": sig}).encode()
    assert check(make_cfg("mailgun", key), CIMultiDict(), body, now=123456789.0)


# -- the official standardwebhooks library -----------------------------------------------------


def test_standardwebhooks_library_signed_is_accepted() -> None:
    """What the official standardwebhooks library signs, we accept."""
    now = 1_700_000_123
    sig = standardwebhooks.Webhook(STANDARD_SECRET).sign(
        "msg_1", datetime.fromtimestamp(now, UTC), JSON_BODY.decode()
    )
    headers = CIMultiDict(
        {"webhook-id": "msg_1", "webhook-timestamp": str(now), "webhook-signature": sig}
    )
    cfg = make_cfg("standard")
    assert check(cfg, headers, JSON_BODY, now=now).secret_index == 0
    assert reason(cfg, headers, JSON_BODY + b"\n", now=now) == "signature mismatch"
    headers["webhook-timestamp"] = str(now + 1)
    assert reason(cfg, headers, JSON_BODY, now=now) == "signature mismatch"


def test_standardwebhooks_library_accepts_ours() -> None:
    """What sign_standard and sign produce, the official library verifies (for every secret)."""
    now = int(time.time())  # the library checks against the wall clock
    other = "whsec_" + base64.b64encode(b"other-secret-bytes").decode()
    sig = sign_standard([STANDARD_SECRET, other], msg_id="msg_2", timestamp=now, body=JSON_BODY)
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(now), "webhook-signature": sig}
    for secret in (STANDARD_SECRET, other):
        assert standardwebhooks.Webhook(secret).verify(JSON_BODY, headers) == json.loads(JSON_BODY)
    made, body = sign(make_cfg("standard"), body=JSON_BODY, url="", now=now, delivery_id="d")
    assert standardwebhooks.Webhook(STANDARD_SECRET).verify(body, dict(made))
    # A secret without whsec_ is base64 to the library: signed with what it decodes to.
    bare = STANDARD_SECRET.removeprefix("whsec_")
    made, body = sign(make_cfg("standard", bare), body=JSON_BODY, url="", now=now, delivery_id="d")
    assert standardwebhooks.Webhook(bare).verify(body, dict(made))


# -- every scheme: valid, tampered, wrong secret, rotation -------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_signed_request_verifies(scheme: str) -> None:
    """A request signed the provider's way verifies with the first secret."""
    cfg = make_cfg(scheme)
    headers, body = signed(cfg)
    verdict = check(cfg, headers, body)
    assert (verdict.scheme, verdict.secret_index, verdict.received_at) == (scheme, 0, NOW)


@pytest.mark.parametrize("scheme", BODY_SIGNED)
def test_tampered_body_rejected(scheme: str) -> None:
    """Changing one byte of a signed body is a signature mismatch."""
    cfg = make_cfg(scheme)
    headers, body = signed(cfg)
    assert reason(cfg, headers, body.replace(b"1", b"2", 1)) == "signature mismatch"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_wrong_secret_rejected(scheme: str) -> None:
    """A request signed with another secret is rejected."""
    headers, body = signed(make_cfg(scheme, "whsec_" + base64.b64encode(b"x" * 24).decode()))
    expected = "token mismatch" if scheme == "token" else "signature mismatch"
    assert reason(make_cfg(scheme), headers, body) == expected


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rotated_secret_matches_second(scheme: str) -> None:
    """During a rotation the second configured secret still verifies, and is reported."""
    headers, body = signed(make_cfg(scheme))
    rotated = make_cfg(
        scheme, "whsec_" + base64.b64encode(b"new" * 8).decode(), SECRET.get(scheme, "s3cret")
    )
    assert check(rotated, headers, body).secret_index == 1


# -- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", TIMESTAMPED)
@pytest.mark.parametrize(
    ("offset", "ok"),
    [
        (0, True),
        (TOL, True),
        (TOL + 0.5, True),
        (TOL + 1, False),
        (-TOL, True),
        (-TOL - 0.5, False),
        (-TOL - 1, False),
    ],
)
def test_timestamp_tolerance(scheme: str, offset: float, ok: bool) -> None:
    """Exactly tolerance_s off is valid, for the whole of the clock's second; a second more is
    rejected (Stripe: only old ones). A clock half a second before a timestamp 300 s ahead is
    in the second before, 301 s behind it."""
    cfg = make_cfg(scheme)
    headers, body = signed(cfg)
    if ok or (scheme == "stripe" and offset < 0):
        assert check(cfg, headers, body, now=NOW + offset).timestamp == NOW
    else:
        assert reason(cfg, headers, body, now=NOW + offset) == "timestamp outside tolerance"


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_nan_clock_fails_closed(scheme: str) -> None:
    """A NaN receipt time never passes the tolerance check."""
    cfg = make_cfg(scheme)
    headers, body = signed(cfg)
    assert reason(cfg, headers, body, now=math.nan) == "timestamp outside tolerance"


@pytest.mark.parametrize(
    ("scheme", "header"),
    [
        ("slack", "X-Slack-Request-Timestamp"),
        ("standard", "webhook-timestamp"),
        ("hmac-ts", "X-Ts"),
    ],
)
@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "missing timestamp"),
        ("nan", "malformed timestamp"),
        ("9" * 400, "malformed timestamp"),
        ("1_700_000_000", "malformed timestamp"),
        ("١٧٠٠٠٠٠٠٠٠", "malformed timestamp"),
        ("-1", "malformed timestamp"),
    ],
)
def test_bad_timestamp_header(scheme: str, header: str, value: str | None, why: str) -> None:
    """Missing, NaN, huge, underscored, non-ASCII or negative timestamps are rejected cleanly."""
    cfg = make_cfg(scheme)
    headers, body = signed(cfg)
    del headers[header]
    if value is not None:
        headers[header] = value
    assert reason(cfg, headers, body) == why


def test_stripe_header_without_t() -> None:
    """A Stripe-Signature header without t= is a missing timestamp."""
    cfg = make_cfg("stripe")
    headers, body = signed(cfg)
    headers["Stripe-Signature"] = re.sub(r"t=\d+,", "", headers["Stripe-Signature"])
    assert reason(cfg, headers, body) == "missing timestamp"


# -- missing and malformed headers -------------------------------------------------------------


@pytest.mark.parametrize("scheme", sorted(SIG_HEADERS))
def test_missing_signature_header(scheme: str) -> None:
    """A request without the signature header is rejected, never waved through."""
    cfg = make_cfg(scheme)
    headers, body = signed(cfg)
    for name in SIG_HEADERS[scheme]:
        del headers[name]
    assert reason(cfg, headers, body) == "missing signature header"


@pytest.mark.parametrize(
    ("scheme", "header", "value"),
    [
        ("github", "X-Hub-Signature-256", "sha256=not-hex"),
        ("github", "X-Hub-Signature-256", "md5=abcd"),
        ("github", "X-Hub-Signature-256", "abcdef"),
        ("stripe", "Stripe-Signature", "garbage"),
        ("stripe", "Stripe-Signature", "t=1700000000,v0=abcd"),
        ("shopify", "X-Shopify-Hmac-Sha256", "%%%not base64%%%"),
        ("slack", "X-Slack-Signature", "v1=abcd"),
        ("standard", "webhook-signature", "v1,!!!"),
        ("standard", "webhook-signature", "v2,abcd nocomma"),
        ("twilio", "X-Twilio-Signature", "###"),
        ("hmac", "X-Sig", "sha1=abcd"),
        ("hmac", "X-Sig", "sha256=zz"),
        ("github", "X-Hub-Signature-256", "sha256=ÿÿÿÿ"),
        ("shopify", "X-Shopify-Hmac-Sha256", "\ud800"),
    ],
)
def test_malformed_signature_header(scheme: str, header: str, value: str) -> None:
    """Unparseable, wrongly prefixed or non-ASCII signature headers are malformed."""
    cfg = make_cfg(scheme)
    headers, body = signed(cfg)
    headers[header] = value
    assert reason(cfg, headers, body) == "malformed signature header"


def test_reasons_never_echo_digests_or_secrets() -> None:
    """A failure's reason names no digest, received signature or secret."""
    cfg = make_cfg("github", "top-secret-value")
    expected = hmac.new(b"top-secret-value", JSON_BODY, hashlib.sha256).hexdigest()
    sent = "sha256=" + "ab" * 32
    why = reason(cfg, CIMultiDict({"X-Hub-Signature-256": sent}), JSON_BODY)
    assert expected not in why and "ab" * 8 not in why and "top-secret" not in why


def test_unknown_scheme_rejected() -> None:
    """A scheme this module does not implement fails verification instead of passing."""
    assert reason(VerifyConfig(scheme="nope", secrets=(Secret("x"),)), {}, b"") == "unknown scheme"


# -- scheme specifics --------------------------------------------------------------------------


def test_headers_case_insensitive_even_in_plain_dict() -> None:
    """Header names match case-insensitively whatever mapping the caller passes."""
    cfg = make_cfg("github")
    headers, body = signed(cfg)
    lowered = {k.lower(): v for k, v in headers.items()}
    assert check(cfg, lowered, body).secret_index == 0


def sha1_only(cfg: VerifyConfig) -> tuple[CIMultiDict[str], bytes]:
    """A correctly signed GitHub/Meta request stripped down to the legacy SHA-1 header."""
    headers, body = signed(cfg)
    del headers["X-Hub-Signature-256"]
    return headers, body


@pytest.mark.parametrize("scheme", ["github", "meta"])
def test_legacy_sha1_alone_refused_by_default(scheme: str) -> None:
    """A valid SHA-1 signature without the SHA-256 one is a downgrade and is refused."""
    cfg = make_cfg(scheme)
    headers, body = sha1_only(cfg)
    assert reason(cfg, headers, body) == "legacy sha1 signature refused"


@pytest.mark.parametrize("scheme", ["github", "meta"])
def test_legacy_sha1_alone_accepted_with_allow_sha1(scheme: str) -> None:
    """With allow_sha1, a request carrying only a valid SHA-1 signature verifies; a bad one not."""
    cfg = make_cfg(scheme, allow_sha1=True)
    headers, body = sha1_only(cfg)
    assert check(cfg, headers, body).secret_index == 0
    headers["X-Hub-Signature"] = "sha1=" + "0" * 40
    assert reason(cfg, headers, body) == "signature mismatch"


@pytest.mark.parametrize("allow_sha1", [False, True])
@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_sha256_header_never_falls_back_to_sha1(allow_sha1: bool, blank: str) -> None:
    """A present but blank SHA-256 header beside a valid SHA-1 one is refused, even opted in."""
    cfg = make_cfg("github", allow_sha1=allow_sha1)
    headers, body = signed(cfg)
    headers["X-Hub-Signature-256"] = blank
    assert reason(cfg, headers, body) == "missing signature header"
    lowered = {k.lower(): v for k, v in headers.items()}  # a plain mapping, other case
    assert reason(cfg, lowered, body) == "missing signature header"


def test_bad_sha256_never_falls_back_to_sha1() -> None:
    """A wrong SHA-256 signature fails even when the SHA-1 one is valid and allowed."""
    cfg = make_cfg("github", allow_sha1=True)
    headers, body = signed(cfg)
    headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    assert reason(cfg, headers, body) == "signature mismatch"


def test_meta_without_secret_fails_closed() -> None:
    """A meta source configured with only a verify_token rejects POSTs instead of trusting them."""
    cfg = VerifyConfig(scheme="meta", verify_token=Secret("vt"))
    headers = CIMultiDict({"X-Hub-Signature-256": "sha256=" + "0" * 64})
    assert reason(cfg, headers, JSON_BODY) == "no secret configured"


def test_stripe_several_v1_and_v0_ignored() -> None:
    """Stripe headers with v0 and several v1 pass when any v1 matches."""
    cfg = make_cfg("stripe")
    headers, body = signed(cfg)
    t, v1 = headers["Stripe-Signature"].split(",")
    headers["Stripe-Signature"] = f"{t},v1={'0' * 64},v0=deadbeef,{v1},v9=zz"
    assert check(cfg, headers, body).timestamp == NOW


def test_stripe_key_is_whole_whsec_string() -> None:
    """Stripe's key is the whole whsec_ string, not its base64 decoding."""
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    t = int(NOW)
    v1 = hmac.new(secret.encode(), f"{t}.".encode() + JSON_BODY, hashlib.sha256).hexdigest()
    headers = CIMultiDict({"Stripe-Signature": f"t={t},v1={v1}"})
    assert check(make_cfg("stripe", secret), headers, JSON_BODY)


def test_shopify_events_header() -> None:
    """Shopify's newer Shopify-Hmac-Sha256 header is accepted too."""
    cfg = make_cfg("shopify")
    headers, body = signed(cfg)
    headers["Shopify-Hmac-Sha256"] = headers.pop("X-Shopify-Hmac-Sha256")
    assert check(cfg, headers, body)


def test_shopify_events_headers_name_the_delivery() -> None:
    """Shopify's event subscriptions send its headers without ``X-``: their webhook id is the
    delivery id, as X-Shopify-Webhook-Id is (else the body's hash would make two deliveries of
    one body one event)."""
    scheme = SCHEMES["shopify"]
    headers = CIMultiDict({"Shopify-Webhook-Id": "w-1", "Shopify-Event-Id": "e-1"})
    assert scheme.dedup_key(headers, b"{}") == "w-1"
    assert scheme.dedup_key(CIMultiDict({"Shopify-Event-Id": "e-1"}), b"{}") == "e-1"
    classic = CIMultiDict({"X-Shopify-Webhook-Id": "x-1", "Shopify-Webhook-Id": "w-1"})
    assert scheme.dedup_key(classic, b"{}") == "x-1"


def test_standard_svix_headers() -> None:
    """Svix-branded headers verify like webhook-* ones."""
    cfg = make_cfg("standard")
    headers, body = signed(cfg)
    svix = CIMultiDict({k.replace("webhook-", "svix-"): v for k, v in headers.items()})
    assert check(cfg, svix, body).timestamp == NOW


def test_standard_unpadded_and_raw_secrets() -> None:
    """whsec_ secrets without padding and raw (non-whsec) secrets both work."""
    raw = base64.b64encode(b"sixteen byte key").decode()
    for secret in ("whsec_" + raw.rstrip("="), "plain text secret"):
        cfg = make_cfg("standard", secret)
        headers, body = signed(cfg)
        assert check(cfg, headers, body)


def test_standard_missing_id() -> None:
    """A Standard Webhooks request without webhook-id is rejected."""
    cfg = make_cfg("standard")
    headers, body = signed(cfg)
    del headers["webhook-id"]
    assert reason(cfg, headers, body) == "missing message id"


def test_standard_invalid_whsec_secret() -> None:
    """A whsec_ secret that is not base64 never verifies and cannot sign."""
    cfg = make_cfg("standard", "whsec_!!!")
    headers = CIMultiDict(
        {"webhook-id": "m", "webhook-timestamp": str(int(NOW)), "webhook-signature": "v1,AAAA"}
    )
    assert reason(cfg, headers, b"") == "signature mismatch"
    with pytest.raises(ConfigError):
        sign_standard(["whsec_!!!"], msg_id="m", timestamp=1, body=b"")


def mailgun_sig(key: str, ts: str, token: str) -> str:
    return hmac.new(key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()


def test_mailgun_json_and_parent_signature() -> None:
    """Mailgun JSON events verify by signature or, for subaccounts, by parent-signature."""
    ts, token = str(int(NOW)), "t" * 50
    body = {
        "signature": {"timestamp": ts, "token": token, "signature": mailgun_sig("k", ts, token)}
    }
    assert check(make_cfg("mailgun", "k"), {}, json.dumps(body).encode()).timestamp == NOW
    body["signature"] |= {"signature": "00" * 32, "parent-signature": mailgun_sig("p", ts, token)}
    assert check(make_cfg("mailgun", "p"), {}, json.dumps(body).encode())


def test_mailgun_integer_timestamp_in_json() -> None:
    """A JSON timestamp sent as a number is accepted as its digits."""
    sig = mailgun_sig("k", str(int(NOW)), "tok")
    body = json.dumps({"signature": {"timestamp": int(NOW), "token": "tok", "signature": sig}})
    assert check(make_cfg("mailgun", "k"), {}, body.encode())


def test_mailgun_multipart_form() -> None:
    """Mailgun's multipart/form-data route posts (attachments) verify from their form fields."""
    ts, token = str(int(NOW)), "tok123"
    parts = {
        "timestamp": ts,
        "token": token,
        "signature": mailgun_sig("k", ts, token),
        "subject": "hi",
    }
    body = (
        b"".join(
            b'--XyZ\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
            % (k.encode(), v.encode())
            for k, v in parts.items()
        )
        + b"--XyZ--\r\n"
    )
    headers = CIMultiDict({"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert check(make_cfg("mailgun", "k"), headers, body)
    assert default_dedup("mailgun", headers, body) == token


def test_mailgun_multipart_with_a_large_attachment_before_its_fields() -> None:
    """The fields after a megabytes-long attachment are found (the attachment is skipped, not
    parsed); a signature field far larger than any real one is not taken."""
    ts, token = str(int(NOW)), "tok456"
    attachment = (
        b'--XyZ\r\nContent-Disposition: form-data; name="attachment-1"; filename="a.bin"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + b"\x00--XyZ\r\n" * 300_000 + b"\r\n"
    )

    def field(name: str, value: str) -> bytes:
        return b'--XyZ\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (
            name.encode(),
            value.encode(),
        )

    signed = field("timestamp", ts) + field("signature", mailgun_sig("k", ts, token))
    headers = CIMultiDict({"Content-Type": "multipart/form-data; boundary=XyZ"})
    body = attachment + signed + field("token", token) + b"--XyZ--\r\n"
    assert check(make_cfg("mailgun", "k"), headers, body)
    huge = attachment + signed + field("token", token + " " * 2000) + b"--XyZ--\r\n"
    assert reason(make_cfg("mailgun", "k"), headers, huge) == "missing token"


def test_forms_of_too_many_fields_are_refused_before_they_are_read() -> None:
    """A Mailgun post of tens of thousands of tiny parts (or pairs), or a Twilio form of as
    many parameters, is refused by its count: read part by part it held the event loop for
    seconds before the signature was looked at. A form at the limit is read."""
    ts, token = str(int(NOW)), "tok789"
    cfg = make_cfg("mailgun", "k")
    signed_fields = {"timestamp": ts, "token": token, "signature": mailgun_sig("k", ts, token)}
    multipart = CIMultiDict({"Content-Type": "multipart/form-data; boundary=b"})

    def parts(n: int) -> bytes:
        head = b"".join(
            b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
            % (k.encode(), v.encode())
            for k, v in signed_fields.items()
        )
        tiny = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'
        return head + tiny * (n - 3) + b"--b--\r\n"

    assert check(cfg, multipart, parts(forms.MOST_FIELDS))
    assert reason(cfg, multipart, parts(50_000)) == "the form has more than 1,000 fields"
    urlencoded = "&".join(f"{k}={v}" for k, v in signed_fields.items())
    assert check(cfg, {}, (urlencoded + "&x=" * (forms.MOST_FIELDS - 3)).encode())
    flood = (urlencoded + "&x=" * 200_000).encode()
    assert reason(cfg, {}, flood) == "the form has more than 1,000 fields"
    twilio = make_cfg("twilio")
    headers, body = signed(twilio, FORM_BODY + b"&x=" * (forms.MOST_FIELDS - 3))
    assert check(twilio, headers, body, url=TWILIO_PUBLIC)
    over = body + b"&x="
    assert reason(twilio, headers, over, url=TWILIO_PUBLIC) == "the form has more than 1,000 fields"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "missing signature"),
        (b'{"signature": "nope"}', "missing signature"),
        (b"timestamp=1&signature=ab", "missing token"),
        (b"token=t&signature=ab", "missing timestamp"),
        (b"timestamp=1&token=t&signature=xyz", "malformed signature header"),
    ],
)
def test_mailgun_incomplete(body: bytes, why: str) -> None:
    """Mailgun bodies missing a signature field are rejected with a reason."""
    assert reason(make_cfg("mailgun"), {}, body, now=1.0) == why


def test_twilio_json_without_body_hash_rejected() -> None:
    """A Twilio JSON body with no bodySHA256 in the URL is refused as unsigned."""
    cfg = make_cfg("twilio")
    headers, _ = signed(cfg, b"")
    headers["Content-Type"] = "application/json"
    assert reason(cfg, headers, JSON_BODY) == "unsigned body"


def test_twilio_json_round_trip() -> None:
    """sign and verify agree on Twilio JSON bodies posted to a URL carrying bodySHA256."""
    cfg = make_cfg("twilio")
    url = f"{LOCAL_URL}?bodySHA256={hashlib.sha256(JSON_BODY).hexdigest()}"
    headers, body = signed(cfg, JSON_BODY, url=url)
    assert headers["Content-Type"] == "application/json"
    assert check(cfg, headers, body, url=url)
    with pytest.raises(ValueError, match="bodySHA256"):
        signed(cfg, JSON_BODY)


@pytest.mark.parametrize(
    ("algorithm", "encoding", "prefix"),
    [("sha1", "hex", "sha1="), ("sha256", "base64", ""), ("sha512", "hex", "")],
)
def test_hmac_generic_variants(algorithm: str, encoding: str, prefix: str) -> None:
    """The generic scheme honours algorithm, encoding and prefix."""
    cfg = make_cfg("hmac", algorithm=algorithm, encoding=encoding, prefix=prefix)
    headers, body = signed(cfg)
    raw = hmac.new(b"s3cret", body, algorithm).digest()
    assert headers["X-Sig"] == prefix + (
        raw.hex() if encoding == "hex" else base64.b64encode(raw).decode()
    )
    assert check(cfg, headers, body).timestamp is None


def test_hmac_template_braces_and_timestamp() -> None:
    """Only {timestamp} and {body} are placeholders; other braces are signed literally."""
    cfg = make_cfg("hmac", prefix="", timestamp_header="X-Ts", signed="{v1}:{timestamp}:{body}")
    ts = str(int(NOW))
    sig = hmac.new(b"s3cret", f"{{v1}}:{ts}:".encode() + JSON_BODY, hashlib.sha256).hexdigest()
    assert check(cfg, CIMultiDict({"X-Sig": sig, "X-Ts": ts}), JSON_BODY).timestamp == NOW


def test_hmac_template_needs_timestamp_header() -> None:
    """A template using {timestamp} without timestamp_header fails rather than signing nothing."""
    cfg = make_cfg("hmac", prefix="", signed="{timestamp}.{body}")
    assert reason(cfg, CIMultiDict({"X-Sig": "ab" * 32}), b"x") == "missing timestamp"


def test_token_scheme_prefix_and_mismatch() -> None:
    """The token scheme compares the header (after an optional prefix) to each secret."""
    cfg = make_cfg("token", "tok-a", "tok-b", header="Authorization", prefix="Bearer ")
    assert check(cfg, {"authorization": "Bearer tok-b"}, b"").secret_index == 1
    assert reason(cfg, {"Authorization": "Bearer tok-c"}, b"") == "token mismatch"
    assert reason(cfg, {"Authorization": "tok-a"}, b"") == "malformed signature header"


def test_verdict_as_dict_is_json_and_secret_free() -> None:
    """The verdict stored with an event serialises to JSON and holds no secret."""
    cfg = make_cfg("slack", "very-secret")
    headers, body = signed(cfg)
    stored = json.dumps(check(cfg, headers, body).as_dict())
    assert json.loads(stored) == {
        "scheme": "slack",
        "secret_index": 0,
        "timestamp": NOW,
        "received_at": NOW,
    }
    assert "very-secret" not in stored


# -- sign --------------------------------------------------------------------------------------


def test_sign_mailgun_json_and_form() -> None:
    """sign adds Mailgun's signature object to JSON, or appends the fields to a form."""
    cfg = make_cfg("mailgun")
    _, body = signed(cfg, b'{"event-data": {"id": "e1"}, "signature": {"token": "old"}}')
    assert json.loads(body)["signature"]["token"] == "dlv_1"
    # The rest of the document goes as written: escapes, spacing, numbers past a float's.
    written = b'{"event-data":{"subject":"R\\u00e9union","big":12345678901234567890.10}}'
    _, body = signed(cfg, written)
    assert body.startswith(written[:-1] + b', "signature": {"timestamp": ')
    assert check(cfg, CIMultiDict(), body)
    _, body = signed(cfg, b'{"signature": {"token": "old"}, "n": 1.10}')
    assert body.startswith(b'{"signature": {"timestamp": ') and body.endswith(b'}, "n": 1.10}')
    headers, body = signed(cfg, b"subject=hi&body-plain=x")
    assert body.startswith(b"subject=hi&body-plain=x&timestamp=")
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    _, body = signed(cfg, b"token=stale&subject=hi")
    assert body.count(b"token=") == 1 and check(cfg, CIMultiDict(), body)
    with pytest.raises(ValueError, match="mailgun"):
        signed(cfg, b"[1, 2]")


def test_sign_without_secret_is_config_error() -> None:
    """Signing for a source with no secret is a configuration error."""
    with pytest.raises(ConfigError):
        sign(
            VerifyConfig(scheme="meta", verify_token=Secret("v")),
            body=b"",
            url="",
            now=NOW,
            delivery_id="d",
        )


def test_sign_sets_delivery_ids() -> None:
    """sign puts the delivery id where each provider does, so default_dedup finds it."""
    for scheme in ("github", "shopify", "standard", "twilio", "mailgun"):
        cfg = make_cfg(scheme)
        headers, body = signed(cfg)
        assert default_dedup(scheme, headers, body) == "dlv_1", scheme


# -- default_dedup -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "headers", "body", "expected"),
    [
        ("standard", {"Webhook-Id": "msg_1"}, b"", "msg_1"),
        ("standard", {"svix-id": "msg_2"}, b"", "msg_2"),
        # Svix-signed: only the signed svix-id names it, not a webhook-id added beside it.
        ("standard", {"svix-signature": "v1,x", "svix-id": "m3", "webhook-id": "x"}, b"", "m3"),
        ("github", {"x-github-delivery": "guid"}, b"", "guid"),
        ("shopify", {"X-Shopify-Event-Id": "ev"}, b"", "ev"),
        ("shopify", {"X-Shopify-Webhook-Id": "wh", "X-Shopify-Event-Id": "ev"}, b"", "wh"),
        ("stripe", {}, b'{"id": "evt_9"}', "evt_9"),
        ("stripe", {}, b'{"id": 9}', None),
        ("stripe", {}, b"[1]", None),
        ("slack", {}, b'{"event_id": "Ev9"}', "Ev9"),
        ("slack", {}, b"payload=%7B%7D", None),
        ("mailgun", {}, b'{"signature": {"token": "tk"}}', "tk"),
        ("mailgun", {}, b"token=tf&x=1", "tf"),
        ("twilio", {"I-Twilio-Idempotency-Token": "idem"}, b"", "idem"),
        ("meta", {"X-GitHub-Delivery": "g"}, b'{"id": "x"}', None),
        ("hmac", {}, b'{"id": "x"}', None),
        ("token", {}, b"", None),
        (None, {"webhook-id": "m"}, b'{"id": "x"}', None),
        ("stripe", {}, b"\xff\xfe{", None),
        ("stripe", {}, b"[" * 100_000, None),
        ("mailgun", {"Content-Type": "multipart/form-data"}, b"\x00--", None),
        ("github", {}, b"", None),
    ],
)
def test_default_dedup(
    scheme: str | None, headers: dict[str, str], body: bytes, expected: str | None
) -> None:
    """Each provider's delivery id is found; anything else, even garbage, gives None."""
    assert default_dedup(scheme, CIMultiDict(headers), body) == expected


# -- handshakes --------------------------------------------------------------------------------

META = VerifyConfig(scheme="meta", secrets=(Secret("app"),), verify_token=Secret("vt-123"))


def meta_handshake(cfg: VerifyConfig | None, method: str = "GET", **query: str) -> Handshake | None:
    q = {k.replace("_", ".", 1): v for k, v in query.items()}
    return handshake(cfg, method=method, query=q, headers={}, body=b"", url=LOCAL_URL, now=NOW)


def test_meta_handshake_answers_challenge() -> None:
    """Meta's subscribe GET with the right verify token gets its challenge back as text."""
    got = meta_handshake(
        META, hub_mode="subscribe", hub_verify_token="vt-123", hub_challenge="1158201444"
    )
    assert got == Handshake(200, "text/plain", b"1158201444")


@pytest.mark.parametrize("token", [None, "vt-12", "vt-1234", ""])
def test_meta_handshake_wrong_token_forbidden(token: str | None) -> None:
    """A subscribe GET with a wrong or missing verify token gets 403."""
    query = {"hub_mode": "subscribe", "hub_challenge": "c"} | (
        {"hub_verify_token": token} if token is not None else {}
    )
    got = meta_handshake(META, **query)
    assert got is not None and got.status == 403 and got.body != b"c"


def test_meta_handshake_without_configured_token_forbidden() -> None:
    """With no verify_token configured, every subscribe GET is refused."""
    cfg = make_cfg("meta")
    got = meta_handshake(cfg, hub_mode="subscribe", hub_verify_token="", hub_challenge="c")
    assert got is not None and got.status == 403


def test_meta_handshake_of_another_mode_is_refused() -> None:
    """Only hub.mode=subscribe is answered with the challenge: any other mode is a 403."""
    got = meta_handshake(META, hub_mode="unsubscribe", hub_verify_token="vt-123", hub_challenge="c")
    assert got is not None and (got.status, got.body) == (
        403,
        b'{"error": "hub.mode must be subscribe"}',
    )


def test_non_handshakes_return_none() -> None:
    """Ordinary requests, other schemes and unverified sources are not handshakes; a GET at
    a Meta source is one, and without hub.mode it is refused as such (a 400, not a 405 whose
    Allow names GET)."""
    refused = meta_handshake(META)
    assert refused is not None and refused.status == 400 and b"missing hub.mode" in refused.body
    assert meta_handshake(META, "POST", hub_mode="subscribe", hub_verify_token="vt-123") is None
    assert meta_handshake(None, hub_mode="subscribe", hub_verify_token="vt-123") is None
    assert meta_handshake(make_cfg("github"), hub_mode="subscribe") is None


SLACK_CHALLENGE = (
    b'{"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",'
    b' "type": "url_verification"}'
)


def slack_handshake(
    cfg: VerifyConfig, headers: Any, body: bytes, method: str = "POST"
) -> Handshake | None:
    return handshake(
        cfg, method=method, query={}, headers=headers, body=body, url=LOCAL_URL, now=NOW
    )


def test_slack_url_verification_answers_after_verifying() -> None:
    """Slack's signed url_verification POST gets its challenge back as JSON."""
    cfg = make_cfg("slack")
    headers, body = signed(cfg, SLACK_CHALLENGE)
    got = slack_handshake(cfg, headers, body)
    assert got is not None and (got.status, got.content_type) == (200, "application/json")
    assert json.loads(got.body) == {"challenge": json.loads(SLACK_CHALLENGE)["challenge"]}


def test_slack_url_verification_unsigned_rejected() -> None:
    """An unsigned url_verification POST is a verification failure, not an answer."""
    cfg = make_cfg("slack")
    headers, _ = signed(cfg, b"{}")
    with pytest.raises(VerificationError):
        slack_handshake(cfg, headers, SLACK_CHALLENGE)


def test_slack_other_posts_are_not_handshakes() -> None:
    """Slack event callbacks and non-JSON posts are ordinary requests."""
    cfg = make_cfg("slack")
    headers, body = signed(cfg)
    assert slack_handshake(cfg, headers, body) is None
    assert slack_handshake(cfg, headers, b"type=url_verification") is None
    assert slack_handshake(cfg, headers, SLACK_CHALLENGE, method="GET") is None


# -- properties --------------------------------------------------------------------------------

KNOWN_HEADERS = sorted(
    {n for names in SIG_HEADERS.values() for n in names}
    | {
        "X-Slack-Request-Timestamp",
        "webhook-id",
        "webhook-timestamp",
        "svix-id",
        "svix-signature",
        "svix-timestamp",
        "Content-Type",
        "X-Ts",
    }
)
header_values = st.one_of(
    st.text(max_size=80),
    st.from_regex(
        r"t=[0-9]{1,12}(,v[01]=[0-9a-f]{0,64})*|sha(1|256)=[0-9a-fA-F]{0,64}"
        r"|(v1,[A-Za-z0-9+/=]{0,44} ?)+"
        r"|v0=[0-9a-f]{0,64}|[0-9]{1,20}|multipart/form-data; boundary=[a-z]{1,5}"
        r"|application/(json|x-www-form-urlencoded)",
        fullmatch=True,
    ),
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(
        st.text(max_size=10),
        st.recursive(
            st.none() | st.text() | st.integers(),
            lambda c: st.lists(c) | st.dictionaries(st.text(), c),
            max_leaves=8,
        ),
    ).map(lambda d: json.dumps(d).encode()),
    st.lists(
        st.tuples(st.sampled_from(["timestamp", "token", "signature", "x"]), st.text(max_size=20))
    ).map(lambda p: urlencode(p).encode()),
    st.builds(
        lambda v: b'--a\r\nContent-Disposition: form-data; name="token"\r\n\r\n' + v + b"\r\n--a--",
        st.binary(max_size=40),
    ),
)
FUZZ_CFGS = [make_cfg(s) for s in SCHEMES] + [
    make_cfg("hmac-ts"),
    make_cfg("hmac", encoding="base64"),
    make_cfg("twilio", url=None),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cfg=st.sampled_from(FUZZ_CFGS),
    headers=st.dictionaries(
        st.sampled_from(KNOWN_HEADERS) | st.text(max_size=12), header_values, max_size=8
    ),
    body=bodies,
    url=st.sampled_from([LOCAL_URL, TW_URI, "http://[::1", "https://h:99999/x?bodySHA256=zz"])
    | st.text(max_size=40),
    now=st.floats() | st.just(NOW),
    method=st.sampled_from(["GET", "POST"]),
)
def test_garbage_only_ever_raises_verification_error(
    cfg: VerifyConfig, headers: dict[str, str], body: bytes, url: str, now: float, method: str
) -> None:
    """Arbitrary headers, bodies, URLs and clocks end in a Verdict or a VerificationError."""
    ci = CIMultiDict(headers)
    try:
        assert isinstance(verify(cfg, headers=ci, body=body, url=url, now=now), Verdict)
    except VerificationError as exc:
        assert exc.reason and len(exc.reason) < 40
    with contextlib.suppress(VerificationError):
        handshake(cfg, method=method, query=headers, headers=ci, body=body, url=url, now=now)
    assert default_dedup(cfg.scheme, ci, body) is None or isinstance(
        default_dedup(cfg.scheme, ci, body), str
    )


@settings(max_examples=400, deadline=None)
@given(
    cfg=st.sampled_from(FUZZ_CFGS),
    drop=st.sets(st.sampled_from([*KNOWN_HEADERS, "X-Token"]), max_size=3),
    replace=st.dictionaries(
        st.sampled_from([*KNOWN_HEADERS, "X-Token"]), header_values, max_size=3
    ),
    body_edit=st.none() | st.binary(max_size=40),
    now=st.floats(allow_nan=False) | st.sampled_from([NOW, NOW + TOL, NOW - TOL - 1]),
)
def test_mutated_signed_requests_only_raise_verification_error(
    cfg: VerifyConfig,
    drop: set[str],
    replace: dict[str, str],
    body_edit: bytes | None,
    now: float,
) -> None:
    """Mutating a signed request never crashes, and an edited signed body never passes."""
    url = TW_URI if cfg.url is None else LOCAL_URL
    headers, original = signed(cfg, url=url)
    for name in drop:
        headers.popall(name, None)
    headers.update(replace)
    body = original if body_edit is None else body_edit + original[len(body_edit) :]
    try:
        verdict = verify(cfg, headers=headers, body=body, url=url, now=now)
    except VerificationError as exc:
        assert exc.reason and len(exc.reason) < 40
    else:
        assert verdict.secret_index == 0
        # Twilio signs decoded form parameters, so a re-encoded body may legitimately pass.
        assert body == original or cfg.scheme not in BODY_SIGNED or cfg.scheme == "twilio"


secrets_st = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=30
)
ids_st = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=30)
form_st = st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=6).map(
    lambda p: urlencode(p).encode()
)
json_obj_st = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5).map(
    lambda d: json.dumps(d).encode()
)
ROUND_TRIP = [*SCHEMES, "hmac-ts", "hmac-b64", "standard-whsec", "twilio-json"]


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(ROUND_TRIP),
    secret=secrets_st,
    raw_key=st.binary(min_size=1, max_size=40),
    any_body=st.binary(max_size=200),
    form=form_st,
    obj=json_obj_st,
    now=st.integers(min_value=0, max_value=2**40),
    delivery_id=ids_st,
)
def test_sign_then_verify_round_trips(
    kind: str,
    secret: str,
    raw_key: bytes,
    any_body: bytes,
    form: bytes,
    obj: bytes,
    now: int,
    delivery_id: str,
) -> None:
    """Whatever sign produces for a scheme, verify accepts with the same secret and clock."""
    assume(not secret.startswith("whsec_"))
    body, url = any_body, LOCAL_URL
    if kind == "hmac-b64":
        cfg = make_cfg("hmac", secret, encoding="base64", algorithm="sha512", prefix="")
    elif kind == "standard-whsec":
        cfg = make_cfg("standard", "whsec_" + base64.b64encode(raw_key).decode())
    elif kind == "twilio-json":
        cfg, body = make_cfg("twilio", secret), obj
        url = f"{LOCAL_URL}?a=1&bodySHA256={hashlib.sha256(obj).hexdigest()}"
    else:
        cfg = make_cfg(kind, secret)
        if kind == "mailgun":
            body = obj if now % 2 else form
        elif kind == "twilio":
            body = form
    headers, sent = sign(cfg, body=body, url=url, now=float(now), delivery_id=delivery_id)
    verdict = verify(cfg, headers=CIMultiDict(headers), body=sent, url=url, now=float(now))
    assert verdict.secret_index == 0
