"""What the journal takes and gives back: frozen records, no SQL; and what it asks of the worker
pool at a commit (``Starter``)."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from webhookd.config.sections import ALERT_SOURCE, CATCH_ALL
from webhookd.models import LANE_CALL_S, LANE_TOKENS, Event, Job, JobState, quick_init
from webhookd.redact import shown_headers, shown_query
from webhookd.schemes.base import VerifyConfig

# The most of a body an event's document carries: enough to read any ordinary webhook, and a
# bound on what one request for one event sends back (the whole body stays in the journal).
SHOWN_BODY_BYTES = 64 * 1024
# The jobs a bulk replay or cancel looks for: dead, queued, dead ones dismissed, or done.
JobsIn = Literal["dead", "queued", "unfinished", "dismissed", "done", "cancelled"]
# How many of the names a catch-all source took ``Counts.sources_shown`` lists one by one, and
# ``counts()`` reads one by one: the rest are summed under the catch-all's own name, ``*``.
CATCH_ALL_SHOWN = 50


@quick_init
@dataclass(frozen=True, slots=True)
class NewJob:
    id: str
    action: str
    type: str
    max_attempts: int
    order_key: str | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class NewEvent:
    """An accepted webhook and its jobs, ready to be journaled.

    ``body_key``, when set, is a second dedup key (the signed body's hash, for schemes whose
    signature has no timestamp): an event already holding either key makes this a duplicate.
    ``filtered`` names the actions that get no job because their ``when`` did not match.
    """

    event: Event
    jobs: tuple[NewJob, ...]
    body_key: str | None = None
    filtered: tuple[str, ...] = ()  # the names of actions whose ``when`` did not match


@quick_init
@dataclass(frozen=True, slots=True)
class Ingested:
    event_id: str
    duplicate: bool


# Where the scheduler queues a job: (priority, source, tenant). Tenants take turns per class.
Lane = tuple[int, str, str]


@dataclass(frozen=True, slots=True)
class LaneBacklog:
    """Queued jobs of one lane, for ``/stats``: how many, and when the one due longest fell due
    (``None`` while none is due: all wait for a retry's backoff, say)."""

    lane: Lane
    queued: int
    oldest_due_at: float | None


@quick_init
@dataclass(frozen=True, slots=True)
class Ready:
    """A queued job that is due: what the scheduler needs to pick it, and no more."""

    id: str
    source: str
    action: str
    priority: int
    tenant: str
    order_key: str | None
    seq: int

    @property
    def lane(self) -> Lane:
        return (self.priority, self.source, self.tenant)


@quick_init
@dataclass(frozen=True, slots=True)
class Claimed:
    """A job claimed for one attempt, with its event: everything a worker needs.

    ``claim`` is the journal's name for this claim, when it has one (PostgreSQL's claim token;
    SQLite, one process, has none): the attempt's outcome carries it back (``Finished.claim``),
    so the journal can tell which claim an outcome answers, however late it arrives.
    """

    job: Job
    event: Event
    waits: int
    claim: str = ""


@dataclass(frozen=True, slots=True)
class Cap:
    """A limit on running jobs shared by every node: at most ``limit`` running jobs may carry
    ``key`` (an action's, a source's or a tenant's concurrency)."""

    key: str
    limit: int


@dataclass(frozen=True, slots=True)
class CapClaim:
    """What ``claim_capped`` did: the jobs claimed, and the caps that kept others queued."""

    claimed: list[Claimed]
    full: frozenset[str]  # keys of caps found at their limit


@quick_init
@dataclass(frozen=True, slots=True)
class Finished:
    """The outcome of one attempt, as the worker reports it."""

    job_id: str
    attempt: int
    state: JobState  # queued (retry or wait), done, dead
    started_at: float
    finished_at: float
    outcome: str  # done | retry | dead | wait | interrupted
    run_at: float | None = None
    error: str | None = None
    result: Any = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    claim: str = ""  # the ``Claimed.claim`` of the attempt this is the outcome of
    # A wait that counts towards ``attempts.MAX_WAITS`` (a provider's 429): not a lane's own
    # pacing or a hold for a lane out of quota, which may last as long as they must.
    counted_wait: bool = False


@dataclass(frozen=True, slots=True)
class EventSummary:
    id: str
    source: str
    received_at: float
    tenant: str
    priority: str
    state: str
    jobs: int


@dataclass(frozen=True, slots=True)
class EventDetail:
    event: Event
    state: str
    jobs: tuple[Job, ...]
    filtered: tuple[str, ...] = ()

    def as_dict(self, verify: VerifyConfig | None = None) -> dict[str, Any]:
        """The one JSON shape of ``GET /events/<id>`` and ``webhookd show --json`` (contract).

        ``headers`` are shown with credential and signature values masked (``verify``, the
        source's, names its own signature header), and so are the ``query``'s credential
        parameters (``""`` when the URL had none); ``body`` is the body as text (UTF-8, bad
        bytes replaced), its first ``SHOWN_BODY_BYTES`` when ``body_truncated``.
        """
        e = self.event
        return {
            "id": e.id,
            "source": e.source,
            "received_at": e.received_at,
            "dedup_key": e.dedup_key,
            "tenant": e.tenant or None,
            "priority": e.priority.label,
            "verified": dict(e.verified) if e.verified else None,
            "state": self.state,
            "content_type": e.content_type,
            "body_bytes": len(e.body),
            "query": shown_query(e.query),
            "headers": [list(pair) for pair in shown_headers(e.headers, verify)],
            "body": e.body[:SHOWN_BODY_BYTES].decode("utf-8", "replace"),
            "body_truncated": len(e.body) > SHOWN_BODY_BYTES,
            "filtered": list(self.filtered),
            "jobs": [job_dict(j) for j in self.jobs],
        }


def job_dict(j: Job) -> dict[str, Any]:
    return {
        "id": j.id,
        "action": j.action,
        "type": j.type,
        "state": str(j.state),
        "cancel_requested": j.cancel_requested,
        "finished_at": j.finished_at,
        "dismissed_at": j.dismissed_at,
        "attempts": j.attempts,
        "max_attempts": j.max_attempts,
        "run_at": j.run_at,
        "result": j.result,
        "last_error": j.last_error,
        "waiting_for": j.waiting_for,
        "errors": [
            {
                "attempt": a.n,
                "started_at": a.started_at,
                "finished_at": a.finished_at,
                "outcome": a.outcome,
                "error": a.error,
                "detail": dict(a.detail) if a.detail else None,
            }
            for a in j.history
        ],
    }


@dataclass(frozen=True, slots=True)
class Poisoned:
    """A job sent to dead by recovery: interrupted by a crash or restart ``max_recoveries``
    times (a poison pill). Alerts and ``webhookd_dead_letters_total`` count it like any dead
    job, though no worker saw it end."""

    source: str
    action: str
    event_id: str


@dataclass(frozen=True, slots=True)
class Recovery:
    requeued: int
    poisoned: tuple[Poisoned, ...] = ()
    cancelled: int = 0  # cancelled while they ran: not queued again (nor sent to dead)
    # The silent nodes whose jobs these were, each as "host pid N (node id)" (PostgreSQL).
    nodes: tuple[str, ...] = ()
    # The nodes that stopped leaving some running (a drain that could not give them back),
    # named as the silent ones (by their id alone once their row is gone), and how many were
    # running under no node: copied so from SQLite (``webhookd copy``) (PostgreSQL).
    stopped: tuple[str, ...] = ()
    copied: int = 0

    @property
    def dead(self) -> int:
        return len(self.poisoned)

    def whose(self) -> str:
        """Whose jobs these were, for a log line (``re-queued 3 job(s) <whose>``): the silent
        nodes, the stopped ones, the SQLite daemon a journal was copied from; empty when not
        known (SQLite: its own earlier run's)."""
        parts = []
        if self.nodes:
            parts.append(f"of silent node(s){self.named_nodes()}")
        if self.stopped:
            parts.append(f"of stopped node(s){_some(self.stopped)}")
        if self.copied:
            parts.append(
                f"{'' if not parts else f'{self.copied} '}left running by the SQLite daemon this"
                " journal was copied from"
            )
        return ", and ".join(parts)

    def named_nodes(self, shown: int = 5) -> str:
        """The silent nodes for a log line, `` web-2 pid 4121 (node_…), … and 3 more``; empty
        with none."""
        return _some(self.nodes, shown)

    def named(self, shown: int = 5) -> str:
        """The poison pills' events for a log line, `` (evt_…, evt_… and 3 more)``; empty with
        none: ``webhookd show`` then finds each without a search."""
        if not self.poisoned:
            return ""
        ids = [p.event_id for p in self.poisoned[:shown]]
        more = len(self.poisoned) - shown
        return f" ({', '.join(ids)}{f' and {more} more' if more > 0 else ''})"


def _some(names: Sequence[str], shown: int = 5) -> str:
    """``names`` for a log line, `` a, b, … and 3 more``; empty with none."""
    if not names:
        return ""
    more = len(names) - shown
    return f" {', '.join(names[:shown])}{f' and {more} more' if more > 0 else ''}"


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a replay did to one event's jobs."""

    requeued: int  # finished jobs (dead, done, cancelled) queued again with fresh attempts
    run_now: int  # queued jobs that waited for a later run_at (backoff, snooze, rate limit)


@dataclass(frozen=True, slots=True)
class Recorded:
    """What became of outcomes handed to ``finish``, by job id (those in neither set were
    recorded as they said)."""

    cancelled: frozenset[str] = frozenset()  # recorded, but ended cancelled (cancelled running)
    lost: frozenset[str] = frozenset()  # not recorded: their lease had passed to another node


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What a cancel did to one event's jobs."""

    cancelled: int  # queued jobs (due or waiting for a retry, a lane, a pause) now cancelled
    running: int  # jobs running at that moment: they finish their attempt, never retried


@dataclass(frozen=True, slots=True)
class Purged:
    """What a purge did to one event: deleted with its jobs, their attempts and its dedup key,
    or left whole because a job of it was running (``running``)."""

    jobs: int  # deleted, in any state
    queued: int  # of those, queued ones (the backlog's)
    running: int = 0  # running at that moment: nothing of the event deleted


@dataclass(frozen=True, slots=True)
class DeadCause:
    """Dead jobs of one source's action that ended with the same error (its first
    ``CAUSE_CHARS``): what ``webhookd stats`` lists under "dead letters by cause"."""

    source: str
    action: str
    error: str | None
    jobs: int
    last_at: float  # when the latest of them went dead


@dataclass(frozen=True, slots=True)
class DeadJobs:
    """Jobs that went dead within a time window: how many of each source, and the latest of
    them (``latest``: event id, source, action, last error; newest last): what a dead-job
    alert tells."""

    by_source: dict[str, int]
    latest: list[tuple[str, str, str, str | None]]


# How much of a dead job's last error tells its cause: a target's URL and status, an
# exception's type and the start of its message, past which errors of one cause still differ
# (an order id, a response body).
CAUSE_CHARS = 120


def by_action(rows: Iterable[Sequence[Any]]) -> dict[tuple[str, str], int]:
    """``unfinished_by_action``'s answer from rows of (source, action, jobs), as every reader of
    it (both journals, and ``check``'s read-only peeks) gets them."""
    return {(source, action): int(n) for source, action, n in rows}


@dataclass(frozen=True, slots=True)
class Peeked:
    """What ``check`` reads of a journal without opening it: its queued or running jobs by
    (source, action), its schema version (0: no journal yet), and, when ``serve`` of this
    webhookd would upgrade it, its events (None otherwise: not counted)."""

    unfinished: Mapping[tuple[str, str], int]
    version: int
    events: int | None = None


def kept_sources(keep: Collection[str]) -> list[str]:
    """The names ``counts()`` reads one by one: ``keep`` (the configured sources) and the
    alerts' own, which ``sources_shown`` lists whether [alerts] is on or not."""
    return sorted({*keep, ALERT_SOURCE})


@dataclass(frozen=True, slots=True)
class Counts:
    jobs_by_state: Mapping[str, int]
    jobs_by_source: Mapping[str, Mapping[str, int]]
    # When the queued job due longest fell due (its run_at: its receipt, or the end of a
    # retry's backoff); jobs not due yet are waiting on purpose and do not count.
    oldest_due_at: float | None
    events: int

    @classmethod
    def of(cls, rows: Iterable[Sequence[Any]], oldest_due_at: float | None, events: int) -> Counts:
        """From rows of (source, state, jobs), as both journals' ``counts()`` read them."""
        by_state: dict[str, int] = {s.value: 0 for s in JobState}
        by_source: dict[str, dict[str, int]] = {}
        for source, state, n in rows:
            by_state[state] = by_state.get(state, 0) + int(n)
            by_source.setdefault(source, {})[state] = int(n)
        return cls(by_state, by_source, oldest_due_at, events)

    def sources_shown(
        self, configured: Collection[str], most: int = CATCH_ALL_SHOWN
    ) -> dict[str, dict[str, int]]:
        """Jobs by state per source, as ``/stats`` and ``webhookd stats`` show them: every
        configured source (the alerts' own too), and of the names a catch-all took (any
        ``/hooks/<name>`` can add one) the ``most`` with the most jobs; the rest are summed
        under ``*``, the catch-all's own name, as the metrics label them. Without that bound a
        client posting to a new name each time made the document, and the dashboard's source
        picker, grow with every name still in the journal."""
        # ``*``: the names ``counts()`` folded already (no job's source is ever the catch-all's
        # own name), summed with the rest below rather than ranked among the names.
        taken = sorted(
            (
                n
                for n in self.jobs_by_source
                if n not in configured and n != ALERT_SOURCE and n != CATCH_ALL
            ),
            key=lambda name: (-sum(self.jobs_by_source[name].values()), name),
        )
        folded = set(taken[most:])
        if CATCH_ALL not in configured and CATCH_ALL in self.jobs_by_source:
            folded.add(CATCH_ALL)
        shown = {k: dict(v) for k, v in sorted(self.jobs_by_source.items()) if k not in folded}
        if folded:
            rest = shown.setdefault("*", {})
            for name in folded:
                for state, n in self.jobs_by_source[name].items():
                    rest[state] = rest.get(state, 0) + n
        # A configured source with no job yet is there too, with none: not missing, as it was.
        missing = [n for n in configured if n not in shown and n != CATCH_ALL]
        if missing:
            shown = dict(sorted({**shown, **{n: {} for n in missing}}.items()))
        return shown


@dataclass(frozen=True, slots=True)
class Pruned:
    """What one ``prune`` batch deleted, and how far its walk over the old events got:
    ``walked_to`` is the receive time the next batch of the same pass may start from (the last
    candidate's when the batch was full, else the end of the window walked); every event
    older than it was deleted or found kept. Both journals set it."""

    events: int
    jobs: int
    dedup: int
    walked_to: float | None = None


def walk_end(candidates: Sequence[Sequence[Any]], batch: int, done_before: float) -> float:
    """``Pruned.walked_to`` from a batch's candidates, rows of (event id, received at) oldest
    first: the last one's time when the batch was full (ties at it are looked at again, not
    skipped), else ``done_before``, the end of the window."""
    return float(candidates[-1][1]) if len(candidates) == batch else done_before


@dataclass(frozen=True, slots=True)
class Activity:
    """What happened in the last ``window_s`` seconds (for ``webhookd stats``)."""

    window_s: float
    received: int
    attempts_by_outcome: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class LaneAction:
    """An action that makes its calls through a rate lane (``[lanes.NAME]``), as
    ``lane_calls`` asks for them."""

    source: str  # ``CATCH_ALL``: the catch-all's, whose jobs go by the name each webhook took
    action: str
    lane: str
    most: int  # the lane's latest calls are read, at most this many (its rpm)
    tokens: int  # what a call counts when its attempt kept no count (the action's max_tokens)


@dataclass(frozen=True, slots=True)
class LaneCall:
    """A call an earlier process made through a lane: when it left (wall clock; at the latest,
    when its attempt recorded no time of its own) and the tokens it counts."""

    at: float
    tokens: int


def lane_call(
    started_at: float,
    finished_at: float,
    outcome: str,
    detail: str | None,
    result: str | None,
    tokens: int,
) -> LaneCall | None:
    """The call an attempt of a lane's action made, from its row (``detail`` and the job's
    ``result`` as JSON text, ``result`` only for ``done``); ``None`` when it made none.

    An attempt of this release says when its call left and what it counts (``LANE_CALL_S``,
    ``LANE_TOKENS``). Else (cut off by a crash, recovered at the next start; cut off by a drain
    or its timeout before the call; written by an earlier release) the call is counted at the
    attempt's end, which no call is after, and at the answer's usage when it was done, else at
    ``tokens`` (the action's ``max_tokens``: the prompt is not counted). An attempt that posted
    an answer kept from an earlier one made no call."""
    try:
        said = json.loads(detail) if detail else {}
    except ValueError:
        said = {}
    if not isinstance(said, dict):
        said = {}
    if said.get("answer_reused") is True:
        return None
    after_s = said.get(LANE_CALL_S)
    at = finished_at
    if isinstance(after_s, (int, float)) and not isinstance(after_s, bool) and after_s >= 0:
        at = min(started_at + after_s, finished_at)
    counted = said.get(LANE_TOKENS)
    if isinstance(counted, int) and not isinstance(counted, bool) and counted >= 0:
        return LaneCall(at, counted)
    if said.get("status") == 429:
        return LaneCall(at, 0)  # refused: the lane gave its tokens back
    if outcome == "done" and result:
        try:
            usage = json.loads(result).get("usage") or {}
            total = usage.get("total_tokens")
        except (ValueError, AttributeError):
            total = None
        if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
            return LaneCall(at, total)
    return LaneCall(at, tokens)


def calls_by_lane(rows: Iterable[Sequence[Any]]) -> dict[str, list[LaneCall]]:
    """``lane_calls``' answer from its rows (lane, started_at, finished_at, outcome, detail,
    result, tokens): the calls by lane, oldest first."""
    found: dict[str, list[LaneCall]] = {}
    for lane, started_at, finished_at, outcome, detail, result, tokens in rows:
        call = lane_call(started_at, finished_at, outcome, detail, result, tokens)
        if call is not None:
            found.setdefault(lane, []).append(call)
    for calls in found.values():
        calls.sort(key=lambda call: call.at)
    return found


@dataclass(frozen=True, slots=True)
class Series:
    """Per-step counts over a window, oldest step first, for the dashboard's charts.

    Step ``i`` covers ``[start + i * step_s, start + (i + 1) * step_s)``; ``backlog[i]`` is the
    jobs queued or running at the step's end (at the read's ``now`` for the last step).
    """

    start: float
    step_s: int
    accepted: tuple[int, ...]
    finished: tuple[int, ...]
    dead: tuple[int, ...]
    backlog: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Peer:
    """Another node, as one lacking a job's source or action sees it (``peer_names``): its
    name in log lines (``host pid N``), what it runs (``config.cluster_names``), and, for one
    that stopped cleanly, how long what it ran still counts (``stopped_left_s``: the rest of
    its lease; None while it runs)."""

    name: str
    runs: str
    stopped_left_s: float | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One ``webhookd serve`` process working on the journal, as ``/stats`` shows it.

    ``running`` counts the jobs the journal records as claimed by it; ``stale`` means it has
    been silent past the lease, so another node is about to take its jobs back. A SQLite
    journal has exactly one node: the process asking.
    """

    node_id: str
    host: str
    pid: int | None
    started_at: float
    heartbeat_at: float
    running: int
    this: bool
    stale: bool
    # Whether it runs the sources, actions and lanes this node does (``cluster_digest``);
    # None where it did not say (an older webhookd, a SQLite journal's one node).
    same_config: bool | None = None

    def summary(self, now: float) -> dict[str, Any]:
        """The node as ``/stats`` and ``webhookd stats --json`` show it."""
        return {
            "node_id": self.node_id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at,
            "heartbeat_age_s": round(max(now - self.heartbeat_at, 0.0), 3),
            "running": self.running,
            "this": self.this,
            "stale": self.stale,
            "same_config": self.same_config,
        }


class Starter(Protocol):
    """Who may take a group commit's new jobs as it writes them (the worker pool).

    An idle pool need not wait for a commit, then a claim of its own, then the claim's commit:
    a new job it can start at once is written already claimed by ``boot_id`` (``running``, one
    attempt counted) in the commit that journals its webhook, and handed over once that commit
    is done. Before writing a group of ingests the journal asks ``room_at_commit``; if every new
    job of the group fits, it offers the group's webhooks to ``reserve``, which answers the ids
    of the jobs it takes (their slots are kept for them). After the write, committed or not,
    ``settle`` gets the jobs written as claimed and every id reserved: the others (a
    duplicate's, a failed commit's) give their slots back.
    """

    boot_id: str

    def room_at_commit(self) -> int:
        """How many new jobs could start now; 0 when none may (busy, held, stopping…)."""
        ...

    def reserve(self, items: Sequence[NewEvent]) -> frozenset[str]:
        """The ids of the new jobs of ``items`` to write as claimed."""
        ...

    def settle(self, started: Sequence[Claimed], reserved: frozenset[str]) -> None:
        """Run ``started``; free the slots of the rest of ``reserved``."""
        ...
