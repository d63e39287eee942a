"""The ``forward`` action: deliver the event's raw body to the user's service over HTTP, signed.

How answers map to outcomes, and the headers every request carries, are in ``delivery``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import aiohttp

from webhookd.actions.base import Outcome, Resources, options
from webhookd.actions.delivery import (
    deliver,
    read_headers,
    read_signing_secrets,
    read_url,
    signed_headers,
)
from webhookd.config import ActionConfig, ActionDefaults, RetryPolicy
from webhookd.models import Event, Job

# A downstream service can be down for hours (a deploy, an outage): the attempts, up to 6 h
# apart, span about half a day.
DEFAULTS = ActionDefaults(
    retry=RetryPolicy(max_attempts=10, base_s=10.0, factor=3.0, cap_s=6 * 3600.0)
)
_OPTIONS = ("url", "method", "headers", "secret", "secrets")


@dataclass(frozen=True, slots=True)
class _Settings:
    url: str
    headers: Mapping[str, str]
    secrets: tuple[str, ...]
    method: Literal["POST", "PUT", "PATCH"] = "POST"


def _settings(config: ActionConfig) -> _Settings:
    t = options(config, _OPTIONS)
    url = read_url(t, "url")
    headers = read_headers(t)
    secrets = tuple(s.reveal() for s in read_signing_secrets(t))
    return t.read(_Settings(url, headers, secrets), only=("method",))


def validate(config: ActionConfig) -> None:
    _settings(config)


class ForwardAction:
    def __init__(self, config: ActionConfig, http: aiohttp.ClientSession) -> None:
        self.config = config
        self.http = http
        self.settings = _settings(config)

    def headers_for(self, event: Event, now: float) -> dict[str, str]:
        return signed_headers(
            self.settings.secrets,
            msg_id=event.id,
            body=event.body,
            content_type=event.content_type,
            now=now,
            extra=self.settings.headers,
        )

    async def run(self, event: Event, job: Job) -> Outcome:
        return await deliver(
            self.http,
            self.settings.method,
            self.settings.url,
            event.body,
            self.headers_for(event, time.time()),
        )

    async def aclose(self) -> None:
        return None


def create(config: ActionConfig, resources: Resources) -> ForwardAction:
    return ForwardAction(config, resources.http)
