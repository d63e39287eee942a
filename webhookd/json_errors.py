"""JSON error answers for both HTTP listeners: the ``{"error": ...}`` body, one middleware, and
a low-level server whose connections answer malformed HTTP as JSON.

aiohttp answers its own errors (no such route, method not allowed, body too large, a request
its parser refuses) and any exception a handler lets out with plain text; the receiver and the
admin API both promise JSON.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware

log = logging.getLogger("webhookd.http")

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


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp's per-connection handler, answering what its HTTP parser refuses as JSON.

    aiohttp's own answer is plain text that echoes the offending bytes, and it logs each one as
    an ERROR with a traceback: anyone who can reach the port could fill the log with them.
    Here it is one INFO line naming the client and the parser's reason, without the bytes.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of an answer is out already; the connection is all that can be closed.
            raise ConnectionError("an answer was already started; closing the connection")
        reason = "malformed request"
        if isinstance(exc, HttpProcessingError) and exc.message:
            # The parser's reason comes before a colon; after it, the request's own bytes.
            reason = exc.message.partition(":")[0].strip() or reason
        log.info("refused a malformed request from %s: %d %s", request.remote, status, reason)
        if status >= 500:
            # Only a handler's own failure gets here with a 5xx; both listeners answer 503.
            response = json_error(503, "internal error, retry later", 1.0)
        else:
            response = json_error(status, reason)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """``web.Server`` whose connections answer malformed HTTP with a JSON error."""

    def __init__(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        # What aiohttp hands each connection's handler: all but the server's own arguments.
        own = {"request_factory", "handler_cancellation", "loop"}
        self._handler_args = {key: value for key, value in kwargs.items() if key not in own}
        self._handler_loop = kwargs.get("loop") or asyncio.get_running_loop()

    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(self, loop=self._handler_loop, **self._handler_args)
