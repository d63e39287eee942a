"""The worker pool: take a due job → claim it → run its action with a timeout → record it.

The dispatcher is woken the moment an ingest commits (``notify``), when a retry falls due, and
by a fallback sweep that finds rows written by other processes (``webhookd replay``). Claims
are committed before an action starts, so the attempt counts even if the process dies in the
middle of it. Only an attempt (``attempts``) catches an action's errors, to record them as
outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import socket
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from webhookd import logs
from webhookd.actions.base import Action, Outcome
from webhookd.admission import Admission, bump
from webhookd.attempts import decide, run_attempt
from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.config.sections import ActionConfig, Config
from webhookd.draining import cut_off, requeue_cut_off, requeue_handed_back, unclaim
from webhookd.elsewhere import LeftElsewhere
from webhookd.errors import JournalGone, JournalUnavailable
from webhookd.hold import HOLD_RECHECK_S, BurstHold, intake_busy
from webhookd.joblines import JobLines
from webhookd.journal.base import BaseJournal
from webhookd.journal.polled import let_go
from webhookd.journal.records import Cap, Claimed, Finished, Lane, NewEvent, Ready, Recorded
from webhookd.limiter import Lane as RateLane
from webhookd.models import JobState
from webhookd.redact import Masker, secret_values
from webhookd.scheduler import Scheduler
from webhookd.state import IntakeState

log = logging.getLogger("webhookd.workers")

# Lanes looked at per refill. More lanes than this with queued work are visited in turns (a
# cursor walks the journal's lane index), so a refill stays cheap with thousands of tenants.
MAX_LANES_PER_REFILL = 256
# Refills one after another, at most, while each reads only jobs that may not start now and the
# walk over the journal's lanes has more ahead (see ``_refill``); then the next wake or sweep.
MAX_FRUITLESS_REFILLS = 16
# A finish the journal could not commit (a full disk) is tried again, waiting this long at most
# between tries: the job stays running in the journal until its outcome is on disk.
FINISH_RETRY_MAX_S = 2.0
# A cap found full across the cluster (other nodes' jobs hold its slots) is not tried again for
# this long, unless a job of it ends here or another node says one ended: the node does not
# spin on claims the journal refuses, and a slot freed elsewhere is still taken within this.
SATURATED_RECHECK_S = 0.25
# Picks and claims one dispatch may make when claims come back short (other nodes took the
# jobs first): each round drops what it lost from the window and fills the slots again.
_DISPATCH_ROUNDS = 8


# A dispatch failure this soon after one said is the same outage: said at debug.
RETELL_FAILING_S = 30.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    concurrency: int
    busy: int
    # Jobs waiting on the journal's claim: picked from the window, or being written claimed in
    # their webhook's commit (a slow disk shows here).
    claiming: int
    window: int
    started: int
    outcomes: Mapping[str, int]
    holding: bool = False  # new jobs wait while the receiver answers a burst (``hold``)


def _same_target(old: Action | None, new: Action) -> bool:
    """Whether ``new``, which a reload built in place of ``old``, reaches what ``old`` did: the
    same kind and the same ``target`` (a forward's URL, an openai base URL), or for a kind
    without one (a command, a handler) the same options as written."""
    if old is None or old.config.type != new.config.type:
        return False
    target = getattr(old, "target", None)
    if target is not None or getattr(new, "target", None) is not None:
        return bool(target == getattr(new, "target", None))
    return old.config.options == new.config.options


class WorkerPool:
    """Runs due jobs, at most ``concurrency`` at a time."""

    def __init__(
        self,
        *,
        config: Config,
        journal: BaseJournal,
        actions: Mapping[tuple[str, str], Action],
        boot_id: str,
        clock: Clock = SYSTEM_CLOCK,
        rng: Callable[[], float] = random.random,
        intake: IntakeState | None = None,
        rate_lanes: Mapping[str, RateLane] | None = None,
    ) -> None:
        self.config = config
        # The [lanes] by name (the daemon's dict, which a reload updates in place): a job of an
        # action that names one whose line is full (``RateLane.most_waiting``) is not started.
        self.rate_lanes: Mapping[str, RateLane] = rate_lanes if rate_lanes is not None else {}
        # Jobs of an action that names a lane, picked but whose call has not come to the lane
        # yet (a claim, the task's start and the action's own work come first), by lane: not in
        # its ``waiting`` yet, each may join its line. Counted from the pick until the call
        # comes to the lane (``on_arrival``) or the job is given up or its action returns.
        self._to_lane: dict[str, str] = {}  # job id → lane name
        self._to_lane_count: Counter[str] = Counter()
        # Jobs a drain took out of a lane's line (cancelled before their call was made): put
        # back to queued, no attempt recorded, for another node or the next start.
        self._handed_back: set[str] = set()
        # What an attempt's error and detail quote of a secret (a URL's password, a target
        # echoing a token) is masked before it is journaled: the journal, its backups and a
        # `show` run where the secrets' variables are not set never hold it.
        self._masking = frozenset(secret_values(config))  # what ``masker`` is made of
        self.masker = Masker(self._masking)
        # A reload's masker keeps the secrets of the configs that attempts still running began
        # on (one may print a secret the reload rotated out): each config's secrets by
        # generation, while it is the running one or an attempt begun on it runs.
        self._generation = 0
        self._secrets_of: dict[int, frozenset[str]] = {0: self._masking}
        self._attempts_of: Counter[int] = Counter()
        self.intake = intake  # the receiver's state: new jobs wait while a burst is answered
        self._burst = BurstHold()
        self.holding = False
        self.journal = journal
        self.actions = actions
        self.boot_id = boot_id
        self.clock = clock
        self.rng = rng
        self.concurrency = config.workers.concurrency
        self.scheduler = self._new_scheduler()
        self._wake = asyncio.Event()
        self._hear_lanes()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._claiming = asyncio.Lock()  # held across a claim, so a drain can wait it out
        self._claiming_jobs = 0
        self._claim_failing = False
        # The journal may hold ready jobs the window lacks: _refill_now when something new is
        # known (a commit the window had no room for, an ordered job, a retry falling due, a
        # replay); _overflow when lanes were simply full, topped up once the window runs low.
        self._refill_now = True
        self._overflow = True
        self._low_water = 0  # a lazy top-up waits until the window is down to this
        self._fruitless = 0  # refills in a row that read no job that may start (``_refill``)
        self._blocked_jobs = 0  # jobs in lanes none of whose jobs may start, at the last trim
        self._next_due: float | None = None
        self._lane_cursor: Lane | None = None
        # Lanes the last refill passed over for want of room in the window: read first by the
        # next (see ``_refill``).
        self._passed_over: set[Lane] = set()
        # A job's task runs its action, then records the outcome. Its slot (and its counts
        # against the caps) is given back when the action returns, so the next claims share
        # a group commit with the outcomes being written instead of waiting one out.
        self._running: dict[str, asyncio.Task[None]] = {}
        self._acting: dict[str, Ready] = {}  # jobs whose action has not returned yet
        # New jobs the journal is writing claimed in a group commit (``reserve``): their slots
        # are kept until ``settle``, and a drain waits for that.
        self._reserved: dict[str, Ready] = {}
        self._settled = asyncio.Event()
        self._settled.set()
        self.left_claimed = 0  # by a drain that could not re-queue its stragglers
        # The caps of each running capped job, worked out once when it was picked: it keeps
        # their counts until its outcome is on disk, and its end frees them for the others.
        self._held_caps: dict[str, tuple[Cap, ...]] = {}
        # Jobs whose action has begun, with the attempt: one a drain cuts off is recorded.
        self._attempting: dict[str, tuple[Claimed, float]] = {}
        # What an attempt a drain cancelled kept (``keep_detail``): its result and detail, for
        # the record of the cut attempt (an openai answer must outlive it).
        self._cut_kept: dict[str, tuple[Any, dict[str, Any]]] = {}
        # What runs, counted per action, source, tenant and lane: whether one more may start.
        self.admission = Admission(config)
        # Caps the journal found full with other nodes' jobs: key → when to try it again
        # (monotonic). Jobs of such a cap wait in the window meanwhile.
        self._saturated: dict[str, float] = {}
        # Jobs (source as journaled, action) this node lacks and a live node has: left to those
        # nodes, kept out of this node's claims until when to look again (monotonic).
        self._elsewhere = LeftElsewhere(journal, self.clock)
        self._pause_stale = False
        self._pause_read: list[asyncio.Future[None]] = []  # pause_applied's, until re-read
        self.started = 0
        self.outcomes: Counter[str] = Counter()
        # Sources an operator paused (``webhookd pause``): their jobs stay queued. Re-read from
        # the journal on every sweep, so a pause made by the CLI takes effect within one, and at
        # once when the journal tells of a pause (``pause_changed``: another node, the CLI).
        self.paused: frozenset[str] = frozenset()
        # Hooks for observers (metrics, tests): called with (claimed, outcome, finished).
        self.on_finish: list[Callable[[Claimed, Outcome, Finished], None]] = []
        self._lines = JobLines(self.clock)  # each attempt's outcome line
        # Actions a reload replaced or removed, by id: closed once no attempt runs on them.
        self._attempts_on: Counter[int] = Counter()
        self._retired: dict[int, Action] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def reconfigure(
        self,
        config: Config,
        actions: Mapping[tuple[str, str], Action],
        secrets: Collection[str] | None = None,
    ) -> None:
        """Take a reload's sources and actions (``config.workers`` stays as it was): jobs
        started from now on run on them. An attempt already running ends on the action it
        started on, which is closed once no attempt runs on it. ``secrets``: the config's
        ``secret_values``, when the caller has them already."""
        live = {id(a) for a in actions.values()}
        for action in self.actions.values():
            if id(action) not in live:
                self._retired[id(action)] = action
        self.config = self.admission.config = config
        self._hear_lanes()
        if secrets is None:
            secrets = secret_values(config)
        self._generation += 1
        self._secrets_of = {g: s for g, s in self._secrets_of.items() if self._attempts_of[g]}
        self._secrets_of[self._generation] = frozenset(secrets)
        self._remask()
        # An action replaced by one that reaches another place (a new URL, another kind), or
        # taken away, starts with a clean slate: it no longer runs one job at a time (nor shows
        # so in webhookd_action_slow). One that reaches the same place keeps its slow mode and
        # its count of timeouts: a reload that only read its file: secrets again, or changed a
        # header, sent every worker to a target that still did not answer.
        old = {id(a) for a in self.actions.values()}
        gone = {
            key
            for key, action in actions.items()
            if id(action) not in old and not _same_target(self.actions.get(key), action)
        }
        gone |= self.actions.keys() - actions.keys()
        self.admission.forget(gone)
        self.actions = actions
        for key in [k for k in self._retired if not self._attempts_on[k]]:
            self._close_soon(self._retired.pop(key))
        self._elsewhere.keys.clear()  # left to other nodes for lacking an action this one may have
        self._refill_now = True  # jobs of a source that had no action for them may run now
        self._wake.set()

    def _remask(self) -> None:
        """Mask the running config's secrets and those of the configs attempts still running
        began on: a secret rotated out stays masked until the last of those ends, then goes
        (each one kept was work for every line and attempt from then on). The log's masker
        follows."""
        wanted = frozenset().union(*self._secrets_of.values())
        if wanted != self._masking:
            self._masking = wanted
            self.masker = Masker(wanted)
            logs.mask_only(self.masker.given)

    def _close_soon(self, action: Action) -> None:
        task = asyncio.create_task(action.aclose(), name="close-retired-action")
        self._closing.add(task)
        task.add_done_callback(self._closed)

    def _closed(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("closing a replaced action failed: %r", task.exception())

    async def close_actions(self) -> None:
        """Close every action, those a reload retired included (at shutdown)."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        every = {id(a): a for a in (*self.actions.values(), *self._retired.values())}
        self._retired.clear()
        for action in every.values():
            await action.aclose()

    @property
    def _fair_share(self) -> int:
        """A lane's share when lanes take turns: enough to keep every worker busy on it."""
        return max(2 * self.concurrency, 16)

    def _new_scheduler(self) -> Scheduler:
        # A lane's share of the window: enough to keep every worker busy on one tenant alone,
        # several times over, so a single busy lane is topped up once per many claims rather
        # than before each (a refill is a read or two on the journal).
        return Scheduler(
            capacity=self.config.workers.window,
            lane_capacity=max(8 * self.concurrency, 128),
            weights=self.config.workers.weights,
        )

    # -- feeding -----------------------------------------------------------------------------

    def notify(self, ready: list[Ready]) -> None:
        """New jobs were committed: take them into the window and wake the dispatcher."""
        scheduler = self.scheduler
        taken = False
        for job in ready:
            if job.source in self.paused:
                continue
            if job.id in self.admission.counted_as or job.id in self._running:
                # Picked already: a refill read it once its commit was on disk, before this
                # announcement. Back in the window it would be picked again while it ran (or
                # claimed again once its retry was queued, its backoff skipped): counted twice,
                # uncounted once under its own name (a catch-all's sender's), the other count
                # left there for good.
                continue
            taken = True
            # An ordered job may have an older job of its key unfinished (waiting for a retry,
            # say): only the journal knows, so it comes in through a refill.
            if job.order_key is not None:
                self._refill_now = True
            elif not scheduler.add(job):
                if scheduler.room > 0:
                    # Its lane is full of older jobs, which go first anyway: a top-up once the
                    # window runs low finds it, rather than a refill before every claim.
                    self._overflow = True
                else:
                    self._refill_now = True
        if taken:  # jobs of paused sources only (queued while paused): nothing to dispatch
            self._wake.set()

    def poke(self) -> None:
        """Something changed in the journal (a replay, another node's commit or finish): look at
        it now rather than at the sweep, caps found full included."""
        self._refill_now = True
        self._saturated.clear()
        self._wake.set()

    def pause_changed(self) -> None:
        """A source may have been paused or resumed (by another node or the CLI): re-read the
        paused sources now rather than at the sweep."""
        self._pause_stale = True
        self._wake.set()

    async def pause_applied(self, timeout_s: float = 5.0) -> None:
        """``pause_changed``, returning once the dispatcher has re-read the paused sources: a
        webhook committed after this returns never starts a job of a source paused before it
        (the admin API's pause). Returns after ``timeout_s`` at most (a dispatcher stopped by
        a drain, or waiting out a journal outage)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pause_read.append(waiter)
        self.pause_changed()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)

    async def _refill(self) -> None:
        """Top up the lanes from the journal: each toward an even share of the window, the
        emptiest first, in one pass over the lanes that hold queued jobs."""
        self._refill_now = False
        now = self.clock.time()
        scheduler = self.scheduler
        lanes = await self.journal.queued_lanes(self._lane_cursor, MAX_LANES_PER_REFILL)
        more = len(lanes) >= MAX_LANES_PER_REFILL
        # With more lanes than one refill visits, each gets a worker-sized share, so the cursor
        # moves on to the others soon; with fewer, a lane may take its full (bigger) share.
        walking = more or self._lane_cursor is not None
        if not more and self._lane_cursor is not None:  # wrap around to the first lanes
            seen = set(lanes)
            head = await self.journal.queued_lanes(None, MAX_LANES_PER_REFILL - len(lanes))
            lanes += [lane for lane in head if lane not in seen]
        self._lane_cursor = lanes[-1] if more else None
        lanes = [lane for lane in lanes if lane[1] not in self.paused]
        cap = min(self._fair_share, scheduler.lane_capacity) if walking else scheduler.lane_capacity
        # The window is shared among the lanes whose jobs may start: lanes held by a cap (a
        # sender's many catch-all names, say) took a share each, and another source's lane
        # walked past them got a few jobs a visit.
        may_start = {lane: self.admission.lane_may_start(lane) for lane in lanes}
        share = min(cap, max(scheduler.capacity // max(sum(may_start.values()), 1), 1))
        fair = self._fair_share
        room = scheduler.room
        # What lanes whose jobs may not start may still take (see _trim_blocked).
        blocked_room = self._blocked_budget - min(self._blocked_jobs, len(scheduler))
        wants: list[tuple[Lane, int]] = []
        # An empty lane goes first, and of those, the ones the last refill had no room left
        # for: a lane's jobs may all be waiting out a backoff, and the lanes first in the
        # journal's order took the room at every refill while a due job behind them was never
        # read (with more lanes than room: a catch-all's names make lanes of their own).
        passed_over, self._passed_over = self._passed_over, set()
        for lane in sorted(
            lanes, key=lambda lane: (scheduler.lane_size(lane), lane not in passed_over)
        ):
            size = scheduler.lane_size(lane)
            want = min(share - size, room)
            # A lane whose jobs may not start now (capped) is topped up to a worker-sized share
            # at most, and only within what blocked lanes may hold of the window, as
            # _trim_blocked cuts them back: no more than its caps can use soon, and the jobs
            # a trim dropped are not read again while they still may not start.
            if want > 0 and (not may_start[lane] or scheduler.is_blocked(lane, self._can_run)):
                want = min(want, fair - size, blocked_room)
                blocked_room -= max(want, 0)
            if want <= 0:
                more = True  # at its share (or no room left): the journal may hold more
                if room <= 0:
                    self._passed_over.add(lane)
                continue
            wants.append((lane, size + want))  # the held jobs come back too, then are skipped
            room -= want
        rows = await self.journal.ready_in_lanes(now, wants)
        got: Counter[Lane] = Counter(job.lane for job in rows)
        for job in rows:
            scheduler.add(job)
        more = more or any(got[lane] >= n for lane, n in wants)
        self._overflow = more
        # A top-up once half the window has gone, or half of its jobs that may run: blocked
        # lanes' jobs stay, and the half of the window they may hold would never go.
        self._low_water = len(scheduler) // 2
        blocked = self._blocked_budget - blocked_room  # at most (rows may have come short)
        if len(scheduler) > blocked:
            self._low_water = max(self._low_water, blocked + (len(scheduler) - blocked) // 2)
        self._next_due = None if more else await self.journal.next_run_at(self.paused, after=now)
        # Lanes none of whose jobs may start (a capped source's tenants, or the catch-all's
        # names, which a sender chooses) can fill refill after refill; nothing then ends to
        # wake the dispatcher, and the walk reached the lanes behind them once a sweep: 3,000
        # such lanes left another source's 2,000 jobs 24 done in 90 s. The walk goes on at
        # once instead, up to MAX_FRUITLESS_REFILLS in a row (a sweep allows as many again);
        # so does a refill that passed lanes over for want of room.
        walked = self._lane_cursor is not None or self._passed_over
        if walked and not any(self._can_run(job) for job in rows):
            self._fruitless += 1
            if self._fruitless < MAX_FRUITLESS_REFILLS:
                self._refill_now = True
                self._wake.set()
        else:
            self._fruitless = 0

    @property
    def _blocked_budget(self) -> int:
        """What lanes none of whose jobs may start hold of the window at most: half of it."""
        return self.scheduler.capacity // 2

    def _trim_blocked(self) -> None:
        """Cut back the lanes of the window of which no job may start now (a cap they count
        against is reached): each to a worker-sized share, and should they hold more than half
        the window together, to an even share of that half (at least a job each; past as many
        lanes as that allows, all of a lane's jobs go). The rest of the window stays for jobs
        that can run. Without this, a few capped lanes with a backlog (a source with
        ``concurrency = 1`` and four tenants, say) filled the window, and another source's new
        jobs got in only as the capped ones ran; so did 20 such tenants, each within its share
        of the window, or one in a window of 64. The jobs dropped are still queued in the
        journal: a refill brings them back, but not past what blocked lanes may hold
        (``_refill``), so while they still may not start no refill reads them again. Run
        before each refill: one look at each lane of the window."""
        scheduler = self.scheduler
        blocked = scheduler.blocked(self._can_run)
        cut = sum(scheduler.trim(lane, self._fair_share) for lane in blocked)
        budget = self._blocked_budget
        if sum(map(scheduler.lane_size, blocked)) > budget:
            keep = budget // len(blocked)
            for n, lane in enumerate(blocked):
                cut += scheduler.trim(lane, keep or int(n < budget))
        self._blocked_jobs = sum(map(scheduler.lane_size, blocked))
        if cut:
            self._overflow = True

    async def _refresh_paused(self) -> None:
        paused = await self.journal.paused_sources()
        if paused == self.paused:
            return
        if paused - self.paused:
            # Newly paused sources may have jobs in the window: rebuild it from the journal
            # (which it only mirrors) rather than let held jobs take the room of runnable ones.
            self.scheduler = self._new_scheduler()
        for source in paused ^ self.paused:
            log.warning(
                "source %s processing=%s", source, "paused" if source in paused else "resumed"
            )
        self.paused = paused
        self._refill_now = True

    # -- starting at the commit (the journal's ``Starter``) --------------------------------

    def room_at_commit(self) -> int:
        """How many of a commit's new jobs may be written claimed and start when it is done.

        Only while nothing else is waiting for a worker: no job in the window nor known to be
        ready in the journal (a refill pending, a retry due), no burst being answered, no drain,
        no claim failing. Then each would be the very next pick anyway, and the claim that
        picking it takes (a transaction of its own, after the one that journaled it) is saved.
        """
        if (
            self._stopping
            or self._claim_failing
            or self._pause_stale
            or self._refill_now
            or self._overflow
            or len(self.scheduler)
            or intake_busy(self.intake, self.clock.monotonic())
        ):
            return 0
        if self._next_due is not None and self._next_due <= self.clock.time():
            return 0
        # Picks whose claim is in flight are not acting yet, but their slots are taken.
        return self.concurrency - len(self._acting) - len(self._reserved) - self._claiming_jobs

    def reserve(self, items: Sequence[NewEvent]) -> frozenset[str]:
        """Of new jobs that all fit (``room_at_commit``), those that may start at their commit:
        not of a paused source, not ordered (the journal knows whether an older job of the key
        is unfinished) and without caps (counted across the cluster by a claim). Such a job
        passes every other check ``_can_run`` makes, its lane's line with room included."""
        taken = []
        paused = self.paused
        room = self._room_in_lanes() if self.rate_lanes else {}
        for item in items:
            e = item.event
            if e.source in paused:
                continue
            for j in item.jobs:
                if j.order_key is not None or (
                    self.admission.slow and self.admission.is_slow(e.source, j.action)
                ):
                    continue
                job = Ready(j.id, e.source, j.action, int(e.priority), e.tenant, None, 0)
                lane = self._rate_lane_of(job) if room else None
                if lane in room and room[lane] <= 0:
                    continue  # its lane's line is full: claimed once it has room
                if not self.admission.caps(job):
                    if lane in room:
                        room[lane] -= 1
                        self._bound_for_lane(job.id, lane)
                    self._reserved[job.id] = job
                    self.admission.count(job, +1)
                    taken.append(job.id)
        if taken:
            self._settled.clear()
        return frozenset(taken)

    def settle(self, started: Sequence[Claimed], reserved: frozenset[str]) -> None:
        """Start the jobs written claimed; the rest of ``reserved`` (a duplicate's, a failed
        commit's) give their slots back."""
        for claimed in started:
            self._start(claimed, self._reserved.pop(claimed.job.id), ())
        for job_id in reserved:
            unused = self._reserved.pop(job_id, None)
            if unused is not None:
                self.admission.count(unused, -1)
                self._arrived(job_id)
        if not self._reserved:
            self._settled.set()

    # -- dispatching -------------------------------------------------------------------------

    def _can_run(self, job: Ready) -> bool:
        if job.source in self.paused:
            return False
        if self._elsewhere.keys and (job.source, job.action) in self._elsewhere.keys:
            return False  # left to the nodes that have its source and action
        source = self.config.source_for(job.source)
        if source is None:
            return True  # the worker records it as dead with a clear reason
        if not self.admission.action_may_start(source, job.action):
            return False
        if not self.admission.source_may_start(source, job.tenant):
            return False
        return not (
            self._saturated and any(c.key in self._saturated for c in self.admission.caps(job))
        )

    def _forget_saturated(self) -> None:
        now = self.clock.monotonic()
        for key in [k for k, until in self._saturated.items() if until <= now]:
            del self._saturated[key]

    async def _dispatch_once(self) -> int:
        """Claim and start as many jobs as there are free slots; returns how many started.

        A pick the claim did not get (another node claimed it first: both windows held it) is
        gone from the window, and the slot it was picked for is filled again at once. Left for
        the next wake, each such pick used up its lane's turn and kept a slot free until some
        running job ended: a node whose window still held another tenant's jobs that the other
        node had run let 50-60 of a flooding tenant's jobs start before that tenant's new ones.
        """
        if self._stopping:  # a drain has begun: nothing new starts, in any loop
            return 0
        started = 0
        # Bounded: a job the claim skips but that stays queued (its row locked by another
        # node's claim that then rolls back) could come back with the next refill.
        for _ in range(_DISPATCH_ROUNDS):
            n, lost = await self._dispatch_round()
            started += n
            if not lost or self._stopping:
                break
        return started

    async def _dispatch_round(self) -> tuple[int, int]:
        """One pick and claim: (jobs started, picks the claim did not get that are gone)."""
        self.holding = self._burst.holds(self.intake, self.clock.monotonic())
        if self.holding:
            return 0, 0
        if self._refill_now or (self._overflow and len(self.scheduler) <= self._low_water):
            self._trim_blocked()  # first: a full window of blocked lanes makes room this way
            if self.scheduler.room > 0:
                await self._refill()
        if self._saturated:
            self._forget_saturated()
        if self._elsewhere.keys:
            await self._elsewhere.recheck()
        picks: dict[str, Ready] = {}
        free = self.concurrency - len(self._acting) - len(self._reserved)
        room = self.admission.lane_room = self._room_in_lanes()
        while len(picks) < free:
            job = self.scheduler.pop(self._can_run)
            if job is None:
                break
            picks[job.id] = job
            self.admission.count(job, +1)
            if room and (lane := self._rate_lane_of(job)) in room:
                room[lane] -= 1  # it joins the line once it runs
                self._bound_for_lane(job.id, lane)
        if not picks:
            return 0, 0
        # Picks are counted as running from here; a claimed pick keeps its count until its task
        # ends, the others give theirs back below.
        to_start: list[Claimed] = []  # stays empty if the claim or the unclaim raises
        caps = {job_id: mine for job_id, job in picks.items() if (mine := self.admission.caps(job))}
        full: frozenset[str] = frozenset()
        claim_ok = False
        held = 0
        async with self._claiming:
            self._claiming_jobs = len(picks)
            try:
                if caps:
                    # Counted against every node's running jobs, in the claim's transaction.
                    result = await self.journal.claim_capped(list(picks), self.boot_id, caps)
                    claimed, full = result.claimed, result.full
                else:
                    claimed = await self.journal.claim(list(picks), self.boot_id)
                if self._stopping:
                    # A drain began while the claim waited on the journal: start nothing new.
                    failed = await unclaim(self.journal, [c.job.id for c in claimed])
                    if failed is not None:
                        log.error(
                            "%d job(s) claimed as the drain began were not re-queued (%s): %s",
                            len(claimed),
                            failed,
                            self.journal.left_claimed_fate,
                        )
                else:
                    to_start = claimed
                self._claim_failing = False
                claim_ok = True
            except JournalUnavailable as exc:
                # A full disk, say: the picks stay queued in the journal and are read back by
                # the next refill (a wake or the sweep), instead of the dispatcher dying.
                self._refill_now = True
                # A journal gone (removed while open) has the daemon's exit line say so.
                if not self._claim_failing and not isinstance(exc, JournalGone):
                    log.error("claiming jobs failed, will try again: %s", exc)
                self._claim_failing = True
            finally:
                self._claiming_jobs = 0
                starting = {c.job.id for c in to_start}
                for job_id, job in picks.items():
                    if job_id not in starting:
                        self.admission.count(job, -1)
                        self._arrived(job_id)
                if full:
                    held = self._hold_back(full, [j for i, j in picks.items() if i not in starting])
        for c in to_start:
            self._start(c, picks[c.job.id], caps.get(c.job.id, ()))
        lost = len(picks) - len(to_start) - held if claim_ok and not self._stopping else 0
        return len(to_start), lost

    def _room_in_lanes(self) -> dict[str, int]:
        """How many more of its actions' jobs each lane's line takes now (a lane with stock
        admits them at once, and wakes the pool to pick more): those picked before whose calls
        have not come to the lane yet count as in the line already, else the rounds that run
        before their tasks do each fill it again."""
        count = self._to_lane_count
        return {
            name: lane.most_waiting - lane.waiting - count[name]
            for name, lane in self.rate_lanes.items()
        }

    def _hear_lanes(self) -> None:
        """Be woken when a lane admits a call or one leaves its line (at the start, and for the
        lanes a reload adds, which it puts in ``rate_lanes`` before ``reconfigure``)."""
        for lane in self.rate_lanes.values():
            lane.on_change = self._wake.set
            lane.on_arrival = self._arrived
            lane.on_wait = self._waits_in_line

    def _waits_in_line(self, key: object) -> None:
        """A job's call took its place in its lane's line (``RateLane.on_wait``): once the pool
        stops, it is handed back rather than waited for (see ``drain``)."""
        if self._stopping:
            self._hand_back(key)

    def _hand_back(self, key: object) -> None:
        """Cancel a job whose call waits in a lane's line, to put it back to queued unstarted
        (``drain``): it has not begun its work, so the drain need not wait for its turn."""
        task = self._running.get(key) if isinstance(key, str) else None
        if task is not None and key not in self._handed_back:
            assert isinstance(key, str)
            self._handed_back.add(key)
            task.cancel()

    def _bound_for_lane(self, job_id: str, lane: str) -> None:
        """A job of ``lane``'s action was picked: it counts against the line's room until its
        call comes to the lane (see ``_to_lane``)."""
        self._to_lane[job_id] = lane
        self._to_lane_count[lane] += 1

    def _arrived(self, key: object) -> None:
        """A call came to its lane (``RateLane.on_arrival``; ``key`` is its job's id), or the
        job's action returned or it is not started: it no longer counts as on its way."""
        lane = self._to_lane.pop(key, None) if isinstance(key, str) else None
        if lane is not None:
            bump(self._to_lane_count, lane, -1)

    def _rate_lane_of(self, job: Ready) -> str | None:
        source = self.config.source_for(job.source)
        action = source.action(job.action) if source is not None else None
        return action.options.get("lane") if action is not None else None

    def _hold_back(self, full: frozenset[str], refused: list[Ready]) -> int:
        """Caps full with other nodes' jobs: their jobs wait in the window (still queued, no
        attempt used) until a slot may have freed; the others refused went elsewhere. Returns
        how many of ``refused`` were held back."""
        until = self.clock.monotonic() + SATURATED_RECHECK_S
        for key in full:
            self._saturated[key] = until
        held = 0
        for job in refused:
            if any(c.key in full for c in self.admission.caps(job)):
                held += 1
                if not self.scheduler.add(job):
                    self._refill_now = True
        return held

    def _start(self, claimed: Claimed, ready: Ready, caps: tuple[Cap, ...]) -> None:
        """Run a claimed job; its running counts were taken when it was picked."""
        job = claimed.job
        self._acting[job.id] = ready
        if caps:
            self._held_caps[job.id] = caps
        task = asyncio.create_task(self._run(claimed), name=f"job {job.id}")
        self._running[job.id] = task
        self._idle.clear()
        self.started += 1
        generation = self._generation
        self._attempts_of[generation] += 1

        def done(_: asyncio.Task[None]) -> None:
            self._running.pop(job.id, None)
            self._attempts_of[generation] -= 1
            if not self._attempts_of[generation]:
                del self._attempts_of[generation]
                if generation != self._generation:  # the last attempt begun on that config
                    del self._secrets_of[generation]
                    self._remask()
            self._attempting.pop(job.id, None)
            self._release(job.id)  # if the action never returned (cancelled by a drain)
            held = self._held_caps.pop(job.id, ())
            if held:
                self.admission.count(ready, -1)
                for cap in held:  # a slot of its caps is free now: try them
                    self._saturated.pop(cap.key, None)
            if ready.order_key is not None:
                # The next job of its key may start now that this outcome is committed.
                self._refill_now = True
            if not self._running:
                self._idle.set()
            self._wake.set()

        task.add_done_callback(done)

    def _release(self, job_id: str) -> None:
        """The job's action returned: its slot goes to the next job. A capped job keeps its cap
        counts until its outcome is committed: the journal counts it running until then, so a
        claim of the cap's next job would only be refused."""
        self._arrived(job_id)  # a call it never made (an error first, a kept answer)
        ready = self._acting.pop(job_id, None)
        if ready is not None:
            if job_id not in self._held_caps:
                self.admission.count(ready, -1)
            self._wake.set()

    async def run(self) -> None:
        """Dispatch until ``stop()``; the long-lived task of the pool."""
        sweep_s = self.config.workers.sweep_interval_s
        # The first round is a sweep: it reads the paused sources before anything is claimed, so
        # a node started while a source is paused holds its jobs like the others do.
        last_sweep = last_count = self.clock.monotonic() - sweep_s
        self._wake.set()  # and it runs at once, not a sweep interval after the start
        dispatch_failing = False
        told_failing_at = -math.inf  # when a failure was last said (monotonic)
        while not self._stopping:
            timeout = sweep_s
            if self._next_due is not None:
                timeout = min(timeout, max(self._next_due - self.clock.time(), 0.0))
            if self._saturated:
                recheck_s = min(self._saturated.values()) - self.clock.monotonic()
                timeout = min(timeout, max(recheck_s, 0.0))
            if self.holding:
                timeout = min(timeout, HOLD_RECHECK_S)
            # Waited on in this task (wait_for would wrap it in a task of its own): a wake from
            # jobs whose actions returned then runs the dispatcher before the journal's writer
            # takes their outcomes, so the next claims join the same group commit.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            now_mono = self.clock.monotonic()
            due = self._next_due is not None and self._next_due <= self.clock.time()
            # Whether this round reads the journal: only such a round, gone through, says an
            # outage is over (a round that reads nothing went through while it went on, and
            # the next sweep's failure was said again as a new outage).
            reads = due or now_mono - last_sweep >= sweep_s or self._pause_stale
            try:
                if due or now_mono - last_sweep >= sweep_s:
                    self._refill_now = True
                    self._fruitless = 0
                    last_sweep = now_mono
                    self._pause_stale = True
                    # Before the refill: jobs another process re-queued are counted before any
                    # of them can finish and be counted out. Once a sweep interval at most: a
                    # job falling due also sweeps, and those may come many times a second.
                    if now_mono - last_count >= sweep_s:
                        last_count = now_mono
                        await self.journal.refresh_backlog_if_changed()
                if self._pause_stale:
                    self._pause_stale = False
                    read, self._pause_read = self._pause_read, []
                    await self._refresh_paused()
                    for waiter in read:
                        if not waiter.done():
                            waiter.set_result(None)
                while not self._stopping and await self._dispatch_once():
                    pass
                if reads:
                    dispatch_failing = False
            except JournalUnavailable as exc:
                # A journal outage (a PostgreSQL restart) pauses dispatch, it does not end the
                # daemon: the next sweep reads the journal again. Said once per outage, not at
                # every sweep while it lasts, nor again for a read that a pooled connection
                # not yet cut answered in its first seconds.
                recent = self.clock.monotonic() - told_failing_at < RETELL_FAILING_S
                quiet = dispatch_failing or recent or isinstance(exc, JournalGone)
                level = logging.DEBUG if quiet else logging.WARNING
                log.log(level, "dispatch paused until the journal answers again: %s", exc)
                if not quiet:
                    told_failing_at = self.clock.monotonic()
                dispatch_failing = True
                self._refill_now = True

    async def run_until_idle(self) -> float | None:
        """Burst mode: run every due job (and what they lead to) until nothing is due or running.

        Returns when the next queued job falls due (``None`` when nothing is queued), so a test
        can advance its clock there and call again. Once the pool is stopped (``drain``) it
        starts nothing more, and returns once nothing runs.
        """
        self._refill_now = True
        await self._refresh_paused()
        while True:
            started = await self._dispatch_once()
            if not started and not self._running:
                if self._stopping:  # jobs due now included: none of them will start
                    return await self.journal.next_run_at(self.paused)
                if len(self.scheduler) == 0:
                    await self._refill()
                    if len(self.scheduler) == 0:
                        return await self.journal.next_run_at(self.paused, after=self.clock.time())
                    continue
                return await self.journal.next_run_at(self.paused, after=self.clock.time())
            if self._running:
                await asyncio.wait(
                    list(self._running.values()), return_when=asyncio.FIRST_COMPLETED
                )

    def stop(self) -> None:
        """Stop claiming new jobs; running ones go on (see ``drain``)."""
        self._stopping = True
        self._wake.set()

    async def drain(self, grace_s: float) -> int:
        """Give running jobs ``grace_s`` to finish, then cancel them and re-queue them without
        counting the attempt. Returns how many were cancelled; ``left_claimed`` says how many
        of those the journal could not take back (an outage): they wait for a recovery."""
        self.stop()
        async with self._claiming:  # a claim in flight either starts its jobs or gives them back
            pass
        await self._settled.wait()  # so do jobs being written claimed in a group commit
        # A job whose call waits its turn in a lane's line has not started its work: it is
        # handed back now, for another node (or the next start), not waited for within the
        # grace (and one whose call comes to a line from here on, as it does).
        for lane in list(self.rate_lanes.values()):
            for key in lane.in_line():
                self._hand_back(key)
        if self._running:
            started = len(self._running) - len(self._handed_back & self._running.keys())
            if started:
                log.info(
                    "drain: waiting up to %gs (workers.shutdown_grace_s) for %d running"
                    " job(s); a second signal exits at once",
                    grace_s,
                    started,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._idle.wait()
        # Those still running past the grace (a handler that caught the cancel) are cut off
        # as the others are.
        handed = sorted(self._handed_back - self._running.keys())
        self._handed_back.clear()
        for job_id in handed:
            self._cut_kept.pop(job_id, None)
        stragglers = dict(self._running)
        # Taken before the cancel: a job leaves ``_attempting`` as its task ends.
        attempting = {j: a for j, a in self._attempting.items() if j in stragglers}
        # And the masker: a job's end drops the secrets of a config only it still ran on.
        masker = self.masker
        if stragglers:
            stragglers, cut = await cut_off(
                stragglers, attempting, self._cut_kept, masker, self.clock, grace_s
            )
            self._cut_kept.clear()
            if not await requeue_cut_off(self.journal, list(stragglers), cut, grace_s):
                self.left_claimed = len(stragglers)
        if handed and not await requeue_handed_back(self.journal, handed):
            self.left_claimed += len(handed)
        self._lines.flush()  # the counts held back, before the process ends
        return len(stragglers)

    # -- running one job ---------------------------------------------------------------------

    async def _run(self, claimed: Claimed) -> None:
        job, event = claimed.job, claimed.event
        source = self.config.source_for(event.source)
        action_cfg: ActionConfig | None = source.action(job.action) if source else None
        action = self.actions.get((source.name, job.action)) if source else None
        started_at, started = self.clock.time(), self.clock.monotonic()
        if action is None or action_cfg is None:
            missing = f"source {event.source!r}"
            if source is not None:
                missing = f"action {job.action!r} of {missing}"
            # On a cluster whose config is changed node by node, a node that has it runs it.
            if await self._left_elsewhere(claimed, missing):
                return
            # Named with this process: on a cluster, the node a reload has not reached yet.
            node = f"{socket.gethostname()} (pid {os.getpid()})"
            outcome = Outcome.dead(f"{missing} is not configured on {node}")
        else:
            key = id(action)
            self._attempting[job.id] = (claimed, started_at)
            self._attempts_on[key] += 1
            try:
                outcome, timed_out = await run_attempt(action, action_cfg, claimed, self._cut_kept)
                assert source is not None
                if self.admission.note_attempt((source.name, job.action), outcome, timed_out):
                    self._wake.set()
            finally:
                self._attempts_on[key] -= 1
                if not self._attempts_on[key]:
                    del self._attempts_on[key]
                    if key in self._retired:
                        self._close_soon(self._retired.pop(key))
        # Its end is its start and how long it took: a step of the wall clock meanwhile does
        # not make an attempt of an hour (or of less than nothing) in the metrics.
        finished_at = started_at + (self.clock.monotonic() - started)
        finished = decide(
            claimed,
            action_cfg,
            outcome,
            started_at,
            finished_at,
            now=self.clock.time(),
            masker=self.masker,
            rng=self.rng,
        )
        self._attempting.pop(job.id, None)  # its attempt is over: a drain does not cut it off
        self._release(job.id)
        recorded = await self._record(finished)
        if finished.job_id in recorded.lost:
            # Not the job's outcome: its lease passed to another node, which runs it now and
            # reports its own. The journal said so; counted here too, or told as a dead letter,
            # or logged as "outcome=done", it would read as the job's.
            return
        if finished.job_id in recorded.cancelled:
            # Cancelled while it ran: the journal ended it instead of queueing it again.
            finished = dataclasses.replace(
                finished, state=JobState.CANCELLED, outcome="cancelled", run_at=None
            )
        self.outcomes[finished.outcome] += 1
        if (
            finished.state == JobState.QUEUED
            and finished.run_at is not None
            and (self._next_due is None or finished.run_at < self._next_due)
        ):
            self._next_due = finished.run_at
        for hook in self.on_finish:
            hook(claimed, outcome, finished)
        self._lines.tell(self.config, claimed, outcome, finished)

    async def _left_elsewhere(self, claimed: Claimed, missing: str) -> bool:
        """Give a job whose source or action this node lacks (``missing`` says which) back to
        the live nodes that have it, if any does (``LeftElsewhere.left_to``); returns whether
        it was given back."""
        why = await self._elsewhere.left_to((claimed.event.source, claimed.job.action), missing)
        if why is None:
            return False
        await self._give_back(claimed, why)
        return True

    async def _give_back(self, claimed: Claimed, why: str) -> None:
        """Queue a claimed job again, due at once, for another node: not an attempt (none is
        counted or recorded, nor told to the hooks), so its retries, its place in its order
        key and its last error stay as they were."""
        job = claimed.job
        now = self.clock.time()
        self._release(job.id)
        # A wait gives back the attempt its claim counted; its error and result are kept.
        await self._record(
            Finished(
                job.id,
                job.attempts,
                JobState.QUEUED,
                now,
                now,
                "wait",
                run_at=now,
                error=job.last_error,
                result=job.result,
                claim=claimed.claim,
            )
        )
        log.debug(
            "job=%s event=%s source=%s action=%s given back: %s",
            job.id,
            claimed.event.id,
            claimed.event.source,
            job.action,
            why,
        )

    async def _record(self, finished: Finished) -> Recorded:
        """Commit an attempt's outcome, trying again while the journal cannot take it; returns
        whether a cancel made while the job ran ended it instead of a retry or a wait, or its
        lease had passed to another node (the outcome is then not recorded).

        Until it is committed the job stays 'running' in the journal; its slot is free already,
        but a journal that cannot take an outcome cannot take a claim either. Should a drain
        cancel this wait, the drain re-queues the job, or the next start's recovery does: the
        action then runs again (at least once, never lost).
        """
        delay_s = 0.05
        while True:
            # Shielded: a drain that cancels us must not cut a commit in flight. Left to end
            # by itself then, its failure is the drain's to report, not an unread exception
            # with its traceback at exit.
            commit = asyncio.ensure_future(self.journal.finish([finished]))
            try:
                return await asyncio.shield(commit)
            except asyncio.CancelledError:
                commit.add_done_callback(let_go)
                raise
            except JournalUnavailable as exc:
                if delay_s == 0.05 and not isinstance(exc, JournalGone):
                    # Until the exit, for a journal gone: the job runs again at the next start.
                    log.error(
                        "job=%s outcome=%s not recorded yet, will try again: %s",
                        finished.job_id,
                        finished.outcome,
                        exc,
                    )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, FINISH_RETRY_MAX_S)

    def running_by_lane(self) -> dict[Lane, int]:
        """Jobs running (or being claimed) per lane."""
        return self.admission.running_by_lane()

    @property
    def slow(self) -> set[tuple[str, str]]:
        """Actions (configured source, action) running one job at a time, their last attempts
        having ended by their timeout (``Admission.note_attempt``)."""
        return self.admission.slow

    def statistics(self) -> PoolStats:
        return PoolStats(
            concurrency=self.concurrency,
            busy=len(self._acting),
            claiming=self._claiming_jobs + len(self._reserved),
            window=len(self.scheduler),
            started=self.started,
            outcomes=dict(self.outcomes),
            holding=self.holding,
        )
