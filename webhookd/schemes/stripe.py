"""Stripe: ``Stripe-Signature: t=<unix>,v1=<hex>`` over ``"<t>.<body>"``; the event id is ``id``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from webhookd.errors import VerificationError
from webhookd.schemes.base import (
    SAMPLE_MESSAGE,
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    check_window,
    content_type,
    digest,
    match,
    parse_timestamp,
    required_header,
    unhex,
    utf8,
)


class Stripe(Scheme):
    name = "stripe"
    option_keys = frozenset({"tolerance_s"})
    legacy_sha1 = False
    untimed_always = False
    dedup_headers = ()
    dedup_json = "id"

    def secret_warnings(self, cfg: VerifyConfig) -> list[str]:
        """An endpoint's signing secret starts ``whsec_``; the account's API keys (``sk_``,
        ``rk_``, ``pk_``) sit beside it in the dashboard and are pasted instead. Only such a
        prefix is shown, never more of the value."""
        said = []
        for secret in cfg.secrets:
            if secret.missing or (value := secret.reveal()).startswith("whsec_"):
                continue
            where = secret.key + (f" ({secret.reference})" if secret.reference else "")
            kind = value[:3]
            if kind in ("sk_", "rk_", "pk_"):
                said.append(
                    f"{where}: starts with {kind}: it looks like an API key, not the endpoint's"
                    " signing secret (whsec_...): Stripe's webhooks will not verify"
                )
            else:
                said.append(
                    f"{where}: does not start with whsec_ as an endpoint's signing secret does:"
                    " Stripe's webhooks may not verify"
                )
        return said

    def default_body(self, delivery_id: str) -> bytes:
        """An event as Stripe shapes one (``object``, ``type``, ``data.object``), so a handler
        that checks for that shape takes ``webhookd send``'s test as an event it ignores."""
        doc = {"id": delivery_id, "object": "event", "type": "webhookd.test"}
        return json.dumps({**doc, "data": {"object": {"message": SAMPLE_MESSAGE}}}).encode()

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        t_text: str | None = None
        sigs: list[bytes | None] = []
        for item in required_header(headers, "Stripe-Signature").split(","):
            key, _, value = item.strip().partition("=")
            if key == "t" and t_text is None:
                t_text = value.strip()
            elif key == "v1":  # v0 and unknown schemes are ignored, as Stripe's libraries do
                sigs.append(unhex(value))
        if not sigs:
            raise VerificationError("malformed signature header")
        ts = parse_timestamp(t_text)
        index = match(cfg, sigs, [utf8(f"{t_text}.") + body])
        # As Stripe's libraries do: only a timestamp older than the tolerance is refused.
        check_window(ts, now, cfg.tolerance_s, future=False)
        return index, float(ts)

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        mac = digest(utf8(secret), f"{ts}.".encode() + body).hex()
        return {"Stripe-Signature": f"t={ts},v1={mac}"}, body, content_type(body)
