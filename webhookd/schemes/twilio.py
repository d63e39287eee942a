"""Twilio: ``X-Twilio-Signature`` = base64 HMAC-SHA1 of the public URL plus the sorted POST
parameters (or, for a JSON body, of the URL whose ``bodySHA256`` query holds the body's hash).
Signed with a shared key instead of the auth token, the request names its HMAC in
``X-Twilio-Webhooks-Signature-Settings`` (``key=<id>,algorithm=HMAC_SHA256``), as Twilio's SDKs
read it."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from typing import ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from webhookd import forms
from webhookd.errors import ConfigError, VerificationError
from webhookd.models import sha256_key
from webhookd.schemes.base import (
    FORM,
    SAMPLE_MESSAGE,
    Options,
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    b64,
    digest,
    form_pairs,
    header,
    match,
    parse_json,
    required_header,
    unb64,
    utf8,
)


def _signed_url(cfg: VerifyConfig, url: str) -> str:
    """The URL Twilio signed: the configured public URL plus the query string as received."""
    url = url.partition("#")[0]
    if not cfg.url:
        return url
    query = url.partition("?")[2]
    base = cfg.url.partition("#")[0].partition("?")[0]
    return f"{base}?{query}" if query else base


def _variants(url: str) -> list[str]:
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


def _params(pairs: Iterable[tuple[str, str]]) -> str:
    """The POST parameters as Twilio signs them: by name, each name's distinct values sorted.

    As twilio-python's ``RequestValidator.compute_signature`` (``sorted(set(values))`` per
    sorted name) and twilio-node's ``toFormUrlEncodedParam`` (``new Set(values)``, sorted) do:
    a name repeated with the same value counts once.
    """
    return "".join(k + v for k, v in sorted(set(pairs)))


SETTINGS_HEADER = "X-Twilio-Webhooks-Signature-Settings"
_ALGORITHMS = {"HMAC_SHA1": "sha1", "HMAC_SHA256": "sha256"}


def _algorithm(headers: Mapping[str, str]) -> str:
    """The HMAC the request was signed with: the settings header's ``algorithm=``, else SHA-1
    (the auth token's signature, and what a settings header without ``algorithm=`` means)."""
    for part in (header(headers, SETTINGS_HEADER) or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip().lower() == "algorithm" and value.strip():
            algorithm = _ALGORITHMS.get(value.strip().upper())
            if algorithm is None:
                raise VerificationError(f"unsupported algorithm in {SETTINGS_HEADER}")
            return algorithm
    return "sha1"


def _body_hash_param(url: str) -> str | None:
    query = url.partition("#")[0].partition("?")[2]
    return next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == "bodySHA256"), None)


class Twilio(Scheme):
    name = "twilio"
    option_keys = frozenset({"url"})
    legacy_sha1 = False
    untimed_always = True
    dedup_headers = ("I-Twilio-Idempotency-Token",)
    dedup_json = None
    required_keys: ClassVar[Mapping[str, str]] = {"url": "https://hooks.example.com/hooks/twilio"}

    def check_config(self, cfg: VerifyConfig, table: Options) -> None:
        super().check_config(cfg, table)
        # Behind a proxy the URL the daemon sees is not the one Twilio signed.
        if not cfg.url:
            raise ConfigError(table.path("url"), "is required for scheme 'twilio' (the public URL)")
        try:
            parts = urlsplit(cfg.url)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            # Twilio signs the whole URL, scheme included: without one no signature matches.
            raise ConfigError(
                table.path("url"), f"{cfg.url!r} is not the full http(s) URL Twilio calls"
            )

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        received = unb64(required_header(headers, "X-Twilio-Signature"))
        algorithm = _algorithm(headers)
        url = _signed_url(cfg, url)
        body_hash = _body_hash_param(url)
        if body_hash is not None:
            params = ""  # JSON bodies: only the URL is signed, and it carries the body's hash
        else:
            content_type = (header(headers, "Content-Type") or FORM).lower()
            if body and not content_type.startswith(FORM):
                raise VerificationError("unsigned body")  # no bodySHA256: the body is unchecked
            try:
                pairs = form_pairs(body)
            except forms.TooManyFields as exc:
                raise VerificationError(str(exc)) from None
            if pairs is None:
                raise VerificationError("malformed body")
            params = _params(pairs)
        msgs = [utf8(u + params) for u in _variants(url)]
        index = match(cfg, [received], msgs, algorithm=algorithm)
        if body_hash is not None:
            actual = hashlib.sha256(body).hexdigest().encode()
            if not hmac.compare_digest(actual, utf8(body_hash.lower())):
                raise VerificationError("body hash mismatch")
        return index, None

    def replay_key(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str
    ) -> str:
        """A form's signature covers its decoded parameters, sorted, not its bytes: the same
        parameters encoded another way (reordered, ``%20`` for ``+``, a name repeated with the
        same value, a stray ``&``) verify too, so the key is the hash of what was signed. A
        JSON body is signed byte for byte, through its hash in the URL."""
        signed_url = _signed_url(cfg, url)
        pairs = form_pairs(body) if _body_hash_param(signed_url) is None else None
        if pairs is None:
            return super().replay_key(cfg, headers, body, url)
        return "signed:" + sha256_key(utf8(signed_url + _params(pairs)))

    def default_body(self, delivery_id: str) -> bytes:
        """A form post, as Twilio's webhooks are by default."""
        fields = {"MessageSid": delivery_id, "From": "+15005550006", "Body": SAMPLE_MESSAGE}
        return urlencode(fields).encode()

    def delivery_url(self, url: str, body: bytes) -> str:
        """Twilio signs a JSON body through its SHA-256 in the URL's ``bodySHA256`` query."""
        if "bodySHA256=" in url:
            return url
        try:
            json.loads(body)
        except (ValueError, RecursionError):
            return url  # a form: its parameters are signed themselves
        base, _, fragment = url.partition("#")
        query = urlencode({"bodySHA256": hashlib.sha256(body).hexdigest()})
        return base + ("&" if "?" in base else "?") + query + ("#" + fragment if fragment else "")

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        """A JSON body must go to a URL whose query carries ``bodySHA256`` (``delivery_url``)."""
        key, url = utf8(secret), _signed_url(cfg, url)
        body_hash = _body_hash_param(url)
        if body_hash is not None or parse_json(body) is not None:
            if body_hash != hashlib.sha256(body).hexdigest():
                raise ValueError(
                    "twilio: post a JSON body to a URL whose query carries "
                    "bodySHA256=<sha256 hex of the body>, as Twilio does"
                )
            sig, content_type = b64(digest(key, utf8(url), "sha1")), "application/json"
        else:
            pairs = form_pairs(body)
            if pairs is None:
                raise ValueError("twilio: the body must be a urlencoded form or JSON")
            sig, content_type = b64(digest(key, utf8(url + _params(pairs)), "sha1")), FORM
        headers = {"X-Twilio-Signature": sig, "I-Twilio-Idempotency-Token": delivery_id}
        return headers, body, content_type
