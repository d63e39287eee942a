"""``python -m bench e2e``: no-op jobs end to end: 20,000 queued jobs drained, in jobs/s to
``done``. Celery and arq are compared end to end, in the same run, by the ``peers`` scenario.

``webhookd serve`` (pinned to its own CPU, default 32 workers) has one source whose one action is
``log`` at level ``debug`` while the daemon logs at ``warning``: the job is claimed, run (it
checks the level and returns ``done``) and recorded like any other, but writes nothing, so what
is measured is webhookd's own cost per job. The source is paused (``webhookd pause``) before the
daemon starts; 20,000 unique webhooks are posted (each acked after its commit); then
``webhookd resume``, and the admin ``/stats`` is polled every 50 ms until the backlog is 0.

*jobs/s* counts from the first poll that saw the backlog shrink to the first that saw it at 0
(so the up-to-a-second a running daemon takes to notice a resume is not charged to it);
*resume → empty* is the whole wall time from the ``resume`` command.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import Busy, busy_note, placed, post_many, session, stats, tag
from bench.servers import cli, pause_bench, running_webhookd
from bench.table import Row, scenario_main

POLL_S = 0.05
DRAIN_TIMEOUT_S = 300.0
CONNECTIONS = 64
CONFIG = """\
[sources.bench]

[[sources.bench.actions]]
type = "log"
level = "debug"
"""


def measure(quick: bool = False, count: int | None = None) -> dict[str, Any]:
    """Queue `count` jobs (default 20,000; 5,000 with `quick`) and drain them."""
    n = count if count is not None else (5_000 if quick else 20_000)

    with (
        placed() as cpu,
        running_webhookd(CONFIG, cpu=cpu, probe=False, before_start=pause_bench) as s,
    ):
        assert s.config is not None
        result = asyncio.run(_run(s.url, s.admin_url, s.config, n, s.proc.pid))
    result["action"] = "log at level debug (daemon at warning): runs, writes nothing"
    return result


async def _run(url: str, admin_url: str, config: Path, n: int, pid: int) -> dict[str, Any]:
    posts = await post_many(url, n, CONNECTIONS, tag())
    async with session(2) as http:
        queued = (await stats(http, admin_url))["backlog"]
        busy = Busy(pid)
        resumed = time.monotonic()
        await asyncio.to_thread(cli, "resume", "bench", config=config)
        first: tuple[float, int] | None = (
            None  # (when, backlog) at the first poll that saw progress
        )
        backlog = queued
        deadline = resumed + DRAIN_TIMEOUT_S
        while backlog > 0 and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            doc = await stats(http, admin_url)
            backlog = int(doc["backlog"])
            if first is None and backlog < queued:
                first = (time.monotonic(), backlog)
        emptied = time.monotonic()
        final = await stats(http, admin_url)
        # The backlog is live; the counts by state may be a read up to 50 times its cost old
        # ("counts_age_s"): the jobs done are those of the first count made after the drain.
        while final.get("counts_age_s") and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            final = await stats(http, admin_url)
        other = busy.other_pct()
    drained_s = emptied - first[0] if first is not None else 0.0
    return {
        "jobs": n,
        "posted": posts.to_json(),
        "queued_before_resume": queued,
        "backlog_after": backlog,
        "timed_out": backlog > 0,
        "jobs_by_state": final.get("jobs", {}),
        "resume_to_empty_s": emptied - resumed,
        "drain_s": drained_s,
        "jobs_per_s": (first[1] / drained_s) if first is not None and drained_s > 0 else 0.0,
        "concurrency": final.get("workers", {}).get("concurrency"),
        "other_cpu_pct": other,
    }


def rows(result: dict[str, Any]) -> list[Row]:
    done = int(result["jobs_by_state"].get("done", 0))
    ok = not result["timed_out"] and done == result["jobs"]
    return [
        Row(
            "e2e",
            f"{result['jobs']:,} queued no-op jobs → done",
            f"{result['jobs_per_s']:,.0f} jobs/s",
            "(vs Celery: see peers)",
            "" if ok else "MISS",
        ),
        Row(
            "e2e",
            "resume → backlog 0 / jobs done",
            f"{result['resume_to_empty_s']:.1f} s / {done:,}",
            f"{result['jobs']:,} done",
            "PASS" if ok else "MISS",
        ),
        Row(
            "e2e",
            "queueing them (post, 64 conns)",
            f"{result['posted']['acked_per_s']:,.0f} acks/s",
        ),
    ]


def notes(result: dict[str, Any]) -> list[str]:
    out: list[str] = []
    note = busy_note(result.get("other_cpu_pct"))
    if note:
        out.append(f"e2e: {note}")
    if result["timed_out"]:
        out.append(f"e2e: ! the backlog was still {result['backlog_after']} after the timeout")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "e2e",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help="5,000 jobs instead of 20,000",
        size_help="jobs to queue",
    )


if __name__ == "__main__":
    sys.exit(main())
