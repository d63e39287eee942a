"""``python -m bench journal``: what journaling one webhook costs as the journal grows.

The intake benchmark starts from an empty journal; a daemon that keeps a week of a busy
source's events writes into a big one. This scenario measures the journal alone, through its
public API (``Journal.submit_ingest``, grouped the way the receiver's webhooks are: 64 in flight
per commit, WAL, ``synchronous=FULL``), into journals already holding 0 and then N events, side
by side in one run. It reports CPU per webhook (this process, all threads: the writer's SQLite
work and the hand-off) and wall time per webhook, and each as a ratio to the empty journal.

Events are what the receiver stores for an unsigned source: a unique 1 KB JSON body, a few
headers, the body's SHA-256 as the dedup key, no jobs (as in the intake benchmark).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.machine import CpuMeter, describe
from bench.table import Row, scenario_main
from webhookd.journal import Journal, NewEvent
from webhookd.models import Event, Priority, new_event_id

GROUP = 64  # webhooks per commit, about what the receiver groups under a closed-loop load
FILL_GROUP = 2_000  # in flight while filling; the writer commits 512 to a transaction
BODY_BYTES = 1024
HEADERS = (
    ("Host", "127.0.0.1:8080"),
    ("User-Agent", "bench"),
    ("Content-Type", "application/json"),
    ("Content-Length", str(BODY_BYTES)),
)


def _event(n: int, tag: str) -> NewEvent:
    head = b'{"id":"%s-%d","type":"bench.event","pad":"' % (tag.encode(), n)
    body = head + b"x" * (BODY_BYTES - len(head) - 2) + b'"}'
    key = "sha256:" + hashlib.sha256(body).hexdigest()
    event = Event(
        id=new_event_id(),
        source="bench",
        received_at=time.time(),
        dedup_key=f"bench:{key}",
        tenant="",
        priority=Priority.NORMAL,
        headers=HEADERS,
        body=body,
        verified=None,
    )
    return NewEvent(event, ())


async def _ingest(journal: Journal, items: Sequence[NewEvent]) -> None:
    await asyncio.gather(*(journal.submit_ingest(item) for item in items))


async def _measure_one(path: Path, prefill: int, count: int) -> dict[str, Any]:
    async with Journal(path) as journal:
        tag = f"fill{os.getpid()}"
        for start in range(0, prefill, FILL_GROUP):
            batch = [_event(n, tag) for n in range(start, min(start + FILL_GROUP, prefill))]
            await _ingest(journal, batch)
        items = [_event(n, f"run{os.getpid()}") for n in range(count)]
        commits = journal.commits
        cpu0, wall0 = os.times(), time.perf_counter()
        for start in range(0, count, GROUP):
            await _ingest(journal, items[start : start + GROUP])
        cpu1, wall1 = os.times(), time.perf_counter()
        commits = journal.commits - commits
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "prefill": prefill,
        "webhooks": count,
        "commits": commits,
        "cpu_us_per_webhook": 1e6 * cpu_s / count,
        "user_us_per_webhook": 1e6 * (cpu1.user - cpu0.user) / count,
        "system_us_per_webhook": 1e6 * (cpu1.system - cpu0.system) / count,
        "wall_us_per_webhook": 1e6 * (wall1 - wall0) / count,
        "journal_mb": sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6,
    }


def measure(quick: bool, size: int | None) -> dict[str, Any]:
    sizes = [0, size] if size else ([0, 50_000] if quick else [0, 100_000, 300_000])
    count = 5_000 if quick else 20_000
    meter = CpuMeter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp:
        machine = describe(tmp)
        for prefill in sizes:
            path = Path(tmp) / f"journal-{prefill}.db"
            runs.append(asyncio.run(_measure_one(path, prefill, count)))
            for leftover in Path(tmp).glob(path.name + "*"):
                leftover.unlink()
    use = meter.read()
    return {
        "machine": machine.to_json(),
        "group": GROUP,
        "runs": runs,
        "steal_pct": 100 * use.steal_s / use.wall_s if use and use.wall_s else None,
    }


def rows(result: dict[str, Any]) -> list[Row]:
    runs = result["runs"]
    base = runs[0]
    out = []
    for r in runs:
        cpu_ratio = r["cpu_us_per_webhook"] / base["cpu_us_per_webhook"]
        wall_ratio = r["wall_us_per_webhook"] / base["wall_us_per_webhook"]
        out.append(
            Row(
                "journal",
                f"{r['prefill']:,} events already in: CPU / wall per webhook",
                f"{r['cpu_us_per_webhook']:.0f} / {r['wall_us_per_webhook']:.0f} µs"
                f" ({cpu_ratio:.2f}× / {wall_ratio:.2f}×)",
            )
        )
    return out


def notes(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    runs = result["runs"]
    lines = [
        f"journal: {m['cpu_model']}, {m['cores']} cores, journal on {m['disk']}; "
        f"{runs[0]['webhooks']:,} webhooks per size, {result['group']} per commit; "
        "ratios to the empty journal, in the same run",
    ]
    split = ", ".join(
        f"{r['prefill']:,}: {r['user_us_per_webhook']:.0f} user + "
        f"{r['system_us_per_webhook']:.0f} system µs, {r['journal_mb']:.0f} MB"
        for r in runs
    )
    lines.append(f"journal: CPU split and file size at the end — {split}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "journal",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help="prefill 0 and 50,000 events, 5,000 measured each",
        size_help="prefill 0 and N events (default: 0, 100,000 and 300,000)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
