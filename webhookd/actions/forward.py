"""The ``forward`` action: deliver the event's raw body to the user's service over HTTP, signed.

Outcomes: 2xx is done; 408, 425, 429, 5xx, timeouts and connection errors are retried (with the
response's ``Retry-After`` as a lower bound); 410 Gone and other 4xx are permanent.
Every request carries the event id as ``webhook-id`` and ``Idempotency-Key`` so the receiver
can drop the duplicates that at-least-once delivery allows.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from webhookd.actions.base import Outcome, Resources, check_options
from webhookd.config import ActionConfig, Secret, resolve_secret
from webhookd.errors import ConfigError
from webhookd.models import Event, Job

_RETRYABLE_4XX = frozenset({408, 425, 429})
_RESPONSE_HEAD_BYTES = 1024
_METHODS = ("POST", "PUT", "PATCH")
_OPTIONS = ("url", "method", "headers", "secret", "secrets")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now, 0.0)


def _secrets(config: ActionConfig) -> tuple[Secret, ...]:
    opts = config.options
    if "secret" in opts and "secrets" in opts:
        raise ConfigError(f"{config.key}.secrets", "give either secret or secrets, not both")
    if "secret" in opts:
        return (resolve_secret(opts["secret"], f"{config.key}.secret"),)
    items = opts.get("secrets", [])
    if not isinstance(items, list):
        raise ConfigError(f"{config.key}.secrets", "must be an array")
    return tuple(resolve_secret(v, f"{config.key}.secrets[{i}]") for i, v in enumerate(items))


def validate(config: ActionConfig) -> None:
    check_options(config, _OPTIONS)
    url = config.options.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{config.key}.url", "is required (the URL to deliver to)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{config.key}.url", f"{url!r} is not an http(s) URL")
    method = config.options.get("method", "POST")
    if method not in _METHODS:
        raise ConfigError(f"{config.key}.method", f"must be one of {', '.join(_METHODS)}")
    headers = config.options.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{config.key}.headers", "must be a table of strings")
    for secret in _secrets(config):
        if not secret.reveal().startswith("whsec_"):
            raise ConfigError(
                f"{config.key}.secret", "must be a Standard Webhooks secret (whsec_…)"
            )


class ForwardAction:
    def __init__(self, config: ActionConfig, http: aiohttp.ClientSession) -> None:
        validate(config)
        self.config = config
        self.http = http
        self.url: str = config.options["url"]
        self.method: str = config.options.get("method", "POST")
        self.extra_headers: dict[str, str] = dict(config.options.get("headers", {}))
        self.secrets = [s.reveal() for s in _secrets(config)]

    def headers_for(self, event: Event, now: float) -> dict[str, str]:
        headers = {
            "Content-Type": event.content_type,
            "User-Agent": "webhookd",
            "webhook-id": event.id,
            "Idempotency-Key": event.id,
            **self.extra_headers,
        }
        if self.secrets:
            from webhookd.signatures import sign_standard

            timestamp = int(now)
            headers["webhook-timestamp"] = str(timestamp)
            headers["webhook-signature"] = sign_standard(
                self.secrets, msg_id=event.id, timestamp=timestamp, body=event.body
            )
        return headers

    async def run(self, event: Event, job: Job) -> Outcome:
        return await deliver(
            self.http, self.method, self.url, event.body, self.headers_for(event, time.time())
        )

    async def aclose(self) -> None:
        return None


async def deliver(
    http: aiohttp.ClientSession, method: str, url: str, body: bytes, headers: Mapping[str, str]
) -> Outcome:
    """Send one request and classify the answer (shared with ``then = { forward = … }``)."""
    started = time.monotonic()
    try:
        async with http.request(
            method, url, data=body, headers=dict(headers), allow_redirects=False
        ) as response:
            head = await response.content.read(_RESPONSE_HEAD_BYTES)
            status = response.status
            retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
    except (aiohttp.ClientError, OSError) as exc:
        return Outcome.retry(
            f"connection failed: {type(exc).__name__}: {exc}",
            duration_s=round(time.monotonic() - started, 4),
        )
    detail: dict[str, Any] = {
        "status": status,
        "duration_s": round(time.monotonic() - started, 4),
        "response": head.decode("utf-8", "replace"),
    }
    if 200 <= status < 300:
        return Outcome.done({"status": status}, **detail)
    if status == 410:
        return Outcome.dead(f"{url} answered 410 Gone: the endpoint is retired", **detail)
    if status >= 500 or status in _RETRYABLE_4XX:
        return Outcome.retry(f"{url} answered {status}", after_s=retry_after, **detail)
    return Outcome.dead(f"{url} answered {status}", **detail)


def create(config: ActionConfig, resources: Resources) -> ForwardAction:
    return ForwardAction(config, resources.http)
