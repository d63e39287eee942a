"""What every verb shares: the config loaded, errors as exit codes, the journal opened and run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import click

from webhookd import config as config_mod
from webhookd.cli.text import _when, as_typed
from webhookd.errors import (
    EXIT_JOURNAL_NEWER,
    ConfigError,
    JournalCopied,
    JournalNewer,
    NotFound,
    WebhookdError,
)
from webhookd.journal import BaseJournal, EventDetail, copied_marker, copied_to, open_journal
from webhookd.journal.base import upgrade_log, waiting_log
from webhookd.models import EVENT_ID, event_id_time
from webhookd.redact import Masker, printable, secret_values, unreadable_secrets

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
    """One error line and exit ``code``; an argument's bytes that are not UTF-8 as typed."""
    click.echo(f"webhookd: error: {as_typed(message)}", err=True)
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


def _utf8(value: str) -> bool:
    """Whether ``value`` is UTF-8 text: bytes of an argument that are not came from the
    command line as lone surrogates, which no journaled name or key holds (the receiver refuses
    them) and neither database can be asked for."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _utf8_only(value: str | None, option: str) -> None:
    """Exit 2, in one line, when ``value`` (given as ``option``) is not UTF-8 text."""
    if value is not None and not _utf8(value):
        # Quoted as every other error quotes an argument: its bytes as they were typed.
        shown = as_typed(repr(value))
        _fail(f"{option} {shown} is not UTF-8 text, and every name and key journaled is", 2)


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
