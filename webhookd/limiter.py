"""Lanes: shared RPM/TPM limits for LLM calls, with FIFO admission, reservations and circuit.

A lane is a pair of buckets (requests, tokens). Each bucket is a token bucket holding
``burst_s`` seconds' worth and refilling at ``limit/60`` per second, plus a log of what was
admitted in the last 60.5 s. The bucket keeps calls smooth; the log makes the promise hard: an
admission at ``t`` waits until everything admitted in ``(t - 60.5, t]`` plus itself fits the
per-minute limit, so no 60 s window ``[s, s + 60)`` ever holds more than ``rpm``/``tpm``, even
counted by arrival at the provider when calls take up to half a second longer to get there
than their neighbours (``JITTER_GUARD_S``).
(A bucket alone allows ``burst + 60 s of refill`` per minute; cutting the refill instead would
fail lanes whose requests are bigger than the burst, which is the usual case for LLM calls.)

A request bigger than the burst is admitted when its bucket is full and leaves it in debt, so it
never deadlocks and later calls wait the debt off; one bigger than a whole minute's limit waits
for an empty log and then goes through alone. Refunds (``settle``) are reusable at once;
an under-estimate charged at settle time can exceed the bound, after the fact.

With a journal shared by several nodes (``store``, PostgreSQL) the buckets and the log move
into the journal (``BaseJournal.reserve_lane``) and this lane only spends what the journal
granted it: a chunk of about ``CHUNK_S`` of refill per round trip, kept at most
``CHUNK_TTL_S`` and handed back with the next request when unspent. Settlements ride along with
that request too, and a 429's cool-down or an open circuit is written to the journal for every
node (``publish``). When the journal cannot be reached the lane admits nothing (``LaneBusy``):
guessing would let every node spend the whole budget.

On a journal of its own (SQLite) the log lives in memory, and a restart would start it empty
while the provider still counts the minute before: a lane of 120 rpm let 127 calls into one
60 s window across a ``kill -9``, a fresh burst on top of the previous process's calls. So the
daemon's start seeds each lane (``Lane.seed``) with the calls its actions made in the last
``LOG_S``, read from their attempts (``BaseJournal.lane_calls``): each at the time it left and
with the tokens it used, as the attempt's detail says, else at the attempt's end, which no call
is after (a call a crash cut off counts as made at the restart). The bucket is replayed
through them, so no burst is added on top; the bound then holds across a restart, clean or
not. Hazards left, not seen: a call answered 429 (a wait records no attempt; the provider
was refusing then anyway); the prompt of a call whose attempt kept no count (a crash's, an
earlier release's: it counts the action's ``max_tokens``); a step of the wall clock between
the two processes (the calls move with it); another process or node calling on the same API
key. ``observe_remaining`` lowers the local estimate from response headers for those.

Not aiolimiter: it starts empty and then bursts a whole period, has no refund, and lets small
requests overtake a large one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.config.sections import LaneConfig
from webhookd.errors import JournalError, WebhookdError
from webhookd.models import LaneGrant, LaneSpec

WINDOW_S = 60.0
# An admission stays in the log this much longer than the window it is counted for. The lane
# counts a call when it admits it, the provider when it arrives; a call that takes longer to
# arrive than the one admitted 60 s after it would otherwise put limit + 1 calls into one of the
# provider's 60 s windows (seen against the stand-in at 100 % of the limit). Costs under 1 % of
# a saturated lane.
JITTER_GUARD_S = 0.5
LOG_S = WINDOW_S + JITTER_GUARD_S
# Float rounding (and the event loop's timer) can wake a sleeper a hair before an entry leaves
# the log; a re-sleep below one ulp of the clock would never move it, so naps are at least
# this long.
_MIN_NAP_S = 1e-6

# A shared lane asks the journal for about this much refill per round trip, and for at least a
# quarter of it when a node's queue wants more than one call: a bound on round trips per second.
CHUNK_S = 1.0
MIN_CHUNK_S = 0.25
# How long a node may spend a grant. The journal's log keeps grants this much longer than
# LOG_S, so a chunk spent late still counts in every 60 s window it can fall in.
CHUNK_TTL_S = 1.0
SHARED_LOG_S = LOG_S + CHUNK_TTL_S
# A job refused because the journal is unreachable comes back after this long.
JOURNAL_RETRY_S = 5.0
# Workers waiting in a lane's line at once, at most: the dispatcher starts no job of an action
# that names the lane past ``Lane.most_waiting`` (two seconds of its rpm, and at least this).
# Each waiter holds a worker; more than the lane admits in a second or two only kept other
# sources' jobs from the workers (800 queued model calls at rpm 450 held all 32 workers, and
# a burst of forwards to an idle target got 37 of 200 through in 20 s).
MOST_WAITING_FLOOR = 4
# The most calls of an earlier process a lane without an ``rpm`` is seeded with (``Lane.seed``):
# one with an rpm takes its latest ``rpm``, all that a window holds.
MOST_SEEDED = 10_000
# A call asked back at its turn has this long past it to come and take it (a job is picked a
# little after its time) before later calls may; and a lane keeps at most this many such
# turns, each of which an asked-back call's projection counts (the rest are asked back as
# their projection says, uncounted).
PROMISE_GRACE_S = 5.0
MOST_PROMISES = 1_000

Sleep = Callable[[float], Awaitable[None]]


class LaneStore(Protocol):
    """Where shared lanes' buckets live: ``BaseJournal`` where ``shares_lanes`` is true."""

    async def reserve_lane(
        self,
        spec: LaneSpec,
        *,
        need: tuple[float, float],
        want: tuple[float, float],
        returns: Sequence[tuple[float, float, float]] = (),
    ) -> LaneGrant: ...

    async def cool_lane(self, spec: LaneSpec, seconds: float) -> None: ...

    async def set_lane_circuit(self, spec: LaneSpec, reason: str | None) -> None: ...


class LaneBusy(WebhookdError):
    """The lane cannot admit soon enough: reschedule the job, without using an attempt."""

    def __init__(self, retry_after_s: float, *, lane: str = "", reason: str = "busy") -> None:
        super().__init__(f"lane {lane!r} {reason}: retry in {retry_after_s:.3f}s")
        self.retry_after_s = retry_after_s
        self.lane = lane
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LaneStats:
    name: str
    rpm: int | None
    tpm: int | None
    requests_available: float | None  # None: unlimited; negative: in debt
    tokens_available: float | None
    waiting: int
    cooling_until_s: float  # seconds of cooldown left, 0 if none
    circuit_open: bool
    admitted_total: int
    tokens_debited_total: int  # net: reserved, less what settling gave back
    tokens_refunded_total: int  # what settling gave back (reserved past a call's actual use)
    waits_total: int
    busy_total: int


class _Entry:
    __slots__ = ("amount", "at")

    def __init__(self, at: float, amount: float) -> None:
        self.at = at
        self.amount = amount


@dataclass(eq=False, slots=True)
class Reservation:
    """Tokens debited at admission; hand it back to ``Lane.settle`` with the actual usage."""

    lane: str
    tokens: int
    admitted_at_s: float  # on the lane's monotonic clock
    _entry: _Entry | None = field(default=None, repr=False)
    _request: _Entry | None = field(default=None, repr=False)  # the call's place in the RPM log
    _grant_at: float | None = field(default=None, repr=False)  # shared lanes: whose chunk
    _settled: bool = field(default=False, repr=False)


class _Bucket:
    """One dimension of a lane: a token bucket plus the log of the last ``LOG_S`` of admissions."""

    def __init__(self, per_minute: int, burst_s: float, now: float) -> None:
        self.limit = per_minute
        self.rate = per_minute / WINDOW_S
        self.capacity = self.rate * burst_s
        self.level = self.capacity  # full of the burst only, never a minute's worth
        self.updated = now
        self.log: deque[_Entry] = deque()
        self.in_window = 0.0

    def refresh(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        cutoff = now - LOG_S
        while self.log and self.log[0].at <= cutoff:
            self.in_window -= self.log.popleft().amount
        if not self.log:
            self.in_window = 0.0  # drop float drift

    def wait_s(self, amount: float, now: float, ahead: float = 0.0) -> float:
        """Seconds until ``amount`` is admissible after ``ahead`` more has gone first."""
        # Oversize: only wait for a full bucket (see the module docstring). A shortfall of a
        # billionth of a token is refill rounding, not a reason to nap again.
        shortfall = ahead + min(amount, self.capacity) - self.level
        bucket_s = shortfall / self.rate if shortfall > 1e-9 else 0.0
        excess = self.in_window + ahead + min(amount, self.limit) - self.limit
        window_s = 0.0
        if excess > self.in_window:
            # Only when projecting a long queue: every logged entry expires, then more refill.
            last_s = self.log[-1].at + LOG_S - now if self.log else 0.0
            window_s = max(last_s, 0.0) + (excess - self.in_window) / self.rate
        elif excess > 0:
            freed = 0.0
            for entry in self.log:
                freed += entry.amount
                if freed >= excess:
                    window_s = entry.at + LOG_S - now
                    break
            else:
                window_s = self.log[-1].at + LOG_S - now
        return max(0.0, bucket_s, window_s)

    def seed(self, entries: Sequence[tuple[float, float]], now: float) -> None:
        """Replay admissions made before ``now`` (times on this clock, oldest first) into a
        bucket that has admitted nothing: its log holds them, and its level is what they left
        of a bucket full before the first, refilled since. No burst of a fresh bucket on top."""
        if not entries:
            return
        self.updated = entries[0][0]
        for at, amount in entries:
            self.refresh(at)
            self.take(amount, at)
        self.refresh(now)

    def take(self, amount: float, now: float) -> _Entry:
        self.level -= amount
        entry = _Entry(now, amount)
        self.log.append(entry)
        self.in_window += amount
        return entry

    def adjust(self, entry: _Entry, delta: float, now: float) -> None:
        self.level -= delta
        if delta < 0:
            self.level = min(self.level, self.capacity)
        if entry.at > now - LOG_S:  # still in the log (refresh ran first)
            entry.amount += delta
            self.in_window += delta


class _Waiter:
    __slots__ = ("key", "signal", "tokens")

    def __init__(self, tokens: int, key: object) -> None:
        self.tokens = tokens
        self.key = key  # the call's (a job's id), as ``acquire`` was given it
        self.signal: asyncio.Future[None] | None = None

    def arm(self) -> asyncio.Future[None]:
        self.signal = asyncio.get_running_loop().create_future()
        return self.signal

    def wake(self) -> None:
        if self.signal is not None and not self.signal.done():
            self.signal.set_result(None)


class Lane:
    """A named RPM/TPM limit shared by every action that names it."""

    def __init__(
        self,
        config: LaneConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        sleep: Sleep = asyncio.sleep,
        probe_after_s: float | None = 60.0,
        store: LaneStore | None = None,
    ) -> None:
        if not config.burst_s > 0:
            raise ValueError(f"lane {config.name!r}: burst_s must be greater than 0")
        if not (math.isfinite(config.max_cooldown_s) and config.max_cooldown_s > 0):
            raise ValueError(f"lane {config.name!r}: max_cooldown_s must be finite and above 0")
        for key, value in (("rpm", config.rpm), ("tpm", config.tpm)):
            if value is not None and value <= 0:
                raise ValueError(f"lane {config.name!r}: {key} must be greater than 0")
        self.config = config
        self.name = config.name
        self._clock = clock
        self._sleep = sleep
        self._probe_after_s = probe_after_s
        now = clock.monotonic()
        self._requests = _Bucket(config.rpm, config.burst_s, now) if config.rpm else None
        self._tokens = _Bucket(config.tpm, config.burst_s, now) if config.tpm else None
        self._queue: deque[_Waiter] = deque()
        self.most_waiting = max(MOST_WAITING_FLOOR, math.ceil((config.rpm or 0) / WINDOW_S * 2))
        # Called when a call is admitted or leaves the line (the worker pool's wake: another
        # job of the lane may start once fewer than ``most_waiting`` wait).
        self.on_change: Callable[[], None] | None = None
        # Called with a call's ``key`` as it comes to ``acquire``, before it is admitted, turned
        # away or put in line (the worker pool's count of jobs started for the lane whose call
        # is not here yet: they are not in ``waiting``, and may all join the line).
        self.on_arrival: Callable[[object], None] | None = None
        # Called with a call's ``key`` as it takes its place in line, to wait (the worker
        # pool's drain hands such a job back at once rather than wait for its turn).
        self.on_wait: Callable[[object], None] | None = None
        self._cooling_until = -math.inf
        self._circuit_reason: str | None = None
        self._probe_at = math.inf
        self._admitted_total = 0
        self._tokens_debited_total = 0
        self._tokens_refunded_total = 0
        self._waits_total = 0
        self._busy_total = 0
        self._seeded = False
        # Calls refused with "has a long wait" and told when to come back, by the key they
        # came with (a job's id): each later projection counts them ahead, so a backlog
        # refused at once is asked back one slot apart, in the order it was refused, instead
        # of all together at the first slot (5,000 jobs at rpm 6 came back every few seconds,
        # each refused again). A promise lapses when its time comes, or when its call comes
        # back (a little early, it counted itself ahead and was refused again: rpm 20 used 14).
        self._promised: dict[object, tuple[float, int]] = {}
        self._promise_times: list[tuple[float, int, object]] = []  # (when, n, key), soonest first
        self._promises_made = 0
        self._promised_tokens = 0
        # Shared lanes: the journal's chunk being spent, what goes back with the next request,
        # and what a 429 or the circuit changed that the other nodes must hear of.
        self._store = store
        self._spec = LaneSpec(
            config.name, config.rpm, config.tpm, config.burst_s, SHARED_LOG_S, probe_after_s
        )
        self._grant_at: float | None = None
        self._grant_until = -math.inf
        self._stock = [0.0, 0.0]  # requests, tokens
        self._returns: list[tuple[float, float, float]] = []
        self._reserving = asyncio.Lock()
        self._publish_cool_s = 0.0
        self._publish_circuit: tuple[str | None] | None = None

    @property
    def shared(self) -> bool:
        return self._store is not None

    @property
    def most_seeded(self) -> int:
        """The most earlier calls ``seed`` counts: the latest ``rpm`` (more than a window
        holds change no admission), else ``MOST_SEEDED``."""
        return self.config.rpm or MOST_SEEDED

    def seed(self, calls: Iterable[tuple[float, int]]) -> int:
        """Count the calls an earlier process made through this lane, (wall-clock time each
        left, its tokens), as admitted here: a restart's lane goes on from the minute before it
        instead of starting with a fresh burst on top of it. Before the lane admits anything,
        and only a lane of its own (a shared lane's log is in the journal). Returns how many it
        counted: those of the last ``LOG_S``, at most ``most_seeded``, the latest.

        Each time goes from the wall clock to the lane's monotonic one by the offset between
        them now; a call dated after now (the wall clock stepped back since) counts as now."""
        if self._store is not None:
            raise ValueError(f"lane {self.name!r} is shared: its log is the journal's")
        if self._admitted_total or self._queue or self._promised or self._seeded:
            raise ValueError(f"lane {self.name!r} has admitted or been seeded already")
        self._seeded = True
        wall, now = self._clock.time(), self._clock.monotonic()
        entries = sorted(
            (now - max(wall - at, 0.0), max(tokens, 0)) for at, tokens in calls if wall - at < LOG_S
        )[-self.most_seeded :]
        if self._requests is not None:
            self._requests.seed([(at, 1.0) for at, _ in entries], now)
        if self._tokens is not None:
            self._tokens.seed([(at, float(tokens)) for at, tokens in entries], now)
        return len(entries)

    async def acquire(self, tokens: int, *, max_wait_s: float, key: object = None) -> Reservation:
        """Admit a call estimated at ``tokens``, in FIFO order, or raise ``LaneBusy``: at once
        when its wait would be longer than ``max_wait_s``, and from its place in line when the
        wait grows past it. ``key``: the same for a call asked back as when it was refused (a
        job's id)."""
        if self.on_arrival is not None:
            self.on_arrival(key)
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        if self._store is not None:
            return await self._acquire_shared(tokens, max_wait_s, key)
        now = self._now()
        self._check_open(now)  # a call turned away while the lane cools keeps its turn
        turn = self._keep_no_promise(key)
        ahead, ahead_tokens = self._ahead(now, turn)
        projected_s = self._wait_s(tokens, now, ahead, ahead_tokens)
        if not self._queue and projected_s <= 0:  # nothing in line, nor asked back before it
            return self._admit(tokens, now)
        if projected_s > max_wait_s:
            raise self._promise(projected_s, tokens, now, key)
        # The wait can grow once in line (an under-estimate charged by ``settle``, the
        # upstream's ``x-ratelimit-remaining-*``): past max_wait_s the call leaves, its worker
        # freed, rather than holding it until the attempt's timeout_s.
        deadline = now + max_wait_s
        with self._in_line(tokens, key) as waiter:
            while True:
                if self._queue[0] is not waiter:
                    await waiter.arm()
                else:
                    wait_s = self._wait_s(tokens, now)
                    if wait_s <= 0:
                        return self._admit(tokens, now)
                    if now + wait_s > deadline:
                        raise self._busy(wait_s, "has a long wait")
                    await self._nap(waiter, max(wait_s, _MIN_NAP_S))
                now = self._now()
                self._check_open(now)

    @contextlib.contextmanager
    def _in_line(self, tokens: int, key: object) -> Iterator[_Waiter]:
        """A place at the back of the lane's FIFO, given up on the way out however it ends
        (admitted, refused, cancelled); leaving from the head wakes the next in line."""
        waiter = _Waiter(tokens, key)
        self._queue.append(waiter)
        self._waits_total += 1
        try:
            if self.on_wait is not None:
                self.on_wait(key)  # inside: a cancel it asks for leaves the line as any other
            yield waiter
        finally:
            was_head = self._queue[0] is waiter
            self._queue.remove(waiter)
            if was_head and self._queue:
                self._queue[0].wake()
            if self.on_change is not None:
                self.on_change()

    @property
    def waiting(self) -> int:
        """Calls waiting in line (each holds a worker)."""
        return len(self._queue)

    def in_line(self) -> list[object]:
        """The keys of the calls waiting in line, first first."""
        return [waiter.key for waiter in self._queue]

    def settle(self, reservation: Reservation, actual_tokens: int) -> None:
        """Refund or charge the difference between the reserved and the actual token count."""
        if reservation.lane != self.name:
            raise ValueError(f"reservation belongs to lane {reservation.lane!r}, not {self.name!r}")
        if reservation._settled:
            raise ValueError("reservation already settled")
        if actual_tokens < 0:
            raise ValueError("actual_tokens must be >= 0")
        reservation._settled = True
        delta = actual_tokens - reservation.tokens
        self._tokens_debited_total += delta
        if delta < 0:
            self._tokens_refunded_total -= delta
        if self._store is not None:
            # Batched: the difference goes to the shared bucket with the next reservation.
            if self.config.tpm and reservation._grant_at is not None and delta:
                self._returns.append((reservation._grant_at, 0.0, float(delta)))
            return
        if self._tokens is None or reservation._entry is None or delta == 0:
            return
        now = self._now()
        self._tokens.adjust(reservation._entry, delta, now)
        if delta < 0:
            self._wake_head()

    def withdraw(self, reservation: Reservation) -> None:
        """Give back all ``reservation`` took, its request as well as its tokens: the call it
        admitted was not made (its source was paused while it waited for the lane)."""
        self.settle(reservation, 0)
        if self._store is not None:
            if self.config.rpm and reservation._grant_at is not None:
                self._returns.append((reservation._grant_at, -1.0, 0.0))
            return
        if self._requests is not None and reservation._request is not None:
            self._requests.adjust(reservation._request, -1, self._now())
            self._wake_head()

    def observe_remaining(self, requests: int | None, tokens: int | None) -> None:
        """Lower the local levels to the upstream's ``x-ratelimit-remaining-*``; never raise."""
        self._now()
        for bucket, remaining in ((self._requests, requests), (self._tokens, tokens)):
            if bucket is None or remaining is None:
                continue
            if remaining < 0:
                raise ValueError("remaining must be >= 0")
            bucket.level = min(bucket.level, remaining)

    def cooldown(self, seconds: float) -> float:
        """Admit nothing for ``seconds`` (after a 429; pass its Retry-After), at most the lane's
        ``max_cooldown_s``: one 429 asking for days must not park the whole lane. Returns the
        seconds actually applied."""
        if not seconds >= 0:  # also refuses nan
            raise ValueError("seconds must be >= 0")
        seconds = min(seconds, self.config.max_cooldown_s)
        self._cooling_until = max(self._cooling_until, self._now() + seconds)
        self._publish_cool_s = max(self._publish_cool_s, seconds)
        self._drop_stock()
        self._wake_all()  # queued jobs leave with LaneBusy instead of holding workers
        return seconds

    def open_circuit(self, reason: str) -> None:
        """Refuse admissions until ``close_circuit`` (after ``insufficient_quota``).

        With ``probe_after_s`` set, one call is let through every ``probe_after_s`` to find out
        whether the quota is back; its caller closes the circuit on success.
        """
        now = self._now()
        self._circuit_reason = reason
        self._probe_at = now + self._probe_after_s if self._probe_after_s is not None else math.inf
        self._publish_circuit = (reason,)
        self._drop_stock()
        self._wake_all()

    def close_circuit(self) -> None:
        self._circuit_reason = None
        self._probe_at = math.inf
        self._publish_circuit = (None,)
        self._wake_head()

    async def publish(self) -> None:
        """Tell every node what ``cooldown``/``open_circuit``/``close_circuit`` changed here
        (shared lanes; nothing to do otherwise). Call it after them, outside the lane's lock."""
        cool_s, self._publish_cool_s = self._publish_cool_s, 0.0
        circuit, self._publish_circuit = self._publish_circuit, None
        if self._store is None:
            return
        # The journal unreachable: this node honours the change alone, and the others admit
        # nothing anyway until it is back (every reservation goes through it).
        with contextlib.suppress(JournalError):
            if cool_s > 0:
                await self._store.cool_lane(self._spec, cool_s)
            if circuit is not None:
                await self._store.set_lane_circuit(self._spec, circuit[0])

    def statistics(self) -> LaneStats:
        now = self._now()
        requests = self._requests.level if self._requests else None
        tokens = self._tokens.level if self._tokens else None
        if self._store is not None:  # what this node holds of the shared bucket
            stock = self._stock if now < self._grant_until else [0.0, 0.0]
            requests = stock[0] if self.config.rpm else None
            tokens = stock[1] if self.config.tpm else None
        return LaneStats(
            name=self.name,
            rpm=self.config.rpm,
            tpm=self.config.tpm,
            requests_available=requests,
            tokens_available=tokens,
            waiting=len(self._queue),
            cooling_until_s=max(0.0, self._cooling_until - now),
            circuit_open=self._circuit_reason is not None,
            admitted_total=self._admitted_total,
            tokens_debited_total=self._tokens_debited_total,
            tokens_refunded_total=self._tokens_refunded_total,
            waits_total=self._waits_total,
            busy_total=self._busy_total,
        )

    def _now(self) -> float:
        now = self._clock.monotonic()
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.refresh(now)
        return now

    def _wait_s(
        self, tokens: int, now: float, requests_ahead: int = 0, tokens_ahead: int = 0
    ) -> float:
        wait_s = 0.0
        if self._requests is not None:
            wait_s = self._requests.wait_s(1, now, requests_ahead)
        if self._tokens is not None:
            wait_s = max(wait_s, self._tokens.wait_s(tokens, now, tokens_ahead))
        return wait_s

    def _check_open(self, now: float) -> None:
        if self._circuit_reason is not None and now < self._probe_at:
            retry_s = self._probe_at - now if self._probe_after_s is not None else WINDOW_S
            raise self._busy(retry_s, f"circuit open ({self._circuit_reason})")
        if now < self._cooling_until:
            raise self._busy(self._cooling_until - now, "cooling down")

    def _ahead(self, now: float, turn: float = math.inf) -> tuple[int, int]:
        """Calls (and their tokens) a new one would come after: those in line, and those told
        to come back at a time still to come; for one asked back at ``turn`` itself, those
        told to come back before it."""
        times = self._promise_times
        while times and times[0][0] + PROMISE_GRACE_S <= now:
            when, _, key = heapq.heappop(times)
            # Not a promise made since to the same key (it came back, and was asked back later).
            if (kept := self._promised.get(key)) is not None and kept[0] == when:
                self._keep_no_promise(key)
        in_line = sum(w.tokens for w in self._queue)
        if turn == math.inf:
            return len(self._queue) + len(self._promised), in_line + self._promised_tokens
        before = [tokens for when, tokens in self._promised.values() if when < turn]
        return len(self._queue) + len(before), in_line + sum(before)

    def _keep_no_promise(self, key: object) -> float:
        """Take back the promise made to ``key``, if any: when its turn was (else inf)."""
        if key is None or (kept := self._promised.pop(key, None)) is None:
            return math.inf
        self._promised_tokens -= kept[1]
        return kept[0]

    def _promise(self, projected_s: float, tokens: int, now: float, key: object) -> LaneBusy:
        """``LaneBusy`` for a call the lane cannot admit within its wait: asked back when its
        turn comes (at most ``max_cooldown_s`` on), a turn the next projections count."""
        busy = self._busy(projected_s, "has a long wait")
        if len(self._promised) >= MOST_PROMISES:
            return busy  # asked back as before promises: a bound on what each turn counts
        self._promises_made += 1
        key = key if key is not None else self._promises_made  # unnamed: its own
        when = now + busy.retry_after_s
        self._promised[key] = (when, tokens)
        self._promised_tokens += tokens
        heapq.heappush(self._promise_times, (when, self._promises_made, key))
        return busy

    def _busy(self, retry_after_s: float, reason: str) -> LaneBusy:
        self._busy_total += 1
        # Every wait a lane hands out is bounded like its cool-down: a job asked back too early
        # only meets LaneBusy again, one asked back too late sits idle for nothing.
        retry_after_s = min(retry_after_s, self.config.max_cooldown_s)
        return LaneBusy(retry_after_s, lane=self.name, reason=reason)

    def _admit(self, tokens: int, now: float) -> Reservation:
        # Requests and tokens are debited together, with no await in between.
        if self._circuit_reason is not None and self._probe_after_s is not None:
            self._probe_at = now + self._probe_after_s  # this call is the half-open probe
        request = self._requests.take(1, now) if self._requests is not None else None
        entry = self._tokens.take(tokens, now) if self._tokens is not None else None
        self._admitted_total += 1
        self._tokens_debited_total += tokens
        if self.on_change is not None:
            self.on_change()
        return Reservation(self.name, tokens, now, entry, request)

    # -- shared lanes ------------------------------------------------------------------------

    async def _acquire_shared(self, tokens: int, max_wait_s: float, key: object) -> Reservation:
        """``acquire`` spending chunks the journal grants: the same FIFO, cool-down and circuit,
        and a wait bounded by ``max_wait_s`` (other nodes share the refill, so a projection
        from this node's queue alone is only a lower bound)."""
        now = self._clock.monotonic()
        self._check_open(now)
        turn = self._keep_no_promise(key)
        no_turns_before = not self._ahead(now, turn)[0]
        if not self._queue and no_turns_before and self._stock_covers(tokens, now):
            return self._admit_shared(tokens, now)
        projected_s = self._projected_shared_s(tokens, now, turn)
        if projected_s > max_wait_s:
            raise self._promise(projected_s, tokens, now, key)
        deadline = now + max_wait_s
        with self._in_line(tokens, key) as waiter:
            while True:
                if self._queue[0] is not waiter:
                    await waiter.arm()
                elif self._stock_covers(tokens, now):
                    return self._admit_shared(tokens, now)
                else:
                    retry_s = await self._reserve(tokens, now)
                    now = self._clock.monotonic()
                    self._check_open(now)  # the journal may say the lane is cooling or shut
                    if retry_s > 0:
                        if now + retry_s > deadline:
                            raise self._busy(retry_s, "has a long wait")
                        await self._nap(waiter, max(retry_s, _MIN_NAP_S))
                now = self._clock.monotonic()
                self._check_open(now)
                if now > deadline and not self._stock_covers(tokens, now):
                    raise self._busy(self._projected_shared_s(tokens, now), "has a long wait")

    def _projected_shared_s(self, tokens: int, now: float, turn: float = math.inf) -> float:
        """This node's queue (and the calls it asked back, before ``turn``) at the lane's whole
        rate: how long it takes at best."""
        wait_s = 0.0
        ahead_calls, ahead_tokens = self._ahead(now, turn)
        if self.config.rpm:
            ahead = ahead_calls + 1 - self._stock[0]
            wait_s = max(wait_s, ahead / (self.config.rpm / WINDOW_S))
        if self.config.tpm:
            ahead = ahead_tokens + min(tokens, self.config.tpm)
            wait_s = max(wait_s, (ahead - self._stock[1]) / (self.config.tpm / WINDOW_S))
        return max(wait_s - self.config.burst_s, 0.0)

    def _stock_covers(self, tokens: int, now: float) -> bool:
        if now >= self._grant_until:
            return False
        return (not self.config.rpm or self._stock[0] >= 1) and (
            not self.config.tpm or self._stock[1] >= tokens
        )

    def _admit_shared(self, tokens: int, now: float) -> Reservation:
        if self._circuit_reason is not None and self._probe_after_s is not None:
            self._probe_at = now + self._probe_after_s  # this call is the half-open probe
        self._stock[0] -= 1
        self._stock[1] -= tokens
        self._admitted_total += 1
        self._tokens_debited_total += tokens
        if self.on_change is not None:
            self.on_change()
        return Reservation(self.name, tokens, now, None, None, self._grant_at)

    def _drop_stock(self) -> None:
        """Give the unspent chunk back with the next request (it was never used)."""
        if self._grant_at is not None and (self._stock[0] > 0 or self._stock[1] > 0):
            self._returns.append(
                (self._grant_at, -max(self._stock[0], 0.0), -max(self._stock[1], 0.0))
            )
        self._stock = [0.0, 0.0]
        self._grant_at = None
        self._grant_until = -math.inf

    async def _reserve(self, head_tokens: int, now: float) -> float:
        """One round trip for a chunk covering at least the head; returns 0 when granted, else
        how long to wait before asking again. Raises ``LaneBusy`` when the journal is down."""
        store = self._store
        if store is None:  # pragma: no cover - only shared lanes reserve
            raise RuntimeError("not a shared lane")
        async with self._reserving:
            if self._stock_covers(head_tokens, self._clock.monotonic()):
                return 0.0  # another head reserved meanwhile
            need, want = self._chunk(head_tokens)
            self._drop_stock()
            returns, self._returns = self._returns, []
            try:
                grant = await store.reserve_lane(self._spec, need=need, want=want, returns=returns)
            except JournalError as exc:
                # A failed write: its returns go with the next one (only a connection lost
                # at the commit leaves one in doubt). A round trip cancelled instead (a job's
                # timeout_s, a drain) is in doubt as a rule, so its returns are dropped rather
                # than counted twice, which would let the cluster past its limit: the lane is
                # under-used until they age out of its log (SHARED_LOG_S).
                self._returns = returns + self._returns
                raise self._busy(
                    JOURNAL_RETRY_S, f"admits nothing: the journal is unreachable ({exc})"
                ) from exc
        now = self._clock.monotonic()
        if grant.cooling_s > 0:
            self._cooling_until = max(self._cooling_until, now + grant.cooling_s)
        if grant.circuit is None:
            self._circuit_reason = None
            self._probe_at = math.inf
        else:
            self._circuit_reason = grant.circuit
            self._probe_at = now + grant.probe_in_s
        if grant.requests <= 0 and grant.tokens <= 0:
            return max(grant.retry_s, _MIN_NAP_S)
        self._stock = [grant.requests, grant.tokens]
        self._grant_at = grant.at
        self._grant_until = now + CHUNK_TTL_S
        return 0.0

    def _chunk(self, head_tokens: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """(need, want) in (requests, tokens): the head at least, up to ``CHUNK_S`` of refill
        for the queue; at least ``MIN_CHUNK_S`` of it when the queue wants that much."""
        need = [0.0, 0.0]
        want = [0.0, 0.0]
        queued = max(len(self._queue), 1)
        queued_tokens = max(sum(w.tokens for w in self._queue), head_tokens)
        if self.config.rpm:
            rate = self.config.rpm / WINDOW_S
            want[0] = float(min(queued, max(1, math.floor(rate * CHUNK_S))))
            need[0] = float(max(1, min(want[0], math.floor(rate * MIN_CHUNK_S))))
        if self.config.tpm:
            rate = self.config.tpm / WINDOW_S
            want[1] = float(max(head_tokens, min(queued_tokens, math.floor(rate * CHUNK_S))))
            need[1] = float(max(head_tokens, min(want[1], math.floor(rate * MIN_CHUNK_S))))
        return (need[0], need[1]), (want[0], want[1])

    async def _nap(self, waiter: _Waiter, seconds: float) -> None:
        # The head sleeps the exact time its tokens need, but wakes early on a refund or a
        # cooldown, so the sleep runs as a task raced against the waiter's signal.
        signal = waiter.arm()
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait((sleeper, signal), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
        if sleeper.done():
            sleeper.result()  # a failing sleep must surface, not vanish with its task

    def _wake_head(self) -> None:
        if self._queue:
            self._queue[0].wake()

    def _wake_all(self) -> None:
        for waiter in self._queue:
            waiter.wake()


def build_lanes(
    configs: Mapping[str, LaneConfig],
    *,
    clock: Clock = SYSTEM_CLOCK,
    sleep: Sleep = asyncio.sleep,
    probe_after_s: float | None = 60.0,
    store: LaneStore | None = None,
) -> dict[str, Lane]:
    """One ``Lane`` per configured lane, keyed by name; shared through ``store`` if given."""
    return {
        name: Lane(config, clock=clock, sleep=sleep, probe_after_s=probe_after_s, store=store)
        for name, config in configs.items()
    }
