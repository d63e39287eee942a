"""Never half alive: one job or one batch fails alone; a dead long-lived task ends the daemon.

A handler raising ``SystemExit`` is that job's failed attempt; a value SQLite cannot store fails
its own write only; a full disk while jobs finish is a run of 503s that ends by itself. But when
the journal's writer (or another long-lived task) stops, the process exits non-zero at once,
with its ports closed, instead of lingering where a service manager would never restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Running, make_config, new_event
from procs import Procs, get_json, poll, write_config

from webhookd.admin import Admin
from webhookd.app import Daemon
from webhookd.config import parse_listen
from webhookd.errors import JournalError, JournalUnavailable
from webhookd.journal import Journal, NewEvent, NewJob
from webhookd.models import new_job_id
from webhookd.state import IntakeState
from webhookd.stats import AdminContext
from webhookd.workers import WorkerPool

pytestmark = pytest.mark.timeout(90)

JSON = {"Content-Type": "application/json"}


def refused(address: str) -> bool:
    """Whether nothing listens at ``host:port`` any more."""
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host.strip("[]"), int(port))) != 0


# -- a handler's BaseException is its job's failure ------------------------------------------

HANDLERS = """
import asyncio


async def exits(event):
    raise SystemExit(3)


def interrupts(event):  # a plain function: it runs in a thread
    raise KeyboardInterrupt


async def cancels(event):
    raise asyncio.CancelledError()
"""


@pytest.mark.subprocess
async def test_handler_raising_systemexit_or_keyboardinterrupt_fails_its_attempts_only(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """SystemExit, KeyboardInterrupt or a stray CancelledError from a handler: retried, then
    dead; the daemon goes on taking webhooks and stops cleanly."""
    (tmp_path / "quitting.py").write_text(HANDLERS, encoding="utf-8")
    retry = "{ max_attempts = 2, base_s = 0.01, factor = 1, cap_s = 0.01 }"
    sources = "".join(
        f"""
[[sources.{name}.actions]]
type = "python"
handler = "quitting:{name}"
path = "{tmp_path}"
retry = {retry}
"""
        for name in ("exits", "interrupts", "cancels")
    )
    config = write_config(tmp_path / "webhookd.toml", tmp_path / "journal.db", sources)
    daemon = await procs.serve(config)
    for name, raised in (
        ("exits", "SystemExit: 3"),
        ("interrupts", "KeyboardInterrupt"),
        ("cancels", "CancelledError"),
    ):
        async with http.post(f"{daemon.url}/hooks/{name}", data=b"{}", headers=JSON) as r:
            assert r.status == 202, await r.text()
            event_id = (await r.json())["id"]
        doc: dict[str, Any] = {}

        async def dead(event_id: str = event_id) -> bool:
            nonlocal doc
            status, body = await get_json(http, f"{daemon.admin_url}/events/{event_id}")
            doc = body or {}
            return status == 200 and doc.get("state") == "dead"

        await poll(dead, timeout_s=15)
        [job] = doc["jobs"]
        assert job["attempts"] == 2
        assert [e["outcome"] for e in job["errors"]] == ["retry", "dead"]
        assert all(raised in e["error"] for e in job["errors"]), job["errors"]
        assert daemon.proc.returncode is None
    async with http.post(f"{daemon.url}/hooks/exits", data=b'{"after": 1}', headers=JSON) as r:
        assert r.status == 202
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(timeout_s=20) == 0, daemon.log


# -- one bad write fails alone ---------------------------------------------------------------


def _item(source: str, dedup_key: str | None = None) -> NewEvent:
    event = new_event(source, time.time())
    if dedup_key is not None:
        event = dataclasses.replace(event, dedup_key=dedup_key)
    return NewEvent(event, (NewJob(new_job_id(), "log", "log", 3, None),))


async def test_an_unstorable_value_fails_its_own_ingest_and_the_writer_lives_on(
    tmp_path: Path,
) -> None:
    """An event whose dedup key SQLite cannot encode fails alone; its batch neighbours commit
    and the next webhook is stored."""
    async with Journal(tmp_path / "journal.db") as journal:
        # Queued together, so the writer takes them as one group commit.
        good_before = journal.submit_ingest(_item("a"))
        bad = journal.submit_ingest(_item("a", dedup_key="a:\udcff"))
        good_after = journal.submit_ingest(_item("a"))
        results = await asyncio.gather(good_before, bad, good_after, return_exceptions=True)
        assert isinstance(results[1], JournalUnavailable), results
        for result in (results[0], results[2]):
            assert not isinstance(result, BaseException), results
            await journal.get_event(result.event_id)
        assert journal.writer_problem is None
        later = await journal.ingest(_item("a"))
        assert (await journal.get_event(later.event_id)).event.id == later.event_id


# -- a dead long-lived task ends the daemon ------------------------------------------------


def _kill_writer_on_commit(daemon: Daemon) -> None:
    """The consumers the writer calls after each commit fail (``on_commit`` with the new queued
    jobs, the pool's ``settle`` with those an idle pool started at once): the writer task dies
    with them, whichever way the job went."""
    journal, pool = daemon.journal, daemon.pool
    assert journal is not None and pool is not None
    notify, settle = journal.on_commit, pool.settle

    def broken(created: Any) -> None:
        notify(created)
        raise RuntimeError("consumer bug")

    def broken_settle(started: Any, reserved: Any) -> None:
        settle(started, reserved)
        raise RuntimeError("consumer bug")

    journal.on_commit = broken
    pool.settle = broken_settle  # type: ignore[method-assign]


async def test_a_dead_writer_makes_run_return_nonzero_promptly_with_ports_closed(
    tmp_path: Path, run_daemon: Any
) -> None:
    """When the journal writer dies, ``Daemon.run()`` returns 1 within seconds, both ports
    closed, instead of serving on with a journal nothing can write to."""
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg, on_wired=[_kill_writer_on_commit])
    receiver, admin = running.daemon.bound.receiver, running.daemon.bound.admin
    status, _ = await running.post("/hooks/a", b'{"n": 1}', headers=JSON)
    assert status == 202  # committed before the consumer failed: a true answer
    async with asyncio.timeout(10):
        assert await running.task == 1
    assert refused(receiver) and refused(admin)


async def test_a_dead_dispatcher_ends_the_daemon_with_its_ports_closed(
    tmp_path: Path, run_daemon: Any
) -> None:
    """A dispatcher that cannot read the journal (its jobs table is gone) ends the daemon:
    ``run()`` returns 1 within seconds and nothing listens any more."""
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    receiver, admin = running.daemon.bound.receiver, running.daemon.bound.admin
    with contextlib.closing(sqlite3.connect(cfg.journal.path)) as db:
        db.execute("DROP TABLE jobs")
    async with asyncio.timeout(10):
        assert await running.task == 1
    assert refused(receiver) and refused(admin)


async def test_a_read_error_in_pruning_skips_the_round_and_the_daemon_goes_on(
    tmp_path: Path, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention whose scan fails on the reader logs and tries again next round; the daemon
    keeps taking webhooks and running their jobs."""
    cfg = make_config(
        tmp_path, '[[sources.a.actions]]\ntype = "log"', journal="prune_interval_s = 0.05"
    )
    running: Running = await run_daemon(cfg)
    with contextlib.closing(sqlite3.connect(cfg.journal.path)) as db:
        # Pruning's read names this index (INDEXED BY), as only the dashboard's series does
        # besides: without it that read fails, and nothing else the daemon does here.
        db.execute("DROP INDEX events_received")

    async def skipped_twice() -> bool:
        return sum("retention skipped" in r.getMessage() for r in caplog.records) >= 2

    await poll(skipped_twice, timeout_s=10)
    assert not running.task.done()
    status, doc = await running.post("/hooks/a", b'{"after": 1}', headers=JSON)
    assert status == 202
    journal = running.daemon.journal
    assert journal is not None

    async def done() -> bool:
        return [str(j.state) for j in (await journal.get_event(doc["id"])).jobs] == ["done"]

    await poll(done, timeout_s=10)
    assert await running.stop() == 0


async def test_readyz_names_a_dead_writer(tmp_path: Path) -> None:
    """While a dead writer lasts, ``/readyz`` answers 503 and names the journal writer."""
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    async with Journal(cfg.journal.path) as journal:
        pool = WorkerPool(config=cfg, journal=journal, actions={}, boot_id="boot")
        ctx = AdminContext(cfg, journal, pool, IntakeState(), "boot", time.time())
        runner = web.AppRunner(Admin(ctx).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        try:
            async with aiohttp.ClientSession() as http:
                status, doc = await get_json(http, f"http://{host}:{port}/readyz")
                assert status == 200, doc

                def broken(created: Any) -> None:
                    raise RuntimeError("consumer bug")

                journal.on_commit = broken
                await journal.ingest(_item("a"))
                with pytest.raises(JournalError, match="journal writer"):
                    await journal.watch()
                status, doc = await get_json(http, f"http://{host}:{port}/readyz")
                assert status == 503
                assert doc is not None and doc["ready"] is False
                problems = doc["problems"]
                assert isinstance(problems, list)
                assert any("journal writer stopped" in p for p in problems), doc
        finally:
            await runner.cleanup()


CANCEL_WRITER = """
import asyncio


async def handle(event):
    for task in asyncio.all_tasks():
        if task.get_name() == "journal-writer":
            task.cancel()
    return "writer cancelled"
"""


@pytest.mark.subprocess
async def test_a_real_daemon_whose_writer_dies_exits_nonzero_within_seconds(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """A ``webhookd serve`` whose journal writer stops (here: in-process code cancels it)
    exits non-zero within seconds with one fatal line, ports closed, not half alive."""
    (tmp_path / "rogue.py").write_text(CANCEL_WRITER, encoding="utf-8")
    body = (
        f'[[sources.a.actions]]\ntype = "python"\nhandler = "rogue:handle"\npath = "{tmp_path}"\n'
    )
    config = write_config(tmp_path / "webhookd.toml", tmp_path / "journal.db", body)
    daemon = await procs.serve(config)
    async with http.post(f"{daemon.url}/hooks/a", data=b"{}", headers=JSON) as r:
        assert r.status == 202
    started = time.monotonic()
    code = await daemon.wait_exit(timeout_s=15)
    assert code != 0, daemon.log
    assert time.monotonic() - started < 10
    fatal = [line for line in daemon.lines if "fatal" in line]
    assert len(fatal) == 1 and "journal writer stopped" in fatal[0], daemon.log
    assert refused(daemon.receiver) and refused(daemon.admin)


# -- a full disk while jobs are finishing ----------------------------------------------------


@dataclass
class SmallDisk:
    """Where the journal lives, and how the test fills and frees its space."""

    directory: Path
    kind: str  # "tmpfs": a real 3 MB file system; "max_page_count": SQLite told not to grow
    filler: Path | None = None

    async def fill(self, journal: Journal) -> None:
        if self.kind == "tmpfs":
            # Leave ~200 KB: a few more webhooks fit, then the file system is full.
            free_bytes = shutil.disk_usage(self.directory).free
            self.filler = self.directory / "filler"
            self.filler.write_bytes(b"\0" * max(free_bytes - 200_000, 0))
        else:
            [(pages,)] = await journal._call(_pragma("page_count"), transaction=False)
            await journal._call(_pragma(f"max_page_count = {pages + 50}"), transaction=False)

    async def free(self, journal: Journal) -> None:
        if self.kind == "tmpfs":
            assert self.filler is not None
            self.filler.unlink()
        else:
            await journal._call(_pragma("max_page_count = 1073741823"), transaction=False)


def _pragma(text: str) -> Callable[[sqlite3.Connection], Any]:
    return lambda conn: conn.execute(f"PRAGMA {text}").fetchall()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 3 MB tmpfs when this process may mount one (root), else SQLite's max_page_count."""
    directory = tmp_path / "disk"
    directory.mkdir()
    mounted = os.geteuid() == 0 and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(directory)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield SmallDisk(directory, "tmpfs" if mounted else "max_page_count")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True, check=False)


async def test_full_disk_while_jobs_finish_is_503s_then_recovers_by_itself(
    small_disk: SmallDisk, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Journal out of space while log jobs finish: every webhook gets a 2xx or a JSON 503 with
    Retry-After (no 500, no dropped connection); once space returns intake and jobs resume,
    one line says so, and every acknowledged event is journaled with its job done."""
    caplog.set_level(logging.INFO, logger="webhookd.journal")
    cfg = make_config(
        small_disk.directory,
        '[[sources.a.actions]]\ntype = "log"',
        server="retry_after_s = 2",
    )
    running: Running = await run_daemon(cfg)
    journal = running.daemon.journal
    assert journal is not None
    acked: list[str] = []
    refusals = 0
    n = 0

    async def post() -> int:
        nonlocal n, refusals
        n += 1
        body = b'{"n": %d, "pad": "%s"}' % (n, b"x" * 20_000)
        async with running.http.post(running.url + "/hooks/a", data=body, headers=JSON) as r:
            doc = await r.json(content_type=None)
            assert r.status in (202, 503), (r.status, doc)
            if r.status == 202:
                acked.append(doc["id"])
            else:
                assert "error" in doc and r.headers["Retry-After"] == "2", (doc, r.headers)
                refusals += 1
            return r.status

    for _ in range(5):
        assert await post() == 202
    await small_disk.fill(journal)
    while refusals < 10:  # jobs of the acknowledged webhooks finish meanwhile
        await post()
        assert n < 1000, "the journal never filled up"
    await small_disk.free(journal)

    async def intake_back() -> bool:
        return await post() == 202

    await poll(intake_back, timeout_s=20)
    for _ in range(5):
        assert await post() == 202

    async def all_done() -> bool:
        for event_id in acked:
            detail = await journal.get_event(event_id)
            if [str(j.state) for j in detail.jobs] != ["done"]:
                return False
        return True

    await poll(all_done, timeout_s=30, interval_s=0.2)
    assert running.daemon.journal.writer_problem is None
    assert await running.stop() == 0
    again = [r.getMessage() for r in caplog.records if "journal writes succeed again" in r.message]
    assert len(again) == 1 and "(the last failure: " in again[0], again


async def test_a_port_already_taken_is_one_fatal_line_in_the_systems_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The line read "fatal: OSError: cannot listen on ... (admin): error while attempting to
    bind on address ('127.0.0.1', N): address already in use", aiohttp's sentence inside
    webhookd's; it now says the address once and the reason in the system's words."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = make_config(tmp_path)
        admin = dataclasses.replace(cfg.admin, listen=parse_listen(f"127.0.0.1:{port}", "x"))
        assert await Daemon(dataclasses.replace(cfg, admin=admin), install_signals=False).run() == 1
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fatal: ")]
    assert said == [f"fatal: cannot listen on 127.0.0.1:{port} (admin): Address already in use"]
