"""webhookd: receive webhooks durably, answer in milliseconds, work in the background."""

from webhookd.errors import Reject, Retry

__version__ = "0.1.0"
__all__ = ["Reject", "Retry", "__version__"]
