"""Real ``webhookd serve`` processes: kill -9, SIGTERM drains, dedup, retries, replay, config.

Each test runs the daemon as a subprocess of this venv's interpreter on loopback port 0, with a
real aiohttp server in the test process as the forward target. Waits are on events (the target's
arrivals, the daemon's log lines) or on polled state with a deadline; nothing sleeps blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from procs import (
    DaemonProc,
    Procs,
    Target,
    config_text,
    get_json,
    poll,
    port_is_free,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(60)]

JSON = {"Content-Type": "application/json"}


def forward_source(name: str, url: str, retry: str = "") -> str:
    return f"""
[sources.{name}]
[[sources.{name}.actions]]
type = "forward"
url = "{url}"
{f"retry = {retry}" if retry else ""}
"""


async def show(procs: Procs, config: Path, event_id: str) -> dict[str, Any]:
    out = await procs.cli("show", event_id, "--json", "--config", str(config))
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


async def wait_event_state(
    http: aiohttp.ClientSession, admin_url: str, event_id: str, state: str, timeout_s: float = 10
) -> dict[str, Any]:
    """Poll the admin API until the event reaches ``state``; returns its document."""
    doc: dict[str, Any] = {}

    async def reached() -> bool:
        nonlocal doc
        status, body = await get_json(http, f"{admin_url}/events/{event_id}")
        doc = body or {}
        return status == 200 and doc.get("state") == state

    await poll(reached, timeout_s=timeout_s)
    return doc


async def slow_jobs_running(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
    *,
    grace_s: float,
    delay_s: float,
    count: int = 1,
) -> tuple[Path, DaemonProc, list[str]]:
    """A daemon forwarding to ``downstream/slow`` (which takes ``delay_s`` to answer), with
    ``count`` webhooks accepted and their jobs all in flight at the downstream."""
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        forward_source("slow", f"{downstream.url}/slow"),
        workers=f"shutdown_grace_s = {grace_s}",
    )
    daemon = await procs.serve(cfg)
    downstream.delay_s = delay_s
    ids = []
    for i in range(count):
        async with http.post(f"{daemon.url}/hooks/slow", data=f'{{"i": {i}}}', headers=JSON) as r:
            assert r.status == 202
            ids.append((await r.json())["id"])
    await downstream.wait_for(lambda: len(downstream.arrivals) == count)
    return cfg, daemon, ids


@dataclass
class Sent:
    body: bytes
    status: int | None = None  # None: no answer (connection refused, reset, cut short)
    event_id: str | None = None
    error: str = ""

    @property
    def acked(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, 0)],
    ids=["kill9", "term"],
)
async def test_signal_mid_burst_loses_no_acknowledged_webhook(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
    sig: signal.Signals,
    status: int,
) -> None:
    """Every webhook answered 2xx before a kill -9 (or SIGTERM) is forwarded after a restart."""
    n = 400
    journal = tmp_path / "webhookd.db"
    cfg = write_config(
        tmp_path / "webhookd.toml", journal, forward_source("burst", f"{downstream.url}/burst")
    )
    daemon = await procs.serve(cfg)
    nonce = uuid.uuid4().hex
    sent = [Sent(json.dumps({"n": i, "nonce": nonce}).encode()) for i in range(n)]
    answered = 0
    killed_at = -1

    async def post(s: Sent) -> None:
        nonlocal answered, killed_at
        try:
            async with burst.post(f"{daemon.url}/hooks/burst", data=s.body, headers=JSON) as r:
                doc = await r.json(content_type=None)
                s.status, s.event_id = r.status, doc.get("id")
        except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
            s.status, s.error = None, type(exc).__name__
            return
        answered += 1
        if answered >= n // 2 and killed_at < 0:
            killed_at = answered
            daemon.signal(sig)

    # 64 connections at a time: the burst spans many commits, so the kill lands inside it.
    connector = aiohttp.TCPConnector(limit=64, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=15)
    ) as burst:
        await asyncio.gather(*(post(s) for s in sent))
    assert await daemon.wait_exit() == status
    acked = {s.event_id: s for s in sent if s.acked}
    assert acked and len(acked) < n, "the kill did not land mid-burst"

    daemon = await procs.serve(cfg)
    await downstream.wait_for(lambda: acked.keys() <= set(downstream.ids), timeout_s=20)

    async def nothing_left() -> bool:
        status, stats = await get_json(http, f"{daemon.admin_url}/stats")
        jobs: dict[str, int] = stats["jobs"] if stats else {}  # type: ignore[assignment]
        return status == 200 and jobs["queued"] + jobs["running"] == 0

    await poll(nothing_left, timeout_s=20, interval_s=0.05)
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0

    with contextlib.closing(sqlite3.connect(journal)) as db, db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        journaled = dict(db.execute("SELECT id, body FROM events").fetchall())
        job_states = dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    db.close()

    by_body = {s.body: s for s in sent}
    delivered = set(downstream.ids)
    committed_unacked = 0
    for event_id, body in journaled.items():
        s = by_body.get(bytes(body))
        assert s is not None, f"journal holds {event_id}, which nobody sent"
        if not s.acked:
            committed_unacked += 1  # committed, but the answer was lost with the process
    for event_id, s in acked.items():
        assert event_id in journaled and bytes(journaled[event_id]) == s.body
    assert len({bytes(b) for b in journaled.values()}) == len(journaled), "one body, two events"
    assert acked.keys() <= delivered
    assert delivered == journaled.keys(), "delivered something not journaled, or missed one"
    assert job_states == {"done": len(journaled)}
    for d in downstream.arrivals:
        assert d.body == bytes(journaled[d.event_id])
    duplicates = len(downstream.arrivals) - len(delivered)
    print(
        f"\n{sig.name} after {killed_at} answers: sent={n} acked={len(acked)} "
        f"failed={n - len(acked)} committed_unacked={committed_unacked} "
        f"delivered={len(delivered)} duplicates={duplicates}"
    )


async def test_sigterm_lets_running_jobs_finish_then_exits_0(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """On SIGTERM the daemon stops taking webhooks, finishes slow jobs and exits 0."""
    grace_s = 10.0
    cfg, daemon, ids = await slow_jobs_running(
        tmp_path, procs, downstream, http, grace_s=grace_s, delay_s=2.0, count=3
    )

    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    await daemon.wait_said(r"draining \(SIGTERM\): no longer accepting webhooks")
    status, ready = await get_json(http, f"{daemon.admin_url}/readyz")
    assert status in (0, 503), ready
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        try:
            async with fresh.post(f"{daemon.url}/hooks/slow", data="{}", headers=JSON) as r:
                late: int | str = r.status
        except aiohttp.ClientConnectionError as exc:
            late = type(exc).__name__
    print(f"\nwhile draining: readyz={status} late POST={late}")
    assert late == 503 or isinstance(late, str), f"accepted a webhook while draining: {late}"
    assert len(downstream.answered) < 3, "the jobs ended before the drain was observed"

    assert await daemon.wait_exit(timeout_s=grace_s + 5) == 0
    assert time.monotonic() - signalled < grace_s
    assert sorted(d.event_id for d in downstream.answered) == sorted(ids)
    for event_id in ids:
        doc = await show(procs, cfg, event_id)
        assert doc["state"] == "done"
        assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 1)]


async def test_sigterm_requeues_a_job_longer_than_the_grace_without_using_an_attempt(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """A job cut off by the drain grace is queued again, attempt uncounted, and runs next start.
    The attempt cut off is in its history, saying so (the target had the request)."""
    cfg, daemon, [event_id] = await slow_jobs_running(
        tmp_path, procs, downstream, http, grace_s=0.5, delay_s=5.0
    )

    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(timeout_s=10) == 0
    assert time.monotonic() - signalled < 4.0, "waited for the job instead of the grace"
    assert downstream.answered == []
    doc = await show(procs, cfg, event_id)
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("queued", 0)]
    [cut] = doc["jobs"][0]["errors"]
    assert (cut["attempt"], cut["outcome"], cut["detail"]) == (1, "interrupted", {"counted": False})
    assert cut["error"].startswith("cut off by the drain after workers.shutdown_grace_s (0.5 s)")

    downstream.delay_s = 0.0
    daemon = await procs.serve(cfg)
    await downstream.wait_for(lambda: len(downstream.answered) == 1)
    await wait_event_state(http, daemon.admin_url, event_id, "done")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    doc = await show(procs, cfg, event_id)
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 1)]
    assert [(a["attempt"], a["outcome"]) for a in doc["jobs"][0]["errors"]] == [
        (1, "interrupted"),
        (1, "done"),
    ]
    assert downstream.ids == [event_id, event_id]
    text = await procs.cli("show", event_id, "--config", str(cfg))
    assert "interrupted (not counted): cut off by the drain" in text.stdout, text.stdout
    assert "replayed:" not in text.stdout, text.stdout


async def sigterm_while_a_claim_waits(
    http: aiohttp.ClientSession, daemon: DaemonProc, lock: sqlite3.Connection
) -> None:
    """Once ``/stats`` shows a job being claimed (it reads through the WAL, past ``lock``'s
    write lock), SIGTERM the daemon; let the journal go once the daemon says it is draining."""

    async def claim_waiting() -> bool:
        _, stats = await get_json(http, f"{daemon.admin_url}/stats")
        return bool(stats) and stats["workers"]["claiming"] >= 1  # type: ignore[index]

    await poll(claim_waiting, timeout_s=10)
    daemon.signal(signal.SIGTERM)
    await daemon.wait_said("draining")
    lock.execute("ROLLBACK")


async def test_sigterm_while_a_claim_waits_on_the_journal_starts_no_job_after_the_drain(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """A job claimed as SIGTERM lands is run within the drain or left queued, never cut off."""
    journal = tmp_path / "webhookd.db"
    cfg = write_config(
        tmp_path / "webhookd.toml",
        journal,
        forward_source(
            "flaky",
            f"{downstream.url}/flaky",
            "{ max_attempts = 3, base_s = 2, factor = 1, cap_s = 2 }",
        ),
        workers="shutdown_grace_s = 10",
    )
    daemon = await procs.serve(cfg)
    downstream.status = 500
    async with http.post(f"{daemon.url}/hooks/flaky", data='{"x": 1}', headers=JSON) as r:
        event_id = (await r.json())["id"]

    async def first_attempt_recorded() -> bool:
        _, doc = await get_json(http, f"{daemon.admin_url}/events/{event_id}")
        jobs: list[dict[str, Any]] = doc["jobs"] if doc else []  # type: ignore[assignment]
        return bool(jobs) and jobs[0]["state"] == "queued" and len(jobs[0]["errors"]) == 1

    await poll(first_attempt_recorded, timeout_s=10)
    downstream.status, downstream.delay_s = 200, 1.0
    # Hold the journal's write lock (as a slow disk would) across the retry's due time, so the
    # daemon's claim of it is waiting on the journal when SIGTERM arrives.
    lock = sqlite3.connect(journal, isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN IMMEDIATE")
        [(run_at,)] = lock.execute("SELECT run_at FROM jobs").fetchall()
        assert run_at - time.time() > 0.5, "the retry fell due before the lock was taken"
        await sigterm_while_a_claim_waits(http, daemon, lock)
    finally:
        lock.close()
    assert await daemon.wait_exit() == 0

    doc = await show(procs, cfg, event_id)
    [job] = doc["jobs"]
    history = [(a["outcome"], a["error"]) for a in job["errors"]]
    if job["state"] == "done":  # the drain gave the claimed job its grace
        assert job["attempts"] == 2 and len(downstream.answered) == 2, history
    else:  # or it was never started, and its attempt does not count
        assert (job["state"], job["attempts"]) == ("queued", 1), history
        assert len(history) == 1, f"an attempt was cut off by the shutdown: {history}"
    after = [line for line in daemon.log.splitlines()[-3:] if "stopped cleanly" in line]
    assert after, f"the log goes on after 'stopped cleanly':\n{daemon.log}"

    daemon = await procs.serve(cfg)
    await wait_event_state(http, daemon.admin_url, event_id, "done")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert downstream.ids.count(event_id) == 2, "delivered again after a clean shutdown"


async def test_sigterm_while_a_webhooks_commit_waits_runs_the_job_it_claims_within_the_drain(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """An idle daemon's new job is claimed by the commit that journals its webhook. SIGTERM
    landing while that commit waits on the journal: the job still runs within the drain's
    grace, neither left running nor cut off."""
    journal = tmp_path / "webhookd.db"
    cfg = write_config(
        tmp_path / "webhookd.toml",
        journal,
        forward_source("shop", f"{downstream.url}/shop"),
        # No sweep during the test: a webhook that arrives while a sweep's refill is pending
        # is not claimed by its commit (that refill would pick it up instead), and with the
        # journal locked, no claim of it could then be seen waiting.
        workers="shutdown_grace_s = 10\nsweep_interval_s = 3600",
    )
    daemon = await procs.serve(cfg)

    async def post(n: int) -> int:
        async with http.post(f"{daemon.url}/hooks/shop", data=f'{{"x": {n}}}', headers=JSON) as r:
            return r.status

    assert await post(0) == 202
    await downstream.wait_for(lambda: len(downstream.answered) == 1)
    # Answered is not recorded: the lock below must not hold up the first job's outcome.
    await daemon.wait_said(r"attempt=1 outcome=done")  # logged after its commit: pool idle
    downstream.delay_s = 1.0
    # Hold the journal's write lock (as a slow disk would), so the webhook's commit, with its
    # job written claimed, is waiting on the journal when SIGTERM arrives: with the lock held,
    # a job being claimed can only be one its webhook's commit is writing.
    lock = sqlite3.connect(journal, isolation_level=None, timeout=5)
    try:
        lock.execute("BEGIN IMMEDIATE")
        posting = asyncio.create_task(post(1))
        await sigterm_while_a_claim_waits(http, daemon, lock)
    finally:
        lock.close()
    assert await posting in (202, 503)  # 503 if the commit outlasted server.ack_timeout_s
    assert await daemon.wait_exit() == 0
    with contextlib.closing(sqlite3.connect(journal)) as db:
        rows = db.execute("SELECT state, attempts FROM jobs").fetchall()
    assert rows == [("done", 1)] * 2
    assert len(downstream.answered) == 2


async def test_a_second_serve_on_the_same_journal_exits_1_and_leaves_the_running_job_alone(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """One daemon per SQLite journal: a second ``serve`` on the same file (a unit started twice,
    a deploy that overlaps) exits 1 naming the journal and the daemon holding it, before its
    start-up recovery could take the first daemon's running job for an earlier boot's and run
    it a second time beside it. The CLI still works beside the daemon."""
    # Held until released below, however long the second serve and the CLI take to start.
    cfg, first, ids = await slow_jobs_running(
        tmp_path, procs, downstream, http, grace_s=10.0, delay_s=60.0
    )
    second = await procs.serve(cfg, wait=False)
    assert await second.wait_exit(timeout_s=15) == 1
    assert not second.listening.is_set()
    said = [line for line in second.lines if "in use by another webhookd serve" in line]
    assert len(said) == 1 and f"(pid {first.pid})" in said[0], second.log
    assert "fatal: journal " in said[0]  # webhookd's own error: no class name before it
    assert str(tmp_path / "webhookd.db") in said[0]
    assert not any("recovered" in line for line in second.lines), second.log

    doc = await show(procs, cfg, ids[0])
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("running", 1)]
    downstream.release.set()
    await wait_event_state(http, first.admin_url, ids[0], "done")
    assert [d.event_id for d in downstream.answered] == ids  # delivered once
    doc = await show(procs, cfg, ids[0])
    assert [a["outcome"] for a in doc["jobs"][0]["errors"]] == ["done"]

    first.signal(signal.SIGTERM)
    assert await first.wait_exit() == 0
    again = await procs.serve(cfg)  # the lock went with the first daemon
    again.signal(signal.SIGTERM)
    assert await again.wait_exit() == 0


async def test_sigterm_while_a_body_is_still_arriving_starts_no_queued_job(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """The receiver's close waits (up to ``ack_timeout_s`` + 1 s) for a request whose body is
    still arriving. The pool was stopped only after it: a job queued behind a running one
    started during the drain, when its worker came free, to be cut off at the grace."""
    cfg = tmp_path / "webhookd.toml"
    cfg.write_text(
        config_text(
            f'path = "{tmp_path / "webhookd.db"}"',
            forward_source("shop", f"{downstream.url}/shop"),
            workers="concurrency = 1\nshutdown_grace_s = 10",
            server="ack_timeout_s = 1",
        ),
        encoding="utf-8",
    )
    daemon = await procs.serve(cfg)
    downstream.delay_s = 30.0  # until released
    ids = []
    for n in range(2):
        async with http.post(f"{daemon.url}/hooks/shop", data=f'{{"n": {n}}}', headers=JSON) as r:
            assert r.status == 202
            ids.append((await r.json())["id"])
    await downstream.wait_for(lambda: len(downstream.arrivals) == 1)  # the second is queued
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    _, slow = await asyncio.open_connection(host, int(port))
    slow.write(
        b"POST /hooks/shop HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 10\r\n\r\n{"n"'
    )
    await slow.drain()
    try:
        daemon.signal(signal.SIGTERM)
        await daemon.wait_said(r"draining \(SIGTERM\)")
        downstream.release.set()  # the running job ends: its worker is free during the drain
        assert await daemon.wait_exit(timeout_s=20) == 0
    finally:
        slow.close()
    assert downstream.ids == [ids[0]]
    doc = await show(procs, cfg, ids[1])
    assert [(j["state"], j["attempts"], j["errors"]) for j in doc["jobs"]] == [("queued", 0, [])]


async def test_a_handler_that_swallows_the_drains_cancel_is_named_and_does_not_hold_the_exit(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """An async python handler that catches CancelledError and goes on cannot be stopped from
    outside. The drain waits a few seconds for it after the cancel, then names the job in a
    warning, re-queues it as cut off (not counted), closes the journal and exits 0, where it
    used to wait on the handler until the stop's deadline and exit 1 blaming "a step of the
    close". A handler that catches the cancel and returns has its outcome kept, and is
    not counted as cut off."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "stubborn_hooks.py").write_text(
        "import asyncio\nimport sys\n\n\n"
        "async def handle(event):\n"
        "    print('stubborn handler started', file=sys.stderr, flush=True)\n"
        "    while True:\n"
        "        try:\n"
        "            await asyncio.sleep(3600)\n"
        "        except asyncio.CancelledError:\n"
        "            pass\n\n\n"
        "async def polite(event):\n"
        "    print('polite handler started', file=sys.stderr, flush=True)\n"
        "    try:\n"
        "        await asyncio.sleep(3600)\n"
        "    except asyncio.CancelledError:\n"
        "        pass\n"
        "    return {'finished': True}\n"
    )
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        f"""
[sources.shop]
[[sources.shop.actions]]
name = "stubborn"
type = "python"
handler = "stubborn_hooks:handle"
path = "{project}"

[[sources.shop.actions]]
name = "polite"
type = "python"
handler = "stubborn_hooks:polite"
path = "{project}"
""",
        workers="shutdown_grace_s = 0.5",
    )
    daemon = await procs.serve(cfg)
    async with http.post(f"{daemon.url}/hooks/shop", data="{}", headers=JSON) as r:
        assert r.status == 202
        event_id = (await r.json())["id"]
    await daemon.wait_said("stubborn handler started")
    await daemon.wait_said("polite handler started")

    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(timeout_s=25) == 0, daemon.log
    [named] = [line for line in daemon.lines if "did not end" in line and "drain:" in line]
    assert "action=stubborn" in named and "catch CancelledError" in named, daemon.log
    assert not any("stop took longer" in line for line in daemon.lines), daemon.log
    assert any("drain: 1 job(s) still running after 0.5s were cut off" in x for x in daemon.lines)
    assert any("stopped cleanly (1 job(s) re-queued)" in line for line in daemon.lines)
    # The handler outlives the close too; the exit's own deadline ends the process.
    assert "exit took longer than 5s (a thread or a handler is stuck)" in daemon.lines[-1]
    doc = await show(procs, cfg, event_id)
    job, done = sorted(doc["jobs"], key=lambda j: j["action"] != "stubborn")
    assert (done["action"], done["state"], done["result"]) == ("polite", "done", {"finished": True})
    assert (job["state"], job["attempts"]) == ("queued", 0)
    assert [(a["outcome"], a["detail"]) for a in job["errors"]] == [
        ("interrupted", {"counted": False})
    ]


async def test_serve_on_a_journal_of_a_newer_webhookd_exits_3_which_the_unit_does_not_restart(
    tmp_path: Path, procs: Procs
) -> None:
    """A journal a newer release upgraded (a rollback of the package, not of the journal) stays
    newer however often this one starts: ``serve`` exits 3, not the 1 of a failure a restart may
    mend, and the shipped unit names 3 beside the 2 of a bad config as a status not to restart
    on, so systemd does not start it every 2 s for good."""
    journal = tmp_path / "webhookd.db"
    cfg = write_config(tmp_path / "webhookd.toml", journal)
    first = await procs.serve(cfg)
    first.signal(signal.SIGTERM)
    assert await first.wait_exit() == 0
    with contextlib.closing(sqlite3.connect(journal)) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.execute(f"PRAGMA user_version = {version + 1}")

    refused = await procs.serve(cfg, wait=False)
    assert await refused.wait_exit(timeout_s=15) == 3
    assert not refused.listening.is_set()
    fatal = [line for line in refused.lines if "fatal:" in line]
    assert len(fatal) == 1 and "newer than this webhookd understands" in fatal[0], refused.log

    unit = (Path(__file__).parent.parent / "examples" / "webhookd.service").read_text()
    prevent = [line for line in unit.splitlines() if line.startswith("RestartPreventExitStatus=")]
    assert prevent == ["RestartPreventExitStatus=2 3"]


async def test_serve_on_another_programs_database_exits_1_and_leaves_it_as_it_is(
    tmp_path: Path, procs: Procs
) -> None:
    """A journal.path that names another program's SQLite file (tables of its own, no webhookd
    schema) got webhookd's whole schema made in it beside them, and was served. The start is
    now refused, one fatal line naming the file, exit 1, and the file is left as it was, with
    nothing beside it; an empty database (no table) is still made a journal."""
    journal = tmp_path / "webhookd.db"
    cfg = write_config(tmp_path / "webhookd.toml", journal)
    with contextlib.closing(sqlite3.connect(journal)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('mine')")
        db.commit()
    before = (journal.read_bytes(), sorted(os.listdir(tmp_path)))

    refused = await procs.serve(cfg, wait=False)
    assert await refused.wait_exit(timeout_s=15) == 1
    assert not refused.listening.is_set()
    fatal = [line for line in refused.lines if "fatal:" in line]
    assert len(fatal) == 1, refused.log
    assert f"fatal: {journal} holds a database that is not a webhookd journal" in fatal[0]
    assert (journal.read_bytes(), sorted(os.listdir(tmp_path))) == before

    with contextlib.closing(sqlite3.connect(journal)) as db:
        db.execute("DROP TABLE notes")
        db.commit()
    served = await procs.serve(cfg)
    served.signal(signal.SIGTERM)
    assert await served.wait_exit() == 0
    with contextlib.closing(sqlite3.connect(journal)) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_schema")}
    assert {"events", "jobs"} <= names


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["term", "int"])
async def test_second_signal_exits_at_once_and_the_next_start_recovers_the_job(
    tmp_path: Path,
    procs: Procs,
    downstream: Target,
    http: aiohttp.ClientSession,
    second: signal.Signals,
) -> None:
    """A second signal during the drain exits at once; the next start re-runs the job."""
    cfg, daemon, [event_id] = await slow_jobs_running(
        tmp_path, procs, downstream, http, grace_s=20, delay_s=20.0
    )

    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    # The drain says what it waits for, how long, and what a second signal does.
    await daemon.wait_said(
        re.escape(
            "drain: waiting up to 20s (workers.shutdown_grace_s) for 1 running job(s);"
            " a second signal exits at once"
        )
    )
    daemon.signal(second)
    assert await daemon.wait_exit(timeout_s=5) == 1  # as docs/guarantees.md says
    assert time.monotonic() - signalled < 3.0

    downstream.delay_s = 0.0
    daemon = await procs.serve(cfg)
    await daemon.wait_said("recovered 1 interrupted job")
    await wait_event_state(http, daemon.admin_url, event_id, "done")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    doc = await show(procs, cfg, event_id)
    [job] = doc["jobs"]
    assert [a["outcome"] for a in job["errors"]] == ["interrupted", "done"]
    assert downstream.ids == [event_id, event_id]


async def test_second_signal_kills_a_running_commands_process_group_before_exiting(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """An exit that cannot wait for the drain still ends the commands it started: a command
    left running would run beside the same job's next attempt once the next start recovers it
    (two deploys at once)."""
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time;"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}');"
        "time.sleep(60)"
    )
    body = f"""
[sources.deploy]
[[sources.deploy.actions]]
type = "command"
argv = [{json.dumps(sys.executable)}, "-c", {json.dumps(script)}]
timeout_s = 120
"""
    cfg = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", body)
    daemon = await procs.serve(cfg)
    async with http.post(f"{daemon.url}/hooks/deploy", data="{}", headers=JSON) as r:
        assert r.status == 202

    async def started() -> bool:
        return pids.exists() and len(pids.read_text().split()) == 2

    await poll(started, timeout_s=15)
    running = [int(p) for p in pids.read_text().split()]
    daemon.signal(signal.SIGTERM)
    await daemon.wait_said("draining")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(timeout_s=5) == 1
    assert any("(1 running command(s) killed)" in line for line in daemon.lines), daemon.log

    async def gone() -> bool:
        return not any(_alive(pid) for pid in running)

    await poll(gone, timeout_s=10)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_same_delivery_twice_is_answered_duplicate_and_forwarded_once(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """A repeated delivery gets 200 with the first event's id and is forwarded only once."""
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        forward_source('"*"', f"{downstream.url}/any"),
    )
    daemon = await procs.serve(cfg)
    body = json.dumps({"order": 42, "nonce": uuid.uuid4().hex})

    async def deliver(data: str) -> tuple[int, Any]:
        async with http.post(f"{daemon.url}/hooks/shop", data=data, headers=JSON) as r:
            return r.status, await r.json()

    status, first = await deliver(body)
    assert (status, first["duplicate"]) == (202, False)
    status, second = await deliver(body)
    assert (status, second) == (200, {"id": first["id"], "duplicate": True})
    status, other = await deliver('{"order": 43}')
    assert status == 202

    await downstream.wait_for(lambda: {first["id"], other["id"]} <= set(downstream.ids))
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0  # drained: nothing more can arrive
    assert sorted(downstream.ids) == sorted([first["id"], other["id"]])
    doc = await show(procs, cfg, first["id"])
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 1)]


async def test_failing_target_retries_on_backoff_then_dead_then_cli_replay_delivers(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """A 500ing target is retried with growing gaps, goes dead, and `replay` delivers it."""
    base_s, factor, cap_s = 0.05, 2.0, 0.2
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        forward_source(
            "flaky",
            f"{downstream.url}/flaky",
            f"{{ max_attempts = 3, base_s = {base_s}, factor = {factor}, cap_s = {cap_s} }}",
        ),
    )
    daemon = await procs.serve(cfg)
    downstream.status = 500
    async with http.post(f"{daemon.url}/hooks/flaky", data='{"x": 1}', headers=JSON) as r:
        assert r.status == 202
        event_id = (await r.json())["id"]
    await downstream.wait_for(lambda: len(downstream.answered) == 3)
    await wait_event_state(http, daemon.admin_url, event_id, "dead")

    doc = await show(procs, cfg, event_id)
    [job] = doc["jobs"]
    assert (job["state"], job["attempts"]) == ("dead", 3)
    history = job["errors"]
    assert [a["outcome"] for a in history] == ["retry", "retry", "dead"]
    gaps = []
    for n in (1, 2):
        gap = history[n]["started_at"] - history[n - 1]["finished_at"]
        gaps.append(round(gap, 3))
        assert gap >= 0.5 * min(cap_s, base_s * factor ** (n - 1)) - 1e-3, gaps
        assert gap < min(cap_s, base_s * factor ** (n - 1)) + 0.5, f"no timely retry: {gaps}"
    print(f"\nretry gaps {gaps} s")

    downstream.status = 200
    out = await procs.cli("replay", event_id, "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "replayed 1 event(s), 1 job(s) re-queued" in out.stdout
    replayed = time.monotonic()
    await downstream.wait_for(lambda: len(downstream.answered) == 4, timeout_s=3)
    print(f"replay picked up after {time.monotonic() - replayed:.2f} s")
    await wait_event_state(http, daemon.admin_url, event_id, "done")
    doc = await show(procs, cfg, event_id)
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 1)]
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


async def test_retry_after_of_years_parks_a_job_for_cap_s_and_cli_replay_runs_it_now(
    tmp_path: Path, procs: Procs, downstream: Target, http: aiohttp.ClientSession
) -> None:
    """`Retry-After: 99999999` parks the job for cap_s, not years; `replay <id>` runs it at once."""
    cap_s = 3600.0
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        forward_source(
            "busy", f"{downstream.url}/busy", f"{{ max_attempts = 5, base_s = 1, cap_s = {cap_s} }}"
        ),
    )
    daemon = await procs.serve(cfg)
    downstream.status = 503
    downstream.headers = {"Retry-After": "99999999"}
    async with http.post(f"{daemon.url}/hooks/busy", data='{"x": 1}', headers=JSON) as r:
        assert r.status == 202
        event_id = (await r.json())["id"]
    job: dict[str, Any] = {}

    async def attempt_recorded() -> bool:
        nonlocal job
        status, doc = await get_json(http, f"{daemon.admin_url}/events/{event_id}")
        job = doc["jobs"][0] if status == 200 and doc else {}  # type: ignore[index]
        return bool(job.get("errors"))

    await poll(attempt_recorded, timeout_s=10)
    assert (job["state"], job["attempts"]) == ("queued", 1)
    assert job["run_at"] - job["errors"][0]["finished_at"] == pytest.approx(cap_s, abs=1)

    downstream.status = 200
    downstream.headers = {}
    out = await procs.cli("replay", event_id, "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "replayed 1 event(s), 0 job(s) re-queued, 1 waiting job(s) due now" in out.stdout
    await downstream.wait_for(lambda: len(downstream.answered) == 2, timeout_s=5)
    await wait_event_state(http, daemon.admin_url, event_id, "done")
    doc = await show(procs, cfg, event_id)
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 2)]
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


@pytest.mark.parametrize(("hard", "raised_to"), [(8192, 1344), (600, 600)])
async def test_serve_raises_its_open_files_limit_for_max_connections_or_warns(
    tmp_path: Path, procs: Procs, hard: int, raised_to: int
) -> None:
    """Started under a shell's low soft limit on open files, the daemon raises it to what
    server.max_connections (1,024) and the rest need (2 per worker, 256 kept), as far as the
    hard limit allows; short of it, one warning says what to raise."""
    cfg = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db")
    daemon = await procs.serve(cfg, open_files=(128, hard))
    limits = await asyncio.to_thread(Path(f"/proc/{daemon.pid}/limits").read_text)
    [line] = [row for row in limits.splitlines() if row.startswith("Max open files")]
    assert line.split()[3:5] == [str(raised_to), str(hard)], line
    warned = [line for line in daemon.lines if "open-files limit" in line]
    assert len(warned) == (hard < 1344), daemon.log
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


async def test_under_a_low_open_files_limit_idle_connections_cannot_take_the_daemon_off_the_air(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """Under a hard limit of 300 open files, below what server.max_connections (1,024) needs,
    the receiver holds at most what fits (a quarter of the limit here: 300 less 2 per worker
    and 256 kept leaves fewer), and the start's warning says so. 300 idle connections, more
    than the limit, then get what a full receiver gives: the ones past it are answered 503
    and closed, the admin API still answers, and a webhook gets its 202 once an idle
    connection (a second old) is closed to make room for it."""
    cfg = tmp_path / "webhookd.toml"
    body = '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"'
    text = config_text(f'path = "{tmp_path / "webhookd.db"}"', body, workers="concurrency = 4")
    cfg.write_text(text, encoding="utf-8")
    daemon = await procs.serve(cfg, open_files=(300, 300))
    [warned] = [line for line in daemon.lines if "open-files limit" in line]
    assert "the receiver takes at most 75 connections" in warned, warned
    host, port = daemon.receiver.rsplit(":", 1)
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(300)]
    closed: list[bytes] = []
    all_closed = asyncio.Event()

    async def until_closed(reader: asyncio.StreamReader) -> None:
        closed.append(await reader.read())
        if len(closed) == 300 - 75:
            all_closed.set()

    readers = [asyncio.create_task(until_closed(reader)) for reader, _ in conns]
    try:
        async with asyncio.timeout(15):
            await all_closed.wait()
        # Refused with a 503 as they came, or (a second on) closed to make room.
        assert {answer[:13] for answer in closed} <= {b"HTTP/1.1 503 ", b""}
        assert closed.count(b"") < len(closed), "not one connection was answered 503"
        status, ready = await get_json(http, f"{daemon.admin_url}/readyz")
        assert (status, ready) == (200, {"ready": True}), daemon.log

        async def taken() -> bool:
            try:
                async with http.post(f"{daemon.url}/hooks/shop", json={"n": 1}) as r:
                    return r.status == 202
            except aiohttp.ClientConnectionError:  # refused as it connected: reset
                return False

        await poll(taken, timeout_s=15, interval_s=0.05)
        room = [line for line in daemon.lines if "to make room" in line]
        assert room and room[0].endswith(
            "(at most 75 under the open-files limit, server.max_connections = 1024)"
        ), daemon.log
        assert len(await asyncio.to_thread(os.listdir, f"/proc/{daemon.pid}/fd")) < 300
    finally:
        for task in readers:
            task.cancel()
        for _, writer in conns:
            writer.close()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


@pytest.mark.parametrize(
    ("extra", "dotted"),
    [
        (
            '[sources.demo]\ncolour = "red"\n[[sources.demo.actions]]\ntype = "log"',
            "sources.demo.colour",
        ),
        ("[journal]\nkeep_done_hours = 1", "journal.keep_done_hours"),
        (
            '[sources.demo]\n[[sources.demo.actions]]\ntype = "forward"\n'
            'url = "http://127.0.0.1:9/x"\nurl_path = "/y"',
            "sources.demo.actions[0].url_path",
        ),
    ],
)
async def test_unknown_config_key_is_named_and_exits_2(
    tmp_path: Path, procs: Procs, extra: str, dotted: str
) -> None:
    """`check` and `serve` refuse a config with an unknown key, naming it, with exit status 2."""
    cfg = tmp_path / "webhookd.toml"
    cfg.write_text(
        f'[server]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n{extra}\n',
        encoding="utf-8",
    )
    out = await procs.cli("check", "--config", str(cfg))
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and dotted in lines[0] and "unknown" in lines[0], out.stderr

    daemon = await procs.serve(cfg, wait=False)
    assert await daemon.wait_exit(timeout_s=15) == 2
    assert not daemon.listening.is_set()
    assert any(dotted in line for line in daemon.lines), daemon.log


async def test_embedded_default_takes_a_webhook_and_show_reports_it_done(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """With no config, a POST to localhost:8080/hooks/demo gets 202 and `show` says done."""
    busy = [p for p in (8080, 8081) if not port_is_free(p)]
    if busy:
        pytest.skip(f"the embedded default needs 127.0.0.1 ports 8080 and 8081; busy: {busy}")
    daemon = await procs.serve(None, cwd=tmp_path)
    assert (daemon.receiver, daemon.admin) == ("127.0.0.1:8080", "127.0.0.1:8081")
    # What `curl -XPOST localhost:8080/hooks/demo -d '{"a":1}'` sends.
    async with http.post(
        "http://localhost:8080/hooks/demo",
        data='{"a":1}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.status == 202
        doc = await r.json()
    assert doc["duplicate"] is False
    event_id = doc["id"]
    await wait_event_state(http, "http://127.0.0.1:8081", event_id, "done")

    out = await procs.cli("show", event_id, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"event    {event_id}  [done]" in out.stdout
    assert (tmp_path / "webhookd.db").exists()
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


async def test_under_systemd_it_is_ready_once_listening_pings_the_watchdog_and_says_stopping(
    tmp_path: Path, procs: Procs
) -> None:
    """A ``Type=notify`` unit: ``READY=1`` (with the receiver's address) once the port takes
    connections, ``WATCHDOG=1`` every half ``WatchdogSec`` meanwhile, ``RELOADING=1`` then
    ``READY=1`` around SIGHUP's reload, ``STOPPING=1`` as SIGTERM's drain begins, then exit 0.
    A second serve on the same journal, which cannot start, exits without ever saying it is
    ready."""
    loop = asyncio.get_running_loop()
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(2):
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            sock.bind(f"\0webhookd-test-{uuid.uuid4().hex}")
            sock.setblocking(False)
            sockets.append(sock)
        first, second = ("@" + s.getsockname()[1:].decode() for s in sockets)

        async def said(sock: socket.socket) -> str:
            """The next datagram but the status lines, which come every 10 s."""
            while True:
                got = (await asyncio.wait_for(loop.sock_recv(sock, 4096), 15)).decode()
                if not got.startswith("STATUS="):
                    return got

        cfg = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db")
        env = {"NOTIFY_SOCKET": first, "WATCHDOG_USEC": "200000"}
        daemon = await procs.serve(cfg, wait=False, env=env)
        while (ready := await said(sockets[0])) == "WATCHDOG=1":
            pass  # pinged from the start: a long schema upgrade is no hang
        await daemon.wait_listening()
        assert ready.startswith(f"READY=1\nSTATUS=taking webhooks on {daemon.receiver}; backlog 0")
        host, port = daemon.receiver.rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.close()
        await writer.wait_closed()
        assert [await said(sockets[0]) for _ in range(2)] == ["WATCHDOG=1"] * 2

        daemon.signal(signal.SIGHUP)
        while (reloading := await said(sockets[0])) == "WATCHDOG=1":
            pass
        assert reloading.startswith("RELOADING=1\nSTATUS=reloading the config\nMONOTONIC_USEC=")
        while (reloaded := await said(sockets[0])) == "WATCHDOG=1":
            pass
        assert reloaded.startswith(f"READY=1\nSTATUS=taking webhooks on {daemon.receiver}; ")

        other = await procs.serve(cfg, wait=False, env={"NOTIFY_SOCKET": second})
        assert await other.wait_exit(timeout_s=15) == 1
        with pytest.raises(BlockingIOError):  # nothing was sent to it, READY=1 least of all
            sockets[1].recv(4096)

        # Unread while the second serve ran, the socket's queue (net.unix.max_dgram_qlen, 10
        # datagrams: a second of pings) is full, and a datagram sent to a full one is lost, as
        # a reader that falls behind loses it: empty it before STOPPING=1 is sent.
        with contextlib.suppress(BlockingIOError):
            while sockets[0].recv(4096):
                pass
        daemon.signal(signal.SIGTERM)
        while (stopping := await said(sockets[0])) == "WATCHDOG=1":
            pass
        assert stopping.startswith("STOPPING=1\nSTATUS=draining (SIGTERM); backlog ")
        assert await daemon.wait_exit() == 0


async def test_a_second_sigterm_during_the_start_exits_at_once(
    tmp_path: Path, procs: Procs
) -> None:
    """A start held by a journal that does not answer (a TCP listener that never speaks, as a
    hung PostgreSQL): SIGTERM, then SIGTERM again, did nothing until the start gave up (8 s
    here, up to a minute), and then exited 1 with the start's error. The second signal now
    exits at once, as it does once the daemon runs."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = tmp_path / "webhookd.toml"
    cfg.write_text(
        config_text(
            f'url = "postgresql://wh:pw@127.0.0.1:{port}/wh"',
            forward_source("a", "http://127.0.0.1:9/x"),
        ),
        encoding="utf-8",
    )
    try:
        daemon = await procs.serve(cfg, wait=False)
        await asyncio.wait_for(connected.wait(), 20)  # in the start, opening the journal
        daemon.signal(signal.SIGTERM)
        # Told apart: two signals sent at once can reach a process as one.
        await daemon.wait_said(r"SIGTERM during the start: draining once it is done")
        signalled = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(timeout_s=20) == 1
        assert time.monotonic() - signalled < 5
        await daemon.wait_said(r"second signal: exiting at once")
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
