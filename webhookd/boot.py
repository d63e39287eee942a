"""What the daemon reads of its journal as it starts: its clock against the newest event, the
lanes' calls of the minute before, jobs the config has no action for; and a step of the wall
clock told to the journal while it runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from webhookd.actions.base import Action
from webhookd.actions.openai import lane_actions
from webhookd.clock import STEP_S
from webhookd.config.sections import ALERT_SOURCE, CATCH_ALL, Config
from webhookd.errors import (
    JournalError,
)
from webhookd.journal.base import BaseJournal
from webhookd.limiter import LOG_S, Lane

log = logging.getLogger("webhookd")


async def clock_stepped(journal: BaseJournal, moved_s: float) -> None:
    """Tell a step of the wall clock ``moved_s`` seconds (back: negative) and have the journal
    move its queued jobs' times with it."""
    way = "back" if moved_s < 0 else "forward"
    try:
        moved = await journal.clock_stepped(moved_s)
    except JournalError as exc:
        moved, why = None, f"they could not be moved ({exc})"
    else:
        why = "a cluster's nodes share them, each by its own clock: keep the nodes in NTP sync"
    if moved is None:
        log.warning(
            "the wall clock stepped %s %.0f s: queued jobs wait that much %s; %s",
            way,
            abs(moved_s),
            "longer" if moved_s < 0 else "less",
            why,
        )
        return
    log.warning(
        "the wall clock stepped %s %.0f s (%s): the %d queued job(s) were moved as far, so that"
        " each waits what it was meant to; the times journaled before are that much %s of the"
        " clock",
        way,
        abs(moved_s),
        "set by hand or NTP" if moved_s < 0 else "set by hand or NTP, or the machine slept",
        moved,
        "ahead" if moved_s < 0 else "behind",
    )


async def check_the_clock(journal: BaseJournal, cfg: Config, now: float) -> None:
    """At the start: a journal written ahead of this clock (stepped back while webhookd was
    down, or ahead then) is told, and jobs planned further ahead than any wait webhookd plans
    are made due by then. Not moved by the difference: a second start would move them again."""
    newest = await journal.list_events(limit=1)
    if newest and (ahead_s := newest[0].received_at - now) >= STEP_S:
        log.warning(
            "the wall clock is %.0f s behind the newest event in the journal: it was stepped"
            " back, or was ahead when that was journaled; waits planned then run up to that much"
            " longer",
            ahead_s,
        )
    latest = now + cfg.longest_wait_s()
    if brought := await journal.bring_due_by(latest):
        log.warning(
            "%d queued job(s) were due more than %.0f s ahead, longer than any wait webhookd"
            " plans (a clock ahead of this one planned them): due within that now",
            brought,
            latest - now,
        )


async def count_earlier_calls(
    journal: BaseJournal,
    cfg: Config,
    actions: Mapping[tuple[str, str], Action],
    lanes: Mapping[str, Lane],
    now: float,
) -> None:
    """Start each lane with the calls the process before this one made through it in the
    window before this start, read from their attempts (``Lane.seed``): a restart, clean or
    not, then lets no 60 s window hold more than the lane's limits, where a fresh lane would
    add its burst to the minute before. Before the workers start, so before any admission. A
    read that fails leaves the lanes fresh, said once."""
    wanted = lane_actions(actions)
    if not wanted:
        return
    named = {name for name in cfg.sources if name != CATCH_ALL} | {ALERT_SOURCE}
    try:
        calls = await journal.lane_calls(wanted, now - LOG_S, named)
    except JournalError as exc:
        log.warning(
            "lanes: the calls of the minute before this start could not be read, so each lane"
            " starts with its burst as if none had been made: %s",
            exc,
        )
        return
    for name, made in sorted(calls.items()):
        if counted := lanes[name].seed((call.at, call.tokens) for call in made):
            log.info("lane %s: %d call(s) of the minute before this start counted", name, counted)


async def warn_of_orphans(journal: BaseJournal, cfg: Config) -> list[tuple[str, str]]:
    """Say at start when the journal holds queued jobs this config has no action for: of a
    source it no longer has (an old config deployed, a source renamed) or an action a source
    no longer has (an action renamed). One line, before they go dead at their turn, one dead
    line each. The catch-all's actions are those of any name it takes. Returns their (source,
    action) pairs, whose dead-letter series the metrics then start at 0."""
    try:
        unfinished = await journal.unfinished_by_action()
    except JournalError:
        return []  # the daemon says what is wrong with its journal elsewhere
    found = orphaned(cfg, unfinished)
    if found:
        log.warning(
            "the journal holds queued jobs that %s has no action for: %s; they go dead at their"
            " turn (`webhookd replay --dead --source NAME` runs them once the source and action"
            " are back under those names)",
            cfg.origin,
            _orphans_text(found),
        )
    return list(found)


def orphaned(cfg: Config, unfinished: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """The pairs of ``unfinished`` that ``cfg`` cannot run (as the workers decide it:
    ``source_for`` and its ``action``), sorted, with their jobs."""
    out = {}
    for (source, action), n in sorted(unfinished.items()):
        found = cfg.source_for(source)
        if n and (found is None or found.action(action) is None):
            out[source, action] = n
    return out


def _orphans_text(orphans: Mapping[tuple[str, str], int]) -> str:
    return ", ".join(f"{source}/{action} ({n})" for (source, action), n in orphans.items())


def orphaned_jobs(cfg: Config, unfinished: Mapping[tuple[str, str], int]) -> str | None:
    """``source/action (jobs)`` for each pair of ``unfinished`` that ``cfg`` cannot run,
    sorted, comma-separated; ``None`` when it can run them all (``check``'s note, as the
    start warns of them)."""
    return _orphans_text(orphaned(cfg, unfinished)) or None
