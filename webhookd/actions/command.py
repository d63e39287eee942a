"""The ``command`` action: run a program with the event's raw body on stdin, never a shell.

``argv`` is a list; each argument may hold ``{{ }}`` lookups, and a looked-up value stays one
argument whatever it contains (put ``--`` before such arguments if the program takes options).
The environment is minimal, because output tails are shown by the API and a program should
not see the daemon's secrets: ``PATH``, ``HOME``, ``LANG``, ``LC_*`` and ``TZ`` from the daemon,
the names ``inherit_env`` lists (``*`` globs allowed), the action's ``env`` table, then
``WEBHOOKD_EVENT_ID``, ``WEBHOOKD_SOURCE`` and ``WEBHOOKD_QUERY`` (the URL's query as received,
empty when it had none). A NUL byte in a rendered argument (a payload can
hold one, a program argument cannot) makes the attempt dead. Exit 0 is done, an exit code listed
in ``permanent_exit_codes`` is dead, anything else (another code, a signal) is retried. A
program that cannot start because the daemon is out of descriptors waits a few seconds, using
no attempt. The last 2 KB of stdout and stderr are kept with the attempt.

The program runs in its own session (process group). When the action's ``timeout_s`` passes, or
the daemon drains, the whole group gets SIGTERM, then SIGKILL after a short grace; when the
program exits, whatever it left running in its group is killed too, so nothing outlives its job
(start long-lived services through a service manager, not from a hook). A process it left in a
session of its own (setsid) is out of that reach and may hold the program's output open: the
program's exit status is the outcome all the same, even when ``timeout_s`` or a drain ends the
short wait for that output.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from webhookd.actions.base import (
    Outcome,
    Resources,
    excerpt,
    keep_detail,
    keep_outcome,
    options,
    rendered,
)
from webhookd.actions.targets import no_template
from webhookd.config.reading import text_or_secret
from webhookd.config.sections import ActionConfig, ActionDefaults
from webhookd.errors import ConfigError
from webhookd.models import Event, Job
from webhookd.redact import SPARE_BYTES, Masker, inherited_env, secret_values
from webhookd.templates import Template, compile_template, payload_of

log = logging.getLogger("webhookd.actions.command")

# A deploy script or a build may well run for minutes.
DEFAULTS = ActionDefaults(timeout_s=300.0)
_OPTIONS = ("argv", "cwd", "env", "inherit_env", "permanent_exit_codes")
# What any program needs to find its tools and speak the right locale; nothing that can be a secret.
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_*", "TZ")
TAIL_BYTES = 2048
_KILL_GRACE_S = 2.0
# A program that could not start for want of descriptors waits this long, using no attempt:
# the shortage is the daemon's (its connections, other commands' pipes), not the job's, and
# retried on backoff a job went dead within seconds of it.
_NO_FILES_WAIT_S = 5.0
# Descriptors a start takes at once (uvloop's: a socket pair for each of the three pipes, and
# its own; asyncio's take 7).
_START_FILES = 10
# The process groups of the commands running now. An exit that cannot wait for them (a second
# signal, an exit stuck on a thread) SIGKILLs them first: each would otherwise outlive the daemon
# and run beside the same job's next attempt once the next start recovers it.
_RUNNING_GROUPS: set[int] = set()


class _Settings:
    def __init__(self, config: ActionConfig) -> None:
        t = options(config, _OPTIONS)
        argv = t.raw("argv", None)
        if not isinstance(argv, list) or not argv:
            raise ConfigError(t.path("argv"), "is required: a non-empty array of strings")
        for i, arg in enumerate(argv):
            if isinstance(arg, str) and "\0" in arg:
                raise ConfigError(f"{t.path('argv')}[{i}]", "cannot contain a NUL character")
        self.argv: tuple[Template, ...] = tuple(
            compile_template(arg, f"{t.path('argv')}[{i}]") for i, arg in enumerate(argv)
        )
        if self.argv[0].has_lookups:
            raise ConfigError(f"{t.path('argv')}[0]", "the program itself cannot be a lookup")
        if not argv[0]:
            raise ConfigError(f"{t.path('argv')}[0]", "must name the program to run")
        if (code := _lookup_in_code(self.argv)) is not None:
            at, program = code
            if program == "ssh":
                raise ConfigError(
                    f"{t.path('argv')}[{at}]",
                    "has a lookup in what ssh runs: ssh joins its arguments into one line for"
                    " the remote shell, so a sender's value such as 'main; curl … | sh' would"
                    " run as code there, an argument of its own or not. Let the remote command"
                    " read the payload from its stdin (ssh passes the body on)",
                )
            raise ConfigError(
                f"{t.path('argv')}[{at}]",
                f"has a lookup in the code (or the script) {program!r} runs: a sender's value"
                " such as 'main; curl … | sh' would run as code. Pass the value as an argument"
                """ of its own after the code, which reads it as "$1" (sh) or sys.argv[1]"""
                """ (python): argv = ["sh", "-c", 'deploy "$1"', "sh", "{{ ref }}"]""",
            )
        cwd = t.raw("cwd", None)
        if cwd is not None and (not isinstance(cwd, str) or not cwd):
            raise ConfigError(t.path("cwd"), "must be a directory path")
        if cwd is not None:
            no_template(cwd, t.path("cwd"))  # else a directory of that name is looked for
            if not os.path.isdir(cwd):
                raise ConfigError(t.path("cwd"), f"{cwd!r} is not a directory")
        self.cwd: str | None = cwd
        env = t.raw("env", {})
        if isinstance(env, Mapping) and all(isinstance(v, str) for v in env.values()):
            # A value written env:NAME or file:PATH is that secret, handed to this command only
            # (a PEM key, several lines, as well).
            for k, v in env.items():
                no_template(v, f"{t.path('env')}.{k}")
            env = {k: text_or_secret(v, f"{t.path('env')}.{k}", lines=True) for k, v in env.items()}
        if not isinstance(env, Mapping) or not all(
            _env_name(k) and isinstance(v, str) and "\0" not in v for k, v in env.items()
        ):
            raise ConfigError(t.path("env"), "must be a table of strings (no NUL, no '=' in names)")
        self.env: dict[str, str] = dict(env)
        inherit = t.raw("inherit_env", [])
        if not isinstance(inherit, list) or not all(_env_name(n) for n in inherit):
            raise ConfigError(
                t.path("inherit_env"), 'must be an array of variable names or globs like "AWS_*"'
            )
        self.inherit: tuple[str, ...] = (*_BASE_ENV, *inherit)
        codes = t.raw("permanent_exit_codes", [])
        if not isinstance(codes, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 255 for c in codes
        ):
            raise ConfigError(t.path("permanent_exit_codes"), "must be an array of codes 1-255")
        self.permanent: frozenset[int] = frozenset(codes)


# Programs that run an argument as code, the option that comes before that argument (a shell's
# ``-c``, alone or among its other letters: ``-ec``, ``-lc``; Python's ``-c``; Perl's and Ruby's
# ``-e``, ``-ne``; Node's ``-e``/``--eval``; PHP's ``-r``) and their options that take the next
# argument as their value (``bash -o pipefail -c``). A lookup in that argument makes a sender's
# text code; as an argument of its own after it, it is only text. The program's options end at
# its first other argument (a script: ``python3 deploy.py -c x`` is the script's own ``-c``).
_RUNS_CODE: tuple[tuple[re.Pattern[str], re.Pattern[str], frozenset[str]], ...] = (
    (
        re.compile(r"(?:ba|da|z|k|mk|a|c|tc|fi|y)?sh|busybox"),
        re.compile(r"-[A-Za-z]*c[A-Za-z]*"),
        frozenset({"-o", "+o", "-O", "+O", "--rcfile", "--init-file"}),
    ),
    (re.compile(r"python[0-9.]*|pypy[0-9.]*"), re.compile(r"-[A-Za-z]*c"), frozenset({"-W", "-X"})),
    (re.compile(r"perl[0-9.]*"), re.compile(r"-[A-Za-z]*[eE]"), frozenset({"-I"})),
    (re.compile(r"ruby[0-9.]*"), re.compile(r"-[A-Za-z]*e"), frozenset({"-I", "-r", "-C"})),
    (
        re.compile(r"node(?:js)?"),
        re.compile(r"-e|--eval|-p|--print"),
        frozenset({"-r", "--require", "--import", "--loader", "-C", "--conditions"}),
    ),
    (re.compile(r"php[0-9.]*"), re.compile(r"-r"), frozenset({"-c", "-d", "-z"})),
)


def _lookup_in_code(argv: tuple[Template, ...]) -> tuple[int, str] | None:
    """The index of an argument with a lookup that a shell or an interpreter named before it
    runs as code (``["sh", "-c", "deploy {{ ref }}"]``, also behind ``sudo`` or ``env``; any
    argument after ``ssh``, which joins them into one line for the remote shell), and that
    program's name, if any."""
    for at, arg in enumerate(argv):
        if arg.has_lookups:
            continue
        name = os.path.basename(arg.text)
        if name == "ssh":
            looked_up = [i for i in range(at + 1, len(argv)) if argv[i].has_lookups]
            return (looked_up[0], name) if looked_up else None
        for program, code_option, takes_value in _RUNS_CODE:
            if program.fullmatch(name):
                # The arguments after it are its own (the "sh" in ``sh -c '…' sh {{ ref }}``
                # names $0, and runs nothing).
                code = _code_argument(argv, at + 1, code_option, takes_value)
                return (code, name) if code is not None and argv[code].has_lookups else None
    return None


def _code_argument(
    argv: tuple[Template, ...], at: int, code_option: re.Pattern[str], takes_value: frozenset[str]
) -> int | None:
    """Where the code is among a program's arguments (from ``at``): after its code option, or
    a lookup where it reads its options or the name of its script (``["python3", "{{ x }}"]``
    runs what the sender names), while its own options last; None when it has none."""
    while at < len(argv):
        if argv[at].has_lookups:
            return at
        option = argv[at].text
        if code_option.fullmatch(option):
            at += 2 if argv[at + 1 : at + 2] and argv[at + 1].text == "--" else 1
            return at if at < len(argv) else None
        if option == "--":
            return at + 1 if at + 1 < len(argv) else None  # the script's name follows
        if not option.startswith(("-", "+")):
            return None  # a script named as written, whose own options follow
        at += 2 if option in takes_value else 1
    return None


def _looked_up(program: str, cwd: str | None) -> str:
    """Where a program that would not start was looked for, when its name alone does not say:
    a relative path is taken from the daemon's working directory (or ``cwd``), which depends
    on where it was started."""
    if os.path.isabs(program):
        return ""
    if "/" in program:
        return f" (relative to {os.path.abspath(cwd or os.curdir)})"
    return " (on the PATH)"


def _interpreter_missing(program: str, env: Mapping[str, str], cwd: str | None) -> str | None:
    """Why a program that is there fails to start as if it were not (ENOENT): the interpreter
    its ``#!`` line names is not (``_shebang_problem``), or what a binary needs to run (its
    ELF loader). ``None`` when the program itself is not there."""
    if "/" in program:
        found: str | None = os.path.join(cwd or os.curdir, program)
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None or not os.path.isfile(found):
        return None
    return _shebang_problem(found) or "the file is there, but the loader it needs to run is not"


def _shebang_problem(file: str) -> str | None:
    """What is wrong with the ``#!`` line of ``file``, whose program then fails to start as if
    the file were not there: the interpreter it names is not (``#!/usr/bin/python`` where only
    python3 is), or names none at all, as in a script saved with Windows line endings, whose
    ``#!/bin/sh`` ends in a carriage return."""
    try:
        with open(file, "rb") as f:
            head = f.readline(512)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    named = head[2:].rstrip(b"\n").lstrip(b" \t").replace(b"\t", b" ").split(b" ", 1)[0]
    interpreter = named.decode("utf-8", "replace")
    if not os.path.isabs(interpreter) or (
        os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)
    ):
        return None
    said = f"the interpreter its #! line names, {interpreter!r}, is not there"
    if interpreter.endswith("\r"):
        said += " (the file has Windows line endings: convert it with dos2unix)"
    return said


def _cwd_gone(cwd: str | None) -> str | None:
    """Why a program cannot start in ``cwd``, when that folder is what is wrong: it was there
    when the config was read, and has gone since (a release folder deleted, a mount lost)."""
    if cwd is None or os.path.isdir(cwd):
        return None
    return f"its cwd {cwd!r} is no longer a directory"


# Until when each start first counts the descriptors left (``_out_of_files``): for a while
# after one failed for want of them. Counting at every start listed /proc/self/fd on the
# event loop, 0.6 ms at 1,000 open connections and 5 ms at 9,000.
_files_short_until = -math.inf
_SHORT_WATCH_S = 60.0


def _files_ran_short() -> None:
    global _files_short_until
    _files_short_until = time.monotonic() + _SHORT_WATCH_S


def _out_of_files(exc: OSError | None = None) -> str | None:
    """What has run out, when a program cannot start for want of a descriptor: before a start
    (``exc`` None), fewer are left under the daemon's open-files limit than a start takes;
    after one failed, ``exc`` is EMFILE or ENFILE, or an error with no errno of its own while
    that is so (uvloop passes libuv's -1, "Unknown error -1", when it cannot make a pipe)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    at_limit = f"too many open files: the daemon is at its open-files limit ({soft})"
    if exc is not None:
        if exc.errno == errno.EMFILE:
            return at_limit
        if exc.errno == errno.ENFILE:
            return "too many open files in the system"
        if exc.errno in errno.errorcode:
            return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        held = len(os.listdir("/proc/self/fd")) - 1  # not the listing's own
    except OSError as listing:  # the listing takes a descriptor too: at the limit, none is left
        return at_limit if listing.errno == errno.EMFILE else None
    return at_limit if soft - held < _START_FILES else None


def _env_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "=" not in name and "\0" not in name


def validate(config: ActionConfig) -> None:
    _Settings(config)


def missing_program(config: ActionConfig) -> str | None:
    """Why this command's program would not start, if it is not there now (``check`` and the
    daemon's start warn of it; not an error, as it may be installed after the config is
    checked): every job of the action would fail until it is."""
    settings = _Settings(config)
    program = settings.argv[0].render({})
    path = settings.env.get("PATH", os.environ.get("PATH", os.defpath))
    found: str | None
    if "/" in program:
        where = os.path.join(settings.cwd or os.curdir, program)
        found = where if os.path.isfile(where) and os.access(where, os.X_OK) else None
    else:
        found = shutil.which(program, path=path)
    if found is None:
        return f"{program!r} is not an executable file{_looked_up(program, settings.cwd)}"
    if (problem := _shebang_problem(found)) is not None:
        return f"{program!r}: {problem}"
    return None


class _Tail:
    """The last ``TAIL_BYTES`` of a stream, kept as it comes so big outputs cost nothing."""

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        del self.data[: -(TAIL_BYTES + SPARE_BYTES)]

    def text(self, most: int = TAIL_BYTES) -> str:
        """The last ``most`` bytes as text, masked: what was read before them only tells
        whether a secret began there (see ``Masker.after``)."""
        cut_at = max(len(self.data) - most, 0)
        before = self.data[:cut_at].decode("utf-8", "replace")
        shown = self.masker.after(
            before + self.data[cut_at:].decode("utf-8", "replace"), len(before)
        )
        return ("…" if self.total > len(self.data) - cut_at else "") + shown


class _Watch(asyncio.SubprocessProtocol):
    """Collects output tails and tells apart "the program exited" from "its pipes closed".

    A program's children can hold its stdout open after it exits, so waiting for the pipes
    (as ``Process.wait()`` does) could outlast the program by hours. Events, not futures: a
    timeout or a drain cancels whoever waits, and a cancelled future could not be waited on
    again to see the group die.
    """

    def __init__(self, masker: Masker) -> None:
        self.out, self.err = _Tail(masker), _Tail(masker)
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        chunk = data.encode() if isinstance(data, str) else data
        (self.out if fd == 1 else self.err).add(chunk)

    def process_exited(self) -> None:
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()


class CommandAction:
    def __init__(self, config: ActionConfig, masker: Callable[[], Masker]) -> None:
        self.config = config
        self.settings = _Settings(config)
        # The worker masks what an attempt records as well; this also masks a secret the
        # tails' cut falls inside (see ``SPARE_BYTES``). Asked at each run: an action a
        # reload kept is given that reload's secrets too.
        self.masker = masker

    def argv_for(self, event: Event) -> list[str]:
        payload: Any = payload_of(event) if any(a.has_lookups for a in self.settings.argv) else {}
        return [arg.render(payload) for arg in self.settings.argv]

    def env_for(self, event: Event) -> dict[str, str]:
        return {
            **inherited_env(self.settings.inherit),
            **self.settings.env,
            "WEBHOOKD_EVENT_ID": event.id,
            "WEBHOOKD_SOURCE": event.source,
            "WEBHOOKD_QUERY": event.query,
        }

    async def run(self, event: Event, job: Job) -> Outcome:
        argv = await rendered(event, lambda: self.argv_for(event))
        for i, arg in enumerate(argv):
            if "\0" in arg:
                # execve would cut the argument short (uvloop does so silently): never run that.
                return Outcome.dead(f"argv[{i}] contains a NUL byte (from the payload)")
            if not arg.isascii():
                try:  # as the start encodes it: a lone surrogate ("\ud800" in JSON) is no byte
                    arg.encode("utf-8", "surrogateescape")
                except UnicodeEncodeError:  # every retry would fail alike
                    return Outcome.dead(
                        f"argv[{i}] holds a lone surrogate (from the payload): no argument can"
                        " carry it"
                    )
        env = self.env_for(event)
        # Not tried short of descriptors: a start that uvloop cannot finish leaves the ones it
        # had made open for good (3 a time, measured) and its loop unable to close at the exit.
        if _files_short_until > time.monotonic() and (short := _out_of_files()) is not None:
            return Outcome.wait(f"cannot start {argv[0]!r}: {short}", _NO_FILES_WAIT_S, held=True)
        started = time.monotonic()
        watch = _Watch(self.masker())
        try:
            transport, _ = await asyncio.get_running_loop().subprocess_exec(
                lambda: watch,
                *argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.settings.cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            if (short := _out_of_files(exc)) is not None:
                _files_ran_short()
                return Outcome.wait(
                    f"cannot start {argv[0]!r}: {short}", _NO_FILES_WAIT_S, held=True
                )
            where = _looked_up(argv[0], self.settings.cwd)
            error = f"cannot start {argv[0]!r}{where}: {exc.strerror or exc}"
            if (gone := _cwd_gone(self.settings.cwd)) is not None:
                # The start fails as for a missing program (ENOENT), which is not what is wrong.
                error = f"cannot start {argv[0]!r}: {gone}"
            elif exc.errno == errno.ENOENT and (
                needs := _interpreter_missing(argv[0], env, self.settings.cwd)
            ):
                error = f"cannot start {argv[0]!r}{where}: {needs}"
            if exc.errno == errno.E2BIG:  # the payload made the arguments too long: every time
                return Outcome.dead(error)
            # A missing program may appear (a deploy in progress); retry rather than give up.
            return Outcome.retry(error)
        pid = transport.get_pid()
        _RUNNING_GROUPS.add(pid)
        code: int | None = None  # the program's exit status, once it has exited
        try:
            # uvloop's pipe transports do not subclass asyncio.WriteTransport, but have its methods.
            stdin = cast(asyncio.WriteTransport | None, transport.get_pipe_transport(0))
            # The transport buffers what the pipe cannot take yet and close() flushes it first;
            # a program that never reads stdin closes the pipe, and the transport drops the rest
            # (EPIPE) without raising. A program that has already exited may have had its pipe
            # closed under us: uvloop then refuses the write, and there is no one left to read.
            if stdin is not None and not stdin.is_closing():
                stdin.write(event.body)
                stdin.close()
            await watch.exited.wait()
            code = transport.get_returncode()
            _kill_group(pid, signal.SIGKILL)  # leftovers would hold the pipes open
            # Only a process that left the group (setsid) can still hold them: the program's
            # exit status stands without waiting for it, else a deploy script that exited 0
            # would be cut off at timeout_s and run again.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_KILL_GRACE_S):
                    await watch.closed.wait()
        except BaseException as exc:
            if code is not None:
                # The program had exited: timeout_s or a drain ended only the wait for its
                # pipes. Its exit status is the attempt's outcome (the worker records it, and
                # a deploy that exited 0 is not run again); its group is gone already.
                keep_outcome(exc, self._outcome(argv[0], code, watch, started))
                log.warning(
                    "command %s (pid %d) for event %s had exited (status %d) but a process it"
                    " left in a session of its own still held its output when the attempt was"
                    " cut: recorded by its exit status",
                    argv[0],
                    pid,
                    event.id,
                    code,
                )
                raise
            # Timed out or cancelled by a drain: end the whole group, then let the error go on,
            # with what the program wrote so far for the attempt's record.
            await asyncio.shield(_stop(pid, watch))
            keep_detail(
                exc,
                program=argv[0],
                duration_s=round(time.monotonic() - started, 4),
                stdout=watch.out.text(),
                stderr=watch.err.text(),
            )
            tail = watch.err.text(500)
            log.warning(
                "command %s (pid %d) for event %s stopped before it finished%s",
                argv[0],
                pid,
                event.id,
                f"; stderr tail: {tail}" if tail else "",
            )
            raise
        finally:
            _RUNNING_GROUPS.discard(pid)
            transport.close()
        if code is None:  # cannot happen after process_exited; keep the type honest
            return Outcome.retry(f"{argv[0]}: no exit status")
        return self._outcome(argv[0], code, watch, started)

    def _outcome(self, program: str, code: int, watch: _Watch, started: float) -> Outcome:
        """The outcome of a program that exited with ``code``, with what it wrote; and, when a
        process it left in a session of its own still holds its pipes, a note that it does
        (what that process writes is not kept)."""
        detail: dict[str, Any] = {
            "exit_code": code,
            "duration_s": round(time.monotonic() - started, 4),
            "stdout": watch.out.text(),
            "stderr": watch.err.text(),
        }
        if not watch.closed.is_set():
            detail["pipes"] = (
                "still held open after the program exited, by a process it left in a session"
                " of its own (setsid): its output after that is not kept"
            )
        if code == 0:
            return Outcome.done({"exit_code": 0}, **detail)
        reason = f"exit code {code}" if code > 0 else f"killed by signal {-code}{_named(-code)}"
        # Its last line on stderr, where a program says why it failed: the log line, the
        # alert and the dead-letter list then say it too, not only ``show``.
        last = next((ln for ln in reversed(watch.err.text(500).splitlines()) if ln.strip()), "")
        said = f"; stderr: {excerpt(last)}" if last else ""
        if code in self.settings.permanent:
            return Outcome.dead(f"{program}: {reason} (permanent){said}", **detail)
        return Outcome.retry(f"{program}: {reason}{said}", **detail)

    async def aclose(self) -> None:
        return None


def _named(signum: int) -> str:
    """A signal's name, which its number alone does not say: 31 is SIGSYS, what a seccomp filter
    (the shipped unit's ``SystemCallFilter=``) kills a program with for a call it forbids."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return ""
    if signum == signal.SIGSYS:
        return f" ({name}: a system call the service's SystemCallFilter= forbids?)"
    return f" ({name})"


def kill_running_commands() -> int:
    """SIGKILL the process group of every command running now (safe from any thread); returns
    how many there were. For exits that cannot give them the drain's SIGTERM and grace."""
    groups = list(_RUNNING_GROUPS)
    for pgid in groups:
        _kill_group(pgid, signal.SIGKILL)
    return len(groups)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _stop(pid: int, watch: _Watch) -> None:
    """SIGTERM the group, SIGKILL it after a grace, and wait for the program and its pipes."""
    _kill_group(pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_KILL_GRACE_S):
            await watch.exited.wait()
    # Always, even when the program itself exited: its children may ignore SIGTERM.
    _kill_group(pid, signal.SIGKILL)
    await watch.exited.wait()
    # Only a process that left the group (setsid) can still hold the pipes: do not wait on it.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_KILL_GRACE_S):
            await watch.closed.wait()


def create(config: ActionConfig, resources: Resources) -> CommandAction:
    if resources.masker is not None:
        return CommandAction(config, resources.masker)
    own = Masker(secret_values(resources.config))
    return CommandAction(config, lambda: own)
