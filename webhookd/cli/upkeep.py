"""``prune``, ``backup``, ``restore`` and ``copy``: keeping the journal and its copies."""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Any

import click

from webhookd.cli.base import (
    CONFIG_HELP,
    JSON_HELP,
    _fail,
    _journal,
    _journal_file_needed,
    _read_config,
    _refuse_copied,
    _resting,
    _run,
)
from webhookd.cli.group import main
from webhookd.cli.text import _echo_json, _on_terminal, _progress, _when
from webhookd.errors import EXIT_JOURNAL_NEWER, ConfigError, JournalError, JournalNewer
from webhookd.journal import Pruned, copied_marker, copied_to, copies
from webhookd.retention import prune_expired, windows_s


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def prune(config_path: str | None, as_json: bool) -> None:
    """Delete expired done/dead events and dedup keys now (the daemon also does it every
    journal.prune_interval_s, 60 s by default)."""
    cfg = _read_config(config_path)
    _refuse_copied(cfg, "prune")
    jobs_n = 0  # the pruned events' jobs, which --json says too

    async def go() -> tuple[int, int]:
        def counted(pruned: Pruned) -> None:
            nonlocal jobs_n
            jobs_n += pruned.jobs

        async with _journal(cfg) as journal:
            rest = _resting(journal)
            if not _on_terminal():
                return await prune_expired(journal, cfg.journal, on_batch=counted, rest=rest)
            windows = windows_s(cfg.journal)
            # Counted only for the bar: a log gets the summary line and no extra scan.
            expired = await journal.expired_events(
                keep_done_s=windows["keep_done_s"], keep_dead_s=windows["keep_dead_s"]
            )
            with _progress(expired, "pruning") as bar:

                def step(pruned: Pruned) -> None:
                    counted(pruned)
                    # Events that expire while it runs are pruned too: the bar stops at its end.
                    bar.update(min(pruned.events, expired - bar.pos))

                return await prune_expired(journal, cfg.journal, on_batch=step, rest=rest)

    events_n, dedup_n = _run(go)
    if as_json:
        _echo_json({"events": events_n, "jobs": jobs_n, "dedup_keys": dedup_n})
        return
    click.echo(f"pruned {events_n} event(s) and {dedup_n} dedup key(s)")


@main.command()
@click.argument("dest", type=click.Path())
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    help="With a folder as DEST: then delete all but the newest N dated backups in it.",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def backup(dest: str, keep: int | None, config_path: str | None) -> None:
    """Copy the journal as of one moment to DEST, a new file, while the daemon runs or not.

    DEST may be a folder: the copy is then named for the journal and the time,
    webhookd-20261203T040000Z.db, and --keep N deletes the oldest such copies beyond N once the
    new one is in place (for a daily timer); with N of 2 or more, those beyond N-1 go first
    when the folder has no room for the new one. The copy is checked (PRAGMA quick_check) before it
    is given its name. Copying the journal file with cp while the daemon runs can tear it: its
    -wal holds the latest commits.
    """
    cfg = _read_config(config_path)
    if cfg.journal.url is not None:
        _fail("journal.url is set: back up a PostgreSQL journal with pg_dump", 2)
    _journal_file_needed(cfg)  # an empty file is no journal: nothing to copy, nor to give an id
    if dest.endswith(os.sep) and not os.path.isdir(dest):  # meant as a folder: never a file
        _fail(f"no folder {dest}: make it first", 2)
    target = Path(dest)
    folder = target if target.is_dir() else None
    if keep is not None and folder is None:
        _fail(f"--keep takes a folder as DEST, and {dest} is not one", 2)
    if folder is None and not target.parent.is_dir():  # as for "DEST/": never made here
        _fail(f"no folder {target.parent}: make it first", 2)
    while True:
        if folder is not None:
            target = copies.dated(folder, cfg.journal.path, time.time())
        try:
            with _progress(1, "backing up (MB)") as bar:

                def step(done: int, size: int) -> None:
                    bar.length = max(1, math.ceil(size / 1e6))
                    bar.update(math.ceil(done / 1e6) - bar.pos)

                made = copies.backup(cfg.journal.path, target, on_step=step, keep=keep)
            break
        except copies.DestinationExists as exc:
            if folder is None:
                _fail(str(exc), 2)
            # Another backup took the dated name meanwhile: this one takes the next.
        except JournalNewer as exc:  # as every verb that opens the journal
            _fail(str(exc), EXIT_JOURNAL_NEWER)
        except JournalError as exc:
            _fail(str(exc), 1)
    _said_swept(made)
    if made.made_room:
        names = ", ".join(p.name for p in made.made_room)
        click.echo(f"deleted {len(made.made_room)} older backup(s) first, to make room: {names}")
    click.echo(
        f"backed up {cfg.journal.path} to {target}: {made.events:,} event(s), newest received"
        f" {_when(made.latest)}, {copies.megabytes(made.size)}, in {made.seconds:.1f} s"
    )
    if folder is None or keep is None:
        return
    try:
        gone = copies.rotate(folder, cfg.journal.path, keep, target)
    except OSError as exc:
        _fail(f"cannot delete older backups in {folder}: {exc.strerror or exc}", 1)
    if gone:
        click.echo(f"deleted {len(gone)} older backup(s): {', '.join(p.name for p in gone)}")


def _said_swept(made: copies.Copy) -> None:
    if made.swept:
        names = ", ".join(p.name for p in made.swept)
        click.echo(f"deleted what a backup or restore killed midway left: {names}")


@main.command()
@click.argument("copy", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def restore(copy: Path, config_path: str | None) -> None:
    """Put the backup COPY in place as the journal, with the daemon stopped.

    The journal it replaces is moved aside (renamed, with its -wal), never deleted. At its
    next start the daemon runs the jobs that were queued or running when the backup was made;
    webhooks received after it are not in it.
    """
    cfg = _read_config(config_path)
    if cfg.journal.url is not None:
        _fail("journal.url is set: restore a PostgreSQL journal with pg_restore", 2)
    try:
        put = copies.restore(copy, cfg.journal.path)
    except JournalError as exc:
        _fail(str(exc), 1)
    _said_swept(put)
    click.echo(
        f"restored {copy} to {put.path}: {put.events:,} event(s), newest received"
        f" {_when(put.latest)}"
    )
    if put.replaced is not None:
        click.echo(f"the journal it replaced is now {put.replaced}")
    elif put.strays:  # a -wal (or -shm) whose journal had been removed: moved, not replayed
        left = " and ".join("-" + p.name.rsplit("-", 1)[1] for p in put.strays)
        click.echo(
            f"there was no journal to replace, only its {left}: now"
            f" {', '.join(str(p) for p in put.strays)}"
        )


@main.command("copy")
@click.option(
    "--to",
    "to_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The config file of the nodes that will share the PostgreSQL journal (journal.url).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def copy_journal(to_path: str, config_path: str | None) -> None:
    """Copy the SQLite journal, with its daemon stopped, into a new PostgreSQL journal.

    Events, jobs (queued, retrying, dead and finished), attempts, pauses and the dedup keys
    of the events kept all move, in one transaction: the PostgreSQL journal gets all of them
    or none. It must hold nothing yet, not even pruned webhooks' dedup keys (its schema is
    made if it has none). The SQLite file is left as it was, and marked copied: serve, check
    and the verbs that change a journal refuse it from then on (its queued jobs would run
    twice).
    """
    cfg = _read_config(config_path)
    if cfg.journal.url is not None:
        _fail("journal.url is set in the source config: copy goes from a SQLite journal", 2)
    _journal_file_needed(cfg)
    to = _read_config(to_path)
    if to.journal.url is None:
        _fail(f"journal.url: {to_path} names no PostgreSQL journal to copy into", 2)
    try:
        url = to.journal.url.reveal()
    except ConfigError as exc:
        _fail(str(exc), 2)
    from webhookd.boot import orphaned_jobs
    from webhookd.journal.postgres.db import redact_url
    from webhookd.journal.postgres.from_sqlite import copy_journal as copy_into

    async def go() -> Any:
        try:
            with _progress(1, "copying (rows)") as bar:

                def total(n: int) -> None:
                    bar.length = max(n, 1)

                return await copy_into(
                    cfg.journal.path,
                    url,
                    statement_cache_size=to.journal.statement_cache_size,
                    on_rows=bar.update,
                    on_total=total,
                )
        except asyncio.CancelledError:  # Ctrl-C
            if (said := copied_to(cfg.journal.path)) is None:  # before the COMMIT: rolled back
                click.echo("webhookd: interrupted: nothing was copied", err=True)
            else:
                click.echo(
                    f"webhookd: interrupted: {cfg.journal.path} was {said}; the marker is"
                    f" {copied_marker(cfg.journal.path)}",
                    err=True,
                )
            raise

    made = _run(go)
    jobs = ", ".join(f"{n:,} {state}" for state, n in sorted(made.jobs.items())) or "none"
    click.echo(
        f"copied {cfg.journal.path} into {redact_url(url)}:"
        f" {made.events:,} event(s); jobs: {jobs}; {made.attempts:,} attempt(s);"
        f" {made.dedup_keys:,} dedup key(s); in {made.seconds:.1f} s"
    )
    if made.keys_of_pruned:
        click.echo(
            f"{made.keys_of_pruned:,} dedup key(s) of events retention had deleted not copied"
            " (SQLite keeps only a digest of each): a provider's retry of one is new"
        )
    if made.body_keys:
        click.echo(
            f"{made.body_keys:,} second dedup key(s) of what was signed other than a body (a"
            " Twilio form's parameters, a Mailgun token) not copied; each event's delivery id was"
        )
    if made.paused:
        click.echo(f"paused, as before: {', '.join(made.paused)}")
    if made.jobs.get("running"):
        click.echo(
            "the running jobs (the daemon was killed) are re-queued by the first node to"
            " start, as a crashed node's are"
        )
    if orphans := orphaned_jobs(to, made.unfinished):
        click.echo(
            f"webhookd: warning: {to_path} has no action for queued jobs of the copy:"
            f" {orphans}; started with it, the nodes let them go dead at their turn",
            err=True,
        )
    click.echo(
        f"{cfg.journal.path} is left as it was, marked copied: serve, check and the verbs that"
        " change a journal refuse it from now on (its queued jobs run from PostgreSQL)"
    )
