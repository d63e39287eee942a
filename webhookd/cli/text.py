"""Times read from options and written in lines, progress bars on a terminal, JSON on stdout."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import time
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")

# A byte of an argument that is not UTF-8 (0x80-0xff) reaches a verb as a lone surrogate,
# U+DC80-U+DCFF, which a repr() shows and stderr writes as `\udcff`: a message may hold either
# (a repr's, its backslash not escaped itself, or the surrogate itself).
_NOT_UTF8_SHOWN = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def as_typed(text: str) -> str:
    """``text`` with each byte of an argument that was not UTF-8 shown as it was typed,
    ``evt_\\xff``, not as the ``evt_\\udcff`` Python makes of it."""
    text = _NOT_UTF8_SHOWN.sub(r"\1\\x\2", text)
    return _NOT_UTF8.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)


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


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")[:-4] + "Z"


def _echo_json(doc: dict[str, Any]) -> None:
    """A verb's ``--json`` document on stdout, alone there (ids, counts, names: nothing a
    terminal would obey, and non-ASCII escaped)."""
    click.echo(json.dumps(doc, indent=2))
