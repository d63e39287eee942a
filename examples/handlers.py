"""Example Python handlers for webhookd (see stripe-python.toml).

A handler receives a ``webhookd.Event``: ``.id``, ``.source``, ``.headers``, ``.header(name)``,
``.body`` (raw bytes), ``.json()``, ``.form()``, ``.tenant``. It may be ``async def`` (awaited)
or a plain function (run in a thread).
"""

from __future__ import annotations

import logging
from typing import Any

import webhookd

log = logging.getLogger("handlers")

HANDLED = ("invoice.paid", "invoice.payment_failed", "customer.subscription.deleted")


async def on_stripe_event(event: webhookd.Event) -> dict[str, Any]:
    try:
        doc = event.json()
    except ValueError:  # not JSON: no retry will make it so
        doc = None
    if not isinstance(doc, dict) or doc.get("object") != "event" or not doc.get("type"):
        raise webhookd.Reject("not a Stripe event")  # dead-letter it: retrying will not help
    kind = doc["type"]
    obj = doc.get("data", {}).get("object", {})
    if kind not in HANDLED:
        return {"ignored": kind}
    customer = obj.get("customer")
    if kind == "invoice.payment_failed":
        # Your code here: e-mail the customer, flag the account ... If a service you need is
        # down, raise webhookd.Retry("billing db unavailable", after_s=60) instead.
        log.warning("payment failed for customer %s (invoice %s)", customer, obj.get("id"))
    return {"handled": kind, "customer": customer, "stripe_event": doc.get("id")}
