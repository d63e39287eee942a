"""Lanes shared by every node: one token-bucket row per lane, reserved a chunk at a time.

A node asks for a chunk (about a second of refill) in one short transaction, spends it from
memory and hands back, with its next request, what it did not spend and what its calls'
settlements changed. The row holds, per dimension (requests, tokens), the bucket's level and
the log of the grants of the last ``log_s``: a grant is allowed only while the log plus itself
fits the per-minute limit, so no 60 s window of the whole cluster holds more than the limit
(``log_s`` covers the window, the time a node may hold a chunk, and arrival jitter). A 429's
cool-down and an open circuit live in the row too, so every node honours them.

``plan`` is the arithmetic, free of I/O, on the journal's wall clock (hosts' clocks must agree,
as for leases). A step of that clock is not time: ``unstep`` moves the row's times by what a
step added to or took from the time since the row was last written, so a step back does not
wedge the lane for the length of the step and a step forward does not empty its log at once.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from webhookd.clock import STEP_S, Clock
from webhookd.models import LaneGrant, LaneSpec

WINDOW_S = 60.0
# A node that finds nothing for it asks again after this long at most: a grant refused because
# another node holds the chunk must not park a lane's only waiter.
_MAX_RETRY_S = 5.0
_NO_PROBE_S = 60.0  # an open circuit with no probe interval: look again after this
# Refused nodes queue in the row, first refused first served: without a queue the node just
# served, asking again at once, wins every tie. A place is kept until the node's retry time plus
# this grace, so a node that died or went idle holds up the others no longer than that.
_TURN_GRACE_S = 0.5
_MIN_RETRY_S = 0.01

# (grant at, requests, tokens): a give-back or a settlement's difference, added to the grant.
Return = tuple[float, float, float]


@dataclass
class _Dim:
    """One dimension of a lane's row: the bucket level and the log of grants (at, amount)."""

    limit: int
    burst_s: float
    level: float
    log: list[list[float]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.limit / WINDOW_S

    @property
    def capacity(self) -> float:
        return self.rate * self.burst_s

    def refill(self, elapsed_s: float, now: float, log_s: float) -> None:
        self.level = min(self.capacity, self.level + max(elapsed_s, 0.0) * self.rate)
        self.log = sorted((e for e in self.log if e[0] > now - log_s), key=lambda e: e[0])

    def adjust(self, at: float, delta: float) -> None:
        self.level -= delta
        if delta < 0:
            self.level = min(self.level, self.capacity)
        for entry in self.log:
            if entry[0] == at:
                entry[1] += delta
                break

    def in_window(self) -> float:
        return sum(e[1] for e in self.log)

    def wait_s(self, need: float, now: float, log_s: float) -> float:
        """Seconds until ``need`` fits both the bucket and the log (as ``limiter._Bucket``)."""
        shortfall = min(need, self.capacity) - self.level
        bucket_s = shortfall / self.rate if shortfall > 1e-9 else 0.0
        excess = self.in_window() + min(need, self.limit) - self.limit
        window_s = 0.0
        if excess > 1e-9:
            freed = 0.0
            for at, amount in self.log:
                freed += amount
                window_s = at + log_s - now
                if freed >= excess:
                    break
        return max(0.0, bucket_s, window_s)

    def line_s(self, need: float, places: int) -> float:
        """Seconds until the refill covers ``places`` needs of this size (a place in line)."""
        return max((need * places - self.level) / self.rate, 0.0)

    def take(self, need: float, want: float, now: float) -> float:
        room = min(want, self.level, self.limit - self.in_window())
        granted = max(need, float(math.floor(room)))
        self.level -= granted
        self.log.append([now, granted])
        return granted


@dataclass
class LaneRow:
    """A lane's shared state as stored (levels may be negative: debt)."""

    requests: float
    tokens: float
    updated_at: float
    log_at: list[float]
    log_requests: list[float]
    log_tokens: list[float]
    cooling_until: float = 0.0
    circuit: str | None = None
    probe_at: float | None = None
    queue_nodes: list[str] = field(default_factory=list)  # refused nodes, first in line first
    queue_until: list[float] = field(default_factory=list)  # when each place lapses

    @classmethod
    def fresh(cls, spec: LaneSpec, now: float) -> LaneRow:
        """A new lane starts with its burst only, like a restarted node's local lane."""
        requests = spec.rpm / WINDOW_S * spec.burst_s if spec.rpm else 0.0
        tokens = spec.tpm / WINDOW_S * spec.burst_s if spec.tpm else 0.0
        return cls(requests, tokens, now, [], [], [])


def unstep(row: LaneRow, now: float, stepped_s: float = 0.0) -> float:
    """Move the row's times (in place) by what a step of the wall clock made of the time since
    it was last written, and return how far. ``stepped_s``: how far the asking node's wall
    clock moved against its monotonic one since it last wrote the row (0 if unknown).

    The node's step is no time, as far as it falls after the row's last write (another node
    may have moved the row past it already): the row goes on from where it was, its log and
    bucket as they were, none of the step refilling it or ageing its grants. A row still
    written ahead of ``now`` by more than ``STEP_S`` (a step back the node does not know of:
    another node's that was ahead, or one from before the node started) goes on from ``now``,
    the time between its last write and the step not counted. No grant leaves the log early;
    at worst the lane waits up to the log's length more than it had to."""
    elapsed = now - row.updated_at
    shift = 0.0
    if stepped_s >= STEP_S:
        shift = min(stepped_s, max(elapsed, 0.0))
    elif stepped_s <= -STEP_S and elapsed < 0:
        shift = min(stepped_s, elapsed)
    if row.updated_at + shift > now + STEP_S:
        shift = elapsed
    if shift:
        row.updated_at += shift
        row.log_at = [at + shift for at in row.log_at]
        row.cooling_until += shift
        row.probe_at = row.probe_at + shift if row.probe_at is not None else None
        row.queue_until = [until + shift for until in row.queue_until]
    return shift


def plan(
    row: LaneRow,
    spec: LaneSpec,
    now: float,
    *,
    need: tuple[float, float],
    want: tuple[float, float],
    returns: Sequence[Return] = (),
    node: str = "",
    stepped_s: float = 0.0,
) -> LaneGrant:
    """Undo a step of the clock (``unstep``), refill, apply ``returns``, then grant ``node``
    between ``need`` and ``want`` (requests, tokens) or nothing; updates ``row`` in place."""
    if shift := unstep(row, now, stepped_s):
        # Returns name their grants by the times the log had: they move with it.
        returns = [(at + shift, requests, tokens) for at, requests, tokens in returns]
    dims: list[tuple[_Dim | None, float, float]] = []
    for limit, level, amounts, n, w in (
        (spec.rpm, row.requests, row.log_requests, need[0], want[0]),
        (spec.tpm, row.tokens, row.log_tokens, need[1], want[1]),
    ):
        dim = None
        if limit:
            log = [[at, amount] for at, amount in zip(row.log_at, amounts, strict=True)]
            dim = _Dim(limit, spec.burst_s, level, log)
            dim.refill(now - row.updated_at, now, spec.log_s)
        dims.append((dim, n, max(n, w)))
    row.updated_at = max(row.updated_at, now)
    for at, requests, tokens in returns:
        for (dim, _, _), delta in zip(dims, (requests, tokens), strict=True):
            if dim is not None and delta:
                dim.adjust(at, delta)
    granted = [0.0, 0.0]
    retry_s = 0.0
    probe_in_s = 0.0
    probing = False
    if row.circuit is not None:
        probe_in_s = (row.probe_at - now) if row.probe_at is not None else _NO_PROBE_S
        probing = probe_in_s <= 0
    if now < row.cooling_until or (row.circuit is not None and not probing):
        retry_s = max(row.cooling_until - now, probe_in_s, 0.0)
    else:
        if probing:  # one call, the half-open probe; the next after probe_after_s
            dims = [(d, n, n) for d, n, _ in dims]
            row.probe_at = now + (spec.probe_after_s or _NO_PROBE_S)
            probe_in_s = 0.0
        retry_s = max(
            (d.wait_s(n, now, spec.log_s) for d, n, _ in dims if d is not None), default=0.0
        )
        line = [(n, u) for n, u in zip(row.queue_nodes, row.queue_until, strict=True) if u > now]
        ahead = next((i for i, (n, _) in enumerate(line) if n == node), len(line))
        if ahead > 0:  # others were refused first: wait for this node's place in line
            retry_s = max(
                (d.line_s(n, ahead + 1) for d, n, _ in dims if d is not None), default=0.0
            )
            retry_s = max(retry_s, _MIN_RETRY_S)
        if retry_s > 0:
            until = now + retry_s + _TURN_GRACE_S
            line = [*line[:ahead], (node, until), *line[ahead + 1 :]]
        else:
            line = line[1:] if line else line
        row.queue_nodes = [n for n, _ in line]
        row.queue_until = [u for _, u in line]
        if retry_s <= 0:
            for i, (dim, n, w) in enumerate(dims):
                if dim is not None:
                    granted[i] = dim.take(n, w, now)
        elif probing:
            row.probe_at = now  # the probe waits for the bucket, not another interval
        retry_s = min(retry_s, _MAX_RETRY_S)
    _store(row, dims, now)
    return LaneGrant(
        at=now,
        requests=granted[0],
        tokens=granted[1],
        retry_s=retry_s if not any(granted) else 0.0,
        cooling_s=max(row.cooling_until - now, 0.0),
        circuit=row.circuit,
        probe_in_s=max(probe_in_s, 0.0),
    )


def _store(row: LaneRow, dims: list[tuple[_Dim | None, float, float]], now: float) -> None:
    """Write the dimensions back into the row's arrays, merged on the grant times."""
    requests, tokens = dims[0][0], dims[1][0]
    if requests is not None:
        row.requests = requests.level
    if tokens is not None:
        row.tokens = tokens.level
    merged: dict[float, list[float]] = {}
    for i, dim in ((0, requests), (1, tokens)):
        if dim is not None:
            for at, amount in dim.log:
                merged.setdefault(at, [0.0, 0.0])[i] += amount
    ordered = sorted(merged.items())
    row.log_at = [at for at, _ in ordered]
    row.log_requests = [amounts[0] for _, amounts in ordered]
    row.log_tokens = [amounts[1] for _, amounts in ordered]


_COLUMNS = (
    "requests, tokens, updated_at, log_at, log_requests, log_tokens, cooling_until, circuit,"
    " probe_at, queue_nodes, queue_until"
)


def _row(record: Any) -> LaneRow:
    return LaneRow(
        requests=record["requests"],
        tokens=record["tokens"],
        updated_at=record["updated_at"],
        log_at=list(record["log_at"]),
        log_requests=list(record["log_requests"]),
        log_tokens=list(record["log_tokens"]),
        cooling_until=record["cooling_until"],
        circuit=record["circuit"],
        probe_at=record["probe_at"],
        queue_nodes=list(record["queue_nodes"]),
        queue_until=list(record["queue_until"]),
    )


async def _locked_row(conn: Any, spec: LaneSpec, clock: Clock) -> tuple[LaneRow, float]:
    """The lane's row, locked for this transaction (created, full of its burst, on first use),
    and the time once it is held: a grant made after waiting for the lock (another node's
    reservation) or for a connection is stamped when it is made, not when it was asked for,
    or it would leave the log that much early and a 60 s window could hold more than the
    limit."""
    record = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM lanes WHERE name = $1 FOR UPDATE", spec.name
    )
    if record is None:
        fresh = LaneRow.fresh(spec, clock.time())
        await conn.execute(
            "INSERT INTO lanes (name, requests, tokens, updated_at) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT DO NOTHING",
            spec.name,
            fresh.requests,
            fresh.tokens,
            fresh.updated_at,
        )
        record = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM lanes WHERE name = $1 FOR UPDATE", spec.name
        )
    return _row(record), clock.time()


async def _save(conn: Any, name: str, row: LaneRow) -> None:
    await conn.execute(
        "UPDATE lanes SET requests = $2, tokens = $3, updated_at = $4, log_at = $5,"
        " log_requests = $6, log_tokens = $7, cooling_until = $8, circuit = $9, probe_at = $10,"
        " queue_nodes = $11, queue_until = $12 WHERE name = $1",
        name,
        row.requests,
        row.tokens,
        row.updated_at,
        row.log_at,
        row.log_requests,
        row.log_tokens,
        row.cooling_until,
        row.circuit,
        row.probe_at,
        row.queue_nodes,
        row.queue_until,
    )


_T = TypeVar("_T")


class PgLanes:
    """The shared-lane part of ``PostgresJournal`` (a mixin: the journal supplies the writes)."""

    clock: Clock
    node_id: str
    shares_lanes = True
    # Per lane, this node's wall clock less its monotonic one when it last wrote the lane's
    # row: a change of it since is a step of the wall clock (``unstep``).
    _lane_offsets: dict[str, float]

    async def _write(self, fn: Callable[[Any], Awaitable[_T]]) -> _T:
        raise NotImplementedError

    async def _change_lane(
        self, spec: LaneSpec, change: Callable[[LaneRow, float, float], _T]
    ) -> _T:
        """``change(row, now, stepped_s)`` on the lane's row, locked, in a transaction of its
        own; the row is saved after it."""

        async def fn(conn: Any) -> tuple[_T, float]:
            row, now = await _locked_row(conn, spec, self.clock)
            offset = now - self.clock.monotonic()
            last = self._lane_offsets.get(spec.name)
            result = change(row, now, offset - last if last is not None else 0.0)
            await _save(conn, spec.name, row)
            return result, offset

        result, offset = await self._write(fn)
        self._lane_offsets[spec.name] = offset  # once the row written in this frame is committed
        return result

    async def reserve_lane(
        self,
        spec: LaneSpec,
        *,
        need: tuple[float, float],
        want: tuple[float, float],
        returns: Sequence[Return] = (),
    ) -> LaneGrant:
        def change(row: LaneRow, now: float, stepped_s: float) -> LaneGrant:
            return plan(
                row,
                spec,
                now,
                need=need,
                want=want,
                returns=returns,
                node=self.node_id,
                stepped_s=stepped_s,
            )

        return await self._change_lane(spec, change)

    async def cool_lane(self, spec: LaneSpec, seconds: float) -> None:
        def change(row: LaneRow, now: float, stepped_s: float) -> None:
            unstep(row, now, stepped_s)
            row.cooling_until = max(row.cooling_until, now + seconds)

        await self._change_lane(spec, change)

    async def set_lane_circuit(self, spec: LaneSpec, reason: str | None) -> None:
        def change(row: LaneRow, now: float, stepped_s: float) -> None:
            unstep(row, now, stepped_s)
            row.circuit = reason
            row.probe_at = None
            if reason is not None and spec.probe_after_s is not None:
                row.probe_at = now + spec.probe_after_s

        await self._change_lane(spec, change)
