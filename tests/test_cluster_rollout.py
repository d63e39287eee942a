"""A config changed node by node: two real ``webhookd serve`` processes sharing one PostgreSQL
journal, one of which has a source the other lacks. The node without it leaves its jobs to the
node that has it; only a job no live node has goes dead."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import aiohttp
import pytest
from cluster import node_config, post_acked, stop
from ops_support import event_state
from procs import Procs, Target, get_json

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("journal_env"),
]

LEASE_S = 3
SHOP = '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'


def orders(target_url: str) -> str:
    """The source only the first node has: a forward to ``target_url``."""
    return f'[sources.orders]\n[[sources.orders.actions]]\ntype = "forward"\nurl = "{target_url}"\n'


async def test_a_job_of_a_source_only_one_node_has_is_left_to_it_and_done_there(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """Node a has ``orders``, b not yet (its reload is still to come). a runs one job at a
    time and its first hangs at the target, so b, idle, claims the others: it leaves them to
    a, saying so once and naming it, and a delivers every one once the target answers. None
    went dead, no attempt was counted for b's claims, and b claimed each once at most: the
    jobs were kept out of its claims while a had them. (It sent them to dead at once, naming
    itself as the node without the source.)"""
    a = await procs.serve(
        node_config(
            tmp_path / "a.toml",
            SHOP + orders(f"{downstream.url}/orders"),
            lease_s=LEASE_S,
            workers="concurrency = 1",
        )
    )
    b = await procs.serve(node_config(tmp_path / "b.toml", SHOP, lease_s=LEASE_S))
    downstream.delay_s = 60  # the first delivery holds a's only worker until released
    events = [await post_acked(http, a.url, "orders", {"n": n}) for n in range(4)]
    said = await b.wait_said(r"source 'orders' is not configured on this node")
    assert re.search(rf"its jobs are left to \S+ pid {a.pid}, which", said), said

    downstream.release.set()
    for event_id in events:
        doc = await event_state(http, a.admin_url, event_id, "done")
        assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 1)], doc
    assert sorted(downstream.ids) == sorted(events)  # each delivered once, by a
    status, stats = await get_json(http, f"{b.admin_url}/stats")
    assert status == 200 and stats is not None
    workers = stats["workers"]
    assert isinstance(workers, dict)
    assert 1 <= workers["started"] <= len(events), workers  # b claimed each once at most
    assert "dead" not in workers["outcomes"], workers
    assert len([line for line in b.lines if "is not configured on this node" in line]) == 1
    await stop(a, b)


async def test_a_job_of_a_source_no_live_node_has_goes_dead_naming_the_node(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """The node that had ``orders`` stopped with a job of it queued (held by a pause) and did
    not come back: the other node, which never had it, leaves the job for the rest of the
    stopped node's lease, saying so, then sends it to dead, naming itself, as before there
    were nodes to leave it to."""
    a = await procs.serve(
        node_config(tmp_path / "a.toml", SHOP + orders(downstream.url), lease_s=LEASE_S)
    )
    b = await procs.serve(node_config(tmp_path / "b.toml", SHOP, lease_s=LEASE_S))
    pause = {"X-Webhookd": "1"}
    async with http.post(f"{a.admin_url}/sources/orders/pause", headers=pause) as r:
        assert r.status == 200, await r.text()
    event_id = await post_acked(http, a.url, "orders", {"n": 1})
    await stop(a)  # a clean stop: what it ran counts for its lease, then no more
    async with http.post(f"{b.admin_url}/sources/orders/resume", headers=pause) as r:
        assert r.status == 200, await r.text()
    doc = await event_state(http, b.admin_url, event_id, "dead")
    node = f"{socket.gethostname()} (pid {b.pid})"
    assert doc["jobs"][0]["last_error"] == f"source 'orders' is not configured on {node}"
    assert doc["jobs"][0]["attempts"] == 1, doc  # the waits before it counted none
    assert not downstream.arrivals
    said = [line for line in b.lines if "is not configured on this node" in line]
    assert len(said) == 1 and f"pid {a.pid}, which ran it and stopped" in said[0], said
    await stop(b)


async def test_a_restart_of_the_only_node_with_a_source_leaves_its_jobs_waiting_for_it(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """A rolling restart of the one node that has ``orders``: while it is down, the other
    node leaves the source's queued job waiting (its lease has not passed since it stopped),
    and the restarted node delivers it once; nothing goes dead. (The other node sent it to
    dead at once, as if the source had been removed.)"""
    a_toml = node_config(tmp_path / "a.toml", SHOP + orders(downstream.url), lease_s=30)
    a = await procs.serve(a_toml)
    b = await procs.serve(node_config(tmp_path / "b.toml", SHOP, lease_s=LEASE_S))
    pause = {"X-Webhookd": "1"}
    async with http.post(f"{a.admin_url}/sources/orders/pause", headers=pause) as r:
        assert r.status == 200, await r.text()
    event_id = await post_acked(http, a.url, "orders", {"n": 1})
    await stop(a)  # the restart begins: b alone runs
    async with http.post(f"{b.admin_url}/sources/orders/resume", headers=pause) as r:
        assert r.status == 200, await r.text()
    said = await b.wait_said(r"source 'orders' is not configured on this node")
    assert f"its jobs wait for {socket.gethostname()} pid {a.pid}, which ran it and stopped" in said
    a2 = await procs.serve(a_toml)  # the restart ends
    doc = await event_state(http, a2.admin_url, event_id, "done")
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 1)], doc
    assert downstream.ids == [event_id]
    status, stats = await get_json(http, f"{b.admin_url}/stats")
    assert status == 200 and stats is not None
    workers = stats["workers"]
    assert isinstance(workers, dict)
    assert "dead" not in workers["outcomes"], workers
    await stop(a2, b)
