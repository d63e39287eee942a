"""Where intake time goes: webhookd's work per webhook, added one piece at a time.

``python -m bench.bisect`` prints two tables of server CPU µs per webhook (CPU time of the
server process over requests answered, which other load on the machine barely moves):

1. HTTP: servers built up from a bare aiohttp handler to ``webhookd serve`` itself, each a fresh
   process pinned to one CPU with wrk (unique 1 KB bodies, 64 connections) on the other, in
   ``--rounds`` interleaved rounds; req/s and its ratio to the bare server of the same round.
2. SQL: the journal's rows alone, written in batches of 64 by one thread in WAL with
   ``synchronous = FULL``, schema piece by piece from the minimal ``(id, received_at, body)``.

``--only latency`` prints a third: the ack latency at a fixed rate (``--rate``, 1,000/s), the
same generator as the bench's p99 row, for the HTTP steps and, between ``minimal`` and
``journal``, the minimal server checkpointing as the journal does and writing the SQL table's
rows piece by piece (one group commit per batch of requests, as ``minimal`` does). It shows
what each piece adds to the p99.

The HTTP steps (``--serve STEP``: this module is also the server):

- ``bare``: read the body, answer 200.
- ``minimal``: group commit of ``(id, received_at, body)`` on one writer thread, 202 after COMMIT;
  with ``--with-rows K``, the rows of the SQL table's step K (0 is the minimal table) and the
  journal's checkpoints.
- ``journal``: webhookd's SQLite journal (``submit_ingest``) with an event built in the handler
  (id, sha256 dedup key, headers), no receiver.
- ``receiver``: webhookd's receiver app (checks, dedup key, header masking, deadlines) on it.
- ``serve``: ``webhookd serve`` itself (adds metrics, the admin port, worker pool, retention).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import queue
import resource
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HTTP_STEPS = ("bare", "minimal", "journal", "receiver", "serve")
BATCH = 64


# -- the servers ----------------------------------------------------------------------------------


async def _serve(step: str, port: int, db: Path, rows: int | None = None) -> None:
    from aiohttp import web

    from webhookd.config import loads
    from webhookd.http1 import Http1Server
    from webhookd.journal import Journal, NewEvent
    from webhookd.models import Event, Priority, new_event_id
    from webhookd.receiver import Receiver
    from webhookd.state import IntakeState

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    journal: Journal | None = None
    app = web.Application(client_max_size=1024 * 1024)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ready")

    if step == "bare":

        async def accept(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(status=202)

        app.router.add_post("/hooks/bench", accept)
    elif step == "minimal":
        writer = _ThreadGroupCommit(db, loop, rows)

        async def accept(request: web.Request) -> web.Response:
            body = await request.read()
            await writer.submit(body)
            return web.Response(status=202)

        app.router.add_post("/hooks/bench", accept)
    elif step == "journal":
        journal = Journal(db)
        await journal.open()

        async def accept(request: web.Request) -> web.Response:
            body = await request.read()
            event = Event(
                id=new_event_id(),
                source="bench",
                received_at=time.time(),
                dedup_key="bench:sha256:" + hashlib.sha256(body).hexdigest(),
                tenant="",
                priority=Priority.NORMAL,
                headers=tuple(request.headers.items()),
                body=body,
            )
            assert journal is not None
            await journal.submit_ingest(NewEvent(event, ()))
            return web.Response(status=202, body=b'{"id": "%s"}' % event.id.encode())

        app.router.add_post("/hooks/bench", accept)
    else:  # receiver
        config = loads("[sources.bench]\n")
        journal = Journal(db)
        await journal.open()
    runner: web.BaseRunner | Http1Server
    if step == "receiver":  # webhookd's own server: "/readyz" is a JSON 404 there, still an answer
        assert journal is not None
        runner = Receiver(config, journal, IntakeState()).server()
        await runner.start("127.0.0.1", port)
    else:
        app.router.add_get("/readyz", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if journal is not None:
            if os.environ.get("BISECT_VERBOSE"):
                print(f"commits={journal.commits} ops={journal.batched_ops}", file=sys.stderr)
            await journal.close()


class _ThreadGroupCommit:
    """The minimal durable intake: whatever is waiting goes in one transaction.

    By default one ``(id, received_at, body)`` row per webhook, checkpointed by SQLite inside a
    commit every 1,000 pages. With ``rows``, the rows of the SQL table's step ``rows`` (0 is
    the minimal table), checkpointed as the journal does: a background thread running the
    journal's ``checkpoint_passes`` every ``CHECKPOINT_EVERY_S``, the writer copying the tail
    when they fall short, SQLite's own only as the journal's backstop.
    """

    def __init__(
        self, path: Path, loop: asyncio.AbstractEventLoop, rows: int | None = None
    ) -> None:
        self.q: queue.SimpleQueue[tuple[bytes, asyncio.Future[None]]] = queue.SimpleQueue()
        self.loop = loop
        _, schema, self.write = _sql_steps()[rows or 0]
        self.conn = _open_rows(path, schema, check_same_thread=False)
        self.tail = threading.Event()  # the last background checkpoint fell short
        if rows is not None:
            from webhookd.journal import WRITER_AUTOCHECKPOINT_PAGES

            self.conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}")
            threading.Thread(target=self._checkpoints, args=(path,), daemon=True).start()
        threading.Thread(target=self._run, daemon=True).start()

    def _checkpoints(self, path: Path) -> None:
        from webhookd.journal import CHECKPOINT_EVERY_S, checkpoint_passes

        conn = sqlite3.connect(path, isolation_level=None)
        while True:
            time.sleep(CHECKPOINT_EVERY_S)
            if not checkpoint_passes(conn)[1]:
                self.tail.set()

    def submit(self, body: bytes) -> asyncio.Future[None]:
        future = self.loop.create_future()
        self.q.put((body, future))
        return future

    def _run(self) -> None:
        while True:
            batch = [self.q.get()]
            while not self.q.empty():
                batch.append(self.q.get_nowait())
            if self.tail.is_set():
                self.tail.clear()
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.conn.execute("BEGIN IMMEDIATE")
            self.write(self.conn, [body for body, _ in batch], time.time())
            self.conn.execute("COMMIT")
            self.loop.call_soon_threadsafe(_resolve, [f for _, f in batch])


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for f in futures:
        if not f.done():
            f.set_result(None)


# -- the HTTP table -----------------------------------------------------------------------------


@contextmanager
def _step_server(step: str, rows: int | None = None) -> Iterator[tuple[str, Callable[[], float]]]:
    """A fresh server of ``step`` pinned to CPU 1: (its hook URL, its CPU seconds so far)."""
    from bench import loadgen
    from bench.servers import Target, free_port, proc_cpu_s, running_webhookd

    if step == "serve":
        with running_webhookd(
            "[sources.bench]\n", cpu=1, target=Target("serve", "webhookd", 202)
        ) as s:
            yield s.url, s.cpu_s
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-bisect-") as tmp:
        cmd = [sys.executable, "-m", "bench.bisect", "--serve", step, "--port", str(port)]
        cmd += ["--db", str(Path(tmp) / "j.db")]
        if rows is not None:
            cmd += ["--with-rows", str(rows)]
        proc = subprocess.Popen(cmd, preexec_fn=loadgen.pin_to(1), cwd=Path(__file__).parent.parent)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).close()
                    break
                except urllib.error.HTTPError:
                    break  # up and answering
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"bisect server {step} did not start") from None
                    time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/hooks/bench", lambda: proc_cpu_s(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)


def _http_round(step: str, duration_s: float) -> tuple[float, float]:
    """(req/s, server CPU µs per webhook) for one fresh server of ``step``."""
    from bench import loadgen

    with _step_server(step) as (url, cpu_s):
        before = cpu_s()
        load = loadgen.closed_loop(
            url, connections=64, duration_s=duration_s, expect_status=202, cpu=0, use_wrk=True
        )
        used = cpu_s() - before
    if load.errors:
        raise RuntimeError(f"{step}: {load.errors} unexpected answers {load.statuses}")
    return load.rps, used / max(load.requests, 1) * 1e6


def http_table(steps: tuple[str, ...], rounds: int, duration_s: float) -> list[str]:
    rps: dict[str, list[float]] = {s: [] for s in steps}
    cpu: dict[str, list[float]] = {s: [] for s in steps}
    ratio: dict[str, list[float]] = {s: [] for s in steps}
    for n in range(rounds):
        for step in steps:
            r, c = _http_round(step, duration_s)
            rps[step].append(r)
            cpu[step].append(c)
            print(f"  round {n + 1} {step:9s} {r:8.0f} req/s {c:7.1f} µs/webhook", file=sys.stderr)
        if "bare" in steps:
            for step in steps:
                ratio[step].append(rps[step][-1] / rps["bare"][-1])
    lines = [
        "| step | server CPU µs/webhook | added | req/s | × bare |",
        "|---|---:|---:|---:|---:|",
    ]
    previous = None
    for step in steps:
        c = statistics.median(cpu[step])
        added = f"{c - previous:+.0f}" if previous is not None else ""
        share = f"{statistics.median(ratio[step]):.2f}" if ratio[step] else ""
        lines.append(
            f"| {step} | {c:.0f} | {added} | {statistics.median(rps[step]):,.0f} | {share} |"
        )
        previous = c
    return lines


# -- the latency table ---------------------------------------------------------------------------

# Between "minimal" and "journal" (which writes step 5's rows through webhookd's own writer):
# the minimal server checkpointing as the journal does, writing the SQL table's rows of steps
# 0-5, so each piece of the schema is measured on its own.
LATENCY_STEPS = (
    "bare",
    "minimal",
    *(f"rows:{k}" for k in range(6)),
    "journal",
    "receiver",
    "serve",
)


def _latency_round(step: str, rate: float, duration_s: float) -> tuple[float, float, float]:
    """(p50, p99, p99.9 in ms) of acks at a fixed ``rate`` for one fresh server of ``step``."""
    from bench import loadgen

    server, _, rows = step.partition(":")
    with _step_server("minimal" if rows else server, int(rows) if rows else None) as (url, _):
        # One second first, as the bench's fixed rates do: the connections opened, caches warm.
        loadgen.fixed_rate(url, rate=rate, duration_s=1.0, expect_status=202, cpu=0)
        load = loadgen.fixed_rate(url, rate=rate, duration_s=duration_s, expect_status=202, cpu=0)
    if load.errors:
        raise RuntimeError(f"{step}: {load.errors} unexpected answers {load.statuses}")
    return load.p50_ms, load.p99_ms, load.p999_ms


def latency_table(rounds: int, duration_s: float, rate: float) -> list[str]:
    names = {f"rows:{k}": f"… {name}" for k, (name, _, _) in enumerate(_sql_steps())}
    names["rows:0"] = "minimal, checkpoints in the background as the journal's"
    runs: dict[str, list[tuple[float, float, float]]] = {s: [] for s in LATENCY_STEPS}
    for n in range(rounds):  # interleaved, so a slow spell of the disk hits every step
        for step in LATENCY_STEPS:
            runs[step].append(_latency_round(step, rate, duration_s))
            p50, p99, p999 = runs[step][-1]
            print(
                f"  round {n + 1} {step:9s} p50 {p50:5.2f} p99 {p99:6.2f} p99.9 {p999:6.2f} ms",
                file=sys.stderr,
            )
    lines = [
        f"| at {rate:,.0f}/s | p50 ms | p99 ms | p99 range | p99.9 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for step in LATENCY_STEPS:
        p50s, p99s, p999s = zip(*runs[step], strict=True)
        lines.append(
            f"| {names.get(step, step)} | {statistics.median(p50s):.2f}"
            f" | {statistics.median(p99s):.1f} | {min(p99s):.1f}-{max(p99s):.1f}"
            f" | {statistics.median(p999s):.1f} |"
        )
    return lines


# -- the SQL table ------------------------------------------------------------------------------


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _body(n: int) -> bytes:
    head = b'{"id":"%d","type":"bench.event","pad":"' % n
    return head + b"x" * (1024 - len(head) - 2) + b'"}'


_HEADERS = (
    ("Host", "127.0.0.1:8080"),
    ("Content-Length", "1024"),
    ("Content-Type", "application/json"),
)


Write = Callable[[sqlite3.Connection, list[bytes], float], None]


def _sql_steps() -> list[tuple[str, str, Write]]:
    """(name, schema, write a batch of bodies) for each step; each adds one piece to the one
    before."""
    from webhookd.journal import MIGRATIONS
    from webhookd.journal.schema import key_digest
    from webhookd.models import new_event_id, new_job_id

    headers = json.dumps(_HEADERS, separators=(",", ":"))

    def minimal(conn: sqlite3.Connection, bodies: list[bytes], now: float) -> None:
        conn.executemany(
            "INSERT INTO journal (received_at, body) VALUES (?, ?)", [(now, b) for b in bodies]
        )

    def events(
        conn: sqlite3.Connection, bodies: list[bytes], now: float, dedup: bool, jobs: bool
    ) -> None:
        rows, keys, job_rows = [], [], []
        for body in bodies:
            eid = new_event_id()
            key = "bench:sha256:" + hashlib.sha256(body).hexdigest()
            rows.append((eid, "bench", now, key, "", 1, headers, body))
            keys.append((key_digest(key), eid, now))
            if jobs:
                job_rows.append((new_job_id(), eid, "bench", "fwd", "forward", 1, "", None, now, 5))
        if dedup:
            conn.executemany(
                "INSERT OR IGNORE INTO dedup(digest, event_id, created_at) VALUES (?, ?, ?)", keys
            )
        conn.executemany(
            "INSERT INTO events(id, source, received_at, dedup_key, tenant, priority, headers,"
            " body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        if jobs:
            conn.executemany(
                "INSERT INTO jobs(id, event_id, source, action, type, state, priority, tenant,"
                " order_key, run_at, max_attempts) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                job_rows,
            )

    plain_events = (
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,"
        " source TEXT NOT NULL, received_at REAL NOT NULL, dedup_key TEXT NOT NULL,"
        " tenant TEXT NOT NULL DEFAULT '', priority INTEGER NOT NULL, headers TEXT NOT NULL,"
        " body BLOB NOT NULL, verified TEXT, filtered TEXT)"
    )
    dedup = (
        "CREATE TABLE dedup (n INTEGER PRIMARY KEY, digest BLOB NOT NULL UNIQUE,"
        " event_id TEXT NOT NULL, created_at REAL NOT NULL)"
    )
    full = ";".join(MIGRATIONS)
    no_jobs = full  # the jobs table is there but empty: a source without actions
    return [
        (
            "minimal (id, received_at, body)",
            "CREATE TABLE journal (id INTEGER PRIMARY KEY, received_at REAL, body BLOB)",
            minimal,
        ),
        (
            "+ event columns (text id, source, dedup key, headers JSON…)",
            plain_events,
            lambda c, b, now: events(c, b, now, False, False),
        ),
        (
            "+ unique index on the event id",
            plain_events + "; CREATE UNIQUE INDEX events_id ON events(id)",
            lambda c, b, now: events(c, b, now, False, False),
        ),
        (
            "+ events_source, events_received indexes",
            plain_events
            + "; CREATE UNIQUE INDEX events_id ON events(id)"
            + "; CREATE INDEX events_source ON events(source, seq)"
            + "; CREATE INDEX events_received ON events(received_at, source)",
            lambda c, b, now: events(c, b, now, False, False),
        ),
        (
            "+ dedup keys (a random 16-byte digest, unique index; rows appended)",
            plain_events
            + "; CREATE UNIQUE INDEX events_id ON events(id)"
            + "; CREATE INDEX events_source ON events(source, seq)"
            + "; CREATE INDEX events_received ON events(received_at, source)"
            + f"; {dedup}",
            lambda c, b, now: events(c, b, now, True, False),
        ),
        (
            "= the journal's schema",
            no_jobs,
            lambda c, b, now: events(c, b, now, True, False),
        ),
        (
            "+ one job row per webhook and its indexes",
            full,
            lambda c, b, now: events(c, b, now, True, True),
        ),
    ]


def _open_rows(path: Path, schema: str, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """A new file in WAL with ``synchronous = FULL``, holding ``schema``."""
    from webhookd.journal.schema import add_functions

    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    add_functions(conn)  # the journal's migrations call them
    conn.executescript(schema)  # whole statements: a trigger's body holds semicolons of its own
    return conn


def _sql_step(schema: str, write: Write, rows: int) -> float:
    """CPU µs per webhook of writing ``rows`` webhooks' rows, 64 per commit, into ``schema``."""
    with tempfile.TemporaryDirectory(prefix="bench-bisect-") as tmp:
        conn = _open_rows(Path(tmp) / "j.db", schema)
        before = _cpu_s()
        for start in range(0, rows, BATCH):
            conn.execute("BEGIN IMMEDIATE")
            write(conn, [_body(n) for n in range(start, start + BATCH)], time.time())
            conn.execute("COMMIT")
        used = (_cpu_s() - before) / rows * 1e6
        conn.close()
    return used


def sql_table(rows: int, rounds: int) -> list[str]:
    steps = _sql_steps()
    cpu: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):  # interleaved, so a busy spell on the machine hits every step
        for n, (_, schema, write) in enumerate(steps):
            cpu[n].append(_sql_step(schema, write, rows))
    lines = ["| journal rows | CPU µs/webhook | added |", "|---|---:|---:|"]
    previous = None
    for (name, _, _), used_all in zip(steps, cpu, strict=True):
        used = statistics.median(used_all)
        added = f"{used - previous:+.1f}" if previous is not None else ""
        lines.append(f"| {name} | {used:.1f} | {added} |")
        previous = used
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bisect", description=__doc__)
    parser.add_argument("--serve", choices=HTTP_STEPS[:-1], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--with-rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per HTTP run")
    parser.add_argument("--rows", type=int, default=20_000, help="webhooks per SQL step")
    parser.add_argument("--only", choices=("http", "sql", "latency"))
    parser.add_argument("--rate", type=float, default=1000.0, help="webhooks/s for --only latency")
    parser.add_argument(
        "--rate-duration", type=float, default=30.0, help="seconds per run for --only latency"
    )
    parser.add_argument(
        "--steps",
        default=",".join(HTTP_STEPS),
        help="HTTP steps to run, comma-separated (an A/B of two steps: --steps receiver,serve)",
    )
    args = parser.parse_args(argv)
    if args.serve:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(args.serve, args.port, args.db, args.with_rows))
        return
    if args.only == "latency":
        print("\n".join(latency_table(args.rounds, args.rate_duration, args.rate)))
        return
    if args.only != "http":
        print("\n".join(sql_table(args.rows, max(args.rounds, 3))) + "\n", flush=True)
    if args.only != "sql":
        steps = tuple(step for step in args.steps.split(",") if step)
        unknown = set(steps) - set(HTTP_STEPS)
        if unknown:
            parser.error(f"--steps: unknown step(s) {', '.join(sorted(unknown))}")
        print("\n".join(http_table(steps, args.rounds, args.duration)))


if __name__ == "__main__":
    main()
