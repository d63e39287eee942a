"""The receiver's HTTP/1.1 server: aiohttp's request parser and a connection loop cut to what a
webhook needs.

aiohttp's server (``web.Server`` and its ``RequestHandler``) builds a request object with a
dozen lazily computed views, a response object with a header multidict, a stream writer, and
timers per request; on one core that machinery costs more than webhookd's own work per webhook
(a bare aiohttp handler answering 200: ~80 µs per request; the same answers written by a
protocol on aiohttp's C parser: ~30). This server keeps what the receiver relies on:

- aiohttp's parser (``HttpRequestParser``, the C one when built): request line and header
  limits, chunked framing, the body as a ``StreamReader`` with its flow control; besides its
  limits, a request line and headers over ``MAX_HEAD_BYTES`` in all are answered 431, and a
  header whose name and value pass ``max_field_size`` 400 (the parser checks the first only);
- keep-alive with pipelining: answers in order, one request at a time per connection, at most
  ``_QUEUE_MAX`` parsed requests held before reading pauses, or ``_QUEUED_BODIES_MAX`` of
  their bodies;
- a connection closed after ``keepalive_timeout`` without a complete request head (idle between
  requests, or a head that never ends), after an answer sent before its body was read (once
  the client stops sending: a lingering close), after ``Connection: close`` or an HTTP/1.0
  request without keep-alive, and after an upgrade request;
- a client that stops reading its answers: nothing more is read from it, and once it has
  taken none for ``send_timeout_s`` the connection is cut;
- a half-closed connection (the client shut its sending side) gets its answers, then closes;
  a chunked request's connection closes after its answer;
- a malformed request answered with a JSON 400 in one INFO line
  naming the client and the parser's reason, never the bytes; then the connection closes
  (well-formed requests before it in the same read are answered first; where those cannot be
  found again, the read having begun inside a request or the parser gone on with bytes it had
  held back, the connection closes after the answers already due, without the 400, which the
  client would take for one of theirs);
- ``HEAD`` answered as the ``GET`` it stands for (the handler sees a GET), without the body;
- a shutdown that stops accepting, closes idle connections, lets the requests in flight finish
  (their commits and answers) for up to a timeout, then closes the rest.

The handler gets a ``Request`` (the few views the receiver reads) and returns either an ``Ack``
(the hot path's answer, formatted here without a header multidict) or an aiohttp
``web.Response`` (errors and handshakes, built by the code shared with the admin API).
"""

from webhookd.http1.server import Http1Server, _Connection
from webhookd.http1.wire import (
    MAX_HEAD_BYTES,
    Ack,
    Answer,
    Handler,
    HeadTooLarge,
    Peer,
    Request,
    head_bytes,
    host_port,
)

__all__ = [
    "MAX_HEAD_BYTES",
    "Ack",
    "Answer",
    "Handler",
    "HeadTooLarge",
    "Http1Server",
    "Peer",
    "Request",
    "_Connection",
    "head_bytes",
    "host_port",
]
