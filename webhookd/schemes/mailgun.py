"""Mailgun: ``signature`` = HMAC-SHA256 of ``timestamp + token``, carried in the body itself (a
JSON ``signature`` object, a form or a multipart form).

The signature covers no byte of the body, so its token is spent once: it is a dedup key of
every event, whatever the source's ``dedup``. The delivery id is the event's ``event-data.id``
where the body has one (a retry signed again still finds its first delivery), else the token.
Mailgun retries for 8 hours, possibly with the first delivery's signature, so the default
``tolerance_s`` covers that: a webhook first answered 503 is still taken when it comes back."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from urllib.parse import urlencode

from webhookd import forms
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


# A signature field's most bytes: a timestamp, a 50-character token, 64 hex digits. A larger
# part (or urlencoded value, as sent) of that name is not decoded.
_FIELD_BYTES = 1024


def _multipart_fields(content_type: str, body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in forms.parts(content_type, body, forms.MOST_FIELDS):
        name = part.name
        if name in _FIELDS and name not in fields and part.size <= _FIELD_BYTES:
            fields[name] = part.decoded().decode("utf-8", "replace")
    return fields


def signature_fields(headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    """Mailgun's signature fields from a JSON ``signature`` object, a form or a multipart form
    (``forms.TooManyFields`` past ``forms.MOST_FIELDS`` of them)."""
    content_type = header(headers, "Content-Type") or ""
    if forms.media_type(content_type) == forms.MULTIPART:
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
    # Its fields are ASCII, so a form's other fields need not be UTF-8 (a latin-1 subject).
    text = body.decode("utf-8", "replace")
    for key, value in forms.pairs_named(text, _FIELDS, forms.MOST_FIELDS, _FIELD_BYTES):
        fields.setdefault(key, value)
    return fields


_SPACE = re.compile(r"[ \t\n\r]*")


def _skip(text: str, at: int) -> int:
    """Past JSON's white space from ``at``."""
    found = _SPACE.match(text, at)
    assert found is not None  # it matches the empty string
    return found.end()


_DECODER = json.JSONDecoder()


def with_member(text: str, name: str, value: object) -> str:
    """``text``, a JSON object, with its top-level member ``name`` set to ``value``: each of its
    members of that name given the new value, or one added at its end; every other character
    as it was (numbers past a float's precision, ``\\u`` escapes, spacing). ``ValueError`` when
    ``text`` is not a JSON object."""
    new = json.dumps(value)
    at = _skip(text, 0)
    if text[at : at + 1] != "{":
        raise ValueError("not a JSON object")
    at = _skip(text, at + 1)
    values: list[tuple[int, int]] = []  # where each member called name has its value
    last, members = at, 0  # where a new member would go: after the last value, or in {}
    while text[at : at + 1] != "}":
        if text[at : at + 1] != '"':
            raise ValueError("a member's name is no string")
        key, at = json.decoder.scanstring(text, at + 1)  # type: ignore[attr-defined]
        at = _skip(text, at)
        if text[at : at + 1] != ":":
            raise ValueError("no ':' after a member's name")
        start = _skip(text, at + 1)
        _, at = _DECODER.raw_decode(text, start)
        if key == name:
            values.append((start, at))
        last, members = at, members + 1
        at = _skip(text, at)
        if text[at : at + 1] == ",":
            at = _skip(text, at + 1)
        elif text[at : at + 1] != "}":
            raise ValueError("no ',' or '}' after a member")
    if text[at + 1 :].strip(" \t\n\r"):
        raise ValueError("more after the object")
    if not values:
        member = f"{json.dumps(name)}: {new}"
        return text[:last] + (f", {member}" if members else member) + text[last:]
    for start, end in reversed(values):
        text = text[:start] + new + text[end:]
    return text


def _event_id(body: bytes) -> str | None:
    doc = parse_json(body)
    data = doc.get("event-data") if isinstance(doc, dict) else None
    value = data.get("id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


class Mailgun(Scheme):
    name = "mailgun"
    option_keys = frozenset({"tolerance_s"})
    legacy_sha1 = False
    untimed_always = False
    dedup_headers = ()  # event-data.id, else the token in the signature fields: see dedup_key
    dedup_json = None
    default_tolerance_s = 9 * 3_600.0  # its retries: 5, 10 and 15 minutes, 1, 2 and 4 hours
    body_unsigned = True

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        try:
            fields = signature_fields(headers, body)
        except forms.TooManyFields as exc:
            raise VerificationError(str(exc)) from None
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
            return _event_id(body) or signature_fields(headers, body).get("token") or None
        except (ValueError, RecursionError):
            return None

    def replay_key(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str
    ) -> str:
        """The token (a request that verified has one): what the signature covers besides
        the timestamp, spent by its first event. It is also the key events had before
        event-data.id was the delivery id, so a retry across an upgrade is still a duplicate."""
        return signature_fields(headers, body)["token"]

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        mac = digest(utf8(secret), utf8(ts + delivery_id)).hex()
        fields = {"timestamp": ts, "token": delivery_id, "signature": mac}
        doc = parse_json(body)
        if isinstance(doc, dict):
            try:  # signed in place: the rest of the document arrives as it was written
                signed = with_member(body.decode("utf-8"), "signature", fields).encode()
            except ValueError:  # not UTF-8 (JSON in UTF-16, say): written anew
                doc["signature"] = fields
                signed = json.dumps(doc).encode()
            return {}, signed, "application/json"
        pairs = form_pairs(body) if doc is None else None
        if pairs is None:
            raise ValueError("mailgun: the body must be a JSON object or a urlencoded form")
        if any(k in fields for k, _ in pairs):
            body = urlencode([(k, v) for k, v in pairs if k not in fields]).encode()
        return {}, body + (b"&" if body else b"") + urlencode(fields).encode(), FORM
