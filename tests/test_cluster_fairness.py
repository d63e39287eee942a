"""Priorities and tenants across two real ``webhookd serve`` nodes on one PostgreSQL journal.

Each node claims through its own scheduler; these tests check what the sink sees when both do
at once: a tenant's flood does not hold back another tenant's few jobs on either node, and the
8:4:1 classes still shape the merged start order.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from procs import DaemonProc, Procs, Target

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(240)]

FLOOD = 10_000


@pytest.fixture
async def sink() -> AsyncIterator[Target]:
    t = Target()
    await t.start()
    try:
        yield t
    finally:
        await t.aclose()


def cluster_config(path: Path, sink_url: str, *, concurrency: int) -> Path:
    """A node: tenant from X-Tenant, class from X-Class, one forward action to the sink."""
    path.write_text(
        f"""\
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[journal]
url = "env:WEBHOOKD_JOURNAL_URL"
lease_s = 10

[workers]
concurrency = {concurrency}

[log]
level = "info"

[sources.shop]
tenant = "header:X-Tenant"
priority = {{ default = "normal", by = "header:X-Class", high = ["high"], low = ["low"] }}
[[sources.shop.actions]]
type = "forward"
url = "{sink_url}/in"
""",
        encoding="utf-8",
    )
    return path


async def post_many(
    http: aiohttp.ClientSession, nodes: list[DaemonProc], bodies: list[tuple[str, dict[str, str]]]
) -> None:
    """Post every (body, headers) through the nodes in turn, 64 at a time; each must be taken."""
    gate = asyncio.Semaphore(64)

    async def one(i: int, body: str, headers: dict[str, str]) -> None:
        async with (
            gate,
            http.post(
                f"{nodes[i % len(nodes)].url}/hooks/shop",
                data=body,
                headers={"Content-Type": "application/json", **headers},
            ) as r,
        ):
            assert r.status == 202, await r.text()

    await asyncio.gather(*(one(i, body, headers) for i, (body, headers) in enumerate(bodies)))


async def cli_ok(procs: Procs, *args: str) -> None:
    out = await procs.cli(*args)
    assert out.returncode == 0, out.stderr


def tenant_of(body: bytes) -> str:
    tenant: str = json.loads(body)["t"]
    return tenant


async def test_a_tenants_ten_jobs_start_among_the_first_of_another_tenants_10000_on_two_nodes(
    tmp_path: Path,
    procs: Procs,
    sink: Target,
    http: aiohttp.ClientSession,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tenant A has 10,000 jobs queued and B posts 10 after them: with two nodes claiming,
    B's jobs start within A's first few dozen; and 10 more B posts made while A's flood runs
    start within the next few dozen of A's, on whichever node took them."""
    monkeypatch.setenv("WEBHOOKD_JOURNAL_URL", pg_url)
    cfg = cluster_config(tmp_path / "webhookd.toml", sink.url, concurrency=4)
    # Paused before the nodes start: neither claims a job until the resume.
    await cli_ok(procs, "pause", "shop", "--config", str(cfg))
    nodes = list(await asyncio.gather(procs.serve(cfg), procs.serve(cfg)))
    await post_many(
        http, nodes, [(json.dumps({"t": "A", "n": n}), {"X-Tenant": "A"}) for n in range(FLOOD)]
    )
    await post_many(
        http, nodes, [(json.dumps({"t": "B", "n": n}), {"X-Tenant": "B"}) for n in range(10)]
    )
    await cli_ok(procs, "resume", "shop", "--config", str(cfg))

    def started() -> list[str]:
        return [tenant_of(d.body) for d in sink.arrivals]

    await sink.wait_for(lambda: started().count("B") >= 10, timeout_s=60)
    order = started()
    a_before_last_b = order[: max(i for i, t in enumerate(order) if t == "B")].count("A")
    assert a_before_last_b <= 36, order[:80]

    # While A's flood runs, B posts 10 more, all through one node: both nodes take them in
    # (the other hears of them by NOTIFY) and start them among the next few dozen of A's.
    await sink.wait_for(lambda: len(sink.arrivals) >= 200, timeout_s=60)
    mark = len(sink.arrivals)
    assert started()[mark - 100 :].count("B") == 0  # A's flood is what runs now
    await post_many(
        http,
        [nodes[0]],
        [(json.dumps({"t": "B", "n": 10 + n}), {"X-Tenant": "B"}) for n in range(10)],
    )
    posted = len(sink.arrivals)
    await sink.wait_for(lambda: started().count("B") >= 20, timeout_s=60)
    order = started()
    last_b = max(i for i, t in enumerate(order) if t == "B")
    a_meanwhile = order[posted:last_b].count("A")
    assert a_meanwhile <= 48, (posted - mark, order[posted : last_b + 1])
    assert FLOOD - order.count("A") > 5000  # measured at the head of the flood, not its tail
    for node in nodes:
        node.signal(signal.SIGTERM)
    assert [await node.wait_exit() for node in nodes] == [0, 0]


async def test_priority_classes_keep_8_4_1_across_two_nodes(
    tmp_path: Path,
    procs: Procs,
    sink: Target,
    http: aiohttp.ClientSession,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With high, normal and low jobs all queued, two nodes together start them about 8:4:1
    (low priority is slowed, never starved) in the merged order the sink sees."""
    monkeypatch.setenv("WEBHOOKD_JOURNAL_URL", pg_url)
    cfg = cluster_config(tmp_path / "webhookd.toml", sink.url, concurrency=2)
    # Paused before the nodes start: neither claims a job until the resume.
    await cli_ok(procs, "pause", "shop", "--config", str(cfg))
    nodes = list(await asyncio.gather(procs.serve(cfg), procs.serve(cfg)))
    per_class = 300
    await post_many(
        http,
        nodes,
        [
            (json.dumps({"t": cls, "n": n}), {"X-Class": cls, "X-Tenant": "one"})
            for n in range(per_class)
            for cls in ("high", "normal", "low")
        ],
    )
    began = time.monotonic()
    await cli_ok(procs, "resume", "shop", "--config", str(cfg))
    await sink.wait_for(lambda: len(sink.arrivals) >= 260, timeout_s=60)
    first = Counter(tenant_of(d.body) for d in sink.arrivals[:260])
    # 260 starts at 8:4:1 are 160 high, 80 normal, 20 low; allow for two nodes' interleaving.
    assert 140 <= first["high"] <= 180, (first, time.monotonic() - began)
    assert 60 <= first["normal"] <= 100, first
    assert 8 <= first["low"] <= 35, first
    for node in nodes:
        node.signal(signal.SIGTERM)
    assert [await node.wait_exit() for node in nodes] == [0, 0]
