"""The receiver: the handler of ``/hooks/...`` on webhookd's HTTP/1.1 server (``handler``), what
it reads from a request (``reading``) and its pacing (``limits``)."""

from webhookd.receiver.handler import Receiver, allowed_methods
from webhookd.receiver.limits import TokenBucket
from webhookd.receiver.reading import _Payload, client_of, extract, sift

__all__ = ["Receiver", "TokenBucket", "_Payload", "allowed_methods", "client_of", "extract", "sift"]
