"""A SQLite journal whose file was removed or replaced while the daemon had it open.

SQLite goes on writing into a file its descriptors hold after ``rm`` (or an ``rm -rf`` of its
folder, a cleaner of old files, a ``mv``) took its name away: every commit succeeds, and the
whole file goes with the last descriptor, at the daemon's exit. The daemon notices by comparing
what the journal's path names now with what it named at open (``FileIds``, ``moved``), stops
taking writes, and writes what it holds back out through a connection still open on it
(``save_open``: a new connection opened by path would find nothing there, or another file).

The ``-wal`` and ``-shm`` left under the journal's name (``rm`` of the main file alone, a
``mv`` of it) are the moved-away journal's own, and SQLite would replay that ``-wal`` into any
file put at the path, the operator's or the one written back: once the copy is safe they go.

The ``-wal`` removed alone (``rm webhookd.db-wal``, a cleaner of "temporary" files) is the same
trap one level down: SQLite commits into the unlinked ``-wal``, and what no checkpoint has
copied into the file yet is gone with a crash. The daemon notices (``wal_moved``), and copies
it into the file through a connection still open on it (``checkpoint_open``).

The ``-shm`` removed alone loses nothing of the daemon's: its connections share the unlinked
one, mapped. But it is where SQLite keeps the WAL's index and its locks, and a process opening
the journal meanwhile (``webhookd events``, ``replay``, ``backup``) makes another, rebuilt from
the ``-wal`` as it is then: its reads miss every later commit, and a write of its appends
frames where the daemon's go, unseen by the daemon, which overwrites them (or the other way).
The daemon notices it too, and exits once what it was given is written, so that the next start
opens the journal with a ``-shm`` every process shares.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

# A saved copy's name beside another file at the journal's path: ``<name>.saved-<UTC time>``.
SAVED_STAMP = "%Y%m%dT%H%M%SZ"
REMOVED = "removed"
REPLACED = "replaced"
WAL = "-wal"
SHM = "-shm"
_OWN = (WAL, SHM)


@dataclass(frozen=True)
class FileIds:
    """(device, inode) of the journal's file and of its ``-wal`` and ``-shm`` (None: none),
    which SQLite names after the file's real path (``base``: through any symlink)."""

    db: tuple[int, int]
    base: Path
    own: dict[str, tuple[int, int] | None]

    @classmethod
    def of(cls, path: Path) -> FileIds:
        """What ``path`` and its ``-wal`` and ``-shm`` name now; ``OSError`` without a file."""
        base = Path(os.path.realpath(path))
        own = {suffix: _maybe_id(Path(f"{base}{suffix}")) for suffix in _OWN}
        return cls(_id(path), base, own)


def _id(path: Path) -> tuple[int, int]:
    found = os.stat(path)
    return found.st_dev, found.st_ino


def _maybe_id(path: Path) -> tuple[int, int] | None:
    try:
        return _id(path)
    except OSError:
        return None


def moved(path: Path, opened: FileIds) -> str | None:
    """``REMOVED`` when nothing is at ``path`` any more, ``REPLACED`` when another file is,
    ``None`` while it still names the file opened (or when it cannot tell: a folder made
    unreadable; asked again later). One ``stat``: a few microseconds."""
    try:
        now = _id(path)
    except (FileNotFoundError, NotADirectoryError):
        return REMOVED
    except OSError:
        return None
    return None if now == opened.db else REPLACED


def own_moved(opened: FileIds, suffix: str) -> str | None:
    """``REMOVED`` when nothing is at the name of the ``-wal`` or ``-shm`` (``suffix``) opened
    with the journal any more, ``REPLACED`` when another file is, ``None`` while it names that
    one (or when it cannot tell, or none was there at open)."""
    was = opened.own[suffix]
    if was is None:
        return None
    try:
        now = _id(Path(f"{opened.base}{suffix}"))
    except (FileNotFoundError, NotADirectoryError):
        return REMOVED
    except OSError:
        return None
    return None if now == was else REPLACED


def checkpoint_open(conn: sqlite3.Connection, path: Path) -> Saved:
    """Copy every commit in the ``-wal`` ``conn`` has open (unlinked, say) into the journal's
    file at ``path``, which it still names, and sync it: the file alone then holds them all.

    Runs on ``conn``'s own thread, between transactions. Raises ``sqlite3.Error`` (no room for
    the file to grow, a reader in another process holding part of the ``-wal`` back) or
    ``OSError``."""
    row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if row is not None and row[0]:
        raise sqlite3.OperationalError(
            "another process was reading the journal, which held part of its -wal back"
        )
    sync(path)
    return Saved(path, beside=False)


@dataclass(frozen=True)
class Saved:
    """Where ``save_open`` wrote the journal, and whether another file held its path."""

    path: Path
    beside: bool


def save_open(conn: sqlite3.Connection, path: Path, opened: FileIds, at: float) -> Saved:
    """Copy the database ``conn`` has open (its file and ``-wal``, as its reads see them) to
    ``path`` if nothing is there, else to ``<name>.saved-<UTC time at>`` beside it: a file put
    at the path is never overwritten. Missing folders are made (0700); the copy is 0600 and
    synced before it has its name, and its folder synced after.

    The ``-wal`` and ``-shm`` under the journal's name go first, if they are still the ones
    opened with it and their file is gone (see the module); any others there send the copy
    beside them, where they cannot be replayed into it.

    A symlink whose file is gone is written through: the next start follows it, and would
    begin a new journal at its end.

    Runs on ``conn``'s own thread, between transactions. Raises ``OSError`` or
    ``sqlite3.Error``, leaving nothing behind but what it has already saved."""
    if os.path.islink(path) and not os.path.exists(path):
        path = Path(os.path.realpath(path))
    folder = path.parent
    _make_folders(folder)
    # Named as a backup's unfinished copy is: should this process die midway, the next
    # ``webhookd backup`` or ``restore`` in the folder deletes it.
    partial = folder / f".{path.name}.{os.getpid()}.partial"
    with contextlib.suppress(FileNotFoundError):  # a process of this pid long gone left it
        partial.unlink()
    new_private(partial)
    try:
        target = sqlite3.connect(partial, isolation_level=None)
        try:
            conn.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")  # self-contained: no -wal of its own
        finally:
            target.close()
        sync(partial)
        # Only when the file they go with is gone from its real path too: a symlink removed
        # leaves the file it named whole, and that file needs its -wal.
        if _maybe_id(opened.base) != opened.db:
            for suffix in _OWN:
                own = Path(f"{opened.base}{suffix}")
                if opened.own[suffix] is not None and _maybe_id(own) == opened.own[suffix]:
                    with contextlib.suppress(FileNotFoundError):
                        own.unlink()
        saved = _give_name(partial, path, at)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    sync(folder)
    return saved


def _give_name(partial: Path, path: Path, at: float) -> Saved:
    """Link ``partial`` as ``path``, or as the first free ``<name>.saved-<time>[-n]``: a link
    never replaces a file that is there (a rename would)."""
    if not any(os.path.lexists(f"{path}{suffix}") for suffix in _OWN):
        with contextlib.suppress(FileExistsError):
            _link(partial, path)
            return Saved(path, beside=False)
    stamp = time.strftime(SAVED_STAMP, time.gmtime(at))
    dest, n = path.with_name(f"{path.name}.saved-{stamp}"), 1
    while True:
        with contextlib.suppress(FileExistsError):
            _link(partial, dest)
            return Saved(dest, beside=True)
        n += 1
        dest = path.with_name(f"{path.name}.saved-{stamp}-{n}")


def _link(partial: Path, dest: Path) -> None:
    try:
        os.link(partial, dest)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: a rename, once nothing is there
        if os.path.lexists(dest):
            raise FileExistsError(dest) from None
        os.rename(partial, dest)


def _make_folders(folder: Path) -> None:
    """Make ``folder`` and those above it that are gone, each 0700 and synced into its own."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(made, 0o700)
        sync(made.parent)


def new_private(path: Path) -> Path:
    """Create ``path`` empty and 0600 (the journal's bodies may hold secrets)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def sync(path: Path) -> None:
    """fsync a file or a folder (a folder: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def what_happened(path: Path, how: str) -> str:
    """What happened to the journal at ``path`` (``how``: ``moved``'s, or ``-wal`` or ``-shm``
    and ``own_moved``'s), as the lines about it begin."""
    if how.startswith(_OWN):
        suffix, verb = how.split(" ", 1)
        return f"the {suffix} of journal {path} was {verb} while open"
    return f"journal {path} was {how} while open"


def lost_line(what: str, how: str, why: str, tries: int) -> str:
    """The line the daemon exits with when saving the journal's contents failed for good."""
    then = "begins a new journal there" if how == REMOVED else "opens what is there now"
    if how.startswith(WAL):
        then = "opens the journal's file without the commits that were only in its -wal"
    said_tries = f"; {tries} tries" if tries > 1 else ""
    return (
        f"{what}, and saving its contents failed ({why}{said_tries}): they are lost with this"
        " process (a `webhookd backup` taken before holds what it held then); nothing"
        f" was acknowledged once this was seen; exiting: the next start {then}"
    )


def shm_line(what: str) -> str:
    """The line the daemon exits with once the writes it was given before it saw its ``-shm``
    removed or replaced are done."""
    return (
        f"{what}: a process opening the journal now would keep an index and locks of its own,"
        f" its reads missing the daemon's commits and its writes overwriting them (or the"
        f" other way); exiting so that the next start opens it with a {SHM} every process"
        " shares (nothing acknowledged is lost; jobs that were running run again)"
    )


def saved_line(what: str, how: str, saved: Saved, path: Path) -> str:
    """The line the daemon exits with once the journal's contents are saved (``saved``)."""
    if how.startswith(WAL):
        return (
            f"{what}: its contents (every acknowledged webhook) were checkpointed into"
            f" {saved.path}; exiting so that the next start opens it with a {WAL} of its own"
            " (jobs that were running run again)"
        )
    if not saved.beside:
        return (
            f"{what}: its contents (every acknowledged webhook) were written back to"
            f" {saved.path}; exiting so that the next start opens it (jobs that were"
            " running run again)"
        )
    there = "another file is there now" if how != REMOVED else "a file not its own is there"
    return (
        f"{what}: its contents (every acknowledged webhook) were saved to {saved.path}"
        f" ({there}, left as it is); exiting: the next start opens what is at {path}"
        f" (to go on with the saved journal instead: stop webhookd, then `webhookd restore"
        f" {saved.path}`)"
    )
