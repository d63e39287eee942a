"""The action interface: what every action kind implements, and the outcome it reports.

An action either returns an ``Outcome`` or raises ``webhookd.Retry`` / ``webhookd.Reject``.
Any other exception counts as a retryable failure. The worker, and only the worker, turns all
of that into a recorded attempt; actions never touch the journal.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from webhookd.config.parsing import COMMON_ACTION_KEYS
from webhookd.config.sections import ActionConfig, ActionDefaults, Config
from webhookd.config.table import Table
from webhookd.models import Event, Job
from webhookd.redact import Masker, secret_values

if TYPE_CHECKING:
    import aiohttp

    from webhookd.limiter import Lane

OutcomeKind = Literal["done", "retry", "dead", "wait"]

# A result is journaled whole and served by the events API and the dashboard: past this many
# characters, a python action keeps the start of its JSON, as text, with the size it had, and
# an openai action the start of an answer (at least this much).
MOST_RESULT_CHARS = 64 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended.

    ``done``: finished, ``result`` is kept. ``retry``: failed, try again after backoff (never
    sooner than ``after_s``). ``dead``: permanent failure. ``wait``: not attempted (a lane is
    cooling down or out of quota); rescheduled after ``after_s`` without using an attempt.
    ``detail`` is stored with the attempt (status code, duration, the head of a response …).
    A ``retry`` or ``dead`` may carry a ``result`` too: work done before the failure, kept as the
    job's result and handed back to the next attempt as ``job.result`` (the journal keeps it
    across restarts; a replay starts without it).
    """

    kind: OutcomeKind
    result: Any = None
    error: str | None = None
    after_s: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def done(cls, result: Any = None, **detail: Any) -> Outcome:
        return cls("done", result=result, detail=detail)

    @classmethod
    def retry(
        cls, error: str, after_s: float | None = None, *, result: Any = None, **detail: Any
    ) -> Outcome:
        return cls("retry", result=result, error=error, after_s=after_s, detail=detail)

    @classmethod
    def dead(cls, error: str, *, result: Any = None, **detail: Any) -> Outcome:
        return cls("dead", result=result, error=error, detail=detail)

    @classmethod
    def wait(cls, reason: str, after_s: float, **detail: Any) -> Outcome:
        return cls("wait", error=reason, after_s=after_s, detail=detail)


def keep_detail(exc: BaseException, *, result: Any = None, **detail: Any) -> None:
    """Give the exception that cuts an attempt short (the worker's timeout, a drain's
    cancellation) what the attempt saw so far, stored with the cut attempt (``cut_short``).
    ``result``: work done before the cut (an openai answer), kept as a failed attempt's is,
    else the next attempt (after a restart too) pays for it again."""
    exc.webhookd_detail = detail  # type: ignore[attr-defined]
    exc.webhookd_result = result  # type: ignore[attr-defined]


def keep_note(exc: BaseException, note: str) -> None:
    """Give the exception that cuts an attempt short what the worker adds to a timed-out
    attempt's error (``cut_note``): work that goes on all the same (a sync handler's call)."""
    exc.webhookd_note = note  # type: ignore[attr-defined]


def cut_note(exc: BaseException) -> str | None:
    """The note ``keep_note`` gave ``exc`` or the cancellation behind it, if any."""
    for cause in (exc, exc.__cause__):
        note = getattr(cause, "webhookd_note", None)
        if isinstance(note, str):
            return note
    return None


def keep_outcome(exc: BaseException, outcome: Outcome) -> None:
    """Give the exception that cuts an attempt short the outcome its work had already come to
    (a command whose program had exited, its output pipes still held open): the worker records
    that instead of a timeout or a drain's cut (``cut_outcome``). The exception goes on."""
    exc.webhookd_outcome = outcome  # type: ignore[attr-defined]


def cut_outcome(exc: BaseException) -> Outcome | None:
    """The outcome ``keep_outcome`` gave ``exc`` or the cancellation behind it, if any."""
    for cause in (exc, exc.__cause__):
        outcome = getattr(cause, "webhookd_outcome", None)
        if isinstance(outcome, Outcome):
            return outcome
    return None


def cut_short(exc: BaseException) -> tuple[Any, dict[str, Any]]:
    """The result and detail ``keep_detail`` gave ``exc`` (a cancellation) or the cancellation
    behind it (the worker's ``TimeoutError``); ``(None, {})`` when none."""
    for cause in (exc, exc.__cause__):
        detail = getattr(cause, "webhookd_detail", None)
        if isinstance(detail, dict):
            return getattr(cause, "webhookd_result", None), detail
    return None, {}


# Set where a config is read on a thread other than the event loop's (a reload's): there
# ``validate`` leaves a python handler's module not imported yet to ``create``, on the loop's
# thread, as at a start. A module's import runs on the thread that imports it, and one that asks
# for its thread's event loop, or sets a signal handler, at import fails on any other.
HANDLER_IMPORTS_DEFERRED: ContextVar[bool] = ContextVar("handler_imports_deferred", default=False)


@dataclass(frozen=True, slots=True)
class Resources:
    """What actions share, opened once by the app: the HTTP session, the lanes, the config."""

    config: Config
    http: aiohttp.ClientSession
    lanes: Mapping[str, Lane] = field(default_factory=dict)
    # The daemon's masker as it is now (the worker pool's: a reload's secrets added to the
    # earlier ones), for an action that masks what it keeps itself; None: this config's own.
    masker: Callable[[], Masker] | None = None
    # Whether a source's jobs are held now (``webhookd pause``): an action that waited before
    # its work (for a lane) asks before it starts, so a pause stops what was waiting too.
    held: Callable[[str], bool] = lambda _source: False


def masker_of(resources: Resources) -> Callable[[], Masker]:
    """The daemon's masker as it is at each call, else one of this config's own secrets: for
    an action that cuts what it keeps, so it masks before the cut (a secret across the cut
    would keep the part on the kept side, a part no masker knows)."""
    if resources.masker is not None:
        return resources.masker
    own = Masker(secret_values(resources.config))
    return lambda: own


class Action(Protocol):
    """One configured action of one source. One that sends somewhere may also have ``target``
    (its URL), which the worker names in the error of an attempt its timeout cut off."""

    config: ActionConfig

    async def run(self, event: Event, job: Job) -> Outcome:
        """Do the work once. Timeouts are applied by the worker, not here."""
        ...

    async def aclose(self) -> None:
        """Release anything the action opened."""
        ...


class ActionKind(Protocol):
    """What the module of one action kind provides (the registry types each module as one).

    ``DEFAULTS``: the kind's ``timeout_s`` and ``retry`` for actions that leave them out.
    ``validate``: read and check the action's own options (``ConfigError`` naming the key);
    ``create``: the action, ready to run (it validates too).
    """

    DEFAULTS: ActionDefaults

    def validate(self, config: ActionConfig) -> None: ...

    def create(self, config: ActionConfig, resources: Resources) -> Action: ...


T = TypeVar("T")

# A body past this is put in templates on a thread: ``{{ . }}`` of a megabyte takes a tenth of a
# second of CPU or more (most when numbers in it are kept as sent, each written by itself), in
# which the event loop would take no webhook and answer no request.
RENDER_ON_THREAD_BYTES = 64 * 1024


async def rendered(event: Event, render: Callable[[], T]) -> T:
    """``render()``, which puts ``event``'s payload in a template; on a thread when its body is
    over ``RENDER_ON_THREAD_BYTES``. A timeout or a drain ends the wait at once (the thread
    finishes its render, which is dropped)."""
    if len(event.body) <= RENDER_ON_THREAD_BYTES:
        return render()
    return await asyncio.to_thread(render)


# Of an answer's body or a message, in an error.
EXCERPT_CHARS = 300


def excerpt(text: str) -> str:
    """The start of ``text`` on one line, for an error: enough to tell a page or a message."""
    line = " ".join(text[: EXCERPT_CHARS * 4].split())
    return line if len(line) <= EXCERPT_CHARS else f"{line[:EXCERPT_CHARS]} …"


def options(config: ActionConfig, names: tuple[str, ...]) -> Table:
    """The action's own options, read with the ``Table`` that reads the rest of the config.

    A key not in ``names`` is refused before any value is checked (``unknown key for a forward
    action``), so a misspelt option shows as itself, with the option or shared action key
    (``retry``, ``timeout_s``…) it is closest to.
    """
    table = Table(config.options, config.key)
    article = "an" if config.type[:1] in "aeiou" else "a"
    table.only(names, f"for {article} {config.type} action", near=COMMON_ACTION_KEYS)
    return table
