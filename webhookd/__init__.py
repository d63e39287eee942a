"""webhookd: receive webhooks durably, answer in milliseconds, work in the background."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from webhookd.errors import Reject, Retry

if TYPE_CHECKING:
    from webhookd.models import Event

__version__ = "0.1.0"
__all__ = ["Event", "Reject", "Retry", "__version__"]


def __getattr__(name: str) -> Any:
    # ``Event`` is imported when first asked for: the ``webhookd`` command imports this package
    # before anything else, and every import here delays the instant ``serve`` starts noting a
    # SIGHUP instead of dying of it (``webhookd.hangups``).
    if name == "Event":
        from webhookd.models import Event

        return Event
    raise AttributeError(f"module 'webhookd' has no attribute {name!r}")
