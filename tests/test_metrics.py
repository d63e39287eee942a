"""/metrics: Prometheus counters move as webhooks are accepted, retried and dead-lettered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import DatabaseOutage, Running, Target, make_config
from ops_support import accepted, event_state, forward_source, ingest
from procs import poll
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

import webhookd
from webhookd.clock import ManualClock
from webhookd.config import LaneConfig
from webhookd.journal import Journal
from webhookd.limiter import Lane
from webhookd.metrics import ACK_BUCKETS_S, Metrics
from webhookd.state import UNAVAILABLE
from webhookd.workers import WorkerPool

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(running: Running) -> Samples:
    async with running.http.get(running.admin_url + "/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        return parse(await r.text())


DEAD = "webhookd_dead_letters_total"


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_as_webhooks_are_accepted_retried_and_dead_lettered(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """Intake, ack latency, attempts by outcome, retries, dead letters and gauges all show up."""
    cfg = make_config(
        tmp_path,
        forward_source("flaky", target.url + "/flaky", max_attempts=2)
        + forward_source("ok", target.url + "/ok"),
    )
    running = await run_daemon(cfg)
    before = await scrape(running)
    assert value(before, "webhookd_intake_requests_total", source="ok", status="202") == 0
    # The backlog's limit, the version and the process (restarts, memory, descriptors).
    assert value(before, "webhookd_backlog_max_jobs") == cfg.server.max_backlog
    assert value(before, "webhookd_build_info", version=webhookd.__version__) == 1
    assert value(before, "process_start_time_seconds") > 0
    assert value(before, "process_open_fds") > 0
    # Every action's retry and dead-letter series is there from the start, at 0, so that an
    # increase() alert sees the first one.
    for name in ("webhookd_job_retries_total", "webhookd_dead_letters_total"):
        for source in ("flaky", "ok"):
            key = (name, (("action", "deliver"), ("source", source)))
            assert before[key] == 0, key

    target.statuses = [500, 500]  # flaky: the first attempt is retried, the second goes dead
    flaky = await accepted(running, "flaky")
    await event_state(running.http, running.admin_url, flaky, "dead")
    ok = await accepted(running, "ok")
    await event_state(running.http, running.admin_url, ok, "done")
    status, _ = await running.post("/hooks/nowhere")
    assert status == 404
    # Refused by the parser, before any source: a malformed request line, a 40 KB head.
    huge = b"".join(b"X-P%d: %s\r\n" % (n, b"v" * 8000) for n in range(5))
    for raw, code in [
        (b"PO(ST /hooks/ok HTTP/1.1\r\nHost: t\r\n\r\n", b" 400 "),
        (b"POST /hooks/ok HTTP/1.1\r\nHost: t\r\n" + huge + b"\r\n", b" 431 "),
    ]:
        host, _, port = running.daemon.bound.receiver.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        assert code in await reader.readline()
        writer.close()

    after = await scrape(running)
    assert value(after, "webhookd_intake_requests_total", source="(none)", status="400") == 1
    assert value(after, "webhookd_intake_requests_total", source="(none)", status="431") == 1
    assert value(after, "webhookd_intake_requests_total", source="flaky", status="202") == 1
    assert value(after, "webhookd_intake_requests_total", source="ok", status="202") == 1
    assert value(after, "webhookd_intake_requests_total", source="(none)", status="404") == 1
    assert value(after, "webhookd_ack_seconds_count") == 2
    assert value(after, "webhookd_ack_seconds_bucket", le="+Inf") == 2
    attempts = "webhookd_job_attempts_total"
    assert value(after, attempts, source="flaky", action="deliver", outcome="retry") == 1
    assert value(after, attempts, source="flaky", action="deliver", outcome="dead") == 1
    assert value(after, attempts, source="ok", action="deliver", outcome="done") == 1
    assert value(after, "webhookd_job_retries_total", source="flaky", action="deliver") == 1
    assert value(after, "webhookd_dead_letters_total", source="flaky", action="deliver") == 1
    duration = "webhookd_attempt_duration_seconds_count"
    assert value(after, duration, source="flaky", action="deliver") == 2
    # Buckets up to the longest default timeout (a command's or a handler's 300 s).
    bucket = "webhookd_attempt_duration_seconds_bucket"
    assert value(after, bucket, source="flaky", action="deliver", le="300.0") == 2
    assert value(after, "webhookd_backlog_jobs") == 0
    assert value(after, "webhookd_oldest_queued_age_seconds") == 0
    assert value(after, "webhookd_jobs", state="dead") == 1
    assert value(after, "webhookd_jobs", state="done") == 1
    assert value(after, "webhookd_source_jobs", source="flaky", state="dead") == 1
    assert value(after, "webhookd_source_jobs", source="ok", state="done") == 1
    # The 503s by reason: every reason's series is there from the start.
    for reason in UNAVAILABLE:
        assert after[("webhookd_intake_unavailable_total", (("reason", reason),))] == 0
    # Each configured source's queued, running and dead series are there at 0.
    for state in ("queued", "running", "dead"):
        series = ("webhookd_source_jobs", (("source", "ok"), ("state", state)))
        assert after[series] == 0
    assert value(after, "webhookd_workers_busy") == 0
    assert value(after, "webhookd_workers_holding") == 0
    assert value(after, "webhookd_workers_concurrency") == cfg.workers.concurrency
    assert value(after, "webhookd_journal_commits_total") > value(
        before, "webhookd_journal_commits_total"
    )
    # Each durable group commit (ingests, outcomes) is timed once.
    commits = value(after, "webhookd_journal_commit_seconds_count")
    assert 2 <= commits <= value(after, "webhookd_journal_commits_total")
    assert value(after, "webhookd_journal_commit_seconds_bucket", le="+Inf") == commits
    assert value(after, "webhookd_journal_commit_seconds_sum") > 0
    # Duplicates by source, each source's series there at 0: a sender retrying in a loop.
    assert value(after, "webhookd_intake_duplicates_total", source="ok") == 0
    answers = [(await running.post("/hooks/ok", b'{"again": 1}'))[0] for _ in range(3)]
    assert answers == [202, 200, 200]
    again = await scrape(running)
    assert value(again, "webhookd_intake_duplicates_total", source="ok") == 2
    assert value(again, "webhookd_intake_duplicates_total", source="flaky") == 0


async def test_a_removed_sources_dead_letters_are_counted_as_removed_from_zero(
    tmp_path: Path, run_daemon: Any
) -> None:
    """Jobs left by a source the config no longer has (and no catch-all) go dead at their turn:
    their dead letters are labelled ``(removed)``, as webhookd_source_jobs labels their jobs,
    not ``*`` (there is no catch-all), and the series is there at 0 from the start, so an
    ``increase(...) > 0`` alert sees them die."""
    cfg = make_config(tmp_path, forward_source("ok", "http://127.0.0.1:9/"))
    async with Journal(cfg.journal.path) as journal:
        await ingest(journal, "py", 2)
        await journal.pause("py")  # held, so the start's metrics can be read before they die
    running = await run_daemon(cfg)
    before = await scrape(running)
    labels = {"source": "(removed)", "action": "deliver"}
    assert ("webhookd_dead_letters_total", tuple(sorted(labels.items()))) in before
    assert value(before, "webhookd_dead_letters_total", **labels) == 0
    assert value(before, "webhookd_source_jobs", source="(removed)", state="queued") == 2
    assert running.daemon.journal is not None
    await running.daemon.journal.resume("py")

    async def dead() -> bool:
        samples = await scrape(running)
        return value(samples, "webhookd_dead_letters_total", **labels) == 2

    await poll(dead, timeout_s=20)
    samples = await scrape(running)
    assert value(samples, "webhookd_dead_letters_total", source="*", action="deliver") == 0


async def test_a_dead_letter_of_a_name_a_reload_took_from_the_catch_all_counts_under_it(
    tmp_path: Path, run_daemon: Any
) -> None:
    """A reload that takes the catch-all out: the jobs of the names it took go dead at their
    turn, and their dead letters count under its ``source="*"`` series, there at 0 from the
    start, so an ``increase(...) > 0`` alert sees them die (a series born at its first dead
    letter, already 1, shows no increase)."""
    shop = '[[sources.shop.actions]]\ntype = "log"\n'
    catch_all = (
        '[[sources."*".actions]]\ntype = "forward"\nname = "down"\n'
        'url = "http://127.0.0.1:9/down"\nretry = { max_attempts = 1 }\n'
    )
    reloaded = make_config(tmp_path, shop)
    running = await run_daemon(make_config(tmp_path, shop + catch_all), loader=lambda: reloaded)
    intent = {"headers": {"X-Webhookd": "1"}}
    async with running.http.post(running.admin_url + "/sources/foo/pause", **intent) as r:
        assert r.status == 200
    event_id = await accepted(running, "foo")  # held while foo is paused
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    before = {k: v for k, v in (await scrape(running)).items() if k[0] == DEAD}
    assert value(before, DEAD, source="*", action="down") == 0
    async with running.http.post(running.admin_url + "/sources/foo/resume", **intent) as r:
        assert r.status == 200
    await event_state(running.http, running.admin_url, event_id, "dead")
    after = {k: v for k, v in (await scrape(running)).items() if k[0] == DEAD}
    assert set(after) == set(before)  # no series born at its first dead letter
    assert value(after, DEAD, source="*", action="down") == 1


async def test_two_daemons_in_one_process_keep_separate_metrics(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """Each daemon has its own registry: one daemon's webhooks do not count in the other's."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = await run_daemon(make_config(tmp_path / "a", forward_source("s", target.url)))
    b = await run_daemon(make_config(tmp_path / "b", forward_source("s", target.url)))
    await accepted(a, "s")
    await accepted(a, "s", '{"n": 2}')
    assert value(await scrape(a), "webhookd_intake_requests_total", source="s", status="202") == 2
    assert value(await scrape(b), "webhookd_intake_requests_total", source="s", status="202") == 0


def file_sizes(journal: Path) -> dict[str, int]:
    return {"db": journal.stat().st_size, "wal": Path(f"{journal}-wal").stat().st_size}


async def test_backlog_age_and_lane_gauges_are_read_at_scrape_time(tmp_path: Path) -> None:
    """Queued jobs show as backlog with the oldest one's age; a lane's use and waits show too,
    the journal's files their sizes, and each source whether it is paused."""
    clock = ManualClock()
    cfg = make_config(tmp_path, forward_source("s", "http://127.0.0.1:9/"))
    lane = Lane(LaneConfig(name="openai", rpm=60, tpm=6000, burst_s=2.0), clock=clock)
    await lane.acquire(100, max_wait_s=0)
    # A call reserved 100 and used 20: the refund shows as a counter of its own, and the
    # debited counter never goes down (a drop would read as a reset to rate()).
    lane.settle(await lane.acquire(100, max_wait_s=0), 20)
    async with Journal(cfg.journal.path, clock=clock) as journal:
        await ingest(journal, "s", 3)
        for name in ("gone-a", "gone-b"):  # sources this config no longer has
            await ingest(journal, name, 1)
        await journal.refresh_backlog()
        pool = WorkerPool(config=cfg, journal=journal, actions={}, boot_id="b", clock=clock)
        metrics = Metrics(journal, pool, lanes=lambda: {"openai": lane})
        clock.advance(90)
        body, content_type = await metrics.render()
        # Read at scrape time from the files (no checkpoint runs meanwhile on the manual clock).
        sizes = file_sizes(cfg.journal.path)
        await journal.pause("s")
        paused = parse((await metrics.render())[0].decode())
        # With a catch-all, such names are ones it took: summed under its own name.
        metrics.configure(make_config(tmp_path, '[sources."*"]\n'))
        with_catch_all = parse((await metrics.render())[0].decode())
    samples = parse(body.decode())
    assert sizes["db"] > 0 and sizes["wal"] > 0
    for name, size in sizes.items():
        assert value(samples, "webhookd_journal_bytes", file=name) == size
    assert content_type.startswith("text/plain")
    assert value(samples, "webhookd_backlog_jobs") == 5
    assert value(samples, "webhookd_oldest_queued_age_seconds") == 90
    assert value(samples, "webhookd_source_jobs", source="s", state="queued") == 3
    # A configured source's pause gauge is there at 0 before any pause, 1 during one.
    assert value(samples, "webhookd_source_paused", source="s") == 0
    assert value(paused, "webhookd_source_paused", source="s") == 1
    assert value(samples, "webhookd_source_jobs", source="(removed)", state="queued") == 2
    assert value(with_catch_all, "webhookd_source_jobs", source="*", state="queued") == 2
    assert not [k for k in samples if ("source", "gone-a") in k[1]]
    assert value(samples, "webhookd_lane_admitted_total", lane="openai") == 2
    assert value(samples, "webhookd_lane_tokens_debited_total", lane="openai") == 200
    assert value(samples, "webhookd_lane_tokens_refunded_total", lane="openai") == 80
    assert value(samples, "webhookd_lane_waiting", lane="openai") == 0
    assert value(samples, "webhookd_lane_circuit_open", lane="openai") == 0
    assert ("webhookd_lane_available", (("kind", "tokens"), ("lane", "openai"))) in samples


async def test_intake_counts_and_ack_buckets_match_prometheus_across_scrapes(
    tmp_path: Path,
) -> None:
    """Each request counts once however often /metrics is scraped, and each ack time lands in
    the bucket prometheus_client's own Histogram would put it in (bounds included)."""
    cfg = make_config(tmp_path, forward_source("s", "http://127.0.0.1:9/"))
    async with Journal(cfg.journal.path) as journal:
        pool = WorkerPool(config=cfg, journal=journal, actions={}, boot_id="b")
        metrics = Metrics(journal, pool)
        reference = Histogram("ref", "reference", buckets=ACK_BUCKETS_S, registry=None)
        times_s = [0.0, 0.0005, 0.00051, 0.001, 0.003, 0.5, 2.5, 7.0]
        for t in times_s[:4]:
            metrics.observe_intake("s", 202, t)
            reference.observe(t)
        metrics.observe_intake("", 404, 0.0)
        first = parse((await metrics.render())[0].decode())
        for t in times_s[4:]:
            metrics.observe_intake("s", 202, t)
            reference.observe(t)
        second = parse((await metrics.render())[0].decode())
        third = parse((await metrics.render())[0].decode())
    intake = "webhookd_intake_requests_total"
    assert value(first, intake, source="s", status="202") == 4
    assert value(second, intake, source="s", status="202") == 8
    assert value(third, intake, source="s", status="202") == 8
    assert value(third, intake, source="(none)", status="404") == 1
    expected = {s.labels["le"]: s.value for s in reference.collect()[0].samples if "le" in s.labels}
    for le, count in expected.items():
        assert value(third, "webhookd_ack_seconds_bucket", le=le) == count
    assert value(third, "webhookd_ack_seconds_count") == len(times_s)
    assert abs(value(third, "webhookd_ack_seconds_sum") - sum(times_s)) < 1e-9


async def test_a_postgresql_outage_is_a_503_on_stats_and_journal_up_0_on_metrics(
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
    pg_url: str,
    db_outage: DatabaseOutage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the database is down a dashboard polling ``/stats`` gets 503s with Retry-After, not
    500s that each log a traceback; ``/metrics`` still serves this process's own counters (what
    an outage is watched by) with ``webhookd_journal_up 0``; and the dispatcher, failing every
    sweep, says so once."""
    caplog.set_level(logging.DEBUG, logger="webhookd")
    cfg = make_config(
        tmp_path,
        forward_source("shop", target.url + "/shop"),
        journal_url=pg_url,
        journal="lease_s = 0.6",
        workers="sweep_interval_s = 0.05",
    )
    running = await run_daemon(cfg)
    await event_state(running.http, running.admin_url, await accepted(running, "shop"), "done")
    assert value(await scrape(running), "webhookd_journal_up") == 1

    await db_outage.begin()
    paused = "dispatch paused until the journal answers again"

    async def sweeps_failed(n: int) -> bool:
        return sum(paused in r.getMessage() for r in caplog.records) >= n

    await poll(lambda: sweeps_failed(5), timeout_s=30)
    async with running.http.get(running.admin_url + "/stats") as r:
        assert (r.status, r.headers["Retry-After"]) == (503, "5")
        assert "journal" in (await r.json())["error"]
    status, _ = await running.post("/hooks/shop", '{"in": "the outage"}')
    assert status == 503
    samples = await scrape(running)
    assert value(samples, "webhookd_journal_up") == 0
    assert value(samples, "webhookd_intake_requests_total", source="shop", status="202") == 1
    # Refused as the journal failed it, or as its commit outlasted ack_timeout_s.
    refused = "webhookd_intake_unavailable_total"
    assert (
        value(samples, refused, reason="journal_unavailable")
        + value(samples, refused, reason="commit_timeout")
        == 1
    )
    await db_outage.end()

    async def journal_up() -> bool:
        return value(await scrape(running), "webhookd_journal_up") == 1

    await poll(journal_up, timeout_s=30)
    loud = [r.getMessage() for r in caplog.records if paused in r.getMessage()]
    warned = [
        r for r in caplog.records if paused in r.getMessage() and r.levelno >= logging.WARNING
    ]
    assert len(warned) == 1 and len(loud) >= 5
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]


def garble_past_first_page(db: Path) -> None:
    """A failing disk under a SQLite file: every page past the first reads back as garbage."""
    with contextlib.closing(sqlite3.connect(db)) as conn:  # everything into the main file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(os.urandom(os.path.getsize(db) - 4096))


async def test_an_unreadable_sqlite_journal_is_a_503_on_stats_and_journal_up_0_on_metrics(
    tmp_path: Path, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A SQLite journal whose pages read back as garbage (a failing disk) is an outage as a
    PostgreSQL one is: ``/metrics`` still serves this process's own counters with
    ``webhookd_journal_up 0``, and ``/stats`` is a 503 with Retry-After, not a 500 with a
    logged traceback."""
    cfg = make_config(tmp_path, '[[sources.shop.actions]]\ntype = "log"')
    running = await run_daemon(cfg)
    for n in range(20):  # pages enough past the first to corrupt
        last = await accepted(running, "shop", f'{{"n": {n}}}')
    await event_state(running.http, running.admin_url, last, "done")
    assert value(await scrape(running), "webhookd_journal_up") == 1

    assert cfg.journal.path is not None
    garble_past_first_page(cfg.journal.path)

    samples = await scrape(running)
    assert value(samples, "webhookd_journal_up") == 0
    assert value(samples, "webhookd_intake_requests_total", source="shop", status="202") == 20
    async with running.http.get(running.admin_url + "/stats") as r:
        assert (r.status, r.headers.get("Retry-After")) == (503, "5")
        assert "journal read failed" in (await r.json())["error"]
    assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
