"""The ``forward`` action: deliver the event's raw body to the user's service over HTTP, signed.

How answers map to outcomes, and the headers every request carries, are in ``delivery``. Of the
provider's own headers, those that say what the webhook is (``X-GitHub-Event``,
``X-Shopify-Topic`` …: ``PASS_HEADERS``) go along unless ``pass_headers`` names others; with
``pass_query``, the webhook URL's query goes along too, after the target URL's own.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import aiohttp
from yarl import URL

from webhookd.actions.base import Outcome, Resources, masker_of, options
from webhookd.actions.delivery import deliver, signed_headers
from webhookd.actions.targets import (
    Proxy,
    read_headers,
    read_proxy,
    read_signing_secrets,
    read_tls,
    read_url,
)
from webhookd.config.checks import HEADER_NAME
from webhookd.config.sections import ActionConfig, ActionDefaults, RetryPolicy
from webhookd.errors import ConfigError
from webhookd.models import Event, Job
from webhookd.redact import MASK, SECRET_HEADERS, Masker

# A downstream service can be down for hours (a deploy, an outage): the attempts, up to 6 h
# apart, span 7 h 31 min to 15 h 2 min of waits.
DEFAULTS = ActionDefaults(
    retry=RetryPolicy(max_attempts=10, base_s=10.0, factor=3.0, cap_s=6 * 3600.0)
)
_OPTIONS = (
    "url",
    "method",
    "headers",
    "pass_headers",
    "pass_query",
    "secret",
    "secrets",
    "tls",
    "proxy",
)

# The provider's headers that say what a webhook is, where its body does not: a GitHub service
# cannot tell a push from a pull request without X-GitHub-Event, nor a Shopify one an order's
# creation from its update without X-Shopify-Topic. Passed on when the webhook has them.
PASS_HEADERS = (
    "X-GitHub-Event",
    "X-GitHub-Delivery",
    "X-GitHub-Hook-ID",
    "X-GitHub-Hook-Installation-Target-ID",
    "X-GitHub-Hook-Installation-Target-Type",
    "X-Shopify-Topic",
    "X-Shopify-Shop-Domain",
    "X-Shopify-API-Version",
    "X-Shopify-Webhook-Id",
    "X-Shopify-Event-Id",
    "X-Shopify-Triggered-At",
    "X-Shopify-Sub-Topic",
    "X-Shopify-Name",
    # Shopify's event subscriptions: the same headers without their X-.
    "Shopify-Topic",
    "Shopify-Shop-Domain",
    "Shopify-API-Version",
    "Shopify-Webhook-Id",
    "Shopify-Event-Id",
    "Shopify-Triggered-At",
    "Shopify-Handle",
    "Shopify-Action",
    "Shopify-Resource-Id",
)
# What the forward sets itself, or what would describe another request than the one it sends.
_OWN_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "host",
        "connection",
        "user-agent",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "idempotency-key",
    }
)


@dataclass(frozen=True, slots=True)
class _Settings:
    url: str
    headers: Mapping[str, str]
    secrets: tuple[str, ...]
    passed: frozenset[str]  # lower case
    tls: ssl.SSLContext | None  # a private CA, a client certificate
    proxy: Proxy | None
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    pass_query: bool = False  # the webhook's query added to ``url``'s


def _settings(config: ActionConfig) -> _Settings:
    t = options(config, _OPTIONS)
    url = read_url(t, "url")
    headers = read_headers(t, url=url)
    secrets = tuple(s.reveal() for s in read_signing_secrets(t))
    passed = _read_passed(t.raw("pass_headers", list(PASS_HEADERS)), t.path("pass_headers"))
    settings = _Settings(url, headers, secrets, passed, read_tls(t, url), read_proxy(t))
    return t.read(settings, only=("method", "pass_query"))


def _read_passed(value: object, key: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, 'must be an array of header names, like ["X-GitHub-Event"]')
    for i, name in enumerate(value):
        lname = name.lower()
        if not HEADER_NAME.fullmatch(name):
            raise ConfigError(f"{key}[{i}]", "is not a header name")
        if lname in _OWN_HEADERS:
            raise ConfigError(f"{key}[{i}]", f"{name} is the forward's own to set")
        if lname in SECRET_HEADERS:
            raise ConfigError(
                f"{key}[{i}]", f"{name} is a credential, stored as *** and never passed on"
            )
    return frozenset(name.lower() for name in value)


def validate(config: ActionConfig) -> None:
    _settings(config)


class ForwardAction:
    def __init__(
        self,
        config: ActionConfig,
        http: aiohttp.ClientSession,
        masker: Callable[[], Masker] = Masker,
    ) -> None:
        self.config = config
        self.http = http
        self.masker = masker
        self.settings = _settings(config)

    def headers_for(self, event: Event, now: float) -> dict[str, str]:
        extra = self.settings.headers
        passed = self.settings.passed
        if passed:
            # As received (HTTP's parser let no CR, LF or NUL through); the configured headers
            # win over a passed one of the same name.
            extra = {
                k: v
                for k, v in event.headers
                if k.lower() in passed and v != MASK and _sendable(v)  # MASK: a token header
            }
            extra.update(self.settings.headers)
        return signed_headers(
            self.settings.secrets,
            msg_id=event.id,
            body=event.body,
            content_type=event.content_type,
            now=now,
            extra=extra,
        )

    @property
    def target(self) -> str:
        """Where it delivers: named in a timeout's error."""
        return self.settings.url

    def url_for(self, event: Event) -> str | URL:
        url = self.settings.url
        return with_query(url, event.query) if self.settings.pass_query and event.query else url

    async def run(self, event: Event, job: Job) -> Outcome:
        return await deliver(
            self.http,
            self.settings.method,
            self.url_for(event),
            event.body,
            self.headers_for(event, time.time()),
            self.settings.tls,
            self.settings.proxy,
            named=self.settings.url,
            masker=self.masker(),
        )

    async def aclose(self) -> None:
        return None


def with_query(url: str, query: str) -> URL:
    """``url`` with ``query`` after its own (joined with ``&``), the query's bytes as they came
    (``%41`` stays ``%41``: a target may check a signature over them; a URL given as text is
    re-encoded by the client); a fragment is not sent."""
    base = str(URL(url).with_fragment(None))  # the configured URL, encoded as the client would
    joint = "" if base.endswith(("?", "&")) else "&" if "?" in base else "?"
    return URL(f"{base}{joint}{query}", encoded=True)


def _sendable(value: str) -> bool:
    """A value the client can encode: not text a non-UTF-8 header was decoded into."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def create(config: ActionConfig, resources: Resources) -> ForwardAction:
    return ForwardAction(config, resources.http, masker_of(resources))
