"""Logging setup: one readable key=value line per notable event, or JSON lines for log shippers.

Messages are written ``what key=value key=value``; the JSON formatter lifts those pairs into
fields of their own. Secrets never reach the log by construction (``Secret`` hides itself in
``repr``), and as a second line of defence every configured secret value is masked in each
formatted line before it is written, by the same ``redact.Masker`` the CLI and the admin API use.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
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


class _Masking(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.masker = Masker(secrets)
        self.mask = self.masker.text


class TextFormatter(_Masking):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"{stamp}.{int(record.msecs):03d}Z {record.levelname.lower():<7} "
            f"{record.name.removeprefix('webhookd.')}: {printable(record.getMessage())}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return self.mask(line)


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
        return json.dumps(doc, ensure_ascii=False, allow_nan=False)


def _formatter(fmt: str, secrets: Iterable[str] = ()) -> _Masking:
    return JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets)


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
        elif key not in _NAMES and _NUMBER.fullmatch(raw):
            number = float(raw) if any(c in raw for c in ".eE") else int(raw)
            value = number if math.isfinite(number) else raw  # 1e400: text, not Infinity
        out[key] = value
    return out


def set_level(level: str) -> None:
    """Log at ``level`` from now on (a reloaded ``log.level``)."""
    logging.getLogger().setLevel(LEVELS.get(level, logging.INFO))


def set_format(fmt: str) -> None:
    """Write lines in ``fmt`` from now on (a reloaded ``log.format``), masking what was masked."""
    for handler in logging.getLogger().handlers:
        old = handler.formatter
        if isinstance(old, _Masking):
            handler.setFormatter(_formatter(fmt, old.masker.given))


def add_secrets(secrets: Iterable[str]) -> None:
    """Mask these too in every line from now on (a reloaded config's secrets); the earlier
    ones stay masked, as lines about jobs started before the reload may still carry them."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, _Masking):
            formatter.masker = Masker([*formatter.masker.given, *secrets])
            formatter.mask = formatter.masker.text


def setup(
    level: str = "info",
    fmt: str = "text",
    *,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send every log line to ``stream`` (stderr) in ``fmt``; returns the handler installed."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_formatter(fmt, secrets))
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
