"""Logging setup: one readable key=value line per notable event, or JSON lines for log shippers.

Messages are written ``what key=value key=value``; the JSON formatter lifts those pairs into
fields of their own. Secrets never reach the log by construction (``Secret`` hides itself in
``repr``), and as a second line of defence every configured secret value is masked in each
formatted line before it is written, by the same ``redact.Masker`` the CLI and the admin API use.

A line is formatted where it is logged and written to stderr by a thread of its own: a reader
that stalls (a blocking log driver, a stalled journald, a stopped pipe) holds that thread, never
the event loop. Past a bounded backlog lines are dropped and counted, not waited for.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, Any

from webhookd.redact import MASK, Masker, printable, secret_values

__all__ = ["MASK", "JsonFormatter", "TextFormatter", "fields", "secret_values", "setup"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_PAIR = re.compile(r"(?<![\w.])([a-z_][\w.]*)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s'\"]+)")
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})
# Fields that name something: text even when it looks like a number.
_NAMES = frozenset({"source", "action", "event", "job", "tenant", "node", "lane", "boot", "key"})
# A number as JSON writes one.
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
# What may wait for stderr, in characters (about 4,000 lines); past it a line is dropped. Info
# and debug lines stop short of the last eighth: a flood of them cannot crowd out the warning
# or error that says what went wrong.
BACKLOG_CHARS = 1 << 20
WARNING_RESERVE_CHARS = BACKLOG_CHARS // 8
# At exit, what is queued gets this long in all to reach stderr: a reader that stalled cannot
# hold the exit (app.EXIT_DEADLINE_S) for more.
DRAIN_S = 1.0


# The syslog priority journald reads from a "<N>" before a line of a stream it collects
# (sd-daemon(3)); without one every line is stored at the stream's level, info, so
# `journalctl -p warning` showed no failure at all.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


def _priority(levelno: int) -> int:
    return next((p for level, p in _PRIORITIES if levelno >= level), 7)


def to_journald(stream: IO[str]) -> bool:
    """Whether ``stream`` is a journald stream: systemd names it in ``JOURNAL_STREAM``
    (``device:inode``) for a service whose stderr it connected to the journal, so a stderr
    redirected elsewhere by the service (to a file, a pipe) is not taken for one."""
    named = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return bool(named) and named == f"{st.st_dev}:{st.st_ino}"


class _Masking(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = (), *, journald: bool = False) -> None:
        super().__init__()
        self.masker = Masker(secrets)
        self.mask = self.masker.text
        self.held = self.masker.given  # what ``add_secrets`` adds to (``mask_only``'s)
        self.journald = journald  # each line led by its syslog priority, "<4>", for journald

    def _leveled(self, record: logging.LogRecord, text: str) -> str:
        if not self.journald:
            return text
        lead = f"<{_priority(record.levelno)}>"
        return "\n".join(lead + line for line in text.split("\n"))


class TextFormatter(_Masking):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():<7} "
            f"{record.name.removeprefix('webhookd.')}: {printable(record.getMessage())}"
        )
        if record.exc_info:
            # Each line printable and indented under its record: an exception's message may
            # quote a webhook, whose escape codes or a line dated like the daemon's would
            # otherwise stand in the log as they were sent.
            trace = self.formatException(record.exc_info).split("\n")
            line += "".join(f"\n  {printable(part)}" for part in trace)
        return self._leveled(record, self.mask(line))


class JsonFormatter(_Masking):
    def format(self, record: logging.LogRecord) -> str:
        message = self.mask(record.getMessage())
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        for key, value in fields(message).items():
            if key not in _RESERVED:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.mask(self.formatException(record.exc_info))
        return self._leveled(record, json.dumps(doc, ensure_ascii=False, allow_nan=False))


class _Queued(logging.Handler):
    """Formats each line on the caller's thread (so a reload's format and secrets apply from
    the next line on) and hands it to a thread of its own that writes it to ``stream``.

    Not ``QueueHandler`` and ``QueueListener``: a full queue is a logging error per line there,
    the listener's ``stop`` waits for its thread without a bound, and its handler, stuck in a
    write, would hold the lock ``logging.shutdown`` takes at exit."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self.stream = stream
        self.lines: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()
        # Characters queued (by callers, under the handler's lock) and written (by the
        # writer): each counter has one writer, so neither needs a lock of its own.
        self.queued = self.written = 0
        self.dropped = 0
        self.drain_until: float | None = None
        threading.Thread(target=self._write, name="log writer", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        room = BACKLOG_CHARS
        if record.levelno < logging.WARNING:
            room -= WARNING_RESERVE_CHARS
        if self.queued - self.written >= room:
            self.dropped += 1
            return
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._tell_dropped()  # where the gap is: before the first line after it
        self._put(line)

    def flush(self) -> None:
        """Wait until every line queued so far is written: DRAIN_S in all, however often this
        is called (by ``logging.shutdown`` at exit, from more than one thread at times)."""
        self.acquire()
        try:
            self._tell_dropped()
            if self.drain_until is None:
                self.drain_until = time.monotonic() + DRAIN_S
            until = self.drain_until
        finally:
            self.release()
        done = threading.Event()
        self.lines.put(done)
        done.wait(max(0.0, until - time.monotonic()))

    def _tell_dropped(self) -> None:
        if self.dropped:
            told = logging.LogRecord(
                "webhookd.logs",
                logging.WARNING,
                __file__,
                0,
                "%d log line(s) dropped: stderr was not being read",
                (self.dropped,),
                None,
            )
            self.dropped = 0
            self._put(self.format(told) + "\n")

    def _put(self, line: str) -> None:
        self.queued += len(line)
        self.lines.put(line)

    def _write(self) -> None:
        while True:
            line = self.lines.get()
            if isinstance(line, threading.Event):
                line.set()  # a flush is waiting for the lines before it
                continue
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr is closed: nowhere left to write, nor to say so
            self.written += len(line)
            # Caught up after a gap that no line since has told: tell it now. Whoever holds
            # the lock instead tells it (a line finding room, a flush).
            lock = self.lock
            if self.dropped and self.lines.empty() and lock and lock.acquire(blocking=False):
                try:
                    self._tell_dropped()
                finally:
                    lock.release()


def _handler(stream: IO[str]) -> logging.Handler:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return logging.StreamHandler(stream)  # in memory (a test's): it cannot stall
    return _Queued(stream)


def _formatter(fmt: str, secrets: Iterable[str] = (), *, journald: bool = False) -> _Masking:
    kind = JsonFormatter if fmt == "json" else TextFormatter
    return kind(secrets, journald=journald)


def fields(message: str) -> dict[str, Any]:
    """The ``key=value`` pairs of a message; numbers become numbers, quotes are removed.

    The first of a key wins: a line's own fields come before any text a sender chose. A name
    (a source, an action, an id) stays text whatever it looks like (a source ``2024`` or
    ``nan``), and only what JSON writes as a number becomes one (not ``007``, ``1_000``, ``inf``):
    a field keeps one type, and the line stays JSON."""
    out: dict[str, Any] = {}
    for key, raw in _PAIR.findall(message):
        if key in out:
            continue
        value: Any = raw
        if raw[:1] in "'\"" and raw[-1:] == raw[:1] and len(raw) >= 2:
            value = raw[1:-1]
        elif key not in _NAMES and len(raw) <= _NUMBER_CHARS and _NUMBER.fullmatch(raw):
            # No longer than a double's digits: past 4,300 int() raises (the line was lost to
            # a logging error's traceback), and no number that long is a count or a time.
            number = float(raw) if any(c in raw for c in ".eE") else int(raw)
            value = number if math.isfinite(number) else raw  # 1e400: text, not Infinity
        out[key] = value
    return out


# The longest value read as a number: a 64-bit integer's 20 characters, a double written in
# full; a longer run of digits (a sender's value, a config's) stays text.
_NUMBER_CHARS = 32


def set_level(level: str) -> None:
    """Log at ``level`` from now on (a reloaded ``log.level``)."""
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))


def set_format(fmt: str) -> None:
    """Write lines in ``fmt`` from now on (a reloaded ``log.format``), masking what was masked."""
    for handler in logging.getLogger().handlers:
        old = handler.formatter
        if isinstance(old, _Masking):
            handler.setFormatter(_formatter(fmt, old.masker.given, journald=old.journald))


def add_secrets(secrets: Iterable[str]) -> None:
    """Mask these too in every line from now on (a reloaded config's secrets), beside those
    masked since the last ``setup`` or ``mask_only``, which say what may still be printed; those
    a previous call added are dropped (a reload refused after it was read)."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, _Masking):
            formatter.masker = Masker([*formatter.held, *secrets])
            formatter.mask = formatter.masker.text


def mask_only(secrets: Iterable[str]) -> None:
    """Mask these in every line from now on, and no other (the worker pool's, once a reload
    is applied or the last attempt begun before one ends: a secret rotated out is dropped)."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, _Masking):
            formatter.masker = Masker(secrets)
            formatter.mask = formatter.masker.text
            formatter.held = formatter.masker.given


def setup(
    level: str = "info",
    fmt: str = "text",
    *,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send every log line to ``stream`` (stderr) in ``fmt``; returns the handler installed."""
    stream = stream or sys.stderr
    handler = _handler(stream)
    handler.setFormatter(_formatter(fmt, secrets, journald=to_journald(stream)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    # aiohttp's access log would print a line per webhook; our own lines say what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aiosqlite logs every statement at debug: noise that would drown webhookd's own debug lines.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    # The openai client's HTTP library logs each request at info: a line per model call, beside
    # the job's own. (httpx2 is the name some builds of it log under.)
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler
