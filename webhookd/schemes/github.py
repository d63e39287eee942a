"""GitHub: ``X-Hub-Signature-256`` (HMAC-SHA256 of the raw body), no timestamp, and the delivery
id in ``X-GitHub-Delivery``."""

from __future__ import annotations

from collections.abc import Mapping

from webhookd.schemes.base import (
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    check_hub,
    content_type,
    hub_headers,
)


class GitHub(Scheme):
    name = "github"
    legacy_sha1 = True
    untimed_always = True
    dedup_headers = ("X-GitHub-Delivery",)
    dedup_json = None

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        return check_hub(cfg, headers, body), None

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        headers = hub_headers(secret, body)
        headers["X-GitHub-Delivery"] = delivery_id
        # GitHub names the event of every delivery; its first to a new hook is a ping.
        headers["X-GitHub-Event"] = "ping"
        return headers, body, content_type(body)
