"""What an OpenAI-compatible server's answers say of its limits: how long a 429 asks the caller
to stay away (its headers, else its message), and what is left of each limit."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping

from webhookd.actions.delivery import parse_retry_after

_DEFAULT_COOLDOWN_S = 5.0  # a 429 that says nothing about when to come back
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_KINDS = ("requests", "tokens")  # x-ratelimit-{remaining,reset}-KIND
# The wait a 429's message names: OpenAI's "Please try again in 1.2s." ("120ms", "6m0s"),
# Azure's "Please retry after 33 seconds."
_TRY_AGAIN = re.compile(r"try again in ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)(?![a-z])", re.IGNORECASE)
_RETRY_AFTER_SECONDS = re.compile(r"retry after (\d+(?:\.\d+)?) seconds?\b", re.IGNORECASE)


def header_int(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = int(float(value))
    except (ValueError, OverflowError):  # "inf" overflows, "nan" is no number: both unsaid
        return None
    return number if number >= 0 else None


def _duration_s(value: str | None) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*`` durations: ``1s``, ``120ms``, ``6m0s``."""
    if not value:
        return None
    parts = _DURATION_PART.findall(value)
    if not parts:
        return None
    return sum(float(n) * _UNIT_S[unit] for n, unit in parts)


def cooldown_s(headers: Mapping[str, str], message: str = "") -> float:
    """How long a 429 asks us to stay away: ``retry-after-ms``, ``retry-after``, the resets
    (of the limit spent, when one says so), else the wait its error's ``message`` names
    (OpenAI's "Please try again in 6m0s.", Azure's "Please retry after 33 seconds.")."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        seconds = parse_retry_after(ms, time.time())
        if seconds is not None:
            return seconds / 1000
    seconds = parse_retry_after(headers.get("retry-after"), time.time())
    if seconds is not None:
        return seconds
    resets = {kind: _duration_s(headers.get(f"x-ratelimit-reset-{kind}")) for kind in _KINDS}
    # Each reset is when that limit is whole again, not when a call fits: the one spent (its
    # remaining 0) is what refused the call. The other's, a minute and more after heavy use of
    # it, would hold the lane back that long for a limit with room left.
    spent = [kind for kind in _KINDS if header_int(headers, f"x-ratelimit-remaining-{kind}") == 0]
    known = [s for kind, s in resets.items() if s is not None and (kind in spent or not spent)]
    if not known:  # the spent limit's reset not said: the longest said
        known = [s for s in resets.values() if s is not None]
    if known:
        return max(known)
    # A 429 may come with none of those headers: its message is then the one word on when to
    # come back, and the default's few seconds would send a call the provider refuses (and
    # counts) again and again until then.
    if (said := _TRY_AGAIN.search(message)) is not None:
        return _duration_s(said[1]) or 0.0
    if (said := _RETRY_AFTER_SECONDS.search(message)) is not None:
        return float(said[1])
    return _DEFAULT_COOLDOWN_S
