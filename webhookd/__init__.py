"""webhookd: receive webhooks durably, answer in milliseconds, work in the background."""

from webhookd.errors import Reject, Retry
from webhookd.models import Event

__version__ = "0.1.0"
__all__ = ["Event", "Reject", "Retry", "__version__"]
