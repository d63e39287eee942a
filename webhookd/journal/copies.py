"""Copies of a SQLite journal: ``webhookd backup`` and ``webhookd restore``.

A journal cannot be copied with ``cp`` while a daemon writes it: the main file and its ``-wal``
are two files, and a copy of one without the matching other is a torn journal. A backup here is
SQLite's online backup of one moment (a read transaction: the daemon goes on writing beside
it), written under a temporary name, checked with ``PRAGMA quick_check``, synced, and only then
given its name, so a file under that name is always a whole, checked copy.

Restoring has a trap of its own: a ``-wal`` left beside the journal's name belongs to the file
that was there, and SQLite would replay it into the restored one. So a restore holds the serve
lock (no daemon may run meanwhile), checks the copy first, and moves the journal it replaces
aside together with its ``-wal``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from webhookd.errors import JournalError, JournalNewer
from webhookd.journal.files import (
    _BUSY_TIMEOUT_MS,
    _NEARLY_FULL_BYTES,
    _SQLITE_HEADER,
    WAL_SIZE_LIMIT_BYTES,
    foreign,
    interrupted_restores,
    not_a_journal,
    restored_marker,
)
from webhookd.journal.locks import (
    _take_serve_lock,
    opened_elsewhere,
    process_running,
    serve_lock_file,
    who_holds,
)
from webhookd.journal.moved import new_private, sync
from webhookd.journal.schema import MIGRATIONS

# A backup's step: pages copied (4 MB of the journal's 4 KB pages), then synced.
STEP_PAGES = 1024
# Room a backup leaves free on the journal's own disk: what the daemon's WAL may take, twice.
DAEMON_ROOM = 2 * WAL_SIZE_LIMIT_BYTES


# A dated backup's name, ``<journal's stem>-<UTC time>.db``: sorted by name is sorted by time.
_STAMP = "%Y%m%dT%H%M%SZ"
# A second backup within the same second is ``-<UTC time>-2.db``, and so on.
_DATED = re.compile(r"-(\d{8}T\d{6}Z)(?:-([2-9]|[1-9]\d+))?\.db")
# What a backup or a restore writes before the file has its name: ``.<name>.<pid>.partial`` or
# ``.<name>.<pid>.restoring``, with SQLite's files beside it: ``-journal`` while pages go in,
# ``-wal`` and ``-shm`` while it is switched out of WAL mode (the online backup copies the mode).
_SQLITE_FILES = ("-journal", "-wal", "-shm")
_UNFINISHED = re.compile(r"\..+\.([1-9]\d*)\.(?:partial|restoring)(?:-journal|-wal|-shm)?")


class DestinationExists(JournalError):
    """A backup's destination is already there: it is never overwritten."""


@dataclass(frozen=True)
class Copy:
    """What a backup wrote or a restore put in place."""

    path: Path
    size: int
    events: int
    latest: float | None  # the newest event's received_at: what the copy reaches up to
    seconds: float
    replaced: Path | None = None  # restore: where the journal it replaced was moved
    swept: tuple[Path, ...] = ()  # what an earlier backup or restore, killed midway, left
    # restore: where a -wal or -shm left without its journal was moved (no journal was there)
    strays: tuple[Path, ...] = ()
    # backup with ``keep``: older backups deleted before the copy, to make room for it
    made_room: tuple[Path, ...] = ()


def backup(
    journal: Path,
    dest: Path,
    *,
    on_step: Callable[[int, int], object] | None = None,
    step_pages: int = STEP_PAGES,
    keep: int | None = None,
) -> Copy:
    """Copy ``journal`` as of one moment to ``dest``, a file that must not exist yet; it is
    created readable by its owner only, like the journal. ``on_step(bytes_done, size)`` after
    each step; ``step_pages=-1`` copies in one step (unsynced until the end: measured worse).

    ``keep`` (2 or more; ``rotate``'s, for ``dest`` dated in a folder): when the folder has no
    room for the copy, the journal's oldest dated backups beyond the newest ``keep - 1`` (those
    the rotation after it deletes anyway) are deleted first, so a timer's rotation on a disk
    that holds ``keep`` backups does not fail every night; at least one stays meanwhile."""
    try:
        return _backup(journal, dest, on_step, step_pages, keep)
    except OSError as exc:  # a folder that is not there, a full disk, no permission
        if exc.errno == errno.ENOSPC:
            raise _filled(dest.parent, exc.strerror or str(exc)) from exc
        raise JournalError(f"cannot back up {journal} to {dest}: {exc.strerror or exc}") from exc


def _backup(
    journal: Path,
    dest: Path,
    on_step: Callable[[int, int], object] | None,
    step_pages: int,
    keep: int | None,
) -> Copy:
    started = time.monotonic()
    if not journal.is_file():
        raise JournalError(f"no journal at {journal.absolute()}")
    if os.path.lexists(dest):
        raise DestinationExists(f"{dest} already exists: a backup is written to a new file")
    swept = sweep(dest.parent)  # before the room is measured: what it frees counts
    made_room: list[Path] = []
    partial = new_private(dest.parent / f".{dest.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_RDONLY)
    try:
        source = sqlite3.connect(journal, isolation_level=None)
        try:
            source.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            if foreign(source):  # before its header is given an id
                raise JournalError(not_a_journal(journal))
            _give_id(source)
            # One read transaction around every step: the copy is of its first moment, and the
            # daemon's commits meanwhile do not make the backup start over.
            source.execute("BEGIN")
            source.execute("SELECT count(*) FROM sqlite_schema")
            version = int(source.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):  # as every verb that opens it: refused, exit 3
                raise JournalNewer(
                    f"{journal} has schema version {version}, newer than this webhookd"
                    f" understands ({len(MIGRATIONS)}): back it up with the webhookd that"
                    " upgraded it"
                )
            page_size = int(source.execute("PRAGMA page_size").fetchone()[0])
            pages = int(source.execute("PRAGMA page_count").fetchone()[0])
            if keep is not None and keep >= 2 and _short(journal, dest.parent, pages * page_size):
                ours_id = int(source.execute("PRAGMA application_id").fetchone()[0])
                made_room = _delete_oldest(dest.parent, journal.stem, ours_id, keep - 1)
            _check_room(journal, dest.parent, pages * page_size)
            target = sqlite3.connect(partial, isolation_level=None)
            try:
                # Crash safety is the rename's: a partial file is never kept.
                target.execute("PRAGMA synchronous = OFF")

                def synced(_status: int, remaining: int, total: int) -> None:
                    # The disk is the daemon's too: synced a step at a time, the copy never
                    # puts its whole size in the queue ahead of a commit's fsync.
                    os.fsync(fd)
                    if on_step is not None:
                        on_step((total - remaining) * page_size, total * page_size)

                source.backup(target, pages=step_pages, progress=synced)
                # A self-contained file (no -wal of its own); a restore turns WAL back on.
                target.execute("PRAGMA journal_mode = DELETE")
            finally:
                target.close()
        finally:
            source.close()
        events, latest = _check(partial)
        os.fsync(fd)
        if os.path.lexists(dest):
            raise DestinationExists(f"{dest} appeared while the backup ran; nothing was kept")
        os.replace(partial, dest)
        sync(dest.parent)
    except sqlite3.Error as exc:
        # SQLite says "disk I/O error" when the -shm it needs finds no room: the disk says so.
        # (An error of this module's own, such as the check's, has no SQLite code.)
        code = getattr(exc, "sqlite_errorcode", 0)
        if code & 0xFF == sqlite3.SQLITE_FULL or _no_room(dest.parent):
            raise _filled(dest.parent, str(exc)) from exc
        raise JournalError(f"cannot back up {journal}: {exc}") from exc
    finally:
        os.close(fd)
        _remove(partial)
    seconds = time.monotonic() - started
    size = dest.stat().st_size
    return Copy(dest, size, events, latest, seconds, swept=swept, made_room=tuple(made_room))


def dated(folder: Path, journal: Path, at: float) -> Path:
    """Where a backup of ``journal`` made at ``at`` goes in ``folder``: a name of its own per
    second, so a timer's backups sit side by side and ``rotate`` can tell which are oldest;
    ``-2``, ``-3``... after it for another made within the same second."""
    name = f"{journal.stem}-{time.strftime(_STAMP, time.gmtime(at))}"
    path, n = folder / f"{name}.db", 1
    while os.path.lexists(path):
        n += 1
        path = folder / f"{name}-{n}.db"
    return path


def rotate(folder: Path, journal: Path, keep: int, made: Path) -> list[Path]:
    """Delete the oldest of ``journal``'s dated backups in ``folder`` beyond the newest ``keep``,
    the one just ``made`` always among those kept; returns what was deleted, oldest first.

    Only regular files named as ``dated`` names them for this journal, and holding its id as
    ``made`` does, are touched: anything else in the folder (other journals' backups, whatever
    their names, a backup of a webhookd that recorded no id, a copy renamed by hand, a symlink)
    stays. When ``made`` holds no id (its journal could not be given one), none is deleted.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    ours = _dated_backups(folder, journal.stem, journal_id(made))
    # Newest first by name; a file stamped in the future (a clock set back) keeps its place but
    # never pushes out the backup just made.
    kept = [made.name, *[n for n in reversed(ours) if n != made.name][: keep - 1]]
    return _delete(folder, [name for name in ours if name not in kept])


def _dated_backups(folder: Path, stem: str, ours_id: int) -> list[str]:
    """The names of the dated backups in ``folder`` of the journal named ``stem`` whose id is
    ``ours_id`` (none when it is 0), oldest first (by time, then -2, -3... within it)."""
    dated_at = {
        entry.name: (found[1], int(found[2] or 1))
        for entry in os.scandir(folder)
        if entry.name.startswith(stem)
        and (found := _DATED.fullmatch(entry.name, len(stem)))
        and entry.is_file(follow_symlinks=False)
        and ours_id != 0
        and journal_id(entry.path) == ours_id
    }
    return sorted(dated_at, key=dated_at.__getitem__)


def _delete_oldest(folder: Path, stem: str, ours_id: int, keep: int) -> list[Path]:
    """Delete the journal's dated backups in ``folder`` but the newest ``keep`` (before a
    backup, to make room for it); what was deleted, oldest first."""
    ours = _dated_backups(folder, stem, ours_id)
    return _delete(folder, ours[: max(len(ours) - keep, 0)])


def _delete(folder: Path, names: list[str]) -> list[Path]:
    gone = [folder / name for name in names]
    for path in gone:
        with contextlib.suppress(FileNotFoundError):  # another rotation got there first
            path.unlink()
    if gone:
        sync(folder)
    return gone


def _give_id(conn: sqlite3.Connection) -> None:
    """Give the journal ``conn`` has open an id of its own, if it has none yet: a random
    ``application_id`` in its header, which its backups carry, so that ``rotate`` can tell
    them from other journals' of the same name. Once per journal; a journal this process
    cannot write keeps none (its backups are then never deleted by ``rotate``)."""
    if conn.execute("PRAGMA application_id").fetchone()[0]:
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
        if not conn.execute("PRAGMA application_id").fetchone()[0]:  # no other backup's
            conn.execute(f"PRAGMA application_id = {secrets.randbelow(2**31 - 1) + 1}")
        conn.execute("COMMIT")
    except sqlite3.Error:  # read-only, or locked for busy_timeout
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def journal_id(path: Path | str) -> int:
    """The id ``_give_id`` gave the journal a SQLite file at ``path`` is or was a copy of, read
    from its header (a backup has no -wal); 0 when it has none or is not a SQLite file."""
    try:
        with open(path, "rb") as f:
            head = f.read(72)
    except OSError:
        return 0
    if len(head) < 72 or not head.startswith(_SQLITE_HEADER):
        return 0
    return int.from_bytes(head[68:72], "big", signed=True)


def restore(copy: Path, journal: Path) -> Copy:
    """Put the backup ``copy`` in place as ``journal``, with no daemon running on it; the
    journal it replaces, if any, is moved aside, never deleted."""
    try:
        return _restore(copy, journal)
    except OSError as exc:
        raise JournalError(f"cannot restore {copy} to {journal}: {exc.strerror or exc}") from exc


def _restore(copy: Path, journal: Path) -> Copy:
    started = time.monotonic()
    if not copy.is_file():
        raise JournalError(f"no backup at {copy}")
    # The file a symlinked journal.path names, on its own disk: the link stays as it is.
    journal = Path(os.path.realpath(journal))
    journal.parent.mkdir(parents=True, exist_ok=True)
    owner = _owner(journal)
    lock = _take_serve_lock(journal, "stop it before a restore", "restore")
    held: sqlite3.Connection | None = None
    partial: Path | None = None
    try:
        _refuse_if_open(journal, "a daemon of an older webhookd, which takes no serve lock?")
        # Held from this check until the journal is moved aside: a change a CLI verb made
        # meanwhile (a pause, a replay) would be moved aside with it, though it said it was made.
        held = _hold_writes(journal)
        swept = sweep(journal.parent)
        partial = new_private(journal.parent / f".{journal.name}.{os.getpid()}.restoring")
        _give(serve_lock_file(journal), owner)
        _give(partial, owner)
        try:
            _copy_whole(copy, partial)  # into the 0600 file: its mode and owner stay
            events, latest = _check(partial)
        except sqlite3.Error as exc:
            raise JournalError(f"{copy} is not a journal webhookd can restore: {exc}") from exc
        sync(partial)
        if held is not None:  # closed first: asking shuts the -shm, dropping its locks
            held.close()
            held = None
        _refuse_if_open(journal, "a webhookd command run meanwhile?")
        # Checked and on disk: named so that a restore stopped from here on (killed, or a move
        # failing; the old journal half moved aside, or none left under its name) stops the
        # next start instead of letting it begin an empty journal (interrupted_restores).
        ready = restored_marker(journal, os.getpid())
        os.replace(partial, ready)
        sync(journal.parent)
        moved = _move_aside(journal)
        os.replace(ready, journal)
        sync(journal.parent)
        for stale in interrupted_restores(journal):  # an earlier one's, finished by this one
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    finally:
        if held is not None:
            held.close()
        if partial is not None:
            _remove(partial)
        os.close(lock)
    size = journal.stat().st_size
    replaced = moved.pop("", None)
    strays = () if replaced is not None else tuple(moved.values())
    seconds = time.monotonic() - started
    return Copy(journal, size, events, latest, seconds, replaced, swept, strays)


def _remove(partial: Path) -> None:
    """Delete an unfinished copy and SQLite's files beside it, those that are there."""
    for suffix in ("", *_SQLITE_FILES):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{partial}{suffix}")


def _no_room(folder: Path) -> bool:
    """Whether the disk of ``folder`` is full, or all but."""
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _filled(folder: Path, why: str) -> JournalError:
    return JournalError(
        f"not enough room in {folder} for the backup: the disk filled up while it was written"
        f" ({why}); nothing was kept"
    )


def _refuse_if_open(journal: Path, maybe: str) -> None:
    """``JournalError`` if another process has ``journal`` open, named by its command line
    where that can be read, else by ``maybe`` (who, perhaps)."""
    if (holder := opened_elsewhere(journal)) is not None:
        said = who_holds(holder, maybe)
        raise JournalError(f"{holder} has {journal} open ({said}): stop it before a restore")


def _hold_writes(journal: Path) -> sqlite3.Connection | None:
    """A connection holding SQLite's write lock on ``journal`` (``BEGIN IMMEDIATE``, nothing
    written), as ``webhookd copy`` does: another process's change waits ``busy_timeout``, then
    fails saying the journal is locked. None when there is no journal, or none SQLite can
    write: a file without SQLite's header is never opened (closing a connection on it would
    delete its ``-wal``), and is moved aside as it is."""
    try:
        with journal.open("rb") as f:
            if f.read(len(_SQLITE_HEADER)) != _SQLITE_HEADER:
                return None
    except OSError:  # none there, or not this user's to read
        return None
    conn = sqlite3.connect(f"{journal.as_uri()}?mode=rw", uri=True, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        conn.close()
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
            raise JournalError(
                f"another process is writing {journal} ({exc}): stop it before a restore"
            ) from exc
        return None
    return conn


def _copy_whole(copy: Path, into: Path) -> None:
    """The backup's bytes into ``into``; or, when a ``-wal`` beside it holds commits (a journal
    an earlier restore moved aside, put back), the database SQLite reads through both, as one
    self-contained file: copied alone, the file would lose them without a word."""
    wal = Path(f"{copy.resolve()}-wal")  # SQLite's: beside the file a symlink names
    if not (wal.is_file() and wal.stat().st_size > 0):
        shutil.copyfile(copy, into)
        return
    source = sqlite3.connect(f"{copy.resolve().as_uri()}?mode=ro", uri=True)  # its WAL stays
    try:
        target = sqlite3.connect(into, isolation_level=None)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")  # as a backup's: the daemon turns WAL on
        finally:
            target.close()
    finally:
        source.close()


def sweep(folder: Path) -> tuple[Path, ...]:
    """Delete what a backup or a restore killed midway (``kill -9``, a timer's timeout, a power
    cut) left in ``folder``: its files under their temporary names (SQLite's ``-journal``,
    ``-wal`` and ``-shm`` beside them too), whose process is gone.

    Each is about as large as the journal, hidden by its leading dot, and never given a name,
    so nothing else would delete them: a daily timer's leftovers would fill the disk. A file
    whose process is still running (or whose pid a new process has taken since) stays.
    """
    gone = []
    with os.scandir(folder) as entries:
        for entry in entries:
            found = _UNFINISHED.fullmatch(entry.name)
            if found is None or not entry.is_file(follow_symlinks=False):
                continue
            if process_running(int(found[1])):
                continue
            with contextlib.suppress(FileNotFoundError):  # another sweep got there first
                os.unlink(entry.path)
                gone.append(Path(entry.path))
    if gone:
        sync(folder)
    return tuple(sorted(gone))


def _owner(journal: Path) -> os.stat_result:
    """Whose the restored journal is to be: the daemon's, as the journal it replaces says (or
    its lock file, or on a fresh box its folder). Read before the restore creates anything."""
    for path in (journal, serve_lock_file(journal)):
        with contextlib.suppress(FileNotFoundError):
            return path.stat()
    return journal.parent.stat()


def _give(path: Path, owner: os.stat_result) -> None:
    """As root (``sudo webhookd restore`` for a daemon that runs as a user of its own), make
    ``path`` the daemon's: a root-owned 0600 journal or lock file is one it cannot open."""
    now = path.stat()
    if os.geteuid() == 0 and (now.st_uid, now.st_gid) != (owner.st_uid, owner.st_gid):
        os.chown(path, owner.st_uid, owner.st_gid)


def _room(journal: Path, folder: Path) -> tuple[int, int]:
    """What is free in ``folder``, and what a backup must leave free there: on the journal's
    own disk ``DAEMON_ROOM``, or the copy would turn the daemon's commits into 503s while it
    lasts."""
    keep = DAEMON_ROOM if os.stat(folder).st_dev == os.stat(journal).st_dev else 0
    return shutil.disk_usage(folder).free, keep


def _short(journal: Path, folder: Path, size: int) -> bool:
    """Whether ``folder`` has no room for a backup of ``size`` bytes (see ``_check_room``)."""
    free, keep = _room(journal, folder)
    return free - size < keep


def _check_room(journal: Path, folder: Path, size: int) -> None:
    """Refuse a backup its folder has no room for, before writing any of it (``_room``)."""
    free, keep = _room(journal, folder)
    if free - size < keep:
        also = f", and the journal's disk keeps {megabytes(keep)} for the daemon" if keep else ""
        raise JournalError(
            f"not enough room in {folder} for the backup: it needs {megabytes(size)} and"
            f" {megabytes(free)} is free{also}"
        )


def megabytes(size: int) -> str:
    """A file's size as the CLI prints it."""
    return f"{size / 1e6:,.1f} MB"


def _check(path: Path) -> tuple[int, float | None]:
    """``PRAGMA quick_check`` and the schema of a copy; its event count and newest event."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        verdict = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if verdict != ["ok"]:
            raise sqlite3.DatabaseError("quick_check: " + "; ".join(verdict[:3]))
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if not 1 <= version <= len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"schema version {version}, and this webhookd reads 1 to {len(MIGRATIONS)}"
            )
        events, latest = conn.execute("SELECT count(*), max(received_at) FROM events").fetchone()
    finally:
        conn.close()
    return int(events), latest


def _move_aside(journal: Path) -> dict[str, Path]:
    """Rename ``journal`` to ``<name>.replaced-<UTC time>``, with its ``-wal`` and ``-shm``;
    returns where each that was there went, by its suffix (``""`` for the journal itself).

    Moved as they are, not opened here: SQLite deletes a ``-wal`` it cannot apply to a damaged
    file when its connection closes, and the WAL may hold the last commits. (The connection
    that held the write lock meanwhile, opened only on a file with SQLite's header, folded the
    ``-wal`` into it as it closed, as any last connection's close does.) The WAL goes first, so
    that no step leaves it beside a file that is not its own; a ``-wal`` whose journal is gone
    is moved too, or SQLite would replay it into the restored file.
    """
    stamp = time.strftime(_STAMP, time.gmtime())
    aside = journal.with_name(f"{journal.name}.replaced-{stamp}")
    n = 1
    # A name no file of the three has yet: a second restore within the second must not
    # replace what the first moved aside (os.replace would, without a word).
    while any(os.path.lexists(f"{aside}{suffix}") for suffix in ("-wal", "-shm", "")):
        n += 1
        aside = journal.with_name(f"{journal.name}.replaced-{stamp}-{n}")
    moved = {}
    for suffix in ("-wal", "-shm", ""):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{journal}{suffix}", f"{aside}{suffix}")
            moved[suffix] = Path(f"{aside}{suffix}")
    return moved
