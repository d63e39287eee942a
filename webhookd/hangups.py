"""SIGHUPs that came before the daemon's loop could take them, noted to be done once it runs.

SIGHUP's default ends a process, and systemd takes that death for a clean exit, so a `reload`
sent right after a start (a deploy script, `docker kill -s HUP`) left the service down while
the command was still importing. ``webhookd.entry`` notes them from the command's first
instant, ``webhookd serve`` until its loop's handler is in place.
"""

from __future__ import annotations

from types import FrameType

NOTED: list[int] = []


def note(signum: int, _frame: FrameType | None) -> None:
    NOTED.append(signum)
