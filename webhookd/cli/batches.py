"""How the bulk verbs select events and change them in batches, and their JSON document."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Generic

import click

from webhookd import config as config_mod
from webhookd.cli.base import T, _event, _journal, _resting, _run
from webhookd.cli.text import _progress, _when, parse_since
from webhookd.errors import NotFound, WebhookdError
from webhookd.journal import BULK_BATCH, BaseJournal, EventDetail, present_only
from webhookd.journal.records import JobsIn


def _bulk(
    cfg: config_mod.Config,
    event_ids: tuple[str, ...],
    select: (
        tuple[JobsIn, str | None, float | None, float | None, str | None, str | None]
        | Callable[[BaseJournal], Awaitable[list[str]]]
    ),
    verb: tuple[str, str],
    change: Callable[[BaseJournal, list[str]], Awaitable[dict[str, T]]],
    dry_run: str | None,
    looked_up: Callable[[list[EventDetail]], None] | None = None,
    as_json: bool = False,
) -> _Bulk[T]:
    """A replay, a cancel or a purge: over the ids given, each looked up first so that a typo
    changes nothing, or over every event ``select`` finds (a job state, a source, a receive
    window, a tenant, an action's name; or what it returns, given the journal).
    One transaction per ``BULK_BATCH`` events: short enough not to hold up the daemon's ingest
    commits, few enough that a big bulk verb is not one commit per event. ``verb``: its "-ing"
    and past forms, for the progress bar and the error that says how far it got. An event
    ``select`` found and retention pruned before its batch is skipped and counted (it was
    finished long enough to go); one of the ids given stops the verb there, saying how far it
    got. With ``dry_run`` (its summary line, ``{n}`` for the count) nothing is changed, and the
    events are listed (unless ``as_json``: the caller prints them in its document).
    ``looked_up`` is given the ids' events, before any change."""

    async def go() -> tuple[list[str], dict[str, T]]:
        async with _journal(cfg) as journal:
            if event_ids:
                ids = list(dict.fromkeys(event_ids))  # an id given twice is one event
                found = [await _event(journal, event_id) for event_id in ids]  # or NotFound
                if looked_up is not None:
                    looked_up(found)
            elif callable(select):
                ids = await select(journal)
            else:
                state, source, since, until, tenant, action = select
                pages = journal.pages_of_event_ids_with_jobs(
                    state, source, since, tenant, action=action, until=until
                )
                ids = [i async for page in pages for i in page]
            out: dict[str, T] = {}
            if dry_run is not None:
                return ids, out
            rest = _resting(journal)
            took = 0.0
            with _progress(len(ids), verb[0]) as bar:
                for start in range(0, len(ids), BULK_BATCH):
                    batch = ids[start : start + BULK_BATCH]
                    if start and rest is not None:
                        await rest(took)  # room for the daemon's commits, if one runs
                    began = time.monotonic()
                    try:
                        if event_ids:
                            out.update(await change(journal, batch))
                        else:
                            out.update(await present_only(partial(change, journal), batch))
                    except NotFound as exc:  # pruned since the look-up: say what was done
                        raise WebhookdError(
                            f"no event {exc} (pruned meanwhile): the first {start} of"
                            f" {len(ids)} event(s) were {verb[1]}, none after"
                        ) from None
                    except asyncio.CancelledError:  # Ctrl-C: each batch commits whole
                        click.echo(
                            f"\ninterrupted: the first {start} of {len(ids)} event(s) were"
                            f" {verb[1]}, perhaps the {len(batch)} after them, none after that",
                            err=True,
                        )
                        raise
                    took = time.monotonic() - began
                    bar.update(len(batch))
            return ids, out

    ids, out = _run(go, cfg.journal)
    if dry_run is None:
        if len(out) < len(ids):
            click.echo(f"{len(ids) - len(out)} event(s) pruned since listed: skipped", err=True)
        return _Bulk(ids, out)
    if not as_json:
        click.echo(dry_run.format(n=len(ids)))
        for event_id in ids:
            click.echo(event_id)
    return _Bulk(ids, None)


@dataclass(frozen=True, slots=True)
class _Bulk(Generic[T]):
    """What ``_bulk`` went over: ``ids``, the events selected (the ids given, or what the
    selection found), and ``done``, what the change did to each of them still there at its
    batch (those pruned meanwhile left out), or None for a dry run, which changed nothing."""

    ids: list[str]
    done: dict[str, T] | None


def _bulk_doc(
    bulk: _Bulk[Any], record: type[Any], changed: Callable[[Any], bool], **extra: Any
) -> dict[str, Any]:
    """A bulk verb's ``--json`` document: ``per_event`` holds each event's id and ``record``
    (a replay's or a cancel's in the names ``POST /events/<id>/replay`` or ``/cancel`` answers
    for one), the same counts are summed beside ``events``, the events ``changed`` something
    of, and ``extra`` is added. A dry run has the ids it would go over and nothing changed:
    every count 0, ``per_event`` empty."""
    done = bulk.done or {}
    per_event = [{"id": i, **asdict(done[i])} for i in bulk.ids if i in done]
    return {
        "dry_run": bulk.done is None,
        "selected": len(bulk.ids),
        "skipped": len(bulk.ids) - len(done) if bulk.done is not None else 0,
        "events": sum(1 for r in done.values() if changed(r)),
        **{f.name: sum(row[f.name] for row in per_event) for f in fields(record)},
        **extra,
        "ids": bulk.ids if bulk.done is None else [row["id"] for row in per_event],
        "per_event": per_event,
    }


def _bulk_selection(flags: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """``--source``, ``--since``, ``--until`` and ``--tenant`` of a bulk replay or cancel, which
    take them with ``flags`` (its help's words: "--dead or --dismissed")."""
    options = (
        click.option("--source", help=f"With {flags}: only this source."),
        click.option(
            "--since",
            help=f"With {flags}: only events received since (30m, 2h, 7d, or an ISO time, UTC"
            " unless it says).",
        ),
        click.option(
            "--until",
            help=f"With {flags}: only events received before (as --since; that time itself"
            " excluded, so --since 2h --until 1h and --since 1h take each event once).",
        ),
        click.option(
            "--tenant", help=f"With {flags}: only this tenant's events (the tenant as sent)."
        ),
    )

    def add(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(options):  # as if stacked in this order above the command
            command = option(command)
        return command

    return add


def _bulk_filters(
    event_ids: tuple[str, ...],
    bulk: bool,
    flag: str,
    source: str | None,
    since: str | None,
    until: str | None,
    tenant: str | None,
    *,
    with_ids: bool = False,
) -> tuple[float | None, float | None]:
    """Check a bulk verb's arguments (ids, or ``flag`` with its filters; ``with_ids``: ``flag``
    may also narrow the ids given); ``--since`` and ``--until`` parsed, against one "now" so
    that ``--since 2h --until 1h`` is an hour to the millisecond. A window that ends at or
    before its start is a usage error: it would select nothing, silently."""
    if not event_ids and not bulk:
        raise click.UsageError(f"give event ids or {flag}")
    if event_ids and bulk and not with_ids:
        raise click.UsageError(f"give event ids or {flag}, not both")
    if (source or since or until or tenant is not None) and (event_ids or not bulk):
        raise click.UsageError(
            f"--source, --since, --until and --tenant go with {flag} and no event ids"
        )
    now = time.time()
    since_ts = parse_since(since, now) if since else None
    until_ts = parse_since(until, now, "--until") if until else None
    if since_ts is not None and until_ts is not None and until_ts <= since_ts:
        raise click.UsageError(
            f"--until {until} ({_when(until_ts)}) is not later than --since {since}"
            f" ({_when(since_ts)}): no event is received in that window"
        )
    return since_ts, until_ts
