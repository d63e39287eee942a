"""``python -m bench burst``: the 40,000-webhook burst (target, DESIGN §6: all acked within 10 s
and processed, none lost, none twice).

``webhookd serve`` (pinned to its own CPU, default 32 workers) has one source with a ``forward``
action to a recording aiohttp target in this process. 40,000 unique 1 KB webhooks are posted as
fast as 64 connections are answered, by ``wrk`` when installed (else aiohttp's client, which
tops out near 3,000 posts/s on one core here); a 503 or 429 is retried after its
``Retry-After``, as a provider would. Reported: the time until all were acked; the time until
every acked event had reached the target (counted from the first post); *lost*: acked event ids
that never arrived; *duplicates*: deliveries beyond the first of an event id. The poster and the
target share this process's CPU, so while posting the target answers more slowly than a real
one would.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.dispatch import config
from bench.harness import (
    Busy,
    RecordingTarget,
    busy_note,
    placed,
    post_many,
    post_many_wrk,
    tag,
)
from bench.loadgen import wrk_path
from bench.servers import free_port, running_webhookd
from bench.table import Row, scenario_main, verdict

CONNECTIONS = 64
BURST = 40_000
ACK_TARGET_S = 10.0  # DESIGN §6: all BURST acked within this (a smaller burst: in proportion)
PROCESS_TIMEOUT_S = 300.0


def measure(quick: bool = False, count: int | None = None) -> dict[str, Any]:
    """Post `count` webhooks at once (default 40,000; 10,000 with `quick`)."""
    n = count if count is not None else (10_000 if quick else BURST)
    port = free_port()
    body = config(f"http://127.0.0.1:{port}/sink")
    with placed() as cpu, running_webhookd(body, cpu=cpu, probe=False) as server:
        busy = Busy(server.proc.pid)
        result = asyncio.run(_run(server.url, port, n))
        result["other_cpu_pct"] = busy.other_pct()
    return result


async def _run(url: str, port: int, n: int) -> dict[str, Any]:
    target = await RecordingTarget(port).start()
    try:
        wrk = wrk_path()
        started = time.monotonic()
        if wrk is not None:
            posts = await post_many_wrk(wrk, url, n, CONNECTIONS, tag(), PROCESS_TIMEOUT_S)
        else:
            posts = await post_many(url, n, CONNECTIONS, tag())
        acked_at = time.monotonic()
        ids = set(posts.acked.values())
        last = await target.wait_all(ids, PROCESS_TIMEOUT_S)
        # Anything still in flight (a duplicate would be) has had the whole wait to arrive; give
        # it one more moment after the last expected delivery.
        await asyncio.sleep(0.5)
    finally:
        await target.aclose()
    arrived = {i for i in ids if i in target.arrivals}
    return {
        "webhooks": n,
        "poster": "wrk" if wrk is not None else "aiohttp",
        "posted": posts.to_json(),
        "ack_all_s": acked_at - started,
        "process_all_s": (last - started) if last is not None else None,
        "acked": len(posts.acked),
        "unique_ids": len(ids),
        "lost": len(ids - arrived),
        "duplicates": sum(len(t) - 1 for t in target.arrivals.values()),
        "unexpected": len(set(target.arrivals) - ids),
        "deliveries": target.received,
        "timed_out": last is None,
    }


def rows(result: dict[str, Any]) -> list[Row]:
    n = result["webhooks"]
    posted = result["posted"]
    processed = result["process_all_s"]
    all_acked = result["acked"] == n and posted["failures"] == 0
    ack_target_s = ACK_TARGET_S * n / BURST
    return [
        Row(
            "burst",
            f"{n:,} webhooks: time to ack all",
            f"{result['ack_all_s']:.1f} s ({posted['acked_per_s']:,.0f}/s)",
            f"{n:,} acked ≤ {ack_target_s:g} s",
            verdict(all_acked and result["ack_all_s"] <= ack_target_s),
        ),
        Row(
            "burst",
            "time to process all (from first post)",
            f"{processed:.1f} s ({n / processed:,.0f}/s)" if processed else "not all in time",
            "all processed",
            verdict(processed is not None),
        ),
        Row(
            "burst",
            "lost (acked, never delivered)",
            f"{result['lost']}",
            "0",
            verdict(result["lost"] == 0 and result["acked"] > 0),
        ),
        Row(
            "burst",
            "duplicates (delivered twice)",
            f"{result['duplicates']}",
            "0",
            verdict(result["duplicates"] == 0),
        ),
        Row("burst", "503/429 answers retried", f"{posted['retries']}"),
    ]


def notes(result: dict[str, Any]) -> list[str]:
    out = []
    note = busy_note(result.get("other_cpu_pct"))
    if note:
        out.append(f"burst: {note}")
    if result["posted"]["failures"]:
        out.append(f"burst: ! {result['posted']['failures']} posts failed for good")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "burst",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help="10,000 webhooks instead of 40,000",
        size_help="webhooks in the burst",
    )


if __name__ == "__main__":
    sys.exit(main())
