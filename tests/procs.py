"""Helpers for tests that run real ``webhookd`` processes: start, signal, reap, and a target.

Every process is started with ``sys.executable -m webhookd`` so the venv running the tests is the
one under test. A daemon's stderr is read to the end by a task of our own (a full pipe would stall
the daemon); the address it binds is taken from its "listening on" line, so configs can ask for
port 0. ``Procs.aclose`` kills whatever is still alive: no test leaves a daemon behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
from aiohttp import web

_LISTENING = re.compile(
    r"webhookd listening on http://(?P<receiver>\S+) \(webhooks\) and "
    r"(?:http://(?P<admin>\S+) \(admin\)|no admin)"
)
START_TIMEOUT_S = 15.0
_SETTLED = ("done", "dead", "cancelled")


def clean_env() -> dict[str, str]:
    """The test's environment without ``WEBHOOKD_CONFIG``, so only ``--config`` decides."""
    env = dict(os.environ)
    env.pop("WEBHOOKD_CONFIG", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Runs what follows as the user nobody, as a daemon with a user of its own runs.
AS_NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")


def why_not_as_nobody() -> str | None:
    """Why this run cannot start webhookd as the user nobody (None when it can): that takes
    root, ``setpriv``, and a checkout and virtualenv nobody can read."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return "running as another user takes root and setpriv"
    done = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", "import webhookd.journal; print('importable')"],
        capture_output=True,
        text=True,
    )
    if done.stdout.strip() != "importable":
        return "this checkout or its virtualenv is not readable by the user nobody"
    return None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether the daemon could listen on ``port``: bound as it binds (``SO_REUSEADDR``), so
    connections of a run a moment ago still in TIME_WAIT do not count as busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def config_text(
    journal: str, body: str = "", *, workers: str = "", server: str = "", admin: bool = True
) -> str:
    """A config on loopback port 0 with ``journal`` as its ``[journal]`` lines, info logs, plus
    ``body``; ``server`` and ``workers`` are more lines for those sections."""
    admin_listen = "127.0.0.1:0" if admin else ""
    return f"""\
[server]
listen = "127.0.0.1:0"
{server}

[admin]
listen = "{admin_listen}"

[journal]
{journal}

[workers]
{workers}

[log]
level = "info"

{body}
"""


def write_config(
    path: Path, journal: Path, body: str = "", *, workers: str = "", admin: bool = True
) -> Path:
    """A config on loopback port 0 with its journal at ``journal``, info logs, plus ``body``."""
    text = config_text(f'path = "{journal}"', body, workers=workers, admin=admin)
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class Cli:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class DaemonProc:
    """One ``webhookd serve`` process and what it has said on stderr."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    receiver: str = ""
    admin: str = ""
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    said: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.receiver}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin}"

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def _read(self) -> None:
        stream = self.proc.stderr
        if stream is None:
            return
        while line := await stream.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(text)
            m = _LISTENING.search(text)
            if m and not self.listening.is_set():
                self.receiver = m["receiver"]
                self.admin = m["admin"] or ""
                self.listening.set()
            self.said.set()

    async def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the daemon has bound its listeners; fails with its log if it exited first."""
        assert self.reader is not None
        waiter = asyncio.ensure_future(self.listening.wait())
        try:
            await asyncio.wait(
                {waiter, self.reader}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
        if not self.listening.is_set():
            raise AssertionError(
                f"webhookd did not start within {timeout_s}s "
                f"(exit {self.proc.returncode}):\n{self.log}"
            )

    async def wait_said(self, pattern: str, timeout_s: float = 10.0) -> str:
        """Until a stderr line matches ``pattern``; returns the line."""
        rx = re.compile(pattern)
        async with asyncio.timeout(timeout_s):
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                if self.reader is not None and self.reader.done():
                    raise AssertionError(f"webhookd exited without saying {pattern!r}")
                self.said.clear()
                await self.said.wait()

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        """The exit status, once the process has exited and its stderr is read to the end."""
        async with asyncio.timeout(timeout_s):
            code = await self.proc.wait()
            if self.reader is not None:
                await self.reader
        return code

    async def kill9(self) -> int:
        """``kill -9`` and reap."""
        self.signal(signal.SIGKILL)
        return await self.wait_exit()


async def spawn(
    args: Sequence[str],
    cwd: Path | None,
    *,
    stdout: int,
    open_files: tuple[int, int] | None = None,
    wrap: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    stderr: int = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """``python -m webhookd ARGS`` in a clean environment (plus ``env``), stderr piped (or to
    the descriptor ``stderr``); ``open_files``: its (soft, hard) limit on open files, as a
    shell's ``ulimit -n`` would set it; ``wrap``: a program (and its arguments) that runs the
    daemon, as a container's init would."""

    def limit() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    return await asyncio.create_subprocess_exec(
        *wrap,
        sys.executable,
        "-m",
        "webhookd",
        *args,
        cwd=cwd,
        env=clean_env() | dict(env or {}),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=limit if open_files is not None else None,
    )


class Procs:
    """Starts ``webhookd`` processes and makes sure none outlives the test."""

    def __init__(self) -> None:
        self.daemons: list[DaemonProc] = []

    async def serve(
        self,
        config: Path | None,
        *,
        cwd: Path | None = None,
        wait: bool = True,
        open_files: tuple[int, int] | None = None,
        flags: Sequence[str] = (),
        wrap: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> DaemonProc:
        """``webhookd serve [--config CONFIG] FLAGS``, once listening unless ``wait`` is off;
        ``wrap`` and ``env``: as for ``spawn``."""
        args = ["serve"] if config is None else ["serve", "--config", str(config)]
        args += flags
        proc = await spawn(
            args,
            cwd,
            stdout=asyncio.subprocess.DEVNULL,
            open_files=open_files,
            wrap=wrap,
            env=env,
        )
        daemon = DaemonProc(proc)
        daemon.reader = asyncio.create_task(daemon._read(), name=f"stderr of {proc.pid}")
        self.daemons.append(daemon)
        if wait:
            await daemon.wait_listening()
        return daemon

    async def cli(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout_s: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> Cli:
        """Run ``webhookd ARGS`` to completion (``env``: as for ``spawn``)."""
        proc = await spawn(args, cwd, stdout=asyncio.subprocess.PIPE, env=env)
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise
        assert proc.returncode is not None
        return Cli(proc.returncode, out.decode(), err.decode())

    async def aclose(self) -> None:
        for daemon in self.daemons:
            if daemon.proc.returncode is None:
                daemon.proc.kill()
            await daemon.proc.wait()
            if daemon.reader is not None:
                await daemon.reader


async def poll(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float, interval_s: float = 0.02
) -> None:
    """Until ``check()`` holds, asking every ``interval_s``; for state in another process."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)


@dataclass
class Delivery:
    event_id: str
    body: bytes
    at: float


@dataclass
class Target:
    """A real loopback HTTP server standing in for the user's service.

    It records every request's ``webhook-id`` (the event id) and body on arrival, then waits
    ``delay_s`` (cut short by ``release``) and answers ``status`` with ``headers``. ``answered``
    counts the requests it has answered.
    """

    url: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    arrivals: list[Delivery] = field(default_factory=list)
    answered: list[Delivery] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        seen = Delivery(request.headers.get("webhook-id", ""), await request.read(), time.time())
        self.arrivals.append(seen)
        self.changed.set()
        status = self.status
        if self.delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.delay_s)
        self.answered.append(seen)
        self.changed.set()
        return web.Response(status=status, text=f"answer {status}", headers=self.headers)

    @property
    def ids(self) -> list[str]:
        return [d.event_id for d in self.arrivals]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        """Until ``predicate()`` holds, woken by each arrival and answer."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def aclose(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object] | None]:
    """``GET url`` → (status, JSON or None); status 0 when the connection is refused."""
    try:
        async with http.get(url) as r:
            return r.status, await r.json(content_type=None)
    except aiohttp.ClientConnectionError:
        return 0, None


async def settled_event(
    http: aiohttp.ClientSession, admin_url: str, event_id: str, timeout_s: float = 15.0
) -> dict[str, Any]:
    """Poll ``GET /events/<id>`` until every job of the event is done, dead or cancelled; returns
    the event's document. A timeout shows the last document, so a job stuck retrying says why."""
    doc: dict[str, Any] = {}

    async def settled() -> bool:
        nonlocal doc
        status, body = await get_json(http, f"{admin_url}/events/{event_id}")
        doc = body or {}
        jobs = doc.get("jobs") or []
        return status == 200 and bool(jobs) and all(j["state"] in _SETTLED for j in jobs)

    try:
        await poll(settled, timeout_s=timeout_s)
    except TimeoutError:
        raise AssertionError(f"event {event_id} not settled within {timeout_s}s: {doc}") from None
    return doc


# A process that has a SQLite file open in WAL mode, as a daemon of an older webhookd (one
# from before the serve lock) has: it reads once, says so, and holds the file until stdin ends.
_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
conn.execute("PRAGMA journal_mode = WAL")
conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
print("open", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held_open(path: Path) -> Iterator[int]:
    """``path`` open in another process for the block; yields that process's pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        yield holder.pid
    finally:
        holder.communicate("", timeout=30)
