"""An OpenAI-compatible ``/v1/chat/completions`` server for tests, with RPM and TPM limits.

Limits hold over a sliding window (60 s by default) on an injectable clock, the way the real
API enforces them: a request over either limit gets a 429 with the real error body
(``rate_limit_exceeded``), ``Retry-After`` and ``x-ratelimit-*`` headers; a request bigger than
the whole ``tpm`` (its prompt and ``max_tokens``, as the real API counts it) gets the real API's
429 "Request too large", with no ``Retry-After``: no wait lets it through. When
``quota_exhausted`` is set every request gets 429 ``insufficient_quota``. A request is charged
its usage (prompt tokens: characters / 4 + 3 per message; completion:
``min(max_completion_tokens or max_tokens, completion_tokens)``); like the real API it refuses
``max_tokens`` for reasoning models (o1 …).
``statuses`` forces the next answers (500, 400, 401 …) with the matching error bodies,
``hold`` makes requests hang until it is set, ``oversized`` answers a chat completion of that
many bytes, written 64 KiB at a time (``sent`` counts what was written before the client hung
up), and ``limited_headers`` replaces (or, with ``None``, removes) headers of the 429
``rate_limit_exceeded`` answers: a provider asking for a cool-down of years; ``answer_headers``
are added to (or replace) the answers' own.

The arrival time is read before anything is awaited, so a test's simulated clock can wait for
``received`` to catch up with what its lane admitted before moving on.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import ssl
import string
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from webhookd.clock import SYSTEM_CLOCK, Clock

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid value for 'messages'."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def _oversized_chunk() -> bytes:
    """64 KiB of text, words with a random letter in every 128 bytes: gzip makes it about 50
    times smaller, so 128 MiB of it is under 4 MiB compressed, yet no 64 KiB read of that
    inflates to more than about 3 MiB."""
    rng = random.Random(7)
    chunk = bytearray(b"word " * (64 * 1024 // 5))
    for i in range(0, len(chunk), 128):
        chunk[i] = ord(rng.choice(string.ascii_lowercase))
    return bytes(chunk)


_OVERSIZED_CHUNK = _oversized_chunk()

# Reasoning models (o1, o3-mini, o4-mini …) refuse ``max_tokens``, as the real API does.
_REASONING_MODEL = re.compile(r"o\d")


def error_body(kind: str, code: str | None, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class Charge:
    at: float
    tokens: int


@dataclass
class StandIn:
    rpm: int | None = None
    tpm: int | None = None
    clock: Clock = SYSTEM_CLOCK
    window_s: float = 60.0
    completion_tokens: int = 50
    api_key: str = "sk-standin"
    statuses: list[int] = field(default_factory=list)
    quota_exhausted: bool = False
    hold: asyncio.Event | None = None
    malformed: bytes | None = None  # answered instead of a chat completion
    malformed_type: str = "application/json"  # ... as this content type
    malformed_status: int = 200  # ... with this status (a proxy's 502 page)
    refusal: str | None = None  # answered as a refusal: no content, this as message.refusal
    content: Any = None  # answered as message.content, whatever max_tokens says
    oversized: int | None = None  # bytes of a chat completion answered as a stream of chunks
    oversized_length: bool = False  # ... announced in a Content-Length (else chunked)
    oversized_gzip: bool = False  # ... compressed as it is written (Content-Encoding: gzip)
    oversized_status: int = 200  # ... with this status (a 503 with a page of megabytes)
    sent: int = 0  # bytes of the oversized answer written before the client hung up
    oversized_over: asyncio.Event = field(default_factory=asyncio.Event)  # its write has ended
    limited_headers: dict[str, str | None] = field(default_factory=dict)
    answer_headers: dict[str, str] = field(default_factory=dict)  # added to its answers (200)
    url: str = ""
    received: int = 0
    bodies: list[Any] = field(default_factory=list)  # the requests' JSON, as received
    served: list[Charge] = field(default_factory=list)
    rate_limited: int = 0  # 429 rate_limit_exceeded answers over the window's limits
    too_large: int = 0  # 429 rate_limit_exceeded answers to a request over the whole tpm
    quota_refused: int = 0  # 429 insufficient_quota answers
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _window: deque[Charge] = field(default_factory=deque)
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> StandIn:
        """Serve on a free loopback port; over https with ``ssl_context``."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
        return self

    async def aclose(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_received(self, count: int) -> None:
        """Until ``count`` requests have arrived (woken by each arrival, no polling)."""
        while self.received < count:
            self.arrived.clear()
            await self.arrived.wait()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        now = self.clock.monotonic()  # before any await: see the module docstring
        self.received += 1
        self.arrived.set()
        body = await request.json()
        self.bodies.append(body)
        if self.hold is not None:
            await self.hold.wait()
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401)
        if self.statuses:
            return self._error(self.statuses.pop(0))
        if self.oversized is not None:
            return await self._oversized(request, self.oversized)
        if self.malformed is not None:
            return web.Response(
                body=self.malformed, content_type=self.malformed_type, status=self.malformed_status
            )
        if self.quota_exhausted:
            self.quota_refused += 1
            message = "You exceeded your current quota, please check your plan and billing details."
            return web.json_response(
                error_body("insufficient_quota", "insufficient_quota", message), status=429
            )
        if "max_tokens" in body and _REASONING_MODEL.match(str(body.get("model"))):
            message = (
                "Unsupported parameter: 'max_tokens' is not supported with this model."
                " Use 'max_completion_tokens' instead."
            )
            error = error_body("invalid_request_error", "unsupported_parameter", message)
            return web.json_response(error, status=400)
        messages = body["messages"]
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        prompt = sum(math.ceil(len(m["content"]) / 4) + 3 for m in messages)
        if self.tpm is not None and prompt + max_tokens > self.tpm:
            return self._too_large(prompt + max_tokens)
        completion = min(max_tokens, self.completion_tokens)
        total = prompt + completion
        while self._window and self._window[0].at <= now - self.window_s:
            self._window.popleft()
        requests_used = len(self._window)
        tokens_used = sum(c.tokens for c in self._window)
        if self.rpm is not None and requests_used + 1 > self.rpm:
            return self._limited(now, "requests", self.rpm, requests_used, 1, count=True)
        if self.tpm is not None and tokens_used + total > self.tpm:
            return self._limited(now, "tokens", self.tpm, tokens_used, total, count=False)
        charge = Charge(now, total)
        self._window.append(charge)
        self.served.append(charge)
        answer = {
            "id": f"chatcmpl-{len(self.served)}",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None
                        if self.refusal
                        else self.content
                        if self.content is not None
                        else "Draft: " + messages[-1]["content"][:40],
                        "refusal": self.refusal,
                    },
                    "finish_reason": "length" if completion < self.completion_tokens else "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": total,
            },
        }
        return web.json_response(answer, headers=self._headers(now) | self.answer_headers)

    async def _oversized(self, request: web.Request, size: int) -> web.StreamResponse:
        """A chat completion of ``size`` bytes, its text one long run of words, written a chunk
        at a time: ``sent`` counts what was written before the client closed the connection."""
        head = (
            b'{"id": "chatcmpl-oversized", "object": "chat.completion", "created": 1700000000,'
            b' "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "stop",'
            b' "message": {"role": "assistant", "content": "'
        )
        tail = b'"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}'
        response = web.StreamResponse(
            status=self.oversized_status, headers={"Content-Type": "application/json"}
        )
        if self.oversized_length:
            response.content_length = size
        gzip = zlib.compressobj(wbits=31) if self.oversized_gzip else None
        if gzip is not None:
            response.headers["Content-Encoding"] = "gzip"

        async def write(data: bytes, last: bool = False) -> None:
            if gzip is not None:
                data = gzip.compress(data) + (gzip.flush() if last else b"")
            await response.write(data)
            self.sent += len(data)

        try:
            await response.prepare(request)
            await write(head)
            left = size - len(head) - len(tail)
            while left > 0:
                await write(_OVERSIZED_CHUNK[:left])
                left -= len(_OVERSIZED_CHUNK)
            await write(tail, last=True)
            await response.write_eof()
        except ConnectionError:  # the client hung up: aiohttp's reset on a closing transport
            pass
        finally:
            self.oversized_over.set()
        return response

    def _error(self, status: int) -> web.Response:
        kind, code, message = _ERRORS[status]
        return web.json_response(error_body(kind, code, message), status=status)

    def _limited(
        self, now: float, what: str, limit: int, used: int, requested: int, *, count: bool
    ) -> web.Response:
        self.rate_limited += 1
        excess = used + requested - limit
        freed = 0
        wait_s = self.window_s
        for charge in self._window:
            freed += 1 if count else charge.tokens
            if freed >= excess:
                wait_s = charge.at + self.window_s - now
                break
        unit = "RPM" if count else "TPM"
        message = (
            f"Rate limit reached for gpt-4o-mini in organization org-standin on {what} per min "
            f"({unit}): Limit {limit}, Used {used}, Requested {requested}. "
            f"Please try again in {wait_s:.3f}s."
        )
        headers = self._headers(now)
        headers["retry-after"] = str(max(1, math.ceil(wait_s)))
        for name, value in self.limited_headers.items():
            if value is None:
                headers.pop(name, None)
            else:
                headers[name] = value
        return web.json_response(
            error_body(what, "rate_limit_exceeded", message), status=429, headers=headers
        )

    def _too_large(self, requested: int) -> web.Response:
        self.too_large += 1
        message = (
            f"Request too large for gpt-4o-mini in organization org-standin on tokens per min"
            f" (TPM): Limit {self.tpm}, Requested {requested}. The input or output tokens must be"
            " reduced in order to run successfully."
        )
        return web.json_response(error_body("tokens", "rate_limit_exceeded", message), status=429)

    def _headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        oldest = self._window[0].at + self.window_s - now if self._window else 0.0
        if self.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(self.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(self.rpm - len(self._window), 0))
            headers["x-ratelimit-reset-requests"] = f"{oldest:.3f}s"
        if self.tpm is not None:
            used = sum(c.tokens for c in self._window)
            headers["x-ratelimit-limit-tokens"] = str(self.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(self.tpm - used, 0))
            headers["x-ratelimit-reset-tokens"] = f"{oldest:.3f}s"
        return headers
