"""systemd's service notifications (``sd_notify(3)``), for ``Type=notify`` units.

``READY=1`` once both ports listen, so ``systemctl start`` (and a deploy script behind it)
returns when webhooks can be taken, and fails when the daemon exits first (a port taken, a
journal another daemon holds); ``STATUS=`` every few seconds, a line ``systemctl status``
shows (the backlog, the workers, what is wrong); ``RELOADING=1`` and ``READY=1`` around a
reload (SIGHUP), so ``systemctl reload`` of a ``Type=notify-reload`` unit returns once it is
applied or refused; ``STOPPING=1`` when the drain begins; ``WATCHDOG=1`` from the event loop at
half of ``WatchdogSec=``, so a loop that stops turning gets the daemon restarted. Each is one
datagram to the socket ``NOTIFY_SOCKET`` names. Without it (not under systemd, a
container, a unit of another ``Type=``) every call does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, MutableMapping

log = logging.getLogger("webhookd")

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# At most this many characters of a field: a few fit in one datagram whatever they say.
FIELD_CHARS = 1000

# How often the STATUS= line is sent again: fresh enough for `systemctl status`, one datagram.
STATUS_S = 10.0


class Notifier:
    """Where to send notifications (``address``, None: nowhere), how often the watchdog wants
    a sign of life (``watchdog_s``, None: it is off) and the status line again (``status_s``)."""

    def __init__(
        self, address: str | None, watchdog_s: float | None = None, status_s: float = STATUS_S
    ) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address is not None else None
        self.status_s = status_s
        self._failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd's variables describe, taken out of ``environ`` (the process's
        own by default) as ``sd_notify``'s ``unset_environment`` does, so that commands the
        daemon runs cannot speak for it."""
        env = os.environ if environ is None else environ
        given = {name: env.pop(name, "") for name in _VARIABLES}
        address = given["NOTIFY_SOCKET"]
        if address.startswith("@"):  # a socket in the abstract namespace
            address = "\0" + address[1:]
        if not address.startswith(("/", "\0")):
            return cls(None)
        usec, pid = given["WATCHDOG_USEC"], given["WATCHDOG_PID"]
        mine = not pid or pid == str(os.getpid())
        watchdog_s = int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        return cls(address, watchdog_s)

    def send(self, *fields: str) -> None:
        """One notification: ``"READY=1"``, ``"STATUS=…"``, each a line of it. A field's own
        line breaks become spaces (an error's text cannot add a field of its own) and a long
        one is cut, well inside the 4 KB systemd reads."""
        if self.address is None:
            return
        lines = [" ".join(f.splitlines())[:FIELD_CHARS] for f in fields]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                # Never wait on the loop: a reader that has fallen behind loses a datagram.
                s.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._failed:  # said once: a watchdog would repeat it every few seconds
                self._failed = True
                log.warning("cannot notify systemd (NOTIFY_SOCKET): %s", exc.strerror or exc)

    def reloading(self) -> None:
        """A reload begins; ``READY=1`` says it is over, applied or refused. systemd (253 and
        later) wants the monotonic clock beside it to tell this reload from an earlier one."""
        self.send("RELOADING=1", "STATUS=reloading the config", f"MONOTONIC_USEC={_monotonic_us()}")

    async def keep_status(self, status: Callable[[], str]) -> None:
        """Send ``STATUS=`` with ``status()`` every ``status_s``, until cancelled; nothing
        without a socket."""
        if self.address is None:
            return
        while True:
            await asyncio.sleep(self.status_s)
            self.send(f"STATUS={status()}")

    @contextlib.asynccontextmanager
    async def watchdog(self) -> AsyncIterator[None]:
        """Send ``WATCHDOG=1`` every half ``watchdog_s`` from this loop while inside."""
        if self.watchdog_s is None:
            yield
            return
        task = asyncio.create_task(self._keep_alive(self.watchdog_s / 2), name="sd-watchdog")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep_alive(self, every_s: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(every_s)


def _monotonic_us() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
