"""Shopify: ``X-Shopify-Hmac-Sha256`` (base64 HMAC-SHA256 of the raw body), no timestamp, and the
delivery id in ``X-Shopify-Webhook-Id``. Shopify's event subscriptions send the same headers
without their ``X-`` (``Shopify-Hmac-Sha256``, ``Shopify-Webhook-Id``…)."""

from __future__ import annotations

from collections.abc import Mapping

from webhookd.schemes.base import (
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    b64,
    content_type,
    digest,
    match,
    required_header,
    unb64,
    utf8,
)

# The Admin API version ``webhookd send`` says its test delivery was made under.
API_VERSION = "2025-10"


class Shopify(Scheme):
    name = "shopify"
    legacy_sha1 = False
    untimed_always = True
    dedup_headers = (
        "X-Shopify-Webhook-Id",
        "X-Shopify-Event-Id",
        "Shopify-Webhook-Id",
        "Shopify-Event-Id",
    )
    dedup_json = None

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        sig = required_header(headers, "X-Shopify-Hmac-Sha256", "Shopify-Hmac-Sha256")
        return match(cfg, [unb64(sig)], [body]), None

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        headers = {
            "X-Shopify-Hmac-Sha256": b64(digest(utf8(secret), body)),
            "X-Shopify-Webhook-Id": delivery_id,
            # Shopify says what and whose with every delivery: a test order of a test shop.
            "X-Shopify-Topic": "orders/create",
            "X-Shopify-Shop-Domain": "example.myshopify.com",
            # Shopify's own libraries refuse a delivery without it.
            "X-Shopify-API-Version": API_VERSION,
        }
        return headers, body, content_type(body)
