"""Webhook signatures: verify each provider's scheme, answer its handshakes, sign test deliveries.

Pure functions of (config, headers, raw body, URL, ``now``): no I/O and no clock reads. Every
failure raises ``VerificationError`` with a short generic reason that never echoes a digest or a
secret. Hazard: always pass the body exactly as received; re-serialised JSON will not verify.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from webhookd.config import Secret, VerifyConfig
from webhookd.errors import ConfigError, VerificationError

# ASCII digits only: int() alone would also accept "1_000", " 12" and other scripts' digits.
_DIGITS = re.compile(r"[0-9]{1,15}")
_PLACEHOLDER = re.compile(r"(\{timestamp\}|\{body\})")
_ALGOS: dict[str, Any] = {name: getattr(hashlib, name) for name in ("sha1", "sha256", "sha512")}
_FORM = "application/x-www-form-urlencoded"
_MAILGUN_FIELDS = ("timestamp", "token", "signature", "parent-signature")
_DEDUP_HEADERS = {
    "standard": ("webhook-id", "svix-id"),
    "github": ("X-GitHub-Delivery",),
    "shopify": ("X-Shopify-Webhook-Id", "X-Shopify-Event-Id"),
    "twilio": ("I-Twilio-Idempotency-Token",),
}
_DEDUP_JSON = {"stripe": "id", "slack": "event_id"}


@dataclass(frozen=True, slots=True)
class Verdict:
    """A request that verified: which secret matched and the signed timestamp, if any."""

    scheme: str
    secret_index: int | None
    timestamp: float | None
    received_at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Handshake:
    """The answer a provider expects to a verification handshake."""

    status: int
    content_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class _Request:
    headers: Mapping[str, str]
    body: bytes
    url: str
    now: float


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """The stripped header value, or None when absent or blank (any mapping, case-insensitively)."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    if value is None or not value.strip():
        return None
    return value.strip()


def _utf8(text: str) -> bytes:
    # surrogatepass: a header holding a lone surrogate must fail verification, not raise.
    return text.encode("utf-8", "surrogatepass")


def _unhex(text: str) -> bytes | None:
    try:
        return binascii.unhexlify(text.strip())
    except ValueError:  # odd length, non-hex or non-ASCII
        return None


def _unb64(text: str) -> bytes | None:
    """Strict base64 with optional padding; None when malformed."""
    text = text.strip().rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        return None


def _digest(key: bytes, msg: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, msg, _ALGOS[algorithm]).digest()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _same(a: str, b: str) -> bool:
    """Constant-time equality that does not leak the length of either string."""
    return hmac.compare_digest(hashlib.sha256(_utf8(a)).digest(), hashlib.sha256(_utf8(b)).digest())


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _form_pairs(body: bytes) -> list[tuple[str, str]] | None:
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except ValueError:
        return None


def _timestamp(text: str | None) -> int:
    if text is None:
        raise VerificationError("missing timestamp")
    if not _DIGITS.fullmatch(text):
        raise VerificationError("malformed timestamp")
    return int(text)


def _check_window(ts: int, now: float, tolerance_s: float, *, future: bool = True) -> None:
    age = now - ts
    # Written as "not (inside)" so that a NaN anywhere fails closed; the edge itself is valid.
    if not (age <= tolerance_s and (not future or -age <= tolerance_s)):
        raise VerificationError("timestamp outside tolerance")


def _standard_keys(text: str) -> list[bytes]:
    """HMAC keys for a Standard Webhooks secret: ``whsec_`` + base64, else base64 or raw UTF-8."""
    if text.startswith("whsec_"):
        key = _unb64(text[len("whsec_") :])
        return [key] if key else []
    decoded = _unb64(text)
    # The official libraries base64-decode an unprefixed secret; people also paste raw strings.
    return [decoded, _utf8(text)] if decoded else [_utf8(text)]


def _match(
    cfg: VerifyConfig,
    received: Iterable[bytes | None],
    msgs: Sequence[bytes],
    *,
    algorithm: str = "sha256",
    keys_of: Callable[[Secret], Iterable[bytes]] | None = None,
) -> int:
    """The index of the first configured secret whose HMAC of any of ``msgs`` is in ``received``."""
    candidates = [r for r in received if r is not None]
    if not candidates:
        raise VerificationError("malformed signature header")
    if not cfg.secrets:
        raise VerificationError("no secret configured")
    if algorithm not in _ALGOS:
        raise VerificationError("unsupported algorithm")
    for index, secret in enumerate(cfg.secrets):
        for key in keys_of(secret) if keys_of else (_utf8(secret.reveal()),):
            for msg in msgs:
                digest = _digest(key, msg, algorithm)
                if any(hmac.compare_digest(digest, r) for r in candidates):
                    return index
    raise VerificationError("signature mismatch")


def _required(headers: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = _header(headers, name)
        if value is not None:
            return value
    raise VerificationError("missing signature header")


Result = tuple[int, float | None]


def _present(headers: Mapping[str, str], name: str) -> bool:
    """Whether the header was sent at all, even blank (any mapping, case-insensitively)."""
    lowered = name.lower()
    return name in headers or any(k.lower() == lowered for k in headers)


def _verify_hub(cfg: VerifyConfig, r: _Request) -> Result:
    """GitHub and Meta: ``sha256=<hex>``; the legacy ``sha1=<hex>`` only if opted in and alone.

    Both providers send the SHA-256 header with every delivery, so a request carrying only the
    SHA-1 one is a downgrade (SHA-1 is the weaker MAC, and the header is easy to strip) unless
    the operator knows an old sender (``allow_sha1``). A SHA-256 header that is present but
    blank is never a legacy sender: someone emptied it, and SHA-1 is not tried even then.
    """
    value, algorithm = _header(r.headers, "X-Hub-Signature-256"), "sha256"
    if value is None and not _present(r.headers, "X-Hub-Signature-256"):
        value, algorithm = _header(r.headers, "X-Hub-Signature"), "sha1"
        if value is not None and not cfg.allow_sha1:
            raise VerificationError("legacy sha1 signature refused")
    if value is None:
        raise VerificationError("missing signature header")
    scheme, sep, sig = value.partition("=")
    if not sep or scheme != algorithm:
        raise VerificationError("malformed signature header")
    return _match(cfg, [_unhex(sig)], [r.body], algorithm=algorithm), None


def _verify_stripe(cfg: VerifyConfig, r: _Request) -> Result:
    t_text: str | None = None
    sigs: list[bytes | None] = []
    for item in _required(r.headers, "Stripe-Signature").split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and t_text is None:
            t_text = value.strip()
        elif key == "v1":  # v0 and unknown schemes are ignored, as Stripe's libraries do
            sigs.append(_unhex(value))
    if not sigs:
        raise VerificationError("malformed signature header")
    ts = _timestamp(t_text)
    index = _match(cfg, sigs, [_utf8(f"{t_text}.") + r.body])
    _check_window(ts, r.now, cfg.tolerance_s, future=False)
    return index, float(ts)


def _verify_shopify(cfg: VerifyConfig, r: _Request) -> Result:
    sig = _required(r.headers, "X-Shopify-Hmac-Sha256", "Shopify-Hmac-Sha256")
    return _match(cfg, [_unb64(sig)], [r.body]), None


def _verify_slack(cfg: VerifyConfig, r: _Request) -> Result:
    sig = _required(r.headers, "X-Slack-Signature")
    t_text = _header(r.headers, "X-Slack-Request-Timestamp")
    ts = _timestamp(t_text)
    if not sig.startswith("v0="):
        raise VerificationError("malformed signature header")
    index = _match(cfg, [_unhex(sig[3:])], [_utf8(f"v0:{t_text}:") + r.body])
    _check_window(ts, r.now, cfg.tolerance_s)
    return index, float(ts)


def _verify_standard(cfg: VerifyConfig, r: _Request) -> Result:
    family = "webhook" if _header(r.headers, "webhook-signature") is not None else "svix"
    sig = _required(r.headers, f"{family}-signature")
    msg_id = _header(r.headers, f"{family}-id")
    if msg_id is None:
        raise VerificationError("missing message id")
    t_text = _header(r.headers, f"{family}-timestamp")
    ts = _timestamp(t_text)
    received = []
    for item in sig.split():
        version, sep, value = item.partition(",")
        if sep and version == "v1":  # other versions (v1a, v2) are skipped, not failed
            received.append(_unb64(value))
    index = _match(
        cfg,
        received,
        [_utf8(f"{msg_id}.{t_text}.") + r.body],
        keys_of=lambda s: _standard_keys(s.reveal()),
    )
    _check_window(ts, r.now, cfg.tolerance_s)
    return index, float(ts)


def _multipart_fields(content_type: str, body: bytes) -> dict[str, str]:
    head = b"Content-Type: " + _utf8(content_type) + b"\r\n\r\n"
    msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head + body)
    fields: dict[str, str] = {}
    if not msg.is_multipart():
        return fields
    for part in msg.get_payload():
        if not isinstance(part, email.message.Message):
            continue
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, tuple):
            name = email.utils.collapse_rfc2231_value(name)
        if name in _MAILGUN_FIELDS and name not in fields:
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                fields[name] = payload.decode("utf-8", "replace")
    return fields


def _mailgun_fields(headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    """Mailgun's signature fields from a JSON ``signature`` object, a form or a multipart form."""
    content_type = _header(headers, "Content-Type") or ""
    if content_type.lower().startswith("multipart/form-data"):
        return _multipart_fields(content_type, body)
    doc = _json(body)
    if isinstance(doc, dict):
        sig = doc.get("signature")
        if not isinstance(sig, dict):
            return {}
        return {
            k: str(v)
            for k, v in sig.items()
            if k in _MAILGUN_FIELDS and isinstance(v, str | int) and not isinstance(v, bool)
        }
    fields: dict[str, str] = {}
    for key, value in _form_pairs(body) or ():
        if key in _MAILGUN_FIELDS:
            fields.setdefault(key, value)
    return fields


def _verify_mailgun(cfg: VerifyConfig, r: _Request) -> Result:
    fields = _mailgun_fields(r.headers, r.body)
    if "signature" not in fields and "parent-signature" not in fields:
        raise VerificationError("missing signature")
    ts = _timestamp(fields.get("timestamp"))
    token = fields.get("token")
    if not token:
        raise VerificationError("missing token")
    # A subaccount's event also carries the primary account's signature: either key may match.
    received = [_unhex(fields[k]) for k in ("signature", "parent-signature") if k in fields]
    index = _match(cfg, received, [_utf8(f"{ts}{token}")])
    _check_window(ts, r.now, cfg.tolerance_s)
    return index, float(ts)


def _twilio_url(cfg: VerifyConfig, url: str) -> str:
    """The URL Twilio signed: the configured public URL plus the query string as received."""
    url = url.partition("#")[0]
    if not cfg.url:
        return url
    query = url.partition("?")[2]
    base = cfg.url.partition("#")[0].partition("?")[0]
    return f"{base}?{query}" if query else base


def _twilio_variants(url: str) -> list[str]:
    """``url`` as given, without its port and with the default port, as Twilio's SDKs try."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a bracketed host that is not IPv6, or a port out of range
        return [url]
    host = parts.netloc.rpartition(":")[0] if port is not None else parts.netloc
    variants = [url, parts._replace(netloc=host).geturl()]
    default = {"https": 443, "http": 80}.get(parts.scheme)
    if port is None and default:
        variants.append(parts._replace(netloc=f"{host}:{default}").geturl())
    return variants


def _twilio_params(pairs: Iterable[tuple[str, str]]) -> str:
    """The POST parameters as Twilio signs them: by name, each name's distinct values sorted.

    As twilio-python's ``RequestValidator.compute_signature`` (``sorted(set(values))`` per
    sorted name) and twilio-node's ``toFormUrlEncodedParam`` (``new Set(values)``, sorted) do:
    a name repeated with the same value counts once.
    """
    return "".join(k + v for k, v in sorted(set(pairs)))


def _body_hash_param(url: str) -> str | None:
    query = url.partition("#")[0].partition("?")[2]
    return next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == "bodySHA256"), None)


def _verify_twilio(cfg: VerifyConfig, r: _Request) -> Result:
    received = _unb64(_required(r.headers, "X-Twilio-Signature"))
    url = _twilio_url(cfg, r.url)
    body_hash = _body_hash_param(url)
    if body_hash is not None:
        params = ""  # JSON bodies: only the URL is signed, and it carries the body's hash
    else:
        content_type = (_header(r.headers, "Content-Type") or _FORM).lower()
        if r.body and not content_type.startswith(_FORM):
            raise VerificationError("unsigned body")  # no bodySHA256: the body would be unchecked
        pairs = _form_pairs(r.body)
        if pairs is None:
            raise VerificationError("malformed body")
        params = _twilio_params(pairs)
    msgs = [_utf8(u + params) for u in _twilio_variants(url)]
    index = _match(cfg, [received], msgs, algorithm="sha1")
    if body_hash is not None:
        actual = hashlib.sha256(r.body).hexdigest().encode()
        if not hmac.compare_digest(actual, _utf8(body_hash.lower())):
            raise VerificationError("body hash mismatch")
    return index, None


def _render(template: str, body: bytes, ts: str | None) -> bytes:
    """The generic scheme's signed string; only ``{timestamp}`` and ``{body}`` are special."""
    pieces = _PLACEHOLDER.split(template)
    if ts is None and "{timestamp}" in pieces:
        raise VerificationError("missing timestamp")
    return b"".join(
        body if p == "{body}" else _utf8((ts or "") if p == "{timestamp}" else p) for p in pieces
    )


def _unprefixed(cfg: VerifyConfig, r: _Request) -> str:
    value = _required(r.headers, cfg.header or "")
    if not value.startswith(cfg.prefix):
        raise VerificationError("malformed signature header")
    return value[len(cfg.prefix) :]


def _verify_hmac(cfg: VerifyConfig, r: _Request) -> Result:
    sig = _unprefixed(cfg, r)
    received = _unhex(sig) if cfg.encoding == "hex" else _unb64(sig)
    ts: int | None = None
    t_text = _header(r.headers, cfg.timestamp_header) if cfg.timestamp_header else None
    if cfg.timestamp_header:
        ts = _timestamp(t_text)
    signed = _render(cfg.signed or "{body}", r.body, t_text)
    index = _match(cfg, [received], [signed], algorithm=cfg.algorithm)
    if ts is not None:
        _check_window(ts, r.now, cfg.tolerance_s)
    return index, None if ts is None else float(ts)


def _verify_token(cfg: VerifyConfig, r: _Request) -> Result:
    token = _unprefixed(cfg, r)
    if not cfg.secrets:
        raise VerificationError("no secret configured")
    for index, secret in enumerate(cfg.secrets):
        if _same(token, secret.reveal()):
            return index, None
    raise VerificationError("token mismatch")


_VERIFIERS: dict[str, Callable[[VerifyConfig, _Request], Result]] = {
    "github": _verify_hub,
    "meta": _verify_hub,
    "stripe": _verify_stripe,
    "shopify": _verify_shopify,
    "slack": _verify_slack,
    "standard": _verify_standard,
    "mailgun": _verify_mailgun,
    "twilio": _verify_twilio,
    "hmac": _verify_hmac,
    "token": _verify_token,
}


def verify(
    cfg: VerifyConfig, *, headers: Mapping[str, str], body: bytes, url: str, now: float
) -> Verdict:
    """Check a request against ``cfg``; raise ``VerificationError`` on any failure."""
    verifier = _VERIFIERS.get(cfg.scheme)
    if verifier is None:
        raise VerificationError("unknown scheme")
    try:
        index, ts = verifier(cfg, _Request(headers, body, url, now))
    except (ValueError, RecursionError) as exc:  # last line of defence against hostile input
        raise VerificationError("malformed request") from exc
    return Verdict(cfg.scheme, index, ts, now)


def handshake(
    cfg: VerifyConfig | None,
    *,
    method: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    url: str,
    now: float,
) -> Handshake | None:
    """The provider's expected answer if this request is a verification handshake, else None."""
    if cfg is None:
        return None
    if cfg.scheme == "meta" and method.upper() == "GET" and query.get("hub.mode") == "subscribe":
        token = query.get("hub.verify_token")
        if cfg.verify_token is None or token is None or not _same(token, cfg.verify_token.reveal()):
            return Handshake(403, "text/plain", b"verify token mismatch")
        return Handshake(200, "text/plain", _utf8(query.get("hub.challenge") or ""))
    if cfg.scheme == "slack" and method.upper() == "POST" and b"url_verification" in body:
        doc = _json(body)
        if isinstance(doc, dict) and doc.get("type") == "url_verification":
            verify(cfg, headers=headers, body=body, url=url, now=now)
            answer = json.dumps({"challenge": doc.get("challenge")}).encode()
            return Handshake(200, "application/json", answer)
    return None


def default_dedup(scheme: str | None, headers: Mapping[str, str], body: bytes) -> str | None:
    """The provider's delivery id for this request, or None to fall back to the body's hash."""
    for name in _DEDUP_HEADERS.get(scheme or "", ()):
        if value := _header(headers, name):
            return value
    try:
        if scheme == "mailgun":
            return _mailgun_fields(headers, body).get("token") or None
        doc = _json(body) if scheme in _DEDUP_JSON else None
        value = doc.get(_DEDUP_JSON[scheme or ""]) if isinstance(doc, dict) else None
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, str) and value else None


def sign_standard(secrets: Sequence[str], *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value: ``v1,<base64>`` per secret."""
    sigs = []
    for index, secret in enumerate(secrets):
        keys = _standard_keys(secret)  # the last one: whsec_ decoded, or else the raw UTF-8
        if not keys:
            raise ConfigError(f"secrets[{index}]", "is not valid whsec_ base64")
        sigs.append("v1," + _b64(_digest(keys[-1], _utf8(f"{msg_id}.{timestamp}.") + body)))
    return " ".join(sigs)


def _sign_mailgun(key: bytes, body: bytes, ts: str, token: str) -> tuple[bytes, str]:
    fields = {"timestamp": ts, "token": token, "signature": _digest(key, _utf8(ts + token)).hex()}
    doc = _json(body)
    if isinstance(doc, dict):
        doc["signature"] = fields
        return json.dumps(doc).encode(), "application/json"
    pairs = _form_pairs(body) if doc is None else None
    if pairs is None:
        raise ValueError("mailgun: the body must be a JSON object or a urlencoded form")
    if any(k in fields for k, _ in pairs):
        body = urlencode([(k, v) for k, v in pairs if k not in fields]).encode()
    return body + (b"&" if body else b"") + urlencode(fields).encode(), _FORM


def _sign_twilio(cfg: VerifyConfig, key: bytes, body: bytes, url: str) -> tuple[str, str]:
    url = _twilio_url(cfg, url)
    body_hash = _body_hash_param(url)
    if body_hash is not None or _json(body) is not None:
        if body_hash != hashlib.sha256(body).hexdigest():
            raise ValueError(
                "twilio: post a JSON body to a URL whose query carries "
                "bodySHA256=<sha256 hex of the body>, as Twilio does"
            )
        return _b64(_digest(key, _utf8(url), "sha1")), "application/json"
    pairs = _form_pairs(body)
    if pairs is None:
        raise ValueError("twilio: the body must be a urlencoded form or JSON")
    return _b64(_digest(key, _utf8(url + _twilio_params(pairs)), "sha1")), _FORM


def sign(
    cfg: VerifyConfig, *, body: bytes, url: str, now: float, delivery_id: str
) -> tuple[dict[str, str], bytes]:
    """Headers (and body) as ``cfg.scheme``'s provider would send them, signed with secret 0.

    Twilio: a JSON body must be posted to a URL whose query already carries ``bodySHA256``
    (the body's SHA-256 hex), as Twilio itself does; ``sign`` raises ``ValueError`` otherwise.
    """
    if not cfg.secrets:
        raise ConfigError("verify.secret", f"is required to sign for scheme {cfg.scheme!r}")
    secret = cfg.secrets[0].reveal()
    key, ts, scheme = _utf8(secret), str(int(now)), cfg.scheme
    content_type = (
        "application/json"
        if _json(body) is not None
        else (_FORM if scheme in ("mailgun", "twilio", "slack") else "application/octet-stream")
    )
    headers: dict[str, str] = {}
    if scheme in ("github", "meta"):
        headers["X-Hub-Signature-256"] = "sha256=" + _digest(key, body).hex()
        headers["X-Hub-Signature"] = "sha1=" + _digest(key, body, "sha1").hex()
        if scheme == "github":
            headers["X-GitHub-Delivery"] = delivery_id
    elif scheme == "stripe":
        headers["Stripe-Signature"] = f"t={ts},v1={_digest(key, f'{ts}.'.encode() + body).hex()}"
    elif scheme == "shopify":
        headers["X-Shopify-Hmac-Sha256"] = _b64(_digest(key, body))
        headers["X-Shopify-Webhook-Id"] = delivery_id
    elif scheme == "slack":
        headers["X-Slack-Request-Timestamp"] = ts
        headers["X-Slack-Signature"] = "v0=" + _digest(key, f"v0:{ts}:".encode() + body).hex()
    elif scheme == "standard":
        headers["webhook-id"] = delivery_id
        headers["webhook-timestamp"] = ts
        headers["webhook-signature"] = sign_standard(
            [secret], msg_id=delivery_id, timestamp=int(ts), body=body
        )
    elif scheme == "mailgun":
        body, content_type = _sign_mailgun(key, body, ts, delivery_id)
    elif scheme == "twilio":
        headers["X-Twilio-Signature"], content_type = _sign_twilio(cfg, key, body, url)
        headers["I-Twilio-Idempotency-Token"] = delivery_id
    elif scheme in ("hmac", "token"):
        if not cfg.header:
            raise ConfigError("verify.header", f"is required for scheme {scheme!r}")
        if scheme == "token":
            headers[cfg.header] = cfg.prefix + secret
        else:
            if cfg.timestamp_header:
                headers[cfg.timestamp_header] = ts
            raw = _digest(key, _render(cfg.signed or "{body}", body, ts), cfg.algorithm)
            headers[cfg.header] = cfg.prefix + (raw.hex() if cfg.encoding == "hex" else _b64(raw))
    else:
        raise ConfigError("verify.scheme", f"unknown scheme {scheme!r}")
    headers["Content-Type"] = content_type
    return headers, body
