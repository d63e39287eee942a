"""systemd's service notifications (``sd_notify(3)``), for ``Type=notify`` units.

``READY=1`` once both ports listen, so ``systemctl start`` (and a deploy script behind it)
returns when webhooks can be taken, and fails when the daemon exits first (a port taken, a
journal another daemon holds); ``STOPPING=1`` when the drain begins; ``WATCHDOG=1`` from the
event loop at half of ``WatchdogSec=``, so a loop that stops turning gets the daemon restarted.
Each is one datagram to the socket ``NOTIFY_SOCKET`` names. Without it (not under systemd, a
container, a unit of another ``Type=``) every call does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, MutableMapping

log = logging.getLogger("webhookd")

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Where to send notifications (``address``, None: nowhere) and how often the watchdog
    wants a sign of life (``watchdog_s``, None: it is off)."""

    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        self.address = address
        self.watchdog_s = watchdog_s if address is not None else None
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
        """One notification: ``"READY=1"``, ``"STATUS=…"``, each a line of it."""
        if self.address is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # said once: a watchdog would repeat it every few seconds
                self._failed = True
                log.warning("cannot notify systemd (NOTIFY_SOCKET): %s", exc.strerror or exc)

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
