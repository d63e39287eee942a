"""``python -m bench.backlog --events 1000000``: memory with a huge backlog.

Builds a backlog of N events (one job each, spread over tenants and the three priority classes)
directly through the Journal API in batches, then drains it with a worker pool running a no-op
action, and reports the drain process's peak RSS (``getrusage``). The target (DESIGN §6) is
≤ 100 MB with 1,000,000 queued: the scheduler keeps a bounded window of ready jobs and reads the
rest from the journal as it goes, so the backlog should cost disk, not memory.

The backlog is built in a child process, so that building it (which holds batches of events in
memory) does not count against the drain's peak.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.machine import CpuMeter, describe
from webhookd.actions.base import Outcome
from webhookd.config import ActionConfig, Config, loads
from webhookd.journal import Journal, NewEvent, NewJob
from webhookd.models import Event, Job, Priority, new_boot_id, new_event_id, new_job_id
from webhookd.workers import WorkerPool

RSS_TARGET_MB = 100  # DESIGN §6: peak RSS with 1,000,000 queued events
SOURCE = "bench"
BATCH = 2000  # ingests in flight at once; the journal commits them 512 to a transaction
BODY_BYTES = 256


def _config(journal: Path, concurrency: int, window: int) -> Config:
    return loads(
        f"""
[journal]
path = "{journal}"
[workers]
concurrency = {concurrency}
window = {window}
[sources.{SOURCE}]
tenant = "header:X-Tenant"
[[sources.{SOURCE}.actions]]
type = "log"
""",
        "bench.backlog",
    )


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# -- building ----------------------------------------------------------------------------------


async def build(path: Path, events: int, tenants: int) -> dict[str, Any]:
    """Journal ``events`` events through ``Journal.ingest``, ``BATCH`` at a time."""
    padding = "x" * BODY_BYTES
    started = time.perf_counter()
    async with Journal(path) as journal:
        now = time.time()
        for start in range(0, events, BATCH):
            items = []
            for i in range(start, min(start + BATCH, events)):
                tenant = f"tenant-{i % tenants:04}"
                body = json.dumps({"n": i, "pad": padding})[:BODY_BYTES].encode()
                event_id = new_event_id()
                event = Event(
                    id=event_id,
                    source=SOURCE,
                    received_at=now,
                    dedup_key=f"{SOURCE}:{event_id}",
                    tenant=tenant,
                    priority=Priority(i % 3),
                    headers=(("Content-Type", "application/json"), ("X-Tenant", tenant)),
                    body=body,
                )
                items.append(NewEvent(event, (NewJob(new_job_id(), "log", "log", 3),)))
            await asyncio.gather(*(journal.ingest(item) for item in items))
        queued = await journal.backlog()
    return {
        "events": events,
        "queued_jobs": queued,
        "build_s": round(time.perf_counter() - started, 1),
        "build_peak_rss_mb": round(peak_rss_mb(), 1),
    }


# -- draining ----------------------------------------------------------------------------------


class NoOp:
    """An action that does nothing: what is measured is the daemon's own cost per job."""

    def __init__(self, config: ActionConfig) -> None:
        self.config = config
        self.runs = 0

    async def run(self, event: Event, job: Job) -> Outcome:
        self.runs += 1
        return Outcome.done()

    async def aclose(self) -> None:
        return None


async def drain(path: Path, concurrency: int, window: int, limit: int | None) -> dict[str, Any]:
    """Drain the backlog (or ``limit`` jobs of it), sampling memory as it goes."""
    cfg = _config(path, concurrency, window)
    noop = NoOp(cfg.sources[SOURCE].actions[0])
    async with Journal(path) as journal:
        queued = await journal.backlog()
        rss_open = current_rss_mb()
        pool = WorkerPool(
            config=cfg, journal=journal, actions={(SOURCE, "log"): noop}, boot_id=new_boot_id()
        )
        samples: list[float] = []
        largest_window = 0

        def sample(*_: object) -> None:
            nonlocal largest_window
            largest_window = max(largest_window, len(pool.scheduler))
            if noop.runs % 10_000 == 0:
                samples.append(current_rss_mb())
            if limit is not None and noop.runs >= limit:
                pool.stop()

        pool.on_finish.append(sample)
        started = time.perf_counter()
        await pool.run_until_idle()
        elapsed = time.perf_counter() - started
        left = await journal.backlog()
    return {
        "queued_at_start": queued,
        "drained": noop.runs,
        "left": left,
        "drain_s": round(elapsed, 1),
        "jobs_per_s": round(noop.runs / elapsed) if elapsed else None,
        "rss_after_open_mb": round(rss_open, 1),
        "rss_samples_mb": [round(s, 1) for s in samples[:: max(len(samples) // 10, 1)]],
        "largest_window": largest_window,
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


# -- the command -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.backlog", description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--tenants", type=int, default=100, help="spread over this many tenants")
    p.add_argument("--concurrency", type=int, default=32, help="workers.concurrency")
    p.add_argument("--window", type=int, default=1000, help="workers.window")
    p.add_argument("--drain", type=int, default=None, help="stop after this many jobs")
    p.add_argument("--tmpdir", default=None, help="where the journal goes (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the journal file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--build-only", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.build_only:  # the child: build, report as JSON, exit
        print(json.dumps(asyncio.run(build(Path(args.build_only), args.events, args.tenants))))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="webhookd-backlog-", dir=args.tmpdir))
    path = workdir / "backlog.db"
    machine = describe(str(workdir))
    try:
        child = subprocess.run(
            [
                *(sys.executable, "-m", "bench.backlog", "--build-only", str(path)),
                *("--events", str(args.events), "--tenants", str(args.tenants)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        built = json.loads(child.stdout)
        built["journal_mb"] = round(path.stat().st_size / 2**20, 1)
        meter = CpuMeter()
        drained = asyncio.run(drain(path, args.concurrency, args.window, args.drain))
        cpu = meter.read()
    finally:
        if not args.keep:
            for leftover in workdir.iterdir():
                leftover.unlink()
            workdir.rmdir()
    report = {
        "machine": machine.to_json(),
        "steal_pct": round(cpu.steal_pct, 1) if cpu else None,
        "tenants": args.tenants,
        "concurrency": args.concurrency,
        "window": args.window,
        **built,
        **drained,
        "target_rss_mb": RSS_TARGET_MB,
        "ok": drained["peak_rss_mb"] <= RSS_TARGET_MB,
    }
    if args.json:
        print(json.dumps(report))
    else:
        _print(report, machine.summary(), str(path) if args.keep else None)
    return 0 if report["ok"] else 1


def _print(r: dict[str, Any], machine: str, kept: str | None) -> None:
    print(f"machine: {machine}; steal {r['steal_pct']}%")
    print(
        f"built:   {r['events']:,} events ({r['queued_jobs']:,} queued jobs, {r['tenants']} "
        f"tenants × 3 classes) in {r['build_s']} s; journal {r['journal_mb']} MB; "
        f"builder peak RSS {r['build_peak_rss_mb']} MB"
    )
    print(
        f"drained: {r['drained']:,} jobs in {r['drain_s']} s ({r['jobs_per_s']:,}/s), "
        f"{r['left']:,} left; concurrency {r['concurrency']}, window {r['window']} "
        f"(largest seen {r['largest_window']})"
    )
    print(
        f"memory:  RSS {r['rss_after_open_mb']} MB after opening the journal; samples "
        f"{r['rss_samples_mb']} MB"
    )
    verdict = "ok" if r["ok"] else "OVER TARGET"
    print(
        f"peak RSS while draining: {r['peak_rss_mb']} MB"
        f" (target ≤ {r['target_rss_mb']} MB): {verdict}"
    )
    if kept:
        print(f"journal kept at {kept}")


if __name__ == "__main__":
    sys.exit(main())
