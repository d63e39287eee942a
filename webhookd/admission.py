"""What the worker pool runs, counted per action, source, tenant and lane, and whether one more
job may start: the caps a job counts against, across the cluster, and slow mode (an action whose
attempts keep ending by their timeout runs one job at a time).

The pool keeps one ``Admission`` and gives it a reload's config. Picks count as running from
the pick (``count``) until the job's slot is given back.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TypeVar

from webhookd.actions.base import Outcome
from webhookd.config.sections import Config, SourceConfig
from webhookd.journal.records import Cap, Lane, Ready

log = logging.getLogger("webhookd.workers")  # its lines are the worker pool's

_K = TypeVar("_K")


def order_cap(job: Ready) -> Cap:
    """The cap that lets one job of ``job``'s order key run at a time (``Admission.caps``)."""
    return Cap(f"order\x1f{job.source}\x1f{job.action}\x1f{job.order_key}", 1)


def bump(counter: Counter[_K], key: _K, delta: int) -> None:
    """Add ``delta``, dropping keys that reach zero (tenants come and go)."""
    value = counter[key] + delta
    if value:
        counter[key] = value
    else:
        del counter[key]


class Admission:
    """The running counts the caps are checked against, and the checks."""

    def __init__(self, config: Config) -> None:
        self.config = config  # the pool's: a reload gives both the new one
        self.lane_room: dict[str, int] = {}  # for this round's picks: room left in each line
        self.counted_as: dict[str, str] = {}  # job id → the source name it is counted under
        self._running_by_action: Counter[tuple[str, str]] = Counter()
        self._running_by_source: Counter[str] = Counter()
        self._running_by_tenant: Counter[tuple[str, str]] = Counter()
        self._running_by_lane: Counter[Lane] = Counter()
        # Actions (configured source, action) whose last attempts in a row ended by timeout_s,
        # how many; those at ``workers.slow_after_timeouts`` run one job at a time (``slow``).
        self._timeouts: Counter[tuple[str, str]] = Counter()
        self.slow: set[tuple[str, str]] = set()

    def forget(self, keys: set[tuple[str, str]]) -> None:
        """Actions a reload replaced by ones that reach another place, or took away: a clean
        slate, not slow and no timeouts counted."""
        self.slow -= keys
        for key in keys:
            self._timeouts.pop(key, None)

    def action_may_start(self, source: SourceConfig, name: str) -> bool:
        """Whether a job of ``source``'s action ``name`` may start, as far as that action's
        own cap (or its being slow) and its rate lane's line allow."""
        action = source.action(name)
        if action is None:
            return True
        if self.lane_room and self.lane_room.get(action.options.get("lane") or "", 1) <= 0:
            return False  # its lane's line is full: it would only hold a worker there
        limit = action.concurrency
        if self.slow and (source.name, name) in self.slow:
            limit = 1
        return limit is None or self._running_by_action[(source.name, name)] < limit

    def source_may_start(self, source: SourceConfig, tenant: str) -> bool:
        """Whether ``source``'s cap and its ``tenant``'s leave room for one more job."""
        if (
            source.tenant_concurrency is not None
            and self._running_by_tenant[(source.name, tenant)] >= source.tenant_concurrency
        ):
            return False
        return source.concurrency is None or (
            self._running_by_source[source.name] < source.concurrency
        )

    def lane_may_start(self, lane: Lane) -> bool:
        """Whether some job of ``lane`` (priority, source, tenant), not paused, may start now, as
        far as its source's and its actions' caps say (a refill's shares go to such lanes)."""
        _, name, tenant = lane
        source = self.config.source_for(name)
        if source is None:
            return True
        if not self.source_may_start(source, tenant):
            return False
        return not source.actions or any(
            self.action_may_start(source, action.name) for action in source.actions
        )

    def is_slow(self, source_name: str, action: str) -> bool:
        source = self.config.source_for(source_name)
        return source is not None and (source.name, action) in self.slow

    def note_attempt(self, key: tuple[str, str], outcome: Outcome, timed_out: bool) -> bool:
        """Count attempts of an action that ended by its timeout, in a row: at
        ``workers.slow_after_timeouts`` it runs one job at a time (a downstream that takes
        connections and never answers would otherwise hold every worker for timeout_s each,
        and other sources' jobs would wait behind it); any other end lifts that. Returns
        whether it lifted it (more of the action's jobs may start now)."""
        limit = self.config.workers.slow_after_timeouts
        if not limit or outcome.kind == "wait":  # a wait never reached the downstream
            return False
        if timed_out:
            self._timeouts[key] += 1
            if self._timeouts[key] >= limit and key not in self.slow:
                self.slow.add(key)
                log.warning(
                    "action slow source=%s action=%s attempts_timed_out=%d (in a row):"
                    " running one job at a time until one does not",
                    *key,
                    self._timeouts[key],
                )
        elif self._timeouts.pop(key, 0) and key in self.slow:
            self.slow.discard(key)
            log.info("action answering again source=%s action=%s (back to full concurrency)", *key)
            return True
        return False

    def caps(self, job: Ready) -> tuple[Cap, ...]:
        """The job's caps that hold across the cluster: its action's, source's and tenant's
        concurrency, keyed by the configured source (a catch-all's jobs share its caps), and
        one running job per order key (``ordered_by``).

        The order key's cap is what keeps two nodes from starting two jobs of one key: each
        claim checks the head of the key on its own snapshot, and a job committed between two
        claims' snapshots (seqs are taken at insert, seen at commit) let both pass. Claims of a
        cap take its lock and count what the one before committed."""
        source = self.config.source_for(job.source)
        if source is None:
            return ()
        caps = []
        if job.order_key is not None:
            caps.append(order_cap(job))
        action = source.action(job.action)
        if action is not None and action.concurrency is not None:
            caps.append(Cap(f"action\x1f{source.name}\x1f{job.action}", action.concurrency))
        if source.concurrency is not None:
            caps.append(Cap(f"source\x1f{source.name}", source.concurrency))
        if source.tenant_concurrency is not None:
            key = f"tenant\x1f{source.name}\x1f{job.tenant}"
            caps.append(Cap(key, source.tenant_concurrency))
        return tuple(caps)

    def count(self, job: Ready, delta: int) -> None:
        """Keep the running counts the caps are checked against (picks count as running). A
        job is uncounted under the source it was counted under: a reload meanwhile may give
        its source name another config (a catch-all's event, and now a source of its own)."""
        if delta > 0:
            name = self.counted_as[job.id] = self.config.counted_as(job.source)
        else:
            name = self.counted_as.pop(job.id, job.source)
        bump(self._running_by_action, (name, job.action), delta)
        bump(self._running_by_source, name, delta)
        bump(self._running_by_tenant, (name, job.tenant), delta)
        bump(self._running_by_lane, job.lane, delta)

    def running_by_lane(self) -> dict[Lane, int]:
        """Jobs running (or being claimed) per lane."""
        return dict(self._running_by_lane)
