"""``python -m bench.jobcost``: where a job's time goes, piece by piece, in CPU µs per job.

Each piece of the job path runs alone, in this process, against a real SQLite journal in a temp
directory (WAL, ``synchronous=FULL``), and is charged the CPU time of the whole process (all
threads: the writer's and the reader's too) divided by the jobs it handled. CPU time, not wall
time: the machine's other work barely moves it. The last rows run the real worker pool over
the same jobs with a no-op ``python`` handler (sync and async), which is what the end-to-end
benchmark's daemon does per job, without the HTTP intake.

    python -m bench.jobcost [--jobs N] [--batch B]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from webhookd.actions import build
from webhookd.actions.base import Resources
from webhookd.config import loads
from webhookd.journal import Finished, Journal, NewEvent, NewJob, Ready
from webhookd.metrics import Metrics
from webhookd.models import Event, Job, JobState, Priority, new_event_id, new_job_id
from webhookd.scheduler import Scheduler
from webhookd.workers import WorkerPool

APPS = Path(__file__).resolve().parent / "peerapps"
CONCURRENCY = 16


def _config(handler: str) -> Any:
    return loads(
        f"""
[workers]
concurrency = {CONCURRENCY}

[sources.bench]

[[sources.bench.actions]]
type = "python"
handler = "noop_handler:{handler}"
path = "{APPS}"
"""
    )


async def _fill(journal: Journal, n: int) -> list[str]:
    """``n`` events of 1 KB with one job each, committed in groups as the receiver's would be."""
    ids: list[str] = []
    body = b'{"pad": "' + b"x" * 1000 + b'"}'
    for start in range(0, n, 256):
        items = []
        for _ in range(start, min(start + 256, n)):
            event_id = new_event_id()
            event = Event(
                id=event_id,
                source="bench",
                received_at=time.time(),
                dedup_key=f"bench:{event_id}",
                tenant="",
                priority=Priority.NORMAL,
                headers=(("Content-Type", "application/json"),),
                body=body,
            )
            job_id = new_job_id()
            ids.append(job_id)
            items.append(NewEvent(event, (NewJob(job_id, "python", "python", 5),)))
        await asyncio.gather(*(journal.ingest(item) for item in items))
    return ids


async def _cpu(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.process_time()
    await fn()
    return time.process_time() - start


async def _journal_pieces(tmp: Path, n: int, batch: int) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    async with Journal(tmp / "pieces.db") as journal:
        ids = await _fill(journal, n)
        chunks = [ids[i : i + batch] for i in range(0, n, batch)]

        async def refill() -> None:
            for _ in range(n // batch):
                lanes = await journal.queued_lanes(None, 256)
                await journal.ready_in_lanes(time.time(), [(lane, batch) for lane in lanes])

        async def next_run_at() -> None:
            for _ in range(n // batch):
                await journal.next_run_at(frozenset(), after=time.time())

        rows.append((f"refill reads (lanes + ready), one per {batch} jobs", await _cpu(refill)))
        rows.append((f"next_run_at after a refill, one per {batch} jobs", await _cpu(next_run_at)))
        claimed: list[Any] = []

        async def claim() -> None:
            for chunk in chunks:
                claimed.extend(await journal.claim(chunk, "boot"))

        rows.append((f"claim, {batch} per call (one op in a group commit)", await _cpu(claim)))

        async def finish() -> None:
            now = time.time()
            for start in range(0, len(claimed), batch):
                await asyncio.gather(
                    *(
                        journal.finish(
                            [Finished(c.job.id, c.job.attempts, JobState.DONE, now, now, "done")]
                        )
                        for c in claimed[start : start + batch]
                    )
                )

        rows.append(
            (f"finish + attempt row, one op per job, {batch} per commit", await _cpu(finish))
        )
    return rows


async def _loop_pieces(n: int) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    ready = [Ready(new_job_id(), "bench", "python", 1, "", None, i) for i in range(n)]

    async def scheduler() -> None:
        s = Scheduler(capacity=n, lane_capacity=n)
        for job in ready:
            s.add(job)
        while s.pop() is not None:
            pass

    rows.append(("scheduler add + pop", await _cpu(scheduler)))
    for handler in ("arun", "run"):
        cfg = _config(handler)
        action = build(Resources(config=cfg, http=None))[("bench", "python")]  # type: ignore[arg-type]
        event = Event(new_event_id(), "bench", 0.0, "k", "", Priority.NORMAL, (), b"{}")
        job = Job(new_job_id(), event.id, "python", "python", JobState.RUNNING, 1, 6, 0.0)

        async def call(action: Any = action, event: Event = event, job: Job = job) -> None:
            for _ in range(n):
                await action.run(event, job)

        label = "async handler, awaited" if handler == "arun" else "sync handler, in a thread"
        rows.append((f"python action: {label}", await _cpu(call)))

    async def tasks() -> None:
        async def job() -> None:
            async with asyncio.timeout(300):
                await asyncio.sleep(0)

        for _ in range(0, n, CONCURRENCY):
            await asyncio.gather(*(asyncio.create_task(job()) for _ in range(CONCURRENCY)))

    rows.append(("a task per job, with its timeout (yields once)", await _cpu(tasks)))
    log = logging.getLogger("webhookd.workers")

    async def log_call() -> None:
        for i in range(n):
            log.log(logging.INFO, "job %s event=%s outcome=%s", i, i, "done")

    rows.append(("the per-job log call (daemon at warning)", await _cpu(log_call)))
    return rows


async def _pool(tmp: Path, n: int, handler: str) -> tuple[float, float]:
    """The pool's CPU for ``n`` jobs, and the jobs per group commit it got."""
    cfg = _config(handler)
    async with Journal(tmp / f"pool-{handler}.db") as journal:
        await _fill(journal, n)
        actions = build(Resources(config=cfg, http=None))  # type: ignore[arg-type]
        pool = WorkerPool(config=cfg, journal=journal, actions=actions, boot_id="boot")
        metrics = Metrics(journal, pool)
        pool.on_finish.append(metrics.observe_finish)
        finished = asyncio.Event()
        count = [0]

        def seen(*_: Any) -> None:
            count[0] += 1
            if count[0] == n:
                finished.set()

        pool.on_finish.append(seen)

        async def run() -> None:
            task = asyncio.create_task(pool.run())
            pool.poke()
            await finished.wait()
            await pool.drain(10.0)  # the last outcomes are committed
            await task

        commits = journal.commits
        cpu = await _cpu(run)
        done = (await journal.counts()).jobs_by_state.get("done", 0)
        if done != n:
            raise RuntimeError(f"pool finished {done} of {n} jobs")
        return cpu, n / max(journal.commits - commits, 1)


async def measure(n: int, batch: int) -> list[tuple[str, float]]:
    logging.getLogger("webhookd").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-jobcost-") as tmp:
        rows = await _journal_pieces(Path(tmp), n, batch)
        rows += await _loop_pieces(n)
        for handler, label in (("arun", "async"), ("run", "sync")):
            cpu, per_commit = await _pool(Path(tmp), n, handler)
            rows.append((f"whole worker pool, {label} handler ({per_commit:.1f} jobs/commit)", cpu))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jobcost", description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=CONCURRENCY)
    args = parser.parse_args(argv)
    try:
        import uvloop

        rows = uvloop.run(measure(args.jobs, args.batch))
    except ImportError:
        rows = asyncio.run(measure(args.jobs, args.batch))
    width = max(len(name) for name, _ in rows)
    print(f"{'piece of the job path':<{width}}  CPU µs/job")
    for name, cpu_s in rows:
        print(f"{name:<{width}}  {1e6 * cpu_s / args.jobs:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
