"""A SQLite journal whose file is removed or replaced while the daemon has it open.

SQLite would go on committing into the unlinked file, and the daemon answering 202 for each,
until the exit took every commit with it. These tests remove the journal's folder (as ``rm -rf``
or a cleaner of ``/tmp`` does), its file alone, or put another file at its path, and check that
from the moment the daemon sees it nothing more is acknowledged, that every webhook it did
acknowledge is in the file written back (or beside another file, never over it), and that the
daemon exits 1 with one line saying where the contents went.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Running, make_config
from procs import Procs, Target, get_json, poll, write_config

import webhookd.journal as journal_module
from webhookd.errors import JournalError, JournalUnavailable
from webhookd.journal import Journal, NewEvent, NewJob
from webhookd.models import Event, Priority, new_event_id, new_job_id

pytestmark = pytest.mark.timeout(60)

JSON = {"Content-Type": "application/json"}
REMOVED_LINE = r"journal .* was removed while open: its contents"


def new_item(n: int) -> NewEvent:
    event_id = new_event_id()
    event = Event(
        id=event_id,
        source="shop",
        received_at=1_700_000_000.0 + n,
        dedup_key=f"shop:{event_id}",
        tenant="",
        priority=Priority.NORMAL,
        headers=(("Content-Type", "application/json"),),
        body=json.dumps({"n": n}).encode(),
    )
    return NewEvent(event, (NewJob(new_job_id(), "forward", "forward", 3),))


def event_ids(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {row[0] for row in db.execute("SELECT id FROM events")}


def beside(path: Path, suffix: str) -> bool:
    """Whether ``<path><suffix>`` is there (``-wal``, ``-shm``)."""
    return os.path.lexists(f"{path}{suffix}")


def saved_copy(path: Path) -> Path:
    """The one ``<name>.saved-<time>`` beside ``path``."""
    [saved] = path.parent.glob(f"{path.name}.saved-*")
    return saved


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def quick_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal looks at its path every 10 ms instead of every second."""
    monkeypatch.setattr(journal_module, "PATH_CHECK_S", 0.01)


@contextlib.asynccontextmanager
async def watched(journal: Journal) -> AsyncIterator[asyncio.Task[None]]:
    """``journal.watch()`` running, as the daemon runs it, for the block."""
    task = asyncio.create_task(journal.watch())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, JournalError):
            await task


async def ingest_all(journal: Journal, count: int, start: int = 0) -> set[str]:
    return {(await journal.ingest(new_item(start + i))).event_id for i in range(count)}


async def test_a_journal_whose_folder_is_removed_refuses_writes_and_is_written_back_whole(
    tmp_path: Path, quick_checks: None
) -> None:
    """``rm -rf`` of the journal's folder: the commits SQLite still takes into the unlinked
    file are acknowledged as before until the watch sees it; from then on every write is
    refused, and the file is written back at its path (folders made 0700, the file 0600)
    with every event acknowledged, after the removal too."""
    path = tmp_path / "state" / "journal" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 20)
        shutil.rmtree(tmp_path / "state")
        # Not seen yet (no watch runs): SQLite commits into the unlinked file.
        acked |= await ingest_all(journal, 5, start=20)
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match="was removed while open") as caught:
                await watch
        said = str(caught.value)
        assert f"written back to {path};" in said
        assert "exiting so that the next start opens it" in said
        with pytest.raises(JournalUnavailable, match="was removed while open"):
            await journal.ingest(new_item(99))
        with pytest.raises(JournalUnavailable, match="was removed while open"):
            await journal.claim(["job_x"], "boot")
        assert journal.writer_problem is not None and "removed" in journal.writer_problem
    finally:
        await journal.close()
    assert event_ids(path) == acked
    for folder in (tmp_path / "state", tmp_path / "state" / "journal"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The daemon's next start on it.
    async with Journal(path, serving=True) as again:
        assert {e.id for e in await again.list_events(limit=100)} == acked


async def test_a_journal_whose_file_alone_is_removed_gets_it_back_without_its_old_wal(
    tmp_path: Path, quick_checks: None
) -> None:
    """``rm webhookd.db``, its ``-wal`` and ``-shm`` left under their names: those are the
    removed file's own, gone once the copy is written back, so that SQLite never replays
    them into it."""
    path = tmp_path / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 10)
        path.unlink()
        assert beside(path, "-wal")
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match=f"written back to {path};"):
                await watch
    finally:
        await journal.close()
    assert not beside(path, "-wal") and not beside(path, "-shm")
    assert event_ids(path) == acked


async def test_a_symlink_to_the_journal_removed_leaves_the_file_it_named_whole(
    tmp_path: Path, quick_checks: None
) -> None:
    """The journal's path a symlink, and the symlink removed: the next start would begin a
    new journal there, so the contents are written back at the path; the file the link named
    keeps its -wal (without it, commits not yet copied into it would be lost from it)."""
    real = tmp_path / "data" / "webhookd.db"
    real.parent.mkdir()
    path = tmp_path / "webhookd.db"
    path.symlink_to(real)
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 10)
        path.unlink()
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match=f"written back to {path};"):
                await watch
        assert beside(real, "-wal") and beside(real, "-shm")
    finally:
        await journal.close()
    assert not path.is_symlink() and event_ids(path) == acked
    assert event_ids(real) == acked


async def test_a_journal_replaced_by_another_file_is_saved_beside_it_and_leaves_it_alone(
    tmp_path: Path, quick_checks: None
) -> None:
    """A file put at the journal's path (here another SQLite file renamed over it) is never
    overwritten: the contents go to ``<name>.saved-<UTC time>``, and the -wal left under the
    journal's name, which SQLite would replay into the new file, goes."""
    path = tmp_path / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 10)
        other = tmp_path / "other.db"
        with contextlib.closing(sqlite3.connect(other)) as db:
            db.execute("CREATE TABLE theirs(x)")
            db.execute("INSERT INTO theirs VALUES (1)")
            db.commit()
        os.replace(other, path)
        theirs = digest(path)
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match="was replaced while open") as caught:
                await watch
        with pytest.raises(JournalUnavailable):
            await journal.ingest(new_item(99))
    finally:
        await journal.close()
    saved = saved_copy(path)
    assert f"were saved to {saved} (another file is there now, left as it is)" in str(caught.value)
    assert f"`webhookd restore {saved}`" in str(caught.value)
    assert digest(path) == theirs
    assert not beside(path, "-wal")
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT x FROM theirs").fetchall() == [(1,)]
    assert event_ids(saved) == acked
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600


async def test_a_journal_that_cannot_be_saved_still_refuses_writes_and_says_so(
    tmp_path: Path, quick_checks: None
) -> None:
    """Its folder removed and a file put where that folder was: nothing can be written
    there. Every write is refused all the same, and the line says the contents were lost."""
    path = tmp_path / "state" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        await ingest_all(journal, 3)
        shutil.rmtree(tmp_path / "state")
        (tmp_path / "state").write_text("not a folder")
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match="saving its contents failed") as caught:
                await watch
        assert "Not a directory" in str(caught.value)
        assert "the next start begins a new journal there" in str(caught.value)
        with pytest.raises(JournalUnavailable):
            await journal.ingest(new_item(99))
    finally:
        await journal.close()
    assert (tmp_path / "state").read_text() == "not a folder"


async def test_a_stop_while_the_contents_are_saved_still_ends_in_the_error(
    tmp_path: Path,
) -> None:
    """A stop asked for just as the save begins (the watch cancelled before it could say
    anything): the close finishes the save and raises the same line, so the exit is still
    non-zero and says where the contents went."""
    path = tmp_path / "j" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    acked = await ingest_all(journal, 5)
    shutil.rmtree(tmp_path / "j")
    journal._save("removed")  # what the watch does once it sees it, before it is cancelled
    with pytest.raises(JournalError, match=f"written back to {path};"):
        await journal.close()
    assert event_ids(path) == acked


async def test_intake_answers_503_and_readyz_says_why_from_the_moment_the_removal_is_seen(
    tmp_path: Path,
    run_daemon: Any,
    quick_checks: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the contents are being saved (held here until the test has looked), every
    webhook is answered 503 with ``Retry-After`` and counted, and ``/readyz`` is not ready and
    says why; then the daemon ends with exit status 1 and one fatal line, and the file written
    back holds every webhook answered 202."""
    began, held = threading.Event(), threading.Event()
    save_open = journal_module.save_open

    def held_save(*args: Any) -> Any:
        began.set()
        held.wait(30)
        return save_open(*args)

    monkeypatch.setattr(journal_module, "save_open", held_save)
    cfg = make_config(tmp_path / "state", '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    acked = []
    try:
        for n in range(3):
            status, doc = await running.post("/hooks/a", json.dumps({"n": n}), headers=JSON)
            assert status == 202
            acked.append(doc["id"])
        shutil.rmtree(tmp_path / "state")

        async def refused() -> bool:
            status, doc = await running.post("/hooks/a", b"{}", headers=JSON)
            if status == 202:
                acked.append(doc["id"])
                return False
            assert (status, doc) == (503, {"error": "journal unavailable, retry later"})
            return True

        await poll(refused, timeout_s=10)
        assert began.wait(10)
        async with running.http.post(running.url + "/hooks/a", data=b"{}", headers=JSON) as r:
            assert r.status == 503 and r.headers["Retry-After"]
        status, ready = await get_json(running.http, f"{running.admin_url}/readyz")
        assert status == 503 and ready is not None, ready
        problems = ready["problems"]
        assert isinstance(problems, list)
        assert any(f"journal {cfg.journal.path} was removed while open" in p for p in problems)
        async with running.http.get(f"{running.admin_url}/metrics") as r:
            metrics = await r.text()
        assert 'webhookd_intake_unavailable_total{reason="journal_unavailable"} 2.0' in metrics
    finally:
        held.set()
    assert await running.task == 1
    fatal = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(fatal) == 1 and fatal[0].startswith("fatal: journal "), fatal
    assert f"written back to {cfg.journal.path};" in fatal[0]
    assert event_ids(cfg.journal.path) == set(acked)


# -- a real daemon -----------------------------------------------------------------------------


def forward_source(name: str, url: str) -> str:
    return f"""
[sources.{name}]
[[sources.{name}.actions]]
type = "forward"
url = "{url}"
"""


async def post(http: aiohttp.ClientSession, url: str, n: int) -> tuple[int, str | None]:
    async with http.post(url, data=json.dumps({"n": n}), headers=JSON) as r:
        doc = await r.json(content_type=None)
        return r.status, doc.get("id")


async def listed(procs: Procs, cfg: Path) -> set[str]:
    out = await procs.cli("events", "--json", "--limit", "1000", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    return {json.loads(line)["id"] for line in out.stdout.splitlines()}


@pytest.mark.slow
@pytest.mark.subprocess
async def test_serve_whose_journal_folder_is_removed_stops_acking_writes_it_back_and_exits_1(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """``rm -rf`` of the journal's folder under a running ``webhookd serve``, its jobs held
    running at the target: within a second every webhook is answered 503, the journal is
    written back at its path with every webhook answered 202 (after the removal too), one line
    says so, the daemon exits 1, and the next start runs the jobs again."""
    journal = tmp_path / "state" / "webhookd.db"
    cfg = write_config(
        tmp_path / "webhookd.toml", journal, forward_source("shop", f"{downstream.url}/hook")
    )
    daemon = await procs.serve(cfg)
    await daemon.wait_said(rf"journal {journal}: created \(no journal at that path\)")
    downstream.delay_s = 60.0  # each job runs until the target is released
    url = f"{daemon.url}/hooks/shop"
    acked: list[str] = []
    for n in range(5):
        status, event_id = await post(http, url, n)
        assert status == 202 and event_id is not None
        acked.append(event_id)
    await downstream.wait_for(lambda: len(downstream.arrivals) == 5)

    shutil.rmtree(tmp_path / "state")
    refused: list[int] = []  # 503, or 0 for no answer (the daemon gone)

    async def one_refused() -> bool:
        try:
            status, event_id = await post(http, url, len(acked) + len(refused))
        except aiohttp.ClientConnectionError:
            status, event_id = 0, None
        if status == 202:
            assert not refused, f"a webhook acknowledged after one was refused ({refused})"
            assert event_id is not None
            acked.append(event_id)
        else:
            assert status in (503, 0), status
            refused.append(status)
        return len(refused) >= 3

    # One webhook at a time, until three are refused: 202 until the removal is seen (within a
    # second), then never again.
    await poll(one_refused, timeout_s=10, interval_s=0.01)
    assert await daemon.wait_exit() == 1, daemon.log
    [line] = [line for line in daemon.lines if "was removed while open" in line]
    assert "fatal:" in line and f"written back to {journal};" in line, daemon.log
    # Nothing else is said above info: the jobs cut off, the claims refused, are the line's.
    assert [x for x in daemon.lines if re.search(r"Z (warning|error) ", x)] == [line], daemon.log
    assert "stopped cleanly" not in daemon.log and "Traceback" not in daemon.log
    assert journal.is_file()
    assert await listed(procs, cfg) == set(acked)

    downstream.delay_s = 0.0
    downstream.release.set()
    before = len(downstream.arrivals)
    again = await procs.serve(cfg)
    assert not any("created" in line for line in again.lines), again.log
    recovered = await again.wait_said(r"recovered \d+ interrupted job\(s\)")
    assert int(recovered.split("recovered ")[1].split()[0]) >= 5, recovered
    # Those held at the target run again, the others for the first time.
    await downstream.wait_for(
        lambda: set(acked) <= {d.event_id for d in downstream.arrivals[before:]}
    )
    again.signal(15)
    assert await again.wait_exit() == 0, again.log


@pytest.mark.slow
@pytest.mark.subprocess
async def test_serve_whose_journal_is_replaced_saves_it_beside_the_new_file_and_exits_1(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """Another SQLite file put at the journal's path while ``webhookd serve`` runs: the
    contents go to ``<name>.saved-<UTC time>``, the file at the path is left byte for byte as
    it was put there, and the daemon exits 1 saying both."""
    journal = tmp_path / "webhookd.db"
    cfg = write_config(
        tmp_path / "webhookd.toml", journal, forward_source("shop", f"{downstream.url}/hook")
    )
    daemon = await procs.serve(cfg)
    url = f"{daemon.url}/hooks/shop"
    acked = []
    for n in range(5):
        status, event_id = await post(http, url, n)
        assert status == 202
        acked.append(event_id)
    fresh = tmp_path / "fresh.db"
    with contextlib.closing(sqlite3.connect(fresh)) as db:
        db.execute("CREATE TABLE mine(x)")
        db.commit()
    os.replace(fresh, journal)
    put = digest(journal)
    assert await daemon.wait_exit() == 1, daemon.log
    saved = saved_copy(journal)
    [line] = [line for line in daemon.lines if "was replaced while open" in line]
    assert f"were saved to {saved} (another file is there now, left as it is)" in line
    assert digest(journal) == put
    assert not beside(journal, "-wal")
    assert event_ids(saved) == set(acked)
