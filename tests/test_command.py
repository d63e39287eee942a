"""The ``command`` action: real programs, no shell, payload on stdin, process groups killed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import uvloop
from actionkit import action_kit, toml_list
from procs import (
    AS_NOBODY,
    Procs,
    get_json,
    poll,
    settled_event,
    why_not_as_nobody,
    write_config,
)

from webhookd import actions
from webhookd.actions import command
from webhookd.config import loads
from webhookd.errors import ConfigError
from webhookd.models import Job, JobState

T = TypeVar("T")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

PUSH = {"ref": "refs/heads/main", "repository": {"name": "shop"}, "note": "; rm -rf / $(id)"}


def python_argv(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def command_config(argv: list[str], extra: str = "", timeout_s: float = 30) -> str:
    """A source ``gh`` with one command action running ``argv``."""
    return f"""
[sources.gh]
[[sources.gh.actions]]
type = "command"
argv = {toml_list(argv)}
timeout_s = {timeout_s}
{extra}
"""


async def run_command(
    tmp_path: Path, argv: list[str], extra: str = "", body: Any = PUSH, timeout_s: float = 30
) -> Job:
    async with action_kit(tmp_path, command_config(argv, extra, timeout_s)) as kit:
        event_id = await kit.send("gh", body)
        await kit.run()
        return await kit.job(event_id)


def run_on(loop: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end in a fresh event loop of the kind named."""
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coro)


def start_child_then(pid_file: Path, then: str) -> str:
    """Code that starts a long-lived child in its group, records its pid, then runs ``then``."""
    return (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); {then}"
    )


async def child_ends(child: int) -> None:

    async def gone() -> bool:
        return not alive(child)

    await poll(gone, timeout_s=10)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_payload_on_stdin_env_cwd_and_templated_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The program gets the raw body on stdin, event id, source, env, cwd, one arg per lookup."""
    monkeypatch.setenv("INHERITED", "from the daemon")  # opted in below
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import json, os, sys; print(json.dumps({'stdin': sys.stdin.read(), 'argv': sys.argv[1:],"
        " 'event': os.environ['WEBHOOKD_EVENT_ID'], 'source': os.environ['WEBHOOKD_SOURCE'],"
        " 'cwd': os.getcwd(), 'stage': os.environ['STAGE'], 'inherited': os.environ['INHERITED']}))"
    )
    argv = python_argv(code, "--ref={{ ref }}", "{{ repository.name }}", "--", "{{ note }}")
    extra = f'cwd = "{work}"\nenv = {{ STAGE = "prod" }}\ninherit_env = ["INHERITED"]'
    job = await run_command(tmp_path, argv, extra)
    assert job.state == JobState.DONE
    (attempt,) = job.history
    assert attempt.detail is not None
    seen = json.loads(attempt.detail["stdout"])
    assert json.loads(seen["stdin"]) == PUSH
    assert seen["argv"] == ["--ref=refs/heads/main", "shop", "--", "; rm -rf / $(id)"]
    assert seen["event"] == job.event_id and seen["source"] == "gh"
    assert seen["cwd"] == str(work) and seen["stage"] == "prod"
    assert seen["inherited"] == "from the daemon"
    assert attempt.detail["exit_code"] == 0


async def test_an_env_value_written_env_or_file_is_that_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``env = { TOKEN = "env:NAME" }`` hands the command the secret, not the reference; what
    it prints of a secret is journaled as ***."""
    monkeypatch.setenv("DEPLOY_TOKEN", "tok-from-the-daemon")
    (tmp_path / "key").write_text("key-from-a-file\n")
    code = (
        "import os; e = os.environ; print(e['TOKEN'] == 'tok-from-the-daemon',"
        " e['KEY'] == 'key-from-a-file', e['TOKEN'], e['PLAIN'])"
    )
    extra = (
        f'env = {{ TOKEN = "env:DEPLOY_TOKEN", KEY = "file:{tmp_path / "key"}", PLAIN = "as is" }}'
    )
    job = await run_command(tmp_path, python_argv(code), extra)
    assert job.state == JobState.DONE
    assert job.history[0].detail is not None
    assert job.history[0].detail["stdout"].split() == ["True", "True", "***", "as", "is"]


async def test_a_pem_key_in_env_is_masked_line_by_line_too(tmp_path: Path) -> None:
    """A several-line secret (a PEM key through ``env``) was masked only when printed whole:
    ``env | sort``, or a tool quoting the line it could not read, printed its lines bare."""
    body = ["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7VJTUt9Us8cKj", "MgsDHoA8Q=="]
    pem = "\n".join(["-----BEGIN PRIVATE KEY-----", *body, "-----END PRIVATE KEY-----"])
    (tmp_path / "deploy.pem").write_text(pem + "\n")
    code = "import os; print('\\n'.join(sorted(os.environ['KEY'].splitlines())))"
    extra = f'env = {{ KEY = "file:{tmp_path / "deploy.pem"}" }}'
    job = await run_command(tmp_path, python_argv(code), extra)
    assert job.history[0].detail is not None
    assert job.history[0].detail["stdout"].splitlines() == ["***", "***", "***", body[1]]


async def test_only_the_last_2kb_of_stdout_and_stderr_are_kept(tmp_path: Path) -> None:
    """A chatty program's attempt keeps the tail of each stream, marked as cut."""
    code = (
        "import sys; sys.stdout.write('a' * 100_000 + 'END'); sys.stderr.write('b' * 5000 + 'ERR')"
    )
    job = await run_command(tmp_path, python_argv(code))
    detail = job.history[0].detail
    assert detail is not None
    assert detail["stdout"].endswith("aEND") and detail["stdout"].startswith("…")
    assert len(detail["stdout"]) == 2049
    assert detail["stderr"].endswith("bERR") and len(detail["stderr"]) == 2049


async def test_a_secret_across_the_tails_cut_leaves_no_fragment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured secret printed so that the 2 KB cut falls inside it shows as ***, never as
    its own last characters: once printed whole before the tail, and once repeated line after
    line (a verbose program), where masking the copies shortens the text past the cut."""
    secret = "sk-deploy-" + "0123456789abcdef" * 4
    monkeypatch.setenv("DEPLOY_TOKEN", secret)
    env = 'env = { TOKEN = "env:DEPLOY_TOKEN" }'
    # The secret's last 20 characters are within the last 2,048, the rest before them.
    code = (
        "import os, sys; s = os.environ['TOKEN']; sys.stdout.write('x' * 5000 + s"
        f" + 'y' * {command.TAIL_BYTES - 20})"
    )
    job = await run_command(tmp_path, python_argv(code), env)
    stdout = job.history[0].detail["stdout"] if job.history[0].detail else ""
    assert stdout == "…***" + "y" * (command.TAIL_BYTES - 20)
    code = "import os; [print(os.environ['TOKEN']) for _ in range(200)]"
    job = await run_command(tmp_path, python_argv(code), env)
    stdout = job.history[0].detail["stdout"] if job.history[0].detail else ""
    assert stdout.startswith("…***") and set(stdout[1:].replace("***", "")) == {"\n"}


@pytest.mark.parametrize(
    ("code", "state", "outcome", "error"),
    [
        ("import sys; sys.exit(0)", JobState.DONE, "done", None),
        ("import sys; sys.exit(3)", JobState.DEAD, "dead", "exit code 3 (permanent)"),
        ("import sys; sys.exit(1)", JobState.QUEUED, "retry", "exit code 1"),
        (
            "import os; os.kill(os.getpid(), 9)",
            JobState.QUEUED,
            "retry",
            "killed by signal 9 (SIGKILL)",
        ),
        (
            "import os; os.kill(os.getpid(), 31)",
            JobState.QUEUED,
            "retry",
            "killed by signal 31 (SIGSYS: a system call the service's SystemCallFilter= forbids?)",
        ),
    ],
)
async def test_exit_status_decides_the_outcome(
    tmp_path: Path, code: str, state: JobState, outcome: str, error: str | None
) -> None:
    """0 is done, a listed permanent code is dead, other codes and signals are retried; a
    signal is named (SIGSYS, as a seccomp filter kills a program, said only "signal 31")."""
    job = await run_command(tmp_path, python_argv(code), "permanent_exit_codes = [3, 4]")
    assert (job.state, job.history[0].outcome) == (state, outcome)
    if error is None:
        assert job.history[0].error is None
    else:
        assert job.history[0].error is not None and job.history[0].error.endswith(error)


async def test_a_failed_programs_error_ends_with_its_last_line_on_stderr(tmp_path: Path) -> None:
    """A program that exits non-zero: its error (the log line, alerts, the dead-letter list)
    ends with the last line it wrote on stderr, on one line and masked, where it said why; a
    program that wrote nothing there keeps the bare exit code."""
    code = (
        "import sys; print('cloning', file=sys.stderr);"
        " print('fatal: could not read\\tUsername\\n', file=sys.stderr); sys.exit(3)"
    )
    job = await run_command(tmp_path, python_argv(code), "permanent_exit_codes = [3]")
    error = job.history[0].error
    assert error is not None and error.endswith(
        "exit code 3 (permanent); stderr: fatal: could not read Username"
    ), error
    job = await run_command(tmp_path / "quiet", python_argv("import sys; sys.exit(1)"))
    assert job.history[0].error is not None and job.history[0].error.endswith(": exit code 1")


async def test_timeout_kills_the_whole_process_group(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On timeout the program and the children it started are killed; the attempt is retried,
    and the log line says so with the tail of its stderr, when it wrote any."""
    pid_file = tmp_path / "child.pid"
    code = start_child_then(pid_file, "time.sleep(60)")  # outlives timeout_s: killed
    job = await run_command(tmp_path, python_argv(code), timeout_s=2)
    assert (job.state, job.history[0].outcome) == (JobState.QUEUED, "retry")
    assert job.history[0].error is not None and "timed out" in job.history[0].error
    await child_ends(int(pid_file.read_text()))
    # The program outlives timeout_s (2 s) and is killed, as the first one was.
    said = (
        "import sys, time; print('partial', flush=True);"
        " sys.stderr.write('migrating\\n'); sys.stderr.flush(); time.sleep(60)"
    )
    job = await run_command(tmp_path, python_argv(said), timeout_s=2)
    # What it wrote before the kill is kept with the attempt, as for an exit code.
    detail = job.history[0].detail
    assert detail is not None
    assert (detail["program"], detail["stdout"], detail["stderr"]) == (
        sys.executable,
        "partial\n",
        "migrating\n",
    )
    stopped = [r.getMessage() for r in caplog.records if "stopped before it finished" in r.msg]
    assert [line.partition(" finished")[2] for line in stopped] == [
        "",
        "; stderr tail: migrating\n",
    ]


async def test_background_child_holding_stdout_does_not_hold_the_job(tmp_path: Path) -> None:
    """A program that exits leaving a child on its stdout is done at once; the child is ended."""
    pid_file = tmp_path / "child.pid"
    code = start_child_then(pid_file, "print('started')")
    job = await run_command(tmp_path, python_argv(code), timeout_s=20)
    assert job.state == JobState.DONE
    assert job.history[0].detail is not None
    assert job.history[0].detail["stdout"] == "started\n"
    await child_ends(int(pid_file.read_text()))


async def test_a_child_that_left_the_group_does_not_turn_an_exit_0_into_a_timeout(
    tmp_path: Path,
) -> None:
    """A program that exits 0 leaving a child of its own session (setsid) on its stdout is done
    within the kill grace, its exit status kept: not cut off at timeout_s and run again."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('deployed')"
    )
    try:
        job = await run_command(tmp_path, python_argv(code), timeout_s=3 * command._KILL_GRACE_S)
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert (job.state, job.attempts, job.history[0].outcome) == (JobState.DONE, 1, "done")
    assert job.history[0].detail is not None
    assert (job.history[0].detail["exit_code"], job.history[0].detail["stdout"]) == (
        0,
        "deployed\n",
    )


# Starts a child in a session of its own (setsid: out of reach of the group's kill) that holds
# its stdout, records the child's pid in argv[1], and exits with the status argv[2].
DEPLOY_LEAVING_A_SESSION = """
import subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
)
with open(sys.argv[1], "w") as f:
    f.write(str(child.pid))
print("deployed", flush=True)
sys.exit(int(sys.argv[2]))
"""


def deploy_leaving_a_session(pid_file: Path, status: int) -> list[str]:
    return python_argv(DEPLOY_LEAVING_A_SESSION, str(pid_file), str(status))


def end_the_session_child(pid_file: Path) -> None:
    with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize(
    ("status", "state", "outcome"), [(0, JobState.DONE, "done"), (1, JobState.QUEUED, "retry")]
)
async def test_an_exit_status_before_timeout_s_stands_though_the_pipes_are_still_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int, state: JobState, outcome: str
) -> None:
    """timeout_s ends while the action waits for the pipes of a program that has exited (a
    child of its own session holds them): the exit status is the outcome, done for 0 (not a
    timeout, the deploy run again), with the output read and a note of the held pipes."""
    monkeypatch.setattr(command, "_KILL_GRACE_S", 10.0)  # the pipe wait outlasts timeout_s
    pid_file = tmp_path / "child.pid"
    try:
        job = await run_command(tmp_path, deploy_leaving_a_session(pid_file, status), timeout_s=3)
    finally:
        end_the_session_child(pid_file)
    assert (job.state, job.attempts) == (state, 1)
    error = f"{sys.executable}: exit code {status}" if status else None  # not "timed out"
    assert (job.history[0].outcome, job.history[0].error) == (outcome, error)
    detail = job.history[0].detail
    assert detail is not None
    assert (detail["exit_code"], detail["stdout"]) == (status, "deployed\n")
    assert "still held" in detail["pipes"]


async def test_a_drain_during_the_pipe_wait_of_a_program_that_exited_0_records_it_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain that cancels the job while the action waits for the pipes of a program that has
    exited 0 records it done, not cut off and queued to run again; the drain still ends it."""
    monkeypatch.setattr(command, "_KILL_GRACE_S", 10.0)
    exited = asyncio.Event()
    kill_group = command._kill_group

    def watched(pgid: int, sig: signal.Signals) -> None:
        kill_group(pgid, sig)
        if sig == signal.SIGKILL:  # the program has exited; its pipe wait begins
            exited.set()

    monkeypatch.setattr(command, "_kill_group", watched)
    pid_file = tmp_path / "child.pid"
    config = command_config(deploy_leaving_a_session(pid_file, 0), timeout_s=60)
    try:
        async with action_kit(tmp_path, config) as kit:
            event_id = await kit.send("gh", PUSH)
            running = asyncio.create_task(kit.run())
            await exited.wait()
            assert await kit.pool.drain(0) == 0  # none cut off
            await running
            job = await kit.job(event_id)
    finally:
        end_the_session_child(pid_file)
    assert (job.state, job.attempts) == (JobState.DONE, 1)
    assert [(a.n, a.outcome) for a in job.history] == [(1, "done")]
    detail = job.history[0].detail
    assert detail is not None
    assert (detail["exit_code"], detail["stdout"]) == (0, "deployed\n")
    assert "still held" in detail["pipes"]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_arguments_too_long_for_the_system_are_dead_not_retried(tmp_path: Path, loop: str) -> None:
    """A payload that makes an argument longer than the kernel takes (E2BIG) fails the same way
    every time: dead at once, saying why."""
    body = {"text": "x" * 200_000}  # Linux takes 128 KiB per argument
    job = run_on(loop, run_command(tmp_path, python_argv("pass", "{{ text }}"), body=body))
    assert (job.state, job.attempts, job.history[0].outcome) == (JobState.DEAD, 1, "dead")
    assert job.last_error is not None and os.strerror(errno.E2BIG) in job.last_error


# A body of a megabyte whose {{ . }} takes most of a second to write: 95,000 objects, each with
# a price kept as sent (written piece by piece).
PRICES = b"[" + b'{"p":1.50},' * 95_000 + b"7]"


async def test_timeout_s_cuts_off_a_render_of_a_body_of_a_megabyte(tmp_path: Path) -> None:
    """``{{ . }}`` of a body over 64 KiB is put in the argument on a thread: ``timeout_s`` ends
    the attempt while it is being written. On the event loop, the render held the timeout back
    until it was done (and the argument, too long for the kernel, made the job dead)."""
    job = await run_command(tmp_path, ["/bin/true", "{{ . }}"], body=PRICES, timeout_s=0.05)
    assert (job.state, job.history[0].error) == (JobState.QUEUED, "timed out after 0.05s")


async def test_a_drain_cuts_off_a_render_of_a_body_of_a_megabyte(tmp_path: Path) -> None:
    """A drain ends an attempt whose ``{{ . }}`` of a big body is being written on a thread: the
    job runs again as that attempt, its program never started."""
    async with action_kit(tmp_path, command_config(["/bin/true", "{{ . }}"])) as kit:
        event_id = await kit.send("gh", PRICES)
        running = asyncio.create_task(kit.run())

        async def claimed() -> bool:
            (job,) = (await kit.journal.get_event(event_id)).jobs
            return job.state == JobState.RUNNING

        await poll(claimed, timeout_s=10)
        assert await kit.pool.drain(0) == 1
        await running
        job = await kit.job(event_id)
    assert (job.state, [(a.n, a.outcome) for a in job.history]) == (
        JobState.QUEUED,
        [(1, "interrupted")],
    )


ENOENT = os.strerror(errno.ENOENT)


async def test_missing_program_is_retried(tmp_path: Path) -> None:
    """A program that is not there (yet) is a retryable failure, not a crash."""
    job = await run_command(tmp_path, [str(tmp_path / "deploy.sh")])
    assert job.history[0].outcome == "retry"
    assert job.history[0].error == f"cannot start {str(tmp_path / 'deploy.sh')!r}: {ENOENT}"
    # A relative path depends on where the daemon runs: the error says where that was.
    job = await run_command(tmp_path, ["scripts/deploy.sh"], f'cwd = "{tmp_path}"')
    assert (
        job.history[0].error
        == f"cannot start 'scripts/deploy.sh' (relative to {tmp_path}): {ENOENT}"
    )
    job = await run_command(tmp_path, ["webhookd-no-such-program"])
    assert (
        job.history[0].error == f"cannot start 'webhookd-no-such-program' (on the PATH): {ENOENT}"
    )


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_cwd_gone_since_the_config_was_read_is_named_not_the_program(
    tmp_path: Path, loop: str
) -> None:
    """A cwd removed after the config was read fails the start as a missing program would
    (ENOENT): the error names the folder, not the program, which is there."""
    release = tmp_path / "release"
    release.mkdir()

    async def run() -> Job:
        config = command_config([sys.executable, "-c", "print('deployed')"], f'cwd = "{release}"')
        async with action_kit(tmp_path, config) as kit:
            event_id = await kit.send("gh", PUSH)
            release.rmdir()
            await kit.run()
            return await kit.job(event_id)

    job = run_on(loop, run())
    assert (job.history[0].outcome, job.history[0].error) == (
        "retry",
        f"cannot start {sys.executable!r}: its cwd {str(release)!r} is no longer a directory",
    )


@contextlib.contextmanager
def at_open_files_limit(free: int) -> Iterator[int]:
    """This process at its soft limit on open files for the block, but ``free`` descriptors
    (the gaps below the limit filled); yields the limit. The limit and the gaps are given back
    after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1 + free
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        with contextlib.suppress(OSError):  # EMFILE: none left
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        for _ in range(free):
            os.close(fillers.pop())
        yield limit
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(("free", "tried"), [(0, False), (4, False), (1, True)])
async def test_a_program_that_cannot_start_for_want_of_open_files_waits_without_an_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int, tried: bool
) -> None:
    """At the daemon's open-files limit, or fewer short of it than a start takes, a program
    cannot start: the error says the daemon is at its limit, and the job waits a few seconds
    using no attempt (retried on backoff, the daemon's own shortage made it dead within
    seconds). It is not even tried: a start uvloop cannot finish leaks what it made. Tried
    (``tried``: past that look), the failure is seen for what it is, whether EMFILE (asyncio)
    or uvloop's "Unknown error -1"."""
    if tried:
        looks = command._out_of_files

        def after_a_start(exc: OSError | None = None) -> str | None:
            return None if exc is None else looks(exc)

        monkeypatch.setattr(command, "_out_of_files", after_a_start)
    else:  # a start failed for want of files a moment ago: each start looks first, for a while
        monkeypatch.setattr(command, "_files_short_until", math.inf)
    argv = python_argv("print('ok')")
    async with action_kit(tmp_path, command_config(argv)) as kit:
        detail = await kit.journal.get_event(await kit.send("gh", PUSH))
        action = kit.actions[("gh", "command")]
        with at_open_files_limit(free) as limit:
            outcome = await action.run(detail.event, detail.jobs[0])
        assert (outcome.kind, outcome.after_s) == ("wait", 5.0), outcome
        assert outcome.error == (
            f"cannot start {sys.executable!r}: too many open files: the daemon is at its"
            f" open-files limit ({limit})"
        )
        assert (await action.run(detail.event, detail.jobs[0])).kind == "done"


def test_check_and_the_start_warn_of_a_program_that_is_not_there(tmp_path: Path) -> None:
    """Not an error (it may be installed after the config is checked), but said before every job
    fails: a path that is no executable file, a name not on the PATH (the action's own PATH
    if its env sets one), a relative path from its cwd; a program that is there says nothing."""
    script = tmp_path / "deploy.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    cases = [
        ([str(tmp_path / "gone.sh")], "", f"{str(tmp_path / 'gone.sh')!r} is not an executable"),
        (["webhookd-no-such-program"], "", "'webhookd-no-such-program' is not an executable"),
        (["deploy.sh"], f'env = {{ PATH = "{tmp_path}" }}', None),
        (["./deploy.sh"], f'cwd = "{tmp_path}"', None),
        (
            ["./deploy.sh"],
            "",
            f"'./deploy.sh' is not an executable file (relative to {os.getcwd()})",
        ),
        ([sys.executable, "-c", "pass"], "", None),
    ]
    for argv, extra, said in cases:
        cfg = loads(command_config(argv, extra))
        warned = actions.warnings(cfg)
        assert (warned == []) if said is None else (said in warned[0]), (argv, warned)
        assert said is None or warned[0].startswith("sources.gh.actions[0].argv[0]: ")


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_script_whose_interpreter_is_not_there_is_not_said_to_be_missing_itself(
    tmp_path: Path, loop: str
) -> None:
    """A script whose #! names no program there (saved with Windows line endings, or naming a
    python that is not installed) fails to start with ENOENT, which was said as the script
    itself not being there, while check said nothing: both now name the interpreter."""
    crlf, gone = tmp_path / "crlf.sh", tmp_path / "py.sh"
    crlf.write_bytes(b"#!/bin/sh\r\necho deployed\r\n")
    gone.write_text("#!/usr/bin/webhookd-no-such-python -u\nprint('deployed')\n")
    for script in (crlf, gone):
        script.chmod(0o755)
    windows = " (the file has Windows line endings: convert it with dos2unix)"
    for script, interpreter, more in [
        (crlf, "/bin/sh\r", windows),
        (gone, "/usr/bin/webhookd-no-such-python", ""),
    ]:
        said = f"the interpreter its #! line names, {interpreter!r}, is not there{more}"
        job = run_on(loop, run_command(tmp_path, [str(script)]))
        assert (job.history[0].outcome, job.history[0].error) == (
            "retry",
            f"cannot start {str(script)!r}: {said}",
        )
        warned = actions.warnings(loads(command_config([str(script)])))
        assert warned == [
            f"sources.gh.actions[0].argv[0]: {str(script)!r}: {said}: its jobs fail until it is"
        ]


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('argv = "deploy.sh"', "argv"),
        ("argv = []", "argv"),
        ('argv = ["deploy.sh", "{{ ref"]', "argv[1]"),
        ('argv = ["{{ program }}"]', "argv[0]"),
        ('argv = ["x"]\ncwd = "/does/not/exist"', "cwd"),
        ('argv = ["x"]\npermanent_exit_codes = [0]', "permanent_exit_codes"),
        ('argv = ["x"]\nenv = { A = 1 }', "env"),
        ('argv = ["x"]\nshell = true', "shell"),
        ('argv = ["x", "a\\u0000b"]', "argv[1]"),
        ('argv = ["x"]\nenv = { A = "a\\u0000b" }', "env"),
        ('argv = ["x"]\ninherit_env = "AWS_*"', "inherit_env"),
        ('argv = ["x"]\ninherit_env = [""]', "inherit_env"),
        ('argv = ["x"]\ninherit_env = [1]', "inherit_env"),
        ('argv = ["x"]\ninherit_env = ["A=B"]', "inherit_env"),
    ],
)
def test_bad_options_name_their_key(line: str, key: str) -> None:
    """Each bad option is a ConfigError naming its dotted key."""
    text = f'[sources.s]\n[[sources.s.actions]]\ntype = "command"\n{line}\n'
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(text))
    assert err.value.key == f"sources.s.actions[0].{key}"


@pytest.mark.parametrize(
    ("argv", "at", "program"),
    [
        (["sh", "-c", "deploy {{ ref }}"], 2, "sh"),
        (["/bin/bash", "-ec", "git checkout '{{ ref }}'"], 2, "bash"),
        (["sudo", "-u", "deploy", "bash", "-lc", "deploy {{ ref }}"], 5, "bash"),
        (["env", "X=1", "sh", "-c", "--", "deploy {{ ref }}"], 5, "sh"),
        (["python3", "-c", "print('{{ ref }}')"], 2, "python3"),
        (["perl", "-ne", "print if /{{ ref }}/"], 2, "perl"),
        (["node", "--eval", "run('{{ ref }}')"], 2, "node"),
        (["bash", "-o", "pipefail", "-c", "deploy {{ ref }}"], 4, "bash"),
        (["python3", "-u", "{{ script }}"], 2, "python3"),
        (["ssh", "deploy@shop", "deploy.sh", "{{ ref }}"], 3, "ssh"),
    ],
)
def test_a_lookup_in_the_code_a_shell_or_interpreter_runs_is_a_config_error(
    argv: list[str], at: int, program: str
) -> None:
    """A lookup inside a `sh -c` script (or an interpreter's inline code) makes a sender's
    value code (over ssh, any argument: the remote shell runs them joined): a config error
    naming the argument and showing the safe form."""
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(command_config(argv)))
    assert err.value.key == f"sources.gh.actions[0].argv[{at}]"
    if program == "ssh":  # the remote shell runs the joined line: no argument is safe there
        assert "read the payload from its stdin" in str(err.value)
        return
    assert f"has a lookup in the code (or the script) {program!r} runs" in str(err.value)
    assert """["sh", "-c", 'deploy "$1"', "sh", "{{ ref }}"]""" in str(err.value)


async def test_a_lookup_passed_to_a_shell_as_an_argument_of_its_own_stays_text(
    tmp_path: Path,
) -> None:
    """The form the error shows (and any lookup outside the code) is taken: the value reaches
    the script as "$1", text that runs nothing."""
    said, ran = tmp_path / "said", tmp_path / "ran"
    for argv in (
        ["deploy.sh", "-c", "{{ ref }}"],
        ["git", "-c", "user.name={{ ref }}", "log"],
        [sys.executable, "-c", "pass", "{{ ref }}"],
        ["python3", "deploy.py", "-c", "{{ ref }}"],  # the script's own -c
        ["bash", "deploy.sh", "-c", "{{ ref }}"],
        ["python3", "-m", "deploy", "{{ ref }}"],
    ):
        actions.validate(loads(command_config(argv)))
    script = f'printf %s "$1" > {said}'
    job = await run_command(
        tmp_path, ["sh", "-c", script, "sh", "{{ ref }}"], body={"ref": f"x; touch {ran}"}
    )
    assert job.state == JobState.DONE
    assert said.read_text() == f"x; touch {ran}"
    assert not ran.exists()


# -- stdin under every loop, the environment, NUL bytes --------------------------------------------

STDIN_DIGEST = "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())"


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_stdin_reaches_the_program_under_every_loop(tmp_path: Path, loop: str) -> None:
    """A program reading stdin gets the whole body and finishes, on asyncio and on uvloop."""
    body = {"blob": "x" * 300_000}  # more than a pipe holds: the rest goes as the program reads
    job = run_on(loop, run_command(tmp_path, python_argv(STDIN_DIGEST), body=body, timeout_s=20))
    assert job.state == JobState.DONE, job.history[0].error
    detail = job.history[0].detail
    assert detail is not None
    assert detail["stdout"].strip() == hashlib.sha256(json.dumps(body).encode()).hexdigest()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_program_that_ignores_stdin_is_done(tmp_path: Path, loop: str) -> None:
    """A program that exits without reading a big body is done; the unread body is no error."""
    body = {"blob": "x" * 300_000}
    job = run_on(loop, run_command(tmp_path, python_argv("print('ok')"), body=body))
    assert job.state == JobState.DONE, job.history[0].error


class _LateLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop, handing back a started program only once it has exited and its pipes closed."""

    async def subprocess_exec(self, factory: Any, *args: Any, **kw: Any) -> Any:
        transport, watch = await super().subprocess_exec(factory, *args, **kw)
        await watch.exited.wait()
        await watch.closed.wait()
        return transport, watch


def test_program_gone_before_its_body_is_written_is_done(tmp_path: Path) -> None:
    """A program that exits before the daemon writes its stdin is done: under uvloop its stdin
    pipe is already closed then, and writing to it must not turn the run into an error."""
    with asyncio.Runner(loop_factory=_LateLoop) as runner:
        job = runner.run(run_command(tmp_path, python_argv("print('ok')")))
    assert job.state == JobState.DONE, job.history[0].error


async def test_a_number_past_what_python_holds_leaves_the_other_lookups_their_values(
    tmp_path: Path,
) -> None:
    """A body with a 5,000-digit int read as no payload at all: the program ran with every
    lookup empty and its job was done. The other fields are looked up as sent now, the number
    keeps its text, and ``{{ . }}`` is valid JSON (1e400 was ``Infinity``)."""
    seen = tmp_path / "argv.json"
    code = f"import json, sys; open({str(seen)!r}, 'w').write(json.dumps(sys.argv[1:]))"
    argv = python_argv(code, "--ref={{ ref }}", "{{ rate }}", "{{ amount }}", "{{ . }}")
    digits = "7" * 5000
    body = f'{{"ref": "refs/heads/main", "amount": {digits}, "rate": 1e400}}'.encode()
    job = await run_command(tmp_path, argv, body=body)
    assert job.state == JobState.DONE
    ref, rate, amount, whole = json.loads(seen.read_text())
    assert (ref, rate, amount) == ("--ref=refs/heads/main", "1e400", digits)
    # Valid JSON: no Infinity or NaN, and the int's digits as sent (read here as text).
    as_json = json.loads(whole, parse_int=str, parse_constant=lambda name: 1 / 0)
    assert as_json == {"ref": "refs/heads/main", "amount": digits, "rate": float("inf")}


ENV_DUMP = "import json, os; print(json.dumps(sorted(os.environ)))"


@pytest.mark.parametrize(
    ("inherit", "visible"),
    [
        ("", set()),
        ('inherit_env = ["DEPLOY_*", "SHOP_DB_PASSWORD"]', {"DEPLOY_KEY_ID", "SHOP_DB_PASSWORD"}),
    ],
)
async def test_program_sees_a_minimal_environment_unless_opted_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inherit: str, visible: set[str]
) -> None:
    """The daemon's secrets (env: values, the admin token) reach a program only when listed."""
    monkeypatch.setenv("SHOP_DB_PASSWORD", "hunter2")
    monkeypatch.setenv("WEBHOOKD_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("DEPLOY_KEY_ID", "k1")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("TZ", "UTC")
    extra = f'env = {{ STAGE = "prod" }}\n{inherit}'
    job = await run_command(tmp_path, python_argv(ENV_DUMP), extra)
    assert job.state == JobState.DONE
    assert job.history[0].detail is not None
    seen = set(json.loads(job.history[0].detail["stdout"]))
    passed_on = {n for n in os.environ if n in ("PATH", "HOME", "LANG") or n.startswith("LC_")}
    expected = passed_on | {"TZ", "STAGE", "WEBHOOKD_EVENT_ID", "WEBHOOKD_SOURCE", "WEBHOOKD_QUERY"}
    # The program's own Python may add LC_CTYPE (PEP 538 locale coercion): an LC_* name anyway.
    assert seen - {"LC_CTYPE"} == expected | visible


@pytest.mark.parametrize("loop", sorted(LOOPS))
@pytest.mark.parametrize(
    ("ref", "said"),
    [
        ("main\u0000--force", "argv[4] contains a NUL byte (from the payload)"),
        # No start can encode it: retried, every attempt failed alike until the job went dead.
        (
            "main\ud800",
            "argv[4] holds a lone surrogate (from the payload): no argument can carry it",
        ),
    ],
)
def test_an_argument_no_program_can_be_given_is_dead(
    tmp_path: Path, loop: str, ref: str, said: str
) -> None:
    """A payload value with a NUL byte never runs the program cut short, and one with a lone
    surrogate cannot be passed at all: the job is dead at its first attempt."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('ran')"
    argv = python_argv(code, "--", "{{ ref }}")
    job = run_on(loop, run_command(tmp_path, argv, body={"ref": ref}))
    assert (job.state, job.history[0].outcome) == (JobState.DEAD, "dead")
    assert job.history[0].error == said
    assert not marker.exists()


# -- a group that ignores SIGTERM is SIGKILLed --------------------------------------------------


STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", sys.argv[2]])
print("ignoring SIGTERM", file=sys.stderr, flush=True)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])  # both ignore SIGTERM once the file exists
time.sleep(60)
"""
STUBBORN_CHILD = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
)


def stubborn(pid_file: Path) -> list[str]:
    """A program ignoring SIGTERM that starts a child ignoring it too; both pids in ``pid_file``."""
    return python_argv(STUBBORN, str(pid_file), STUBBORN_CHILD)


def read_pids(pid_file: Path) -> list[int]:
    return [int(pid) for pid in pid_file.read_text().split()]


async def both_end(pids: list[int]) -> None:
    for pid in pids:
        await child_ends(pid)


async def test_timeout_sigkills_a_group_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timed-out program and its child that both ignore SIGTERM are killed, not left running."""
    monkeypatch.setattr(command, "_KILL_GRACE_S", 0.2)
    pid_file = tmp_path / "pids"
    job = await run_command(tmp_path, stubborn(pid_file), timeout_s=3)
    assert (job.state, job.history[0].error) == (JobState.QUEUED, "timed out after 3s")
    await both_end(read_pids(pid_file))


async def test_drain_sigkills_a_group_that_ignores_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain that cuts a command short kills its whole group, SIGTERM or not; the job requeues,
    its cut attempt keeping what the program wrote (as a timed-out one does), its error saying
    the program may have done its work (it said "its target may have had the request")."""
    monkeypatch.setattr(command, "_KILL_GRACE_S", 0.2)
    pid_file = tmp_path / "pids"

    async def started() -> bool:
        return pid_file.exists()

    async with action_kit(tmp_path, command_config(stubborn(pid_file), timeout_s=60)) as kit:
        event_id = await kit.send("gh", PUSH)
        running = asyncio.create_task(kit.run())
        await poll(started, timeout_s=20)
        assert await kit.pool.drain(0) == 1
        await running
        job = await kit.job(event_id)
    assert job.state == JobState.QUEUED
    assert [(a.n, a.outcome) for a in job.history] == [(1, "interrupted")]  # cut, not counted
    assert job.history[0].error == (
        "cut off by the drain after workers.shutdown_grace_s (0 s), its program may have done its"
        " work; not counted: the job runs again as this attempt"
    )
    detail = job.history[0].detail
    assert detail is not None and detail["counted"] is False
    assert "ignoring SIGTERM" in detail["stderr"]
    await both_end(read_pids(pid_file))


# -- under a real ``webhookd serve`` (uvloop) -------------------------------------------------


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_program_gets_no_descriptor_the_daemon_was_started_with(
    tmp_path: Path, procs: Procs
) -> None:
    """A descriptor left open to ``webhookd serve`` by what started it (a shell, a supervisor)
    does not reach the programs it runs: uvloop closes none, and every one got it."""
    held = tmp_path / "held-by-the-starter"
    code = (
        "import os; print(sorted(os.path.realpath('/proc/self/fd/' + fd)"
        " for fd in os.listdir('/proc/self/fd') if int(fd) > 2))"
    )
    cfg = write_config(
        tmp_path / "webhookd.toml", tmp_path / "webhookd.db", command_config(python_argv(code))
    )
    # As a shell's `exec 7>>file` leaves it: open, inheritable, for whatever runs next.
    starter = ["sh", "-c", f'exec 7>>"{held}"; exec "$@"', "sh"]
    daemon = await procs.serve(cfg, wrap=starter)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        async with http.post(f"{daemon.url}/hooks/gh", json=PUSH) as r:
            assert r.status == 202
            event_id = (await r.json())["id"]
        doc = await settled_event(http, daemon.admin_url, event_id)
    (attempt,) = doc["jobs"][0]["errors"][-1:]
    assert attempt["outcome"] == "done", (attempt["error"], attempt["detail"])
    opened = attempt["detail"]["stdout"]  # the targets of the program's descriptors past 2
    assert opened.startswith("[") and str(held) not in opened, opened


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_serve_gives_the_program_its_body_and_none_of_its_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, procs: Procs
) -> None:
    """Under ``webhookd serve`` a program reading stdin gets the body, ends, sees no secret."""
    monkeypatch.setenv("SHOP_DB_PASSWORD", "hunter2")
    monkeypatch.setenv("DEPLOY_KEY_ID", "k1")
    seen = tmp_path / "seen.json"
    code = (
        "import json, os, sys; body = sys.stdin.read(); "
        f"open({str(seen)!r}, 'w').write(json.dumps({{'stdin': body, 'env': dict(os.environ)}}))"
    )
    actions_toml = command_config(python_argv(code), 'inherit_env = ["DEPLOY_*"]', timeout_s=30)
    cfg = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", actions_toml)
    daemon = await procs.serve(cfg)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        async with http.post(f"{daemon.url}/hooks/gh", json=PUSH) as r:
            assert r.status == 202
            event_id = (await r.json())["id"]

        async def done() -> bool:
            status, doc = await get_json(http, f"{daemon.admin_url}/events/{event_id}")
            return status == 200 and doc is not None and doc["state"] == "done"

        await poll(done, timeout_s=15)
    doc = json.loads(seen.read_text())
    assert json.loads(doc["stdin"]) == PUSH
    env = doc["env"]
    assert env["WEBHOOKD_EVENT_ID"] == event_id and env["DEPLOY_KEY_ID"] == "k1"
    assert "SHOP_DB_PASSWORD" not in env


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_credential_the_program_inherits_is_masked_in_what_it_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, procs: Procs
) -> None:
    """``inherit_env = ["AWS_*"]`` hands the program AWS_SECRET_ACCESS_KEY; a program that
    printed its environment had it journaled, and shown by the events API and ``show``, in
    plain text beside a masked ``env`` secret. A variable it inherits whose name says it holds
    a credential is masked as those are; one whose name does not (AWS_REGION) is shown."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "awssecretzzzz")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    code = "import os; print('\\n'.join(f'{k}={v}' for k, v in sorted(os.environ.items())))"
    extra = 'inherit_env = ["AWS_*"]\nenv = { DEPLOY_TOKEN = "deploytoken-55" }'
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        command_config(python_argv(code), extra, timeout_s=30),
    )
    daemon = await procs.serve(cfg)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        async with http.post(f"{daemon.url}/hooks/gh", json=PUSH) as r:
            assert r.status == 202
            event_id = (await r.json())["id"]
        doc = await settled_event(http, daemon.admin_url, event_id)
    [attempt] = doc["jobs"][0]["errors"]
    shown = await procs.cli("show", event_id, "--config", str(cfg))
    assert shown.returncode == 0, shown.stderr
    for printed in (attempt["detail"]["stdout"], shown.stdout):
        assert "DEPLOY_TOKEN=***" in printed and "AWS_SECRET_ACCESS_KEY=***" in printed
        assert "AWS_REGION=eu-west-1" in printed
        assert "awssecretzzzz" not in printed


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_program_cannot_read_the_daemons_environment_through_proc(
    procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program runs as the daemon's user, so its minimal environment alone kept nothing from
    it: /proc/<daemon>/environ held every env: secret. ``webhookd serve`` marks itself not
    dumpable, which leaves that file (and the daemon's memory) to root alone."""
    if (why := why_not_as_nobody()) is not None:
        pytest.skip(why)
    monkeypatch.setenv("SHOP_DB_PASSWORD", "hunter2-in-the-daemon")
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # tmp_path's parents are root's alone
    try:
        os.chmod(base, 0o777)
        # A shell, not this venv's python: nobody may not reach the interpreter it links to.
        probe = (
            "if cat /proc/$PPID/environ; then echo readable;"
            " else stat -c 'denied, owner %u' /proc/$PPID/environ; fi"
        )
        argv = command_config(["/bin/sh", "-c", probe])
        cfg = write_config(base / "webhookd.toml", base / "webhookd.db", argv)
        os.chmod(cfg, 0o644)
        daemon = await procs.serve(cfg, wrap=AS_NOBODY)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            async with http.post(f"{daemon.url}/hooks/gh", json=PUSH) as r:
                assert r.status == 202
                event_id = (await r.json())["id"]
            doc: dict[str, Any] = {}

            async def done() -> bool:
                nonlocal doc
                status, doc = await get_json(http, f"{daemon.admin_url}/events/{event_id}")
                return status == 200 and doc["state"] == "done"

            await poll(done, timeout_s=15)
            # The daemon still reads its own /proc: its process metrics are there.
            async with http.get(f"{daemon.admin_url}/metrics") as r:
                fds = [
                    line
                    for line in (await r.text()).splitlines()
                    if line.startswith("process_open_fds ")
                ]
        assert len(fds) == 1 and float(fds[0].split()[1]) > 0
        [attempt] = doc["jobs"][0]["errors"]
        assert attempt["detail"]["stdout"] == "denied, owner 0\n"  # root's, as a whole
        assert "Permission denied" in attempt["detail"]["stderr"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
