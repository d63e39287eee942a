"""``replay``, ``cancel`` and ``purge``: change events' jobs by id or by a selection."""

from __future__ import annotations

import sys
from functools import partial

import click

from webhookd import config as config_mod
from webhookd.cli.base import (
    ACTION_HELP,
    CONFIG_HELP,
    JSON_HELP,
    MAX_CONTAINS,
    _journal,
    _read_config,
    _refuse_copied,
    _run,
    _unknown_source_note,
    _utf8_only,
)
from webhookd.cli.batches import _Bulk, _bulk, _bulk_doc, _bulk_filters, _bulk_selection
from webhookd.cli.group import main
from webhookd.cli.text import _echo_json, parse_since
from webhookd.journal import BaseJournal, Cancelled, EventDetail, Purged, Replayed
from webhookd.journal.records import JobsIn


@main.command()
@click.argument("event_ids", nargs=-1)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option(
    "--dead",
    is_flag=True,
    help="Replay the dead jobs of every event that has one (its other jobs are left alone);"
    " with event ids, only those events' dead jobs.",
)
@click.option(
    "--dismissed",
    is_flag=True,
    help="Undo dismissals (cancel --dead): replay the dismissed dead jobs of every event that"
    " has one (its other jobs are left alone); with event ids, only those events'.",
)
@click.option(
    "--done",
    is_flag=True,
    help="Make deliveries again (for a target that answered 2xx and lost them): the done jobs"
    " of every event that has one (its other jobs are left alone); with event ids, only those"
    " events' done jobs.",
)
@click.option(
    "--cancelled",
    is_flag=True,
    help="Undo cancel (a cancel --queued that stopped a replay, say): replay the cancelled jobs"
    " that were not dismissed (--dismissed's) of every event that has one (its other jobs are"
    " left alone); with event ids, only those events'.",
)
@_bulk_selection("--dead, --dismissed, --done or --cancelled")
@click.option("--action", help=ACTION_HELP)
@click.option("--dry-run", is_flag=True, help="Say what would be replayed, change nothing.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def replay(
    event_ids: tuple[str, ...],
    config_path: str | None,
    dead: bool,
    dismissed: bool,
    done: bool,
    cancelled: bool,
    source: str | None,
    since: str | None,
    until: str | None,
    tenant: str | None,
    action: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Re-queue events' finished jobs with fresh attempts, and run their waiting jobs now.

    A queued job waiting for a retry or a rate limit keeps its attempts and runs at once. A
    running daemon picks both up within 1 s. With --dead, only dead jobs are re-queued; with
    --dismissed, only the dead jobs that cancel --dead dismissed; with --done, only done ones;
    with --cancelled, only the cancelled ones cancel --dead did not dismiss. With --action,
    only the jobs of that action.
    """
    flags = (("--dead", dead), ("--dismissed", dismissed), ("--done", done))
    chosen = [f for f, on in (*flags, ("--cancelled", cancelled)) if on]
    if len(chosen) > 1:
        raise click.UsageError("give one of --dead, --dismissed, --done and --cancelled")
    flag = chosen[0] if chosen else "--dead, --dismissed, --done or --cancelled"
    only = bool(chosen)
    window = _bulk_filters(event_ids, only, flag, source, since, until, tenant, with_ids=True)
    _utf8_only(source, "--source")
    _utf8_only(tenant, "--tenant")
    _utf8_only(action, "--action")
    cfg = _read_config(config_path)
    _refuse_copied(cfg, "replay")
    _unknown_source_note(cfg, source)
    _unknown_action_note(cfg, source, action)
    state: JobsIn = (
        "dismissed" if dismissed else "done" if done else "cancelled" if cancelled else "dead"
    )
    bulk: _Bulk[Replayed] = _bulk(
        cfg,
        event_ids,
        (state, source, *window, tenant, action),
        ("replaying", "replayed"),
        lambda journal, batch: journal.replay(
            batch,
            dead_only=dead,
            dismissed_only=dismissed,
            done_only=done,
            cancelled_only=cancelled,
            action=action,
        ),
        "would replay {n} event(s)" if dry_run else None,
        None if only else partial(_done_jobs_note, action=action),
        as_json=as_json,
    )
    if as_json:
        # Events another replay (or a run) took meanwhile are not counted as this one's.
        doc = _bulk_doc(bulk, Replayed, lambda r: bool(r.requeued or r.run_now))
        _echo_json(doc)
        if doc["requeued"]:
            _backlog_note(cfg)
        return
    result = bulk.done
    if result is None:
        return
    requeued = sum(r.requeued for r in result.values())
    run_now = sum(r.run_now for r in result.values())
    of_action = f" of action {action!r}" if action is not None else ""
    if not result:
        click.echo(f"nothing to replay: no event has a {state} job{of_action} that matches")
        return
    if result and not requeued and only:  # a flag re-queues its state's jobs, hurries none
        click.echo(
            f"nothing to replay: none of the jobs{of_action} of {len(result)} event(s) was {state}"
        )
        return
    if result and not requeued and not run_now and action is not None:
        click.echo(
            f"nothing to replay: {len(result)} event(s) have no finished or waiting job{of_action}"
        )
        return
    if result and not requeued and not run_now:
        # Running, or queued and already due (a paused source's): a replay has nothing to add.
        click.echo(f"nothing to replay: the jobs of {len(result)} event(s) are queued or running")
        return
    # Events another replay (or a run) took meanwhile are not counted as this one's.
    changed = sum(1 for r in result.values() if r.requeued or r.run_now)
    click.echo(
        f"replayed {changed} event(s), {requeued} job(s) re-queued,"
        f" {run_now} waiting job(s) due now"
    )
    if requeued:
        _backlog_note(cfg)


def _backlog_note(cfg: config_mod.Config) -> None:
    """A warning when a replay has taken the backlog past ``server.max_backlog``: dead jobs do
    not count towards it, so a replay of many can close intake for every source."""

    async def go() -> int:
        async with _journal(cfg) as journal:
            return await journal.backlog()

    backlog, most = _run(go), cfg.server.max_backlog
    if backlog > most:
        click.echo(
            f"webhookd: warning: the backlog is now {backlog} job(s), past server.max_backlog"
            f" ({most}): new webhooks to any source are answered 503 until it drains below;"
            " replaying in parts (--since, --source, --action) spares intake",
            err=True,
        )


@main.command()
@click.argument("event_ids", nargs=-1)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option(
    "--queued",
    is_flag=True,
    help="Cancel the queued and running jobs of every event that has one (a running one"
    " finishes its attempt, with no retry after it).",
)
@click.option(
    "--dead",
    is_flag=True,
    help="Dismiss dead letters instead: the dead jobs of every event that has one (its other"
    " jobs are left alone); with event ids, only those events' dead jobs.",
)
@_bulk_selection("--queued or --dead")
@click.option("--action", help=ACTION_HELP)
@click.option("--dry-run", is_flag=True, help="Say what would be cancelled, change nothing.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def cancel(
    event_ids: tuple[str, ...],
    config_path: str | None,
    queued: bool,
    dead: bool,
    source: str | None,
    since: str | None,
    until: str | None,
    tenant: str | None,
    action: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Cancel events' queued jobs: they never run, unless replayed.

    Queued means due, or waiting for a retry, a rate limit or a paused source. A job running
    at that moment finishes its attempt: done if it succeeds, dead if it fails for good, and
    cancelled instead of retried. A running daemon starts no cancelled job.

    With --dead, dead letters handled some other way are dismissed: their dead jobs become
    cancelled, keeping their attempts and errors, and leave the dead-letter count (replay
    --dismissed runs them again, alone). With --action, only the jobs of that action.
    """
    if queued and dead:
        raise click.UsageError("give --queued or --dead, not both")
    flag = "--dead" if dead else "--queued" if queued else "--queued or --dead"
    window = _bulk_filters(
        event_ids, queued or dead, flag, source, since, until, tenant, with_ids=dead
    )
    _utf8_only(source, "--source")
    _utf8_only(tenant, "--tenant")
    _utf8_only(action, "--action")
    cfg = _read_config(config_path)
    _refuse_copied(cfg, "cancel")
    _unknown_source_note(cfg, source)
    _unknown_action_note(cfg, source, action)
    bulk: _Bulk[Cancelled] = _bulk(
        cfg,
        event_ids,
        # A running job is cancelled too, as for an id given: it ends with its attempt.
        ("dead" if dead else "unfinished", source, *window, tenant, action),
        ("dismissing", "dismissed") if dead else ("cancelling", "cancelled"),
        lambda journal, batch: journal.cancel(batch, dead_only=dead, action=action),
        f"would cancel the {'dead' if dead else 'queued and running'} jobs of {{n}} event(s)"
        if dry_run
        else None,
        as_json=as_json,
    )
    if as_json:
        _echo_json(_bulk_doc(bulk, Cancelled, lambda r: bool(r.cancelled or r.running)))
        return
    result = bulk.done
    if result is None:
        return
    cancelled = sum(r.cancelled for r in result.values())
    if dead:
        line = f"dismissed {cancelled} dead job(s) of {len(result)} event(s)"
        if cancelled:
            line += ": cancelled, attempts and errors kept"
        elif result:
            line += " (none of theirs was dead)"
        click.echo(line)
        return
    running = sum(r.running for r in result.values())
    line = f"cancelled {cancelled} job(s) of {len(result)} event(s)"
    if running:
        line += f"; {running} running job(s) finish their attempt first, with no retry after it"
    elif result and not cancelled:
        line += " (only queued jobs are cancelled: none of theirs was)"
    click.echo(line)


@main.command()
@click.argument("event_ids", nargs=-1)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--tenant", help="Every event of this tenant (as sent, even one kept as a digest).")
@click.option(
    "--contains",
    help="Every event whose body holds this text, byte for byte (try the spellings a body may"
    " hold: %40 for @ in a form).",
)
@click.option("--source", help="With --tenant or --contains: only this source's events.")
@click.option("--since", help="With --tenant or --contains: only events received since.")
@click.option("--dry-run", is_flag=True, help="List what would be deleted, change nothing.")
@click.option("--yes", is_flag=True, help="With --tenant or --contains: delete, not only list.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def purge(
    event_ids: tuple[str, ...],
    config_path: str | None,
    tenant: str | None,
    contains: str | None,
    source: str | None,
    since: str | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete events now, with their jobs, attempts and dedup keys, whatever their state: a
    customer who asks to be forgotten, a webhook that carried what must not be kept.

    By event id, or every event of a --tenant or whose body --contains a text (then --dry-run
    lists them, and --yes deletes them). An event whose job is running is left whole, and the
    exit is 1: cancel it, and purge it once its attempt has ended. A provider's retry of a
    purged delivery is taken as a new event. Backups keep what they held.
    """
    bulk = tenant is not None or contains is not None
    if bool(event_ids) == bulk:
        raise click.UsageError("give event ids, or --tenant or --contains")
    if (source or since) and not bulk:
        raise click.UsageError("--source and --since go with --tenant or --contains")
    if bulk and not (dry_run or yes):
        raise click.UsageError(
            "purge deletes for good: list what it would with --dry-run, then delete with --yes"
        )
    if contains is not None and not 1 <= len(contains) <= MAX_CONTAINS:
        raise click.BadParameter(f"give 1 to {MAX_CONTAINS} characters", param_hint="--contains")
    since_ts = parse_since(since) if since else None
    _utf8_only(source, "--source")
    _utf8_only(tenant, "--tenant")
    cfg = _read_config(config_path)
    _refuse_copied(cfg, "purge")
    _unknown_source_note(cfg, source)

    async def matching(journal: BaseJournal) -> list[str]:
        ids: list[str] = []
        before = None
        while page := await journal.list_events(
            source=source,
            tenant=tenant,
            since=since_ts,
            contains=contains.encode("utf-8", "surrogateescape") if contains else None,
            limit=10_000,
            before=before,
        ):
            ids += [e.id for e in page]
            before = page[-1].id
        return ids

    purged: _Bulk[Purged] = _bulk(
        cfg,
        event_ids,
        matching,
        ("purging", "purged"),
        lambda journal, batch: journal.purge(batch),
        "would purge {n} event(s)" if dry_run else None,
        as_json=as_json,
    )
    out = purged.done or {}
    held = [i for i in purged.ids if i in out and out[i].running]
    if as_json:
        doc = _bulk_doc(purged, Purged, lambda p: not p.running, held=held)
        for row in doc["per_event"]:
            row["purged"] = not row["running"]
        _echo_json(doc)
    if purged.done is None:
        return
    deleted = {i: p for i, p in out.items() if not p.running}
    if not as_json:
        line = f"purged {len(deleted)} event(s) with {sum(p.jobs for p in deleted.values())} job(s)"
        if held:
            line += f"; {len(held)} left whole, a job of theirs running: cancel, then purge again"
        click.echo(line)
        for event_id in held:
            click.echo(f"  running: {event_id}")
    if deleted:
        click.echo(
            "webhookd: note: "
            + (
                "what was deleted is overwritten in the journal file; its -wal may hold copies"
                " until a running daemon stops cleanly"
                if cfg.journal.url is None
                else "PostgreSQL keeps deleted rows in its files until VACUUM reuses their"
                " space (VACUUM FULL events, jobs, attempts rewrites them)"
            )
            + "; backups keep what they held",
            err=True,
        )
    if held:  # a scripted erasure must notice what it has still to do
        sys.exit(1)


def _done_jobs_note(events: list[EventDetail], action: str | None = None) -> None:
    """A note on stderr when replaying ``events`` whole (or the jobs of ``action``) runs done
    jobs again: a delivery that succeeded is made again, where ``--dead`` would leave it
    alone."""
    if done := sum(
        job.state == "done" and action in (None, job.action)
        for event in events
        for job in event.jobs
    ):
        click.echo(
            f"webhookd: note: {done} done job(s) among them run again (a delivery that"
            " succeeded is made again); --dead replays only the dead ones",
            err=True,
        )


def _unknown_action_note(cfg: config_mod.Config, source: str | None, action: str | None) -> None:
    """A note on stderr when ``--action`` names no action of the configured sources (of
    ``--source``, if given): a slip would otherwise read as "nothing there". Jobs of an action
    since removed are still matched."""
    if action is None:
        return
    # The source that takes the name: a catch-all's for a name it took, the alerts' own.
    taking = cfg.source_for(source) if source is not None else None
    if source is not None and taking is None:
        return  # a source not configured has its own note
    sources = cfg.all_sources() if taking is None else (taking,)
    names = {a.name for s in sources for a in s.actions}
    if action in names:
        return
    close = config_mod.closest(action, names)
    hint = f" (did you mean {close}?)" if close else ""
    where = f"source {source!r}" if source is not None else "any source"
    click.echo(
        f"webhookd: note: no action {action!r} of {where} in {cfg.origin}{hint}: only jobs"
        " journaled under that name match",
        err=True,
    )
