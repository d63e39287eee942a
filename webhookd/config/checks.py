"""Checks of single config values: numbers and durations, PostgreSQL URLs, HTTP header values.

And ``closest``: the known name a misspelt key or source name most likely meant, for each "did
you mean" of the config and the CLI.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from typing import Any

from webhookd.errors import ConfigError
from webhookd.secret import Secret


def _unknown(name: str, known: Iterable[str], said: str, cutoff: float = 0.8) -> str:
    """``said``, and the known key ``name`` is most likely a misspelling of, if one is close."""
    close = closest(name, known, cutoff)
    return f"{said} (did you mean {close}?)" if close else said


# Names other tools use, or that a reader guesses, for keys spelt another way here: no
# misspelling of them, so the ratio alone does not find them. The first one known wins (an
# action's max_attempts is its retry table's).
_MEANT = {
    "lvl": ("level",),
    "loglevel": ("level",),
    "max_retries": ("max_attempts", "retry"),
    "retries": ("max_attempts", "retry"),
    "attempts": ("max_attempts", "retry"),
    "max_attempts": ("retry",),
    "backoff": ("retry",),
    "timeout": ("timeout_s",),
    "medium": ("normal",),
}


def closest(name: str, known: Iterable[str], cutoff: float = 0.8) -> str | None:
    """The known name ``name`` is most likely a misspelling of: the same but for case, else
    by difflib's ratio, or one letter off (a short key's ratio is low for one slip: rpn, rpm)."""
    keys = sorted(known)
    meant = [key for key in _MEANT.get(name.lower(), ()) if key in known]
    if meant:
        return meant[0]
    close = [key for key in keys if key.lower() == name.lower() and key != name][:1]
    close = close or difflib.get_close_matches(name, keys, n=1, cutoff=cutoff)
    if not close and len(name) >= 3:
        close = [key for key in keys if _one_letter_off(name, key)][:1]
    return close[0] if close else None


def _one_letter_off(a: str, b: str) -> bool:
    """One letter changed, added, dropped, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def check_journal_url(url: Secret, key: str) -> None:
    """A PostgreSQL URL, or a ``ConfigError`` naming ``key`` (the URL itself is never shown).

    What would otherwise fail only as the daemon connects, with an error that names no key: a
    port that is not a port, and an ``@``, ``/``, ``?`` or ``#`` in the user or password, which
    the driver takes for the end of them (a host that does not exist, while the URL as masked
    shows the right one, or the rest of the password).
    """
    text = url.reveal()
    if not text.startswith(("postgresql://", "postgres://")):
        raise ConfigError(key, "must be a postgresql:// URL")
    if credentials_unclear(text):
        raise ConfigError(
            key,
            "has an @ or # that leaves unclear where its password ends: in a user, password or"
            " option, write / as %2F, ? as %3F, @ as %40 and # as %23",
        )
    netloc = text.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    hosts = netloc.rpartition("@")[2]
    for host in hosts.split(","):  # libpq's list of hosts, each with its own port
        if host.startswith("[") and "]" not in host:
            raise ConfigError(key, "has a [ with no ] after it: write an IPv6 host [addr]:port")
        name, colon, port = host.rpartition(":")
        if not colon or name.endswith(":") or (host.startswith("[") and not name.endswith("]")):
            continue  # no port (an IPv6 address's own colons are inside its brackets)
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            # Not quoted: with a / or ? in a password, what stands here is part of the password.
            raise ConfigError(
                key,
                "has a port that is not a number from 1 to 65535 (in a password, write / as %2F"
                " and ? as %3F)",
            )


def credentials_unclear(url: str) -> bool:
    """Whether ``url`` may hold a password that a parser would split, so that a part of it
    reads as the host, path, options or fragment: an ``@`` past the first ``/``, ``?`` or
    ``#`` after ``//``, two ``@`` before it, or a ``#`` at all (a libpq URL has no fragment).
    Such a URL is neither taken nor shown, since no reading of it is sure."""
    rest = url.partition("://")[2]
    if "#" in rest:
        return True
    end = next((i for i, c in enumerate(rest) if c in "/?"), len(rest))
    return rest.count("@", 0, end) > 1 or "@" in rest[end:]


def check_number(
    value: Any,
    key: str,
    *,
    minimum: float | None = None,
    integer: bool = False,
    positive: bool = False,
) -> Any:
    """``value`` if it is a finite number within bounds, else a ``ConfigError`` naming ``key``.

    Every number in a config goes through here. TOML has ``nan`` and ``inf``; neither is a
    usable timeout, rate or size (``nan`` fails every comparison, so it slips past the bounds).
    """
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(key, f"must be {kind}, not {_type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, not {value}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        # TOML's own range, which Python's reader does not hold to; SQLite and PostgreSQL
        # refuse such a number at the first write (a max_attempts: every webhook a 503).
        raise ConfigError(key, "is beyond a 64-bit integer")
    if positive and value <= 0:
        raise ConfigError(key, "must be greater than 0")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be at least {minimum}")
    name = key.rpartition(".")[2]
    unit = None if name.endswith("per_s") else _DURATION_UNITS.get(name.rpartition("_")[2])
    if unit is not None and value * unit > _LONGEST_S:
        # A deadline that far off is past what the clock can say (1e300 s of shutdown_grace_s
        # crashed the stop's watchdog), and no wait that long is meant.
        raise ConfigError(key, "is longer than 100 years")
    return value


# Durations are named by their unit (``_s``, ``_h``, ``_d``); none may pass 100 years.
_DURATION_UNITS = {"s": 1, "h": 3_600, "d": 86_400}
_LONGEST_S = 100 * 365 * 86_400


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token


def header_value(value: str, key: str) -> str:
    """``value`` if an HTTP header can carry it, else ``ConfigError`` naming ``key`` (without the
    value: it may be a secret). Refused here, at the start, rather than by every
    request that sends it."""
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(
            key,
            "holds a line break or a NUL, which no header can carry (an env: value ending in"
            " a newline?)",
        )
    return value
