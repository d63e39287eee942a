"""Outbound HTTP delivery shared by actions: Standard Webhooks signing and outcome classification.

``forward`` sends the event's body with it; ``openai`` sends its answer on with it
(``then = { forward = URL }``). Outcomes, by the status (a body that does not come or cannot
be read changes none): 2xx is done; 407 (a proxy's), 408, 425, 429, 5xx, timeouts and
connection errors are retried (the response's ``Retry-After`` is a lower bound for the next
attempt's delay, up to the action's ``retry.cap_s``); 410 Gone and other 4xx are permanent,
and so is a 3xx: redirects are never followed. Every request carries the event id as
``webhook-id`` and ``Idempotency-Key`` so the receiver can drop the duplicates that
at-least-once delivery allows (and that sending again at once makes, once, when a reused
connection was closed before any answer).
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import errno
import math
import os
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from yarl import URL

from webhookd.actions.base import Outcome, excerpt
from webhookd.actions.client import ConnectionUsed
from webhookd.actions.targets import Proxy
from webhookd.redact import SPARE_BYTES, Masker
from webhookd.schemes.standard import sign_standard

# 407: a proxy on the way asks for credentials (fixed in the config and reloaded, the retries
# go through).
_RETRYABLE_4XX = frozenset({407, 408, 425, 429})
_RESPONSE_HEAD_BYTES = 1024
# How long the start of an answer's body may take once its status has come.
RESPONSE_HEAD_S = 2.0
_LOCATION_CHARS = 500
_WHY_CHARS = 200


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), or ``None``.

    ``None`` for anything unusable: garbage, a negative or non-finite number, an impossible date.
    A date in the past is 0. The value is not capped here: a huge one comes back huge, and the
    caller bounds it (the action's ``retry.cap_s``, a lane's ``max_cooldown_s``).
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a zone-less one is not local time
            when = when.replace(tzinfo=datetime.UTC)
        return max(when.timestamp() - now, 0.0)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def signed_headers(
    secrets: Sequence[str],
    *,
    msg_id: str,
    body: bytes,
    content_type: str,
    now: float,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers for one outbound request; signed with Standard Webhooks when secrets are given.

    Header names are case-insensitive: one of ``extra`` named like one of webhookd's own, in
    any case, replaces it. The signature covers the ``webhook-id`` actually sent, which such
    an ``extra`` may have replaced; the signature headers themselves cannot be.
    """
    headers = {
        "Content-Type": content_type,
        "User-Agent": "webhookd",
        "webhook-id": msg_id,
        "Idempotency-Key": msg_id,
    }
    for name, value in (extra or {}).items():
        _put(headers, name, value)
    if secrets:
        timestamp = int(now)
        sent_id = next(v for k, v in headers.items() if k.lower() == "webhook-id")
        _put(headers, "webhook-timestamp", str(timestamp))
        _put(
            headers,
            "webhook-signature",
            sign_standard(secrets, msg_id=sent_id, timestamp=timestamp, body=body),
        )
    return headers


def _put(headers: dict[str, str], name: str, value: str) -> None:
    """Set a header, replacing any of the same name in another case (HTTP's names are one)."""
    for same in [k for k in headers if k.lower() == name.lower()]:
        del headers[same]
    headers[name] = value


def connect_reason(error: OSError) -> str:
    """An OS error's reason: the errno's name for it ("Connection refused") where asyncio's own
    text is "Connect call failed ('10.0.0.5', 443)"; a name lookup's own text."""
    if error.errno and error.errno > 0 and not isinstance(error, socket.gaierror):
        return os.strerror(error.errno)
    return error.strerror or str(error) or type(error).__name__


async def deliver(
    http: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    body: bytes,
    headers: Mapping[str, str],
    tls: ssl.SSLContext | None = None,
    proxy: Proxy | None = None,
    *,
    named: str | None = None,
    masker: Masker | None = None,
) -> Outcome:
    """Send one request and classify the answer; ``tls`` and ``proxy``: the action's own
    (``read_tls``, ``read_proxy``). Errors name the target as ``named`` (default ``url``): a
    forward's configured URL, not ``url`` with a webhook's query added, which may hold the
    sender's token and would make each event's error a cause of its own in ``stats``.
    ``masker``: what the answer's head is masked by before it is cut (the worker masks the
    rest of the outcome)."""
    started = time.monotonic()
    sent_to = str(url)
    target = sent_to if named is None else named
    sent = dict(headers)
    if not any(k.lower() == "accept-encoding" for k in sent):
        # The body is not decoded (below): asked for plain, its start is text to show.
        sent["Accept-Encoding"] = "identity"
    proxy_headers = None
    if proxy is not None and proxy.authorization is not None:
        # An https target's go on the CONNECT; a plain http request is the proxy's to read.
        if sent_to.startswith("https:"):
            proxy_headers = {"Proxy-Authorization": proxy.authorization}
        else:
            sent["Proxy-Authorization"] = proxy.authorization

    async def exchange(used: ConnectionUsed) -> tuple[int, str, float | None, str | None]:
        async with http.request(
            method,
            url,
            data=body,
            headers=sent,
            allow_redirects=False,
            ssl=True if tls is None else tls,
            proxy=None if proxy is None else proxy.url,
            proxy_headers=proxy_headers,
            # Only the body's start is kept, for the operator. Decoded, a coding the client
            # lacks (br without Brotli, zstd) failed the request before its status was read,
            # so a 200 was retried.
            auto_decompress=False,
            trace_request_ctx=used,
        ) as response:
            return (
                response.status,
                await _response_head(
                    response, wait=not 200 <= response.status < 300, masker=masker
                ),
                parse_retry_after(response.headers.get("Retry-After"), time.time()),
                response.headers.get("Location"),
            )

    used = ConnectionUsed()
    try:
        try:
            status, head, retry_after, location = await exchange(used)
        except aiohttp.ClientConnectionError as exc:
            if not (used.reused and _dropped_unanswered(exc) and _replayable(sent)):
                raise
            # A target may close a connection it kept idle just as a request goes out on it
            # (the usual race at its keep-alive timeout), which cost an attempt and a backoff.
            # As Go's net/http does for a request with an Idempotency-Key on a reused
            # connection (aiohttp does it for idempotent methods alone), it is sent again at
            # once: once, on the next connection the pool gives (the dropped one is closed).
            status, head, retry_after, location = await exchange(ConnectionUsed())
    except (aiohttp.ClientError, OSError) as exc:
        if isinstance(exc, aiohttp.ClientHttpProxyError) and proxy is not None:
            # The CONNECT refused: 407 for credentials, 403 for a target it does not allow.
            why = f"the proxy {proxy.url} answered {exc.status} {exc.message}"
            if exc.status == 407:
                why += ": check its user and password"
        elif isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
            exc,
            aiohttp.ClientSSLError,  # a TLS failure's own text says what it was
        ):  # where its own text adds "ssl:default" to a plain http URL
            to = "the proxy " if isinstance(exc, aiohttp.ClientProxyConnectionError) else ""
            why = f"cannot connect to {to}{exc.host}:{exc.port}: {connect_reason(exc.os_error)}"
        elif isinstance(exc, aiohttp.ClientResponseError):
            # The client's parser refused the answer (a head past its limits, a status line or
            # chunks it cannot read): its "400" is no status the target sent.
            said = excerpt(str(exc.message)).replace(sent_to, target)
            return Outcome.retry(
                f"{target} answered what is not HTTP the client can read: {said}",
                duration_s=round(time.monotonic() - started, 4),
            )
        elif isinstance(exc, aiohttp.ServerDisconnectedError) and not isinstance(
            exc.message, str
        ):  # a head read in part, which the client's text shows as its parser's record
            why = f"{target} closed the connection within its answer's head"
            if (code := getattr(exc.message, "code", None)) is not None:
                why += f" (status {code})"
            return Outcome.retry(why, duration_s=round(time.monotonic() - started, 4))
        else:
            # The client's own text may quote the URL it was sent to: the target's name instead.
            why = f"{type(exc).__name__}: {exc}".replace(sent_to, target)
        return Outcome.retry(
            f"connection failed: {why}", duration_s=round(time.monotonic() - started, 4)
        )
    detail: dict[str, Any] = {
        "status": status,
        "duration_s": round(time.monotonic() - started, 4),
        "response": head,
    }
    if 200 <= status < 300:
        return Outcome.done({"status": status}, **detail)
    if 300 <= status < 400 and location:
        # Not followed: a forward goes to the URL configured, and a redirect could send the
        # body (and its signature) somewhere else. The operator fixes the URL and replays.
        where = location[:_LOCATION_CHARS]
        return Outcome.dead(
            f"{target} answered {status}: redirect to {where} not followed", **detail
        )
    if 300 <= status < 400:  # 304 Not Modified, or a redirect that says nowhere
        return Outcome.dead(f"{target} answered {status}, which is not a success", **detail)
    if status == 410:
        return Outcome.dead(f"{target} answered 410 Gone: the endpoint is retired", **detail)
    if status == 407 and proxy is not None:
        # A plain http request's: the proxy's answer, not the target's.
        said = f"the proxy {proxy.url} answered 407 for {target}: check its user and password"
        return Outcome.retry(said, after_s=retry_after, **detail)
    if status >= 500 or status in _RETRYABLE_4XX:
        return Outcome.retry(f"{target} answered {status}", after_s=retry_after, **detail)
    return Outcome.dead(f"{target} answered {status}", **detail)


def _dropped_unanswered(exc: aiohttp.ClientConnectionError) -> bool:
    """Whether the connection was closed or reset before any answer came (the answer's own
    failures are ``_response_head``'s). A disconnect within the answer's head (``message``
    the parser's record of what came, not a text) was answered: its request was sent again."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)
    if isinstance(exc, ConnectionResetError):
        return True
    # A reset read as an OSError (EPIPE: found on writing), not a connect that failed.
    return (
        isinstance(exc, aiohttp.ClientOSError)
        and not isinstance(exc, aiohttp.ClientConnectorError)
        and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    )


def _replayable(headers: Mapping[str, str]) -> bool:
    """Whether the receiver can tell a request sent again from the first (Go's test)."""
    return any(k.lower() in ("idempotency-key", "x-idempotency-key") for k in headers)


async def _response_head(
    response: aiohttp.ClientResponse, *, wait: bool = True, masker: Masker | None = None
) -> str:
    """The start of an answer's body as text, or why it is not there. The status is the
    answer: a body that does not come (headers sent, then nothing) or breaks off is no reason
    to send a delivered webhook again. Without ``wait`` (a 2xx) only what has come with the
    head is read: waiting for the rest, the attempt's timeout_s could end first, and the 2xx
    was recorded as timed out and sent again (ten times to a target slow to send its body)."""
    if not wait:
        try:
            head = response.content.read_nowait(_RESPONSE_HEAD_BYTES + SPARE_BYTES)
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            why = f"{type(exc).__name__}: {exc}".splitlines()[0][:_WHY_CHARS]
            return f"(the body could not be read: {why})"
        if not head and not response.content.at_eof():
            return "(no body yet with the head: a 2xx is not kept waiting for one)"
        return _head_text(response, head, masker)
    try:
        async with asyncio.timeout(RESPONSE_HEAD_S):
            head = await response.content.read(_RESPONSE_HEAD_BYTES + SPARE_BYTES)
    except TimeoutError:
        return f"(no body within {RESPONSE_HEAD_S:g} s)"
    except (aiohttp.ClientError, OSError) as exc:
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:_WHY_CHARS]
        return f"(the body could not be read: {why})"
    return _head_text(response, head, masker)


def _head_text(response: aiohttp.ClientResponse, head: bytes, masker: Masker | None) -> str:
    """The first ``_RESPONSE_HEAD_BYTES`` of ``head`` as text, masked then cut: a secret the
    cut falls inside (a 401 page quoting the token it was sent) shows as ``***``, not as its
    first characters, which no masker would know."""
    coding = response.headers.get("Content-Encoding", "identity")
    if head and coding.lower() != "identity":
        return f"(a body in Content-Encoding {coding[:_WHY_CHARS]}, not shown)"
    return (masker or Masker()).head(head, _RESPONSE_HEAD_BYTES)
