"""SQLite-only journal tests: the file itself (fsync on ack, schema version, permissions).

The behaviour every backend shares is in test_journal_contract.py, run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import pickle
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_support import cli
from procs import AS_NOBODY, held_open, poll, why_not_as_nobody
from test_backup import mount_or_skip, small_disk

import webhookd.journal.changes as changes_module
import webhookd.journal.writer as writer_module
from webhookd.clock import ManualClock
from webhookd.errors import JournalError, JournalUnavailable
from webhookd.journal import (
    _BUSY_TIMEOUT_MS,
    MIGRATIONS,
    WAL_SIZE_LIMIT_BYTES,
    Counts,
    Finished,
    Ingested,
    Journal,
    LaneAction,
    LaneBacklog,
    LaneCall,
    NewEvent,
    NewJob,
    PolledCounts,
    Replayed,
    Series,
    _owner_only,
    _take_serve_lock,
    opened_elsewhere,
    why_unusable,
)
from webhookd.journal.batch import IngestOp, OpQueue, headers_json, insert_rows
from webhookd.journal.polled import MAX_ABANDONED_READS, answer_within
from webhookd.journal.records import CATCH_ALL_SHOWN
from webhookd.journal.schema import BACKLOG_SQL, add_functions
from webhookd.models import Event, JobState, Priority, new_event_id, new_job_id, quick_init


def new_event(
    body: bytes = b'{"a": 1}',
    key: str | None = None,
    source: str = "shop",
    jobs: int = 1,
    received_at: float = 1_700_000_000.0,
    tenant: str = "t1",
) -> NewEvent:
    event = Event(
        id=new_event_id(),
        source=source,
        received_at=received_at,
        dedup_key=key or f"{source}:{new_event_id()}",
        tenant=tenant,
        priority=Priority.NORMAL,
        headers=(("Content-Type", "application/json"), ("X-Thing", "é")),
        body=body,
    )
    return NewEvent(
        event, tuple(NewJob(new_job_id(), f"forward-{i}", "forward", 3) for i in range(jobs))
    )


async def test_sqlite_ingest_is_on_disk_when_acknowledged(tmp_path: Path) -> None:
    """Once ingest returns, another connection (another process) sees the event."""
    path = tmp_path / "j.db"
    async with Journal(path) as journal:
        item = new_event()
        await journal.ingest(item)
        with contextlib.closing(sqlite3.connect(path)) as other, other:
            rows = other.execute("SELECT id FROM events").fetchall()
        assert rows == [(item.event.id,)]


async def test_sqlite_schema_version_is_recorded_and_newer_files_refused(tmp_path: Path) -> None:
    """The file carries its schema version; a file from a newer webhookd is refused clearly."""
    path = tmp_path / "j.db"
    async with Journal(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(JournalError) as err:
        async with Journal(path):
            pass
    assert str(err.value) == (
        f"{path} has schema version {len(MIGRATIONS) + 1}, newer than this webhookd understands"
        f" ({len(MIGRATIONS)}): run the newer webhookd, or `webhookd restore` a backup you"
        " took before the upgrade"
    )


async def test_sqlite_a_schema_upgrade_at_open_is_logged_with_its_versions_and_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a journal of an older schema says so at INFO before the migrations run (an index
    rebuild takes seconds on a large journal) and after, with the time taken; a new journal
    says nothing of upgrades."""
    path = tmp_path / "j.db"
    caplog.set_level(logging.INFO, logger="webhookd.journal")
    async with Journal(path):
        pass
    assert "upgrad" not in caplog.text
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # a journal of the version before
        add_functions(conn)
        for migration in MIGRATIONS[:-1]:
            conn.executescript(migration)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) - 1}")
        conn.commit()
    async with Journal(path, serving=True):
        pass
    upgrades = [r.getMessage() for r in caplog.records if "upgrad" in r.getMessage()]
    latest = len(MIGRATIONS)
    assert len(upgrades) == 2
    assert f"{path}: upgrading its schema from version {latest - 1} to {latest}" in upgrades[0]
    assert re.search(rf"{path}: schema upgraded to version {latest} in \d+\.\d s", upgrades[1])


def journal_of_the_version_before(path: Path, version: int = len(MIGRATIONS) - 1) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        add_functions(conn)
        for migration in MIGRATIONS[:version]:
            conn.executescript(migration)
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()


async def test_sqlite_a_process_that_upgraded_the_journal_still_holds_it_open(
    tmp_path: Path,
) -> None:
    """Looking for an older daemon before an upgrade must not drop this process's own hold on
    the journal: closing any descriptor of the ``-shm`` file releases SQLite's locks on it, and
    the next process to open the journal would take itself for the first and rebuild the
    shared index under this one's writer (a bus error, or worse)."""
    path = tmp_path / "old.db"
    journal_of_the_version_before(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
    probe = "import sys; from webhookd.journal import opened_elsewhere as o; print(o(sys.argv[1]))"
    async with Journal(path, serving=True):
        asked = await asyncio.create_subprocess_exec(
            sys.executable, "-c", probe, str(path), stdout=asyncio.subprocess.PIPE
        )
        seen, _ = await asked.communicate()
    assert seen.decode().strip() == f"process {os.getpid()}"


async def test_sqlite_the_upgrade_that_adds_behind_marks_the_jobs_queued_behind_a_head(
    tmp_path: Path,
) -> None:
    """A journal of the version before, with three jobs of one key queued (the first in
    backoff) and one without a key: the upgrade (its triggers' bodies hold semicolons of their
    own) marks the two behind the head, so the first refill after it leaves them unread."""
    path = tmp_path / "old.db"
    journal_of_the_version_before(path, version=9)  # the one before ``behind``
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executemany(
            "INSERT INTO jobs (id, event_id, source, action, type, state, priority, tenant,"
            " order_key, run_at, max_attempts) VALUES (?, 'e', 'shop', 'a', 'log', 'queued',"
            " 1, 't1', ?, ?, 3)",
            [("j1", "k", 1e9 + 60), ("j2", "k", 1e9), ("j3", "k", 1e9), ("j4", None, 1e9)],
        )
        conn.commit()
    async with Journal(path, serving=True) as journal:
        lane = (int(Priority.NORMAL), "shop", "t1")
        assert [r.id for r in await journal.ready_in_lanes(1e9, [(lane, 5)])] == ["j4"]
    with contextlib.closing(sqlite3.connect(path)) as conn:
        marked = {r[0] for r in conn.execute("SELECT id FROM jobs WHERE behind IS NOT NULL")}
    assert marked == {"j2", "j3"}


async def test_ready_in_lanes_compiles_a_few_statement_sizes_whatever_the_lane_count(
    tmp_path: Path,
) -> None:
    """Each lane count was a statement of its own in the reader's cache (128 of up to 200
    parts: 88 MB more RSS after one of each count from 1 to 200 with 2,000 tenants). Counts
    are padded to a few sizes with parts that read nothing; each lane still gets its jobs."""
    async with Journal(tmp_path / "j.db", serving=True) as journal:
        items = [new_event(tenant=f"t{n}") for n in range(200)]
        for item in items:
            await journal.ingest(item)
        lanes = [(int(Priority.NORMAL), "shop", f"t{n}") for n in range(200)]
        parts: set[int] = set()
        await journal.reader.set_trace_callback(lambda sql: parts.add(sql.count(" UNION ALL ")))
        for n in range(1, 201):
            ready = await journal.ready_in_lanes(2e9, [(lane, 5) for lane in lanes[:n]])
            assert sorted(r.tenant for r in ready) == sorted(f"t{i}" for i in range(n))
        await journal.reader.set_trace_callback(None)
    assert sorted(parts) == [0, 1, 3, 7, 15, 31, 63, 127, 199]


async def test_sqlite_events_from_before_the_query_column_read_as_having_none(
    tmp_path: Path,
) -> None:
    """An event and its queued job journaled by the version before ``events.query``: after the
    upgrade its page and the claim of its job read its query as ``""``, and a new event keeps
    its own."""
    path = tmp_path / "old.db"
    journal_of_the_version_before(path, version=11)  # the one before ``query``
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            "INSERT INTO events (id, source, received_at, dedup_key, tenant, priority, headers,"
            " body) VALUES ('evt_old', 'shop', 1e9, 'shop:k', '', 1, '[]', X'7B7D')"
        )
        conn.execute(
            "INSERT INTO jobs (id, event_id, source, action, type, state, priority, tenant,"
            " run_at, max_attempts) VALUES ('job_old', 'evt_old', 'shop', 'a', 'log', 'queued',"
            " 1, '', 1e9, 3)"
        )
        conn.commit()
    async with Journal(path, serving=True) as journal:
        assert (await journal.get_event("evt_old")).event.query == ""
        [claimed] = await journal.claim(["job_old"], "b")
        assert (claimed.event.id, claimed.event.query) == ("evt_old", "")
        item = new_event(jobs=0)
        await journal.ingest(NewEvent(dataclasses.replace(item.event, query="store=eu"), ()))
        assert (await journal.get_event(item.event.id)).event.query == "store=eu"


async def test_only_a_daemon_upgrades_a_journal(tmp_path: Path) -> None:
    """A verb of a newer webhookd on a journal of the older schema would change the tables
    under a daemon of the older webhookd, or bring a restored backup forward before the older
    version is back: it is refused, saying to start the daemon, and the schema is left as it
    was, with no daemon running as with one. The daemon upgrades it as it starts."""
    path = tmp_path / "old.db"
    journal_of_the_version_before(path)
    latest = len(MIGRATIONS)
    daemon = _take_serve_lock(path)  # an older `webhookd serve` running on it
    try:
        with pytest.raises(JournalError, match="start `webhookd serve` of this webhookd on it"):
            await Journal(path).open()
    finally:
        os.close(daemon)
    with pytest.raises(JournalError, match=f"schema version {latest - 1}, this webhookd's is"):
        await Journal(path).open()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest - 1
    async with Journal(path, serving=True):
        pass
    async with Journal(path):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest


async def test_a_cli_verb_on_an_older_journal_says_to_start_the_daemon(tmp_path: Path) -> None:
    """One line and exit 1, the journal untouched; after the daemon's start the verb works."""
    path = tmp_path / "old.db"
    journal_of_the_version_before(path)
    config = tmp_path / "webhookd.toml"
    config.write_text(f"[journal]\npath = {json.dumps(str(path))}\n")
    latest = len(MIGRATIONS)
    first = await cli("events", "--config", str(config))
    assert first.exit_code == 1
    assert first.output.strip().splitlines() == [
        f"webhookd: error: {path} has schema version {latest - 1}, this webhookd's is {latest}:"
        " start `webhookd serve` of this webhookd on it (it upgrades the journal as it starts),"
        " then run this again"
    ]
    async with Journal(path, serving=True):
        pass
    again = await cli("events", "--config", str(config))
    assert again.exit_code == 0, again.output
    assert "upgrad" not in again.output


@pytest.mark.parametrize("serving", [False, True], ids=["cli", "serve"])
async def test_no_schema_is_upgraded_under_a_process_that_has_the_journal_open(
    tmp_path: Path, serving: bool
) -> None:
    """A daemon of a webhookd from before the serve lock takes none, so the lock cannot tell of
    it; upgrading the tables under it would fail all its writes, and a second daemon would run
    its jobs again. SQLite's own lock on the -shm file tells of every process that has the
    journal open: a CLI verb and a starting daemon both refuse, naming its pid, and change
    nothing; once it is gone the daemon upgrades it."""
    path = tmp_path / "old.db"
    journal_of_the_version_before(path)
    with held_open(path) as pid:
        with pytest.raises(JournalError, match=f"process {pid} has it open") as err:
            await Journal(path, serving=serving).open()
        assert "stop it before this webhookd upgrades the journal" in str(err.value)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) - 1
    async with Journal(path, serving=True):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


@pytest.mark.parametrize("serving", [False, True], ids=["cli", "serve"])
async def test_an_upgrade_refused_for_a_process_that_has_the_journal_open_names_its_command(
    tmp_path: Path, serving: bool
) -> None:
    """The refusal named the holder's pid and guessed "a daemon of the older webhookd?", which
    sent the operator looking for an old daemon when it was an `events --follow` or an sqlite3
    shell: it is named by its command line, as a refused restore names it."""
    path = tmp_path / "old.db"
    journal_of_the_version_before(path)
    with held_open(path) as pid, pytest.raises(JournalError) as err:
        await Journal(path, serving=serving).open()
    said = str(err.value)
    assert f"process {pid} has it open (`{sys.executable} -c " in said, said
    assert said.endswith("`): stop it before this webhookd upgrades the journal"), said
    assert "older webhookd?" not in said


def test_a_holder_in_another_pid_namespace_is_still_seen(tmp_path: Path) -> None:
    """Seen from a container, a process outside it has pid 0 in the kernel's answer: it still
    has the journal open, and is named as a process of another PID namespace."""
    try:
        subprocess.run(["unshare", "--pid", "--fork", "true"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("making a PID namespace takes unshare(1) and root")
    path = tmp_path / "journal.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
    probe = "import sys; from webhookd.journal import opened_elsewhere as o; print(o(sys.argv[1]))"
    with held_open(path) as pid:
        here = opened_elsewhere(path)
        inside = subprocess.run(
            ["unshare", "--pid", "--fork", sys.executable, "-c", probe, str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    assert here == f"process {pid}"
    assert inside == "a process in another PID namespace (a container?)"
    assert opened_elsewhere(path) is None


def another_programs_database(
    path: Path, *, wal: bool = False, version: int = 0
) -> sqlite3.Connection | None:
    """A SQLite file of another program's at ``path``: a table of its own, a row in it, no
    webhookd schema, ``application_id`` 0 and ``user_version`` ``version`` (a program that
    numbers its own migrations so). With ``wal``, in WAL mode and still open (returned): its
    table is only in its -wal, the file's header says nothing yet."""
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute("INSERT INTO notes (text) VALUES ('mine')")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    if wal:
        return conn
    conn.close()
    path.chmod(0o644)  # read by its own program's users: left so
    return None


@pytest.mark.parametrize("version", [0, 3], ids=["version0", "version3"])
@pytest.mark.parametrize("serving", [False, True], ids=["cli", "serve"])
async def test_a_database_of_another_program_is_refused_and_left_as_it_is(
    tmp_path: Path, serving: bool, version: int
) -> None:
    """A journal.path that names another program's SQLite file had webhookd's whole schema made
    in it, beside its own tables, by serve and by any verb. Both refuse it in one line naming
    it, and write nothing in it or beside it: not its mode, not a -wal, not a lock file. One
    that sets ``user_version`` for its own migrations was taken for an older journal: serve
    ran webhookd's later migrations in it, a verb asked for serve to upgrade it."""
    path = tmp_path / "other.db"
    another_programs_database(path, version=version)
    before = (path.read_bytes(), path.stat().st_mode, sorted(os.listdir(tmp_path)))
    with pytest.raises(JournalError) as err:
        await Journal(path, serving=serving).open()
    assert str(err.value).startswith(
        f"{path} holds a database that is not a webhookd journal (tables of its own, none of"
        " webhookd's)"
    )
    assert (path.read_bytes(), path.stat().st_mode, sorted(os.listdir(tmp_path))) == before


async def test_a_database_of_another_program_in_wal_mode_is_refused_while_it_has_it_open(
    tmp_path: Path,
) -> None:
    """Its tables still only in its -wal (the program runs), it is refused all the same: the
    journal reads it through the -wal, and changes none of it."""
    path = tmp_path / "other.db"
    conn = another_programs_database(path, wal=True)
    assert conn is not None
    with contextlib.closing(conn):
        with pytest.raises(JournalError, match="holds a database that is not a webhookd journal"):
            await Journal(path, serving=True).open()
        assert conn.execute("SELECT name FROM sqlite_schema").fetchall() == [("notes",)]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0


async def test_serve_makes_its_journal_in_an_empty_database(tmp_path: Path) -> None:
    """An empty database (a SQLite file with no table yet) is no other program's: the daemon
    makes its journal in it, as in a new file."""
    path = tmp_path / "webhookd.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 0")  # writes the header: a page, no table
        conn.commit()
    assert path.stat().st_size > 0
    async with Journal(path, serving=True) as journal:
        await journal.ingest(new_event())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1


async def test_a_second_daemon_through_a_symlink_meets_the_first_ones_lock(
    tmp_path: Path,
) -> None:
    """The lock is taken beside the file itself: a daemon reaching the journal by another
    path would otherwise recover the first one's running jobs as an earlier boot's."""
    real = tmp_path / "real" / "j.db"
    real.parent.mkdir()
    link = tmp_path / "link.db"
    link.symlink_to(real)
    async with Journal(real, serving=True):
        with pytest.raises(JournalError, match="in use by another webhookd serve"):
            await Journal(link, serving=True).open()


async def test_sqlite_dedup_keys_of_a_journal_from_before_digests_still_hold(
    tmp_path: Path,
) -> None:
    """Migration 8 moves the dedup keys to their digests: a key stored by the schema before is a
    duplicate after the upgrade (naming its event), and pruning still finds it by age."""
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        add_functions(conn)
        for migration in MIGRATIONS[:7]:
            conn.executescript(migration)
        conn.execute("PRAGMA user_version = 7")
        conn.executemany(
            "INSERT INTO dedup(key, event_id, created_at) VALUES (?, ?, ?)",
            [("s:kept", "evt_kept", time.time()), ("s:old", "evt_old", 1.0)],
        )
        conn.commit()
    async with Journal(path, serving=True) as journal:
        now = time.time()
        again = await journal.ingest(new_event(key="s:kept", jobs=0, received_at=now))
        assert again == Ingested("evt_kept", duplicate=True)
        pruned = await journal.prune(keep_done_s=3600, keep_dead_s=3600, keep_dedup_s=3600)
        assert pruned.dedup == 1
        fresh = await journal.ingest(new_event(key="s:old", jobs=0, received_at=now))
        assert fresh.duplicate is False


def test_ids_sort_by_creation() -> None:
    """External ids are sortable strings: later ids compare greater, and never repeat."""
    ids = [new_event_id() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_ids_carry_their_millisecond_and_random_bits() -> None:
    """An id is 26 Crockford base32 characters of (milliseconds << 80 | 80 random bits), so
    ids made by older versions and this one sort together by time."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    before_ms = int(time.time() * 1000)
    ids = [new_event_id()[4:] for _ in range(50)]
    after_ms = int(time.time() * 1000)
    values = []
    for text in ids:
        assert len(text) == 26 and set(text) <= set(alphabet)
        values.append(sum(alphabet.index(c) << (5 * n) for n, c in enumerate(reversed(text))))
    assert all(before_ms <= v >> 80 <= after_ms for v in values)
    # Within one millisecond the random part counts up by one: the order is kept.
    same_ms = [(a, b) for a, b in itertools.pairwise(values) if a >> 80 == b >> 80]
    assert all(b == a + 1 for a, b in same_ms)


async def test_sqlite_journal_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    """The journal and its -wal and -shm are created 0600 under a permissive umask, and a file
    an older version left world-readable is tightened on open: other users cannot read bodies."""
    path = tmp_path / "j.db"
    old_umask = os.umask(0o022)
    try:
        async with Journal(path) as journal:
            await journal.ingest(new_event())
            names = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert {stat.S_IMODE(p.stat().st_mode) for p in names} == {0o600}
        path.chmod(0o644)
        async with Journal(path) as journal:
            await journal.ingest(new_event())
            assert {stat.S_IMODE(p.stat().st_mode) for p in names} == {0o600}
        # What a start on a journal made 0400 leaves: SQLite gives the -shm the journal's mode,
        # and that read-only -shm outlives the journal being made writable again. (Run as root,
        # SQLite mends it itself: the daemon's own user cannot, so the check is on what the
        # journal does before SQLite opens anything.)
        os.close(os.open(f"{path}-shm", os.O_WRONLY | os.O_CREAT, 0o400))
        _owner_only(path)
        assert stat.S_IMODE(os.stat(f"{path}-shm").st_mode) == 0o600
    finally:
        os.umask(old_umask)


async def test_a_journal_created_through_a_symlink_is_readable_by_its_owner_only(
    tmp_path: Path,
) -> None:
    """journal.path a symlink to a data disk whose file the first start makes: the 0600 create
    met the link (O_EXCL), and SQLite made the journal, -wal and -shm with the umask's 0644."""
    real = tmp_path / "data" / "j.db"
    real.parent.mkdir()
    link = tmp_path / "j.db"
    link.symlink_to(real)
    old_umask = os.umask(0o022)
    try:
        async with Journal(link, serving=True) as journal:
            await journal.ingest(new_event())
            names = [real, Path(f"{real}-wal"), Path(f"{real}-shm")]
            assert {stat.S_IMODE(p.stat().st_mode) for p in names} == {0o600}
    finally:
        os.umask(old_umask)
    assert link.is_symlink()


async def test_a_journal_path_naming_a_folder_or_under_a_file_is_refused_and_touches_nothing(
    tmp_path: Path,
) -> None:
    """A path that names a folder (the file name forgotten) is refused before anything is done
    to it: its mode stays as it was, not 0600. One under a file says why, in one line."""
    folder = tmp_path / "lib"
    folder.mkdir(mode=0o755)
    with pytest.raises(JournalError, match="it is a folder, not a file"):
        await Journal(folder).open()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    (tmp_path / "body.json").write_text("{}")
    with pytest.raises(JournalError, match="Not a directory"):
        await Journal(tmp_path / "body.json" / "j.db").open()


async def test_a_journal_path_naming_another_file_is_refused_and_its_mode_left_alone(
    tmp_path: Path,
) -> None:
    """A journal.path that names some other file by mistake (/etc/hosts, say) is refused as not
    a database without being made 0600 first: other users go on reading it."""
    other = tmp_path / "hosts"
    other.write_text("127.0.0.1 localhost\n")
    other.chmod(0o644)
    with pytest.raises(JournalError, match="not a database"):
        await Journal(other).open()
    assert stat.S_IMODE(other.stat().st_mode) == 0o644
    assert other.read_text() == "127.0.0.1 localhost\n"


async def test_a_cli_journal_closing_beside_a_long_read_does_not_hold_up_the_daemons_commits(
    tmp_path: Path,
) -> None:
    """A CLI command's journal closes without a WAL checkpoint of its own: a TRUNCATE there would
    hold the write lock while it waited (up to the busy timeout) for any reader to finish, a
    dashboard's count or another CLI command, and the daemon's ingests would wait behind it."""
    path = tmp_path / "j.db"
    bound_s = _BUSY_TIMEOUT_MS / 1000 / 2
    async with Journal(path, serving=True) as daemon:
        await daemon.ingest(new_event())
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM events").fetchone()  # a snapshot held open
            cli = Journal(path)
            await cli.open()
            assert (await cli.counts()).events == 1
            closing = asyncio.ensure_future(cli.close())
            await asyncio.wait_for(daemon.ingest(new_event()), bound_s)
            await asyncio.wait_for(closing, bound_s)
            assert reader.in_transaction
        finally:
            reader.close()


async def test_a_second_serving_journal_on_the_same_file_is_refused_naming_the_first(
    tmp_path: Path,
) -> None:
    """Only one daemon's journal holds a file's serve lock; the CLI's journals open beside it;
    the lock goes when the daemon's journal closes."""
    path = tmp_path / "j.db"
    async with Journal(path, serving=True):
        with pytest.raises(
            JournalError, match=rf"in use by another webhookd serve \(pid {os.getpid()}\)"
        ):
            await Journal(path, serving=True).open()
        async with Journal(path) as cli:
            assert await cli.backlog() == 0
    async with Journal(path, serving=True) as again:
        assert await again.backlog() == 0


async def test_sqlite_backlog_is_counted_in_the_partial_indexes(tmp_path: Path) -> None:
    """Counting unfinished jobs reads only the indexes of queued and running jobs, never the
    whole table of finished ones, so a journal full of history counts its backlog at once."""
    async with Journal(tmp_path / "journal.db") as journal:
        await journal.ingest(new_event(jobs=2))
        assert await journal.backlog() == 2
    conn = sqlite3.connect(tmp_path / "journal.db")
    try:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {BACKLOG_SQL}")]
    finally:
        conn.close()
    assert not any(step == "SCAN jobs" for step in plan), plan
    queued = ("jobs_lane", "jobs_due")  # either partial index of the queued jobs
    assert any(name in step for step in plan for name in queued), plan
    assert any("jobs_running" in step for step in plan), plan


async def test_sqlite_a_replay_by_another_process_is_counted_at_the_next_sweep(
    tmp_path: Path,
) -> None:
    """``webhookd replay`` writes the journal from another process, where the daemon's tally
    cannot follow it: the daemon's sweep notices the other writer (``data_version``) and
    counts again, before the re-queued jobs can finish and take the tally below zero. Its own
    writes, and a sweep with nothing new, count nothing."""
    async with Journal(tmp_path / "journal.db") as daemon:
        item = new_event()
        job_id = item.jobs[0].id
        await daemon.ingest(item)
        await daemon.claim([job_id], "boot_a")
        await daemon.finish([_finished(job_id, JobState.DONE)])
        await daemon.refresh_backlog_if_changed()
        daemon.backlog_jobs = 7  # a tally no sweep re-counts unless another process wrote
        await daemon.ingest(new_event())
        await daemon.refresh_backlog_if_changed()
        assert daemon.backlog_jobs == 8
        async with Journal(tmp_path / "journal.db") as cli:
            assert await cli.replay([item.event.id]) == {item.event.id: Replayed(1, 0)}
        await daemon.refresh_backlog_if_changed()
        assert daemon.backlog_jobs == 2 == await daemon.backlog()
        await daemon.claim([job_id], "boot_a")
        await daemon.finish([_finished(job_id, JobState.DONE)])
        assert daemon.backlog_jobs == 1


def _wal_resets(path: Path) -> int:
    """How many times the WAL was started over after a checkpoint (its header's sequence)."""
    with open(f"{path}-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


async def test_sqlite_wal_checkpoints_run_beside_ingests_not_inside_their_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ingest's ack waits for a WAL checkpoint: the WAL is copied back in the background,
    whole, so the writer copies nothing itself and its next transaction starts the WAL over."""
    path = tmp_path / "j.db"
    clock = ManualClock()
    journal = Journal(path, clock=clock)
    async with journal:
        writer_copies: list[str] = []
        monkeypatch.setattr(journal, "_checkpoint_quietly", writer_copies.append)
        # ~1,600 pages of WAL, past SQLite's default automatic checkpoint (1,000 pages), with
        # the background checkpointer's clock held still: no commit may checkpoint by itself.
        for n in range(64):
            await journal.ingest(new_event(body=b"x" * 100_000 + str(n).encode()))
        assert _wal_resets(path) == 0
        assert journal.checkpoints == 0
        clock.advance(1.0)
        await journal.ingest(new_event(body=b"after"))
        await journal.wait_checkpoint()
        assert journal.checkpoints == 1
        assert journal.checkpointed_frames >= 1_500
        await journal.ingest(new_event(body=b"restarted"))
        assert _wal_resets(path) == 1
        assert writer_copies == []


async def test_sqlite_writer_copies_the_tail_a_background_checkpoint_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When commits kept coming through every pass of a background checkpoint, the writer
    copies the frames left before its next batch, so the WAL can still start over."""
    path = tmp_path / "j.db"
    clock = ManualClock()
    journal = Journal(path, clock=clock)
    async with journal:
        real = journal._checkpoint
        monkeypatch.setattr(journal, "_checkpoint", lambda: (real()[0], False))
        await journal.ingest(new_event(body=b"x" * 100_000))
        clock.advance(1.0)
        await journal.ingest(new_event(body=b"after"))
        await journal.wait_checkpoint()
        await journal.ingest(new_event(body=b"tail"))  # copies the tail, then writes
        await journal.ingest(new_event(body=b"restarted"))
        assert _wal_resets(path) == 1


def _wal_bytes(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


async def test_sqlite_a_wal_that_a_long_read_made_grow_is_cut_back_when_it_starts_over(
    tmp_path: Path,
) -> None:
    """A read held open (a backup, a sqlite3 shell) keeps the WAL from starting over, so it
    grows by every commit; once the read ends, the next start-over cuts the file back to
    ``WAL_SIZE_LIMIT_BYTES`` instead of leaving its largest size on disk while the daemon runs."""
    path = tmp_path / "j.db"
    clock = ManualClock()  # held still: no background checkpoint unless the test asks
    async with Journal(path, clock=clock) as journal:
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()
        body = b"x" * 1_000_000
        for n in range(WAL_SIZE_LIMIT_BYTES // len(body) + 8):
            await journal.ingest(new_event(body=body + str(n).encode()))
        assert _wal_bytes(path) > WAL_SIZE_LIMIT_BYTES
        reader.execute("COMMIT")
        reader.close()
        clock.advance(1.0)
        await journal.ingest(new_event(body=b"after"))  # starts a background checkpoint
        await journal.wait_checkpoint()
        await journal.ingest(new_event(body=b"restarted"))
        assert _wal_resets(path) == 1
        assert _wal_bytes(path) <= WAL_SIZE_LIMIT_BYTES


async def test_op_queue_hands_out_batches_in_order_and_ends_after_close() -> None:
    """The writer's queue: oldest first, at most ``limit`` per batch, waits when empty, and once
    closed still hands out what was queued before it answers with an empty batch."""
    queue = OpQueue()
    loop = asyncio.get_running_loop()
    ops = [IngestOp(loop.create_future(), new_event()) for _ in range(5)]
    waiting = asyncio.ensure_future(queue.take(3))
    await asyncio.sleep(0)
    assert not waiting.done()
    for op in ops:
        queue.put(op)
    assert await waiting == ops[:3]
    queue.close()
    assert await queue.take(3) == ops[3:]
    assert await queue.take(3) == []
    assert len(queue) == 0


async def test_op_queue_waits_a_few_turns_for_more_and_stops_at_the_first_that_brings_some() -> (
    None
):
    """With ``passes``, a batch takes in what is queued within that many turns of the loop; the
    first turn that queues anything ends the wait (later arrivals go in the next batch), a full
    batch does not wait, and with nothing arriving the batch is handed over after the turns."""
    queue = OpQueue()
    loop = asyncio.get_running_loop()
    ops = [IngestOp(loop.create_future(), new_event()) for _ in range(7)]

    async def put_after(turns: int, items: list[IngestOp]) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        for op in items:
            queue.put(op)

    queue.put(ops[0])
    second = asyncio.ensure_future(put_after(2, ops[1:3]))
    third = asyncio.ensure_future(put_after(3, ops[3:4]))
    assert await queue.take(10, passes=4) == ops[:3]
    await asyncio.gather(second, third)
    assert await queue.take(10, passes=4) == ops[3:4]  # nothing else comes: after four turns

    for op in ops[4:6]:
        queue.put(op)
    late = asyncio.ensure_future(put_after(1, ops[6:]))
    assert await queue.take(2, passes=4) == ops[4:6]  # full: handed over at once
    await late
    assert await queue.take(2) == ops[6:]


def test_headers_are_stored_as_the_json_encoder_writes_them() -> None:
    """Stored headers read back the same whatever they hold (quotes, non-ASCII, control
    characters, a lone surrogate), byte for byte the compact ASCII JSON of earlier versions."""
    tricky = (
        ("X-Quote", 'say "hi" \\ back'),
        ("X-Utf8", "café ✓ 😀"),
        ("X-Ctl", "a\tb\x01c"),
        ("X-Surrogate", "\udcff"),
        ("X-Empty", ""),
    )
    reference = json.dumps(tricky, separators=(",", ":"))
    assert headers_json(tricky) == reference
    assert json.loads(headers_json(tricky)) == [list(pair) for pair in tricky]
    assert headers_json((("X-Num", 1),)) == '[["X-Num",1]]'  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [0, 1, 2, 45, 63, 64, 65, 130])
def test_insert_rows_writes_what_executemany_writes(count: int) -> None:
    """Many rows per statement, in chunks of 64 down to 1, land as executemany lands them:
    the same rows in the same order, and the count of those an OR IGNORE let in."""
    sql = "INSERT OR IGNORE INTO t(k, v, n) VALUES (?, ?, 'x' || ?)"
    conns = [sqlite3.connect(":memory:") for _ in range(2)]
    for conn in conns:
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB, n TEXT)")
        conn.execute("INSERT INTO t VALUES ('k3', NULL, 'old')")
    # Keys repeat (k0 … k39, and k3 is already in): only the first of each goes in.
    rows = [(f"k{i % 40}", bytes([i % 256]), i) for i in range(count)]
    by_rows, by_many = conns
    try:
        inserted = insert_rows(by_rows, sql, rows)
        expected = by_many.executemany(sql, rows).rowcount
        assert inserted == expected == len({k for k, _, _ in rows} - {"k3"})
        read = "SELECT rowid, k, v, n FROM t ORDER BY rowid"
        assert by_rows.execute(read).fetchall() == by_many.execute(read).fetchall()
    finally:
        for conn in conns:
            conn.close()


def test_records_built_on_the_ingest_path_stay_frozen_dataclasses() -> None:
    """Events and the journal's records read, compare, copy and pickle as before, defaults
    included, and still refuse to be changed after they are made."""
    positional = Event("evt_1", "s", 1.0, "s:k", "", Priority.HIGH, (("A", "b"),), b"{}")
    keywords = Event(
        id="evt_1",
        source="s",
        received_at=1.0,
        dedup_key="s:k",
        tenant="",
        priority=Priority.HIGH,
        headers=(("A", "b"),),
        body=b"{}",
    )
    assert positional == keywords and positional.verified is None
    assert hash(positional) == hash(keywords)
    assert dataclasses.replace(positional, tenant="t").tenant == "t"
    assert pickle.loads(pickle.dumps(positional)) == positional
    with pytest.raises(dataclasses.FrozenInstanceError):
        positional.tenant = "t"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Event("evt_1", "s")  # type: ignore[call-arg]
    item = NewEvent(positional, (NewJob("job_1", "a", "forward", 3),))
    assert item.body_key is None and item.filtered == () and item.jobs[0].order_key is None
    assert repr(item.jobs[0]) == (
        "NewJob(id='job_1', action='a', type='forward', max_attempts=3, order_key=None)"
    )
    assert Ingested("evt_1", duplicate=True) == Ingested("evt_1", True)

    # A default factory is called for each record, as the generated __init__ calls it.
    first = Finished("job_1", 1, JobState.DONE, 1.0, 2.0, "done")
    assert (
        first.detail == {}
        and first.detail is not Finished("job_1", 1, JobState.DONE, 1.0, 2.0, "done").detail
    )
    assert Finished("job_1", 1, JobState.DONE, 1.0, 2.0, "done", detail={"a": 1}).detail == {"a": 1}
    assert pickle.loads(pickle.dumps(first)) == first

    @dataclasses.dataclass(frozen=True, slots=True)
    class Later:
        items: list[int] = dataclasses.field(default=None, init=False)  # type: ignore[assignment]

    with pytest.raises(TypeError, match="quick_init"):
        quick_init(Later)


@contextlib.asynccontextmanager
async def _traced(journal: Journal) -> AsyncIterator[list[str]]:
    """The statements the journal's reader runs meanwhile."""
    statements: list[str] = []
    await journal.reader.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        await journal.reader.set_trace_callback(None)


def _plans(path: Path, statements: list[str], *starts: str) -> list[list[str]]:
    """SQLite's plan (EXPLAIN QUERY PLAN's steps) of each statement that starts with one of
    ``starts``, in the order they ran."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [
            [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            for sql in statements
            if sql.startswith(starts)
        ]


async def test_sqlite_lists_a_rare_state_from_its_jobs_not_from_every_event(
    tmp_path: Path,
) -> None:
    """Listing the events with a dead job starts from the dead jobs (``jobs_finished``), not
    from a walk over every event looking at each one's jobs (a second for 500,000 events, at
    each of the dashboard's polls). The answers are the same: see the contract suite's
    test_list_events_by_a_rare_state_is_what_a_walk_over_every_event_finds."""
    async with Journal(tmp_path / "j.db") as journal:
        items = [new_event() for _ in range(3)]
        for item in items:
            await journal.ingest(item)
        await journal.claim([items[1].jobs[0].id], "boot")
        await journal.finish([_finished(items[1].jobs[0].id, JobState.DEAD)])
        async with _traced(journal) as statements:
            assert [e.id for e in await journal.list_events(state="dead")] == [items[1].event.id]
    [plan] = _plans(tmp_path / "j.db", statements, "SELECT e.id")
    assert "SCAN e" not in plan and any("jobs_finished" in step for step in plan), plan


async def test_sqlite_prune_walks_only_the_events_old_enough_to_expire(tmp_path: Path) -> None:
    """Retention looks for expired events from the oldest by receive time (``events_received``),
    so a round visits only events older than ``keep_done``: walking every event by ``seq``
    read the whole file at each round once retention had caught up (250 ms at 300,000
    events). The contract suite checks what prune deletes."""
    async with Journal(tmp_path / "j.db") as journal:
        await journal.ingest(new_event())
        keep = {"keep_done_s": 0.0, "keep_dead_s": 0.0, "keep_dedup_s": 0.0}
        async with _traced(journal) as statements:
            assert (await journal.prune(**keep)).events == 0
            assert (await journal.prune(**keep, start_at=1_600_000_000.0)).events == 0
    plan, on = _plans(tmp_path / "j.db", statements, "SELECT e.id, e.received_at FROM events")
    assert "SCAN e" not in plan and any("events_received (received_at<?)" in p for p in plan), plan
    assert any("events_received (received_at>? AND received_at<?)" in p for p in on), on


async def test_sqlite_lane_calls_read_the_windows_attempts_by_rowid_and_each_job_by_id(
    tmp_path: Path,
) -> None:
    """``finished_at`` has no index in SQLite (it would cost every attempt's write): a start's
    read of its lanes' calls takes the window's attempts by rowid from the ``seq`` halving
    found, and each one's job by its id, never a scan of either table (measured: see
    ``Reads.lane_calls``). The contract suite checks what it reads."""
    clock = ManualClock()
    async with Journal(tmp_path / "j.db", clock=clock) as journal:
        for n in range(6):
            item = new_event()
            item = NewEvent(item.event, (NewJob(new_job_id(), "draft" if n % 2 else "x", "o", 3),))
            await journal.ingest(item)
            await journal.claim([item.jobs[0].id], "boot")
            clock.advance(40.0)
            done = dataclasses.replace(
                _finished(item.jobs[0].id, JobState.DONE),
                started_at=clock.time() - 1.0,
                finished_at=clock.time(),
                detail={"lane_call_s": 0.5, "lane_tokens": 10},
            )
            await journal.finish([done])
        wanted = [LaneAction("shop", "draft", "llm", 60, 100)]
        async with _traced(journal) as statements:
            calls = await journal.lane_calls(wanted, clock.time() - 60.5)
    assert calls == {"llm": [LaneCall(clock.time() - 0.5, 10)]}
    [plan] = _plans(tmp_path / "j.db", statements, "WITH wanted")
    assert "SEARCH a USING INTEGER PRIMARY KEY (rowid>?)" in plan, plan
    assert "SEARCH j USING INDEX sqlite_autoindex_jobs_1 (id=?)" in plan, plan
    assert not any(step in ("SCAN a", "SCAN j", "SCAN attempts", "SCAN jobs") for step in plan)


async def test_sqlite_what_prune_deletes_is_not_left_in_the_file(tmp_path: Path) -> None:
    """Pruned bodies are overwritten (``secure_delete``), not left in the file's free space
    for a later reader of the file to find: whatever the SQLite build's own default is. After
    a clean close (the WAL copied back and removed) the file holds no trace of them."""
    path = tmp_path / "j.db"
    marker = b"ERASE-ME-" + os.urandom(8).hex().encode()
    async with Journal(path) as journal:
        items = [  # rows over several pages, and bodies long enough to overflow one
            new_event(body=b'{"n": %d, "note": "%s"}' % (n, marker * 300)) for n in range(40)
        ]
        for item in items:
            await journal.ingest(item)
        job_ids = [item.jobs[0].id for item in items]
        await journal.claim(job_ids, "boot")
        at = time.time() - 10
        await journal.finish([Finished(j, 1, JobState.DONE, at, at, "done") for j in job_ids])
        keep = {"keep_done_s": 0.0, "keep_dead_s": 0.0, "keep_dedup_s": 0.0}
        assert (await journal.prune(**keep)).events == 40
    assert _left_in(path, marker) == (False, False)


def _left_in(path: Path, marker: bytes) -> tuple[bool, bool]:
    """Whether ``path`` has a -wal beside it, and whether ``marker`` is in it."""
    return Path(f"{path}-wal").exists(), marker in path.read_bytes()


async def test_sqlite_a_refill_seeks_the_due_jobs_past_those_in_backoff(tmp_path: Path) -> None:
    """A lane's due jobs are a range of ``jobs_lane`` (…, behind, run_at, seq) and the earliest
    run_at the head of ``jobs_due``: jobs waiting out a retry's backoff, first in their lane by
    seq, are no longer walked past at every refill (23 ms each at 100,000 such jobs, plus as
    much for ``next_run_at``), nor are jobs marked behind their order key's head (70 ms at
    100,000 behind one head). The contract suite checks what they return."""
    async with Journal(tmp_path / "j.db") as journal:
        await journal.ingest(new_event())
        lane = (int(Priority.NORMAL), "shop", "t1")
        async with _traced(journal) as statements:
            assert len(await journal.ready_in_lanes(2e9, [(lane, 5)])) == 1
            assert await journal.next_run_at(["paused"], after=0.0) == 1_700_000_000.0
    lanes, due = _plans(
        tmp_path / "j.db", statements, "SELECT * FROM (SELECT j.id", "SELECT MIN(run_at)"
    )
    assert any(
        "jobs_lane (priority=? AND source=? AND tenant=? AND behind=? AND run_at<?)" in p
        for p in lanes
    )
    assert any("jobs_due (run_at>?)" in p for p in due), due


async def test_a_claim_alone_commits_without_an_fsync_and_the_writer_is_back_to_full_after(
    tmp_path: Path,
) -> None:
    """A group of claims alone is written with ``synchronous = NORMAL`` (its frames reach the
    WAL, which outlives a crash of the daemon; the next fsync'd commit makes them durable), so
    a job starts one fsync sooner. Ingests and outcomes, and every commit after the claim, stay
    ``FULL``: the 2xx still means on disk."""
    seen: list[str] = []
    async with Journal(tmp_path / "j.db") as journal:
        await journal._call(lambda conn: conn.set_trace_callback(seen.append), transaction=False)

        async def statements_of(write: Any) -> list[str]:
            seen.clear()
            await write
            return [s for s in seen if s.startswith(("PRAGMA synchronous", "BEGIN", "COMMIT"))]

        item = new_event()
        [job] = item.jobs
        assert await statements_of(journal.ingest(item)) == ["BEGIN IMMEDIATE", "COMMIT"]
        assert await statements_of(journal.claim([job.id], "boot")) == [
            "PRAGMA synchronous = NORMAL",
            "BEGIN IMMEDIATE",
            "COMMIT",
            "PRAGMA synchronous = FULL",
        ]
        finish = journal.finish([_finished(job.id, JobState.DONE)])
        assert await statements_of(finish) == ["BEGIN IMMEDIATE", "COMMIT"]
        level = await journal._call(
            lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0], transaction=False
        )
        assert level == 2  # FULL
    with contextlib.closing(sqlite3.connect(tmp_path / "j.db")) as other, other:
        assert other.execute("SELECT state FROM jobs").fetchall() == [("done",)]


async def test_outcomes_committed_together_are_written_at_once_and_each_hears_of_its_own_cancel(
    tmp_path: Path,
) -> None:
    """Each job's task hands in its own outcome; those that reach the writer together are
    written by one statement of each kind in one transaction, and each finish still hears only
    whether a cancel ended its own job (a retry of a job cancelled while it ran is not queued)."""
    seen: list[str] = []
    async with Journal(tmp_path / "j.db") as journal:
        items = [new_event() for _ in range(3)]
        for item in items:
            await journal.ingest(item)
        kept, cancelled, done = (item.jobs[0].id for item in items)
        assert len(await journal.claim([kept, cancelled, done], "boot")) == 3
        await journal.cancel([items[1].event.id])  # while it runs: its retry must not queue
        await journal._call(lambda conn: conn.set_trace_callback(seen.append), transaction=False)
        retry = {"state": JobState.QUEUED, "outcome": "retry", "run_at": 1_700_000_060.0}
        recorded = await asyncio.gather(
            journal.finish([dataclasses.replace(_finished(kept, JobState.QUEUED), **retry)]),
            journal.finish([dataclasses.replace(_finished(cancelled, JobState.QUEUED), **retry)]),
            journal.finish([_finished(done, JobState.DONE)]),
        )
        assert [r.cancelled for r in recorded] == [frozenset(), {cancelled}, frozenset()]
        assert seen.count("BEGIN IMMEDIATE") == 1
        # The three attempt rows go in by two statements (a row count halves to fit) rather
        # than one each.
        assert sum(s.startswith("INSERT INTO attempts") for s in seen) == 2
        ids = (kept, cancelled, done)
        states = {
            j: (await journal.get_event(i.event.id)).jobs[0]
            for j, i in zip(ids, items, strict=True)
        }
    assert {j: (s.state, len(s.history)) for j, s in states.items()} == {
        kept: (JobState.QUEUED, 1),
        cancelled: (JobState.CANCELLED, 1),
        done: (JobState.DONE, 1),
    }


def _finished(job_id: str, state: JobState) -> Finished:
    return Finished(
        job_id=job_id,
        attempt=1,
        state=state,
        started_at=1_700_000_001.0,
        finished_at=1_700_000_001.0,
        outcome=str(state),
    )


class _CostlyCounts(Journal):
    """A journal whose counts take ``cost_s`` on its clock (a million jobs' count, without
    writing a million jobs) and which tallies how often it was asked."""

    cost_s = 0.0
    asked = 0

    async def counts(self, keep: Collection[str] = (), most: int = CATCH_ALL_SHOWN) -> Counts:
        self.asked += 1
        assert isinstance(self.clock, ManualClock)
        self.clock.advance(self.cost_s)
        return await super().counts(keep, most)

    async def lane_backlog(self) -> list[LaneBacklog]:
        self.asked += 1
        assert isinstance(self.clock, ManualClock)
        self.clock.advance(self.cost_s)
        return await super().lane_backlog()

    async def series(self, **kwargs: Any) -> Series:
        self.asked += 1
        assert isinstance(self.clock, ManualClock)
        self.clock.advance(self.cost_s)
        return await super().series(**kwargs)


async def test_polled_counts_are_fresh_on_a_small_journal_and_reused_on_a_large_one(
    tmp_path: Path,
) -> None:
    """What the dashboard and /metrics poll (the counts, the queued jobs per lane): a small
    journal is counted for every caller, however long that took; a large one's count that
    took 2 s is reused for 100 s, with its age, and callers that wait on it share it."""
    clock = ManualClock()
    async with _CostlyCounts(tmp_path / "j.db", clock=clock) as journal:
        journal.cost_s = 2.0
        small = PolledCounts(journal)
        await journal.ingest(new_event())
        assert (await small.get())[0].events == 1
        await journal.ingest(new_event())
        assert (await small.get())[0].events == 2
        # As if these two events and their jobs were the 10,000 rows of a large journal.
        polled = PolledCounts(journal, cache_from_rows=4)
        journal.asked = 0
        answers = await asyncio.gather(*(polled.get() for _ in range(3)))
        assert journal.asked == 1 and [a[1] for a in answers] == [0.0, 0.0, 0.0]
        await journal.ingest(new_event())
        clock.advance(97.0)  # 99 s after the count began: still within 100 s of its end
        counts, age_s = await polled.get()
        assert (counts.events, age_s, journal.asked) == (2, 97.0, 1)
        clock.advance(3.0)
        counts, age_s = await polled.get()
        assert (counts.events, age_s, journal.asked) == (3, 0.0, 2)
        # The lanes' queued jobs likewise: three rows, under 4, so every call reads them...
        assert [b.queued for b in (await polled.lane_backlog())[0]] == [3]
        assert (await polled.lane_backlog())[1] == 0.0 and journal.asked == 4
        # ...until there are four, whose read is then reused.
        await journal.ingest(new_event())
        lanes, _ = await polled.lane_backlog()
        await journal.ingest(new_event())
        clock.advance(50.0)
        assert await polled.lane_backlog() == (lanes, 50.0) and journal.asked == 5
        # The dashboard's series likewise, each window (minutes, source) on its own: five
        # accepted and five in the backlog are ten rows read, so each window's read is reused.
        journal.asked = 0
        hour, age_s = await polled.series(60)
        assert (sum(hour.accepted), hour.backlog[-1], age_s) == (5, 5, 0.0)
        await journal.ingest(new_event())
        assert await polled.series(60) == (hour, 0.0) and journal.asked == 1
        clock.advance(10.0)
        assert await polled.series(60) == (hour, 10.0)
        assert (await polled.series(60, "shop"))[1] == 0.0 and journal.asked == 2
        clock.advance(90.0)
        assert sum((await polled.series(60))[0].accepted) == 6 and journal.asked == 3


async def test_activity_counts_each_window_as_a_read_of_every_attempt_would(
    tmp_path: Path,
) -> None:
    """``activity`` reads the attempts from the first of its window on, found by ``seq`` (an
    attempt is appended as it ends); it counts what a read of them all counts, for a window
    ending anywhere, with the gaps a prune leaves in ``seq``, and with outcomes appended nine
    minutes after one that ended later (a journal that could not take them for a while)."""
    path = tmp_path / "j.db"
    clock = ManualClock()
    async with Journal(path, clock=clock) as journal:
        assert (await journal.activity(300)).attempts_by_outcome == {}  # none yet: no range
        items = [new_event(received_at=clock.time()) for _ in range(150)]
        for item in items:
            await journal.ingest(item)
        job_ids = [item.jobs[0].id for item in items]
        await journal.claim(job_ids, "boot")
        ends = []
        for n, job_id in enumerate(job_ids):
            at = clock.time() + 30 * n - (540 if n % 10 == 9 else 0)
            state = JobState.DEAD if n % 3 == 0 else JobState.DONE
            ends.append(Finished(job_id, 1, state, at - 1, at, str(state)))
        await journal.finish(ends)  # appended in this order
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DELETE FROM attempts WHERE seq % 7 = 0")
        db.commit()
        ended = [at for (at,) in db.execute("SELECT finished_at FROM attempts")]

        def read_all(since: float) -> dict[str, int]:
            sql = "SELECT outcome, COUNT(*) FROM attempts WHERE finished_at >= ? GROUP BY outcome"
            return dict(db.execute(sql, (since,)).fetchall())

        clock.advance(30 * 150)
        async with Journal(path, clock=clock) as journal:
            # A window starting at each attempt's end, and just after it.
            for at in ended:
                for since in (at, at + 0.5):
                    window_s = clock.time() - since
                    counted = (await journal.activity(window_s)).attempts_by_outcome
                    assert counted == read_all(since), since


_OPEN_AS_USER = """
import asyncio, sys
from pathlib import Path
from webhookd.journal import Journal

async def main(path, serving):
    try:
        async with Journal(Path(path), serving=serving == "serve"):
            print("opened")
    except Exception as exc:
        print(exc)

asyncio.run(main(*sys.argv[1:]))
"""


def _as_nobody(*args: str) -> str:
    done = subprocess.run([*AS_NOBODY, sys.executable, *args], capture_output=True, text=True)
    return done.stdout + done.stderr


async def test_a_journal_this_user_cannot_use_is_refused_saying_why() -> None:
    """SQLite says "unable to open database file" of a journal another user owns and "readonly
    database" of one in a folder it cannot make its -wal in (a daemon run as a user of its own,
    files left root's): the error names which, with the uid, the owner and the mode."""
    if (why := why_not_as_nobody()) is not None:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # tmp_path's parents are root's alone
    try:
        os.chmod(base, 0o755)
        roots, shut = base / "roots", base / "shut"
        for folder in (roots, shut):
            os.mkdir(folder)
            async with Journal(folder / "j.db"):
                pass
        os.chmod(roots, 0o777)  # the folder is open to all: the journal file is root's 0600
        os.chown(shut / "j.db", 65534, 65534)  # the file is nobody's: the folder is root's 0755

        said = _as_nobody("-c", _OPEN_AS_USER, str(roots / "j.db"), "read")
        assert "(this user, uid 65534, cannot read and write it: owner uid 0, mode 0600)" in said
        for how in ("read", "serve"):  # serve makes its lock file first: that is refused
            said = _as_nobody("-c", _OPEN_AS_USER, str(shut / "j.db"), how)
            assert f"(this user, uid 65534, cannot create files in {shut}, where SQLite" in said
        assert f"Permission denied ({shut / 'j.db'}-lock)" in said
        config = base / "webhookd.toml"  # check, run as the daemon's user, warns before a start
        config.write_text(f'[journal]\npath = "{roots / "j.db"}"\n')
        os.chmod(config, 0o644)
        said = _as_nobody("-m", "webhookd", "check", "--config", str(config))
        assert (
            said.startswith("ok: ")
            and (
                f"webhookd: warning: journal.path: {roots / 'j.db'}: this user, uid 65534, cannot"
                " read and write it: owner uid 0, mode 0600"
            )
            in said
        )
    finally:
        shutil.rmtree(base)


def _limit_pages(extra: int | None) -> Any:
    """A journal call that lets the file grow by ``extra`` pages at most (None: no limit)."""

    def fn(conn: sqlite3.Connection) -> None:
        [(pages,)] = conn.execute("PRAGMA page_count").fetchall()
        limit = 1073741823 if extra is None else pages + extra
        conn.execute(f"PRAGMA max_page_count = {limit}").fetchall()

    return fn


async def test_writes_that_fail_and_succeed_by_turns_end_in_one_line_once_they_keep_succeeding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a nearly full disk a small commit still fits where a large one fails: the error
    clears at each success (``/readyz``), but "writes succeed again" is said once, after
    commits have gone through for ``WRITES_BACK_AFTER_S`` with none failing, or at close."""
    caplog.set_level(logging.INFO, logger="webhookd.journal")
    monkeypatch.setattr(writer_module, "WRITES_BACK_AFTER_S", 3600.0)
    said = "journal writes succeed again"
    async with Journal(tmp_path / "j.db") as journal:
        await journal.ingest(new_event())
        await journal._call(_limit_pages(2), transaction=False)
        for _ in range(3):
            with pytest.raises(JournalUnavailable, match="full"):
                await journal.ingest(new_event(body=b"x" * 200_000))
            assert journal.last_write_error is not None
            await journal.pause("shop")  # a row on a page the file already has
            assert journal.last_write_error is None
        assert said not in caplog.text
        await journal._call(_limit_pages(None), transaction=False)
        await journal.ingest(new_event(body=b"x" * 200_000))
    again = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert again == [f"{said} (the last failure: database or disk is full)"]


async def test_writes_succeed_again_is_said_once_they_have_kept_succeeding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no failure in ``WRITES_BACK_AFTER_S``, the line comes while the journal runs."""
    caplog.set_level(logging.INFO, logger="webhookd.journal")
    monkeypatch.setattr(writer_module, "WRITES_BACK_AFTER_S", 0.0)
    said = asyncio.get_running_loop().create_future()

    class Heard(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "journal writes succeed again" in record.getMessage() and not said.done():
                said.set_result(record.getMessage())

    heard = Heard(logging.INFO)
    logging.getLogger("webhookd.journal").addHandler(heard)
    try:
        async with Journal(tmp_path / "j.db") as journal:
            await journal._call(_limit_pages(2), transaction=False)
            with pytest.raises(JournalUnavailable):
                await journal.ingest(new_event(body=b"x" * 200_000))
            await journal._call(_limit_pages(None), transaction=False)
            await journal.ingest(new_event())
            line = await asyncio.wait_for(said, timeout=5)
            assert journal._writes_back_line is None  # said while open, not by the close
    finally:
        logging.getLogger("webhookd.journal").removeHandler(heard)
    assert line == "journal writes succeed again (the last failure: database or disk is full)"


async def test_a_journal_on_a_full_disk_is_refused_saying_so(tmp_path: Path) -> None:
    """SQLite calls a disk with no room left "disk I/O error": the error says the disk is full."""
    with small_disk(tmp_path / "small", "1m") as disk:
        with (disk / "filler").open("wb") as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        with pytest.raises(JournalError, match=f"no space left on the disk of {disk}"):
            await Journal(disk / "j.db").open()


@contextlib.contextmanager
def ext4_that_can_fail(path: Path) -> Iterator[tuple[Path, Path]]:
    """A 16 MB ext4 image mounted at ``path`` with ``errors=remount-ro``, and the file of the
    kernel's that makes it fail as a disk's I/O error does (``trigger_fs_error``): the kernel
    then remounts it read-only under whatever has files open on it."""
    image = path.with_name(path.name + ".img")
    with image.open("wb") as file:
        file.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    path.mkdir()
    mount_or_skip(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(path)],
        "mounting an ext4 image takes root and a loop device",
    )
    try:
        found = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(path)], capture_output=True, text=True
        )
        trigger = Path("/sys/fs/ext4") / Path(found.stdout.strip()).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger} to make the file system fail")
        yield path, trigger
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


async def test_a_write_on_a_file_system_remounted_read_only_says_so(tmp_path: Path) -> None:
    """An I/O error made the kernel remount the journal's file system read-only: SQLite calls
    that "disk I/O error", and the log, ``/readyz`` and every 503 said no more, while the cause
    (and what mends it: an fsck, a restart) was the read-only mount. The error says it."""
    with ext4_that_can_fail(tmp_path / "disk") as (disk, trigger):
        journal = Journal(disk / "webhookd.db")
        await journal.open()
        try:
            await journal.ingest(new_event())
            await asyncio.to_thread(trigger.write_text, "1")
            with pytest.raises(JournalUnavailable) as caught:
                await journal.ingest(new_event())
            said = f"(the file system of {disk} is read-only)"
            assert str(caught.value).endswith(said), caught.value
            assert journal.last_write_error is not None
            assert journal.last_write_error.endswith(said), journal.last_write_error
        finally:
            await journal.close()


async def test_the_last_checkpoint_on_a_file_system_remounted_read_only_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stop's last checkpoint failed on a file system the kernel had remounted read-only,
    and its warning said only "disk I/O error", where a failed write's error names the
    read-only file system: the warning names it too."""
    caplog.set_level(logging.WARNING, logger="webhookd.journal")
    with ext4_that_can_fail(tmp_path / "disk") as (disk, trigger):
        async with Journal(disk / "webhookd.db", serving=True) as journal:
            await journal.ingest(new_event())
            await asyncio.to_thread(trigger.write_text, "1")
        said = [r.getMessage() for r in caplog.records if "last checkpoint" in r.getMessage()]
        assert len(said) == 1, said
        assert f"(disk I/O error: the file system of {disk} is read-only)" in said[0], said
        assert journal.wal_kept == f"disk I/O error: the file system of {disk} is read-only"


async def test_serve_warns_of_a_journal_disk_with_less_room_than_a_full_wal_needs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst filled a 33 MB volume with the journal's -wal alone (it may reach 64 MiB, and a
    checkpoint needs as much again), and the daemon then could not start until it was grown,
    with nothing said at the start about the little room it had: ``serve`` warns of a disk
    with less than 128 MiB free, one with that room not."""
    caplog.set_level(logging.WARNING, logger="webhookd.journal")
    with small_disk(tmp_path / "small", "40m") as disk:
        async with Journal(disk / "j.db", serving=True):
            pass
    said = [r.getMessage() for r in caplog.records if "MiB free" in r.getMessage()]
    assert len(said) == 1 and re.fullmatch(
        rf"journal {re.escape(str(disk / 'j.db'))}: the disk of {re.escape(str(disk))} has"
        r" (39|40) MiB free: keep 128 MiB free there, as a burst can fill 64 MiB of the"
        r" journal's -wal and a checkpoint needs as much again; a disk that fills is answered"
        r" 503 until room is made",
        said[0],
    ), said
    caplog.clear()
    with small_disk(tmp_path / "roomy", "200m") as disk:
        async with Journal(disk / "j.db", serving=True):
            pass
    assert not [r for r in caplog.records if "MiB free" in r.getMessage()]


async def test_check_warns_of_a_journal_disk_with_less_room_than_a_full_wal_needs(
    tmp_path: Path,
) -> None:
    """A journal on a 40 MB volume: a burst can fill it with the -wal alone, and the daemon
    then answers 503 until room is made. ``check`` warns of it, still exit 0."""
    with small_disk(tmp_path / "small", "40m") as disk:
        config = tmp_path / "webhookd.toml"
        config.write_text(f'[journal]\npath = "{disk / "j.db"}"\n')
        out = await cli("check", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert re.search(
        rf"webhookd: warning: journal.path: {re.escape(str(disk / 'j.db'))}: the disk of"
        rf" {re.escape(str(disk))} has (39|40) MiB free: keep 128 MiB free there",
        out.stderr,
    ), out.stderr


async def test_serve_and_check_warn_of_a_journal_another_user_owns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal.path in a folder others may write (/tmp): another user may make the file
    first, and reads every webhook the daemon then writes into it, whatever mode the daemon
    gives it. ``serve`` and ``check`` warn of a journal another user (not root) owns; one of
    this user's, none."""
    if os.geteuid() != 0:
        pytest.skip("making a file another user's takes root (CI runs as root)")
    theirs = tmp_path / "theirs.db"
    theirs.write_bytes(b"")
    os.chown(theirs, 65534, 65534)
    theirs.chmod(0o666)
    caplog.set_level(logging.WARNING, logger="webhookd.journal")
    async with Journal(theirs, serving=True):
        pass
    warned = f"journal {theirs}: owned by uid 65534, not by this user (uid 0): that user can read"
    assert [r.getMessage() for r in caplog.records if "owned by uid" in r.getMessage()] == [
        f"{warned} every webhook written into it, whatever its mode; keep the journal in a folder"
        " only webhookd's user may write (the shipped unit's /var/lib/webhookd), owned by that"
        " user"
    ]
    config = tmp_path / "webhookd.toml"
    config.write_text(f'[journal]\npath = "{theirs}"\n')
    out = await cli("check", "--config", str(config), "--no-journal")
    assert out.exit_code == 0, out.output
    assert f"webhookd: warning: journal.path: {theirs}: owned by uid 65534" in out.stderr
    caplog.clear()
    async with Journal(tmp_path / "mine.db", serving=True):
        pass
    assert not [r for r in caplog.records if "owned by uid" in r.getMessage()]


def test_a_journal_on_a_read_only_filesystem_is_named_so(tmp_path: Path) -> None:
    """A filesystem mounted read-only (an ext4 that met an error, a read-only volume) makes
    access() fail too: what the open's error says names the mount, not the file's owner and
    mode."""
    with small_disk(tmp_path / "small", "1m") as disk:
        (disk / "j.db").write_bytes(b"")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        said = f"the filesystem of {disk} is mounted read-only"
        assert why_unusable(disk / "j.db") == said


def test_a_journal_path_on_the_kernels_filesystem_is_not_called_a_full_disk() -> None:
    """/proc has no blocks at all: it is named for what it is, not as a disk without room."""
    assert why_unusable(Path("/proc/no-such/j.db")) in (
        "/proc is on no disk: a filesystem of the kernel's, with no room for files",
        f"this user, uid {os.geteuid()}, cannot create files in /proc, where SQLite keeps the"
        " journal's -wal and -shm",  # not root
    )


async def test_reads_answer_within_their_bound_and_abandoned_ones_are_capped() -> None:
    """``answer_within``: a read with no answer in time is a JournalUnavailable, left to end by
    itself; while MAX_ABANDONED_READS of those wait, a new read is refused without being made
    (each would hold a connection of the pool); once they end, reads are made again."""
    answer = asyncio.Event()
    made = ended = 0

    async def read() -> str:
        nonlocal made, ended
        made += 1
        await answer.wait()
        ended += 1
        return "counts"

    async def all_ended() -> bool:
        return ended == made

    for _ in range(MAX_ABANDONED_READS):
        with pytest.raises(JournalUnavailable, match=r"no answer from the journal in 0\.01 s"):
            await answer_within(read(), 0.01)
    with pytest.raises(JournalUnavailable, match=f"to {MAX_ABANDONED_READS} earlier reads"):
        await answer_within(read(), 10)
    assert made == MAX_ABANDONED_READS  # the refused one was never made
    answer.set()
    await poll(all_ended, timeout_s=5)
    assert await answer_within(read(), 10) == "counts"


async def test_a_daemons_journal_says_when_it_is_created_and_only_then(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A start that finds no journal at its path says it made a new one (after a restart
    nobody expected, that is how a new journal is told); a start on one says nothing of it,
    nor does the CLI's journal."""
    caplog.set_level(logging.INFO, logger="webhookd.journal")
    path = tmp_path / "webhookd.db"
    line = f"journal {path}: created (no journal at that path)"
    async with Journal(path, serving=True):
        pass
    assert [r.getMessage() for r in caplog.records].count(line) == 1
    caplog.clear()
    async with Journal(path, serving=True):
        pass
    async with Journal(tmp_path / "other.db"):
        pass
    assert not [r for r in caplog.records if "created" in r.getMessage()]


def test_the_sqlite_journals_statements_number_no_placeholder() -> None:
    """Numbered placeholders (``?1``) bound by position warn on Python 3.12.0 to 3.12.3 (a
    DeprecationWarning on every finish and /stats read there, errors where warnings are) and
    were to be refused by 3.14: the SQLite journal's statements use ``?`` or ``:name``."""
    root = Path(__file__).resolve().parents[1] / "webhookd" / "journal"
    found = [
        f"{path.name}:{n}"
        for path in sorted(root.glob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"""["'][^"']*\?\d""", line) and not line.lstrip().startswith("#")
    ]
    assert found == []


async def test_sqlite_a_clock_step_moves_only_the_jobs_queued_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk over the queued jobs after a step of the wall clock goes a batch at a time,
    and webhooks keep coming meanwhile, journaled by the stepped clock. Unbounded, it moved
    those too (each then waited the whole step), and under steady intake never ended."""
    monkeypatch.setattr(changes_module, "_STEP_BATCH", 1)
    first_batch = threading.Event()
    read = changes_module.fetch_rows

    def batch_read(conn: sqlite3.Connection, sql: str, *args: Any) -> Any:
        rows = read(conn, sql, *args)
        if sql.startswith("SELECT seq FROM jobs"):
            first_batch.set()
        return rows

    monkeypatch.setattr(changes_module, "fetch_rows", batch_read)
    clock = ManualClock(start=1_700_000_000.0)
    async with Journal(tmp_path / "j.db", clock=clock) as journal:
        before = [new_event(received_at=clock.time()) for _ in range(5)]
        for item in before:
            await journal.ingest(item)
        clock.step_wall(3600)
        walk = asyncio.create_task(journal.clock_stepped(3600))
        await asyncio.to_thread(first_batch.wait, 10)  # the walk has begun
        after = [new_event(received_at=clock.time()) for _ in range(20)]
        # Each its own write, taken by the writer between the walk's batches.
        await asyncio.gather(*(journal.ingest(item) for item in after))
        assert await walk == len(before)
        for item in before:
            job = (await journal.get_event(item.event.id)).jobs[0]
            assert job.run_at == pytest.approx(item.event.received_at + 3600)
        for item in after:
            job = (await journal.get_event(item.event.id)).jobs[0]
            assert job.run_at == pytest.approx(item.event.received_at)
