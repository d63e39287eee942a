"""The command line: click commands over the daemon and the journal; errors become exit codes.

Exit codes: 0 ok, 1 runtime error, 2 bad usage or configuration, 3 a journal of a newer
webhookd (``EXIT_JOURNAL_NEWER``, from every verb that opens the journal). Commands that read or
change the journal open it directly, so they work whether or not the daemon is running.

The package's modules, each importing only those named before it: ``text`` (times read and
written, progress bars, JSON on stdout), ``group`` (the click group ``main``), ``base`` (the
config loaded, errors as exit codes, the journal opened and a verb's coroutine run), ``daemon``
(the running daemon's admin API), ``batches`` (the bulk verbs' selection and batches), then
one module per family of verbs, each registering its commands on ``main``: ``serving`` (serve,
check), ``reads`` (show, events), ``bulk`` (replay, cancel, purge), ``stats``, ``pausing``
(pause, resume), ``upkeep`` (prune, backup, restore, copy) and ``sending`` (send).
"""

from __future__ import annotations

# Imported for their commands, which they register on ``main``.
from webhookd.cli import bulk, pausing, reads, sending, serving, stats, upkeep  # noqa: F401
from webhookd.cli.group import main
from webhookd.cli.reads import _verified_line
from webhookd.errors import JournalError

__all__ = ["JournalError", "_verified_line", "main"]
