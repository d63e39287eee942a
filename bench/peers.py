"""``python -m bench peers``: webhookd next to FastAPI → Celery and FastAPI → arq over Redis, in
one run, so the DESIGN §6 ratios against them are measured on the same machine at the same time.

Two measurements, each of three or four systems taking turns (so a machine that drifts hits
them all alike):

- **intake with a job** (closed loop, `--rounds`-style interleaved rounds, the intake benchmark's
  generator and unique 1 KB bodies): webhookd with one ``forward`` job per webhook and the source
  paused, so jobs are only queued; FastAPI + Celery ``.delay`` and FastAPI + arq ``enqueue_job``,
  which also only queue (no worker runs). Targets: ≥ 4× Celery and ≥ 2× arq (median of the
  per-round ratios).
- **end to end**: N unique webhooks (20,000; ``--quick`` 3,000) posted over HTTP with 64
  connections while the consumers run a no-op job, timed from the first post until the last job
  is done: webhookd with a no-op ``python`` action (sync and async handler, 16 workers), Celery
  (solo pool) and arq (tuned). Target: ≥ 5× Celery (the faster webhookd handler, median of the
  per-rep ratios).

The peers run from scratch virtualenvs under ``.bench-peers/`` (created with pip on first use,
reused after; Celery and arq need different redis-py versions, so one each), against a
throwaway ``redis-server`` (Debian's; installed with apt-get when missing and running as root)
on a free loopback port without persistence. Every system under test — webhookd, or uvicorn +
worker + Redis — is pinned to the server CPU; the generator and this process to the other.
Without Redis or a peer's virtualenv the rows say why and the rest still runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.harness import placed, post_many, stats_sync, tag
from bench.intake import BUSY_OTHER_PCT, choose_cpus, rounds_text
from bench.machine import OtherProcesses
from bench.servers import (
    JOB_SOURCE,
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    WEBHOOKD_JOB,
    ServerFailed,
    free_port,
    pause_bench,
    running_webhookd,
)
from bench.table import Row, scenario_main, verdict
from webhookd.journal.schema import BACKLOG_SQL

REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "peerapps"
VENVS = REPO / ".bench-peers"
# celery[redis] (kombu 5.x) wants redis-py ≥ 6 and arq 0.28 wants < 6: one virtualenv each.
SERVE = ("fastapi", "uvicorn", "uvloop", "httptools")
REQUIREMENTS = {
    "celery": ("celery[redis]>=5.4,<6", *SERVE),
    "arq": ("arq>=0.26,<0.29", "redis<6", *SERVE),
}
PIP_TIMEOUT_S = 900.0

INTAKE_VS_CELERY = 4.0
INTAKE_VS_ARQ = 2.0
E2E_VS_CELERY = 5.0
CONNECTIONS = 64
WORKERS = 16  # webhookd's concurrency in the end-to-end run, as in the reference measurement
POLL_S = 0.01
SIZES = {  # (intake rounds, seconds per intake run, end-to-end reps, webhooks end to end)
    False: (5, 10.0, 3, 20_000),
    True: (2, 2.0, 1, 3_000),
}
DRAIN_TIMEOUT_S = {False: 300.0, True: 120.0}


def noop_source(handler: str) -> str:
    return f"""\
[workers]
concurrency = {WORKERS}

[sources.bench]

[[sources.bench.actions]]
type = "python"
handler = "noop_handler:{handler}"
path = "{APPS}"
"""


class Unavailable(RuntimeError):
    """A peer cannot be run here (no Redis, no virtualenv): `short` for the table, the message
    for the notes (why, and what to do)."""

    def __init__(self, short: str, message: str) -> None:
        super().__init__(message)
        self.short = short


# -- the scratch virtualenvs ------------------------------------------------------------------


def venv_bin(peer: str) -> Path:
    """The bin directory of `peer`'s virtualenv, created (pip install) on first use."""
    home = VENVS / peer
    stamp = home / "bench-requirements.txt"
    wanted_list = REQUIREMENTS[peer]
    wanted = "\n".join(wanted_list) + "\n"
    if stamp.exists() and stamp.read_text() == wanted and (home / "bin" / "python").exists():
        return home / "bin"
    print(
        f"peers: creating {home.relative_to(REPO)} (pip install {' '.join(wanted_list)})",
        file=sys.stderr,
        flush=True,
    )
    shutil.rmtree(home, ignore_errors=True)
    steps = {
        "python -m venv": [sys.executable, "-m", "venv", str(home)],
        "pip install": [str(home / "bin" / "python"), "-m", "pip", "install", "-q", *wanted_list],
    }
    for step, cmd in steps.items():
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable("no virtualenv", f"{peer}: {step} failed: {exc}") from exc
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
            raise Unavailable("no virtualenv", f"{peer}: {step} failed: {last[0]}")
    stamp.write_text(wanted)
    return home / "bin"


# -- Redis ----------------------------------------------------------------------------------------


def redis_binary() -> str:
    """``redis-server``, installed with apt-get if missing and we are root."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(
            "no redis-server",
            "redis-server is not installed: run `apt-get install redis-server` as root "
            "(or put any redis-server on PATH)",
        )
    print("peers: installing redis-server (apt-get)", file=sys.stderr, flush=True)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0 and cmd[1] == "install":
            last = done.stderr.strip().splitlines()[-1:] or ["?"]
            raise Unavailable("no redis-server", f"apt-get install redis-server failed: {last[0]}")
    found = shutil.which("redis-server")
    if found is None:
        raise Unavailable("no redis-server", "apt-get installed redis-server, not on PATH")
    return found


def redis_call(port: int, *args: str, timeout_s: float = 5.0) -> Any:
    """One Redis command over RESP on 127.0.0.1:`port`; its reply (bytes, int, list)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        sock.sendall(b"".join(parts))
        return _reply(sock.makefile("rb"))


def _reply(stream: Any) -> Any:
    line: bytes = stream.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(f"redis: {rest.decode(errors='replace')}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2]
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_reply(stream) for _ in range(size)]
    raise RuntimeError(f"redis: unexpected reply {line!r}")


@dataclass
class Proc:
    """A started supporting process (Redis, uvicorn, a worker) and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise ServerFailed(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")


@contextmanager
def process(
    name: str,
    cmd: Sequence[str],
    workdir: Path,
    *,
    cpu: int | None,
    env: dict[str, str] | None = None,
) -> Iterator[Proc]:
    """Start `cmd` pinned to `cpu`, logging to `workdir`; always stop it (SIGTERM, then kill)."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={**os.environ, **(env or {})},
            preexec_fn=loadgen.pin_to(cpu),
            start_new_session=True,  # a Ctrl-C reaches the harness only, which stops it in order
        )
    try:
        yield Proc(name, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until(what: Proc, ready: Callable[[], bool], timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll `ready` until true; fail if `what` exits first or it takes over `timeout_s`."""
    # Polling is fine here: the harness waits for processes it does not control.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        what.check()
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise ServerFailed(f"{what.name} not ready within {timeout_s:g} s:\n{what.tail()}")


@contextmanager
def redis(workdir: Path, cpu: int | None) -> Iterator[int]:
    """A throwaway redis-server on a free loopback port, no persistence; yields its port."""
    port = free_port()
    cmd = [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]
    with process("redis", cmd, workdir, cpu=cpu) as proc:
        wait_until(proc, lambda: redis_call(port, "PING", timeout_s=1.0) == b"PONG")
        yield port


# -- a peer: Redis + FastAPI on uvicorn (+ its worker) ---------------------------------------------


@dataclass(frozen=True)
class Peer:
    name: str  # "celery" or "arq"
    worker: tuple[str, ...]  # console script and arguments, from the peer's virtualenv

    def queued(self, port: int) -> int:
        """Jobs not yet run (Celery: in the list or reserved; arq: in the queue until done)."""
        if self.name == "celery":
            return int(redis_call(port, "LLEN", "celery")) + int(
                redis_call(port, "HLEN", "unacked")
            )
        return int(redis_call(port, "ZCARD", "arq:queue"))

    def worker_ready(self, port: int) -> bool:
        if self.name == "celery":  # its solo pool waits for messages in a BRPOP
            clients = redis_call(port, "CLIENT", "LIST")
            return b"cmd=brpop" in (clients or b"")
        return bool(redis_call(port, "EXISTS", "arq:queue:health-check"))


CELERY = Peer(
    "celery",
    ("celery", "-A", "celery_app", "worker", "--pool=solo", "--loglevel=WARNING", "-n", "b@%h"),
)
ARQ = Peer("arq", ("arq", "arq_tasks.WorkerSettings"))
PEERS = (CELERY, ARQ)
INTAKE_LABELS = {
    "webhookd+job": "webhookd, one job each (paused)",
    "celery": "FastAPI + Celery .delay",
    "arq": "FastAPI + arq enqueue_job",
}
E2E_LABELS = {
    "webhookd sync": "webhookd, no-op python (sync)",
    "webhookd async": "webhookd, no-op python (async)",
    "celery": "FastAPI + Celery, solo worker",
    "arq": "FastAPI + arq, tuned worker",
}


@dataclass
class PeerServer:
    url: str
    redis_port: int
    procs: list[Proc]

    def alive(self) -> int | None:
        """``None`` while every process runs, else the exit status of one that stopped."""
        for p in self.procs:
            if p.proc.poll() is not None:
                return p.proc.returncode
        return None


@contextmanager
def running_peer(
    peer: Peer, bin_dir: Path, cpu: int | None, *, worker: bool
) -> Iterator[PeerServer]:
    """Redis, the FastAPI app on uvicorn and (with `worker`) the peer's worker, all on `cpu`."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-peer-")))
        redis_port = stack.enter_context(redis(workdir, cpu))
        env = {
            "MODE": peer.name,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "PYTHONPATH": str(APPS),
        }
        port = free_port()
        cmd = [str(bin_dir / "uvicorn"), "fastapi_app:app", "--app-dir", str(APPS)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"]
        cmd += ["--http", "httptools", "--no-access-log", "--log-level", "warning"]
        app = stack.enter_context(process("uvicorn", cmd, workdir, cpu=cpu, env=env))
        wait_until(app, lambda: _get_ok(f"http://127.0.0.1:{port}/readyz"))
        url = f"http://127.0.0.1:{port}/hooks/bench"
        procs = [app]
        if worker:
            consumer = stack.enter_context(
                process(
                    "worker",
                    [str(bin_dir / peer.worker[0]), *peer.worker[1:]],
                    workdir,
                    cpu=cpu,
                    env=env,
                )
            )
            wait_until(consumer, lambda: peer.worker_ready(redis_port), timeout_s=60.0)
            procs.append(consumer)
        yield PeerServer(url, redis_port, procs)
        app.check()


def _get_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1.0) as response:
        return int(response.status) == 200


# -- intake with a job -------------------------------------------------------------------------


def _closed(url: str, duration_s: float, cpu: int | None) -> loadgen.LoadResult:
    """A 1 s warm-up, then the measured closed-loop run: the intake benchmark's generator."""
    for seconds in (1.0, duration_s):
        load = loadgen.closed_loop(
            url,
            connections=CONNECTIONS,
            duration_s=seconds,
            expect_status=202,
            cpu=cpu,
            use_wrk=True,
        )
    return load


def intake_run(
    system: str, bins: dict[str, Path], duration_s: float, cpus: tuple[int | None, int | None]
) -> loadgen.LoadResult:
    server_cpu, gen_cpu = cpus
    if system == WEBHOOKD_JOB.name:
        with running_webhookd(
            JOB_SOURCE, cpu=server_cpu, target=WEBHOOKD_JOB, before_start=pause_bench
        ) as server:
            return _closed(server.url, duration_s, gen_cpu)
    peer = CELERY if system == CELERY.name else ARQ
    with running_peer(peer, bins[peer.name], server_cpu, worker=False) as s:
        return _closed(s.url, duration_s, gen_cpu)


# -- end to end --------------------------------------------------------------------------------


def e2e_run(system: str, bins: dict[str, Path], n: int, timeout_s: float) -> dict[str, Any]:
    """Post `n` webhooks while the consumer runs; seconds from the first post to the last job
    done."""
    with placed() as cpu:
        if system.startswith("webhookd"):
            handler = "arun" if system.endswith("async") else "run"
            with running_webhookd(noop_source(handler), cpu=cpu, probe=False) as server:
                assert server.config is not None
                # Completion is read from the journal file by this process, as the peers' is
                # a Redis LLEN: the admin /stats counts every job row (about 30 ms of the
                # daemon's CPU at 20,000 jobs), which polled every 10 ms would be most of
                # what the daemon does while it drains.
                with _backlog_reader(server.config.with_name("bench.db")) as backlog:
                    run = _drive(server.url, n, lambda: backlog() == 0, timeout_s, server.proc.poll)
                done = int(stats_sync(server.admin_url)["jobs"].get("done", 0))
                if run["seconds"] is not None and done != n:
                    raise RuntimeError(f"{done} of {n} jobs done once the backlog was empty")
                return run
        peer = CELERY if system == CELERY.name else ARQ
        with running_peer(peer, bins[peer.name], cpu, worker=True) as s:
            port = s.redis_port

            def drained() -> bool:
                return peer.queued(port) == 0

            return _drive(s.url, n, drained, timeout_s, s.alive)


@contextmanager
def _backlog_reader(journal: Path) -> Iterator[Callable[[], int]]:
    """Jobs queued or running in a webhookd journal, read-only, from this process."""
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=5.0)
    try:
        yield lambda: int(conn.execute(BACKLOG_SQL).fetchone()[0])
    finally:
        conn.close()


def _drive(
    url: str, n: int, done: Callable[[], bool], timeout_s: float, alive: Callable[[], int | None]
) -> dict[str, Any]:
    started = time.monotonic()
    posts = asyncio.run(post_many(url, n, CONNECTIONS, tag()))
    posted = time.monotonic()
    deadline = posted + timeout_s
    finished = None
    while time.monotonic() < deadline and alive() is None:
        if len(posts.acked) == n and done():
            finished = time.monotonic()
            break
        time.sleep(POLL_S)
    seconds = (finished - started) if finished is not None else None
    return {
        "n": n,
        "acked": len(posts.acked),
        "failures": posts.failures,
        "intake_s": posted - started,
        "seconds": seconds,
        "jobs_per_s": n / seconds if seconds else None,
    }


# -- the scenario ----------------------------------------------------------------------------------


def measure(quick: bool = False, size: int | None = None) -> dict[str, Any]:
    """Both measurements; peers that cannot run are listed with why under ``unavailable``."""
    rounds, duration_s, reps, n = SIZES[quick]
    n = size if size is not None else n
    others = OtherProcesses()  # what this scenario did not start
    cpus = choose_cpus()
    unavailable: dict[str, dict[str, str]] = {}
    bins: dict[str, Path] = {}
    try:
        redis_binary()
    except Unavailable as exc:
        unavailable = {p.name: {"short": exc.short, "why": str(exc)} for p in PEERS}
    for peer in PEERS:
        if peer.name not in unavailable:
            try:
                bins[peer.name] = venv_bin(peer.name)
            except Unavailable as exc:
                unavailable[peer.name] = {"short": exc.short, "why": str(exc)}
    peers = [p.name for p in PEERS if p.name in bins]
    # Without a peer there is no ratio to measure, and webhookd alone is measured elsewhere.
    if not peers:
        rounds = reps = 0
    wrk = loadgen.wrk_path()
    result: dict[str, Any] = {
        "quick": quick,
        "unavailable": unavailable,
        "generator": f"{loadgen.wrk_version(wrk)} (1 thread)" if wrk else "built-in",
        "cpus": {"systems": cpus[0], "generator": cpus[1]},
        "intake": {"rounds": rounds, "duration_s": duration_s, "runs": [], "failures": {}},
        "e2e": {"reps": reps, "n": n, "runs": [], "failures": {}},
    }
    intake = result["intake"]
    for round_no in range(1, rounds + 1):
        for system in [WEBHOOKD_JOB.name, *peers]:
            if system in intake["failures"]:
                continue
            try:
                load = intake_run(system, bins, duration_s, cpus)
            except (ServerFailed, RuntimeError) as exc:
                intake["failures"][system] = str(exc)
                continue
            intake["runs"].append({"system": system, "round": round_no, **load.to_json()})
            _say(f"peers intake round {round_no}/{rounds} {system:<13} {load.rps:8,.0f} req/s")
    e2e = result["e2e"]
    for rep in range(1, reps + 1):
        for system in ["webhookd sync", "webhookd async", *peers]:
            if system in e2e["failures"]:
                continue
            try:
                run = e2e_run(system, bins, n, DRAIN_TIMEOUT_S[quick])
            except (ServerFailed, RuntimeError) as exc:
                e2e["failures"][system] = str(exc)
                continue
            e2e["runs"].append({"system": system, "rep": rep, **run})
            rate = run["jobs_per_s"]
            shown = f"{rate:8,.0f} jobs/s" if rate else "did not finish"
            _say(f"peers e2e rep {rep}/{reps} {system:<14} {shown}")
    result["summary"] = summarise(result)
    result["other_cpu_pct"] = others.pct()
    return result


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),  # rounds or reps measured
    }


def _per_round(
    runs: Sequence[dict[str, Any]], key: str, field: str, top: str, bottom: str
) -> list[float]:
    """Per round (or rep): `top`'s `field` over `bottom`'s, where both were measured."""
    by: dict[tuple[int, str], float] = {(r[key], r["system"]): r[field] or 0.0 for r in runs}
    return [
        by[(k, top)] / by[(k, bottom)]
        for k in sorted({r[key] for r in runs})
        if by.get((k, top)) and by.get((k, bottom))
    ]


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    intake_runs = result["intake"]["runs"]
    e2e_runs = result["e2e"]["runs"]
    systems_i = dict.fromkeys(r["system"] for r in intake_runs)
    systems_e = dict.fromkeys(r["system"] for r in e2e_runs)
    top = WEBHOOKD_JOB.name
    e2e_ratio: dict[str, Any] = {}
    for handler in ("webhookd sync", "webhookd async"):
        e2e_ratio[handler] = _spread(
            _per_round(e2e_runs, "rep", "jobs_per_s", handler, CELERY.name)
        )
    # The target holds for "a no-op python job, sync or async handler": the faster one counts.
    best = [v for v in e2e_ratio.values() if v is not None]
    return {
        "intake_rps": {
            s: _spread([r["rps"] for r in intake_runs if r["system"] == s]) for s in systems_i
        },
        "intake_p99_ms": {
            s: statistics.median(r["p99_ms"] for r in intake_runs if r["system"] == s)
            for s in systems_i
        },
        "intake_ratio": {
            p: _spread(_per_round(intake_runs, "round", "rps", top, p))
            for p in (CELERY.name, ARQ.name)
        },
        "e2e_jobs_per_s": {
            s: _spread([r["jobs_per_s"] for r in e2e_runs if r["system"] == s and r["jobs_per_s"]])
            for s in systems_e
        },
        "e2e_ratio": e2e_ratio,
        "e2e_best": max(best, key=lambda v: v["median"]) if best else None,
    }


def rows(result: dict[str, Any]) -> list[Row]:
    s = result["summary"]
    why = result["unavailable"]
    rounds, reps = result["intake"]["rounds"], result["e2e"]["reps"]
    out: list[Row] = []
    for system, v in s["intake_rps"].items():
        p99 = s["intake_p99_ms"][system]
        shown = f"{v['median']:,.0f} ({v['min']:,.0f}–{v['max']:,.0f}), p99 {p99:.1f} ms"
        metric = f"intake req/s: {INTAKE_LABELS.get(system, system)}" + _short(v, rounds, "round")
        out.append(Row("peers", metric, shown))
    for peer, target in ((CELERY, INTAKE_VS_CELERY), (ARQ, INTAKE_VS_ARQ)):
        metric = f"intake with a job: webhookd / {peer.name}"
        v = s["intake_ratio"][peer.name]
        out.append(_ratio_row(metric, v, target, why.get(peer.name), rounds, "round"))
    for system, v in s["e2e_jobs_per_s"].items():
        shown = f"{v['median']:,.0f} ({v['min']:,.0f}–{v['max']:,.0f})" if v else "did not finish"
        metric = f"e2e {result['e2e']['n']:,} posted, jobs/s: {E2E_LABELS.get(system, system)}"
        out.append(Row("peers", metric + _short(v, reps, "rep"), shown))
    for handler, v in s["e2e_ratio"].items():
        if v is not None:
            spread = f"{v['median']:.1f}× ({v['min']:.1f}–{v['max']:.1f})"
            metric = f"e2e: {handler} / celery (median of {rounds_text(int(v['n']), reps, 'rep')})"
            out.append(Row("peers", metric, spread))
    # The faster handler counts, but only when both finished every rep: one that failed or
    # never finished is webhookd failing, whichever of the two was faster.
    both = all(v is not None and v["n"] == reps for v in s["e2e_ratio"].values())
    out.append(
        _ratio_row(
            "e2e: webhookd (faster handler) / celery",
            s["e2e_best"],
            E2E_VS_CELERY,
            why.get(CELERY.name),
            reps,
            "rep",
            complete=both,
        )
    )
    return out


def _short(v: dict[str, float] | None, of: int, unit: str) -> str:
    """After a system's figure, " (2 of 5 rounds)" when it was not measured in all of them."""
    return f" ({rounds_text(int(v['n']), of, unit)})" if v is not None and v["n"] != of else ""


def _ratio_row(
    metric: str,
    v: dict[str, float] | None,
    target: float,
    unavailable: dict[str, str] | None,
    of: int,
    unit: str,
    *,
    complete: bool = True,
) -> Row:
    """A judged ratio: a verdict only when both systems were measured in every one of the
    `of` rounds (or reps) and `complete`; judged on the ones that survived, a system that
    died after the first would pass on a fifth of the measurement."""
    goal = f"≥ {target:g}×"
    if v is not None:
        spread = f"{v['median']:.1f}× ({v['min']:.1f}–{v['max']:.1f})"
        metric += f" (median of {rounds_text(int(v['n']), of, unit)})"
        if v["n"] != of or not complete:
            return Row("peers", metric, spread, goal, "FAILED")
        return Row("peers", metric, spread, goal, verdict(v["median"] >= target))
    if unavailable is not None:
        return Row("peers", metric, f"not run: {unavailable['short']}", goal, "skipped")
    return Row("peers", metric, "not measured", goal, "FAILED")


def notes(result: dict[str, Any]) -> list[str]:
    out = [
        f"peers: closed-loop generator {result['generator']}; every system (webhookd, or Redis + "
        "uvicorn + worker) on the server CPU, the generator and poster on the other"
    ]
    other = result.get("other_cpu_pct")
    if other is not None and other >= BUSY_OTHER_PCT:
        out.append(
            f"peers: other processes used {other:.0f} % of a CPU during the scenario: the "
            "machine was not idle, so every system here is understated, unevenly"
        )
    for peer, why in result["unavailable"].items():
        out.append(f"peers: ! {peer} not run: {why['why']}")
    for part in ("intake", "e2e"):
        for system, why in result[part]["failures"].items():
            first = why.splitlines()[0] if why else "?"
            out.append(f"peers: ! {part} {system} failed: {first}")
        if part == "e2e":
            for r in result["e2e"]["runs"]:
                if r["seconds"] is None:
                    out.append(
                        f"peers: ! e2e {r['system']} rep {r['rep']}: not done within the "
                        f"timeout ({r['acked']:,} of {r['n']:,} acked)"
                    )
    if result["quick"]:
        out.append(
            "peers: --quick: few rounds, short runs and a small end-to-end batch; the verdicts "
            "are indicative, not a measurement"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "peers",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help="2 intake rounds of 2 s, one end-to-end rep of 3,000 webhooks",
        size_help="webhooks posted end to end (default 20,000)",
    )


if __name__ == "__main__":
    sys.exit(main())
