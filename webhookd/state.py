"""State the receiver keeps and the rest of the daemon reads: draining, observers, counters.

It lives below both the receiver and the admin API, so neither has to import the other: the app
creates one ``IntakeState`` and hands it to the receiver, the admin API and the metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class IntakeState:
    """What the receiver shares with the rest of the daemon."""

    draining: bool = False
    # Observers of every answer: (source or "", status, seconds spent). Metrics subscribe here.
    observers: list[Callable[[str, int, float], None]] = field(default_factory=list)
    verify_failures: int = 0
