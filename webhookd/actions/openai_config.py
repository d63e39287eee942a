"""The ``openai`` action's options, checked as ``check`` and a reload read them, and ``then``:
where an answer goes next. Nothing here imports the ``openai`` package (its home is
``webhookd.actions.openai``): the settings say what the action asks, the action asks it."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from webhookd.actions.base import Outcome, options, rendered
from webhookd.actions.delivery import deliver, signed_headers
from webhookd.actions.targets import (
    check_url,
    no_template,
    read_headers,
    read_proxy,
    read_signing_secrets,
    read_tls,
    read_url,
)
from webhookd.config.checks import header_value
from webhookd.config.reading import DEFAULT_OPENAI_API_KEY, no_reference, resolve_secret
from webhookd.config.sections import ActionConfig, LaneConfig
from webhookd.config.table import Table
from webhookd.errors import ConfigError
from webhookd.models import Event
from webhookd.redact import Masker
from webhookd.templates import NoPayload, Template, compile_template, payload_of, to_json

OPTIONS = (
    "api_key",
    "base_url",
    "model",
    "system",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "lane",
    "max_lane_wait_s",
    "then",
    "tls",
    "proxy",
)
OPENAI_BASE_URL = "https://api.openai.com/v1"  # the package's own, without base_url
_TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")  # exactly one, sent under its own name
THEN_OPTIONS = ("forward", "secret", "secrets", "headers", "tls", "proxy")
_DEFAULT_LANE_WAIT_S = 10.0
# Half a UTF-16 pair, which JSON may escape ("\\ud83d") but no UTF-8 can carry.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class Settings:
    """The action's options, checked (every ``ConfigError`` names its dotted key)."""

    def __init__(self, config: ActionConfig) -> None:
        t = options(config, OPTIONS)
        # The openai package's own default: the key most deployments already have set.
        self.api_key = resolve_secret(t.raw("api_key", DEFAULT_OPENAI_API_KEY), t.path("api_key"))
        key = header_value(self.api_key.reveal(), t.path("api_key"))  # sent as a Bearer token
        # The client refuses such a header at every call ("Connection error.", or an encoding
        # error): said here instead, at check and reload, the key named and never shown.
        if key != key.strip(" \t"):
            raise ConfigError(
                t.path("api_key"),
                "begins or ends with a space or a tab, which no Bearer token has (a stray one"
                " where it is written, in its variable or in its file?)",
            )
        if not (key.isascii() and key.isprintable()):
            raise ConfigError(
                t.path("api_key"), "holds a character that is not printable ASCII, as no key does"
            )
        self.base_url: str | None = None
        if t.has("base_url"):
            no_template(t.string("base_url"), t.path("base_url"))
            self.base_url = check_url(t.string("base_url"), t.path("base_url"))
            # The endpoint's own URL, pasted from a curl example: the client adds
            # /chat/completions to it, and every call would be a 404, each job dead.
            if urlsplit(self.base_url).path.rstrip("/").endswith("/chat/completions"):
                raise ConfigError(
                    t.path("base_url"),
                    "ends in /chat/completions, which the client adds itself: give the API's"
                    f" root, as {OPENAI_BASE_URL} (the URL of /chat/completions less that)",
                )
        # A server of your own on https behind a private CA, or asking for a client certificate.
        self.tls = read_tls(t, self.base_url or OPENAI_BASE_URL)
        # Without one, the openai package's own reading of HTTPS_PROXY and NO_PROXY holds.
        self.proxy = read_proxy(t)
        model = t.string("model", None)  # a number is the wrong type, named so
        if not model:
            raise ConfigError(t.path("model"), "is required (a model name)")
        no_reference(model, t.path("model"), "a model name")  # else sent as written
        no_template(model, t.path("model"))
        if model != model.strip():  # pasted with a space or a line break: sent as written
            raise ConfigError(
                t.path("model"),
                "begins or ends with white space, which no model name has (every call would be"
                " answered 404, no such model)",
            )
        self.model = model
        if not t.has("prompt"):
            raise ConfigError(t.path("prompt"), "is required (a template)")
        self.prompt = compile_template(t.raw("prompt"), t.path("prompt"))
        self.system: Template | None = None
        if t.has("system"):
            self.system = compile_template(t.raw("system"), t.path("system"))
        # Sent under the name it is written with: reasoning models (o1, o3, o4-mini …) refuse
        # max_tokens, and some compatible servers know only max_tokens.
        given = [name for name in _TOKEN_LIMITS if t.has(name)]
        if not given:
            raise ConfigError(
                t.path("max_tokens"),
                "is required (the lane reserves it; reasoning models take max_completion_tokens)",
            )
        if len(given) > 1:
            raise ConfigError(
                t.path("max_completion_tokens"),
                "give max_tokens or max_completion_tokens, not both",
            )
        self.token_limit_name = given[0]
        self.max_tokens = int(t.number(self.token_limit_name, integer=True, minimum=1))
        self.temperature: float | None = None
        if t.has("temperature"):
            self.temperature = float(t.number("temperature"))
            if not 0 <= self.temperature <= 2:
                raise ConfigError(t.path("temperature"), "must be between 0 and 2")
        self.lane: str | None = t.string("lane", None)
        # Waiting in the lane counts against timeout_s: leave the call at least half of it.
        self.max_lane_wait_s = min(_DEFAULT_LANE_WAIT_S, config.timeout_s / 2)
        if t.has("max_lane_wait_s"):
            self.max_lane_wait_s = float(t.number("max_lane_wait_s"))
            if not 0 <= self.max_lane_wait_s < config.timeout_s:
                raise ConfigError(
                    t.path("max_lane_wait_s"),
                    f"must be at least 0 and below timeout_s ({config.timeout_s:g})",
                )
        self.then: Then | None = None
        if t.has("then"):
            self.then = Then(t.raw("then"), t.path("then"))


def lane_too_small(config: ActionConfig, lanes: Mapping[str, LaneConfig]) -> tuple[str, str] | None:
    """The option, and why, when this action's calls cannot fit its lane's ``tpm`` (``check``
    and the daemon's start warn of it): the lane reserves ``max_tokens`` and the prompt for
    each call, and a call bigger than a whole minute's tokens waits until the lane is empty,
    then goes over the limit alone, which a provider enforcing that limit refuses."""
    settings = Settings(config)
    lane = lanes.get(settings.lane) if settings.lane is not None else None
    if lane is None or lane.tpm is None or settings.max_tokens <= lane.tpm:
        return None
    return settings.token_limit_name, (
        f"{settings.max_tokens:,} is more than lanes.{settings.lane}.tpm ({lane.tpm:,}):"
        " each call waits until the lane has admitted nothing for a minute, then goes over"
        " its limit alone (OpenAI refuses a request bigger than the limit with a 429)"
    )


def shows_no_webhook(config: ActionConfig) -> str | None:
    """Why this action's calls never show the model its webhook (``check`` and the daemon's
    start warn of it), else ``None``: neither ``prompt`` nor ``system`` looks anything up, so
    every call asks the same text, paid for each event. Nothing is added to a prompt of itself."""
    settings = Settings(config)
    templates = [settings.prompt] + ([settings.system] if settings.system is not None else [])
    if any(t.has_lookups for t in templates):
        return None
    return (
        f"looks nothing up in the webhook{', nor does system' if settings.system else ''}:"
        " every call asks the model the same text, without the webhook ({{ . }} puts in the"
        " whole payload, {{ subject }} one field)"
    )


class Then:
    """``then = { forward = URL, secret = …, headers = … }``: where the answer goes next."""

    def __init__(self, value: Any, key: str) -> None:
        if not isinstance(value, Mapping):
            raise ConfigError(key, "must be a table like { forward = URL }")
        t = Table(value, key)
        t.only(
            THEN_OPTIONS,
            f"for then, which takes forward (the URL), {', '.join(THEN_OPTIONS[1:])}",
        )
        self.url = read_url(t, "forward")
        self.headers = read_headers(t, url=self.url)
        self.secrets = [s.reveal() for s in read_signing_secrets(t)]
        self.tls = read_tls(t, self.url)
        self.proxy = read_proxy(t)

    @staticmethod
    def _body(event: Event, answer: Mapping[str, Any]) -> bytes:
        """What is posted: the answer, beside the event's id, source and payload."""
        body = {"event_id": event.id, "source": event.source, **answer}
        payload = payload_of(event)
        # null for a body neither JSON (that json.loads reads) nor a form: an empty object is a
        # payload of its own.
        body["payload"] = None if isinstance(payload, NoPayload) else payload
        text = to_json(body)  # a number sent past what a float or an int holds: as sent
        return LONE_SURROGATE.sub("\ufffd", text).encode()  # the payload's, as the model saw it

    async def send(
        self,
        http: aiohttp.ClientSession,
        event: Event,
        answer: Mapping[str, Any],
        masker: Masker | None = None,
    ) -> Outcome:
        data = await rendered(event, lambda: self._body(event, answer))
        headers = signed_headers(
            self.secrets,
            msg_id=event.id,
            body=data,
            content_type="application/json",
            now=time.time(),
            extra=self.headers,
        )
        return await deliver(
            http, "POST", self.url, data, headers, self.tls, self.proxy, masker=masker
        )
