"""The ``forward`` action: deliver the event's raw body to the user's service over HTTP, signed.

How answers map to outcomes, and the headers every request carries, are in ``delivery``.
"""

from __future__ import annotations

import time

import aiohttp

from webhookd.actions.base import Outcome, Resources, check_options
from webhookd.actions.delivery import (
    check_headers,
    check_url,
    deliver,
    signed_headers,
    signing_secrets,
)
from webhookd.config import ActionConfig
from webhookd.errors import ConfigError
from webhookd.models import Event, Job

_METHODS = ("POST", "PUT", "PATCH")
_OPTIONS = ("url", "method", "headers", "secret", "secrets")


def validate(config: ActionConfig) -> None:
    check_options(config, _OPTIONS)
    check_url(config.options.get("url"), f"{config.key}.url")
    method = config.options.get("method", "POST")
    if method not in _METHODS:
        raise ConfigError(f"{config.key}.method", f"must be one of {', '.join(_METHODS)}")
    check_headers(config.options.get("headers", {}), f"{config.key}.headers")
    signing_secrets(config.options, config.key)


class ForwardAction:
    def __init__(self, config: ActionConfig, http: aiohttp.ClientSession) -> None:
        validate(config)
        self.config = config
        self.http = http
        self.url: str = config.options["url"]
        self.method: str = config.options.get("method", "POST")
        self.extra_headers = check_headers(config.options.get("headers", {}), "")
        self.secrets = [s.reveal() for s in signing_secrets(config.options, config.key)]

    def headers_for(self, event: Event, now: float) -> dict[str, str]:
        return signed_headers(
            self.secrets,
            msg_id=event.id,
            body=event.body,
            content_type=event.content_type,
            now=now,
            extra=self.extra_headers,
        )

    async def run(self, event: Event, job: Job) -> Outcome:
        return await deliver(
            self.http, self.method, self.url, event.body, self.headers_for(event, time.time())
        )

    async def aclose(self) -> None:
        return None


def create(config: ActionConfig, resources: Resources) -> ForwardAction:
    return ForwardAction(config, resources.http)
