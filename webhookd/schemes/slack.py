"""Slack: ``X-Slack-Signature: v0=<hex>`` over ``"v0:<timestamp>:<body>"``, the signed
``url_verification`` handshake, and the event id in ``event_id``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from webhookd.errors import VerificationError
from webhookd.schemes.base import (
    Handshake,
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    check_window,
    content_type,
    digest,
    header,
    match,
    parse_json,
    parse_timestamp,
    required_header,
    unhex,
    utf8,
)


class Slack(Scheme):
    name = "slack"
    option_keys = frozenset({"tolerance_s"})
    legacy_sha1 = False
    untimed_always = False
    dedup_headers = ()
    dedup_json = "event_id"

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
        # The substring test first: most requests are events, and parsing them here is waste.
        if method.upper() != "POST" or b"url_verification" not in body:
            return None
        doc = parse_json(body)
        if not isinstance(doc, dict) or doc.get("type") != "url_verification":
            return None
        self.verify(cfg, headers=headers, body=body, url=url, now=now)  # Slack signs it too
        answer = json.dumps({"challenge": doc.get("challenge")}).encode()
        return Handshake(200, "application/json", answer)

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        sig = required_header(headers, "X-Slack-Signature")
        t_text = header(headers, "X-Slack-Request-Timestamp")
        ts = parse_timestamp(t_text)
        if not sig.startswith("v0="):
            raise VerificationError("malformed signature header")
        index = match(cfg, [unhex(sig[3:])], [utf8(f"v0:{t_text}:") + body])
        check_window(ts, now, cfg.tolerance_s)
        return index, float(ts)

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        headers = {
            "X-Slack-Request-Timestamp": ts,
            "X-Slack-Signature": "v0=" + digest(utf8(secret), f"v0:{ts}:".encode() + body).hex(),
        }
        return headers, body, content_type(body, form=True)  # slash commands post forms
