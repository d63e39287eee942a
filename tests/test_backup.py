"""``webhookd backup`` and ``webhookd restore`` on a real journal and real daemons.

A backup taken while a daemon is accepting webhooks holds every webhook acknowledged before it
began, is private and self-contained; a restore refuses a running daemon, keeps the journal it
replaces (its WAL folded in), and the restored journal still knows its deliveries' dedup keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from ops_support import cli
from procs import Procs, Target, held_open, spawn, write_config
from test_cli import on_a_terminal
from test_journal_contract import new_event

from webhookd.errors import JournalError
from webhookd.journal import Journal, copies

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(90)]

JSON = {"Content-Type": "application/json"}


def event_ids(path: Path) -> set[str]:
    """The event ids in a journal file, read with plain sqlite3 (no webhookd code); the last
    connection to close removes the -wal and -shm it made."""
    conn = sqlite3.connect(path)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM events")}
    finally:
        conn.close()


def unfinished(path: Path) -> set[str]:
    """The events with a job queued or running in a journal file."""
    conn = sqlite3.connect(path)
    try:
        sql = "SELECT DISTINCT event_id FROM jobs WHERE state IN ('queued', 'running')"
        return {row[0] for row in conn.execute(sql)}
    finally:
        conn.close()


def read(path: Path) -> bytes:
    return path.read_bytes()


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


async def post(http: aiohttp.ClientSession, url: str, body: str) -> tuple[int, str]:
    async with http.post(f"{url}/hooks/shop", data=body, headers=JSON) as r:
        return r.status, (await r.json())["id"]


async def test_a_backup_beside_a_running_daemon_restores_what_was_acked_before_it(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    journal, copy = tmp_path / "webhookd.db", tmp_path / "backups" / "monday.db"
    copy.parent.mkdir()
    config = write_config(
        tmp_path / "webhookd.toml",
        journal,
        f'[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\nurl = "{downstream.url}/"\n',
    )
    daemon = await procs.serve(config)
    before = {await post(http, daemon.url, f'{{"n": "before-{i}"}}') for i in range(20)}
    assert {status for status, _ in before} == {202}

    # Webhooks keep coming while the backup runs: it copies one moment, and the daemon goes on.
    during: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def keep_posting() -> None:
        n = 0
        while not stop.is_set():
            during.append(await post(http, daemon.url, f'{{"n": "during-{n}"}}'))
            n += 1

    downstream.delay_s = 30.0  # the jobs of these webhooks are running or queued at the backup
    posting = asyncio.create_task(keep_posting())
    try:
        made = await procs.cli("backup", str(copy), "--config", str(config))
    finally:
        stop.set()
        await posting
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith(f"backed up {journal} to {copy}: ")
    copied = event_ids(copy)
    assert {event_id for _, event_id in before} <= copied
    assert f"{len(copied):,} event(s)" in made.stdout
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert names(copy.parent) == {"monday.db"}  # no -wal, no partial file

    refused = await procs.cli("restore", str(copy), "--config", str(config))
    assert refused.returncode == 1
    assert f"in use by another webhookd serve (pid {daemon.pid}): stop it" in refused.stderr
    assert event_ids(journal) >= copied

    after = [await post(http, daemon.url, f'{{"n": "after-{i}"}}') for i in range(5)]
    assert not copied & {event_id for _, event_id in after}

    # kill -9 right after the last acks: their commits are likely in the journal's -wal only.
    await daemon.kill9()
    acked = (
        {event_id for _, event_id in before}
        | {event_id for status, event_id in during if status == 202}
        | {event_id for _, event_id in after}
    )
    put = await procs.cli("restore", str(copy), "--config", str(config))
    assert put.returncode == 0, put.stderr
    assert put.stdout.startswith(f"restored {copy} to {journal}: {len(copied):,} event(s)")
    replaced = Path(put.stdout.split("the journal it replaced is now ")[1].strip())
    assert replaced.parent == tmp_path and replaced.name.startswith("webhookd.db.replaced-")
    # The restored journal has no -wal beside it; the replaced one took its own along.
    assert names(tmp_path) - {f"{replaced.name}-wal", f"{replaced.name}-shm"} == {
        "backups",
        "webhookd.toml",
        "webhookd.db",
        "webhookd.db-lock",
        replaced.name,
    }
    # Nothing acknowledged is lost by a restore: the replaced journal and its WAL hold it all.
    assert event_ids(replaced) == acked
    assert event_ids(journal) == copied
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600

    # The restored journal keeps the copy's dedup keys: a delivery acked before the backup is a
    # duplicate; one acked after it is new again (the backup's loss window, said plainly).
    # The daemon runs the jobs that were queued or running at the backup (again, for those
    # that ran: at least once).
    pending = unfinished(journal)
    assert pending
    downstream.delay_s = 0.0
    downstream.release.set()
    seen = len(downstream.arrivals)
    daemon = await procs.serve(config)
    await downstream.wait_for(lambda: pending <= {d.event_id for d in downstream.arrivals[seen:]})
    first_id = sorted(before)[0][1]
    async with http.post(
        f"{daemon.url}/hooks/shop", data=_body_of(journal, first_id), headers=JSON
    ) as r:
        assert (r.status, (await r.json())["id"]) == (200, first_id)
    status, again = await post(http, daemon.url, '{"n": "after-0"}')
    assert status == 202 and again != after[0][1]


def _body_of(journal: Path, event_id: str) -> bytes:
    conn = sqlite3.connect(journal)
    try:
        row = conn.execute("SELECT body FROM events WHERE id = ?", (event_id,)).fetchone()
        return bytes(row[0])
    finally:
        conn.close()


async def test_backup_and_restore_refuse_what_they_cannot_do_safely(tmp_path: Path) -> None:
    journal = tmp_path / "webhookd.db"
    config = write_config(tmp_path / "webhookd.toml", journal)
    missing = await cli("backup", str(tmp_path / "copy.db"), "--config", str(config))
    assert (missing.exit_code, missing.output) == (
        1,
        f"webhookd: error: no journal at {journal} yet: `webhookd serve` makes it at its first"
        " start (or set journal.path or --config)\n",
    )

    async with Journal(journal):
        pass
    # On a terminal a progress bar in MB; the summary line on stdout either way.
    drawn = ("backup", str(tmp_path / "drawn.db"), "--config", str(config))
    out, shown, code = await asyncio.to_thread(on_a_terminal, *drawn)
    assert code == 0, shown
    assert out.startswith(f"backed up {journal} to {tmp_path / 'drawn.db'}: 0 event(s), ")
    assert "backing up (MB)" in shown and "1/1" in shown
    # A folder not there is a usage error, as for "DEST/" below (it was exit 1, "No such file").
    nowhere = tmp_path / "no-such-folder" / "copy.db"
    out = await cli("backup", str(nowhere), "--config", str(config))
    assert (out.exit_code, out.output) == (
        2,
        f"webhookd: error: no folder {nowhere.parent}: make it first\n",
    )
    # "DEST/" names a folder: one that does not exist is an error, never a file of that name.
    slash = f"{tmp_path / 'not-made-yet'}/"
    out = await cli("backup", slash, "--config", str(config))
    assert (out.exit_code, out.output) == (
        2,
        f"webhookd: error: no folder {slash}: make it first\n",
    )
    assert not (tmp_path / "not-made-yet").exists()
    taken = tmp_path / "taken.db"
    taken.write_bytes(b"keep me")
    exists = await cli("backup", str(taken), "--config", str(config))
    assert exists.exit_code == 2 and "already exists" in exists.output
    assert taken.read_bytes() == b"keep me"

    original = journal.read_bytes()
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_bytes(b"not a database\n" * 500)
    other = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE t (x)")
    for bad in (not_sqlite, other, tmp_path / "nowhere.db"):
        out = await cli("restore", str(bad), "--config", str(config))
        assert out.exit_code == 1, out.output
        assert str(bad) in out.output
        assert journal.read_bytes() == original
    assert names(tmp_path) == {
        "drawn.db",
        "webhookd.toml",
        "webhookd.db",
        "webhookd.db-lock",
        "taken.db",
        "notes.txt",
        "other.db",
    }

    # A journal SQLite cannot open is moved aside as it is, its -wal under the new name too.
    good = tmp_path / "good.db"
    assert (await cli("backup", str(good), "--config", str(config))).exit_code == 0
    wal = tmp_path / "webhookd.db-wal"
    journal.write_bytes(b"torn" * 1024)
    wal.write_bytes(b"its wal")
    put = await cli("restore", str(good), "--config", str(config))
    assert put.exit_code == 0, put.output
    aside = Path(put.output.split("the journal it replaced is now ")[1].strip())
    assert read(aside) == b"torn" * 1024
    assert read(Path(f"{aside}-wal")) == b"its wal"
    assert journal.read_bytes() == good.read_bytes()

    # A -wal left without its journal is not the restored file's: moved aside, not replayed,
    # and said to be all there was (it said "the journal it replaced is now" a name no file had).
    journal.unlink()
    wal.write_bytes(b"an orphan wal")
    put = await cli("restore", str(good), "--config", str(config))
    assert put.exit_code == 0, put.output
    assert "the journal it replaced" not in put.output
    said = put.output.splitlines()[-1]
    assert said.startswith("there was no journal to replace, only its -wal: now ")
    aside_wal = Path(said.rsplit(" ", 1)[1])
    assert aside_wal.name.startswith("webhookd.db.replaced-") and aside_wal.name.endswith("-wal")
    assert read(aside_wal) == b"an orphan wal"
    assert aside_wal.name.removesuffix("-wal") not in names(tmp_path)
    assert not wal.exists()
    assert journal.read_bytes() == good.read_bytes()

    # A process with the journal open that takes no serve lock (a daemon of a webhookd from
    # before it, an sqlite3 shell) would go on writing to the file a restore moved aside. It
    # is named by its command line (escaped, and cut short).
    with held_open(journal) as pid:
        before = names(tmp_path)
        out = await cli("restore", str(good), "--config", str(config))
        assert out.exit_code == 1
        assert out.output.startswith(
            f"webhookd: error: process {pid} has {journal} open (`{sys.executable} -c \\n"
        )
        assert out.output.endswith(" …`): stop it before a restore\n")
        assert out.output.count("\n") == 1
        assert names(tmp_path) == before

    pg = tmp_path / "pg.toml"
    pg.write_text('[journal]\nurl = "postgresql://webhookd@127.0.0.1/webhookd"\n')
    for verb, tool in (("backup", "pg_dump"), ("restore", "pg_restore")):
        out = await cli(verb, str(tmp_path / "x.db"), "--config", str(pg))
        assert out.exit_code == 2 and "journal.url is set: " in out.output and tool in out.output


def stamp(at: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(at))


async def test_backups_into_a_folder_are_dated_and_the_oldest_deleted(tmp_path: Path) -> None:
    """``backup FOLDER --keep N`` for a timer: each copy named for the journal and the time,
    and only this journal's dated copies beyond the newest N deleted, once the new one is in
    place; nothing else in the folder is touched."""
    journal = tmp_path / "webhookd.db"
    async with Journal(journal) as j:
        kept_id = (await j.ingest(new_event(body=b'{"n": 1}'))).event_id
    config = write_config(tmp_path / "webhookd.toml", journal)
    folder = tmp_path / "backups"
    folder.mkdir()
    old = [f"webhookd-2026010{d}T000000Z.db" for d in (1, 2, 3)]
    # Stamped in the future (a clock set back since): kept, and it cannot push out the new one.
    ahead = "webhookd-20991231T000000Z.db"
    others = ["webhookd-notes.db", "other-20260101T000000Z.db", "webhookd-20260101T000000Z.db.gz"]
    for name in [*old, ahead]:
        copies.backup(journal, folder / name)
    for name in others:
        (folder / name).write_bytes(b"an older copy")
    (folder / "webhookd-20250101T000000Z.db").symlink_to(tmp_path / "elsewhere.db")
    (folder / "webhookd-20250102T000000Z.db").mkdir()

    before = time.time()
    out = await cli("backup", str(folder), "--keep", "3", "--config", str(config))
    after = time.time()
    assert out.exit_code == 0, out.output
    made = Path(out.output.split(" to ", 1)[1].split(": ", 1)[0])
    assert made.parent == folder
    assert made.name.startswith("webhookd-") and made.name.endswith(".db")
    assert stamp(before) <= made.name.removeprefix("webhookd-").removesuffix(".db") <= stamp(after)
    assert event_ids(made) == {kept_id}
    assert out.output.endswith(f"deleted 2 older backup(s): {old[0]}, {old[1]}\n")
    assert names(folder) == {
        made.name,
        ahead,
        old[2],
        *others,
        "webhookd-20250101T000000Z.db",
        "webhookd-20250102T000000Z.db",
    }

    # Without --keep a folder only gets the dated copy; --keep needs a folder.
    (folder / made.name).unlink()
    out = await cli("backup", str(folder), "--config", str(config))
    assert out.exit_code == 0 and "deleted" not in out.output
    again = Path(out.output.split(" to ", 1)[1].split(": ", 1)[0])
    # Keeping one keeps the copy just made, whatever the names beside it say.
    assert copies.rotate(folder, journal, 1, again) == [folder / old[2], folder / ahead]
    assert {n for n in names(folder) if n.endswith("Z.db")} == {
        again.name,
        "other-20260101T000000Z.db",
        "webhookd-20250101T000000Z.db",
        "webhookd-20250102T000000Z.db",
    }
    # Made within one second: the next free name, and rotation takes them in that order.
    at = dt.datetime(2026, 2, 1, tzinfo=dt.UTC).timestamp()
    made_then = []
    for _ in range(3):
        made_then.append(copies.dated(folder, journal, at))
        copies.backup(journal, made_then[-1])
    first = "webhookd-20260201T000000Z"
    assert [p.name for p in made_then] == [f"{first}.db", f"{first}-2.db", f"{first}-3.db"]
    assert copies.rotate(folder, journal, 2, made_then[2]) == made_then[:2]
    assert {again.name, made_then[2].name} <= names(folder)
    out = await cli("backup", str(tmp_path / "one.db"), "--keep", "3", "--config", str(config))
    assert (out.exit_code, out.output) == (
        2,
        f"webhookd: error: --keep takes a folder as DEST, and {tmp_path / 'one.db'} is not one\n",
    )
    out = await cli("backup", str(folder), "--keep", "0", "--config", str(config))
    assert out.exit_code == 2 and "0 is not in the range x>=1" in out.output


async def test_keep_deletes_only_its_own_journals_backups(tmp_path: Path) -> None:
    """Two daemons with the default file name (webhookd.db in two state folders) backing up
    into one folder: --keep told a journal's backups by the file's name alone, and each run
    deleted the other journal's. A journal now gets an id at its first backup, every backup
    of it carries it, and --keep deletes only those: not another journal's, nor one it cannot
    tell (made before there were ids)."""
    folder = tmp_path / "backups"
    folder.mkdir()
    held: dict[str, set[str]] = {}
    configs = {}
    for name, count in (("a", 3), ("b", 2)):
        journal = tmp_path / name / "webhookd.db"
        journal.parent.mkdir()
        async with Journal(journal) as j:
            held[name] = {(await j.ingest(new_event())).event_id for _ in range(count)}
        configs[name] = write_config(tmp_path / f"{name}.toml", journal)
    # A's backup by a webhookd before ids, in the folder: not told as a's, so kept.
    shutil.copyfile(tmp_path / "a" / "webhookd.db", folder / "webhookd-20250101T000000Z.db")
    made: dict[str, list[str]] = {"a": [], "b": []}
    for name in ("a", "a", "a", "b", "b", "b"):
        out = await cli("backup", str(folder), "--keep", "2", "--config", str(configs[name]))
        assert out.exit_code == 0, out.output
        made[name].append(Path(out.output.split(" to ", 1)[1].split(": ", 1)[0]).name)
    assert names(folder) == {"webhookd-20250101T000000Z.db", *made["a"][1:], *made["b"][1:]}
    for name in held:
        for kept in made[name][1:]:
            assert event_ids(folder / kept) == held[name]


# A backup that kills itself (SIGKILL: no cleanup runs) once its first page is in the copy.
_KILLED_MIDWAY = """
import os, signal, sys
from pathlib import Path
from webhookd.journal import copies
copies.backup(Path(sys.argv[1]), Path(sys.argv[2]), step_pages=1,
              on_step=lambda done, size: os.kill(os.getpid(), signal.SIGKILL))
"""


# Commits left in the -wal, never checkpointed, as a daemon killed with kill -9 leaves them.
LEFT_IN_THE_WAL = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint = 0")
conn.execute("UPDATE events SET source = 'only-in-the-wal'")
os._exit(0)
"""


def left_in_the_wal(journal: Path, crashed: Path) -> None:
    """``crashed``: a copy of ``journal`` with a change only its ``-wal`` holds."""
    crashed.write_bytes(journal.read_bytes())
    subprocess.run([sys.executable, "-c", LEFT_IN_THE_WAL, str(crashed)], check=True)


async def test_a_journal_moved_aside_is_restored_with_the_commits_in_its_wal(
    tmp_path: Path,
) -> None:
    """Undoing a restore (putting back the ``.replaced-...`` journal, whose ``-wal`` came with
    it) or restoring any journal with a ``-wal`` keeps the commits only that ``-wal`` holds;
    the file and its ``-wal`` are left as they were. Two restores in one second each keep
    what they moved aside under a name of its own."""
    journal = tmp_path / "webhookd.db"
    config = write_config(tmp_path / "webhookd.toml", journal)
    async with Journal(journal) as j:
        for _ in range(3):
            await j.ingest(new_event())
    crashed = tmp_path / "crashed.db"
    wal = Path(f"{crashed}-wal")
    await asyncio.to_thread(left_in_the_wal, journal, crashed)
    wal_before = read(wal)
    assert wal_before

    first = await cli("restore", str(crashed), "--config", str(config))
    second = await cli("restore", str(crashed), "--config", str(config))
    assert (first.exit_code, second.exit_code) == (0, 0), first.output + second.output
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        assert conn.execute("SELECT DISTINCT source FROM events").fetchall() == [
            ("only-in-the-wal",)
        ]
    assert read(wal) == wal_before
    asides = [
        Path(out.output.split("the journal it replaced is now ")[1].strip())
        for out in (first, second)
    ]
    assert asides[0] != asides[1] and all(a.is_file() for a in asides)


async def test_a_restore_through_a_symlink_keeps_the_commits_in_its_wal(tmp_path: Path) -> None:
    """SQLite names a ``-wal`` after the file a symlink points at: looked for beside the link's
    own name (``latest.db`` → a journal moved aside), it was missed, and the file was copied
    alone, without the commits only its ``-wal`` held."""
    journal = tmp_path / "webhookd.db"
    async with Journal(journal) as j:
        for _ in range(3):
            await j.ingest(new_event())
    crashed = tmp_path / "crashed.db"
    await asyncio.to_thread(left_in_the_wal, journal, crashed)
    link = tmp_path / "latest.db"
    link.symlink_to(crashed)
    restored = tmp_path / "restored" / "webhookd.db"
    restored.parent.mkdir()
    copies.restore(link, restored)
    with contextlib.closing(sqlite3.connect(restored)) as conn:
        assert conn.execute("SELECT DISTINCT source FROM events").fetchall() == [
            ("only-in-the-wal",)
        ]


async def test_a_restore_through_a_symlinked_journal_path_puts_the_backup_where_it_points(
    tmp_path: Path,
) -> None:
    """journal.path a symlink to a data disk: the restore renamed the link aside and put the
    backup at its name, a file on the link's disk, while the daemon's journal stayed on the
    data disk and the serve lock moved to ``<link>-lock``. The file the link names is moved
    aside (with the commits of its -wal) and replaced; the link stays."""
    real = tmp_path / "data" / "webhookd.db"
    real.parent.mkdir()
    async with Journal(real) as j:
        for _ in range(3):
            await j.ingest(new_event())
    backup = tmp_path / "backup.db"
    copies.backup(real, backup)
    async with Journal(real) as j:  # two webhooks since, and a commit in the -wal only
        for _ in range(2):
            await j.ingest(new_event())
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", LEFT_IN_THE_WAL, str(real)], check=True
    )
    link = tmp_path / "lib" / "webhookd.db"
    link.parent.mkdir()
    link.symlink_to(real)
    config = write_config(tmp_path / "webhookd.toml", link)
    out = await cli("restore", str(backup), "--config", str(config))
    assert out.exit_code == 0, out.output
    assert link.is_symlink() and names(link.parent) == {"webhookd.db"}
    assert event_ids(real) == event_ids(backup)
    aside = Path(out.output.split("the journal it replaced is now ")[1].strip())
    assert aside.parent == real.parent and len(event_ids(aside)) == 5
    with contextlib.closing(sqlite3.connect(aside)) as conn:
        assert conn.execute("SELECT DISTINCT source FROM events").fetchall() == [
            ("only-in-the-wal",)
        ]


# copies.restore as `webhookd restore` runs it, stopped once the backup is checked (seconds to
# minutes of PRAGMA quick_check on a big journal) until a line comes on stdin.
_RESTORE_STOPPED_AT_THE_CHECK = """
import sys
from pathlib import Path
from webhookd.errors import JournalError
from webhookd.journal import copies
real = copies._check
def check(path):
    checked = real(path)
    print("checked", flush=True)
    sys.stdin.readline()
    return checked
copies._check = check
try:
    copies.restore(Path(sys.argv[1]), Path(sys.argv[2]))
except JournalError as exc:
    sys.exit(str(exc))
"""


def paused(journal: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        return {row[0] for row in conn.execute("SELECT source FROM paused_sources")}


async def test_a_change_made_while_a_restore_runs_is_refused_not_moved_aside(
    tmp_path: Path, procs: Procs
) -> None:
    """restore looked for other processes with the journal open once, before the copy and the
    check of the backup: a pause meanwhile said it paused, and went aside with the replaced
    journal. The journal's write lock is now held until just before the move (a change waits
    for it, then fails), and a process that has the journal open by then stops the restore."""
    journal = tmp_path / "webhookd.db"
    async with Journal(journal) as j:
        for _ in range(3):
            await j.ingest(new_event())
    backup = tmp_path / "backup.db"
    copies.backup(journal, backup)
    shop = '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'
    config = write_config(tmp_path / "webhookd.toml", journal, shop)

    async def restoring() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", _RESTORE_STOPPED_AT_THE_CHECK, str(backup), str(journal)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and await proc.stdout.readline() == b"checked\n"
        return proc

    first = await restoring()
    out = await procs.cli("pause", "shop", "--config", str(config))
    _, err = await first.communicate(b"go on\n")
    assert first.returncode == 0, err.decode()
    assert out.returncode == 1 and "database is locked" in out.stderr, out
    [aside] = [n for n in names(tmp_path) if n.startswith("webhookd.db.replaced-")]
    assert paused(tmp_path / aside) == paused(journal) == set()

    async with Journal(journal):  # a start on the restored journal (WAL on again), stopped
        pass
    before = names(tmp_path)
    second = await restoring()
    with held_open(journal) as pid:
        _, err = await second.communicate(b"go on\n")
        assert second.returncode == 1
        said = err.decode()
        assert said.startswith(f"process {pid} has {journal} open (`{sys.executable} -c ")
        assert said.endswith("`): stop it before a restore\n") and said.count("\n") == 1
        assert names(tmp_path) - {"webhookd.db-wal", "webhookd.db-shm"} == before


async def test_a_restore_refused_for_events_follow_names_it_by_its_command_line(
    tmp_path: Path, procs: Procs
) -> None:
    """A restore refused because `events --follow`, left in another terminal, has the journal
    open says so by its command line, not by a guess of an older daemon."""
    journal = tmp_path / "webhookd.db"
    first = new_event()
    async with Journal(journal) as j:
        await j.ingest(first)
    config = write_config(tmp_path / "webhookd.toml", journal)
    backup = tmp_path / "backup.db"
    copies.backup(journal, backup)
    follow = await spawn(
        ["events", "--follow", "--json", "--config", str(config)],
        tmp_path,
        stdout=asyncio.subprocess.PIPE,
    )
    assert follow.stdout is not None
    try:
        line = await asyncio.wait_for(follow.stdout.readline(), 15)  # the journal is open
        assert json.loads(line)["id"] == first.event.id
        out = await procs.cli("restore", str(backup), "--config", str(config))
    finally:
        follow.send_signal(signal.SIGINT)
        await asyncio.wait_for(follow.communicate(), 15)
    assert out.returncode == 1
    assert out.stderr.startswith(
        f"webhookd: error: process {follow.pid} has {journal} open (`{sys.executable} -m"
        " webhookd events --follow --json --config "  # then the path, cut if it is long
    )
    assert out.stderr.endswith("`): stop it before a restore\n"), out.stderr


async def test_what_a_killed_backup_left_is_deleted_by_the_next(tmp_path: Path) -> None:
    """A backup killed midway leaves its temporary copy (and SQLite's ``-journal`` of it),
    hidden, as large as the journal: the next backup or restore in that folder deletes them,
    and says so, but not a temporary file whose process still runs, nor anything else."""
    journal = tmp_path / "webhookd.db"
    async with Journal(journal) as j:
        for n in range(20):
            await j.ingest(new_event(body=b'{"n": %d}' % n))
    config = write_config(tmp_path / "webhookd.toml", journal)
    folder = tmp_path / "backups"
    folder.mkdir()
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_MIDWAY, str(journal), str(folder / "first.db")
    )
    assert await killed.wait() == -signal.SIGKILL
    left = {f".first.db.{killed.pid}.partial", f".first.db.{killed.pid}.partial-journal"}
    assert names(folder) == left
    running = await asyncio.create_subprocess_exec("cat", stdin=asyncio.subprocess.PIPE)
    try:
        alive = f".second.db.{running.pid}.partial"
        mine = f".third.db.{os.getpid()}.partial"
        others = [alive, mine, ".notes.1.txt", ".first.db.0.partial", "first.db.1.partial"]
        for name in others:
            (folder / name).write_bytes(b"not a leftover of a killed backup")
        out = await cli("backup", str(folder), "--keep", "2", "--config", str(config))
        assert out.exit_code == 0, out.output
        assert out.output.startswith(
            "deleted what a backup or restore killed midway left: "
            + ", ".join(sorted(left))
            + "\nbacked up "
        )
        made = Path(out.output.split(" to ", 1)[1].split(": ", 1)[0])
        assert names(folder) == {made.name, *others}
        assert len(event_ids(made)) == 20
        # A restore sweeps the journal's own folder (where a killed restore leaves its copy).
        stale = tmp_path / f".webhookd.db.{killed.pid}.restoring"
        stale.write_bytes(b"half a journal")
        out = await cli("restore", str(made), "--config", str(config))
        assert out.exit_code == 0, out.output
        assert out.output.startswith(
            f"deleted what a backup or restore killed midway left: {stale.name}\n"
        )
        assert not stale.exists()
    finally:
        running.kill()
        await running.wait()


_KILLED_PUTTING_IN_PLACE = """
import os, signal, sys
from pathlib import Path
from webhookd.journal import copies
real = os.replace
def replace(src, dst, **kw):
    if str(src).endswith(".restored"):  # the backup checked, the old journal moved aside
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, **kw)
os.replace = replace
copies.restore(Path(sys.argv[1]), Path(sys.argv[2]))
"""


async def test_a_restore_killed_while_putting_the_backup_in_place_stops_the_next_start(
    tmp_path: Path,
) -> None:
    """A restore killed once the old journal is moved aside and before the backup has its name
    left no journal there: the next start made an empty one without a word, every dedup key and
    queued job out of its sight. It now refuses, saying what happened; the restore run again
    puts the backup in place and clears what the killed one left."""
    journal = tmp_path / "webhookd.db"
    async with Journal(journal) as j:
        for n in range(5):
            await j.ingest(new_event(body=b'{"n": %d}' % n))
    backup = tmp_path / "backup.db"
    copies.backup(journal, backup)
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_PUTTING_IN_PLACE, str(backup), str(journal)
    )
    assert await killed.wait() == -signal.SIGKILL
    assert not journal.exists()
    with pytest.raises(JournalError, match="a restore stopped while putting a backup"):
        await Journal(journal).open()
    assert not journal.exists()  # nothing made in its place
    config = write_config(tmp_path / "webhookd.toml", journal)
    out = await cli("restore", str(backup), "--config", str(config))
    assert out.exit_code == 0, out.output
    assert len(event_ids(journal)) == 5
    assert not [name for name in names(tmp_path) if name.endswith(".restored")]
    async with Journal(journal) as j:
        assert (await j.counts()).events == 5


def mount_or_skip(command: list[str], takes: str) -> None:
    """Run a ``mount`` ``command``; skip the test when it fails (it ``takes`` root and more),
    but fail it under CI as root, where it must run."""
    mounted = subprocess.run(command, capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = f"{takes}: {mounted.stderr.strip()}"
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"{reason}; CI runs this test as root")
        pytest.skip(reason)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path``: a disk that really fills up."""
    path.mkdir()
    mount_or_skip(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        "mounting a small tmpfs takes root",
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


async def test_a_backup_with_no_room_for_it_is_refused_before_it_writes(tmp_path: Path) -> None:
    """A backup that would not fit is refused at once, saying how much it needs; on the
    journal's own disk it also leaves room for the daemon's commits, so that a backup can
    never turn them into 503s by filling the disk."""
    journal = tmp_path / "webhookd.db"
    async with Journal(journal) as j:
        for n in range(40):
            await j.ingest(new_event(body=b"x" * 100_000 + str(n).encode()))
    with small_disk(tmp_path / "small", "1m") as small:
        config = write_config(tmp_path / "webhookd.toml", journal)
        out = await cli("backup", str(small / "copy.db"), "--config", str(config))
        assert out.exit_code == 1
        assert f"not enough room in {small} for the backup: it needs 4." in out.output
        assert "1.0 MB is free\n" in out.output
        assert names(small) == set()

    with small_disk(tmp_path / "disk", "100m") as disk:
        on_disk = disk / "webhookd.db"
        async with Journal(on_disk):
            pass
        config = write_config(tmp_path / "on-disk.toml", on_disk)
        out = await cli("backup", str(disk / "copy.db"), "--config", str(config))
        assert out.exit_code == 1
        assert "and the journal's disk keeps 134.2 MB for the daemon" in out.output
        assert names(disk) == {"webhookd.db"}


async def test_keep_makes_room_by_deleting_the_backups_it_would_delete_after(
    tmp_path: Path,
) -> None:
    """A nightly ``backup FOLDER --keep 2`` on a disk that holds two backups and not three:
    the old backups were deleted only once the new one was in place, so each night's run was
    refused for want of room, until someone deleted one by hand. With N of 2 or more, the ones
    beyond the newest N-1 go first (and it says so); ``--keep 1`` still never deletes the only
    backup before a new one is in place."""
    journal = tmp_path / "webhookd.db"
    async with Journal(journal) as j:
        for n in range(20):
            await j.ingest(new_event(body=b"x" * 100_000 + str(n).encode()))
    config = write_config(tmp_path / "webhookd.toml", journal)
    size = journal.stat().st_size
    with small_disk(tmp_path / "disk", str(int(size * 2.6))) as disk:
        made = []
        for _ in range(2):
            out = await cli("backup", str(disk), "--keep", "2", "--config", str(config))
            assert out.exit_code == 0, out.output
            assert "to make room" not in out.output
            made.append(Path(out.output.split(" to ", 1)[1].split(": ", 1)[0]).name)
        assert names(disk) == set(made)
        out = await cli("backup", str(disk), "--keep", "1", "--config", str(config))
        assert out.exit_code == 1
        assert f"not enough room in {disk} for the backup" in out.output
        assert names(disk) == set(made)
        out = await cli("backup", str(disk), "--keep", "2", "--config", str(config))
        assert out.exit_code == 0, out.output
        assert f"deleted 1 older backup(s) first, to make room: {made[0]}\n" in out.output
        newest = Path(out.output.split(" to ", 2)[2].split(": ", 1)[0]).name
        assert names(disk) == {made[1], newest}
        assert event_ids(disk / newest) == event_ids(disk / made[1])


async def test_a_backup_that_runs_out_of_room_says_so_and_leaves_nothing(tmp_path: Path) -> None:
    """A disk with room for the journal's pages and not a few KB more: switching the copy out
    of the WAL mode its header came with makes SQLite's -wal and -shm beside it, and the -shm
    found no room. The backup said "disk I/O error", deleted the copy and left the -wal and
    -shm, hidden, that no later backup's sweep knew to delete."""
    journal = tmp_path / "webhookd.db"
    async with Journal(journal) as j:
        for n in range(40):
            await j.ingest(new_event(body=b"x" * 100_000 + str(n).encode()))
    config = write_config(tmp_path / "webhookd.toml", journal)
    size = journal.stat().st_size
    with small_disk(tmp_path / "disk", str(size + 8192)) as disk:
        out = await cli("backup", str(disk / "copy.db"), "--config", str(config))
        assert out.exit_code == 1
        assert out.output.startswith(
            f"webhookd: error: not enough room in {disk} for the backup: the disk filled up"
        ), out.output
        assert names(disk) == set()
        # What a backup killed midway left there: the next one's sweep deletes it all.
        dead = f".copy.db.{2**22 + 1}.partial"
        for name in (dead, f"{dead}-wal", f"{dead}-shm"):
            (disk / name).write_bytes(b"")
        remount = ["mount", "-o", f"remount,size={size * 3}", str(disk)]
        await asyncio.to_thread(subprocess.run, remount, check=True)
        out = await cli("backup", str(disk / "second.db"), "--config", str(config))
        assert out.exit_code == 0, out.output
        assert names(disk) == {"second.db"}


def owner_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


def give(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)


async def test_a_restore_as_root_leaves_the_journal_to_the_daemons_user(tmp_path: Path) -> None:
    """``sudo webhookd restore`` for a daemon that runs as a user of its own: the restored
    journal and the lock file are that user's (the replaced journal's owner, or on a fresh box
    the folder's), not root's 0600 files the daemon could not open."""
    if os.geteuid() != 0:
        pytest.skip("giving files to another user takes root")
    nobody = 65534
    journal = tmp_path / "lib" / "webhookd.db"
    async with Journal(journal):
        pass
    config = write_config(tmp_path / "webhookd.toml", journal)
    good = tmp_path / "good.db"
    assert (await cli("backup", str(good), "--config", str(config))).exit_code == 0
    give(journal, nobody)
    out = await cli("restore", str(good), "--config", str(config))
    assert out.exit_code == 0, out.output
    assert owner_of(journal) == owner_of(Path(f"{journal}-lock")) == (nobody, nobody)

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    give(fresh, nobody)
    config = write_config(tmp_path / "fresh.toml", fresh / "webhookd.db")
    out = await cli("restore", str(good), "--config", str(config))
    assert out.exit_code == 0, out.output
    assert names(fresh) == {"webhookd.db", "webhookd.db-lock"}
    for name in names(fresh):
        assert owner_of(fresh / name) == (nobody, nobody)
