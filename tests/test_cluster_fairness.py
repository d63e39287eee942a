"""Priorities and tenants across two real ``webhookd serve`` nodes on one PostgreSQL journal.

Each node claims through its own scheduler; these tests check what the sink sees when both do
at once: a tenant's flood does not hold back another tenant's few jobs on either node, and the
8:4:1 classes still shape the merged start order.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from cluster import node_config, serve_nodes, stop
from procs import DaemonProc, Procs, Target

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.timeout(240),
    pytest.mark.usefixtures("journal_env"),
]

FLOOD = 10_000


def cluster_config(path: Path, sink_url: str, *, concurrency: int) -> Path:
    """A node: tenant from X-Tenant, class from X-Class, one forward action to the downstream."""
    body = f"""\
[sources.shop]
tenant = "header:X-Tenant"
priority = {{ default = "normal", by = "header:X-Class", high = ["high"], low = ["low"] }}
[[sources.shop.actions]]
type = "forward"
url = "{sink_url}/in"
"""
    return node_config(path, body, lease_s=10, workers=f"concurrency = {concurrency}")


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
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """Tenant A has 10,000 jobs queued and B posts 10 after them: with two nodes claiming,
    B's jobs start within A's first few dozen; and 10 more B posts made while A's flood runs
    start within the next few dozen of A's, on whichever node took them."""
    cfg = cluster_config(tmp_path / "webhookd.toml", downstream.url, concurrency=4)
    nodes = await serve_nodes(procs, cfg)
    # Paused before anything is posted: neither node claims a job until the resume.
    await cli_ok(procs, "pause", "shop", "--config", str(cfg))
    await post_many(
        http, nodes, [(json.dumps({"t": "A", "n": n}), {"X-Tenant": "A"}) for n in range(FLOOD)]
    )
    await post_many(
        http, nodes, [(json.dumps({"t": "B", "n": n}), {"X-Tenant": "B"}) for n in range(10)]
    )
    await cli_ok(procs, "resume", "shop", "--config", str(cfg))

    def started() -> list[str]:
        return [tenant_of(d.body) for d in downstream.arrivals]

    await downstream.wait_for(lambda: started().count("B") >= 10, timeout_s=60)
    order = started()
    a_before_last_b = order[: max(i for i, t in enumerate(order) if t == "B")].count("A")
    assert a_before_last_b <= 36, order[:80]

    # While A's flood runs, B posts 10 more, all through one node: both nodes take them in
    # (the other hears of them by NOTIFY) and start them among the next few dozen of A's.
    await downstream.wait_for(lambda: len(downstream.arrivals) >= 200, timeout_s=60)
    mark = len(downstream.arrivals)
    assert started()[mark - 100 :].count("B") == 0  # A's flood is what runs now
    await post_many(
        http,
        [nodes[0]],
        [(json.dumps({"t": "B", "n": 10 + n}), {"X-Tenant": "B"}) for n in range(10)],
    )
    posted = len(downstream.arrivals)
    await downstream.wait_for(lambda: started().count("B") >= 20, timeout_s=60)
    order = started()
    last_b = max(i for i, t in enumerate(order) if t == "B")
    a_meanwhile = order[posted:last_b].count("A")
    assert a_meanwhile <= 48, (posted - mark, "".join(order[mark : last_b + 1]))
    assert FLOOD - order.count("A") > 5000  # measured at the head of the flood, not its tail
    await stop(*nodes)


async def test_priority_classes_keep_8_4_1_across_two_nodes(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """With high, normal and low jobs all queued, two nodes together start them about 8:4:1
    (low priority is slowed, never starved) in the merged order the sink sees."""
    cfg = cluster_config(tmp_path / "webhookd.toml", downstream.url, concurrency=2)
    nodes = await serve_nodes(procs, cfg)
    # Paused before anything is posted: neither node claims a job until the resume.
    await cli_ok(procs, "pause", "shop", "--config", str(cfg))
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
    await downstream.wait_for(lambda: len(downstream.arrivals) >= 260, timeout_s=60)
    first = Counter(tenant_of(d.body) for d in downstream.arrivals[:260])
    # 260 starts at 8:4:1 are 160 high, 80 normal, 20 low; allow for two nodes' interleaving.
    assert 140 <= first["high"] <= 180, (first, time.monotonic() - began)
    assert 60 <= first["normal"] <= 100, first
    assert 8 <= first["low"] <= 35, first
    await stop(*nodes)
