"""The burst hold: while the receiver answers a burst, new jobs wait for it (intake first).

The receiver is busy when it answered a new event that had waited with ``BUSY_WAITING`` others
(``IntakeState.busy_at``). Within HOLD_WINDOW_S of that, no new job starts: the jobs running go
on, the rest wait in the journal until the burst is answered. Measured on 2 cores, 40,000
webhooks posted by wrk over 64 connections, a forward each: acked in 18.3 s with the forwards
running beside intake; 10.3-11.7 s with the hold, as fast as with the source paused (9.7-11.8
s). The window bridges a burst's short lulls (with 50 ms, 600 of a 10,000 burst's jobs started
before it was answered).

A hold lasts at most HOLD_MAX_S, then jobs run for as long again whatever the receiver has
waiting: a flood that never ends cannot starve them. While it lasts the dispatcher looks again
every HOLD_RECHECK_S. A burst that has ended (no webhook waiting for its commit and none
answered for HOLD_QUIET_S) ends the hold sooner: no lull of a burst leaves the receiver with
nothing at all to answer, so jobs need not wait out the window (20,000 posted over 64
connections: the last quarter second of idle before its jobs).
"""

from __future__ import annotations

import math

from webhookd.state import IntakeState

HOLD_WINDOW_S = 0.25
HOLD_MAX_S = 15.0
HOLD_RECHECK_S = 0.01
HOLD_QUIET_S = 0.02


def intake_busy(intake: IntakeState | None, now: float) -> bool:
    """Whether the receiver had a burst waiting within HOLD_WINDOW_S of ``now`` (monotonic)."""
    return intake is not None and now - intake.busy_at < HOLD_WINDOW_S


class BurstHold:
    """Whether new jobs wait for the receiver, asked once per dispatch round."""

    __slots__ = ("_answered", "_answered_since", "_held_since", "_no_hold_until")

    def __init__(self) -> None:
        self._held_since: float | None = None  # when the hold under way began
        self._no_hold_until = -math.inf  # after a hold of HOLD_MAX_S: jobs run until then
        # The receiver's answered events when last looked, and since when (-1: never looked,
        # so a first look never finds the receiver quiet already).
        self._answered = -1
        self._answered_since = -math.inf

    def holds(self, intake: IntakeState | None, now: float) -> bool:
        """Whether new jobs wait for the receiver at ``now`` (monotonic)."""
        if intake is None or not intake_busy(intake, now) or self._quiet(intake, now):
            self._held_since = None
            return False
        if now < self._no_hold_until:
            return False
        if self._held_since is None:
            self._held_since = now
        elif now - self._held_since >= HOLD_MAX_S:
            self._held_since = None
            self._no_hold_until = now + HOLD_MAX_S
            return False
        return True

    def _quiet(self, intake: IntakeState, now: float) -> bool:
        """Whether the receiver has had nothing waiting for a commit and answered no new event
        for HOLD_QUIET_S: the burst is over, whatever the hold's window says."""
        if intake.waiting or intake.accepted != self._answered:
            self._answered = intake.accepted
            self._answered_since = now
            return False
        return now - self._answered_since >= HOLD_QUIET_S
