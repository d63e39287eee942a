"""``webhookd copy``: a SQLite journal copied into an empty PostgreSQL one, for the move from one
box to several nodes. What a user reads back (events, jobs, attempts, pauses), what the queue
does next (order, recovery, numbering) and dedup are the same on the new journal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from cluster import node_config, post_acked, stop
from conftest import Target, make_config
from procs import Procs, poll, settled_event, spawn, write_config

from webhookd.clock import ManualClock
from webhookd.errors import JournalError
from webhookd.journal import (
    Finished,
    Journal,
    NewEvent,
    NewJob,
    _take_serve_lock,
    copied_marker,
    copied_to,
)
from webhookd.journal.postgres import PostgresJournal
from webhookd.journal.postgres.from_sqlite import BATCH_BYTES, _open_sqlite, copy_journal
from webhookd.journal.postgres.schema import migrate
from webhookd.models import Event, JobState, Priority, kept_digest, new_event_id, new_job_id

START = 1_700_000_000.0


def new_event(
    key: str, *, jobs: int = 1, order_key: str | None = None, body_key: str | None = None
) -> NewEvent:
    event = Event(
        id=new_event_id(),
        source="shop",
        received_at=START,
        dedup_key=key,
        tenant="t1",
        priority=Priority.HIGH,
        headers=(("Content-Type", "application/json"), ("X-Thing", "é")),
        body=b'{"raw": "\xff", "nul": "\x00"}',
        query="a=1",
    )
    made = tuple(NewJob(new_job_id(), f"forward-{i}", "forward", 3, order_key) for i in range(jobs))
    return NewEvent(event, made, body_key)


def outcome(job_id: str, state: JobState, what: str, **kw: object) -> Finished:
    return Finished(
        job_id=job_id,
        attempt=1,
        state=state,
        started_at=START + 1,
        finished_at=START + 2,
        outcome=what,
        **kw,
    )  # type: ignore[arg-type]


async def test_a_copy_reads_back_the_same_and_the_queue_goes_on_from_it(
    tmp_path: Path, pg_url: str
) -> None:
    clock = ManualClock(START)
    path = tmp_path / "journal.db"
    async with Journal(path, clock=clock) as lite:
        done_and_queued = new_event("shop:1", jobs=2)
        dead = new_event("shop:2")
        running = new_event("shop:3")
        first, second = (new_event(f"shop:o{i}", order_key="cust-9") for i in range(2))
        signed = new_event("gh:delivery-1", body_key="gh:sha256:aa")
        pruned = new_event("shop:gone")
        for item in (done_and_queued, dead, running, first, second, signed, pruned):
            assert not (await lite.ingest(item)).duplicate
        done_id = done_and_queued.jobs[0].id
        await lite.claim([done_id, dead.jobs[0].id, running.jobs[0].id], "boot_a")
        await lite.finish(
            [
                outcome(done_id, JobState.DONE, "ok", result={"status": 200}),
                outcome(dead.jobs[0].id, JobState.DEAD, "failed", error="HTTP 410"),
            ]
        )
        await lite.pause("shop")
        ids = [x.event.id for x in (done_and_queued, dead, running, first, second, signed)]
        before = {i: await lite.get_event(i) for i in ids}
    # The journal is closed here as a killed daemon leaves it: one job still running. And as
    # retention leaves an event it deleted: its dedup key kept, as a digest.
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("DELETE FROM jobs WHERE event_id = :id", {"id": pruned.event.id})
        raw.execute("DELETE FROM events WHERE id = :id", {"id": pruned.event.id})
    raw.close()

    made = await copy_journal(path, pg_url)
    assert (made.events, made.attempts, made.dedup_keys) == (6, 2, 6)
    assert made.jobs == {"queued": 4, "done": 1, "dead": 1, "running": 1}
    # Only digests were kept of these, which no event makes again: a second key of something
    # signed other than the body (made up here), and the pruned event's.
    assert (made.body_keys, made.keys_of_pruned) == (1, 1)
    assert made.paused == ("shop",)
    assert made.unfinished == {("shop", "forward-0"): 4, ("shop", "forward-1"): 1}
    assert "copied into PostgreSQL" in copied_marker(path).read_text()

    async with PostgresJournal(pg_url, clock=clock, heartbeat_s=3600) as pg:
        assert {i: await pg.get_event(i) for i in ids} == before
        assert await pg.paused_sources() == frozenset({"shop"})
        # Dedup: a provider's retry of a copied delivery is the copied event.
        again = await pg.ingest(new_event("shop:1"))
        assert again.duplicate and again.event_id == done_and_queued.event.id
        # That second key did not move (the docs say so): a replay under a new id is new.
        assert not (await pg.ingest(new_event("gh:delivery-2", body_key="gh:sha256:aa"))).duplicate
        # Order: the second job of the key waits for the first.
        await pg.resume("shop")
        ready = {r.id for r in await pg.ready(clock.time(), 100)}
        assert first.jobs[0].id in ready and second.jobs[0].id not in ready
        # The killed daemon's running job comes back as a dead node's does.
        recovery = await pg.recover("boot_b", max_recoveries=3)
        assert recovery.requeued == 1
        # The node's line says whose it was (it said "from an earlier run", naming no one).
        assert recovery.whose() == "left running by the SQLite daemon this journal was copied from"
        job = (await pg.get_event(running.event.id)).jobs[0]
        assert (job.state, job.recoveries) == (JobState.QUEUED, 1)
        assert [a.outcome for a in job.history] == ["interrupted"]
        # New rows are numbered after the copied ones: the queue's order holds.
        fresh = new_event("shop:new")
        await pg.ingest(fresh)
    conn = await asyncpg.connect(pg_url)
    try:
        seqs = await conn.fetch("SELECT id, seq FROM events ORDER BY seq")
        assert [r["id"] for r in seqs][: len(ids)] == ids
        assert seqs[-1]["id"] == fresh.event.id
    finally:
        await conn.close()


async def test_a_copy_refuses_what_it_cannot_do_safely(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        await lite.ingest(new_event("shop:1"))

    lock = _take_serve_lock(path)  # as `webhookd serve` holds it
    try:
        with pytest.raises(JournalError, match="stop it before a copy"):
            await copy_journal(path, pg_url)
    finally:
        os.close(lock)

    with pytest.raises(JournalError, match="no journal at"):
        await copy_journal(tmp_path / "none.db", pg_url)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("none.db")]

    await copy_journal(path, pg_url)
    with pytest.raises(JournalError, match="a second copy would run its queued jobs twice"):
        await copy_journal(path, pg_url)
    copied_marker(path).unlink()  # as the refusal says, to copy it all the same
    with pytest.raises(JournalError, match="already holds events"):
        await copy_journal(path, pg_url)  # a second copy, or nodes that took webhooks


async def test_while_a_copy_reads_the_journal_no_verb_changes_it_and_no_daemon_starts(
    tmp_path: Path,
) -> None:
    """A pause or a replay made during a copy was in neither journal: the copy holds the
    write lock, and the serve lock, naming itself."""
    path = tmp_path / "journal.db"
    async with Journal(path):
        pass
    lock, held = _open_sqlite(path)
    try:
        other = sqlite3.connect(path, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("CREATE TABLE t (x)")
        other.close()
        with pytest.raises(JournalError, match=r"in use by another webhookd copy \(pid \d+\)"):
            _take_serve_lock(path)
    finally:
        held.close()
        os.close(lock)


async def test_a_copy_that_fails_midway_commits_nothing(tmp_path: Path, pg_url: str) -> None:
    """One transaction: a row PostgreSQL refuses (here a job whose JSON caps are broken, as a
    damaged file could hold) leaves the new journal without any."""
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        for i in range(3):
            await lite.ingest(new_event(f"shop:{i}"))
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE jobs SET caps = '{not json' WHERE seq = 3")
    raw.close()
    with pytest.raises(JournalError, match="a row of jobs cannot be copied"):
        await copy_journal(path, pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM events") == 0
    finally:
        await conn.close()


async def test_a_daemons_queued_jobs_are_delivered_by_a_node_after_the_copy(
    tmp_path: Path, pg_url: str, procs: Procs, target: Target
) -> None:
    """The move as the docs tell it: a paused SQLite daemon holds queued jobs, is stopped,
    copied; a PostgreSQL node started on the copy delivers each once, resumed by the CLI."""
    actions = f"""
[sources.shop]
[[sources.shop.actions]]
type = "forward"
url = "{target.url}/in"
"""
    lite_cfg = write_config(tmp_path / "lite.toml", tmp_path / "journal.db", actions)
    pg_cfg = node_config(tmp_path / "pg.toml", actions)
    env = {"WEBHOOKD_JOURNAL_URL": pg_url}
    daemon = await procs.serve(lite_cfg)
    async with aiohttp.ClientSession() as http:
        pause = f"{daemon.admin_url}/sources/shop/pause"
        async with http.post(pause, headers={"X-Webhookd": "1"}) as r:
            assert r.status == 200, await r.text()
        sent = [await post_acked(http, daemon.url, "shop", {"n": i}) for i in range(5)]
    await stop(daemon)

    wrong = await procs.cli("copy", "--to", str(lite_cfg), "--config", str(lite_cfg))
    unset = await procs.cli("copy", "--to", str(pg_cfg), "--config", str(lite_cfg))
    copied = await procs.cli("copy", "--to", str(pg_cfg), "--config", str(lite_cfg), env=env)
    # The old box's daemon, started again (its unit still enabled), would run them twice.
    again = await procs.cli("check", "--config", str(lite_cfg))
    node = await procs.serve(pg_cfg, env=env)
    resumed = await procs.cli("resume", "shop", "--config", str(pg_cfg), env=env)
    assert wrong.returncode == 2 and "journal.url:" in wrong.stderr
    assert unset.returncode == 2, unset.stderr
    assert "journal.url: environment variable WEBHOOKD_JOURNAL_URL is not set" in unset.stderr
    assert again.returncode == 2 and "was copied into PostgreSQL" in again.stderr
    assert copied.returncode == 0, copied.stderr
    assert "5 event(s); jobs: 5 queued" in copied.stdout
    assert "paused, as before: shop" in copied.stdout
    assert pg_url.split("@")[-1] in copied.stdout
    assert resumed.returncode == 0, resumed.stderr
    async with aiohttp.ClientSession() as http:
        for event_id in sent:
            doc = await settled_event(http, node.admin_url, event_id)
            assert [j["state"] for j in doc["jobs"]] == ["done"]
    await stop(node)
    assert sorted(s.headers["webhook-id"] for s in target.seen) == sorted(sent)
    assert sorted(json.loads(s.body)["n"] for s in target.seen) == list(range(5))


async def node_listens(url: str) -> None:
    """Until a node's listener has run its LISTENs (the second, or its later check, is the last
    query its connection ran)."""
    conn = await asyncpg.connect(url)

    async def listening() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname ="
                " current_database() AND application_name = 'webhookd-listen' AND (query ="
                " 'LISTEN \"webhookd_paused\"' OR query = 'SELECT 1'))"
            )
        )

    try:
        await poll(listening, timeout_s=20)  # state in the server
    finally:
        await conn.close()


async def test_a_node_running_before_the_copy_is_woken_by_it_pauses_first(
    tmp_path: Path, pg_url: str, procs: Procs, target: Target
) -> None:
    """A node started on the new database before the copy (a cutover begun first, or a node
    started early) holds an empty journal and took no webhook: the copy goes in, and wakes it
    at its commit. Its sweep is an hour away, so only the copy's notification starts the
    copied job now. The copied pause holds on it at once too: a node woken for the jobs with
    the pauses it knew (none) would start the paused source's job in the same claim."""
    actions = "".join(
        f"""
[sources.{source}]
[[sources.{source}.actions]]
name = "forward-0"
type = "forward"
url = "{target.url}/{source}"
"""
        for source in ("held", "shop")
    )
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        first = new_event("held:1")  # first in the queue: it would be picked with the other
        held = replace(first, event=replace(first.event, source="held"))
        shop = new_event("shop:1")
        for item in (held, shop):
            await lite.ingest(item)
        await lite.pause("held")
    lite_cfg = write_config(tmp_path / "lite.toml", path, actions)
    pg_cfg = node_config(tmp_path / "pg.toml", actions, workers="sweep_interval_s = 3600")
    env = {"WEBHOOKD_JOURNAL_URL": pg_url}
    node = await procs.serve(pg_cfg, env=env)
    await node_listens(pg_url)  # its look at what it missed while not listening is done too
    copied = await procs.cli("copy", "--to", str(pg_cfg), "--config", str(lite_cfg), env=env)
    assert copied.returncode == 0, copied.stderr
    assert "2 event(s); jobs: 2 queued" in copied.stdout
    await target.wait_for(lambda t: bool(t.seen), timeout_s=15)
    assert [s.headers["webhook-id"] for s in target.seen] == [shop.event.id]
    conn = await asyncpg.connect(pg_url)
    try:
        # The claim that took the shop's job has committed: the held one was not in it.
        state = await conn.fetchval("SELECT state FROM jobs WHERE id = $1", held.jobs[0].id)
        assert state == "queued"
    finally:
        await conn.close()
    await stop(node)


def plant(link: Path, target: Path | None, text: str | None = None) -> None:
    """``link`` a symlink to ``target`` (None: removed), whatever was there; or with ``text``,
    a file holding it."""
    if os.path.lexists(link):
        os.unlink(link)
    if target is not None:
        os.symlink(target, link)
    elif text is not None:
        with open(link, "w", encoding="utf-8") as f:
            f.write(text)


def text_mode_and_link(path: Path) -> tuple[str | None, int | None, bool]:
    """(text, permission bits, is a symlink) of ``path``; None for what is not there."""
    if not os.path.lexists(path):
        return None, None, False
    link = os.path.islink(path)
    if link and not os.path.exists(path):
        return None, None, True
    with open(path, encoding="utf-8") as f:
        return f.read(), os.stat(path).st_mode & 0o777, link


async def test_a_copy_writes_no_file_through_a_symlink_planted_beside_the_journal(
    tmp_path: Path, pg_url: str
) -> None:
    """The daemon's user owns the journal's folder: a symlink it plants as the lock file or
    the marker must not have a root copy empty or write the file it points at."""
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        await lite.ingest(new_event("shop:1"))
    victim, planted = tmp_path / "important.conf", tmp_path / "nologin"
    plant(victim, None, "keep me\n")
    plant(Path(f"{path}-lock"), victim)
    with pytest.raises(JournalError, match="cannot lock"):
        await copy_journal(path, pg_url)
    assert text_mode_and_link(victim)[0] == "keep me\n"
    plant(Path(f"{path}-lock"), None)

    plant(copied_marker(path), planted)  # dangling: it would be created
    with pytest.raises(JournalError, match="its marker cannot be read"):
        await copy_journal(path, pg_url)  # taken as copied: refused, nothing written
    assert text_mode_and_link(planted) == (None, None, False)
    plant(copied_marker(path), None)
    await copy_journal(path, pg_url)
    said, mode, link = text_mode_and_link(copied_marker(path))
    assert said is not None and said.startswith("copied into PostgreSQL")
    assert (mode, link) == (0o600, False)
    assert text_mode_and_link(planted) == (None, None, False)


async def test_after_a_copy_the_verbs_that_change_the_old_journal_refuse_it(
    tmp_path: Path, pg_url: str, procs: Procs
) -> None:
    """A pause, replay, cancel, purge or prune of the copied file reached nothing: its jobs
    run from PostgreSQL. Reading it still works."""
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        item = new_event("shop:1")
        await lite.ingest(item)
    config = write_config(tmp_path / "lite.toml", path, "[sources.shop]\n")
    await copy_journal(path, pg_url)
    event_id = item.event.id
    for args in (
        ("pause", "shop"),
        ("resume", "shop"),
        ("replay", event_id),
        ("cancel", event_id),
        ("purge", event_id, "--yes"),
        ("prune",),
    ):
        done = await procs.cli(*args, "--config", str(config))
        assert done.returncode == 2, (args, done.stderr)
        assert (
            "was copied into PostgreSQL" in done.stderr and "with the nodes' config" in done.stderr
        )
    shown = await procs.cli("show", event_id, "--config", str(config))
    assert shown.returncode == 0 and event_id in shown.stdout


async def copy_waits(url: str, wait_event: str, query: str) -> None:
    """Until the copy's backend waits on a lock (``wait_event``) in ``query`` (its start)."""
    conn = await asyncpg.connect(url)

    async def waiting() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name ="
                " 'webhookd copy' AND wait_event = $1 AND query LIKE $2)",
                wait_event,
                f"{query}%",
            )
        )

    try:
        await poll(waiting, timeout_s=20)  # state in the server
    finally:
        await conn.close()


async def copy_cut_short(
    tmp_path: Path, pg_url: str, sig: int, wait_event: str, query: str
) -> tuple[asyncio.subprocess.Process, str, Path, Path]:
    """``webhookd copy`` of a journal of 3 queued jobs, sent ``sig`` once it waits as
    ``copy_waits`` tells; its exit status, what it said, the journal and its config."""
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        for i in range(3):
            await lite.ingest(new_event(f"shop:{i}"))
    lite_cfg = write_config(tmp_path / "lite.toml", path, "[sources.shop]\n")
    pg_cfg = node_config(tmp_path / "pg.toml", "[sources.shop]\n")
    proc = await spawn(
        ["copy", "--to", str(pg_cfg), "--config", str(lite_cfg)],
        None,
        stdout=asyncio.subprocess.PIPE,
        env={"WEBHOOKD_JOURNAL_URL": pg_url},
    )
    try:
        await copy_waits(pg_url, wait_event, query)
        proc.send_signal(sig)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc, err.decode(), path, lite_cfg


async def queued_in(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE state = 'queued'"))
    finally:
        await conn.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
async def test_a_copy_cut_short_after_its_commit_leaves_the_file_marked(
    tmp_path: Path, pg_url: str, procs: Procs, sig: int
) -> None:
    """The ANALYZE after the commit waits behind a VACUUM (here a lock as one takes): the
    copy is in, so the file is marked already, and Ctrl-C there does not say otherwise."""
    conn = await asyncpg.connect(pg_url)
    await migrate(conn, "test")
    vacuum = conn.transaction()
    await vacuum.start()
    await conn.execute("LOCK TABLE dedup IN SHARE UPDATE EXCLUSIVE MODE")
    try:
        proc, said, path, lite_cfg = await copy_cut_short(
            tmp_path, pg_url, sig, "relation", "ANALYZE"
        )
    finally:
        await vacuum.rollback()
        await conn.close()
    check = await procs.cli("check", "--config", str(lite_cfg))
    assert await queued_in(pg_url) == 3
    assert "nothing was copied" not in said, said
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "was copied into PostgreSQL" in said, said
    assert (copied_to(path) or "").startswith("copied into PostgreSQL")
    assert check.returncode == 2 and "was copied into PostgreSQL" in check.stderr


async def hold_the_commit(conn: asyncpg.Connection, *, fail: bool = False) -> None:
    """A deferred trigger on events that, at the COMMIT, waits for advisory lock 7 (held
    by ``conn``), or with ``fail`` refuses it."""
    await migrate(conn, "test")
    body = "RAISE EXCEPTION 'refused at the commit'" if fail else "PERFORM pg_advisory_lock(7)"
    await conn.execute(
        f"""
        CREATE FUNCTION at_commit() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN {body}; RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON events
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION at_commit();
        """
    )
    await conn.execute("SELECT pg_advisory_lock(7)")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
async def test_a_copy_cut_short_during_its_commit_leaves_the_file_marked_saying_how_to_tell(
    tmp_path: Path, pg_url: str, procs: Procs, sig: int
) -> None:
    """Cut short while its COMMIT is under way, the copy may have landed or not: the file is
    marked (serve and check refuse it), and the marker says how to tell and what then."""
    conn = await asyncpg.connect(pg_url)
    try:
        await hold_the_commit(conn)
        proc, said, path, lite_cfg = await copy_cut_short(
            tmp_path, pg_url, sig, "advisory", "COMMIT"
        )
        await conn.execute("SELECT pg_advisory_unlock(7)")  # the commit goes on, if it can
    finally:
        await conn.close()
    check = await procs.cli("check", "--config", str(lite_cfg))
    marker = copied_to(path) or ""
    assert marker.startswith("being copied into PostgreSQL")
    assert "committed if that journal holds events" in marker
    assert "if it holds none, delete this marker and copy again" in marker
    assert check.returncode == 2 and "was being copied into PostgreSQL" in check.stderr
    assert "nothing was copied" not in said, said
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "was being copied into PostgreSQL" in said, said
    else:  # a COMMIT sent lands: the file's jobs are in PostgreSQL, and refused here
        assert await queued_in(pg_url) == 3


async def test_a_commit_the_database_refuses_leaves_the_file_unmarked(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        await lite.ingest(new_event("shop:1"))
    conn = await asyncpg.connect(pg_url)
    try:
        await hold_the_commit(conn, fail=True)
        with pytest.raises(JournalError, match=r"refused at the commit.*run it again"):
            await copy_journal(path, pg_url)
    finally:
        await conn.close()
    assert not copied_marker(path).exists()
    assert await queued_in(pg_url) == 0


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has the file at ``path`` open."""
    fds = Path(f"/proc/{pid}/fd")
    return any(fd.resolve() == path.resolve() for fd in fds.iterdir() if fd.is_symlink())


async def test_a_change_that_waited_for_a_copy_is_refused_once_the_copy_ends(
    tmp_path: Path, pg_url: str
) -> None:
    """A verb checks the marker as it starts, then waits for the write lock the copy holds:
    a copy that ends meanwhile (well within the verb's 5 s) has the change refused, not made
    in the copied file only."""
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        await lite.ingest(new_event("shop:1"))
    lite_cfg = write_config(tmp_path / "lite.toml", path, "[sources.shop]\n")
    pg_cfg = node_config(tmp_path / "pg.toml", "[sources.shop]\n")
    env = {"WEBHOOKD_JOURNAL_URL": pg_url}
    conn = await asyncpg.connect(pg_url)
    await migrate(conn, "test")
    holder = conn.transaction()  # a node starting, say: the copy waits for it
    await holder.start()
    await conn.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE")
    copy = await spawn(
        ["copy", "--to", str(pg_cfg), "--config", str(lite_cfg)],
        None,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    pause = None
    try:
        await copy_waits(pg_url, "relation", "LOCK TABLE events")
        pause = await spawn(
            ["pause", "shop", "--config", str(lite_cfg)], None, stdout=asyncio.subprocess.PIPE
        )

        async def pause_has_the_journal_open() -> bool:  # past its check of the marker
            assert pause is not None
            return has_open(pause.pid, path)

        await poll(pause_has_the_journal_open, timeout_s=20)  # state in another process
        await holder.rollback()
        _, copy_err = await asyncio.wait_for(copy.communicate(), 30)
        _, pause_err = await asyncio.wait_for(pause.communicate(), 30)
    finally:
        for proc in (copy, pause):
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        await conn.close()
    assert copy.returncode == 0, copy_err.decode()
    said = pause_err.decode()
    assert pause.returncode == 2, said
    assert "was copied into PostgreSQL" in said and "while this waited for it" in said
    assert "nothing was changed" in said
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("SELECT count(*) FROM paused_sources").fetchone() == (0,)
    finally:
        raw.close()


async def test_a_journal_nodes_took_webhooks_into_is_refused_though_they_were_pruned(
    tmp_path: Path, pg_url: str
) -> None:
    """Retention deleted the events and jobs, not their dedup keys nor the pauses: copied
    into, that journal would take this deployment's deliveries of those keys as duplicates
    of events it does not hold, and keep a source paused the copied journal ran."""
    clock = ManualClock(START)
    async with PostgresJournal(pg_url, clock=clock, heartbeat_s=3600) as pg:
        assert not (await pg.ingest(new_event("shop:delivery-7", jobs=0))).duplicate
        await pg.pause("other")
        clock.advance(3600)
        await pg.prune(keep_done_s=60, keep_dead_s=60, keep_dedup_s=86400 * 7)
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM events") == 0  # pruned
    finally:
        await conn.close()
    path = tmp_path / "journal.db"
    async with Journal(path, clock=clock) as lite:
        await lite.ingest(new_event("shop:1"))
    with pytest.raises(JournalError, match="already holds dedup keys"):
        await copy_journal(path, pg_url)
    assert not copied_marker(path).exists()


def write_raw(path: Path, sql: str, *args: object) -> None:
    """``sql`` run on the SQLite journal at ``path``, as an older webhookd wrote it."""
    raw = sqlite3.connect(path)
    with raw:
        raw.execute(sql, args)
    raw.close()


async def test_rows_an_older_webhookd_wrote_are_copied_as_this_one_writes_them(
    tmp_path: Path, pg_url: str
) -> None:
    """A NUL in an error (an older webhookd wrote a command's stderr as it was) and keys over
    256 characters (kept whole before they were kept as their digest) are no PostgreSQL text
    or index entry: the copy converts them as the journal and the receiver do now, rather than
    fail every time."""
    clock = ManualClock(START)
    path = tmp_path / "journal.db"
    long = "x" * 8000  # aiohttp takes 8 KB header values
    async with Journal(path, clock=clock) as lite:
        failed, keyed = new_event("shop:1"), new_event(f"shop:{long}", order_key=long)
        for item in (failed, keyed):
            await lite.ingest(item)
        job_id = failed.jobs[0].id
        await lite.claim([job_id], "boot_a")
        await lite.finish([outcome(job_id, JobState.DEAD, "failed", error="exit 1")])
    write_raw(path, "UPDATE jobs SET last_error = ? WHERE id = ?", "exit 1: \x00 stderr", job_id)
    write_raw(path, "UPDATE attempts SET error = ? WHERE job_id = ?", "exit 1: \x00 stderr", job_id)
    write_raw(path, "UPDATE events SET tenant = ? WHERE id = ?", long, keyed.event.id)
    write_raw(path, "UPDATE jobs SET tenant = ? WHERE event_id = ?", long, keyed.event.id)

    made = await copy_journal(path, pg_url)
    assert (made.events, made.dedup_keys) == (2, 2)
    async with PostgresJournal(pg_url, clock=clock, heartbeat_s=3600) as pg:
        job = (await pg.get_event(failed.event.id)).jobs[0]
        assert job.last_error == "exit 1: \\x00 stderr"
        assert [a.error for a in job.history] == ["exit 1: \\x00 stderr"]
        # The receiver keeps such a key as its digest now: a provider's retry is a duplicate.
        retry = await pg.ingest(new_event(f"shop:{kept_digest(long)}"))
        assert retry.duplicate and retry.event_id == keyed.event.id
        assert (await pg.get_event(keyed.event.id)).event.tenant == kept_digest(long)
    conn = await asyncpg.connect(pg_url)
    try:
        row = await conn.fetchrow(
            "SELECT tenant, order_key FROM jobs WHERE event_id = $1", keyed.event.id
        )
        assert tuple(row) == (kept_digest(long), kept_digest(long))
    finally:
        await conn.close()


async def test_a_row_postgresql_still_refuses_is_named(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        items = [new_event(f"shop:{i}") for i in range(3)]
        for item in items:
            await lite.ingest(item)
        job_id = items[1].jobs[0].id
        await lite.claim([job_id], "boot_a")
        await lite.finish([outcome(job_id, JobState.DEAD, "failed", error="refused here")])
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn, "test")
        await conn.execute(
            "ALTER TABLE attempts ADD CONSTRAINT a_test CHECK (error <> 'refused here')"
        )
    finally:
        await conn.close()
    with pytest.raises(JournalError) as refused:
        await copy_journal(path, pg_url)
    said = str(refused.value)
    assert said.startswith(f"attempt 1 of job {job_id} cannot be copied: new row for relation")
    assert "a copy again fails the same until that row is changed" in said
    assert not copied_marker(path).exists()


# Copies the journal at argv[1] into argv[2] in a process of its own; prints the rows of each
# batch the events went in, then how much the peak RSS grew over the copy, in MiB.
_COPY_MEASURED = """
import asyncio, json, resource, sys
from pathlib import Path
from webhookd.journal.postgres.from_sqlite import copy_journal

batches = []
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
asyncio.run(copy_journal(Path(sys.argv[1]), sys.argv[2], on_rows=batches.append))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([batches, (after - before) // 1024]))
"""


async def test_a_copy_of_large_bodies_holds_a_bounded_batch_in_memory(
    tmp_path: Path, pg_url: str
) -> None:
    """Bodies are up to max_body_bytes (1 MiB by default): read 2,000 rows at a time, a batch
    was up to 2 GiB. Batches are cut at BATCH_BYTES (16 MiB) of values too."""
    n, size = 128, 1 << 20
    path = tmp_path / "journal.db"
    async with Journal(path) as lite:
        for i in range(n):
            item = new_event(f"shop:{i}")
            big = replace(item.event, body=bytes([i % 251]) * size)
            await lite.ingest(replace(item, event=big))
    done = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _COPY_MEASURED,
        str(path),
        pg_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(done.communicate(), 60)
    assert done.returncode == 0, err.decode()
    batches, grew_mib = json.loads(out)
    per = BATCH_BYTES // size  # the bodies' bytes reach the cap at that many rows
    assert batches[: n // per] == [per] * (n // per), batches  # the events', then the jobs'
    assert grew_mib < 64, f"the copy's peak RSS grew {grew_mib} MiB for {n} MiB of bodies"


SIGNED = """
[sources.gh]
verify = { scheme = "github", secret = "gh-secret-0123456789abcdef" }

[sources.hm]
verify = { scheme = "hmac", secret = "hmac-secret-0123456789abcdef", header = "X-Sig", \
  timestamp_header = "X-Ts", signed = "{timestamp}.{body}" }
"""


async def test_a_signed_body_sent_again_after_the_copy_is_still_a_duplicate(
    tmp_path: Path, pg_url: str, procs: Procs
) -> None:
    """What was signed is each event's second dedup key (``verify.dedup_body``; with a signed
    timestamp, that time and the body): SQLite keeps its digest only, and the copy makes the
    key again from the event. A captured request sent again under a fresh delivery id (gh),
    or under another query (hm), is a duplicate on the nodes as on the old daemon."""
    from webhookd.schemes import sign

    verify = {name: make_config(tmp_path, SIGNED).sources[name].verify for name in ("gh", "hm")}
    body = b'{"ref": "refs/heads/main", "after": "abc123"}'
    signed = {}
    for name, cfg in verify.items():
        assert cfg is not None
        signed[name] = sign(cfg, body=body, url="", now=time.time(), delivery_id=name)[0]
    lite_cfg = write_config(tmp_path / "lite.toml", tmp_path / "journal.db", SIGNED)
    pg_cfg = node_config(tmp_path / "pg.toml", SIGNED)
    env = {"WEBHOOKD_JOURNAL_URL": pg_url}

    async def send(http: aiohttp.ClientSession, url: str, again: bool) -> list[int]:
        fresh = {"X-GitHub-Delivery": "another-delivery-id"} if again else {}
        query = "?a=1" if again else ""
        answers = []
        for name in ("gh", "hm"):
            headers = {**signed[name], **fresh, "Content-Type": "application/json"}
            async with http.post(f"{url}/hooks/{name}{query}", data=body, headers=headers) as r:
                answers.append(r.status)
        return answers

    daemon = await procs.serve(lite_cfg)
    async with aiohttp.ClientSession() as http:
        first = await send(http, daemon.url, again=False)
        before = await send(http, daemon.url, again=True)
    await stop(daemon)
    copied = await procs.cli("copy", "--to", str(pg_cfg), "--config", str(lite_cfg), env=env)
    assert copied.returncode == 0, copied.stderr
    node = await procs.serve(pg_cfg, env=env)
    async with aiohttp.ClientSession() as http:
        after = await send(http, node.url, again=True)
    await stop(node)
    assert (first, before) == ([202, 202], [200, 200])  # on the old daemon: duplicates
    assert after == [200, 200]
    assert "not copied" not in copied.stdout
