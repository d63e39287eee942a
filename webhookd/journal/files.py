"""A SQLite journal's file: how it is opened, whether it is one, and what lies beside it.

What is asked of the file before a journal is opened there, and by the verbs that copy one: the
connection's settings (``_PRAGMAS``), whether it is another program's database (``foreign``),
why this process could not use it (``why_unusable``), whether its disk is short of room
(``short_of_room``), its mode (``_owner_only``); and the files left beside it: the marker of a
copy into PostgreSQL (``copied_marker``), the checked backups of restores killed midway
(``interrupted_restores``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import stat
from pathlib import Path

from webhookd.journal.locks import process_running
from webhookd.journal.schema import MIGRATIONS
from webhookd.redact import printable

_BUSY_TIMEOUT_MS = 5000
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
# Only on a new file, before the first table is created, does auto_vacuum take effect; on any
# other it waits for the write lock, so a read-only verb beside a long write (a copy, a backup
# step, another process's transaction) failed "database is locked" for nothing.
_NEW_FILE_PRAGMA = "PRAGMA auto_vacuum = INCREMENTAL"
_PRAGMAS = (
    f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA temp_store = MEMORY",
    # What retention and prune delete is overwritten with zeros in the file, not left in its
    # free space (a build's choice: on in Debian's, off in SQLite's own). The cost, off the ack
    # path: a page a delete frees is written once more, as zeros.
    "PRAGMA secure_delete = ON",
    # A WAL that a long read made grow (a backup, a sqlite3 shell left open) is cut back to this
    # when it next starts over, instead of keeping its largest size on disk until the daemon
    # stops; under load it stays well below it.
    f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}",
)


def restored_marker(journal: Path, pid: int) -> Path:
    """Where restore ``pid`` keeps the checked backup while it moves the old journal aside."""
    return journal.with_name(f".{journal.name}.{pid}.restored")


def interrupted_restores(journal: Path) -> list[Path]:
    """Checked backups that restores killed midway left beside ``journal`` (their process
    gone): each may have left no journal under its name, or one without its ``-wal``."""
    pattern = re.compile(rf"\.{re.escape(journal.name)}\.([1-9]\d*)\.restored")
    try:
        names = os.listdir(journal.parent or ".")
    except OSError:
        return []
    return sorted(
        journal.with_name(name)
        for name in names
        if (found := pattern.fullmatch(name)) and not process_running(int(found[1]))
    )


_SQLITE_HEADER = b"SQLite format 3\x00"


def foreign(conn: sqlite3.Connection) -> bool:
    """Whether the SQLite database ``conn`` has open is another program's: it holds tables (or
    any schema) and no webhookd journal. A journal's first tables are made in the transaction
    that sets its schema version (``user_version``), and every version has its ``events``,
    ``jobs`` and ``dedup``: tables with version 0, or a version without those three (another
    program that sets ``user_version`` for its own migrations), are not a journal. A version
    past this webhookd's is left to the refusal of a newer journal, whatever its tables. Asked
    in one statement, so of one moment: a journal a daemon is making meanwhile is never seen
    with its tables and no version. An empty database, with no table, is no other program's:
    ``serve`` makes its journal in it."""
    version, schema, ours = conn.execute(
        "SELECT (SELECT user_version FROM pragma_user_version),"
        " EXISTS (SELECT 1 FROM sqlite_schema),"
        " (SELECT count(*) FROM sqlite_schema WHERE type = 'table'"
        " AND name IN ('events', 'jobs', 'dedup'))"
    ).fetchone()
    if version > len(MIGRATIONS):
        return False
    return bool(schema) and (not version or ours < 3)


def not_a_journal(path: Path) -> str:
    """The line that refuses a database ``foreign`` tells of at ``path``."""
    return (
        f"{path} holds a database that is not a webhookd journal (tables of its own, none of"
        " webhookd's): set journal.path to a file of webhookd's own; it was left as it is"
    )


def _foreign_file(path: Path) -> bool:
    """``foreign`` of the file at ``path``, asked before a journal is opened there, so before
    anything is changed in it or made beside it (no pragma is run). Only a SQLite file is
    asked (a journal's first start still in its -wal is read through it); False where it
    cannot be read, which opening it as a journal then says."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if len(head) < 64 or not head.startswith(_SQLITE_HEADER):
        return False
    try:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000
        )
    except sqlite3.Error:
        return False
    try:
        return foreign(conn)
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def _owner_only(path: Path) -> bool:
    """Create the journal file 0600, and tighten an existing one and its -wal and -shm to 0600;
    whether it created the file (there was none).

    It holds every webhook body, and so whatever secrets senders put in them. SQLite creates the
    -wal and -shm files with the main file's mode, so creating that one first is what keeps them
    private; a file made world-readable by an older version is tightened too. A journal owned by
    another user (a read-only look by an operator) is left as it is.

    The -wal and -shm are SQLite's, not the operator's: one of any other mode is made 0600. A
    start on a journal made read-only (0400) leaves them 0400, and after the journal is made
    writable again a read-only -shm would keep every start failing with "readonly database".
    """
    # At the file's real path: through a symlink whose file is not made yet (the journal moved
    # to a data disk, first start) O_EXCL meets the link, and SQLite would create the file.
    path = Path(os.path.realpath(path))
    created = False
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        created = True
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except OSError:
        return created  # unreadable: opening it says why
    if head and head != _SQLITE_HEADER:
        return created  # not a journal (a journal.path that names another file by mistake)
    for name, exact in ((path, False), (Path(f"{path}-wal"), True), (Path(f"{path}-shm"), True)):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            mode = name.stat().st_mode
            # A file only: a folder (a path that names one by mistake) is never touched.
            if stat.S_ISREG(mode) and (stat.S_IMODE(mode) != 0o600 if exact else mode & 0o077):
                name.chmod(0o600)
    return created


# Below this much space for this user, a failure to open the journal is put down to the disk.
_NEARLY_FULL_BYTES = 1 << 20


def _nearest_folder(path: Path) -> Path:
    """The folder of ``path``, or its nearest ancestor that exists (``open`` makes the rest)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def why_unusable(path: Path) -> str | None:
    """Why this process could not use a journal at ``path``, as far as it can see, or None:
    another user's file, a folder it cannot create files in (the nearest that exists: ``open``
    makes the rest), a disk with no room. SQLite itself says only "unable to open database
    file" or "disk I/O error"; ``webhookd check`` warns of the same before a start."""
    try:
        folder = _nearest_folder(path)
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            # access() fails with EROFS there too, which would read as a permission problem.
            return f"the filesystem of {folder} is mounted read-only"
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            st = path.stat()
            return (
                f"this user, uid {os.geteuid()}, cannot read and write it: owner uid"
                f" {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            return (
                f"this user, uid {os.geteuid()}, cannot create files in {folder}, where"
                " SQLite keeps the journal's -wal and -shm"
            )
        usage = os.statvfs(folder)
        if not usage.f_blocks:  # /proc, /sys: a filesystem with no room at all
            return f"{folder} is on no disk: a filesystem of the kernel's, with no room for files"
        if usage.f_bavail * usage.f_frsize < _NEARLY_FULL_BYTES:
            return f"no space left on the disk of {folder}"
    except OSError:
        pass
    return None


def read_only(path: Path) -> str | None:
    """Why a journal at ``path`` cannot be written to, when its file system will write nothing
    (mounted read-only, or turned so by the kernel after an I/O error, which ext4 may not show
    in the mount's flags), else None. SQLite says only "disk I/O error" then. Asked by making a
    file with no name in the folder (``O_TMPFILE``, gone at its close): nothing is left, and no
    descriptor of SQLite's files is opened or closed (a close would drop SQLite's locks)."""
    folder = Path(os.path.realpath(path)).parent
    said = f"the file system of {folder} is read-only"
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return said
        fd = os.open(folder, getattr(os, "O_TMPFILE", 0) | os.O_WRONLY, 0o600)
    except OSError as exc:
        return said if exc.errno == errno.EROFS else None
    os.close(fd)
    return None


def someone_elses(path: Path) -> str | None:
    """What ``serve`` and ``check`` warn of a journal at ``path`` that another user owns (not
    root, not this user): its owner can read every webhook the daemon writes into it whatever
    its mode (a journal.path in a shared folder such as /tmp, where anyone may create the file
    first); None otherwise, or when it cannot tell."""
    try:
        owner = path.stat().st_uid
    except OSError:
        return None
    if owner in (0, os.geteuid()):
        return None
    return (
        f"owned by uid {owner}, not by this user (uid {os.geteuid()}): that user can read every"
        " webhook written into it, whatever its mode; keep the journal in a folder only"
        " webhookd's user may write (the shipped unit's /var/lib/webhookd), owned by that user"
    )


# The room a SQLite journal's disk should keep free: its WAL at its size limit, and as much
# again for a checkpoint to grow the journal file by what the WAL holds (see the README's
# full-disk paragraph: with less, a burst can fill the disk with WAL, and then no checkpoint,
# so no write, ends until room is made).
ROOM_WANTED_BYTES = 2 * WAL_SIZE_LIMIT_BYTES


def short_of_room(path: Path) -> str | None:
    """What ``serve`` and ``check`` warn of a journal at ``path`` whose disk has less free than
    ``ROOM_WANTED_BYTES``, counting the room its -wal already holds as its own; None when it
    has that room, or it cannot tell (``why_unusable`` says why then)."""
    folder = _nearest_folder(path)
    try:
        usage = os.statvfs(folder)
        wal = path.with_name(path.name + "-wal")
        held = wal.stat().st_size if wal.exists() else 0
    except OSError:
        return None
    free = usage.f_bavail * usage.f_frsize
    if not usage.f_blocks or free + held >= ROOM_WANTED_BYTES:
        return None
    return (
        f"the disk of {folder} has {free >> 20} MiB free: keep {ROOM_WANTED_BYTES >> 20} MiB"
        f" free there, as a burst can fill {WAL_SIZE_LIMIT_BYTES >> 20} MiB of the journal's"
        " -wal and a checkpoint needs as much again; a disk that fills is answered 503 until"
        " room is made"
    )


def _why_not(path: Path) -> str:
    """``why_unusable`` for the end of an error, in parentheses, or nothing."""
    why = why_unusable(path)
    return f" ({why})" if why else ""


def _other_file(exc: OSError, path: Path) -> str:
    """The file an error was about, when it is not the journal itself (its lock file, say)."""
    return f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""


def copied_marker(path: Path) -> Path:
    """The file ``webhookd copy`` leaves beside a SQLite journal it copied into PostgreSQL:
    while it is there, ``serve`` (and ``check``) refuse the journal, whose queued jobs now run
    from the copy. It says where and when."""
    return Path(f"{os.path.realpath(path)}-copied")


# What a marker holds at most: "copied into <URL, password masked> at <time>".
_MARKER_BYTES = 512


def copied_to(path: Path) -> str | None:
    """What ``copied_marker`` says of the journal at ``path`` (where and when it was copied
    into PostgreSQL), or None when there is none. Read as a small regular file, never
    through a symlink (one planted in the journal's folder would have an error quote any
    file); a marker that cannot be read that way still marks the journal copied."""
    try:
        fd = os.open(copied_marker(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return "copied into PostgreSQL (its marker cannot be read)"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "copied into PostgreSQL (its marker is not a file)"
        said = os.read(fd, _MARKER_BYTES).decode("utf-8", "replace")
    except OSError:
        return "copied into PostgreSQL (its marker cannot be read)"
    finally:
        os.close(fd)
    return printable(said.strip()) or "copied into PostgreSQL"
