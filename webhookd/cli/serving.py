"""``serve`` runs the daemon; ``check`` validates a config and the journal it names."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
import time

import click

from webhookd import config as config_mod
from webhookd import hangups
from webhookd.cli.base import CONFIG_HELP, _config, _config_path, _fail, _load, _refuse_copied
from webhookd.cli.group import main
from webhookd.errors import EXIT_JOURNAL_NEWER, ConfigError, JournalError, JournalNewer
from webhookd.journal import (
    Peeked,
    copies,
    peek_journal,
    short_of_room,
    someone_elses,
    why_unusable,
)
from webhookd.redact import (
    WRITTEN_OUT,
    spaced_secrets,
    unreadable_secrets,
    weak_points,
    written_out,
)
from webhookd.schemes import SCHEMES

# How long ``check`` waits for the host names the actions look up, all of them at once.
LOOKUP_S = 3.0
# The resolver's "no such name" (EAI_NODATA, where the platform has it: a name with no address).
_NO_SUCH_NAME = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format (overrides log.format).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Log level (overrides log.level).",
)
def serve(config_path: str | None, log_format: str | None, log_level: str | None) -> None:
    """Run the daemon until SIGTERM/SIGINT (a second signal exits at once); SIGHUP reads the
    config again and applies its sources, alerts, new lanes and log settings (the rest at the
    next restart). Exits 0 after a drain, 2 on a bad config, 3 on a journal a newer webhookd
    has upgraded, 1 on any other failure."""
    # Until the loop's handler is in place a SIGHUP is only noted (``webhookd.hangups``; from
    # the command's first instant by ``webhookd.entry``), and done once started.
    with contextlib.suppress(ValueError):  # not the main thread (embedded, tests): no signals
        signal.signal(signal.SIGHUP, hangups.note)
    from webhookd import app, logs

    try:
        path = _config_path(config_path)
    except ConfigError as exc:
        _fail(str(exc), 2)
    cfg = _load(path)
    _refuse_copied(cfg)
    logs.setup(
        log_level or cfg.log.level,
        log_format or cfg.log.format,
        secrets=logs.secret_values(cfg),
    )
    fixed = {"log.level": log_level, "log.format": log_format}
    sys.exit(
        app.run(
            cfg,
            lambda: _config(path),
            fixed=frozenset(key for key, flag in fixed.items() if flag is not None),
            reload_asked=lambda: bool(hangups.NOTED),
        )
    )


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option(
    "--no-journal",
    is_flag=True,
    help="Do not read the journal for queued jobs the config has no action for (a config"
    " checked where its database cannot be reached).",
)
def check(config_path: str | None, no_journal: bool) -> None:
    """Validate a config file: prints one line, exits 2 naming the bad key (each secret it
    cannot read, one line each). Warns of a config without a source of its own, secrets
    written in the file, a secret with a space or tab at either end, a Stripe secret that is
    not whsec_, a command whose program is not there, a host name an action delivers to that
    does not resolve here, a journal.path this user could not use, and queued jobs in the
    journal that the config has no action for (read only, beside a running daemon too; a
    journal it cannot read within 5 s is a note). Notes a journal of an older schema, which
    serve upgrades at its start before it answers anything. A journal of a newer webhookd
    exits 3, as serve would."""
    unread: list[str] = []
    try:
        # Every secret that cannot be had is named, not only the first a load stops at.
        unread = unreadable_secrets(_config(_config_path(config_path), secrets=False))
        if unread:
            # Unless an action's option is misspelt: ai_key leaves api_key's default, whose
            # unset variable would be named instead of the typo.
            _config(_config_path(config_path))
    except ConfigError as exc:
        if str(exc) not in unread:
            _fail(str(exc), 2)
    for line in unread[:-1]:
        click.echo(f"webhookd: error: {line}", err=True)
    if unread:
        _fail(unread[-1], 2)
    cfg = _load(config_path)
    _refuse_copied(cfg)
    sources = config_mod.some(sorted(cfg.sources)) or "none"
    actions = sum(len(s.actions) for s in cfg.sources.values())
    alerts = ""
    if cfg.alerts is not None:
        kinds = ["dead"] if cfg.alerts.on_dead else []
        if cfg.alerts.failing_s:
            kinds.append(f"failing for {cfg.alerts.failing_s:g}s")
        if cfg.alerts.backlog_age_s is not None:
            kinds.append(f"backlog older than {cfg.alerts.backlog_age_s:g}s")
        alerts = f", alerts on {' and '.join(kinds) or 'nothing'}"
    unusable = why_unusable(cfg.journal.path) if cfg.journal.url is None else None
    notes: list[str] = []
    if unusable is None and not no_journal:
        try:  # before the "ok": a journal serve would refuse makes the check fail
            notes = _journal_notes(cfg)
        except JournalNewer as exc:
            _fail(
                f"{exc}: `webhookd serve` of this webhookd refuses it; run the newer one, or"
                " restore a backup taken before the upgrade",
                EXIT_JOURNAL_NEWER,
            )
    click.echo(
        f"ok: {cfg.origin}: {len(cfg.sources)} source(s) ({sources}), {actions} "
        f"action(s), {len(cfg.lanes)} lane(s){alerts}"
    )
    if nowhere := config_mod.no_sources(cfg):
        click.echo(f"webhookd: warning: {nowhere}", err=True)
    for key in written_out(cfg):
        click.echo(f"webhookd: warning: {key} is {WRITTEN_OUT}", err=True)
    for said in [*weak_points(cfg), *spaced_secrets(cfg)]:
        click.echo(f"webhookd: warning: {said}", err=True)
    for src in cfg.sources.values():
        for said in SCHEMES[src.verify.scheme].secret_warnings(src.verify) if src.verify else ():
            click.echo(f"webhookd: warning: {said}", err=True)
    from webhookd import actions as action_kinds

    for said in [*action_kinds.warnings(cfg), *_unresolved(action_kinds.looked_up_hosts(cfg))]:
        click.echo(f"webhookd: warning: {said}", err=True)
    if unusable is not None:
        # A warning, not exit 2: check may run as another user than serve (an operator's).
        click.echo(f"webhookd: warning: journal.path: {cfg.journal.path}: {unusable}", err=True)
    elif cfg.journal.url is None:
        for warned in (short_of_room(cfg.journal.path), someone_elses(cfg.journal.path)):
            if warned:
                click.echo(
                    f"webhookd: warning: journal.path: {cfg.journal.path}: {warned}", err=True
                )
    for said in notes:
        click.echo(f"webhookd: {said}", err=True)


def _unresolved(hosts: list[tuple[str, str]]) -> list[str]:
    """A warning for each ``(key, host)`` whose name the resolver says does not exist, looked
    up at once, ``LOOKUP_S`` at most in all: a resolver that does not answer, or fails another
    way, is no finding (a host may resolve only where the daemon runs: "here" says so)."""
    names = {host for _, host in hosts}
    found: dict[str, BaseException | None] = {}

    def look_up(name: str) -> None:
        try:
            _look_up(name)
        except OSError as exc:
            found[name] = exc
        else:
            found[name] = None

    # Daemon threads: a lookup still waiting on a resolver when the time is up does not hold
    # the command's exit.
    threads = [threading.Thread(target=look_up, args=(n,), daemon=True) for n in sorted(names)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + LOOKUP_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    said = []
    for key, host in hosts:
        exc = found.get(host)
        if isinstance(exc, socket.gaierror) and exc.errno in _NO_SUCH_NAME:
            said.append(
                f"{key}: host {host} does not resolve here ({exc.strerror}): its deliveries"
                " fail, and are retried for the whole retry policy, until it does"
            )
    return said


def _look_up(name: str) -> None:
    """Look ``name`` up as a connection to it would."""
    socket.getaddrinfo(name, None)


def _journal_notes(cfg: config_mod.Config) -> list[str]:
    """What ``check`` says of the journal, read only: the schema upgrade ``serve`` makes at its
    start, and the jobs in it that ``cfg`` has no action for (a source or action renamed or
    removed), which the daemon would warn of at its start with it."""
    from webhookd.boot import orphaned_jobs

    try:
        peeked = asyncio.run(peek_journal(cfg.journal))
    except JournalNewer:
        raise
    except JournalError as exc:
        return [f"note: journal not read for queued jobs this config has no action for: {exc}"]
    notes = [] if peeked.events is None else [_upgrade_note(cfg.journal, peeked)]
    if orphans := orphaned_jobs(cfg, peeked.unfinished):
        notes.append(
            f"warning: the journal holds queued jobs that this config has no action for:"
            f" {orphans}; started with it, the daemon lets them go dead at their turn"
        )
    return notes


# The disk an upgrade may take meanwhile, as a share of the SQLite journal's size: its WAL (a
# migration is one transaction, which journal_size_limit does not bound) and the indexes it adds.
# Measured for 300,000 events from schema version 1 and 4: 98 MB for 670 MB (63 MB of WAL); an
# operator's 800,000 took 394 MB for 1.67 GB (300 MB of WAL).
_UPGRADE_ROOM = 0.25


def _upgrade_note(journal: config_mod.JournalConfig, peeked: Peeked) -> str:
    """``check``'s note of a journal whose schema ``serve`` of this webhookd upgrades as it
    starts: nothing is answered until that is done, which takes a while on a large one."""
    if journal.url is not None:
        from webhookd.journal.postgres.db import redact_url
        from webhookd.journal.postgres.schema import MIGRATIONS as POSTGRES_MIGRATIONS

        return (
            f"note: journal {redact_url(journal.url.reveal())} is at schema version"
            f" {peeked.version}: the first node of this webhookd to start upgrades it to"
            f" {len(POSTGRES_MIGRATIONS)} (the others wait for it), and none answers until that"
            f" is done; it holds about {peeked.events:,} event(s)"
        )
    from webhookd.journal.schema import MIGRATIONS as SQLITE_MIGRATIONS

    said = (
        f"note: journal {journal.path} is at schema version {peeked.version}: `webhookd serve`"
        f" of this webhookd upgrades it to {len(SQLITE_MIGRATIONS)} as it starts, and answers"
        f" nothing until that is done; it holds {peeked.events:,} event(s)"
    )
    wal = journal.path.with_name(journal.path.name + "-wal")
    try:
        size = journal.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
        disk = os.statvfs(journal.path.parent)
    except OSError:
        return said
    free = disk.f_bavail * disk.f_frsize
    return (
        f"{said}, and the upgrade may take up to {copies.megabytes(int(size * _UPGRADE_ROOM))}"
        f" more of its disk meanwhile ({copies.megabytes(free)} free)"
    )
