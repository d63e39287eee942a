"""The ``command`` action: real programs, no shell, payload on stdin, process groups killed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from actionkit import action_kit, toml_list
from procs import poll

from webhookd import actions
from webhookd.config import loads
from webhookd.errors import ConfigError
from webhookd.models import Job, JobState

PUSH = {"ref": "refs/heads/main", "repository": {"name": "shop"}, "note": "; rm -rf / $(id)"}


def python_argv(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


async def run_command(
    tmp_path: Path, argv: list[str], extra: str = "", body: Any = PUSH, timeout_s: float = 30
) -> Job:
    config = f"""
[sources.gh]
[[sources.gh.actions]]
type = "command"
argv = {toml_list(argv)}
timeout_s = {timeout_s}
{extra}
"""
    async with action_kit(tmp_path, config) as kit:
        event_id = await kit.send("gh", body)
        await kit.run()
        return await kit.job(event_id)


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
    monkeypatch.setenv("INHERITED", "from the daemon")
    work = tmp_path / "work"
    work.mkdir()
    code = (
        "import json, os, sys; print(json.dumps({'stdin': sys.stdin.read(), 'argv': sys.argv[1:],"
        " 'event': os.environ['WEBHOOKD_EVENT_ID'], 'source': os.environ['WEBHOOKD_SOURCE'],"
        " 'cwd': os.getcwd(), 'stage': os.environ['STAGE'], 'inherited': os.environ['INHERITED']}))"
    )
    argv = python_argv(code, "--ref={{ ref }}", "{{ repository.name }}", "--", "{{ note }}")
    extra = f'cwd = "{work}"\nenv = {{ STAGE = "prod" }}'
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


@pytest.mark.parametrize(
    ("code", "state", "outcome", "error"),
    [
        ("import sys; sys.exit(0)", JobState.DONE, "done", None),
        ("import sys; sys.exit(3)", JobState.DEAD, "dead", "exit code 3 (permanent)"),
        ("import sys; sys.exit(1)", JobState.QUEUED, "retry", "exit code 1"),
        ("import os; os.kill(os.getpid(), 9)", JobState.QUEUED, "retry", "killed by signal 9"),
    ],
)
async def test_exit_status_decides_the_outcome(
    tmp_path: Path, code: str, state: JobState, outcome: str, error: str | None
) -> None:
    """0 is done, a listed permanent code is dead, other codes and signals are retried."""
    job = await run_command(tmp_path, python_argv(code), "permanent_exit_codes = [3, 4]")
    assert (job.state, job.history[0].outcome) == (state, outcome)
    if error is None:
        assert job.history[0].error is None
    else:
        assert job.history[0].error is not None and job.history[0].error.endswith(error)


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """On timeout the program and the children it started are killed; the attempt is retried."""
    pid_file = tmp_path / "child.pid"
    code = start_child_then(pid_file, "time.sleep(60)")  # outlives timeout_s: killed
    job = await run_command(tmp_path, python_argv(code), timeout_s=2)
    assert (job.state, job.history[0].outcome) == (JobState.QUEUED, "retry")
    assert job.history[0].error is not None and "timed out" in job.history[0].error
    await child_ends(int(pid_file.read_text()))


async def test_background_child_holding_stdout_does_not_hold_the_job(tmp_path: Path) -> None:
    """A program that exits leaving a child on its stdout is done at once; the child is ended."""
    pid_file = tmp_path / "child.pid"
    code = start_child_then(pid_file, "print('started')")
    job = await run_command(tmp_path, python_argv(code), timeout_s=20)
    assert job.state == JobState.DONE
    assert job.history[0].detail is not None
    assert job.history[0].detail["stdout"] == "started\n"
    await child_ends(int(pid_file.read_text()))


async def test_missing_program_is_retried(tmp_path: Path) -> None:
    """A program that is not there (yet) is a retryable failure, not a crash."""
    job = await run_command(tmp_path, [str(tmp_path / "deploy.sh")])
    assert job.history[0].outcome == "retry"
    assert job.history[0].error is not None and "cannot start" in job.history[0].error


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
    ],
)
def test_bad_options_name_their_key(line: str, key: str) -> None:
    """Each bad option is a ConfigError naming its dotted key."""
    text = f'[sources.s]\n[[sources.s.actions]]\ntype = "command"\n{line}\n'
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(text))
    assert err.value.key == f"sources.s.actions[0].{key}"
