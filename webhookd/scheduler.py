"""The scheduler: priority classes × per-tenant round robin over a bounded window of ready jobs.

It decides *which* due job runs next; it never touches the journal. The window holds at most
``capacity`` jobs; when it is full the dispatcher records that the journal holds more and
refills later, so a backlog of millions costs disk, not memory.

Classes are served by smooth weighted round robin (8:4:1 by default), so low priority is never
starved; within a class, tenants take turns, so one tenant's burst cannot delay another's
single event by more than a few slots.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from webhookd.journal import Ready
from webhookd.models import Priority


@dataclass(frozen=True, slots=True)
class ClassStats:
    priority: str
    queued: int
    tenants: int


class _Class:
    """One priority class: a ring of tenants, each with a FIFO of its ready jobs."""

    __slots__ = ("size", "tenants")

    def __init__(self) -> None:
        self.tenants: OrderedDict[str, deque[Ready]] = OrderedDict()
        self.size = 0

    def add(self, job: Ready) -> None:
        queue = self.tenants.get(job.tenant)
        if queue is None:
            queue = self.tenants[job.tenant] = deque()
        queue.append(job)
        self.size += 1

    def pop(self, can_run: Callable[[Ready], bool]) -> Ready | None:
        """The head job of the first tenant (in ring order) whose head may run now."""
        for _ in range(len(self.tenants)):
            tenant, queue = next(iter(self.tenants.items()))
            # Rotate first, so the next call starts with the following tenant either way.
            self.tenants.move_to_end(tenant)
            for index, job in enumerate(queue):
                if can_run(job):
                    del queue[index]
                    self.size -= 1
                    if not queue:
                        del self.tenants[tenant]
                    return job
                # A tenant's jobs are tried in order; only the head keeps its turn fair, but a
                # blocked head (a capped action) must not block the tenant's other actions.
                if index >= 8:
                    break
        return None

    def __iter__(self) -> Iterator[Ready]:
        for queue in self.tenants.values():
            yield from queue


class Scheduler:
    """Holds ready jobs and hands out the next one to run."""

    def __init__(self, *, capacity: int = 1000, weights: tuple[int, int, int] = (8, 4, 1)) -> None:
        self.capacity = capacity
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

    def ids(self) -> set[str]:
        return set(self._ids)

    def add(self, job: Ready) -> bool:
        """Take a ready job; ``False`` (and nothing kept) when the window is full or it is known."""
        if job.id in self._ids:
            return True
        if len(self._ids) >= self.capacity:
            return False
        self._classes[job.priority].add(job)
        self._ids.add(job.id)
        return True

    def pop(self, can_run: Callable[[Ready], bool] = lambda _job: True) -> Ready | None:
        """The next job to run, or ``None`` if nothing in the window may run now."""
        # Smooth weighted round robin: every class with work earns its weight, the richest
        # goes, and pays the total. Classes whose jobs are all blocked are skipped this time.
        active = [i for i, c in enumerate(self._classes) if c.size]
        while active:
            total = sum(self.weights[i] for i in active)
            for i in active:
                self._credit[i] += self.weights[i]
            best = max(active, key=lambda i: self._credit[i])
            self._credit[best] -= total
            job = self._classes[best].pop(can_run)
            if job is not None:
                self._ids.discard(job.id)
                return job
            active.remove(best)
        return None

    def statistics(self) -> list[ClassStats]:
        return [
            ClassStats(Priority(i).label, c.size, len(c.tenants))
            for i, c in enumerate(self._classes)
        ]
