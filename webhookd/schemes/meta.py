"""Meta (WhatsApp, Instagram, Messenger): GitHub's ``X-Hub-Signature-256`` over the raw body, and
the ``hub.challenge`` GET handshake answered when ``hub.verify_token`` matches."""

from __future__ import annotations

import json
from collections.abc import Mapping

from webhookd.errors import ConfigError
from webhookd.schemes.base import (
    Handshake,
    Options,
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    check_hub,
    content_type,
    hub_headers,
    same,
    utf8,
)


def _refused(status: int, reason: str) -> Handshake:
    """A refused handshake, with the JSON error body every other refusal has."""
    return Handshake(status, "application/json", json.dumps({"error": reason}).encode())


class Meta(Scheme):
    name = "meta"
    option_keys = frozenset({"verify_token"})
    legacy_sha1 = True
    untimed_always = True
    dedup_headers = ()
    dedup_json = None
    handshake_methods = frozenset({"GET"})

    def check_config(self, cfg: VerifyConfig, table: Options) -> None:
        # A source may be set up for the handshake (verify_token) before the app secret is known.
        if not cfg.secrets and cfg.verify_token is None:
            raise ConfigError(table.path("secret"), "is required for scheme 'meta'")

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
        if method.upper() != "GET":
            return None
        mode = query.get("hub.mode")
        if mode is None:  # a GET, which this path takes for the handshake alone
            return _refused(400, "missing hub.mode: a GET here is Meta's verification request")
        token = query.get("hub.verify_token")
        if cfg.verify_token is None or token is None or not same(token, cfg.verify_token.reveal()):
            return _refused(403, "verify token mismatch")
        if mode != "subscribe":
            return _refused(403, "hub.mode must be subscribe")
        challenge = query.get("hub.challenge")
        if not challenge:
            return _refused(400, "missing hub.challenge")
        return Handshake(200, "text/plain", utf8(challenge))

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        return check_hub(cfg, headers, body), None

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        return hub_headers(secret, body), body, content_type(body)
