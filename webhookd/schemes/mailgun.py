"""Mailgun: ``signature`` = HMAC-SHA256 of ``timestamp + token``, carried in the body itself (a
JSON ``signature`` object, a form or a multipart form); the ``token`` is the delivery id."""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import email.utils
import json
from collections.abc import Mapping
from urllib.parse import urlencode

from webhookd.errors import VerificationError
from webhookd.schemes.base import (
    FORM,
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    check_window,
    digest,
    form_pairs,
    header,
    match,
    parse_json,
    parse_timestamp,
    unhex,
    utf8,
)

_FIELDS = ("timestamp", "token", "signature", "parent-signature")


def _multipart_fields(content_type: str, body: bytes) -> dict[str, str]:
    head = b"Content-Type: " + utf8(content_type) + b"\r\n\r\n"
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
        if name in _FIELDS and name not in fields:
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                fields[name] = payload.decode("utf-8", "replace")
    return fields


def signature_fields(headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    """Mailgun's signature fields from a JSON ``signature`` object, a form or a multipart form."""
    content_type = header(headers, "Content-Type") or ""
    if content_type.lower().startswith("multipart/form-data"):
        return _multipart_fields(content_type, body)
    doc = parse_json(body)
    if isinstance(doc, dict):
        sig = doc.get("signature")
        if not isinstance(sig, dict):
            return {}
        return {
            k: str(v)
            for k, v in sig.items()
            if k in _FIELDS and isinstance(v, str | int) and not isinstance(v, bool)
        }
    fields: dict[str, str] = {}
    for key, value in form_pairs(body) or ():
        if key in _FIELDS:
            fields.setdefault(key, value)
    return fields


class Mailgun(Scheme):
    name = "mailgun"
    option_keys = frozenset({"tolerance_s"})
    legacy_sha1 = False
    untimed_always = False
    dedup_headers = ()  # the token in the signature fields: see dedup_key
    dedup_json = None

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        fields = signature_fields(headers, body)
        if "signature" not in fields and "parent-signature" not in fields:
            raise VerificationError("missing signature")
        ts = parse_timestamp(fields.get("timestamp"))
        token = fields.get("token")
        if not token:
            raise VerificationError("missing token")
        # A subaccount's event also carries the primary account's signature: either key may match.
        received = [unhex(fields[k]) for k in ("signature", "parent-signature") if k in fields]
        index = match(cfg, received, [utf8(f"{ts}{token}")])
        check_window(ts, now, cfg.tolerance_s)
        return index, float(ts)

    def dedup_key(self, headers: Mapping[str, str], body: bytes) -> str | None:
        try:
            return signature_fields(headers, body).get("token") or None
        except (ValueError, RecursionError):
            return None

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        mac = digest(utf8(secret), utf8(ts + delivery_id)).hex()
        fields = {"timestamp": ts, "token": delivery_id, "signature": mac}
        doc = parse_json(body)
        if isinstance(doc, dict):
            doc["signature"] = fields
            return {}, json.dumps(doc).encode(), "application/json"
        pairs = form_pairs(body) if doc is None else None
        if pairs is None:
            raise ValueError("mailgun: the body must be a JSON object or a urlencoded form")
        if any(k in fields for k, _ in pairs):
            body = urlencode([(k, v) for k, v in pairs if k not in fields]).encode()
        return {}, body + (b"&" if body else b"") + urlencode(fields).encode(), FORM
