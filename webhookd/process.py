"""The daemon's process: its open-files limit, the garbage collector kept off the ack path, its
memory kept from other processes, and a deadline on its exit."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import sys
import threading

from webhookd.actions.command import kill_running_commands
from webhookd.config.sections import Config

log = logging.getLogger("webhookd")

# Young-generation collections every 20,000 net container allocations instead of 700.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_collector() -> None:
    """Take the garbage collector off the ack path.

    By default CPython collects the youngest generation every 700 net allocations and, now and
    then, walks every object the process holds: after startup that is ~45,000 of them (modules,
    config, aiohttp's tables), and such a full pass stalled the event loop for 20-40 ms, a pause
    every webhook in flight waits out. Freezing what exists once the daemon is up moves it out
    of every later collection, and a higher threshold makes young collections rarer; measured
    under full intake load (bench/): GC time per 10 s went from ~330 ms to ~40 ms, with no
    full pass longer than a few ms. Garbage without cycles is freed at once either way.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def keep_memory_private() -> bool:
    """Mark this process not dumpable (Linux's ``PR_SET_DUMPABLE``, as ssh-agent does): its
    ``/proc/<pid>/environ`` and memory, where every ``env:`` secret is, are then readable by
    root alone, not by a ``command`` it runs nor any other process of its user, which could
    otherwise read them whatever environment the command was given. (It also means no core
    dumps, and that ``py-spy`` or ``gdb`` on the daemon need root.) False where not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def keep_descriptors_private() -> int:
    """Make every descriptor but stdin, stdout and stderr that this process was started with
    close at exec; returns how many were not. Those the daemon opens itself are so already,
    but uvloop starts a ``command`` without closing the others (it has no ``close_fds``), so
    whatever a shell, a supervisor or a CI runner left open to the daemon (a pipe it waits on
    for EOF, a readiness descriptor) reached every program, which could write to it or hold
    it open past the daemon's own exit."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: nothing to go by
        return 0
    made = 0
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own, closed since
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
                    made += 1
    return made


# Descriptors kept for everything but the receiver's connections: the journal's files and
# connections, the admin API's, the actions' outgoing connections (up to the pool's limit),
# commands' pipes, logs.
_RESERVED_FILES = 256


def open_files_for(cfg: Config) -> int:
    """Raise the soft limit on open files to what ``server.max_connections`` and the rest need,
    as far as the hard limit allows (a shell's default soft limit is often 1,024); returns the
    connections the receiver may hold: ``server.max_connections``, or, when the hard limit is
    below what it needs, what fits beside the rest (one warning says so).

    At the limit no descriptor is left for the admin API, the actions or the journal, and
    connections to both ports are reset, unlogged (libuv closes what it cannot accept): the
    receiver's cap must come first. Left at a max_connections the limit cannot hold, it never
    did: 1,100 idle connections under a limit of 1,024 took both ports off the air.
    """
    wanted = cfg.server.max_connections
    rest = 2 * cfg.workers.concurrency + _RESERVED_FILES
    need = wanted + rest
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new >= need:
        return wanted
    # A quarter of the limit at least: the rest is reckoned generously (an idle daemon holds a
    # few dozen descriptors), and a receiver of a handful of connections would turn providers
    # away under any load.
    fits = min(wanted, max(new - rest, new // 4))
    log.warning(
        "the open-files limit (%d, hard) is below the %d that server.max_connections = %d"
        " needs with the rest: the receiver takes at most %d connections; raise the limit"
        " (LimitNOFILE=, ulimit -n) or lower server.max_connections",
        hard,
        need,
        wanted,
        fits,
    )
    return fits


# Once the daemon is done, the process gets this long to exit; a thread stuck in I/O (the
# journal's on a dead disk, a sync handler that never returns) would otherwise keep it alive.
EXIT_DEADLINE_S = 5.0
# Past the drain's own time (the answers in flight, then workers.shutdown_grace_s): what the
# close may take before `webhookd serve` exits regardless. The defaults come to 38 s (39 when
# stderr's reader has stalled: logs.DRAIN_S for the last lines), under the shipped unit's
# TimeoutStopSec=40.
STOP_MARGIN_S = 10.0


def exit_within(deadline_s: float, status: int, why: str | None = None) -> threading.Timer:
    """Exit with ``status`` in ``deadline_s`` unless the process has by then, saying ``why``;
    ``cancel()`` the timer returned to call it off."""

    def exit_now() -> None:
        log.error(
            "%s",
            why
            or f"exit took longer than {deadline_s:g}s (a thread or a handler is stuck):"
            " exiting now",
        )
        kill_running_commands()
        logging.shutdown()  # writes what is queued: logs.DRAIN_S at most, if stderr stalled
        os._exit(status)

    timer = threading.Timer(deadline_s, exit_now)
    timer.daemon = True  # never itself a reason to wait at exit
    timer.start()
    return timer
