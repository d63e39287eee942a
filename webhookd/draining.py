"""What a drain does with the jobs it did not wait out: it cuts off the attempts still running
past ``workers.shutdown_grace_s`` and records them as not counted, puts those jobs back to
queued, and the jobs it took out of their lanes' lines too, and says what it gave back.

The pool's ``drain`` decides which jobs those are; these take what they need of it as
arguments.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from webhookd.clock import Clock
from webhookd.errors import JournalGone, JournalUnavailable
from webhookd.journal.base import BaseJournal
from webhookd.journal.records import Claimed, Finished
from webhookd.models import JobState
from webhookd.redact import Masker

log = logging.getLogger("webhookd.workers")  # its lines are the worker pool's

# How long a drain waits for the attempts it cancelled to end before it re-queues them anyway.
CUT_WAIT_S = 3.0
# What an attempt the drain cut off may have done by then, in its error, by its action's kind.
_CUT_MAY_HAVE = {
    "forward": "its target may have had the request",
    "openai": "its target may have had the request",
    "python": "its handler may have done its work",
    "command": "its program may have done its work",
}


async def cut_off(
    stragglers: dict[str, asyncio.Task[None]],
    attempting: dict[str, tuple[Claimed, float]],
    cut_kept: dict[str, tuple[Any, dict[str, Any]]],
    masker: Masker,
    clock: Clock,
    grace_s: float,
) -> tuple[dict[str, asyncio.Task[None]], list[Finished]]:
    """Cancel the jobs' tasks still running past the grace (``stragglers``) and wait for them
    (``CUT_WAIT_S`` at most); returns those that did not return an outcome of their own, and
    the records of the attempts among them that had begun (``attempting``: each one's claim
    and start), with what each kept (taken from ``cut_kept``)."""
    for task in stragglers.values():
        task.cancel()
    cut: list[Finished] = []
    ended, stuck = await asyncio.wait(stragglers.values(), timeout=CUT_WAIT_S)
    for task in ended:
        if not task.cancelled():
            task.exception()  # read: an error past the cancel is the attempt's, unlogged
    # A handler that caught the cancel and returned: its outcome is recorded, its job
    # neither cut off nor re-queued.
    stragglers = {
        j: t
        for j, t in stragglers.items()
        if not (t in ended and not t.cancelled() and t.exception() is None)
    }
    attempting = {j: a for j, a in attempting.items() if j in stragglers}
    for job_id, task in stragglers.items():
        if task in stuck and job_id in attempting:
            # A handler that catches CancelledError and goes on: named here, since
            # the stop's own deadline can only say that something did not end.
            job = attempting[job_id][0].job
            log.warning(
                "drain: job=%s action=%s did not end %gs after it was cancelled (does"
                " its handler catch CancelledError?): re-queued, and left running"
                " until the process exits",
                job_id,
                job.action,
                CUT_WAIT_S,
            )
    for job_id, (claimed, started_at) in attempting.items():
        # What the cut attempt kept: a result (an answer whose then-forward was in
        # flight, for the next attempt to post instead of asking again) and its detail
        # (a command's output so far).
        result, kept = cut_kept.pop(job_id, (None, {}))
        done = _CUT_MAY_HAVE.get(claimed.job.type, "it may have done its work")
        cut.append(
            Finished(
                job_id,
                claimed.job.attempts,
                JobState.QUEUED,
                started_at,
                clock.time(),
                "interrupted",
                error=f"cut off by the drain after workers.shutdown_grace_s"
                f" ({grace_s:g} s), {done}; not counted: the job runs again as this"
                " attempt",
                result=masker.deep(result),
                detail=masker.deep({**kept, "counted": False}),
            )
        )
    return stragglers, cut


async def requeue_cut_off(
    journal: BaseJournal, job_ids: list[str], cut: Sequence[Finished], grace_s: float
) -> bool:
    """Put the jobs ``cut_off`` left back to queued, with the records of their cut attempts,
    and say so; returns whether the journal took them back."""
    late = _drain_said(len(cut), len(job_ids) - len(cut), grace_s)
    failed = await unclaim(journal, job_ids, cut)
    if failed is None:
        log.warning("%s; re-queued", late)
        return True
    _not_requeued(journal, late, failed)
    return False


async def requeue_handed_back(journal: BaseJournal, handed: list[str]) -> bool:
    """Put the jobs a drain took out of their lanes' lines back to queued: no attempt was
    made, so none is recorded. Returns whether the journal took them back."""
    said = (
        f"drain: {len(handed)} job(s) waiting for their lane's turn handed back, not"
        " started (no attempt counted)"
    )
    failed = await unclaim(journal, handed)
    if failed is None:
        log.info("%s: re-queued, for another node or the next start", said)
        return True
    _not_requeued(journal, said, failed)
    return False


def _not_requeued(journal: BaseJournal, said: str, failed: JournalUnavailable) -> None:
    """Say that jobs a drain let go stay claimed in the journal, ``said`` being what it did."""
    if isinstance(failed, JournalGone):
        # Its file removed while open: the line the daemon exits with says where the
        # journal went, these jobs running in it, and whether the next start has them.
        log.info("%s; not re-queued (%s)", said, failed)
    else:
        log.error(
            "%s, and could not be re-queued (%s): %s", said, failed, journal.left_claimed_fate
        )


async def unclaim(
    journal: BaseJournal, job_ids: list[str], cut: Sequence[Finished] = ()
) -> JournalUnavailable | None:
    """Put claimed jobs back to queued (``cut``: the attempts a drain cut off, recorded);
    why not, when the journal could not."""
    try:
        await journal.unclaim(job_ids, cut)
    except JournalUnavailable as exc:
        return exc
    return None


def _drain_said(running: int, unrecorded: int, grace_s: float) -> str:
    """The drain's line on what it gave back: jobs still running at the end of the grace (cut
    off), and jobs whose attempt had ended but whose outcome the journal did not take (an
    outage): both run again, and the second kind's target has had its delivery already."""
    said = []
    if running:
        said.append(f"{running} job(s) still running after {grace_s:g}s were cut off")
    if unrecorded:
        said.append(
            f"{unrecorded} job(s) finished but their outcome was not recorded in time (unless"
            " it lands yet, each runs again: a delivery it made is made twice)"
        )
    return "drain: " + "; ".join(said)
