"""One attempt of a job: its action run under its timeout, its errors caught as its outcome, and
what that outcome makes of the job (done, dead, a wait, a retry after its backoff). Only the
worker pool runs attempts, so only this module catches an action's errors."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable
from typing import Any

from webhookd.actions.base import Action, Outcome, cut_note, cut_outcome, cut_short
from webhookd.config.sections import ActionConfig, RetryPolicy
from webhookd.errors import Reject, Retry
from webhookd.journal.records import Claimed, Finished
from webhookd.models import JobState, storable_text
from webhookd.redact import Masker

# The worker pool's logger: an action's failures are told where its jobs' other lines are.
log = logging.getLogger("webhookd.workers")

MAX_WAITS = 100  # rate-limit reschedules (429s) that do not use an attempt, per job
_ERROR_CHARS = 2000


def backoff_s(policy: RetryPolicy, attempt: int, rng: Callable[[], float] = random.random) -> float:
    """The wait after the ``attempt``-th failure: ``min(cap, base·factor^(n-1)) · U(0.5, 1)``.

    The random half spreads out the retries of jobs that failed together (one outage).
    """
    try:
        raw = policy.base_s * policy.factor ** max(attempt - 1, 0)
    except OverflowError:  # max_attempts in the thousands ("every minute for days")
        raw = math.inf
    return min(policy.cap_s, raw) * (0.5 + 0.5 * rng())


def retry_delay_s(
    policy: RetryPolicy,
    attempt: int,
    after_s: float | None,
    rng: Callable[[], float] = random.random,
) -> float:
    """The delay before the next attempt: the backoff, or longer if downstream asked
    (``Retry-After``, ``Retry(after_s=…)``), but never past ``cap_s``: a target that answers
    ``Retry-After: 99999999`` must not park a job for years."""
    delay = backoff_s(policy, attempt, rng)
    if after_s is not None and not math.isnan(after_s):
        delay = max(delay, min(after_s, policy.cap_s))
    return delay


async def run_attempt(
    action: Action,
    cfg: ActionConfig,
    claimed: Claimed,
    cut_kept: dict[str, tuple[Any, dict[str, Any]]],
) -> tuple[Outcome, bool]:
    """How the attempt ended, and whether it was ended by ``timeout_s``. An attempt a drain
    cancels raises, leaving what it saw so far in ``cut_kept`` for the drain's record."""
    try:
        async with asyncio.timeout(cfg.timeout_s):
            return await action.run(claimed.event, claimed.job), False
    except TimeoutError as exc:  # with what the action saw so far, if it kept any
        if (ended := cut_outcome(exc)) is not None:
            # Its work had ended before the cut (a command's program had exited, a process
            # it left holding its pipes): that is the outcome, not a timeout.
            return ended, False
        # Named by where it went, as its other failures are ("<url> answered 503"); masked
        # with them before it is logged or kept.
        target = getattr(action, "target", None)
        said = f"timed out after {cfg.timeout_s:g}s" + (f" ({target})" if target else "")
        if note := cut_note(exc):  # what the timeout did not stop
            said += f"; {note}"
        result, detail = cut_short(exc)
        return Outcome.retry(said, result=result, **detail), True
    except Retry as exc:
        return Outcome.retry(exc.reason, after_s=exc.after_s), False
    except Reject as exc:
        return Outcome.dead(exc.reason), False
    except Exception as exc:  # an action's bug or an unexpected failure: retry it
        log.debug("action %s raised", cfg.name, exc_info=True)
        return Outcome.retry(f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]), False
    except BaseException as exc:
        task = asyncio.current_task()
        result, detail = cut_short(exc)
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
            if (ended := cut_outcome(exc)) is not None:
                # A drain cut an attempt whose work had ended (as above): recorded as that,
                # not queued to run again; the task ends once it is recorded.
                return ended, False
            cut_kept[claimed.job.id] = (result, detail)  # for the drain's record
            raise  # a drain cancelling the job
        # SystemExit, KeyboardInterrupt, a stray CancelledError: one job's failure, which
        # must not reach the event loop (it would stop the daemon half way).
        said = f"action raised {type(exc).__name__}: {exc}"[:_ERROR_CHARS]
        return Outcome.retry(said, result=result, **detail), False


def decide(
    claimed: Claimed,
    cfg: ActionConfig | None,
    outcome: Outcome,
    started_at: float,
    finished_at: float,
    *,
    now: float,
    masker: Masker,
    rng: Callable[[], float],
) -> Finished:
    """What an attempt's ``outcome`` makes of its job as of ``now``: done, dead, a wait, or a
    retry after its backoff (dead once its attempts are used); its error, detail and result
    masked with ``masker``."""
    job = claimed.job
    # Else an outcome whose error holds a lone surrogate is never recorded: the job would
    # stay running, its write retried as an outage.
    # Masked, then cut: a secret across the cut would keep its first half.
    error = storable_text(masker.text(outcome.error)[:_ERROR_CHARS]) if outcome.error else None
    detail = masker.deep(outcome.detail) if outcome.detail else outcome.detail
    # A handler's return value or a model's answer may quote a secret as a command's output
    # may: masked the same (an answer kept for a retry's then-forward was masked as kept).
    outcome_result = masker.deep(outcome.result) if outcome.result is not None else None

    def make(
        state: JobState,
        kind: str,
        run_at: float | None = None,
        err: str | None = error,
        counted_wait: bool = False,
    ) -> Finished:
        result = outcome_result
        if result is None and state != JobState.DONE:
            # What an earlier attempt kept (an openai answer whose then-forward failed)
            # outlives an attempt that ends with none, a timeout say: else the next one
            # pays for the work again.
            result = job.result
        return Finished(
            job_id=job.id,
            attempt=job.attempts,
            state=state,
            started_at=started_at,
            finished_at=finished_at,
            outcome=kind,
            run_at=run_at,
            error=err,
            result=result,
            detail=detail,
            claim=claimed.claim,
            counted_wait=counted_wait,
        )

    if outcome.kind == "done":
        return make(JobState.DONE, "done", err=None)
    if outcome.kind == "dead":
        return make(JobState.DEAD, "dead")
    # A lane pacing its calls (``paced``) is no sign of trouble: however long a backlog
    # keeps a job waiting its turn, it never gives up on it for that (it never ran); nor
    # while its lane is out of quota or the daemon out of open files (``held``). Neither
    # counts towards MAX_WAITS: after a hundred turns waited, a job's first 429 used an
    # attempt.
    exempt = bool(outcome.detail.get("paced") or outcome.detail.get("held"))
    if outcome.kind == "wait" and (exempt or claimed.waits < MAX_WAITS):
        # An action bounds its own waits (a lane's max_cooldown_s); this only keeps a nan,
        # an inf or a negative from becoming a run_at.
        wait_s = outcome.after_s
        if wait_s is None or not (math.isfinite(wait_s) and wait_s > 0):
            wait_s = 1.0
        return make(JobState.QUEUED, "wait", now + wait_s, counted_wait=not exempt)
    # A failure: retry with backoff, or give up when the attempts are used.
    if job.attempts >= job.max_attempts or cfg is None:
        return make(JobState.DEAD, "dead", err=f"gave up after {job.attempts} attempt(s): {error}")
    delay = retry_delay_s(cfg.retry, job.attempts, outcome.after_s, rng)
    return make(JobState.QUEUED, "retry", now + delay)
