"""Time sources: wall clock for timestamps, monotonic for intervals; both injectable in tests."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (journal timestamps, run_at)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps back (rate limits, timeouts)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock:
    """A clock that moves only when told to: for deterministic tests."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock alone (back: negative), as NTP or ``date -s`` does."""
        self._now += seconds


SYSTEM_CLOCK = SystemClock()


# -- a clock that is wrong -----------------------------------------------------------------------

# Before this, the wall clock is not set (a machine with no clock of its own that has booted at
# 1970 and not yet synced): ids, retries and retention all go by it, so serve refuses to start.
WALL_FLOOR = 1_672_531_200.0  # 2023-01-01T00:00:00Z
# A step of the wall clock against the monotonic one this large is told, and moves the queued
# jobs' times with it. NTP slews a small offset (at most 0.5 ms a second), never
# this; a step is a clock set by hand, an NTP step at boot, or a machine resumed.
STEP_S = 10.0


def unset_clock(now: float) -> str | None:
    """Why the wall clock reading ``now`` cannot be the time, else None."""
    if now >= WALL_FLOOR:
        return None
    shown = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(max(now, 0)))
    return (
        f"the system clock reads {shown}, before 2023: it has not been set. Event and job ids,"
        " retries and retention go by it; start webhookd once it is (the shipped systemd unit"
        " starts after time-sync.target)"
    )


class StepWatch:
    """Tells a step of the wall clock: how far it moved against the monotonic clock since the
    last look, when that is ``STEP_S`` or more (back: negative), else 0."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._offset = clock.time() - clock.monotonic()

    def step(self) -> float:
        offset = self.clock.time() - self.clock.monotonic()
        moved, self._offset = offset - self._offset, offset
        return moved if abs(moved) >= STEP_S else 0.0
