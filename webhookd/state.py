"""State the receiver keeps and the rest of the daemon reads: draining, observers, counters.

It lives below both the receiver and the admin API, so neither has to import the other: the app
creates one ``IntakeState`` and hands it to the receiver, the admin API and the metrics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# Webhooks waiting for their answer at once that make the receiver busy. A steady 1,000/s
# answered in 1-3 ms keeps 1-3 waiting (rate × time); 64 connections posting as fast as they
# are answered reached 16 often enough that a hold never lapsed in the middle of a burst.
BUSY_WAITING = 16

# Why the receiver answered 503, as ``webhookd_intake_unavailable_total`` labels it: draining;
# the backlog at server.max_backlog; server.max_inflight_body_bytes of bodies being read, or
# queued for a writer that is behind; a commit slower than ack_timeout_s; the journal failing
# writes; an unexpected error; a connection past server.max_connections.
UNAVAILABLE = (
    "shutting_down",
    "backlog_full",
    "bodies_in_flight",
    "writer_behind",
    "commit_timeout",
    "journal_unavailable",
    "internal_error",
    "max_connections",
)
# Those of them that are the journal's: a writer fallen behind, a commit past ack_timeout_s, a
# write that failed. What a journal alert counts.
JOURNAL_REFUSALS = ("writer_behind", "commit_timeout", "journal_unavailable")


@dataclass
class IntakeState:
    """What the receiver shares with the rest of the daemon."""

    draining: bool = False
    # Observers of every answer: (source or "", status, seconds spent). Metrics subscribe here.
    observers: list[Callable[[str, int, float], None]] = field(default_factory=list)
    verify_failures: int = 0
    # The receiver's 503s by why (UNAVAILABLE's reasons): the metrics export them.
    unavailable: Counter[str] = field(default_factory=Counter)
    # Deliveries answered as duplicates, by configured source (a catch-all's under "*"): a
    # sender retrying in a loop shows here, not among the events.
    duplicates: Counter[str] = field(default_factory=Counter)
    # New events journaled and answered as such: not a duplicate, not a provider's handshake
    # (answered 200 with nothing journaled). What ``Throughput`` measures intake by.
    accepted: int = 0
    # Webhooks read and waiting for their answer (the journal's commit), and when (on the daemon's
    # monotonic clock) a new event was last answered that had waited with BUSY_WAITING others
    # at once: the receiver then has more than it can answer, and the workers hold new jobs
    # back until it has caught up. Duplicates leave no job behind and mark nothing.
    waiting: int = 0
    busy_at: float = -math.inf

    def refused_by_journal(self) -> int:
        """Webhooks answered 503 so far for a reason of the journal's (``JOURNAL_REFUSALS``)."""
        return sum(self.unavailable[reason] for reason in JOURNAL_REFUSALS)
