"""JSON error answers for both HTTP listeners: the ``{"error": ...}`` body, one middleware, and
the admin listener's answer to malformed HTTP (the receiver's own server answers it the same
way: ``webhookd.http1``).

aiohttp answers its own errors (no such route, method not allowed, body too large, a request
its parser refuses) and any exception a handler lets out with plain text; the receiver and the
admin API both promise JSON.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.typedefs import Middleware

log = logging.getLogger("webhookd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int,
    message: str,
    retry_after_s: float | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """``{"error": message}`` with ``status``; ``Retry-After`` in whole seconds (at least 1);
    ``headers`` besides (a 405's ``Allow``)."""
    extra = dict(headers) if headers else {}
    if retry_after_s:
        extra["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    # Bytes, so aiohttp adds no charset: the same Content-Type as the receiver's acknowledgements.
    body = json.dumps({"error": message}).encode()
    return web.Response(
        body=body, status=status, content_type="application/json", headers=extra or None
    )


# What an aiohttp HTTPException's own headers say that its JSON stand-in must say too.
_KEPT_HEADERS = ("Allow",)


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
            # The router's 405 names the route's methods in Allow (RFC 9110 §15.5.6): kept.
            kept = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
            return json_error(exc.status, exc.reason, headers=kept)
        except Exception:
            if unexpected is None:
                raise
            return unexpected(request)

    return middleware


# What the parser's errors that carry the request's own bytes are answered with instead: a
# request target, method or request line is the sender's text, and so is a header it refused.
_TARGET = "malformed request target"
_FIXED: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (InvalidURLError, _TARGET),
    (BadHttpMethod, "malformed request method"),
    (BadStatusLine, "malformed request line"),
    (InvalidHeader, "malformed header"),
)
_TLS = "Received HTTPS traffic on an HTTP port"  # aiohttp's own text for a TLS hello
_REASON_MAX = 80


def refusal(exc: BaseException | None) -> tuple[int, str]:
    """The status and reason to answer a request aiohttp's parser refused with: its 4xx (else
    400) and a reason that quotes none of the request's bytes.

    The parser's messages often do quote them: a refused request target is the whole message
    (``CONNECT <anything>:1``), its pure-Python fallback puts a bad request line or method after
    its words without a colon. So those errors are answered with a fixed text by their type;
    of the others only llhttp's own description is kept (the words before ``":\n"``, after
    which it quotes the bytes), or a short message of aiohttp's own without any colon.
    """
    if not isinstance(exc, HttpProcessingError):
        return 400, "malformed request"
    code = exc.code if isinstance(exc.code, int) and 400 <= exc.code < 500 else 400
    if isinstance(exc, LineTooLong):
        # Its own text ends where it names the line: "when reading" what, it quotes. Its args
        # are (line, limit, size) in aiohttp 3.x; read defensively, as an error path must not fail.
        limit = f"{exc.args[1]} bytes" if len(exc.args) > 1 else "the parser's limit"
        return 400, f"a line of the request is longer than {limit}"
    message = exc.message if isinstance(exc.message, str) else ""
    if isinstance(exc, BadHttpMethod) and message == _TLS:
        return code, _TLS
    for kind, text in _FIXED:
        if isinstance(exc, kind):
            return code, text
    reason, colon, rest = message.partition(":")
    if colon and not rest.startswith("\n"):  # not llhttp's shape: whose words, unknown
        reason = ""
    reason = reason.strip()
    if len(reason) > _REASON_MAX or not (reason.isascii() and reason.isprintable()):
        reason = ""
    return code, reason or "malformed request"


class _JsonErrorHandler(web.RequestHandler):
    """aiohttp's per-connection handler, answering what its HTTP parser refuses as JSON.

    aiohttp's own answer is plain text that echoes the offending bytes, and it logs each one as
    an ERROR with a traceback: anyone who can reach the port could fill the log with them.
    Here it is one INFO line naming the client and the parser's reason, without the bytes.
    """

    __slots__ = ()

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
        if status >= 500:  # a failure past the application's own error middleware
            self.log_exception("unexpected error answering a request", exc_info=exc)
            response = json_error(500, "internal error")
        else:
            code, reason = refusal(exc)
            log.info("refused a malformed request from %s: %d %s", request.remote, code, reason)
            response = json_error(code, reason)
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer malformed HTTP with a JSON error and one INFO
    line. The server aiohttp builds for the application is kept as built (its settings, the
    application's handler); only the class that makes each connection's handler changes."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server
