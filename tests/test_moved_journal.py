"""A SQLite journal whose file is removed or replaced while the daemon has it open.

SQLite would go on committing into the unlinked file, and the daemon answering 202 for each,
until the exit took every commit with it. These tests remove the journal's folder (as ``rm -rf``
or a cleaner of ``/tmp`` does), its file alone, or put another file at its path, and check that
from the moment the daemon sees it nothing more is acknowledged, that every webhook it did
acknowledge is in the file written back (or beside another file, never over it), and that the
daemon exits 1 with one line saying where the contents went. A copy that cannot be written (no
room, no folder) is tried again while the daemon stays up refusing writes, since the contents
are then held by nothing but the process, and a stop meanwhile makes one last try.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Running, make_config
from procs import DaemonProc, Procs, Target, get_json, poll, settled_event, write_config
from test_backup import small_disk

import webhookd.journal.saving as saving
from webhookd.errors import JournalError, JournalUnavailable
from webhookd.journal import Journal, NewEvent, NewJob
from webhookd.models import Event, Priority, new_event_id, new_job_id
from webhookd.process import STOP_MARGIN_S

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
    monkeypatch.setattr(saving, "PATH_CHECK_S", 0.01)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy that failed is tried again after 1 ms instead of 5 s."""
    monkeypatch.setattr(saving, "SAVE_RETRY_S", 0.001)


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Until ``check()`` holds, asked every few milliseconds."""

    async def holds() -> bool:
        return check()

    await poll(holds, timeout_s=timeout_s, interval_s=0.005)


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


async def test_a_journal_whose_wal_alone_is_removed_checkpoints_it_into_the_file_and_exits(
    tmp_path: Path, quick_checks: None
) -> None:
    """``rm webhookd.db-wal`` while the daemon runs: SQLite went on committing into the unlinked
    -wal, unseen, and a crash took every commit not yet checkpointed with it. From the moment
    the watch sees it nothing more is acknowledged, the -wal is checkpointed into the journal
    file, and the watch ends saying so: every acknowledged webhook is in the file alone."""
    path = tmp_path / "webhookd.db"
    wal = tmp_path / "webhookd.db-wal"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 10)
        wal.unlink()
        acked |= await ingest_all(journal, 5, start=10)  # into the unlinked -wal, unseen yet
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match=r"-wal of journal .* removed") as caught:
                async with asyncio.timeout(10):
                    await watch
        said = str(caught.value)
        assert f"were checkpointed into {path};" in said, said
        with pytest.raises(JournalUnavailable, match=r"-wal of journal .* removed while open"):
            await journal.ingest(new_item(99))
        # What a crash would leave: the file alone, without the -wal the daemon has open.
        copy = tmp_path / "after-a-crash.db"
        shutil.copyfile(path, copy)
        assert event_ids(copy) == acked
    finally:
        await journal.close()
    assert event_ids(path) == acked


async def test_a_journal_whose_shm_alone_is_removed_stops_taking_writes_and_exits(
    tmp_path: Path, quick_checks: None
) -> None:
    """``rm webhookd.db-shm`` while the daemon runs: a CLI opening the journal then made a
    -shm of its own, its reads missed the daemon's later commits and its writes were
    overwritten by them, unseen. From the moment the watch sees it nothing more is
    acknowledged, and the watch ends saying why: every acknowledged webhook is in the journal,
    opened afresh."""
    path = tmp_path / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 10)
        (tmp_path / "webhookd.db-shm").unlink()
        acked |= await ingest_all(journal, 5, start=10)
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match=r"-shm of journal .* removed") as caught:
                async with asyncio.timeout(10):
                    await watch
        said = str(caught.value)
        assert "exiting so that the next start opens it with a -shm every process" in said, said
        with pytest.raises(JournalUnavailable, match=r"-shm of journal .* removed while open"):
            await journal.ingest(new_item(99))
    finally:
        await journal.close()
    assert event_ids(path) == acked


async def test_a_stop_right_after_the_shm_is_removed_is_a_clean_one(tmp_path: Path) -> None:
    """A -shm removed just before a stop, unseen by the watch, needs nothing: the next start
    makes one, and the close ends without an error."""
    path = tmp_path / "webhookd.db"
    async with Journal(path, serving=True) as journal:
        acked = await ingest_all(journal, 3)
        (tmp_path / "webhookd.db-shm").unlink()
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


async def test_the_file_a_symlinked_journal_names_removed_is_written_back_through_the_link(
    tmp_path: Path, quick_checks: None
) -> None:
    """journal.path a symlink to a data disk, and the file it names removed: the contents were
    saved beside the link as ``.saved-<time>``, "a file not its own is there" said of a link
    that named nothing, and the next start followed it into a new, empty journal. They go back
    where the link points, for that start to open."""
    real = tmp_path / "data" / "webhookd.db"
    real.parent.mkdir()
    path = tmp_path / "lib" / "webhookd.db"
    path.parent.mkdir()
    path.symlink_to(real)
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 10)
        real.unlink()
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match=f"written back to {real};"):
                await watch
    finally:
        await journal.close()
    assert path.is_symlink() and sorted(os.listdir(path.parent)) == ["webhookd.db"]
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    async with Journal(path, serving=True) as again:
        assert {e.id for e in await again.list_events(limit=100)} == acked


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


async def test_a_copy_that_cannot_be_written_is_tried_again_until_the_folder_is_mended(
    tmp_path: Path,
    quick_checks: None,
    quick_retries: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its folder removed and a file put where that folder was: the copy cannot be written
    there. Every write is refused all the same, the failure is said once, with what to do,
    ``/readyz``'s reason says it, and the copy is tried again and again (the process holds the
    only contents) until the file is moved away: then it is written back."""
    path = tmp_path / "state" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 3)
        shutil.rmtree(tmp_path / "state")
        (tmp_path / "state").write_text("not a folder")
        async with watched(journal) as watch:
            await until(lambda: journal.save_tries >= 3)
            assert not watch.done()
            problem = journal.writer_problem or ""
            assert f"journal {path} was removed while open: writes refused;" in problem
            assert "saving its contents failed (Not a directory" in problem
            assert (
                f"trying again every 0.001s: free space or make {path.parent} writable" in problem
            )
            with pytest.raises(JournalUnavailable, match="was removed while open"):
                await journal.ingest(new_item(99))
            (tmp_path / "state").unlink()  # what the operator does
            with pytest.raises(JournalError, match=f"written back to {path};"):
                await watch
    finally:
        await journal.close()
    assert event_ids(path) == acked
    said, *then = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert said.levelno == logging.ERROR
    assert said.getMessage().startswith(
        f"journal {path} was removed while open, and saving its contents failed (Not a directory"
    )
    # A try under way as the file is moved away may find no folder there at all: said once more.
    for line in then:
        assert line.levelno == logging.WARNING
        assert "saving its contents still fails, now with: No such file" in line.getMessage()
    assert len(then) <= 1
    assert "trying again every 0.001s, every write refused meanwhile" in said.getMessage()
    assert f"make {path.parent} writable" in said.getMessage()
    assert "they are lost if it ends before a copy succeeds" in said.getMessage()


async def test_a_copy_failing_one_way_then_another_says_each_reason_once(
    tmp_path: Path,
    quick_checks: None,
    quick_retries: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disk nearly full may fail one try one way and the next another: the first failure is
    the ERROR line, the other reason one WARNING, and neither is said again at each try."""
    reasons = [errno.ENOSPC, errno.EACCES] * 4
    save_open = saving.save_open

    def flapping(*args: Any) -> Any:
        if reasons:
            code = reasons.pop(0)
            raise OSError(code, os.strerror(code))
        return save_open(*args)

    monkeypatch.setattr(saving, "save_open", flapping)
    path = tmp_path / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        acked = await ingest_all(journal, 3)
        path.unlink()
        async with watched(journal) as watch:
            with pytest.raises(JournalError, match=f"written back to {path};"):
                await watch
    finally:
        await journal.close()
    assert journal.save_tries == 9
    assert event_ids(path) == acked
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert [level for level, _ in said] == [logging.ERROR, logging.WARNING], said
    assert "saving its contents failed (No space left on device)" in said[0][1]
    assert said[1][1].endswith("saving its contents still fails, now with: Permission denied")


async def test_a_stop_while_copies_fail_makes_one_last_try_and_says_the_contents_are_lost(
    tmp_path: Path, quick_checks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while the copy keeps failing, its next try an hour away: the close does not wait
    for it, but tries once more at once; that failing too, the line says the contents are
    lost, and the journal still closes."""
    monkeypatch.setattr(saving, "SAVE_RETRY_S", 3600.0)
    path = tmp_path / "state" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    await ingest_all(journal, 3)
    shutil.rmtree(tmp_path / "state")
    (tmp_path / "state").write_text("not a folder")
    async with watched(journal):
        await until(lambda: journal.save_tries == 1)
    # The watch is cancelled, as the daemon's stop does.
    async with asyncio.timeout(10):
        with pytest.raises(JournalError, match="saving its contents failed") as caught:
            await journal.close()
    assert journal.save_tries == 2
    said = str(caught.value)
    assert "(Not a directory: " in said and "; 2 tries): they are lost with this process" in said
    assert "the next start begins a new journal there" in said
    assert journal._reader is None and journal._thread is None
    assert (tmp_path / "state").read_text() == "not a folder"


async def test_a_stop_before_the_watch_saw_the_removal_writes_the_journal_back(
    tmp_path: Path, quick_checks: None
) -> None:
    """The folder removed, then a stop within the second before the watch's next look: the
    close checkpointed into a file nothing names, and the daemon exited 0 with every
    acknowledged webhook gone. The close looks itself, writes the contents back, and says so."""
    path = tmp_path / "state" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    acked = await ingest_all(journal, 20)
    shutil.rmtree(tmp_path / "state")
    async with asyncio.timeout(10):
        with pytest.raises(JournalError, match="was removed while open"):
            await journal.close()  # no watch ran: as a stop in the same second
    assert event_ids(path) == acked


async def test_a_stop_once_the_folder_is_mended_writes_the_contents_back_with_its_last_try(
    tmp_path: Path, quick_checks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cause of the failures put right, then a stop before the next try: the close's own
    try writes the contents back, and its line says where."""
    monkeypatch.setattr(saving, "SAVE_RETRY_S", 3600.0)
    path = tmp_path / "state" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    acked = await ingest_all(journal, 3)
    shutil.rmtree(tmp_path / "state")
    (tmp_path / "state").write_text("not a folder")
    async with watched(journal):
        await until(lambda: journal.save_tries == 1)
        (tmp_path / "state").unlink()
    async with asyncio.timeout(10):
        with pytest.raises(JournalError, match=f"written back to {path};"):
            await journal.close()
    assert journal.save_tries == 2
    assert event_ids(path) == acked


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


def hold_the_copy(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the copy of a removed journal wait, once begun, until ``held`` is set: (began,
    held)."""
    began, held = threading.Event(), threading.Event()
    save_open = saving.save_open

    def held_save(*args: Any) -> Any:
        began.set()
        held.wait(30)
        return save_open(*args)

    monkeypatch.setattr(saving, "save_open", held_save)
    return began, held


async def test_a_write_queued_as_the_removal_is_seen_is_answered_without_waiting_for_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook queued just before the removal is seen, in the writer's batch with it: its
    commit is answered as it lands, not once the copy (seconds for a big journal, past the
    intake's ack deadline) is done; the copy holds it."""
    began, held = hold_the_copy(monkeypatch)
    path = tmp_path / "j" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        shutil.rmtree(tmp_path / "j")
        queued = journal.submit_ingest(new_item(1))
        journal._save("removed")  # what the watch does once it sees it
        async with asyncio.timeout(10):
            ingested = await queued
        assert not held.is_set()
        assert await asyncio.to_thread(began.wait, 10)
    finally:
        held.set()
        with pytest.raises(JournalError, match=f"written back to {path};"):
            await journal.close()
    assert event_ids(path) == {ingested.event_id}


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
    began, held = hold_the_copy(monkeypatch)
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
        assert await asyncio.to_thread(began.wait, 10)  # not on the loop: the save needs it
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


async def refused_once(running: Running, acked: list[str]) -> None:
    """Post one webhook at a time until one is refused (each answered 202 meanwhile, into the
    file removed but not seen so yet, is ``acked``)."""

    async def refused() -> bool:
        body = json.dumps({"nonce": os.urandom(8).hex()})  # never a duplicate
        status, doc = await running.post("/hooks/a", body, headers=JSON)
        if status == 202:
            acked.append(doc["id"])
            return False
        assert (status, doc) == (503, {"error": "journal unavailable, retry later"})
        return True

    await poll(refused, timeout_s=10)


def no_room(monkeypatch: pytest.MonkeyPatch, room: threading.Event) -> list[int]:
    """Copies that fail as on a full disk until ``room`` is set; the list counts the tries."""
    tries: list[int] = []
    save_open = saving.save_open

    def save(*args: Any) -> Any:
        tries.append(1)
        if not room.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save_open(*args)

    monkeypatch.setattr(saving, "save_open", save)
    return tries


async def test_serve_refuses_writes_while_the_copy_fails_and_exits_1_once_a_try_writes_it_back(
    tmp_path: Path,
    run_daemon: Any,
    quick_checks: None,
    quick_retries: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The copy fails for want of room, again and again: the daemon stays up refusing every
    webhook, ``/readyz`` not ready with the reason, one ERROR line; once there is room, the
    next try writes the journal back and the daemon exits 1 with the usual line."""
    room = threading.Event()
    tries = no_room(monkeypatch, room)
    cfg = make_config(tmp_path / "state", '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    acked = []
    for n in range(3):
        status, doc = await running.post("/hooks/a", json.dumps({"n": n}), headers=JSON)
        assert status == 202
        acked.append(doc["id"])
    shutil.rmtree(tmp_path / "state")
    await refused_once(running, acked)
    await until(lambda: len(tries) >= 5)
    assert not running.task.done()
    status, ready = await get_json(running.http, f"{running.admin_url}/readyz")
    assert status == 503 and ready is not None, ready
    problems = ready["problems"]
    assert isinstance(problems, list)
    assert any(
        "saving its contents failed (No space left on device), trying again every" in p
        for p in problems
    ), problems
    assert await running.post("/hooks/a", b"{}", headers=JSON) == (
        503,
        {"error": "journal unavailable, retry later"},
    )
    room.set()
    assert await running.task == 1
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 2, said
    assert said[0].startswith(
        f"journal {cfg.journal.path} was removed while open, and saving its contents failed"
        " (No space left on device): trying again every 0.001s"
    )
    assert (
        said[1].startswith("fatal: journal ") and f"written back to {cfg.journal.path};" in said[1]
    )
    assert event_ids(cfg.journal.path) == set(acked)


async def test_serve_stopped_while_the_copy_fails_exits_1_within_the_stop_saying_they_are_lost(
    tmp_path: Path,
    run_daemon: Any,
    downstream: Target,
    quick_checks: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop (SIGTERM) while every copy fails, the next try an hour away and a job held
    running at its target: the drain cuts the job off (the journal refuses to take it back,
    said at info: the exit's line tells the rest), the close makes one last try, and the
    daemon exits 1 within the stop's time, its line saying the contents are lost."""
    monkeypatch.setattr(saving, "SAVE_RETRY_S", 3600.0)
    caplog.set_level(logging.INFO, logger="webhookd.workers")
    tries = no_room(monkeypatch, threading.Event())
    downstream.delay_s = 60.0
    cfg = make_config(
        tmp_path / "state",
        forward_source("a", f"{downstream.url}/hook"),
        workers="shutdown_grace_s = 0.2",
    )
    running: Running = await run_daemon(cfg)
    status, _ = await running.post("/hooks/a", b'{"held": true}', headers=JSON)
    assert status == 202
    await downstream.wait_for(lambda: len(downstream.arrivals) == 1)
    acked: list[str] = []
    shutil.rmtree(tmp_path / "state")
    await refused_once(running, acked)
    await until(lambda: len(tries) == 1)
    budget_s = cfg.server.ack_timeout_s + 1 + cfg.workers.shutdown_grace_s + STOP_MARGIN_S
    async with asyncio.timeout(budget_s):
        assert await running.stop() == 1
    assert len(tries) == 2
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 2, said
    assert "saving its contents failed (No space left on device): trying again" in said[0]
    assert said[1].startswith(f"fatal: journal {cfg.journal.path} was removed while open, and")
    assert "(No space left on device; 2 tries): they are lost with this process" in said[1]
    [cut] = [r.getMessage() for r in caplog.records if "not re-queued" in r.getMessage()]
    assert f"not re-queued (journal {cfg.journal.path} was removed while open)" in cut


async def test_a_journals_identity_is_the_file_it_opened_whatever_its_path_names_now(
    tmp_path: Path,
) -> None:
    """``identity`` (what ``webhookd stats`` holds a daemon's ``/stats`` to) is the file the
    journal opened: the same once its path is removed or names another file, with no error;
    one never opened reads it from the path, and says plainly when nothing is there."""
    path = tmp_path / "state" / "webhookd.db"
    journal = Journal(path, serving=True)
    await journal.open()
    try:
        mine = await journal.identity()
        found = path.stat()
        assert mine == f"sqlite:{found.st_dev}:{found.st_ino}"
        shutil.rmtree(tmp_path / "state")
        assert await journal.identity() == mine
        (tmp_path / "state").mkdir()
        async with Journal(path) as other:  # another file at the path now
            assert await other.identity() != mine
        assert await journal.identity() == mine
    finally:
        with pytest.raises(JournalError, match="was replaced while open"):
            await journal.close()  # its contents saved beside the file there now, and said
    assert await Journal(path).identity() != mine  # not opened: what the path names
    with pytest.raises(JournalError, match="No such file or directory"):
        await Journal(tmp_path / "none.db").identity()


async def test_stats_between_the_removal_and_its_sight_answer_200_with_the_file_opened(
    tmp_path: Path,
    run_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The moment between an ``rm -rf`` of the journal's folder and the daemon's next look at
    its path (up to a second; held open here): ``/stats`` answered 500 with a traceback at each
    poll of a dashboard. It answers 200, its ``journal_id`` still the file open, and nothing
    the admin API serves fails or logs an error."""
    monkeypatch.setattr(saving, "PATH_CHECK_S", 3600.0)
    cfg = make_config(tmp_path / "state", '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    status, before = await get_json(running.http, f"{running.admin_url}/stats")
    assert status == 200 and before is not None
    shutil.rmtree(tmp_path / "state")
    status, after = await get_json(running.http, f"{running.admin_url}/stats")
    assert status == 200 and after is not None, after
    assert after["journal_id"] == before["journal_id"]
    assert after["journal_bytes"] == {"db": 0, "wal": 0}  # no file at the path
    for page in ("/readyz", "/stats/series", "/metrics", "/events", "/healthz"):
        async with running.http.get(running.admin_url + page) as r:
            assert r.status in (200, 503), (page, r.status, await r.text())
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


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


# -- a real daemon on a full disk --------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (a disk that really fills up), mounted at the folder returned."""
    with small_disk(tmp_path / "disk", "3m") as disk:
        yield disk


def fill(disk: Path) -> Path:
    """Fill ``disk`` to its last byte with one file, returned: removing it makes room."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)
    return filler


async def serve_on_full_disk(
    tmp_path: Path, disk: Path, procs: Procs, http: aiohttp.ClientSession
) -> tuple[DaemonProc, Path, Path, list[str]]:
    """A daemon whose journal is on ``disk``, five webhooks taken and their jobs done, then the
    disk filled and the journal's folder removed, and the daemon's copy failed once: the
    daemon, its config, the filler and the webhooks acknowledged."""
    journal = disk / "state" / "webhookd.db"
    body = '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'
    cfg = write_config(tmp_path / "webhookd.toml", journal, body)
    daemon = await procs.serve(cfg)
    acked = []
    for n in range(5):
        status, event_id = await post(http, f"{daemon.url}/hooks/shop", n)
        assert status == 202 and event_id is not None
        acked.append(event_id)
    for event_id in acked:  # nothing left to write once the disk is full
        await settled_event(http, daemon.admin_url, event_id)
    filler = fill(disk)
    shutil.rmtree(disk / "state")
    line = await daemon.wait_said("saving its contents failed", timeout_s=10)
    assert re.search(r"Z error ", line), line
    assert f"journal {journal} was removed while open, and saving its contents failed (" in line
    assert "trying again every 5s, every write refused meanwhile" in line
    assert f"make {journal.parent} writable" in line
    status, event_id = await post(http, f"{daemon.url}/hooks/shop", 99)
    assert status == 503 and event_id is None
    status, ready = await get_json(http, f"{daemon.admin_url}/readyz")
    assert status == 503 and ready is not None
    problems = ready["problems"]
    assert isinstance(problems, list)
    assert any("saving its contents failed (" in p for p in problems), problems
    return daemon, cfg, filler, acked


def above_info(daemon: DaemonProc) -> tuple[str, str]:
    """The line saying the copy failed and the exit's fatal line, the only lines above INFO
    but for a reason the copy's failure changed to (said once each, as a full disk may answer
    "database or disk is full" one time and "No space left on device" the next), and the
    start's warning of the small disk these tests fill on purpose."""
    above = [x for x in daemon.lines if re.search(r"Z (warning|error) ", x)]
    small_disk = [x for x in above if re.search(r"Z warning journal: .* MiB free: keep", x)]
    assert len(small_disk) <= 1, daemon.log
    failed, *changed, fatal = [x for x in above if x not in small_disk]
    for line in changed:
        assert "saving its contents still fails, now with:" in line, daemon.log
    return failed, fatal


@pytest.mark.slow
@pytest.mark.subprocess
async def test_serve_on_a_full_disk_keeps_the_removed_journal_until_room_is_made(
    tmp_path: Path, full_disk: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """The journal on a full disk and its folder removed: the copy fails, and the daemon, the
    only holder of the contents, stays up refusing webhooks instead of exiting; once room is
    made, the next try writes the journal back and the daemon exits 1 saying so."""
    daemon, cfg, filler, acked = await serve_on_full_disk(tmp_path, full_disk, procs, http)
    assert daemon.proc.returncode is None
    filler.unlink()
    assert await daemon.wait_exit(timeout_s=20) == 1, daemon.log
    journal = full_disk / "state" / "webhookd.db"
    failed, fatal = above_info(daemon)
    assert "saving its contents failed" in failed
    assert "fatal:" in fatal and f"written back to {journal};" in fatal, daemon.log
    assert "Traceback" not in daemon.log
    assert await listed(procs, cfg) == set(acked)


@pytest.mark.slow
@pytest.mark.subprocess
async def test_serve_stopped_while_its_journal_cannot_be_saved_exits_1_saying_it_is_lost(
    tmp_path: Path, full_disk: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """SIGTERM while the copy keeps failing: one last try, then exit 1 within the stop's time,
    the line saying the contents are lost."""
    daemon, _, _, _ = await serve_on_full_disk(tmp_path, full_disk, procs, http)
    daemon.signal(signal.SIGTERM)
    budget_s = 2 + 1 + 25 + STOP_MARGIN_S  # ack_timeout_s, shutdown_grace_s: the defaults
    assert await daemon.wait_exit(timeout_s=budget_s) == 1, daemon.log
    failed, fatal = above_info(daemon)
    assert "saving its contents failed" in failed
    assert "fatal:" in fatal and "they are lost with this process" in fatal, daemon.log
    assert "database or disk is full" in fatal or "No space left on device" in fatal, fatal
    assert "Traceback" not in daemon.log
