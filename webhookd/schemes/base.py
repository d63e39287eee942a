"""What every signature scheme shares: the ``Scheme`` base class, ``VerifyConfig``, the verdicts
and the constant-time helpers the schemes are built from.

Pure functions of (config, headers, raw body, URL, ``now``): no I/O and no clock reads. Every
failure raises ``VerificationError`` with a short generic reason that never echoes a digest or a
secret. Hazard: always pass the body exactly as received; re-serialised JSON will not verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, Protocol

from webhookd import forms
from webhookd.errors import ConfigError, VerificationError
from webhookd.forms import URLENCODED
from webhookd.models import sha256_key
from webhookd.secret import Secret

# ASCII digits only: int() alone would also accept "1_000", " 12" and other scripts' digits.
_DIGITS = re.compile(r"[0-9]{1,15}")
ALGORITHMS: dict[str, Any] = {name: getattr(hashlib, name) for name in ("sha1", "sha256", "sha512")}
FORM = URLENCODED  # what form-posting providers send
SAMPLE_MESSAGE = "test webhook from webhookd send"

Result = tuple[int, float | None]  # the matching secret's index, the signed timestamp if any
Signed = tuple[dict[str, str], bytes, str]  # headers, the body as sent, its content type


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """How a source's requests are verified: the ``verify`` table, read by ``config``."""

    scheme: str
    secrets: tuple[Secret, ...] = ()
    tolerance_s: float = 300.0
    url: str | None = None
    verify_token: Secret | None = None
    header: str | None = None
    algorithm: str = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    timestamp_header: str | None = None
    signed: str | None = None  # generic hmac: the signed string, e.g. "{timestamp}.{body}"
    allow_sha1: bool = False  # github/meta: accept the legacy SHA-1 header when it comes alone
    dedup_body: bool = True  # untimed schemes: the signed body is a dedup key too


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


class Options(Protocol):
    """The ``verify`` table as config reads it: which keys were written, and their dotted names."""

    def has(self, name: str) -> bool: ...

    def path(self, name: str) -> str: ...


# The verify keys some schemes read and others do not (``Scheme.option_keys``).
OPTION_KEYS = (
    "tolerance_s",
    "url",
    "verify_token",
    "header",
    "algorithm",
    "encoding",
    "prefix",
    "timestamp_header",
    "signed",
)


class Scheme(ABC):
    """One provider's signature scheme: everything webhookd knows about it, in one place.

    The receiver asks it to answer handshakes, to verify and to name a delivery's dedup key;
    ``webhookd send`` asks it to sign as the provider does; the config loader asks it to check
    its options. A subclass sets ``name`` and its capabilities and implements ``check`` and
    ``signature``; the other methods have defaults that fit most providers.
    """

    # What every scheme must declare (no defaults, so that none is forgotten):
    name: ClassVar[str]
    # The provider also sends a legacy SHA-1 header, so the ``allow_sha1`` option applies.
    legacy_sha1: ClassVar[bool]
    # No timestamp is ever signed: a captured request verifies forever (``dedup_body`` applies).
    untimed_always: ClassVar[bool]
    # Where the provider puts its delivery id: headers, tried in order, else a top-level JSON key
    # (both empty: it sends none, and dedup falls back to the body's hash).
    dedup_headers: ClassVar[tuple[str, ...]]
    dedup_json: ClassVar[str | None]
    # The verify key that adds a signed timestamp to an otherwise untimed scheme (hmac's).
    untimed_unless: ClassVar[str | None] = None
    # The verify keys it reads besides the secret(s) and the checked-elsewhere allow_sha1 and
    # dedup_body (of OPTION_KEYS): any other given is refused, not silently ignored.
    option_keys: ClassVar[frozenset[str]] = frozenset()
    # Verify keys required besides the secret, each with an example value (for docs and tests).
    required_keys: ClassVar[Mapping[str, str]] = {}
    # How far a signed timestamp may be from the clock when ``tolerance_s`` is not given.
    default_tolerance_s: ClassVar[float] = 300.0
    # The signature covers no byte of the body (Mailgun's covers a timestamp and a token): what
    # it does cover (``replay_key``) is a dedup key whatever ``dedup`` says, so one signature
    # brings in one event, never a second body.
    body_unsigned: ClassVar[bool] = False
    # Methods besides POST that the provider's handshake comes with (Meta's GET): the receiver
    # takes them at the source's path and lists them in a 405's Allow; any other is refused
    # before ``handshake`` is asked.
    handshake_methods: ClassVar[frozenset[str]] = frozenset()

    # -- config -----------------------------------------------------------------------------

    def check_config(self, cfg: VerifyConfig, table: Options) -> None:
        """Raise ``ConfigError`` naming the key when ``cfg`` cannot verify this provider."""
        if not cfg.secrets:
            raise ConfigError(table.path("secret"), f"is required for scheme {self.name!r}")

    def untimed(self, cfg: VerifyConfig) -> bool:
        """No timestamp is signed, so only dedup stands between a captured request and a replay."""
        return self.untimed_always

    def keeps_signed_key(self, cfg: VerifyConfig) -> bool:
        """What was signed (``replay_key``) is each event's second dedup key: the signature
        covers no body (``body_unsigned``), or no timestamp and ``dedup_body`` is on. A delivery
        found a duplicate by that key keeps no key of its own."""
        return self.body_unsigned or (cfg.dedup_body and self.untimed(cfg))

    def secret_warnings(self, cfg: VerifyConfig) -> list[str]:
        """What ``check`` warns of in the secrets: one that is valid but unlike the provider's
        (key first, never a value)."""
        return []

    def credential_header(self, cfg: VerifyConfig) -> str | None:
        """A request header whose value is the shared secret itself, so it is stored masked."""
        return None

    # -- receiving --------------------------------------------------------------------------

    def handshake(
        self,
        cfg: VerifyConfig,
        *,
        method: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
        url: str,
        now: float,
    ) -> Handshake | None:
        """The provider's expected answer if this request is a verification handshake, else None."""
        return None

    def verify(
        self, cfg: VerifyConfig, *, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Verdict:
        """Check a request against ``cfg``; raise ``VerificationError`` on any failure."""
        try:
            index, ts = self.check(cfg, headers, body, url, now)
        except (ValueError, RecursionError) as exc:  # last line of defence against hostile input
            raise VerificationError("malformed request") from exc
        return Verdict(self.name, index, ts, now)

    @abstractmethod
    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        """``verify`` without the wrapping: raise ``VerificationError``, or say what matched."""

    def dedup_key(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """The provider's delivery id for this request, or None to fall back to the body's hash."""
        for name in self.dedup_headers:
            if value := header(headers, name):
                return value
        if self.dedup_json is None:
            return None
        doc = parse_json(body)
        value = doc.get(self.dedup_json) if isinstance(doc, dict) else None
        return value if isinstance(value, str) and value else None

    def replay_key(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str
    ) -> str:
        """For a scheme that signs no timestamp, or no body: a key for what the signature
        covers, so the same signed content re-sent under a fresh delivery id is a duplicate.
        Most such schemes sign the body byte for byte, so it is the body's hash."""
        return sha256_key(body)

    # -- sending (``webhookd send``) ------------------------------------------------------------

    def default_body(self, delivery_id: str) -> bytes:
        """A small test payload carrying ``delivery_id`` where this scheme's dedup looks for it."""
        return sample_json(delivery_id)

    def delivery_url(self, url: str, body: bytes) -> str:
        """The URL the provider would post ``body`` to (Twilio adds the body's hash)."""
        return url

    def sign(
        self,
        cfg: VerifyConfig,
        *,
        body: bytes,
        url: str,
        now: float,
        delivery_id: str,
        key: str = "verify",
    ) -> tuple[dict[str, str], bytes]:
        """Headers (and body) as the provider would send them, signed with the first secret;
        ``key``, the verify table's dotted key, is what an error names."""
        if not cfg.secrets:  # Meta's: a source set up for the handshake alone has none
            raise ConfigError(f"{key}.secret", f"is required to sign for scheme {cfg.scheme!r}")
        secret = cfg.secrets[0].reveal()
        headers, body, content_type = self.signature(
            cfg, secret, body=body, url=url, ts=str(int(now)), delivery_id=delivery_id
        )
        headers["Content-Type"] = content_type
        return headers, body

    @abstractmethod
    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        """The provider's headers, the body as it sends it and its content type, for ``sign``."""


def sample_json(delivery_id: str) -> bytes:
    """The default test payload: JSON, deterministic in ``delivery_id``, which it carries.

    Deterministic so that sending the same id twice is a duplicate even where the dedup key is
    the body's hash; ``id`` and ``event_id`` are where Stripe's and Slack's dedup look.
    """
    doc = {"id": delivery_id, "event_id": delivery_id, "type": "webhookd.test"}
    return json.dumps({**doc, "data": {"message": SAMPLE_MESSAGE}}).encode()


def content_type(body: bytes, *, form: bool = False) -> str:
    """JSON when the body parses as JSON, else a form (for form-posting providers) or bytes."""
    if parse_json(body) is not None:
        return "application/json"
    return FORM if form else "application/octet-stream"


# -- request parsing ---------------------------------------------------------------------------


def header(headers: Mapping[str, str], name: str) -> str | None:
    """The stripped header value, or None when absent or blank (any mapping, case-insensitively)."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    if value is None or not value.strip():
        return None
    return value.strip()


def present(headers: Mapping[str, str], name: str) -> bool:
    """Whether the header was sent at all, even blank (any mapping, case-insensitively)."""
    lowered = name.lower()
    return name in headers or any(k.lower() == lowered for k in headers)


def required_header(headers: Mapping[str, str], *names: str) -> str:
    """The first of ``names`` that was sent non-blank; else ``missing signature header``."""
    for name in names:
        value = header(headers, name)
        if value is not None:
            return value
    raise VerificationError("missing signature header")


def prefixed_value(cfg: VerifyConfig, headers: Mapping[str, str]) -> str:
    """The configured ``header``'s value after the configured ``prefix`` (hmac and token)."""
    value = required_header(headers, cfg.header or "")
    if not value.startswith(cfg.prefix):
        raise VerificationError("malformed signature header")
    return value[len(cfg.prefix) :]


def utf8(text: str) -> bytes:
    # surrogatepass: a header holding a lone surrogate must fail verification, not raise.
    return text.encode("utf-8", "surrogatepass")


def unhex(text: str) -> bytes | None:
    try:
        return binascii.unhexlify(text.strip())
    except ValueError:  # odd length, non-hex or non-ASCII
        return None


def unb64(text: str) -> bytes | None:
    """Strict base64 with optional padding; None when malformed."""
    text = text.strip().rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        return None


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def form_pairs(body: bytes) -> list[tuple[str, str]] | None:
    """A signed form's pairs, or None if it is no UTF-8 form; ``forms.TooManyFields`` past
    ``forms.MOST_FIELDS`` of them."""
    try:
        text = body.decode("utf-8")
    except ValueError:
        return None
    try:
        return forms.pairs(text, forms.MOST_FIELDS, errors="strict")
    except forms.TooManyFields:
        raise
    except ValueError:
        return None


def parse_timestamp(text: str | None) -> int:
    if text is None:
        raise VerificationError("missing timestamp")
    if not _DIGITS.fullmatch(text):
        raise VerificationError("malformed timestamp")
    return int(text)


def check_window(ts: int, now: float, tolerance_s: float, *, future: bool = True) -> None:
    """Refuse a timestamp more than ``tolerance_s`` old (or ahead, unless ``future=False``).

    Timestamps are whole seconds, so the age is counted in the clock's whole seconds as the
    Standard Webhooks libraries count it: one exactly ``tolerance_s`` old is valid for the
    whole of that second, not only at its first instant."""
    age = now // 1 - ts
    # Written as "not (inside)" so that a NaN anywhere fails closed; the edge itself is valid.
    if not (age <= tolerance_s and (not future or -age <= tolerance_s)):
        # The log says by how much, and which way: a sender's clock off, or this server's
        # (every provider "off" by the same amount).
        off = "decades" if abs(age) > 10**9 else f"{abs(age):.0f} s"
        raise VerificationError(
            "timestamp outside tolerance",
            f"the timestamp is {off} {'behind' if age > 0 else 'ahead of'} this server's clock"
            f" (tolerance {tolerance_s:g} s)",
        )


# -- MACs, in constant time --------------------------------------------------------------------


def digest(key: bytes, msg: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, msg, ALGORITHMS[algorithm]).digest()


def same(a: str, b: str) -> bool:
    """Constant-time equality that does not leak the length of either string."""
    return hmac.compare_digest(hashlib.sha256(utf8(a)).digest(), hashlib.sha256(utf8(b)).digest())


def match(
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
    if algorithm not in ALGORITHMS:
        raise VerificationError("unsupported algorithm")
    for index, secret in enumerate(cfg.secrets):
        for key in keys_of(secret) if keys_of else (utf8(secret.reveal()),):
            for msg in msgs:
                mac = digest(key, msg, algorithm)
                if any(hmac.compare_digest(mac, r) for r in candidates):
                    return index
    raise VerificationError("signature mismatch")


# -- the X-Hub-Signature family (GitHub and Meta) ----------------------------------------------


def check_hub(cfg: VerifyConfig, headers: Mapping[str, str], body: bytes) -> int:
    """``sha256=<hex>``; the legacy ``sha1=<hex>`` only if opted in and alone.

    Both providers send the SHA-256 header with every delivery, so a request carrying only the
    SHA-1 one is a downgrade (SHA-1 is the weaker MAC, and the header is easy to strip) unless
    the operator knows an old sender (``allow_sha1``). A SHA-256 header that is present but
    blank is never a legacy sender: someone emptied it, and SHA-1 is not tried even then.
    """
    value, algorithm = header(headers, "X-Hub-Signature-256"), "sha256"
    if value is None and not present(headers, "X-Hub-Signature-256"):
        value, algorithm = header(headers, "X-Hub-Signature"), "sha1"
        if value is not None and not cfg.allow_sha1:
            raise VerificationError("legacy sha1 signature refused")
    if value is None:
        raise VerificationError("missing signature header")
    scheme, sep, sig = value.partition("=")
    if not sep or scheme != algorithm:
        raise VerificationError("malformed signature header")
    return match(cfg, [unhex(sig)], [body], algorithm=algorithm)


def hub_headers(secret: str, body: bytes) -> dict[str, str]:
    """Both signature headers, as GitHub and Meta send them."""
    key = utf8(secret)
    return {
        "X-Hub-Signature-256": "sha256=" + digest(key, body).hex(),
        "X-Hub-Signature": "sha1=" + digest(key, body, "sha1").hex(),
    }
