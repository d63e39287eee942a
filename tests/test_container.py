"""The container image's init: the Dockerfile's ENTRYPOINT, run as the container would run it.

In a container the first process is PID 1, and every process orphaned in the container becomes
its child. A ``command`` action's leftovers (a program's background children, ended with its
process group once it exits) are such orphans: unless PID 1 reaps them, each stays a zombie for
good. Here the entrypoint runs under a launcher that makes it a child subreaper (the same duty
as PID 1, without a container), with webhookd from this checkout.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from procs import Procs, write_config

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(60)]

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
# Become a child subreaper (PR_SET_CHILD_SUBREAPER, kept across exec), then run the rest.
SUBREAPER = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(36, 1, 0, 0, 0);"
    " os.execvp(sys.argv[1], sys.argv[1:])"
)
REAP_WAIT_S = 10.0


def entrypoint() -> list[str]:
    """The Dockerfile's ENTRYPOINT (exec form), e.g. ``["tini", "--", "webhookd"]``."""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith("ENTRYPOINT "):
            argv: list[str] = json.loads(line.removeprefix("ENTRYPOINT "))
            return argv
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


def reaped_after(pidfd: int, timeout_s: float) -> bool:
    """Whether the process behind ``pidfd`` is reaped (POLLHUP) within ``timeout_s``; its exit
    alone only makes the descriptor readable."""
    poller = select.poll()
    poller.register(pidfd, select.POLLHUP)
    return any(ev & select.POLLHUP for _, ev in poller.poll(int(timeout_s * 1000)))


def reaps_are_reported() -> bool:
    """Whether this kernel's pidfds report a reaped process (POLLHUP; recent Linux)."""
    child = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(child.pid)
    try:
        child.wait()
        return reaped_after(pidfd, 0)
    finally:
        os.close(pidfd)


async def test_the_images_init_reaps_what_a_command_leaves_and_passes_signals_on(
    tmp_path: Path, procs: Procs
) -> None:
    """A command that leaves a background child behind: once its job is done the child is
    ended and reaped, not left a zombie of the container's PID 1. SIGHUP sent to the
    entrypoint reloads the daemon, and SIGTERM drains it to an exit 0."""
    init = entrypoint()
    assert init[-1] == "webhookd", init
    if shutil.which(init[0]) is None and init[0] != "webhookd":
        reason = f"{init[0]} is not installed (Debian package {init[0]!r}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: the container's init must be tested in CI")
        pytest.skip(reason)
    if not reaps_are_reported():
        pytest.skip("this kernel's pidfds do not report a reaped process (POLLHUP)")
    leftover = tmp_path / "leftover.pid"
    body = f"""
[sources.z]
[[sources.z.actions]]
type = "command"
argv = ["sh", "-c", "sleep 300 & echo $! > {leftover}"]
"""
    config = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", body)
    wrap = [sys.executable, "-c", SUBREAPER, *init[:-1]]
    daemon = await procs.serve(config, wrap=wrap)

    async with aiohttp.ClientSession() as http, http.post(f"{daemon.url}/hooks/z", data=b"{}") as r:
        assert r.status == 202
    await daemon.wait_said("action=command attempt=1 outcome=done")
    pid = int(leftover.read_text(encoding="utf-8"))
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pass  # already ended and reaped
    else:
        try:
            reaped = await asyncio.to_thread(reaped_after, pidfd, REAP_WAIT_S)
        finally:
            os.close(pidfd)
        assert reaped, f"the command's leftover {pid} is a zombie of the container's init"

    daemon.signal(signal.SIGHUP)
    await daemon.wait_said("config reloaded")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert "stopped cleanly" in daemon.log
