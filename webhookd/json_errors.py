"""JSON error answers for both HTTP listeners: the ``{"error": ...}`` body and one middleware
(the receiver's server answers malformed HTTP as JSON itself: ``webhookd.http1``).

aiohttp answers its own errors (no such route, method not allowed, body too large, a request
its parser refuses) and any exception a handler lets out with plain text; the receiver and the
admin API both promise JSON.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, retry_after_s: float | None = None) -> web.Response:
    """``{"error": message}`` with ``status``; ``Retry-After`` in whole seconds (at least 1)."""
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s else None
    return web.json_response({"error": message}, status=status, headers=headers)


def json_errors(unexpected: Callable[[web.Request], web.Response] | None = None) -> Middleware:
    """A middleware answering aiohttp's 4xx and 5xx as JSON errors with the same status.

    ``unexpected``, when given, answers any other exception a handler raises (the receiver: a
    logged 503 with ``Retry-After``); without it such an exception goes on to aiohttp, which
    logs it and answers 500.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return json_error(exc.status, exc.reason)
        except Exception:
            if unexpected is None:
                raise
            return unexpected(request)

    return middleware
