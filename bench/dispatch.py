"""``python -m bench dispatch``: commit → job start on an idle pool (target, DESIGN §6: p50 ≤ 1 ms,
p99 ≤ 5 ms, no polling delay).

``webhookd serve`` (pinned to its own CPU) has one source with a ``forward`` action to a
recording aiohttp target in this process. Webhooks are posted one at a time: post, wait for the
202, wait for the forward to arrive, pause a few milliseconds, next; so the pool is idle each
time. The 202 is sent after the commit, so *ack → arrival* (202 received → the forward's request
reaches the target) is the dispatch latency plus one local HTTP request (the forward itself),
minus the 202's own trip back: an honest upper bound for commit → job start, within about the
cost of a loopback request. *post → ack* (the ack latency with nothing else going on) and
*post → arrival* are reported alongside.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.harness import (
    Busy,
    PostResult,
    RecordingTarget,
    busy_note,
    latency_summary,
    placed,
    post_one,
    session,
    tag,
)
from bench.loadgen import make_body
from bench.servers import free_port, running_webhookd
from bench.table import Row, scenario_main, verdict

P50_TARGET_MS = 1.0
P99_TARGET_MS = 5.0
PAUSE_S = 0.005  # between webhooks, so each finds the pool idle
ARRIVAL_TIMEOUT_S = 10.0


def config(target_url: str) -> str:
    return f"""\
[sources.bench]

[[sources.bench.actions]]
type = "forward"
url = "{target_url}"
"""


def measure(quick: bool = False, count: int | None = None) -> dict[str, Any]:
    """Post `count` webhooks one at a time (default 1,000; 200 with `quick`); the latencies."""
    n = count if count is not None else (200 if quick else 1000)
    port = free_port()
    with (
        placed() as cpu,
        running_webhookd(config(f"http://127.0.0.1:{port}/sink"), cpu=cpu, probe=False) as server,
    ):
        busy = Busy(server.proc.pid)
        result = asyncio.run(_run(server.url, port, n))
        result["other_cpu_pct"] = busy.other_pct()
    result["method"] = (
        "webhookd serve + forward action to a local aiohttp target; one webhook at a time"
    )
    return result


async def _run(url: str, port: int, n: int) -> dict[str, Any]:
    target = await RecordingTarget(port).start()
    posts = PostResult(count=n, elapsed_s=0.0)
    ack_s: list[float] = []
    dispatch_s: list[float] = []
    total_s: list[float] = []
    missing = 0
    prefix = tag()
    try:
        async with session(4) as http:
            for i in range(-20, n):  # 20 warm-up webhooks, not counted
                sent = time.monotonic()
                event_id = await post_one(http, url, make_body(prefix, i), posts, i)
                acked = time.monotonic()
                if event_id is None:
                    continue
                arrived = await target.wait_for(event_id, ARRIVAL_TIMEOUT_S)
                if i >= 0:
                    if arrived is None:
                        missing += 1
                    else:
                        ack_s.append(acked - sent)
                        dispatch_s.append(arrived - acked)
                        total_s.append(arrived - sent)
                await asyncio.sleep(PAUSE_S)
    finally:
        await target.aclose()
    return {
        "webhooks": n,
        "post_to_ack": latency_summary(ack_s),
        "ack_to_arrival": latency_summary(dispatch_s),
        "post_to_arrival": latency_summary(total_s),
        "missing": missing,
        "post_failures": posts.failures,
        "statuses": dict(posts.statuses),
    }


def rows(result: dict[str, Any]) -> list[Row]:
    d = result["ack_to_arrival"]
    a = result["post_to_ack"]
    t = result["post_to_arrival"]
    ok = result["missing"] == 0 and result["post_failures"] == 0
    out = [
        Row(
            "dispatch",
            "ack → job start p50 (idle pool)",
            f"{d['p50_ms']:.2f} ms",
            f"≤ {P50_TARGET_MS:g} ms",
            verdict(d["p50_ms"] <= P50_TARGET_MS and ok),
        ),
        Row(
            "dispatch",
            "ack → job start p99 (idle pool)",
            f"{d['p99_ms']:.2f} ms",
            f"≤ {P99_TARGET_MS:g} ms",
            verdict(d["p99_ms"] <= P99_TARGET_MS and ok),
        ),
        Row("dispatch", "post → ack p50 / p99", f"{a['p50_ms']:.2f} / {a['p99_ms']:.2f} ms"),
        Row("dispatch", "post → job start p50 / p99", f"{t['p50_ms']:.2f} / {t['p99_ms']:.2f} ms"),
    ]
    if not ok:
        out.append(
            Row(
                "dispatch",
                "webhooks lost or refused",
                f"{result['missing']} / {result['post_failures']}",
                "0",
                "MISS",
            )
        )
    return out


def notes(result: dict[str, Any]) -> list[str]:
    note = busy_note(result.get("other_cpu_pct"))
    return [f"dispatch: {note}"] if note else []


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "dispatch",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help="200 webhooks instead of 1,000",
        size_help="webhooks to post one at a time",
    )


if __name__ == "__main__":
    sys.exit(main())
