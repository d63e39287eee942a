"""The receiver's pacing: a source's intake limit and the deadline of each commit's ack."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from webhookd.clock import Clock


class TokenBucket:
    """A plain token bucket for per-source intake limits (one second of burst)."""

    def __init__(self, rate_per_s: float, clock: Clock) -> None:
        self.rate = rate_per_s
        self.capacity = max(rate_per_s, 1.0)
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 if granted, else the seconds until one will be there."""
        now = self.clock.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class _CommitTimeout(Exception):
    """The journal did not commit within ``server.ack_timeout_s``."""


class _Deadlines:
    """Fails commit futures still pending after ``timeout_s``, with one timer for all of them.

    A timeout per request (``asyncio.timeout``) costs a timer handle and a context manager on
    the hot path; webhooks reach the journal in order, so their deadlines are in order too and a
    queue with a single timer at its head does the same work. Failing a future only ends the
    waiting: the journal commits the event anyway, and the provider's retry is a duplicate.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._pending: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, future: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        self._pending.append((deadline, future))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire, loop)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        pending = self._pending
        while pending and (pending[0][1].done() or pending[0][0] <= now):
            _, future = pending.popleft()
            if not future.done():
                future.set_exception(_CommitTimeout())
        self._timer = loop.call_at(pending[0][0], self._expire, loop) if pending else None
