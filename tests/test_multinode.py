"""Real ``webhookd serve`` processes on one PostgreSQL journal: one node, then two sharing it.

Each test gets a fresh database on the throwaway server (``pg_url``), hands its URL to the
daemons through ``journal.url = "env:WEBHOOKD_JOURNAL_URL"``, and reads the result back with
the CLI on the same config file.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from cluster import JSON, Load, pg_config, post, serve_nodes, stop, unique_body
from conftest import DatabaseOutage, own_pg_server
from procs import Procs, Target, get_json, poll

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.timeout(90),
    pytest.mark.usefixtures("journal_env"),
]


async def show(procs: Procs, config: Path, event_id: str) -> dict[str, Any]:
    out = await procs.cli("show", event_id, "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


async def test_serve_with_a_postgresql_journal_delivers_and_the_cli_shows_it_done(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
    pg_url: str,
) -> None:
    """With ``[journal] url`` a webhook is acknowledged, forwarded once, and ``show`` (same
    config, another process) reports its job done in the database."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url)
    daemon = await procs.serve(cfg)
    assert pg_url not in daemon.log  # the URL is a secret: its log lines mask it
    status, doc = await post(http, daemon.url, unique_body(order=1))
    assert (status, doc["duplicate"]) == (202, False)
    await downstream.wait_for(lambda: doc["id"] in downstream.ids)
    await stop(daemon)
    shown = await show(procs, cfg, doc["id"])
    assert [(j["state"], j["attempts"]) for j in shown["jobs"]] == [("done", 1)]
    assert downstream.ids == [doc["id"]]
    assert not (tmp_path / "webhookd.db").exists()


async def test_two_nodes_share_intake_and_work_and_dedup_across_them(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """Two ``serve`` processes on one database: the same delivery sent to both is one event,
    forwarded once; webhooks spread over both are each delivered exactly once."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url)
    await two_nodes_deliver_each_webhook_once(procs, cfg, downstream, http)


async def test_two_nodes_behind_pgbouncer_in_transaction_mode_deliver_each_webhook_once(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
    pgbouncer_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same two nodes and the CLI through a real PgBouncer in transaction mode: 1.18, so
    a prepared statement lives only as long as its transaction (``statement_cache_size = 0``),
    and migrations, claims, leases and the leader's work each fit in one transaction."""
    monkeypatch.setenv("WEBHOOKD_JOURNAL_URL", pgbouncer_url)
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url, journal="statement_cache_size = 0")
    await two_nodes_deliver_each_webhook_once(procs, cfg, downstream, http)


async def two_nodes_deliver_each_webhook_once(
    procs: Procs, cfg: Path, downstream: Target, http: aiohttp.ClientSession
) -> None:
    a, b = await serve_nodes(procs, cfg)
    same = json.dumps({"delivery": uuid.uuid4().hex})
    (status_a, doc_a), (status_b, doc_b) = await asyncio.gather(
        post(http, a.url, same), post(http, b.url, same)
    )
    assert sorted([status_a, status_b]) == [200, 202]
    assert doc_a["id"] == doc_b["id"] and doc_a["duplicate"] != doc_b["duplicate"]
    bodies = [unique_body(n=i) for i in range(40)]
    answers = await asyncio.gather(
        *(post(http, (a, b)[i % 2].url, body) for i, body in enumerate(bodies))
    )
    assert {status for status, _ in answers} == {202}
    expected = {doc_a["id"], *(doc["id"] for _, doc in answers)}
    await downstream.wait_for(lambda: expected <= set(downstream.ids))
    await stop(a, b)
    assert sorted(downstream.ids) == sorted(expected)  # each once, none twice
    out = await procs.cli("events", "--state", "done", "--limit", "100", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert all(event_id in out.stdout for event_id in expected)


async def test_a_killed_nodes_running_jobs_are_finished_by_another_after_lease_s(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """``kill -9`` of a node in the middle of its jobs: once its lease has passed, a live node
    re-queues them and delivers each; the interruption is recorded and counted."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url, lease_s=2)
    doomed = await procs.serve(cfg)
    downstream.delay_s = 60  # the doomed node's deliveries hang until it is killed
    ids = []
    for i in range(3):
        status, doc = await post(http, doomed.url, unique_body(i=i))
        assert status == 202
        ids.append(doc["id"])
    await downstream.wait_for(lambda: set(ids) <= set(downstream.ids))
    survivor = await procs.serve(cfg)
    await doomed.kill9()
    downstream.delay_s = 0
    downstream.release.set()
    await downstream.wait_for(lambda: all(downstream.ids.count(i) == 2 for i in ids))
    await survivor.wait_said(r"re-queued 3 job\(s\) of silent node")
    await stop(survivor)
    for event_id in ids:
        job = (await show(procs, cfg, event_id))["jobs"][0]
        assert (job["state"], job["attempts"]) == ("done", 2)
        assert [e["outcome"] for e in job["errors"]] == ["interrupted", "done"]


async def test_a_frozen_nodes_taken_over_job_is_told_as_its_silence_not_as_a_crash(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """A node frozen (SIGSTOP) past its lease mid-delivery: the leader's line names it (host,
    pid, node id), the job's interrupted attempt says its node went silent (it neither crashed
    nor restarted), and once it thaws its late outcome is said to be not recorded, with no
    plain ``outcome=done`` line that reads as the job's."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url, lease_s=2)
    frozen = await procs.serve(cfg)
    downstream.delay_s = 60  # its delivery hangs until released
    status, doc = await post(http, frozen.url, unique_body(frozen=1))
    assert status == 202
    await downstream.wait_for(lambda: doc["id"] in downstream.ids)
    frozen.signal(signal.SIGSTOP)
    survivor = await procs.serve(cfg)
    said = await survivor.wait_said(r"re-queued 1 job\(s\) of silent node", timeout_s=30)
    assert f" pid {frozen.pid} (node_" in said, said
    downstream.delay_s = 0
    downstream.release.set()  # both deliveries answered 200; the frozen node reads its answer later
    await survivor.wait_said(rf"event={doc['id']} .*attempt=2 outcome=done")
    frozen.signal(signal.SIGCONT)
    await frozen.wait_said(r"outcome=done not recorded: its lease passed to another node")
    await stop(frozen, survivor)
    assert not [line for line in frozen.lines if re.search(r"outcome=done(?! not recorded)", line)]
    job = (await show(procs, cfg, doc["id"]))["jobs"][0]
    assert (job["state"], job["attempts"]) == ("done", 2)
    first = job["errors"][0]
    assert first["outcome"] == "interrupted"
    assert f" pid {frozen.pid} (node_" in first["error"] and "went silent" in first["error"]
    assert "crash" not in first["error"]


async def test_a_job_committed_on_a_busy_node_starts_on_an_idle_one_without_waiting_for_a_sweep(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """With the receiving node's only worker busy, another node (whose fallback sweep is a
    minute away) starts the new job at once: woken by LISTEN/NOTIFY."""
    busy_cfg = pg_config(tmp_path / "busy.toml", downstream.url, workers="concurrency = 1")
    idle_cfg = pg_config(tmp_path / "idle.toml", downstream.url, workers="sweep_interval_s = 60")
    busy, idle = await asyncio.gather(procs.serve(busy_cfg), procs.serve(idle_cfg))
    await idle.wait_said("listening on")
    downstream.delay_s = 60
    status, first = await post(http, busy.url, unique_body(first=1))
    assert status == 202
    await downstream.wait_for(lambda: first["id"] in downstream.ids)
    status, second = await post(http, busy.url, unique_body(second=1))
    assert status == 202
    await downstream.wait_for(lambda: second["id"] in downstream.ids, timeout_s=10)
    downstream.release.set()
    await stop(busy, idle)


async def test_a_replay_from_the_cli_starts_on_a_node_without_waiting_for_its_sweep(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """``webhookd replay`` on a node whose fallback sweep is a minute away: the replayed job
    runs again at once (the replay's own NOTIFY wakes the node), not at the next sweep."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url, workers="sweep_interval_s = 60")
    daemon = await procs.serve(cfg)
    await daemon.wait_said("listening on")
    status, doc = await post(http, daemon.url, unique_body(replayed=1))
    assert status == 202
    await downstream.wait_for(lambda: downstream.ids == [doc["id"]])
    await poll(lambda: _state_is(procs, cfg, doc["id"], "done"), timeout_s=10)
    out = await procs.cli("replay", "--done", doc["id"], "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "1 job(s) re-queued" in out.stdout
    await downstream.wait_for(lambda: downstream.ids == [doc["id"]] * 2, timeout_s=10)
    await stop(daemon)


async def _state_is(procs: Procs, config: Path, event_id: str, state: str) -> bool:
    return [j["state"] for j in (await show(procs, config, event_id))["jobs"]] == [state]


async def test_max_backlog_counts_the_jobs_queued_through_every_node(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
) -> None:
    """``server.max_backlog`` is a cluster figure: a node that took no webhook itself answers
    503 once the jobs queued through another node fill the backlog, within a few seconds."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url, lease_s=3, server="max_backlog = 5")
    busy, other = await serve_nodes(procs, cfg)
    downstream.delay_s = 60  # the jobs stay running: in the backlog until released
    for i in range(5):
        status, _ = await post(http, busy.url, unique_body(i=i))
        assert status == 202

    async def other_sees_five() -> bool:
        async with http.get(f"{other.admin_url}/metrics") as r:
            text = await r.text()
            return re.search(r"^webhookd_backlog_jobs 5(\.0)?$", text, re.M) is not None

    await poll(other_sees_five, timeout_s=20, interval_s=0.1)
    async with http.post(f"{other.url}/hooks/shop", data="{}", headers=JSON) as r:
        assert (r.status, (await r.json())["error"]) == (503, "backlog full")
    downstream.release.set()
    await stop(busy, other)


async def test_database_refusing_connections_gets_503_and_not_ready_then_recovers(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
    db_outage: DatabaseOutage,
) -> None:
    """While PostgreSQL refuses the node, webhooks get 503 + Retry-After (never a false 2xx) and
    /readyz says not ready; once it is back the node reconnects by itself and takes them."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url, lease_s=1.5)
    daemon = await procs.serve(cfg)
    status, _ = await post(http, daemon.url, unique_body(before=1))
    assert status == 202
    await db_outage.begin()
    async with http.post(
        f"{daemon.url}/hooks/shop", data=json.dumps({"during": 1}), headers=JSON
    ) as r:
        assert (r.status, "Retry-After" in r.headers) == (503, True)
        assert "error" in await r.json()

    async def not_ready() -> bool:
        status, _ = await get_json(http, f"{daemon.admin_url}/readyz")
        return status == 503

    await poll(not_ready, timeout_s=10)
    await db_outage.end()

    accepted: list[str] = []

    async def takes_webhooks() -> bool:
        status, doc = await post(http, daemon.url, unique_body(after=1))
        if status == 202:
            accepted.append(doc["id"])
        return status == 202

    await poll(takes_webhooks, timeout_s=15, interval_s=0.2)
    await downstream.wait_for(lambda: accepted[0] in downstream.ids)

    async def ready() -> bool:
        status, _ = await get_json(http, f"{daemon.admin_url}/readyz")
        return status == 200

    await poll(ready, timeout_s=10)
    await stop(daemon)


@pytest.fixture
def own_server(journal_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A PostgreSQL server of this test's own (``own_pg_server``), its journal URL as
    ``WEBHOOKD_JOURNAL_URL``; yields its folder. Restarting the shared server cut every other
    test's connections on the other workers ("terminating connection due to administrator
    command", then "connection refused" while it came back)."""
    with own_pg_server() as (url, home):
        monkeypatch.setenv("WEBHOOKD_JOURNAL_URL", url)
        yield home


def restart_server(home: Path) -> None:
    """``pg_ctl restart -m fast`` of the server in ``home`` (``own_server``)."""
    pg_ctl = (home / "bin").read_text().strip() + "/pg_ctl"
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # The server's output goes to its log file: a pipe would be held open by the new server.
    subprocess.run(
        [
            *as_owner,
            pg_ctl,
            "-D",
            f"{home}/data",
            "-l",
            f"{home}/server.log",
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "restart",
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=90,
    )


async def test_postgresql_restarted_under_load_loses_no_acknowledged_webhook(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
    own_server: Path,
) -> None:
    """Two nodes take a steady stream while PostgreSQL restarts: requests during the restart
    get 503 (never a false 2xx), the nodes reconnect by themselves, and every webhook that was
    acknowledged is delivered."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url)
    nodes = await serve_nodes(procs, cfg)
    async with Load(http, nodes, senders=4) as load:
        await downstream.wait_for(lambda: len(downstream.ids) >= 20)
        before = len(load.acked)
        await asyncio.to_thread(restart_server, own_server)
        after_restart = len(load.statuses)
        await poll(partial(load.acked_at_least, before + 20), timeout_s=30, interval_s=0.1)
    acked, statuses = load.acked, load.statuses
    assert set(statuses) <= {202, 503}, set(statuses)
    assert len(statuses) > after_restart
    await downstream.wait_for(lambda: set(acked) <= set(downstream.ids), timeout_s=30)
    await stop(*nodes)


@pytest.mark.timeout(180)
async def test_chaos_repeated_kill9s_across_three_nodes_lose_no_acknowledged_webhook(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
    pg_url: str,
) -> None:
    """Three nodes under a steady stream; a random one is ``kill -9``-ed and restarted with the
    same config five times: every acknowledged webhook is one event whose job ends done, and
    is delivered at least once."""
    cfg = pg_config(tmp_path / "webhookd.toml", downstream.url, lease_s=2)
    downstream.delay_s = 0.2  # deliveries in flight when a node dies
    nodes = await serve_nodes(procs, cfg, 3)
    chance = random.Random(14)
    kills = []
    async with Load(http, nodes, senders=6) as load:
        for _ in range(5):
            await poll(partial(load.acked_at_least, len(load.acked) + 30), timeout_s=30)
            k = chance.randrange(3)
            kills.append(k)
            await nodes[k].kill9()
            nodes[k] = await procs.serve(cfg)
        await poll(partial(load.acked_at_least, len(load.acked) + 30), timeout_s=30)
    acked, statuses = load.acked, load.statuses
    assert set(statuses) <= {202, 503}, set(statuses)
    assert len(kills) == 5 and len(acked) >= 180
    # Jobs the killed nodes held come back after lease_s, under whichever node leads now.
    await downstream.wait_for(lambda: set(acked) <= set(downstream.ids), timeout_s=60)
    conn = await asyncpg.connect(pg_url)
    try:

        async def all_done() -> bool:
            rows = await conn.fetch(
                "SELECT j.event_id, j.state FROM jobs j WHERE j.event_id = ANY($1::text[])", acked
            )
            return len(rows) == len(acked) and {r["state"] for r in rows} == {"done"}

        await poll(all_done, timeout_s=60, interval_s=0.2)
        events = await conn.fetchval(
            "SELECT count(*) FROM events WHERE id = ANY($1::text[])", acked
        )
    finally:
        await conn.close()
    assert events == len(acked) == len(set(acked))  # each acknowledged webhook is one event
    await stop(*nodes)
