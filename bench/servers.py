"""Start and stop the servers under test — the bare baseline and ``webhookd serve`` — as pinned
subprocesses, each with its own temp directory (config, journal, log).

`running()` is the one entry point: a context manager that starts a server, waits until it
answers, and always stops it again (SIGTERM, then SIGKILL) and removes its directory, whatever
happened in between.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import make_body, pin_to

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """A kind of server to measure."""

    name: str
    kind: str  # "bare", "minimal" or "webhookd"
    expect_status: int
    log_action: bool = False  # webhookd only: give the source one `log` action
    # webhookd only: give the source one `forward` action and pause it before the daemon starts,
    # so each webhook's job is written and queued, never run: intake with a job, alone.
    paused_job: bool = False


BARE = Target("bare", "bare", 200)
# The least a durable intake can do: one (id, received_at, body) row per webhook, group commit on
# a writer thread, WAL, synchronous = FULL, 202 after COMMIT (``bench.bisect``'s minimal step).
# What it costs over bare, and its ack latency, is what durability itself costs on this disk.
MINIMAL = Target("minimal", "minimal", 202)
WEBHOOKD = Target("webhookd", "webhookd", 202)
WEBHOOKD_JOB = Target("webhookd+job", "webhookd", 202, paused_job=True)
WEBHOOKD_LOG = Target("webhookd+log", "webhookd", 202, log_action=True)
TARGETS = {t.name: t for t in (BARE, MINIMAL, WEBHOOKD, WEBHOOKD_JOB, WEBHOOKD_LOG)}


class ServerFailed(RuntimeError):
    """A server did not start, did not answer as expected, or died."""


@dataclass
class Server:
    """A started server: where to send hooks, and how it stopped (filled in on exit)."""

    target: Target
    proc: subprocess.Popen[bytes]
    url: str
    stop_s: float | None = None  # SIGTERM → exit
    killed: bool = False  # did not exit within STOP_TIMEOUT_S after SIGTERM
    admin_url: str = ""  # webhookd only
    config: Path | None = None  # webhookd only: its config file, for CLI verbs (pause, resume)

    def cpu_s(self) -> float:
        """CPU time used so far by the server process (all its threads)."""
        return proc_cpu_s(self.proc.pid)


def proc_cpu_s(pid: int) -> float:
    """CPU time used so far by process `pid` (all its threads), from /proc; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields 14 and 15 of stat(5) (utime, stime); index 11 and 12 after "pid (comm)".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def webhookd_command() -> list[str]:
    """How to run webhookd: the console script next to this Python, else ``python -m webhookd``."""
    script = Path(sys.executable).with_name("webhookd")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "webhookd"]


JOURNAL_URL_ENV = "WEBHOOKD_JOURNAL_URL"


def webhookd_config(
    port: int, admin_port: int, journal: Path, body: str, *, shared: bool = False
) -> str:
    """A webhookd config (TOML): receiver, admin and journal for this run, then `body` (the
    sources, actions, lanes, workers…). `shared`: the journal is the PostgreSQL database named
    by the environment variable `JOURNAL_URL_ENV` (several nodes), not the file `journal`."""
    where = f'url = "env:{JOURNAL_URL_ENV}"' if shared else f"path = {json.dumps(str(journal))}"
    return f"""\
[server]
listen = "127.0.0.1:{port}"
max_body_bytes = 1048576

[admin]
listen = "127.0.0.1:{admin_port}"

[journal]
{where}

[log]
level = "warning"

{body}"""


# One job per webhook that never runs: the source is paused (``pause_bench``), as Celery's
# ``.delay`` and arq's ``enqueue_job`` only queue theirs.
JOB_SOURCE = """\
[sources.bench]

[[sources.bench.actions]]
type = "forward"
url = "http://127.0.0.1:9/unused"
"""


def intake_sources(target: Target) -> str:
    """The intake benchmark's one source, ``bench``: no actions, one ``log`` action, or one
    forward job per webhook (``JOB_SOURCE``, paused)."""
    if target.paused_job:
        return JOB_SOURCE
    # No actions: measures durable intake alone (journal + fsync'd commit before the 202).
    text = "[sources.bench]\n"
    if target.log_action:
        text += '\n[[sources.bench.actions]]\ntype = "log"\n'
    return text


def pause_bench(config: Path, journal_url: str | None = None) -> None:
    """``webhookd pause bench`` with `config`, before its daemon starts (a ``before_start``):
    creates the journal (schema only) first, which the verb needs: the SQLite file beside
    `config`, or the PostgreSQL journal at `journal_url`."""
    from webhookd.journal import BaseJournal, Journal

    async def create() -> None:
        journal: BaseJournal
        if journal_url is None:
            journal = Journal(config.with_name("bench.db"))
        else:
            from webhookd.journal.postgres import PostgresJournal

            journal = PostgresJournal(journal_url)
        async with journal:
            pass

    asyncio.run(create())
    try:
        cli("pause", "bench", config=config)
    except RuntimeError as exc:
        raise ServerFailed(str(exc)) from None


def cli(verb: str, *args: str, config: Path) -> str:
    """Run ``webhookd VERB ARGS --config CONFIG``; its output; raises if it fails."""
    done = subprocess.run(
        [*webhookd_command(), verb, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"webhookd {verb} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


@contextmanager
def running(target: Target, *, cpu: int | None, parent_dir: str | None = None) -> Iterator[Server]:
    """Start `target` pinned to `cpu`, wait until it answers, yield it, then stop it."""
    if target.kind in ("bare", "minimal"):
        with _running(target, cpu=cpu, parent_dir=parent_dir) as server:
            yield server
    else:
        with running_webhookd(
            intake_sources(target),
            cpu=cpu,
            parent_dir=parent_dir,
            target=target,
            before_start=pause_bench if target.paused_job else None,
        ) as server:
            yield server


@contextmanager
def running_webhookd(
    body: str,
    *,
    cpu: int | None,
    parent_dir: str | None = None,
    target: Target = WEBHOOKD,
    probe: bool = True,
    env: dict[str, str] | None = None,
    before_start: Callable[[Path], None] | None = None,
    journal_url: str | None = None,
) -> Iterator[Server]:
    """``webhookd serve`` with `body` as the rest of its config (see `webhookd_config`).

    `probe`: POST one webhook to ``/hooks/bench`` before yielding (leave it off when that would
    create a job the scenario counts). `env`: extra environment. `before_start`: called with the
    config file before the daemon starts, e.g. to pause a source with the CLI. `journal_url`: a
    PostgreSQL journal (shared with other nodes) instead of a file of its own.
    """
    if journal_url is not None:
        env = {**(env or {}), JOURNAL_URL_ENV: journal_url}
    with _running(
        target,
        cpu=cpu,
        parent_dir=parent_dir,
        body=body,
        probe=probe,
        env=env,
        before_start=before_start,
        shared=journal_url is not None,
    ) as server:
        yield server


@contextmanager
def _running(
    target: Target,
    *,
    cpu: int | None,
    parent_dir: str | None,
    body: str = "",
    probe: bool = True,
    env: dict[str, str] | None = None,
    before_start: Callable[[Path], None] | None = None,
    shared: bool = False,
) -> Iterator[Server]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{target.kind}-", dir=parent_dir))
    log_path = workdir / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    server: Server | None = None
    try:
        port = free_port()
        config: Path | None = None
        admin_url = ""
        if target.kind == "bare":
            cmd = [sys.executable, "-m", "bench.bare", "--port", str(port)]
            ready_url = f"http://127.0.0.1:{port}/readyz"
        elif target.kind == "minimal":
            cmd = [sys.executable, "-m", "bench.bisect", "--serve", "minimal", "--port", str(port)]
            cmd += ["--db", str(workdir / "minimal.db")]
            ready_url = f"http://127.0.0.1:{port}/readyz"
        else:
            admin_port = free_port()
            config = workdir / "webhookd.toml"
            journal = workdir / "bench.db"
            config.write_text(webhookd_config(port, admin_port, journal, body, shared=shared))
            cmd = [*webhookd_command(), "serve", "--config", str(config)]
            admin_url = f"http://127.0.0.1:{admin_port}"
            ready_url = f"{admin_url}/readyz"
        url = f"http://127.0.0.1:{port}/hooks/bench"
        if before_start is not None and config is not None:
            before_start(config)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=_REPO,
                env={**os.environ, **env} if env else None,
                preexec_fn=pin_to(cpu),
                # Its own session: a Ctrl-C on the terminal reaches only the harness, which then
                # stops the server itself, in order.
                start_new_session=True,
            )
        server = Server(target, proc, url, admin_url=admin_url, config=config)
        _wait_ready(server, ready_url, log_path)
        if probe:
            _probe(server, log_path)
        yield server
        _check_alive(server, log_path)
    finally:
        if proc is not None:
            _stop(proc, server)
        shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(log_path: Path, lines: int = 15) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(server: Server, ready_url: str, log_path: Path) -> None:
    # Polling is fine here: this is the harness waiting for a process it does not control.
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise ServerFailed(
                f"{server.target.name} exited with {server.proc.returncode} before it was ready:\n"
                + _log_tail(log_path)
            )
        try:
            with urllib.request.urlopen(ready_url, timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise ServerFailed(
        f"{server.target.name}: {ready_url} not 200 within {READY_TIMEOUT_S:g} s:\n"
        + _log_tail(log_path)
    )


def _probe(server: Server, log_path: Path) -> None:
    """One real POST, so a wrong route or status fails loudly before any measurement."""
    request = urllib.request.Request(
        server.url,
        data=make_body(f"probe-{os.urandom(4).hex()}", 0),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5.0) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise ServerFailed(f"{server.target.name}: probe POST failed: {exc}") from exc
    if status != server.target.expect_status:
        raise ServerFailed(
            f"{server.target.name}: probe POST {server.url} answered {status}, "
            f"expected {server.target.expect_status}:\n" + _log_tail(log_path)
        )


def _check_alive(server: Server, log_path: Path) -> None:
    if server.proc.poll() is not None:
        raise ServerFailed(
            f"{server.target.name} died during the run (exit {server.proc.returncode}):\n"
            + _log_tail(log_path)
        )


def _stop(proc: subprocess.Popen[bytes], server: Server | None) -> None:
    if proc.poll() is None:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            if server is not None:
                server.killed = True
        if server is not None:
            server.stop_s = time.monotonic() - started
