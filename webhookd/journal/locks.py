"""Who holds a SQLite journal: the daemon's serve lock, and SQLite's own lock on its ``-shm``.

A second daemon on one file would run the first one's jobs again (``_take_serve_lock`` refuses
it); a restore or a schema upgrade under any process that has the file open would break it
(``opened_elsewhere`` tells of one). Both locks are the kernel's, so they go with their process
however it ends; a refusal names the holder by its pid and, where it can, its command line.
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
from pathlib import Path

from webhookd.errors import JournalError
from webhookd.redact import printable


def process_running(pid: int) -> bool:
    """Whether a process ``pid`` runs now (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: running
        return True
    except OverflowError:  # no such pid can exist
        return False
    return True


def serve_lock_file(path: Path) -> Path:
    """The daemon's lock file: beside the journal file itself, so that a second daemon reaching
    it through a symlink takes the same lock."""
    return Path(f"{os.path.realpath(path)}-lock")


def serve_lock_held(path: Path) -> bool | None:
    """Whether the ``webhookd serve`` that last took the journal's lock may still run: the pid
    its lock file names runs here. A daemon killed (``kill -9``, a crash) leaves its pid
    behind, which then runs no more. The lock itself is never taken to find out, so a daemon
    starting meanwhile still gets it. ``None`` where the file cannot be read.

    A daemon in another container (another pid namespace) is told by its pid too: often 1,
    which every container has. One whose pid does not exist here is missed; the kernel's
    list of locks (``/proc/locks``) would not show it either, as it lists only the locks of
    the processes a reader can see."""
    try:
        holder = serve_lock_file(path).read_text("ascii", "replace").strip()
    except FileNotFoundError:  # no daemon has started on it
        return False
    except OSError:
        return None
    pid = holder.partition(" ")[0]  # and the verb holding it, since copy and restore take it
    return pid.isdigit() and process_running(int(pid))


# SQLite (os_unix.c) holds a shared POSIX lock on this byte of ``<db>-shm`` in every process
# that has the database open in WAL mode: its "dead man switch", UNIX_SHM_DMS.
_SHM_DMS_BYTE = 128


def opened_elsewhere(path: Path) -> str | None:
    """Who else has the journal open, if another process has (the kernel says so, through
    SQLite's own lock on the ``-shm`` file): ``"process <pid>"``, or a process of another PID
    namespace (a container's, whose pid cannot be seen from here); ``None`` if none, or if it
    cannot tell (the ``struct flock`` read here is Linux's).

    The serve lock tells of a daemon of this webhookd; a daemon of one from before that lock
    (schema versions below 9), a CLI verb or an ``sqlite3`` shell take none, and upgrading the
    schema or restoring under any of them breaks it. This process's own connections do not
    count (POSIX locks are per process), and must not be open yet: closing the descriptor
    opened here drops every lock the process holds on the file, SQLite's included."""
    if sys.platform != "linux":
        return None
    try:
        fd = os.open(f"{os.path.realpath(path)}-shm", os.O_RDONLY)
    except OSError:  # no -shm: nobody has it open in WAL mode
        return None
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, _SHM_DMS_BYTE, 1, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    except OSError:
        return None
    finally:
        os.close(fd)
    if kind == fcntl.F_UNLCK:
        return None
    # The kernel gives 0 for a holder outside this process's PID namespace.
    return f"process {pid}" if pid > 0 else "a process in another PID namespace (a container?)"


# How much of a process's command line a refusal quotes (a restore's, an upgrade's).
_COMMAND_CHARS = 200


def who_holds(holder: str, maybe: str) -> str:
    """How a refusal names ``holder`` (``opened_elsewhere``'s answer): by its command line in
    backquotes (an `events --follow` left open, an sqlite3 shell) where it can be read, else by
    ``maybe``, a guess (another PID namespace's process, one hidden from this user)."""
    pid = holder.removeprefix("process ")
    command = _command_line(int(pid)) if pid.isdigit() else None
    return f"`{command}`" if command else maybe


def _command_line(pid: int) -> str | None:
    """The command line process ``pid`` runs, its arguments joined by spaces, printable and cut
    to ``_COMMAND_CHARS``; None where it cannot be read (gone, hidden from this user, no
    ``/proc``) or is empty (a kernel thread, a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    text = printable(raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace"))
    if len(text) > _COMMAND_CHARS:
        return text[:_COMMAND_CHARS] + " …"
    return text or None


# Who may hold the serve lock, as its file names them after the pid.
_LOCK_VERBS = ("serve", "restore", "copy")


def _take_serve_lock(
    path: Path,
    why: str = "one daemon per SQLite journal (several nodes share a PostgreSQL one)",
    verb: str = "serve",
) -> int:
    """Hold ``<journal>-lock`` for this process's life, or raise ``JournalError`` naming the
    ``webhookd serve`` that holds it, then ``why``; returns the lock file's descriptor. The file
    holds the pid of the process that has it, and its ``verb`` (serve, restore, copy).

    A second daemon on the same file would take the first one's running jobs for an earlier
    boot's at its start (recovery) and run them again beside it. The CLI does not take this
    lock: it reads and writes beside a running daemon by design. The lock is the kernel's
    (``flock``), so it goes with the process however that ends, ``kill -9`` included. It is a
    file of its own: SQLite's POSIX locks on the journal are dropped by closing any descriptor
    of that file in the process, so the journal itself is never opened for this.
    """
    # Never through a symlink: one planted in the journal's folder (by the daemon's user, say)
    # would have a root CLI empty and write any file it points at.
    fd = os.open(
        serve_lock_file(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid, _, held_by = os.pread(fd, 32, 0).decode("ascii", "replace").strip().partition(" ")
        os.close(fd)
        by = f" (pid {pid})" if pid.isdigit() else ""
        verb = held_by if held_by in _LOCK_VERBS else "serve"
        raise JournalError(
            f"journal {path} is in use by another webhookd {verb}{by}: {why}"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {verb}\n".encode(), 0)
    return fd
