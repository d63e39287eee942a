"""Shared fixtures: a real journal file, a real loopback HTTP target, an in-process daemon.

Every async test runs once per event loop in ``LOOPS`` (ids end in ``[asyncio]`` / ``[uvloop]``):
``webhookd serve`` ships on uvloop and falls back to the stock loop when uvloop is missing, and
the two differ in transports, subprocess pipes and timing, so code that works on only one of them
fails here. Async fixtures run on their test's loop. ``--loops uvloop`` (or ``asyncio``) narrows
a local run to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import uvloop
from aiohttp import web
from procs import Procs
from procs import Target as ServerTarget

from webhookd import config as config_mod
from webhookd.app import Daemon
from webhookd.journal import Journal, NewJob
from webhookd.models import Event, Priority, new_event_id, new_job_id
from webhookd.receiver import Receiver

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

# The stock loop by class rather than through the global policy, which a test may have replaced.
LOOPS: dict[str, LoopFactory] = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.new_event_loop,
}
_CHOSEN_LOOPS = pytest.StashKey[dict[str, LoopFactory]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--loops",
        default=",".join(LOOPS),
        help=f"comma-separated event loops to run async tests under (of {', '.join(LOOPS)})",
    )


# ``-n auto`` (pyproject's addopts): one worker per core, at most this many. A worker running
# the multi-node tests holds some 40 connections to the throwaway PostgreSQL (200 at most), and
# past a few workers the daemons' timing tests would share each core with more of each other.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def pytest_configure(config: pytest.Config) -> None:
    chosen = [name.strip() for name in str(config.getoption("--loops")).split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(LOOPS))
    if not chosen or unknown:
        raise pytest.UsageError(f"--loops: choose from {', '.join(LOOPS)}, got {unknown or '[]'}")
    config.stash[_CHOSEN_LOOPS] = {name: LOOPS[name] for name in chosen}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, LoopFactory]:
    """The loops an async test runs under: all chosen ones, or one for ``subprocess`` tests.

    A ``subprocess`` test's code under test runs in a real ``webhookd`` process (``serve`` is
    always on uvloop); its own loop only drives it, so running it twice would double its
    seconds and test nothing new.
    """
    chosen = config.stash[_CHOSEN_LOOPS]
    if item.get_closest_marker("subprocess") is not None:
        name = next(iter(chosen))
        return {name: chosen[name]}
    return chosen


def new_event(
    source: str,
    received_at: float,
    body: bytes = b"{}",
    *,
    tenant: str = "",
    priority: Priority = Priority.NORMAL,
    content_type: str = "application/json",
) -> Event:
    """An event as the receiver would journal it, with a dedup key of its own."""
    event_id = new_event_id()
    return Event(
        id=event_id,
        source=source,
        received_at=received_at,
        dedup_key=f"{source}:{event_id}",
        tenant=tenant,
        priority=priority,
        headers=(("Content-Type", content_type),),
        body=body,
    )


def jobs_for(src: config_mod.SourceConfig, order_key: str | None = None) -> tuple[NewJob, ...]:
    """One new job per action of ``src``, as the receiver makes them."""
    return tuple(
        NewJob(new_job_id(), a.name, a.type, a.retry.max_attempts, order_key) for a in src.actions
    )


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    query: str = ""  # as received, still percent-encoded


@dataclass
class Target:
    """A real aiohttp server on 127.0.0.1 that records what it receives.

    ``statuses`` is consumed one per request (then ``default_status``); ``hold`` makes the
    handler wait until the event is set (a hanging downstream); ``body`` replaces the default
    response text.
    """

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    default_status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    hold: asyncio.Event | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    running: int = 0
    peak_running: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            body = await request.read()
            self.seen.append(
                Seen(
                    request.method,
                    request.path,
                    dict(request.headers),
                    body,
                    request.rel_url.raw_query_string,
                )
            )
            self.changed.set()
            if self.hold is not None:
                await self.hold.wait()
            status = self.statuses.pop(0) if self.statuses else self.default_status
            if self.body is not None:
                return web.Response(status=status, body=self.body, headers=self.headers)
            return web.Response(status=status, text=f"answer {status}", headers=self.headers)
        finally:
            self.running -= 1

    async def wait_for(self, predicate: Callable[[Target], bool], timeout_s: float = 10) -> None:
        """Wait until ``predicate(self)`` holds, woken by each arrival (no polling)."""
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", t.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    t.url = f"http://{host}:{port}"
    yield t
    if t.hold is not None:
        t.hold.set()
    await runner.cleanup()


def make_config(
    tmp_path: Path, extra: str = "", *, journal_url: str | None = None, **sections: str
) -> config_mod.Config:
    """A config on free loopback ports with its journal in ``tmp_path`` (or at ``journal_url``,
    a PostgreSQL one), plus ``extra`` TOML."""
    where = f'url = "{journal_url}"' if journal_url else f'path = "{tmp_path / "webhookd.db"}"'
    text = f"""
[server]
listen = "127.0.0.1:0"
{sections.get("server", "")}
[admin]
listen = "127.0.0.1:0"
{sections.get("admin", "")}
[journal]
{where}
{sections.get("journal", "")}
[workers]
{sections.get("workers", "")}
{extra}
"""
    from webhookd import actions

    cfg = config_mod.loads(text, "test", kinds=actions.kind_defaults)
    actions.validate(cfg)
    return cfg


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The root logger's handlers and level as they were before the test (``logs.setup``)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    async with Journal(tmp_path / "journal.db") as j:
        yield j


@contextlib.asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[str]:
    """``receiver`` on a loopback port of its own, as ``webhookd serve`` runs it; yields its
    ``host:port``."""
    server = receiver.server()
    try:
        yield (await server.start("127.0.0.1", 0))[0]
    finally:
        await server.cleanup()


PG_URL_VAR = "WEBHOOKD_TEST_PG_URL"


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """The throwaway PostgreSQL server's URL (``.ci/postgres.sh`` starts one and exports it).

    Without it a PostgreSQL test skips locally, saying how to run it; under ``CI`` it fails,
    since CI must prove the PostgreSQL journal, not skip it.
    """
    url = os.environ.get(PG_URL_VAR)
    if not url:
        reason = (
            f"{PG_URL_VAR} is not set: run the tests under `.ci/postgres.sh run pytest ...` "
            "to give them a throwaway PostgreSQL"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; the PostgreSQL journal's tests must run in CI")
        pytest.skip(reason)
    yield url


PGBOUNCER_URL_VAR = "WEBHOOKD_TEST_PGBOUNCER_URL"


@pytest.fixture(scope="session")
def pgbouncer_server_url(pg_server_url: str) -> str:
    """The test server through PgBouncer in transaction mode (``.ci/postgres.sh`` starts it
    beside the server when Debian's ``pgbouncer`` can be had; CI installs it)."""
    url = os.environ.get(PGBOUNCER_URL_VAR)
    if not url:
        reason = f"{PGBOUNCER_URL_VAR} is not set: .ci/postgres.sh found no pgbouncer to start"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; the journal behind a pooler must be proven in CI")
        pytest.skip(reason)
    return url


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A new, empty database on the test server, dropped afterwards; yields its URL."""
    import asyncpg

    name = f"webhookd_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextlib.contextmanager
def own_pg_server() -> Iterator[tuple[str, Path]]:
    """A PostgreSQL server of the caller's own (``.ci/postgres.sh start``), for a test that
    restarts or reconfigures it: doing so to the shared server cut or changed every other test's
    on the other workers. Yields its URL and its folder; stopped and removed afterwards."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / ".ci" / "postgres.sh"
    started = subprocess.run(
        ["bash", str(script), "start"], check=True, capture_output=True, text=True, timeout=120
    )
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in started.stdout.splitlines()
        if line.startswith("export ")
    )
    home = Path(exports["WEBHOOKD_TEST_PG_DIR"])
    try:
        yield exports["WEBHOOKD_TEST_PG_URL"], home
    finally:
        subprocess.run(["bash", str(script), "stop", str(home)], capture_output=True, timeout=120)


@pytest.fixture
async def pg_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test alone."""
    async with fresh_database(pg_server_url) as url:
        yield url


@dataclass
class DatabaseOutage:
    """The test's database refusing connections, as a server going down would: ``begin()``
    refuses new connections and cuts the open ones, ``end()`` lets them in again."""

    admin: Any  # an asyncpg connection to the server's ``postgres`` database
    name: str

    async def begin(self) -> None:
        await self.admin.execute(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS false')
        # With a timeout it waits for each backend to be gone (PostgreSQL 14 on): without, a
        # pooled connection could still take a write a moment after, and a test of the outage
        # saw none.
        await self.admin.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            self.name,
        )

    async def end(self) -> None:
        await self.admin.execute(f'ALTER DATABASE "{self.name}" WITH ALLOW_CONNECTIONS true')


@pytest.fixture
async def db_outage(pg_url: str) -> AsyncIterator[DatabaseOutage]:
    """A switch for an outage of the test's database; over by the end of the test, whatever
    happened."""
    import asyncpg

    server_url, name = pg_url.rsplit("/", 1)
    admin = await asyncpg.connect(f"{server_url}/postgres")
    outage = DatabaseOutage(admin, name)
    try:
        yield outage
    finally:
        try:
            await outage.end()
        finally:
            await admin.close()


@pytest.fixture
def pgbouncer_url(pg_url: str, pgbouncer_server_url: str) -> str:
    """The test's fresh database, reached through PgBouncer in transaction mode."""
    return f"{pgbouncer_server_url.rsplit('/', 1)[0]}/{pg_url.rsplit('/', 1)[1]}"


@pytest.fixture
def journal_env(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's fresh database as ``WEBHOOKD_JOURNAL_URL``, which the configs written by
    tests/cluster.py read: every ``webhookd serve`` node the test starts shares it."""
    monkeypatch.setenv("WEBHOOKD_JOURNAL_URL", pg_url)
    return pg_url


@dataclass
class Running:
    daemon: Daemon
    task: asyncio.Task[int]
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://{self.daemon.bound.receiver}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.daemon.bound.admin}"

    async def post(self, path: str, body: bytes | str = b"{}", **kw: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, data=body, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def stop(self) -> int:
        self.daemon.request_stop()
        return await self.task


@pytest.fixture
async def run_daemon() -> AsyncIterator[Callable[[config_mod.Config], Any]]:
    """Start an in-process daemon (no signal handlers) and stop it at the end of the test."""
    running: list[Running] = []
    http = aiohttp.ClientSession()

    async def start(cfg: config_mod.Config, **daemon_kw: Any) -> Running:
        daemon = Daemon(cfg, install_signals=False, **daemon_kw)
        task = asyncio.create_task(daemon.run())
        started = asyncio.create_task(daemon.started.wait())
        done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            started.cancel()
            raise RuntimeError(f"daemon exited with {task.result()} before it started")
        r = Running(daemon, task, http)
        running.append(r)
        return r

    yield start
    for r in running:
        if not r.task.done():
            await r.stop()
    await http.close()


@pytest.fixture
async def downstream() -> AsyncIterator[ServerTarget]:
    """A real loopback server (tests/procs.py's ``Target``) for daemon processes to forward to."""
    async with ServerTarget() as t:
        yield t


@pytest.fixture
async def procs() -> AsyncIterator[Procs]:
    """Real ``webhookd`` processes for one test; whatever is still alive is killed at its end."""
    p = Procs()
    try:
        yield p
    finally:
        await p.aclose()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to daemons over loopback, 15 s per request at most."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session
