"""The command line: click commands over the daemon and the journal; errors become exit codes.

Exit codes: 0 ok, 1 runtime error, 2 bad usage or configuration, 3 a journal of a newer
webhookd (``EXIT_JOURNAL_NEWER``, from every verb that opens the journal). Commands that read or
change the journal open it directly, so they work whether or not the daemon is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar
from urllib.parse import quote

import click

from webhookd import __version__, hangups, pauses
from webhookd import config as config_mod
from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.errors import (
    EXIT_JOURNAL_NEWER,
    ConfigError,
    JournalCopied,
    JournalError,
    JournalNewer,
    JournalUnavailable,
    NotFound,
    WebhookdError,
)
from webhookd.journal import (
    BULK_BATCH,
    EVENT_STATES,
    BaseJournal,
    Cancelled,
    EventDetail,
    Peeked,
    Pruned,
    Purged,
    Replayed,
    copied_marker,
    copied_to,
    copies,
    open_journal,
    peek_journal,
    present_only,
    serve_lock_held,
    short_of_room,
    why_unusable,
)
from webhookd.journal.base import upgrade_log, waiting_log
from webhookd.journal.records import EventSummary, JobsIn
from webhookd.models import EVENT_ID, event_id_time
from webhookd.redact import (
    WRITTEN_OUT,
    Masker,
    printable,
    secret_values,
    spaced_secrets,
    unreadable_secrets,
    weak_points,
    written_out,
)
from webhookd.retention import HOUR_S, kept_s, prune_expired, windows_s
from webhookd.schemes import SCHEMES

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

T = TypeVar("T")

CONFIG_HELP = "Config file (default: $WEBHOOKD_CONFIG, else the embedded default)."
JSON_HELP = (
    "Print what was done as one JSON document (notes and warnings stay on stderr; see"
    " docs/cli.md, JSON for scripts)."
)
ACTION_HELP = (
    "Only the jobs of the action of this name (as show lists them): a forward made again"
    " without asking a model again or running a deploy twice."
)
# The longest text `events --contains` takes.
MAX_CONTAINS = 1000


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"webhookd: error: {message}", err=True)
    sys.exit(code)


def _load(path: str | None, *, secrets: bool = True) -> config_mod.Config:
    """The config, with its ``env:`` secrets and actions checked, and each action given its
    kind's defaults; ``secrets=False`` for verbs that only read or edit the journal: they run no
    action, so an unexported secret or an action's option does not stop them."""
    try:
        return _config(_config_path(path), secrets=secrets)
    except ConfigError as exc:
        _fail(str(exc), 2)


def _config_path(path: str | None) -> str | None:
    """``--config``, else ``WEBHOOKD_CONFIG``, else None (the embedded default). An empty one
    (``--config "$CFG"`` with the variable unset) is an error: read as "not given", it would
    run the default, which takes any unsigned webhook."""
    if path is None:
        path = os.environ.get("WEBHOOKD_CONFIG")
        if path == "":
            raise ConfigError("WEBHOOKD_CONFIG", "is set but empty: name a config file")
    elif path == "":
        raise ConfigError("--config", "is empty: name a config file")
    return path


def _config(path: str | None, *, secrets: bool = True) -> config_mod.Config:
    """``_load``'s work, raising ``ConfigError`` (a reload reports it and goes on)."""
    from webhookd import actions

    cfg = config_mod.load(path, secrets=False, kinds=actions.kind_defaults if secrets else None)
    if secrets:
        # Options first: a misspelt api_key is named as such, not as the unset variable of
        # the default it left in place.
        actions.validate(cfg)
        config_mod.reveal_secrets(cfg)
    return cfg


def _utf8_only(value: str | None, option: str) -> None:
    """Exit 2, in one line, when ``value`` (given as ``option``) is not UTF-8 text: its bytes
    that are not came from the command line as lone surrogates, which no journaled name or key
    holds (the receiver refuses them) and neither database can be asked for."""
    if value is None or value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")  # the bytes as they were typed
        _fail(f"{option} {raw!r} is not UTF-8 text, and every name and key journaled is", 2)


def _read_config(path: str | None) -> config_mod.Config:
    return _load(path, secrets=False)


def _run(coro_fn: Callable[[], Awaitable[T]], journal: config_mod.JournalConfig | None = None) -> T:
    """Run a verb's coroutine, its errors as one line and an exit status; ``journal`` (its
    retention) words a missing event's."""

    async def main() -> T:
        return await coro_fn()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)  # as a shell reports a command ended by SIGINT
    except NotFound as exc:
        _fail(_no_event(str(exc), journal) if journal else f"no event {exc}", 1)
    except JournalNewer as exc:  # as serve and check exit: a rerun will not mend it
        _fail(str(exc), EXIT_JOURNAL_NEWER)
    except JournalCopied as exc:  # as a verb refuses a copied journal at its start
        _fail(str(exc), 2)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except WebhookdError as exc:
        _fail(str(exc), 1)


class _SayOnStderr(logging.Handler):
    """A log record as one ``webhookd: ...`` line on stderr (the stream click has now)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"webhookd: {record.getMessage()}", err=True)


def _say_upgrades() -> None:
    """A verb that opens an older journal upgrades its schema; it says so, as serve logs it.
    One that its database keeps waiting says that too, and for what when the server tells."""
    for logger in (upgrade_log, waiting_log):
        if not any(isinstance(h, _SayOnStderr) for h in logger.handlers):
            logger.addHandler(_SayOnStderr())
            logger.setLevel(logging.INFO)


def _journal_file_needed(cfg: config_mod.Config) -> None:
    """Exit 1 when ``cfg`` names a SQLite journal that is not there (a verb run in another
    folder, or without the daemon's --config, reads the embedded default's), or is an empty
    file: a verb never makes a journal, which it would there (its whole schema)."""
    empty = cfg.journal.url is None and _zero_bytes(cfg.journal.path)
    if cfg.journal.url is None and (empty or not cfg.journal.path.exists()):
        where = cfg.journal.path
        if not where.is_absolute():  # as serve reads it: from its working directory
            where = Path.cwd() / where
        _fail(
            f"no journal at {where} yet{' (an empty file)' if empty else ''}: `webhookd"
            " serve` makes it at its first start (or set journal.path or --config)",
            1,
        )


def _zero_bytes(path: Path) -> bool:
    """Whether ``path`` is an empty file: a ``touch``, or what a daemon's first start has just
    made, its schema still to come."""
    with contextlib.suppress(OSError):
        return path.is_file() and path.stat().st_size == 0
    return False


async def _event(journal: BaseJournal, event_id: str) -> EventDetail:
    """The event ``event_id``, or ``NotFound``: at once for an id of another shape (typed
    wrong, or not UTF-8), which no event has."""
    if not EVENT_ID.fullmatch(event_id):
        raise NotFound(printable(event_id))
    return await journal.get_event(event_id)


def _journal(cfg: config_mod.Config) -> BaseJournal:
    _journal_file_needed(cfg)
    _say_upgrades()
    return open_journal(cfg.journal, max_recoveries=cfg.workers.max_recoveries, node=False)


# A bulk verb's rest between two batches on a journal that takes one writer at a time, at
# least this and as long as the batch took. SQLite's lock is no queue: the daemon's writer,
# waiting in its busy handler (polling at up to 100 ms once it has waited a while), seldom
# caught the moment between two batches of a verb that took the lock again at once, and
# answered webhooks 503 past server.ack_timeout_s (148 of 2,949 during a prune of 757,000
# events, while the daemon's own retention pruning them answered none).
REST_FLOOR_S = 0.05


def _resting(journal: BaseJournal) -> Callable[[float], Awaitable[None]] | None:
    """What a bulk verb awaits between its batches (given how long the last took), or None
    where the journal takes many writers at once (PostgreSQL's row locks)."""
    if not journal.one_writer:
        return None

    async def rest(took_s: float) -> None:
        await asyncio.sleep(max(took_s, REST_FLOOR_S))

    return rest


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")


def parse_since(value: str, now: float | None = None, option: str = "--since") -> float:
    """``30m``, ``2h``, ``7d`` ago, or an ISO 8601 time (UTC unless it says otherwise); a bad
    one is ``option``'s error (``--until`` takes the same forms)."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(value.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            "use 30m, 2h, 7d or an ISO time like 2026-01-31T12:00", param_hint=f"'{option}'"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _on_terminal() -> bool:
    """Whether stderr, where progress bars go, is a terminal (not a log, a pipe or a file)."""
    return sys.stderr is not None and sys.stderr.isatty()


def _progress(length: int, label: str) -> ProgressBar[int]:
    """click's progress bar on stderr when it is a terminal, and nothing when it is not: a log
    or a pipe gets only the command's one-line summary on stdout."""
    return click.progressbar(
        length=length, label=label, file=sys.stderr, hidden=not _on_terminal(), show_pos=True
    )


def _json_shown(text: str) -> str:
    """JSON text as it may go to a terminal: ``ensure_ascii=False`` keeps non-ASCII text
    readable but passes C1 controls (U+009B is CSI to some terminals) and the like through
    raw; each is written as its ``\\u`` escape, which leaves the document the same."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else json.dumps(c)[1:-1] for c in text)


# How much of a body ``show`` prints on its line (``--json`` has the first 64 KB), of a failed
# attempt's answer (its first 1 KB is kept), and of a model's answer.
_BODY_PREVIEW_CHARS = 200
_RESPONSE_PREVIEW_CHARS = 200
_TEXT_PREVIEW_CHARS = 4000


def _waits(job: dict[str, Any]) -> str:
    """Why a queued job waits, when no attempt of it says so: a lane's 429 or an exhausted
    quota puts it back without using an attempt."""
    reason = job.get("last_error")
    if not reason or any(a["error"] == reason for a in job["errors"]):
        return ""
    return printable(f" (waits: {reason})")


def _verified_line(verified: dict[str, Any]) -> str:
    """How a webhook verified, in ``show``'s words and times (``--json`` has the fields)."""
    line = f"verified {verified.get('scheme')}"
    if verified.get("secret_index"):  # not the first: a rotation's older secret still in use
        line += f" with secrets[{verified['secret_index']}]"
    if verified.get("timestamp") is not None:
        line += f", signed {_when(verified['timestamp'])}"
    return printable(line + f", checked {_when(verified.get('received_at'))}")


# The headers a provider names a webhook's kind in (GitHub's event, Shopify's topic and shop),
# for show: its body alone does not say whether it was a push or an order's update.
_SAYS_WHAT = frozenset(
    {
        "x-github-event",
        "x-shopify-topic",
        "x-shopify-shop-domain",
        "shopify-topic",
        "shopify-shop-domain",
    }
)


def _no_event(event_id: str, journal: config_mod.JournalConfig) -> str:
    """The "no event ..." error, and for an id of an event received a while ago, whether
    retention may have pruned it (a mistyped id says only the first part)."""
    received = event_id_time(event_id)
    if received is None or not 60 < (age := time.time() - received) < 100 * 365 * 86400:
        return f"no event {event_id}"
    said = f"no event {event_id}: its id says it was received {_when(received)}"
    keep = f"journal.keep_done_h = {journal.keep_done_h:g}, keep_dead_d = {journal.keep_dead_d:g}"
    if age < journal.keep_done_h * 3600:
        # Younger than anything retention takes: not pruned, so not in this journal at all.
        return f"{said}, sooner than retention prunes any ({keep}): is it another journal's?"
    return f"{said}, and retention prunes an event that long past its last job ({keep})"


def _version(ctx: click.Context) -> None:
    """The release, and the schema versions its journals are at once it has started on them:
    what an upgrade or a rollback is about (a journal newer than these is refused)."""
    from webhookd.journal.postgres.schema import MIGRATIONS as POSTGRES_MIGRATIONS
    from webhookd.journal.schema import MIGRATIONS as SQLITE_MIGRATIONS

    click.echo(
        f"webhookd {__version__} (journal schema: SQLite {len(SQLITE_MIGRATIONS)},"
        f" PostgreSQL {len(POSTGRES_MIGRATIONS)})"
    )
    ctx.exit()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")[:-4] + "Z"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, _param, value: _version(ctx) if value else None,
    help="Show the version and the journal schema versions it reads, and exit.",
)
def main() -> None:
    """webhookd: receive webhooks durably, answer in milliseconds, work in the background."""


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
    not whsec_, a command whose program is not there, a journal.path this user could not use,
    and queued jobs in the journal that the config has no action for (read only, beside a
    running daemon too; a journal it cannot read within 5 s is a note). Notes a journal of an
    older schema, which serve upgrades at its start before it answers anything. A journal of a
    newer webhookd exits 3, as serve would."""
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

    for said in action_kinds.warnings(cfg):
        click.echo(f"webhookd: warning: {said}", err=True)
    if unusable is not None:
        # A warning, not exit 2: check may run as another user than serve (an operator's).
        click.echo(f"webhookd: warning: journal.path: {cfg.journal.path}: {unusable}", err=True)
    elif cfg.journal.url is None and (short := short_of_room(cfg.journal.path)):
        click.echo(f"webhookd: warning: journal.path: {cfg.journal.path}: {short}", err=True)
    for said in notes:
        click.echo(f"webhookd: {said}", err=True)


def _masker(cfg: config_mod.Config) -> Masker:
    """What ``show``, ``events`` and ``stats`` mask their output with: the config's secrets
    this process can read. Those it cannot (an ``env:`` variable set for the daemon only, as
    under cron) are not masked, and a note on stderr says so."""
    if unread := unreadable_secrets(cfg):
        click.echo(
            f"webhookd: note: {len(unread)} secret(s) of the config cannot be read here (an"
            " env: variable not set in this shell?), so a body or an error quoting one shows"
            " it; the daemon's log and admin API mask it",
            err=True,
        )
    return Masker(secret_values(cfg))


def _refuse_copied(cfg: config_mod.Config, verb: str = "serve") -> None:
    """Exit 2 on a SQLite journal ``webhookd copy`` put into PostgreSQL: its queued jobs run
    there now, so a daemon on the file would run them a second time, and a change made to it
    (a pause, a replay, a purge) would reach nothing."""
    if cfg.journal.url is not None or (said := copied_to(cfg.journal.path)) is None:
        return
    what = "serve the nodes' config" if verb == "serve" else f"{verb} with the nodes' config"
    _fail(
        f"journal.path: {cfg.journal.path} was {said}, and its jobs run there: {what}"
        f" (journal.url); to {verb} this file all the same, delete"
        f" {copied_marker(cfg.journal.path)}",
        2,
    )


def _journal_notes(cfg: config_mod.Config) -> list[str]:
    """What ``check`` says of the journal, read only: the schema upgrade ``serve`` makes at its
    start, and the jobs in it that ``cfg`` has no action for (a source or action renamed or
    removed), which the daemon would warn of at its start with it."""
    from webhookd.app import orphaned_jobs

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


def _second_key_note(cfg: config_mod.Config, key: str) -> str:
    """What else a missing key may mean at a source whose webhooks have a second dedup key (what
    was signed): a delivery found a duplicate by that one keeps no key of its own."""
    src = cfg.sources.get(key.partition(":")[0])
    verify = src.verify if src is not None else None
    if verify is None:
        return ""
    scheme = SCHEMES[verify.scheme]
    if not scheme.keeps_signed_key(verify):
        return ""
    if scheme.body_unsigned:
        return " answered as a duplicate by its signature's token,"
    return " answered as a duplicate of another delivery with the same signed body,"


@main.command()
@click.argument("event_id", required=False)
@click.option(
    "--key",
    help="Instead of an id: the event that owns this dedup key, SOURCE:KEY (the source's name"
    " and the provider's delivery id, as `show` prints it under dedup).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the event as JSON.")
def show(event_id: str | None, key: str | None, config_path: str | None, as_json: bool) -> None:
    """Show one event: its jobs, attempts, errors and results."""
    if bool(event_id) == bool(key):
        raise click.UsageError("give an event id or --key, not both and not neither")
    _utf8_only(key, "--key")
    cfg = _read_config(config_path)

    async def go() -> tuple[EventDetail, bool]:
        async with _journal(cfg) as journal:
            detail = await found_event(journal)
            return detail, detail.event.source in await journal.paused_sources()

    async def found_event(journal: BaseJournal) -> EventDetail:
        if event_id is not None:
            return await _event(journal, event_id)
        assert key is not None  # one of the two: checked above
        found = await journal.event_by_key(key)
        if found is None:
            # A key without its source's name is the commonest miss: say the form.
            form = "" if ":" in key else " (a key is SOURCE:DELIVERY_ID, e.g. shopify:<id>)"
            raise WebhookdError(
                printable(
                    f"no event has the dedup key {key!r}{form}: never seen,"
                    f"{_second_key_note(cfg, key)} or its key is older than"
                    f" journal.keep_dedup_d ({cfg.journal.keep_dedup_d:g} d)"
                )
            )
        owner, first_seen_at, detail = found
        if detail is None:
            raise WebhookdError(
                printable(
                    f"the dedup key {key!r} was first seen {_when(first_seen_at)} as"
                    f" {owner}, which has been pruned since"
                )
            )
        return detail

    detail, paused = _run(go, cfg.journal)
    # Masked as the log and the admin API mask it (secrets whose variable is exported here).
    source = cfg.source_for(detail.event.source)
    doc = _masker(cfg).deep(detail.as_dict(source.verify if source else None))
    if as_json:
        click.echo(_json_shown(json.dumps(doc, indent=2, ensure_ascii=False)))
        return
    # A job left running by a daemon that is gone (kill -9, a crash) until a start recovers it.
    idle_journal = cfg.journal.url is None and serve_lock_held(cfg.journal.path) is False
    click.echo(f"event    {doc['id']}  [{doc['state']}]")
    click.echo(f"source   {doc['source']}   received {_when(doc['received_at'])}")
    if doc["query"]:
        click.echo(printable(f"query    {doc['query']}"))
    click.echo(
        printable(
            f"tenant   {doc['tenant'] or '-'}   priority {doc['priority']}   "
            f"{doc['body_bytes']} bytes {doc['content_type']}"
        )
    )
    click.echo(printable(f"dedup    {doc['dedup_key']}"))
    # What the webhook is, where the provider says it in a header, not the body.
    kinds = [f"{n}: {v}" for n, v in doc["headers"] if n.lower() in _SAYS_WHAT]
    if kinds:
        click.echo(printable(f"type     {'   '.join(kinds)}"))
    if doc["body"]:
        more = len(doc["body"]) > _BODY_PREVIEW_CHARS or doc["body_truncated"]
        preview = doc["body"][:_BODY_PREVIEW_CHARS] + (" …" if more else "")
        click.echo(f"body     {printable(preview)}")
    if doc["verified"]:
        click.echo(_verified_line(doc["verified"]))
    if doc["filtered"]:
        whose = "their" if len(doc["filtered"]) > 1 else "its"
        click.echo(f"filtered {', '.join(doc['filtered'])} ({whose} when did not match: no job)")
    for job in doc["jobs"]:
        click.echo(
            f"\n  job {job['id']}  {job['action']} ({job['type']})  [{job['state']}"
            f"{', cancel pending' if job['cancel_requested'] else ''}]  "
            f"attempts {job['attempts']}/{job['max_attempts']}"
        )
        if job["state"] == "queued" and job["waiting_for"]:
            click.echo(f"    waits for {job['waiting_for']}, before it in its order key")
        elif job["state"] == "queued" and paused:
            click.echo(f"    held: {doc['source']} is paused (webhookd resume {doc['source']})")
        elif job["state"] == "queued":
            click.echo(f"    next run {_when(job['run_at'])}{_waits(job)}")
        elif job["state"] == "running" and idle_journal:
            click.echo("    no daemon runs on this journal: the next start queues it again")
        elif job["state"] == "cancelled" and job["dismissed_at"] is not None:
            click.echo(f"    dismissed {_when(job['dismissed_at'])} (replay --dismissed undoes it)")
        elif job["state"] == "cancelled" and job["finished_at"] is not None:
            click.echo(f"    cancelled {_when(job['finished_at'])}")
        last = 0
        for attempt in job["errors"]:
            if attempt["attempt"] <= last:  # a replay starts the count over
                click.echo("    replayed:")
            # An attempt a drain cut off is not counted: the next one has its number.
            uncounted = (attempt["detail"] or {}).get("counted") is False
            last = attempt["attempt"] - 1 if uncounted else attempt["attempt"]
            line = f"    #{attempt['attempt']} {_when(attempt['started_at'])} {attempt['outcome']}"
            line += " (not counted)" if uncounted else ""
            if attempt["error"]:
                line += f": {attempt['error']}"
            click.echo(printable(line))
            response = (attempt["detail"] or {}).get("response")
            if response and attempt["outcome"] != "done":  # what the target said about it
                head = " ".join(str(response).split())[:_RESPONSE_PREVIEW_CHARS]
                more = " …" if len(str(response)) > _RESPONSE_PREVIEW_CHARS else ""
                click.echo(printable(f"      response: {head}{more}"))
            # A command's output, kept with its attempt; a python handler's traceback.
            for stream in ("stdout", "stderr", "traceback"):
                output = (attempt["detail"] or {}).get(stream)
                if output:
                    click.echo(f"      {stream}:")
                    for output_line in output.rstrip("\n").split("\n"):
                        click.echo("        " + printable(output_line))
        result = job["result"]
        text = result.get("text") if isinstance(result, dict) else None
        if isinstance(text, str):  # a model's answer: read as text, not as an escaped string
            rest = {k: v for k, v in result.items() if k != "text"}
            click.echo(printable(f"    result {_cut_shown(json.dumps(rest, ensure_ascii=False))}"))
            click.echo("    text:")
            for text_line in text[:_TEXT_PREVIEW_CHARS].split("\n"):
                click.echo("      " + printable(text_line) if text_line else "")
            if len(text) > _TEXT_PREVIEW_CHARS:
                click.echo(f"      … ({len(text):,} characters: --json has them all)")
        elif result is not None:
            shown = _cut_shown(json.dumps(result, ensure_ascii=False))
            click.echo(printable(f"    result {shown}"))


_RESULT_SHOWN_CHARS = 2000


def _cut_shown(text: str) -> str:
    """A result's JSON as ``show`` prints it: its start, saying so when it was cut (the whole
    was shown to end there, with nothing to tell it was not)."""
    if len(text) <= _RESULT_SHOWN_CHARS:
        return text
    return f"{text[:_RESULT_SHOWN_CHARS]} … ({len(text):,} characters: --json has them all)"


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


def _echo_json(doc: dict[str, Any]) -> None:
    """A verb's ``--json`` document on stdout, alone there (ids, counts, names: nothing a
    terminal would obey, and non-ASCII escaped)."""
    click.echo(json.dumps(doc, indent=2))


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


def _unknown_source_note(cfg: config_mod.Config, source: str | None) -> None:
    """A note on stderr when ``--source`` names no configured source: a slip would otherwise
    read as "nothing there". Events of a source since removed are still matched."""
    if source is not None and (said := cfg.by_other_names(source)):
        click.echo(f"webhookd: note: {said}: nothing is journaled under it", err=True)
        return
    if source is None or source in cfg.sources:
        return
    if source == config_mod.ALERT_SOURCE and cfg.alerts is not None:
        return  # the alerts' own source: configured by [alerts], not under [sources]
    close = cfg.close_source(source)
    if close is None and config_mod.CATCH_ALL in cfg.sources:
        return  # a name the catch-all may have taken
    hint = f" (did you mean {close}?)" if close else ""
    click.echo(
        f"webhookd: note: no source {source!r} in {cfg.origin}{hint}: only events journaled"
        " under that name match",
        err=True,
    )


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


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--state", type=click.Choice(EVENT_STATES), help="Only events in this state.")
@click.option("--source", help="Only events of this source.")
@click.option("--tenant", help="Only events of this tenant (as sent, even one kept as a digest).")
@click.option(
    "--since", help="Only events received since (30m, 2h, 7d, or an ISO time, UTC unless it says)."
)
@click.option(
    "--contains",
    help="Only events whose body holds this text (an order id, an email): a scan of the"
    " bodies, newest first, in this process (not the daemon's); --since and --source make it"
    " shorter.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="At most this many events, newest first.",
)
@click.option(
    "--before",
    help="Only events journaled before this event id: the next page, given the last id of one"
    " (past --limit's 100,000, say).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Then print each new event as it is journaled, oldest first, until interrupted (the"
    " listing itself is then oldest first too); not with --state or --before.",
)
def events(
    config_path: str | None,
    state: str | None,
    source: str | None,
    tenant: str | None,
    since: str | None,
    contains: str | None,
    limit: int,
    before: str | None,
    as_json: bool,
    follow: bool,
) -> None:
    """List recent events, newest first."""
    if before is not None and not EVENT_ID.fullmatch(before):
        raise click.BadParameter(
            "must be an event id (evt_ and 26 characters)", param_hint="--before"
        )
    if follow and before is not None:
        raise click.UsageError("--follow prints what arrives from now; --before is for a listing")
    _utf8_only(source, "--source")
    _utf8_only(tenant, "--tenant")
    cfg = _read_config(config_path)
    _unknown_source_note(cfg, source)
    since_ts = parse_since(since) if since else None
    if contains is not None and not 1 <= len(contains) <= MAX_CONTAINS:
        raise click.BadParameter(f"give 1 to {MAX_CONTAINS} characters", param_hint="--contains")
    if follow and state is not None:
        raise click.UsageError(
            "--follow prints events as they arrive, in whatever state; --state is for a listing"
        )
    masker = _masker(cfg)

    async def go() -> list[Any]:
        async with _journal(cfg) as journal:
            listing = partial(
                journal.list_events,
                state=state,
                source=source,
                tenant=tenant,
                # Byte for byte: text typed in another encoding is searched for as its bytes.
                contains=contains.encode("utf-8", "surrogateescape") if contains else None,
            )
            if follow:
                echo = partial(_echo_event, masker=masker, as_json=as_json)
                await _follow(journal, listing, limit, since_ts, echo)
                return []
            # One more than shown: whether there is a next page to point to.
            return await listing(limit=limit + 1, since=since_ts, before=before)

    rows = _run(go)
    more = not follow and len(rows) > limit
    rows = rows[:limit]
    for r in rows:
        _echo_event(r, masker, as_json)
    if not rows and not as_json:
        click.echo("no events", err=True)
    elif more:
        which = "the next" if before else "the newest"
        click.echo(
            f"webhookd: note: {which} {limit} shown; --limit for more, or --before"
            f" {rows[-1].id} for the next page",
            err=True,
        )


def _echo_event(r: EventSummary, masker: Masker, as_json: bool) -> None:
    if as_json:
        row = {
            "id": r.id,
            "source": r.source,
            "received_at": r.received_at,
            "tenant": r.tenant or None,
            "priority": r.priority,
            "state": r.state,
            "jobs": r.jobs,
        }
        click.echo(json.dumps(masker.deep(row)))
    else:
        click.echo(
            printable(
                masker.text(
                    f"{r.id}  {_when(r.received_at)}  {r.state:<9} {r.source}"
                    f"{'  tenant=' + r.tenant if r.tenant else ''}"
                )
            )
        )


# ``events --follow``: how often the journal is asked, and how many events one ask reads at most.
# Each ask reads the events journaled since the journal's position (``position()``) at the one
# before, not since a receive time: a wall clock stepped either way, or a node's running ahead
# or behind, moves no event in or out of it. Where several nodes write (PostgreSQL), an event
# can commit after one at a later position: each ask reads back to the position of the ask
# FOLLOW_LOOK_BACK_S before (on the monotonic clock), and the ids printed since keep what it
# reads again from being printed twice.
FOLLOW_EVERY_S = 0.5
FOLLOW_LOOK_BACK_S = 10.0
FOLLOW_PAGE = 10_000
# An ask the database did not answer (a restart, a failover) is made again this long after,
# doubling up to FOLLOW_RETRY_MAX_S.
FOLLOW_RETRY_MAX_S = 8.0


async def _follow(
    journal: BaseJournal,
    listing: Callable[..., Awaitable[list[EventSummary]]],
    limit: int,
    since: float | None,
    echo: Callable[[EventSummary], None],
    clock: Clock = SYSTEM_CLOCK,
) -> None:
    """Print the listing (``listing``'s newest ``limit``) oldest first, then each event
    journaled after it, until cancelled."""
    back_s = 0.0 if journal.one_writer else FOLLOW_LOOK_BACK_S
    high = await journal.position()
    rows = await listing(limit=limit, since=since, positions=(0, high))
    asks: deque[tuple[float, int]] = deque()  # (monotonic time, position) of each ask
    shown: dict[str, int] = {}  # id → the position it was read up to, while an ask may read it
    said_more = False
    while True:
        asks.append((clock.monotonic(), high))
        for r in reversed(rows):  # newest first from the journal: printed oldest first
            if r.id not in shown:
                shown[r.id] = high
                echo(r)
        pause_s, failed = FOLLOW_EVERY_S, False
        while True:
            await asyncio.sleep(pause_s)
            # Back to the latest ask at least back_s old, or to the first while none is.
            while len(asks) > 1 and asks[1][0] <= clock.monotonic() - back_s:
                asks.popleft()
            low = asks[0][1]
            try:
                high = max(await journal.position(), low)
                rows = await listing(limit=FOLLOW_PAGE, since=since, positions=(low, high))
                break
            except JournalUnavailable as exc:  # a database's outage: waited out
                if not failed:
                    failed = True
                    click.echo(f"webhookd: {exc}; asking again until it answers", err=True)
                pause_s = min(max(pause_s, FOLLOW_EVERY_S) * 2, FOLLOW_RETRY_MAX_S)
        if failed:
            click.echo("webhookd: the journal answers again", err=True)
        for event_id in [i for i, upto in shown.items() if upto <= low]:
            del shown[event_id]
        if len(rows) == FOLLOW_PAGE and not said_more:
            said_more = True
            click.echo(
                f"webhookd: note: over {FOLLOW_PAGE:,} events at once: some are not shown"
                " (--source or --contains shows fewer)",
                err=True,
            )


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON document.")
def stats(config_path: str | None, as_json: bool) -> None:
    """Backlog, oldest queued age, recent rates and outcomes, jobs by source (the counts the
    daemon keeps, with its workers and lanes, when its admin API answers; else all read from
    the journal)."""
    cfg = _read_config(config_path)
    masker = _masker(cfg)

    async def go() -> dict[str, Any]:
        async with _journal(cfg) as journal:
            # Asked first: what the daemon has already counted is not read again here.
            daemon, daemon_error = await _daemon_stats(cfg, await journal.identity())
            now = time.time()
            counted = await _counted(journal, cfg, daemon, now)
            recent = await journal.activity(RECENT_S)
            hour = await journal.activity(HOUR_S)
            if daemon is not None and "cluster" in daemon:
                nodes = daemon["cluster"]["nodes"]
            else:
                # The CLI is no node (SQLite's journal lists only the process that opened it).
                nodes = [n.summary(now) for n in await journal.nodes() if not n.this]
            causes = []
            names = {*cfg.sources, config_mod.ALERT_SOURCE}
            if counted["jobs"].get("dead"):
                # The names a catch-all took are one cause under "*", not a row each; without
                # one, the sources since removed are "(removed)", as in the metrics. A job of
                # an action the catch-all lacks was not its own (a source a reload removed):
                # it keeps its source's name, marked as not in the config.
                catch_all = cfg.sources.get(config_mod.CATCH_ALL)
                other = "*" if catch_all is not None else REMOVED_SOURCES
                actions = [a.name for a in catch_all.actions] if catch_all is not None else None
                causes = await journal.dead_causes(names=names, other=other, other_actions=actions)
        jobs = counted["jobs"]
        # The daemon's, when it answers: a [journal] changed in the file waits for a restart.
        keeps_s = (daemon or {}).get("retention_keeps_s", kept_s(cfg.journal))
        return {
            "events": counted["events"],
            "backlog": jobs.get("queued", 0) + jobs.get("running", 0),
            "oldest_queued_age_s": counted["oldest_queued_age_s"],
            "jobs": jobs,
            "sources": counted["sources"],
            "received_per_min_5m": round(recent.received / (RECENT_S / 60), 1),
            "outcomes_5m": dict(recent.attempts_by_outcome),
            "outcomes_1h": dict(hour.attempts_by_outcome),
            # The windows above longer than retention keeps: they count only what is kept.
            "retention_keeps_s": keeps_s,
            "cut_by_retention": {"5m": keeps_s < RECENT_S, "1h": keeps_s < HOUR_S},
            "paused": counted["paused"],
            "dead_causes": [
                {
                    **asdict(c),
                    "error": masker.text(c.error) if c.error is not None else None,
                    # Of sources not in the config, whose jobs the catch-all does not run.
                    "removed": c.source not in names and c.source != config_mod.CATCH_ALL,
                }
                for c in causes
            ],
            "journal_bytes": counted["journal_bytes"],
            "nodes": nodes,
            "daemon": daemon,
            "daemon_error": daemon_error,
        }

    doc = _run(go)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(_stats_table(doc))


# ``stats``' recent window (its received rate and attempts), beside the last hour's.
RECENT_S = 300.0


# The dead letters' source when the config has no catch-all: sources no longer configured,
# summed as the metrics label them.
REMOVED_SOURCES = "(removed)"


# What ``stats`` takes from the daemon's ``/stats`` when it answers: the counts it keeps (reused
# a while on a large journal, where a count reads every job, as the dashboard's are) and what it
# reads at each asking. The journal is read for them only when the daemon does not answer, or
# answers without one of them (an earlier webhookd's).
_DAEMON_COUNTED = ("events", "jobs", "sources", "oldest_queued_age_s", "paused", "journal_bytes")


async def _counted(
    journal: BaseJournal, cfg: config_mod.Config, daemon: dict[str, Any] | None, now: float
) -> dict[str, Any]:
    """``_DAEMON_COUNTED``'s figures, from the daemon's ``/stats`` or read from the journal."""
    if daemon is not None and all(key in daemon for key in _DAEMON_COUNTED):
        counted = {key: daemon[key] for key in _DAEMON_COUNTED}
        age = counted["oldest_queued_age_s"]
        counted["oldest_queued_age_s"] = round(age, 1) if age is not None else None
        return counted
    counts = await journal.counts(cfg.sources)
    oldest = counts.oldest_due_at
    return {
        "events": counts.events,
        "jobs": dict(counts.jobs_by_state),
        "sources": counts.sources_shown(cfg.sources),
        "oldest_queued_age_s": round(now - oldest, 1) if oldest is not None else None,
        "paused": sorted(await journal.paused_sources()),
        "journal_bytes": await journal.sizes(),
    }


async def _daemon_stats(
    cfg: config_mod.Config, journal_id: str
) -> tuple[dict[str, Any] | None, str | None]:
    """The running daemon's ``/stats`` (workers, lanes, throughput), else None and why not:
    not asked (no admin listener on a known port), not reachable, refused (a 401: the token,
    named by its variable, never by its value), another answer, or a daemon of another journal
    (``journal_id``: this one's, ``BaseJournal.identity``) on that port."""
    import aiohttp

    listen = cfg.admin.listen
    if listen is None:
        return None, "no admin API to ask (admin.listen is off)"
    if listen.port == 0:
        return None, "no admin API to ask (admin.listen has port 0: its port is not known)"
    address, headers = _admin_address(cfg)
    sent = bool(headers)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
            http.get(f"http://{address}/stats", headers=headers) as r,
        ):
            if r.status == 401:
                return None, _refused(cfg, sent)
            if r.status != 200:
                return None, f"the admin API at {address} answered {r.status}"
            doc: dict[str, Any] = await r.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None, f"not reachable on the admin API at {address}"
    # A daemon of an earlier webhookd says nothing of its journal: taken at its word.
    if doc.get("journal_id", journal_id) != journal_id:
        return None, (
            f"the daemon answering on the admin API at {address} serves another journal"
            f" (admin.listen in {cfg.origin} is another config's?)"
        )
    return doc, None


async def _daemon_applies(
    cfg: config_mod.Config, journal_id: str, source: str, pausing: bool
) -> tuple[bool, str | None]:
    """Whether the daemon of this journal, asked on its admin API, applied a pause or resume
    the journal already holds (answered once its dispatcher has it); if not, why, when a
    daemon answered (a refused token, another journal's daemon on the port)."""
    import aiohttp

    daemon, why = await _daemon_stats(cfg, journal_id)
    if daemon is None:
        quiet = why is None or why.startswith(("no admin API", "not reachable"))
        return False, None if quiet else why
    address, headers = _admin_address(cfg)
    verb = "pause" if pausing else "resume"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.post(
                f"http://{address}/sources/{quote(source, safe='')}/{verb}",
                headers={**headers, "X-Webhookd": "1"},
            ) as r,
        ):
            return r.status == 200, None if r.status == 200 else f"it answered {r.status}"
    except (aiohttp.ClientError, TimeoutError):
        return False, None


def _admin_address(cfg: config_mod.Config) -> tuple[str, dict[str, str]]:
    """Where the CLI reaches the daemon's admin API (``admin.listen``, a wildcard as loopback),
    and the headers its token needs."""
    listen = cfg.admin.listen
    assert listen is not None
    host = "127.0.0.1" if listen.host in ("0.0.0.0", "") else listen.host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    token = cfg.admin.token
    # An unset token variable sends no token: the answer still tells a daemon that is up (401)
    # from one that is not there.
    sent = token is not None and not token.missing
    headers = {"Authorization": f"Bearer {token.reveal()}"} if token and sent else {}
    return f"{host}:{listen.port}", headers


def _refused(cfg: config_mod.Config, sent: bool) -> str:
    """Why the admin API answered 401, naming admin.token's variable (never its value)."""
    token = cfg.admin.token
    if token is None:
        return f"the admin API wants a token, and admin.token is not set in {cfg.origin}"
    variable = token.variable
    if not sent:
        return (
            f"the admin API refused the request: admin.token is {token.reference},"
            f" which {'is not set' if variable else 'cannot be read'} here"
        )
    where = f"{variable} (admin.token)" if variable else "admin.token"
    return f"the admin API refused the token in {where}: not the daemon's"


def _stats_table(doc: dict[str, Any]) -> str:
    age = doc["oldest_queued_age_s"]
    lines = [
        f"backlog        {doc['backlog']} job(s)   oldest queued {_age(age)}   "
        f"events {doc['events']}",
        f"received       {doc['received_per_min_5m']}/min (last 5 min)" + _cut(doc, "5m"),
        # Attempts, not jobs: a job retried three times before it went dead is four of them.
        "attempts 5 min " + _pairs(doc["outcomes_5m"]) + _cut(doc, "5m"),
        "attempts 1 h   " + _pairs(doc["outcomes_1h"]) + _cut(doc, "1h"),
    ]
    if doc["paused"]:
        lines.append("paused         " + ", ".join(doc["paused"]))
    files = doc["journal_bytes"]
    if "db" in files:
        lines.append(
            f"journal        {copies.megabytes(files['db'])}   WAL {copies.megabytes(files['wal'])}"
        )
    elif "tables" in files:
        lines.append(f"journal        {copies.megabytes(files['tables'])} in PostgreSQL")
    daemon = doc["daemon"]
    if daemon is not None:
        w = daemon["workers"]
        rates = daemon.get("throughput") or {}
        lines.append(
            f"workers        {w['busy']}/{w['concurrency']} busy   window {w['window']}   "
            f"{rates.get('accepted_per_s', 0)} accepted/s, "
            f"{rates.get('finished_per_s', 0)} finished/s"
            # Else queued jobs beside idle workers, with no reason given.
            + ("   holding new jobs: a burst is being answered" if w.get("holding") else "")
        )
        if w.get("slow"):  # else queued jobs of an action beside idle workers, unexplained
            lines.append(
                "slow           "
                + ", ".join(f"{a['source']}/{a['action']}" for a in w["slow"])
                + ": one job at a time, its last attempts timed out"
                " (workers.slow_after_timeouts)"
            )
        for name, lane in daemon.get("lanes", {}).items():
            lines.append(
                f"lane {name:<9} waiting {lane['waiting']}  admitted {lane['admitted_total']}"
                f"  cooldown {lane['cooling_until_s']:.0f}s"
                f"{'  CIRCUIT OPEN' if lane['circuit_open'] else ''}"
            )
        # What the daemon runs is not what the file says: as the dashboard and systemd say.
        if daemon.get("reload_refused"):
            lines.append(
                f"config         reload refused, still running the previous config:"
                f" {daemon['reload_refused']}"
            )
        if daemon.get("restart_pending"):
            lines.append(
                "config         changed, applied at the next restart: "
                + ", ".join(daemon["restart_pending"])
            )
    elif doc["daemon_error"] is not None:
        lines.append(f"daemon         {doc['daemon_error']} (journal figures only)")
    for node in doc["nodes"]:
        state = "STALE" if node["stale"] else ("this" if node["this"] else "live")
        # Its sources, actions or lanes are not those of the daemon answering (``None``: not
        # known, from a node or a daemon of an earlier webhookd, or with no daemon asked).
        differs = "  config differs" if node.get("same_config") is False else ""
        lines.append(
            f"node {node['node_id'][-12:]:<12} {node['host'] or '-'}:{node['pid'] or '-'}"
            f"  running {node['running']}  heartbeat {_ago(node['heartbeat_age_s'])}"
            f"  {state}{differs}"
        )
    states = list(doc["jobs"])
    lines.append("")
    lines.append(f"{'source':<24}" + "".join(f"{s:>10}" for s in states))
    lines.append(f"{'(all)':<24}" + "".join(f"{doc['jobs'][s]:>10}" for s in states))
    for src, by in doc["sources"].items():
        mark = " (paused)" if src in doc["paused"] else ""
        lines.append(f"{(src + mark)[:24]:<24}" + "".join(f"{by.get(s, 0):>10}" for s in states))
    if doc["dead_causes"]:
        lines += ["", "dead letters by cause (`webhookd events --state dead` lists them)"]
        now = time.time()
        for c in doc["dead_causes"]:
            error = printable(c["error"]) if c["error"] is not None else "(no error recorded)"
            removed = c["removed"] and c["source"] != REMOVED_SOURCES  # which says so itself
            mark = " (not in the config)" if removed else ""
            lines.append(
                f"{c['jobs']:>7}  {c['source']}/{c['action']}{mark}  {error}"
                f"  (latest {_ago(now - c['last_at'])})"
            )
    return "\n".join(lines)


def _cut(doc: dict[str, Any], window: str) -> str:
    """What follows a figure of the last ``window`` when retention keeps less than it: the
    journal it is counted from holds only the events of the kept part."""
    if not doc["cut_by_retention"][window]:
        return ""
    return f"   (retention keeps {_age(doc['retention_keeps_s'])}: counts cover what is kept)"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _ago(seconds: float | None) -> str:
    """How long ago, or how far ahead of this machine's clock a time written by a clock ahead of
    it (another node's, or this one's before a step back) is."""
    if seconds is not None and seconds < -1:
        return f"{_age(-seconds)} ahead of this clock"
    return "-" if seconds is None else f"{_age(max(seconds, 0.0))} ago"


def _pairs(counts: dict[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


@main.command()
@click.argument("source")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def pause(source: str, config_path: str | None, as_json: bool) -> None:
    """Hold processing of SOURCE's jobs; its webhooks are still accepted and journaled."""
    _pause_or_resume(source, config_path, pausing=True, as_json=as_json)


@main.command()
@click.argument("source")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def resume(source: str, config_path: str | None, as_json: bool) -> None:
    """Let SOURCE's jobs run again (a running daemon notices within a second)."""
    _pause_or_resume(source, config_path, pausing=False, as_json=as_json)


def _pause_or_resume(
    source: str, config_path: str | None, *, pausing: bool, as_json: bool = False
) -> None:
    """``pause`` or ``resume``; with ``as_json``, what ``POST /sources/<name>/pause`` answers
    (``source``, ``paused``, ``changed``, and ``catch_all`` and ``journaled``: see
    ``pauses.Named``), and whether the running daemon has ``applied`` it already and the
    config has the source no more (``removed``)."""
    cfg = _read_config(config_path)
    _refuse_copied(cfg, "pause" if pausing else "resume")
    # A source the config no longer has can still be resumed while it is paused: its jobs would
    # otherwise wait for good (they go dead at their turn, as other removed sources' do).
    removed = cfg.source_for(source) is None
    if removed and pausing:
        _fail(cfg.no_source(source), 2)
    # Only a pause is refused: a "*" paused by an earlier webhookd can still be resumed.
    if pausing and (said := cfg.by_other_names(source)):
        _fail(said, 2)

    async def go() -> tuple[pauses.Named, bool | None, tuple[bool, str | None]]:
        async with _journal(cfg) as journal:
            paused = source in await journal.paused_sources()
            named = await pauses.name_of(cfg, journal, source, pausing=pausing, paused=paused)
            if (removed and not paused) or named.refused is not None:
                return named, None, (False, None)
            changed = await (journal.pause(source) if pausing else journal.resume(source))
            identity = await journal.identity()
        if named.slip_of is not None:
            # A slip resumed as it was paused: the daemon, asked now, would refuse it as a slip
            # (it is paused no more), and reads the resume within a second.
            return named, changed, (False, None)
        # The daemon reads the change at its next sweep (within a second); asked, it applies
        # it before it answers, so no job of a source said paused starts after the answer.
        return named, changed, await _daemon_applies(cfg, identity, source, pausing)

    named, changed, (applied, why_not) = _run(go)
    if changed is None:
        _fail(named.refused or cfg.no_source(source), 2)
    if why_not is not None:
        click.echo(f"webhookd: note: the daemon was not asked to apply it now: {why_not}", err=True)
    # A name the catch-all takes: said so, so that a slip of an expected name shows.
    taken = f"; {said}" if (said := named.said()) else ""
    if as_json:
        _echo_json(
            {
                "source": source,
                "paused": pausing,
                "changed": changed,
                "applied": applied,
                "removed": removed,
                **named.fields(),
            }
        )
    elif pausing:
        when = "from now" if applied else "within a second, if one runs"
        click.echo(
            f"paused {source}: the daemon starts none of its jobs {when} (running ones finish"
            f" their attempt){taken}"
            if changed
            else f"{source} was already paused{taken}"
        )
    elif removed:
        click.echo(
            f"resumed {source}, which {cfg.origin} has no more: its queued jobs go dead at"
            " their turn (webhookd replay --dead runs them once it is back)"
        )
    else:
        click.echo(f"resumed {source}{taken}" if changed else f"{source} was not paused{taken}")


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
    new one is in place (for a daily timer). The copy is checked (PRAGMA quick_check) before it
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

                made = copies.backup(cfg.journal.path, target, on_step=step)
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
    from webhookd.app import orphaned_jobs
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


@main.command()
@click.argument("source")
@click.option(
    "--file",
    "body_file",
    type=click.File("rb"),
    help="Body to send ('-' for stdin; default: a small test payload).",
)
@click.option("--url", help="Where to post (default: server.listen and the source's path).")
@click.option(
    "--id",
    "delivery_id",
    help="Delivery id (default: a fresh one; reuse it to test dedup). Where the signed body is"
    " a dedup key too (verify.dedup_body), the same --file is a duplicate under any id; and"
    " Stripe and Slack read the id from the body, so beside --file a note says it is not sent.",
)
@click.option(
    "--header",
    "-H",
    "extra_headers",
    multiple=True,
    metavar="'NAME: VALUE'",
    help="A header to send besides the provider's (repeatable), e.g. -H 'X-GitHub-Event: push'"
    " to try a when filter; one the provider sets is replaced (a warning says if the"
    " request then does not verify).",
)
@click.option(
    "--cacert",
    type=click.Path(exists=True, dir_okay=False),
    help="For an https --url: trust the CA certificates in this PEM file instead of the"
    " system's (a proxy in front of the daemon with a private CA's certificate).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def send(
    source: str,
    body_file: Any,
    url: str | None,
    delivery_id: str | None,
    extra_headers: tuple[str, ...],
    cacert: str | None,
    config_path: str | None,
) -> None:
    """Sign a test webhook the way SOURCE's provider would and post it; print the answer.

    Exits 0 on a 2xx answer, 1 on any other answer or a network failure, 2 on a usage or
    config error (naming the option or key: an unknown source, a secret not set).
    """
    import secrets

    from webhookd import send as send_mod

    # Only SOURCE's secret is needed: another source's (or the admin token's) variable may be
    # unset where a developer tries one provider. A missing one of SOURCE's is named on use.
    cfg = _read_config(config_path)
    try:
        extra = [send_mod.parse_header(h) for h in extra_headers]
        tls = send_mod.trusting(cacert) if cacert is not None else None
        src = send_mod.resolve(cfg, source)
        if note := send_mod.catch_all_note(cfg, source, src):
            click.echo(f"webhookd: note: {note}", err=True)
        now = time.time()
        delivery = send_mod.build(
            src,
            url=url or send_mod.source_url(cfg, source),
            body=body_file.read() if body_file is not None else None,
            now=now,
            delivery_id=delivery_id or "test_" + secrets.token_hex(8),
            extra_headers=extra,
        )
        if warning := send_mod.unverified_note(src, delivery, extra, now):
            click.echo(f"webhookd: warning: {warning}", err=True)
        if body_file and delivery_id and (note := send_mod.id_note(src, delivery, delivery_id)):
            click.echo(f"webhookd: note: {note}", err=True)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        answer = send_mod.post(delivery, tls=tls)
    except send_mod.PostError as exc:  # refused, timed out, or a URL urllib cannot use
        shown = send_mod.shown_url(delivery.url)  # a --url's password never printed
        if not exc.unreachable:
            _fail(f"could not post to {shown}: {exc}", 1)
        where = "--url" if url else f"server.listen in {cfg.origin}"
        hint = f": is the daemon running? ({where})" if exc.refused else ""
        _fail(f"cannot reach {shown}: {exc}{hint}", 1)
    # What the answering server chose, escaped: none of it reaches the terminal as a control.
    click.echo(printable(f"{answer.status} {answer.reason}"))
    if answer.location is not None:
        click.echo(printable(f"redirect to {answer.location} not followed"))
    if answer.body:
        text = answer.body.decode("utf-8", "replace")
        click.echo("\n".join(printable(line) for line in text.split("\n")))
    if answer.status == 401 and (note := send_mod.refused_note(cfg, src)):
        click.echo(f"webhookd: note: {note}", err=True)
    sys.exit(0 if answer.ok else 1)


__all__ = ["JournalError", "main"]
