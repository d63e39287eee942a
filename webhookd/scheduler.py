"""The scheduler: priority classes × per-tenant round robin over a bounded window of ready jobs.

It decides *which* due job runs next; it never touches the journal. Jobs wait in *lanes*, one
per (priority, source, tenant). Each lane holds at most ``lane_capacity`` jobs and the whole
window at most ``capacity``; what does not fit stays in the journal, and the worker pool refills
a lane when it runs low, so a backlog of millions costs disk, not memory, and one tenant's burst
never fills the window against the others.

Classes are served by smooth weighted round robin (8:4:1 by default), so low priority is never
starved. Within a class, lanes are served by deficit round robin with a unit cost per job,
which comes down to one job per lane per turn: one tenant's 10,000 queued jobs delay another
tenant's single job by at most one job per busy tenant. A lane whose jobs may not start now
(its tenant's, source's or action's cap is reached) is skipped for that turn, never waited on,
and earns no credit meanwhile, so it cannot burst ahead of the others afterwards.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

from webhookd.journal.records import Lane, Ready
from webhookd.models import Priority

# Past a head that may not start (a capped action, an action whose lane's line is full), how
# many of a lane's jobs a pop asks about, and how far into the lane it goes: a job of an action
# already found blocked is passed over without asking (all of an action's jobs in one lane wait
# alike; one with an order key is asked about, as its key may be the one that is free), so the
# tenant's jobs of other actions behind a run of those still go. Asking only the first few, 9
# model calls queued ahead of a source's forwards held every forward behind the model's pace.
# Bounded: a pop must stay cheap.
_LOOKAHEAD = 8
_REACH = 64


class _Class:
    """One priority class: a ring of lanes, each a FIFO of its ready jobs."""

    __slots__ = ("lanes", "size")

    def __init__(self) -> None:
        self.lanes: OrderedDict[Lane, deque[Ready]] = OrderedDict()
        self.size = 0

    def add(self, job: Ready) -> None:
        queue = self.lanes.get(job.lane)
        if queue is None:
            queue = self.lanes[job.lane] = deque()
        queue.append(job)
        self.size += 1

    def pop(self, can_run: Callable[[Ready], bool]) -> Ready | None:
        """The first job that may run from the next lane (in ring order) that has one."""
        for _ in range(len(self.lanes)):
            lane, queue = next(iter(self.lanes.items()))
            # Rotate first: the next call starts with the following lane whether this one
            # yields a job (its turn is used) or not (it is skipped, not waited on).
            self.lanes.move_to_end(lane)
            index = _first_runnable(queue, can_run)
            if index is not None:
                job = queue[index]
                del queue[index]
                self.size -= 1
                if not queue:
                    del self.lanes[lane]
                return job
        return None

    def __iter__(self) -> Iterator[Ready]:
        for queue in self.lanes.values():
            yield from queue


def _first_runnable(queue: deque[Ready], can_run: Callable[[Ready], bool]) -> int | None:
    """Where in ``queue`` the first job a pop may take is (see ``_LOOKAHEAD``), if any."""
    if not queue:
        return None
    head = queue[0]
    if can_run(head):  # the usual case, with nothing to keep track of
        return 0
    blocked = {(head.source, head.action)} if head.order_key is None else set()
    asked = 1
    for index, job in enumerate(itertools.islice(queue, 1, _REACH), start=1):
        unordered = job.order_key is None
        if unordered and (job.source, job.action) in blocked:
            continue
        if can_run(job):
            return index
        asked += 1
        if asked > _LOOKAHEAD:
            return None
        if unordered:
            blocked.add((job.source, job.action))
    return None


def _blocked(queue: deque[Ready], can_run: Callable[[Ready], bool]) -> bool:
    """No job a pop would look at in ``queue`` may run now."""
    return _first_runnable(queue, can_run) is None


class Scheduler:
    """Holds ready jobs and hands out the next one to run."""

    def __init__(
        self,
        *,
        capacity: int = 1000,
        lane_capacity: int | None = None,
        weights: tuple[int, int, int] = (8, 4, 1),
    ) -> None:
        self.capacity = capacity
        self.lane_capacity = min(lane_capacity or capacity, capacity)
        self.weights = weights
        self._classes = [_Class() for _ in Priority]
        self._credit = [0, 0, 0]
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids

    @property
    def room(self) -> int:
        return max(self.capacity - len(self._ids), 0)

    def lane_size(self, lane: Lane) -> int:
        queue = self._classes[lane[0]].lanes.get(lane)
        return len(queue) if queue is not None else 0

    def lane_room(self, lane: Lane) -> int:
        """How many more jobs ``lane`` may take now (the window's room included)."""
        return min(self.lane_capacity - self.lane_size(lane), self.room)

    def add(self, job: Ready) -> bool:
        """Take a ready job; ``False`` (and nothing kept) when its lane or the window is full."""
        if job.id in self._ids:
            return True
        if self.lane_room(job.lane) <= 0:
            return False
        self._classes[job.priority].add(job)
        self._ids.add(job.id)
        return True

    def pop(self, can_run: Callable[[Ready], bool] = lambda _job: True) -> Ready | None:
        """The next job to run, or ``None`` if nothing in the window may run now."""
        # Smooth weighted round robin: every class with jobs earns its weight, the richest one
        # that has a job allowed to run goes and pays what was earned. A class found blocked
        # gives its earning back, so being capped for a while does not bank credit.
        active = [i for i, c in enumerate(self._classes) if c.size]
        for i, c in enumerate(self._classes):
            if not c.size:
                self._credit[i] = 0
        for i in active:
            self._credit[i] += self.weights[i]
        earned = sum(self.weights[i] for i in active)
        for i in sorted(active, key=lambda i: (-self._credit[i], i)):
            job = self._classes[i].pop(can_run)
            if job is not None:
                self._credit[i] -= earned
                self._ids.discard(job.id)
                return job
            self._credit[i] -= self.weights[i]
            earned -= self.weights[i]
        return None

    def blocked(self, can_run: Callable[[Ready], bool], above: int = 0) -> list[Lane]:
        """Lanes holding more than ``above`` jobs, none of which a pop would look at may start
        now (``can_run``)."""
        return [
            lane
            for c in self._classes
            for lane, queue in c.lanes.items()
            if len(queue) > above and _blocked(queue, can_run)
        ]

    def is_blocked(self, lane: Lane, can_run: Callable[[Ready], bool]) -> bool:
        """``lane`` holds jobs and none a pop would look at may start now."""
        queue = self._classes[lane[0]].lanes.get(lane)
        return queue is not None and bool(queue) and _blocked(queue, can_run)

    def trim(self, lane: Lane, keep: int) -> int:
        """Drop ``lane``'s newest jobs past its first ``keep``; returns how many went. They are
        still queued in the journal, which the window only mirrors: a refill brings them back
        in order, behind the ones kept."""
        c = self._classes[lane[0]]
        queue = c.lanes.get(lane)
        if queue is None:
            return 0
        dropped = max(len(queue) - keep, 0)
        for _ in range(dropped):
            self._ids.discard(queue.pop().id)
        c.size -= dropped
        if not queue:
            del c.lanes[lane]
        return dropped

    def lanes(self) -> dict[Lane, int]:
        """Jobs in the window per lane."""
        return {lane: len(q) for c in self._classes for lane, q in c.lanes.items()}
