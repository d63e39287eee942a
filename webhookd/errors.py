"""The exception tree of webhookd.

    WebhookdError
    ├── ConfigError            bad configuration; carries the dotted key (exit 2)
    │   └── UnsetVariable        an env: secret's variable is not set, or empty
    ├── JournalError           the journal could not do what was asked
    │   ├── JournalUnavailable   a write failed or timed out: intake answers 503
    │   │   └── JournalGone        its file was removed or replaced while open: until the exit
    │   └── JournalNewer         its schema is newer than this webhookd's (``serve`` exits 3)
    ├── NotFound               no event with that id
    ├── VerificationError      a webhook's signature, timestamp or token did not check out
    └── ActionError            raised inside an action; the worker records it as an outcome
        ├── Retry                try again later (optionally not before ``after_s``)
        └── Reject               permanent: the job goes to the dead-letter queue

``Retry`` and ``Reject`` are exported from the package so Python handlers can raise them.
"""

from __future__ import annotations


class WebhookdError(Exception):
    """Base class of every error webhookd raises on purpose."""


class ConfigError(WebhookdError):
    """A configuration value is missing, unknown or invalid."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message


class UnsetVariable(ConfigError):
    """An ``env:`` secret's variable is not set, or set but empty: a reload says that the
    environment is the one the daemon started with."""


class JournalError(WebhookdError):
    """The journal refused or failed an operation."""


class JournalUnavailable(JournalError):
    """A write could not be committed (disk full, read-only, locked, too slow)."""


class JournalGone(JournalUnavailable):
    """The SQLite journal's file was removed or replaced while the daemon had it open: every
    write is refused from then until the daemon exits, which one line of its own explains (so
    a write refused this way is not worth a line of its own)."""


class JournalCopied(JournalError):
    """A change to a SQLite journal ``webhookd copy`` put into PostgreSQL while the change
    waited for it: refused, as at the verb's start (exit 2)."""


class JournalNewer(JournalError):
    """The journal's schema is newer than this webhookd understands: a newer release upgraded
    it. No restart of this release can fix that, so ``serve`` exits with ``EXIT_JOURNAL_NEWER``
    (the shipped unit does not restart on it)."""


EXIT_JOURNAL_NEWER = 3


class NotFound(WebhookdError):
    """The requested event does not exist (or was pruned)."""


class VerificationError(WebhookdError):
    """A webhook failed verification.

    ``reason`` is safe to send back to the caller: it names what was wrong in general terms
    ("signature mismatch", "timestamp outside tolerance") and never echoes secrets or digests.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail  # for the log alone: what the operator needs to see why


class ActionError(WebhookdError):
    """Base for outcomes an action signals by raising."""


class Retry(ActionError):
    """Ask for another attempt, not before ``after_s`` seconds if given."""

    def __init__(self, reason: str = "retry requested", *, after_s: float | None = None) -> None:
        # Checked here, where a handler's mistake shows in its own traceback (a retry saying
        # so), not later in the pool, where it would leave the job running for ever.
        if after_s is not None and (
            isinstance(after_s, bool) or not isinstance(after_s, int | float)
        ):
            raise TypeError(f"Retry(after_s=...) takes seconds as a number, not {after_s!r}")
        reason = str(reason)
        super().__init__(reason)
        self.reason = reason
        self.after_s = after_s


class Reject(ActionError):
    """Give up on this job: it goes to the dead-letter queue with ``reason``."""

    def __init__(self, reason: str = "rejected") -> None:
        reason = str(reason)
        super().__init__(reason)
        self.reason = reason
