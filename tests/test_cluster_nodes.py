"""What each node of a cluster shows about the others: ``/stats``, ``/metrics`` and
``webhookd stats`` on two real ``webhookd serve`` processes sharing one PostgreSQL journal."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster import node_config, pg_config, post, serve_nodes, stop, unique_body
from procs import DaemonProc, Procs, Target, get_json, poll

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("journal_env"),
]

LEASE_S = 3


async def cluster(http: aiohttp.ClientSession, node: DaemonProc) -> dict[str, Any]:
    status, doc = await get_json(http, f"{node.admin_url}/stats")
    assert status == 200 and doc is not None, doc
    view: dict[str, Any] = doc["cluster"]  # type: ignore[assignment]
    return view


async def metric(http: aiohttp.ClientSession, node: DaemonProc, name: str) -> dict[str, float]:
    """Each series of ``name`` on the node's ``/metrics``, by its label text."""
    async with http.get(f"{node.admin_url}/metrics") as r:
        text = await r.text()
    pattern = re.compile(rf"^{name}(\{{[^}}]*\}})? (\S+)$", re.M)
    return {m.group(1) or "": float(m.group(2)) for m in pattern.finditer(text)}


async def test_each_node_lists_both_nodes_and_a_killed_one_goes_stale_after_lease_s(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """Both nodes' ``/stats`` and ``/metrics`` list both (pid, host, running jobs) and the
    backlog the database counts, whichever node took the webhooks; ``kill -9`` of one shows it
    stale on the other once lease_s has passed, and its held job goes back to the survivor."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url, lease_s=LEASE_S)
    a, b = await serve_nodes(procs, cfg)
    downstream.delay_s = 60  # deliveries hang: each node holds the jobs it claimed
    for i in range(4):
        status, _ = await post(http, (a, b)[i % 2].url, unique_body(n=i))
        assert status == 202
    await downstream.wait_for(lambda: len(downstream.arrivals) == 4)

    pids = {a.pid, b.pid}
    for node in (a, b):
        view = await cluster(http, node)
        assert {n["pid"] for n in view["nodes"]} == pids
        assert [n["pid"] for n in view["nodes"] if n["this"]] == [node.pid]
        assert all(n["host"] and not n["stale"] for n in view["nodes"])
        assert sum(n["running"] for n in view["nodes"]) == 4
        assert (view["backlog"], view["running"]) == (4, 4)
        assert (await metric(http, node, "webhookd_nodes"))[""] == 2
        running = await metric(http, node, "webhookd_node_running_jobs")
        assert sorted(running) == sorted(f'{{node="{n["node_id"]}"}}' for n in view["nodes"])
        assert sum(running.values()) == 4
        assert (await metric(http, node, "webhookd_cluster_backlog_jobs"))[""] == 4

    out = await procs.cli("stats", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert len(re.findall(r"^node \S+ .*running \d", out.stdout, re.M)) == 2, out.stdout

    b_id = next(n["node_id"] for n in (await cluster(http, a))["nodes"] if n["pid"] == b.pid)
    await b.kill9()

    async def b_stale() -> bool:
        nodes = {n["node_id"]: n for n in (await cluster(http, a))["nodes"]}
        return b_id not in nodes or nodes[b_id]["stale"]

    await poll(b_stale, timeout_s=6 * LEASE_S, interval_s=0.2)
    assert (await metric(http, a, "webhookd_nodes"))[""] == 1
    downstream.release.set()  # the survivor may finish everything now, b's jobs included

    async def drained() -> bool:
        view = await cluster(http, a)
        return view["backlog"] == 0

    await poll(drained, timeout_s=6 * LEASE_S, interval_s=0.2)
    await stop(a)


async def test_a_node_whose_dedup_rule_differs_is_marked_and_logged_by_the_other(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """Two nodes whose files differ only in a source's ``dedup``: each node's ``/stats`` marks
    the other ``same_config`` false and its log names it. Both said the same config, while one
    delivery posted to both became two events, each with its jobs."""
    source = '[sources.shop]\ndedup = "{}"\n[[sources.shop.actions]]\ntype = "log"\n'
    a = await procs.serve(
        node_config(tmp_path / "a.toml", source.format("header:X-Delivery"), lease_s=LEASE_S)
    )
    b = await procs.serve(
        node_config(tmp_path / "b.toml", source.format("json:id"), lease_s=LEASE_S)
    )
    for node, other in ((a, b), (b, a)):
        view = await cluster(http, node)
        assert {n["pid"]: n["same_config"] for n in view["nodes"]} == {
            node.pid: True,
            other.pid: False,
        }
        said = await node.wait_said(r"node\(s\) .* other than this node's config")
        assert f"pid {other.pid} " in said

    # The CLI asks a's admin API: b's line says so (it printed the same line for both), and
    # --json keeps the field.
    cli_cfg = tmp_path / "cli.toml"
    cli_cfg.write_text(
        (tmp_path / "a.toml")
        .read_text(encoding="utf-8")
        .replace('[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "{a.admin}"'),
        encoding="utf-8",
    )
    out = await procs.cli("stats", "--config", str(cli_cfg))
    assert out.returncode == 0, out.stderr
    lines = {
        int(m["pid"]): m["rest"]
        for m in re.finditer(r"^node \S+ +\S+:(?P<pid>\d+) (?P<rest>.*)$", out.stdout, re.M)
    }
    assert lines[a.pid].endswith("  this") and lines[b.pid].endswith("  live  config differs")
    out = await procs.cli("stats", "--json", "--config", str(cli_cfg))
    doc = json.loads(out.stdout)
    assert {n["pid"]: n["same_config"] for n in doc["nodes"]} == {a.pid: True, b.pid: False}
    await stop(a, b)
