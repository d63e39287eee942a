"""Alerts: dead jobs and an old backlog become rate-limited summary events of the ``webhookd``
source, delivered by a forward job — over a real journal, a real worker pool and a real loopback
target, on a manual clock (no waiting out the interval)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Target, jobs_for, make_config, new_event
from ops_support import writer_held

import webhookd
from webhookd import actions as action_registry
from webhookd.actions.base import Outcome, Resources
from webhookd.alert_journal import JOURNAL_BACK_AFTER_S, JOURNAL_CHECK_S
from webhookd.alerts import EVENTS_CAP, FAILING_STALE_S, INGEST_RETRY_S, Alerter
from webhookd.clock import ManualClock
from webhookd.config import ALERT_ACTION, ALERT_SOURCE, Config, loads
from webhookd.errors import ConfigError, JournalUnavailable
from webhookd.journal import Claimed, Finished, Journal, NewEvent
from webhookd.models import Job, JobState
from webhookd.stats import journal_problems
from webhookd.workers import WorkerPool


@dataclass
class Rig:
    cfg: Config
    journal: Journal
    pool: WorkerPool
    alerter: Alerter
    clock: ManualClock
    target: Target

    async def ingest(self, source: str = "shop") -> str:
        item = NewEvent(new_event(source, self.clock.time()), jobs_for(self.cfg.sources[source]))
        await self.journal.ingest(item)
        return item.event.id

    def alerts_received(self) -> list[dict[str, Any]]:
        """The alert bodies the sink got, in order."""
        return [json.loads(s.body) for s in self.target.seen if s.path == "/alerts"]

    async def alert_doc(self, event_id: str) -> dict[str, Any]:
        detail = await self.journal.get_event(event_id)
        assert detail.event.source == ALERT_SOURCE
        doc: dict[str, Any] = json.loads(detail.event.body)
        return doc


MakeRig = Callable[[str], Awaitable[Rig]]


def shop_config(tmp_path: Path, target: Target, alerts: str = "") -> Config:
    """One source forwarding to ``target``'s /shop, alerts to its /alerts, plus ``alerts``."""
    return make_config(
        tmp_path,
        f"""
[sources.shop]
[[sources.shop.actions]]
type = "forward"
url = "{target.url}/shop"

[alerts]
url = "{target.url}/alerts"
{alerts}
""",
    )


@pytest.fixture
async def make_rig(tmp_path: Path, target: Target) -> AsyncIterator[MakeRig]:
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def start(alerts: str) -> Rig:
            if "failing_s" not in alerts:  # the failing alerts' own tests turn them on
                alerts += "\nfailing_s = 0"
            cfg = shop_config(tmp_path, target, alerts)
            clock = ManualClock()
            journal = await stack.enter_async_context(Journal(cfg.journal.path, clock=clock))
            actions = action_registry.build(Resources(config=cfg, http=http))
            pool = WorkerPool(
                config=cfg, journal=journal, actions=actions, boot_id="boot_test", clock=clock
            )
            assert cfg.alerts is not None
            alerter = Alerter(cfg.alerts, journal, clock=clock)
            pool.on_finish.append(alerter.observe)
            return Rig(cfg, journal, pool, alerter, clock, target)

        yield start


async def test_five_dead_jobs_make_one_alert_now_and_one_summary_after_the_interval(
    make_rig: MakeRig,
) -> None:
    """The first dead job is told at once; the next four wait out min_interval_s, then come as
    one alert counting all four, and the sink gets both bodies."""
    rig = await make_rig("min_interval_s = 300")
    rig.target.statuses = [400]  # the first delivery is refused: dead at once
    first = await rig.ingest()
    await rig.pool.run_until_idle()
    [alert1] = await rig.alerter.tick()
    assert await rig.alert_doc(alert1) == {
        "text": f"webhookd: 1 job(s) went dead (shop: 1): {first}; last error: shop/forward:"
        f" {rig.target.url}/shop answered 400; `webhookd replay --dead` runs them again",
        "kind": "dead",
        "count": 1,
        "events": [first],
    }

    rig.target.statuses = [200] + [400] * 4  # the alert is delivered, the next four refused
    await rig.pool.run_until_idle()
    rest = [await rig.ingest() for _ in range(4)]
    await rig.pool.run_until_idle()
    assert await rig.alerter.tick() == []  # within the interval: held back
    assert rig.alerter.next_due_s() == pytest.approx(300.0)
    rig.clock.advance(299.0)
    assert await rig.alerter.tick() == []
    rig.clock.advance(1.0)
    [alert2] = await rig.alerter.tick()
    doc = await rig.alert_doc(alert2)
    assert (doc["kind"], doc["count"], sorted(doc["events"])) == ("dead", 4, sorted(rest))
    await rig.pool.run_until_idle()

    assert [(a["kind"], a["count"]) for a in rig.alerts_received()] == [("dead", 1), ("dead", 4)]
    assert rig.alerter.next_due_s() is None  # nothing more to tell


async def test_dead_jobs_held_back_by_the_interval_are_journaled_at_shutdown(
    make_rig: MakeRig,
) -> None:
    """Dead jobs still waiting out min_interval_s when the daemon stops are journaled as an
    alert then, so the next start sends it rather than forgetting them."""
    rig = await make_rig("")
    rig.target.default_status = 400
    await rig.ingest()
    await rig.pool.run_until_idle()
    await rig.alerter.tick()
    held = await rig.ingest()
    await rig.pool.run_until_idle()
    assert await rig.alerter.tick() == []
    [alert] = await rig.alerter.flush()
    doc = await rig.alert_doc(alert)
    assert (doc["count"], doc["events"]) == (1, [held])
    assert await rig.alerter.flush() == []


async def test_a_start_after_a_kill_tells_the_dead_jobs_the_last_run_did_not(
    make_rig: MakeRig,
) -> None:
    """Four jobs went dead within min_interval_s of the first dead alert, and the process was
    killed (no drain, no flush): they went untold for good, and the next start's first alert
    of each kind ignored the interval. A start now tells them, when the interval counted from
    the last run's alert is up."""
    rig = await make_rig("min_interval_s = 300")
    rig.target.default_status = 400
    await rig.ingest()
    await rig.pool.run_until_idle()
    [first] = await rig.alerter.tick()
    rig.clock.advance(1.0)
    untold = [await rig.ingest() for _ in range(4)]
    await rig.pool.run_until_idle()
    assert await rig.alerter.tick() == []  # held back by the interval, then the kill
    rig.clock.advance(99.0)

    started_at = rig.clock.time()
    again = Alerter(rig.cfg.alerts, rig.journal, clock=rig.clock)
    await again.restore(started_at)
    assert await again.tick() == []  # the interval runs from the last run's alert
    assert again.next_due_s() == pytest.approx(200.0)
    rig.clock.advance(200.0)
    [told] = await again.tick()
    doc = await rig.alert_doc(told)
    assert (doc["kind"], doc["count"], sorted(doc["events"])) == ("dead", 4, sorted(untold))
    assert doc["text"].startswith("webhookd: 4 job(s) went dead (shop: 4)")
    assert first not in doc["events"]

    later = Alerter(rig.cfg.alerts, rig.journal, clock=rig.clock)
    await later.restore(rig.clock.time())  # everything told: nothing to tell again
    assert later.next_due_s() is None


async def test_an_alert_lists_at_most_twenty_events_and_says_how_many_more(
    make_rig: MakeRig,
) -> None:
    """With 25 dead jobs, the body names the first 20 events and the text says "and 5 more"."""
    rig = await make_rig("")
    rig.target.default_status = 400
    ids = [await rig.ingest() for _ in range(25)]
    await rig.pool.run_until_idle()
    [alert] = await rig.alerter.tick()
    doc = await rig.alert_doc(alert)
    assert doc["count"] == 25
    # Jobs run side by side, so which 20 die first is theirs to decide.
    assert len(set(doc["events"])) == EVENTS_CAP and set(doc["events"]) <= set(ids)
    assert " and 5 more; last error: shop/forward: " in doc["text"]


def reject_order(event: webhookd.Event) -> None:
    """A handler refusing an order, quoting the sender's order field in its error."""
    raise webhookd.Reject(f"unknown order {event.json()['order']}")


async def test_a_senders_words_in_an_alert_are_quoted_on_one_line_not_obeyed(
    tmp_path: Path, target: Target
) -> None:
    """An error quoting what a sender posted (a mention of the whole channel, a link under a
    label of its choosing, a line break) reaches Slack or Mattermost in the dead and failing
    alerts' text with ``&``, ``<`` and ``>`` escaped as Slack asks, on one line."""
    cfg = make_config(
        tmp_path,
        f"""
[sources.shop]
[[sources.shop.actions]]
type = "python"
handler = "test_alerts:reject_order"

[alerts]
url = "{target.url}/alerts"
failing_s = 60
min_interval_s = 0
""",
    )
    order = "<!channel> <https://evil.example/login|Open the runbook> & co\nAll clear"
    body = json.dumps({"order": order}).encode()
    clock = ManualClock()
    async with aiohttp.ClientSession() as http, Journal(cfg.journal.path, clock=clock) as journal:
        acts = action_registry.build(Resources(config=cfg, http=http))
        pool = WorkerPool(config=cfg, journal=journal, actions=acts, boot_id="b", clock=clock)
        assert cfg.alerts is not None
        alerter = Alerter(cfg.alerts, journal, clock=clock)
        pool.on_finish.append(alerter.observe)
        for _ in range(2):  # dead at once, twice 60 s apart: failing for failing_s too
            item = NewEvent(new_event("shop", clock.time(), body), jobs_for(cfg.sources["shop"]))
            await journal.ingest(item)
            await pool.run_until_idle()
            clock.advance(60.0)
        assert len(await alerter.tick()) == 2
        await pool.run_until_idle()  # the alerts are delivered
    sent = {doc["kind"]: doc["text"] for doc in (json.loads(s.body) for s in target.seen)}
    quoted = (
        "unknown order &lt;!channel&gt; &lt;https://evil.example/login|Open the runbook&gt;"
        " &amp; co\\nAll clear"
    )
    assert sent.keys() == {"dead", "failing"}
    assert f"last error: shop/python: {quoted}; `webhookd replay" in sent["dead"]
    assert sent["failing"].endswith(f"last: {quoted})")
    for text in sent.values():
        assert "<" not in text and ">" not in text and "\n" not in text


async def test_the_alerts_own_dead_job_never_makes_another_alert(make_rig: MakeRig) -> None:
    """An alert URL that refuses the alert leaves a dead alert job, and no alert about it."""
    rig = await make_rig("min_interval_s = 0")
    rig.target.default_status = 400  # the shop target and the alert URL both refuse
    await rig.ingest()
    await rig.pool.run_until_idle()
    [alert] = await rig.alerter.tick()
    await rig.pool.run_until_idle()  # the alert is delivered, refused: dead
    [job] = (await rig.journal.get_event(alert)).jobs
    assert str(job.state) == "dead"
    assert rig.alerter.next_due_s() is None
    assert await rig.alerter.tick() == []


async def test_on_dead_false_makes_no_dead_alerts(make_rig: MakeRig) -> None:
    """With on_dead = false a dead job is not alerted on."""
    rig = await make_rig("on_dead = false")
    rig.target.default_status = 400
    await rig.ingest()
    await rig.pool.run_until_idle()
    assert await rig.alerter.tick() == []
    assert await rig.journal.list_events(source=ALERT_SOURCE) == []


async def test_a_reconfigured_alerter_follows_the_reloaded_alerts_table(make_rig: MakeRig) -> None:
    """A reload's ``[alerts]`` (``reconfigure``): a shorter interval frees a held summary
    sooner; without ``[alerts]`` the held dead jobs are dropped and later ones not counted; with
    ``[alerts]`` again, counting starts over."""
    rig = await make_rig("min_interval_s = 300")
    assert rig.cfg.alerts is not None
    rig.target.default_status = 400

    async def dead_job() -> str:
        event_id = await rig.ingest()
        await rig.pool.run_until_idle()
        return event_id

    await dead_job()
    assert len(await rig.alerter.tick()) == 1
    held = await dead_job()
    assert await rig.alerter.tick() == []  # within the 300 s
    rig.alerter.reconfigure(dataclasses.replace(rig.cfg.alerts, min_interval_s=60))
    assert rig.alerter.next_due_s() == pytest.approx(60.0)
    rig.clock.advance(60.0)
    [alert] = await rig.alerter.tick()
    assert (await rig.alert_doc(alert))["events"] == [held]

    await dead_job()
    rig.alerter.reconfigure(None)
    await dead_job()
    rig.clock.advance(60.0)
    assert (rig.alerter.next_due_s(), await rig.alerter.tick()) == (None, [])

    rig.alerter.reconfigure(rig.cfg.alerts)
    assert rig.alerter.next_due_s() is None  # nothing counted while it was off
    last = await dead_job()
    assert rig.alerter.next_due_s() == pytest.approx(240.0)  # 300 s after the last alert
    rig.clock.advance(240.0)
    [alert] = await rig.alerter.tick()
    doc = await rig.alert_doc(alert)
    assert (doc["count"], doc["events"]) == (1, [last])


async def test_a_job_waiting_out_a_retrys_backoff_is_no_backlog_until_it_falls_due(
    make_rig: MakeRig,
) -> None:
    """A job whose target failed waits for its retry on purpose: that is the dead alert's to
    tell, not a backlog alert every interval for the twelve hours of its retries (nor a rising
    oldest-queued age). Once due and left waiting, it is backlog from when it fell due."""
    rig = await make_rig("backlog_age_s = 4\nmin_interval_s = 300")
    rig.target.default_status = 503
    event_id = await rig.ingest()
    assert await rig.pool.run_until_idle() is not None  # failed once, its retry scheduled
    [job] = (await rig.journal.get_event(event_id)).jobs
    # The forward's first backoff: 10 s, less up to half of it (jitter).
    assert job.state == "queued" and job.run_at >= rig.clock.time() + 5
    rig.clock.advance(job.run_at - rig.clock.time() - 0.5)  # received over 4 s ago, not due
    assert await rig.alerter.tick() == []
    assert (await rig.journal.counts()).oldest_due_at is None
    await rig.journal.pause("shop")  # it falls due, and nothing runs it
    rig.clock.advance(0.5 + 5)
    [alert] = await rig.alerter.tick()
    doc = await rig.alert_doc(alert)
    assert (doc["count"], doc["events"]) == (1, [event_id])
    assert "1 job(s) queued, one due for 5s (shop: 1 paused)" in doc["text"]
    assert (await rig.journal.counts()).oldest_due_at == job.run_at


async def test_a_journal_read_failing_under_the_alerts_task_does_not_end_it(
    make_rig: MakeRig,
) -> None:
    """The backlog check reads the journal; a read that fails (a PostgreSQL outage) is logged
    and tried again at the next check. It ended the alerts task, and with it the daemon,
    which rides such outages out everywhere else."""
    rig = await make_rig("backlog_age_s = 4\nmin_interval_s = 300")
    await rig.journal.pause("shop")
    waiting = await rig.ingest()
    rig.clock.advance(5.0)
    failed, read = asyncio.Event(), asyncio.Event()
    real = rig.journal.lane_backlog

    async def flaky() -> Any:
        if not failed.is_set():
            failed.set()
            raise JournalUnavailable("journal read failed: connection refused")
        read.set()
        return await real()

    committed = asyncio.Event()
    rig.journal.on_commit = lambda ready: committed.set()
    rig.journal.lane_backlog = flaky  # type: ignore[method-assign]
    task = asyncio.create_task(rig.alerter.run())
    try:
        await asyncio.wait_for(failed.wait(), 10)
        rig.clock.advance(2.0)  # the next backlog check (backlog_age_s / 2)
        rig.alerter._wake.set()
        await asyncio.wait_for(read.wait(), 10)
        await asyncio.wait_for(committed.wait(), 10)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    [alert] = [e.id for e in await rig.journal.list_events(source=ALERT_SOURCE)]
    assert (await rig.alert_doc(alert))["events"] == [waiting]


async def test_only_the_node_that_leads_tells_the_clusters_backlog(make_rig: MakeRig) -> None:
    """The backlog is the cluster's, so only the leading node alerts on it: every node did,
    one alert per node per interval."""
    rig = await make_rig("backlog_age_s = 4\nmin_interval_s = 300")
    await rig.journal.pause("shop")
    await rig.ingest()
    rig.clock.advance(5.0)
    rig.journal.leads = lambda: False  # type: ignore[method-assign]
    assert await rig.alerter.tick() == []
    assert rig.alerter.next_due_s() == 2.0  # the next check, not at once (no busy loop)
    rig.journal.leads = lambda: True  # type: ignore[method-assign]
    rig.clock.advance(2.0)
    assert len(await rig.alerter.tick()) == 1


async def test_a_backlog_older_than_backlog_age_s_is_alerted_once_per_interval(
    make_rig: MakeRig,
) -> None:
    """A paused source's queued job older than backlog_age_s brings a "backlog" alert naming its
    event; while it stays, the next comes only after min_interval_s."""
    rig = await make_rig("backlog_age_s = 60\nmin_interval_s = 300")
    await rig.journal.pause("shop")
    waiting = await rig.ingest()
    assert await rig.alerter.tick() == []  # just received: not old
    rig.clock.advance(60.0)
    assert await rig.alerter.tick() == []  # not older than 60 s yet
    rig.clock.advance(30.0)
    [alert] = await rig.alerter.tick()
    doc = await rig.alert_doc(alert)
    assert (doc["kind"], doc["count"], doc["events"]) == ("backlog", 1, [waiting])
    assert "1 job(s) queued, one due for 90s (shop: 1 paused)" in doc["text"]
    # The alert itself is queued now (nothing ran it): it is not counted as backlog.
    rig.clock.advance(299.0)
    assert await rig.alerter.tick() == []
    rig.clock.advance(1.0)
    [again] = await rig.alerter.tick()
    assert (await rig.alert_doc(again))["count"] == 1
    await rig.pool.run_until_idle()  # the paused source waits; the alerts go out
    assert [a["kind"] for a in rig.alerts_received()] == ["backlog", "backlog"]


async def test_a_backlog_told_old_is_told_when_it_is_back_under_the_threshold(
    make_rig: MakeRig, caplog: pytest.LogCaptureFixture
) -> None:
    """Once an old backlog has been told, the first check that finds none brings a "recovered"
    alert saying so: an on-call reader is not left to guess whether it cleared. The log says
    the backlog as a warning and its recovery at info."""
    caplog.set_level(logging.INFO, logger="webhookd.alerts")
    rig = await make_rig("backlog_age_s = 60\nmin_interval_s = 0")
    await rig.journal.pause("shop")
    await rig.ingest()
    rig.clock.advance(90.0)
    [alert] = await rig.alerter.tick()
    assert (await rig.alert_doc(alert))["kind"] == "backlog"
    await rig.journal.resume("shop")
    await rig.pool.run_until_idle()  # the shop job and the alert are delivered
    rig.clock.advance(30.0)
    [cleared] = await rig.alerter.tick()
    assert await rig.alert_doc(cleared) == {
        "text": "webhookd: recovered: no queued job due longer than 60s any more",
        "kind": "recovered",
        "count": 0,
        "events": [],
    }
    rig.clock.advance(30.0)
    assert await rig.alerter.tick() == []  # told once
    told = [
        (r.levelno, r.getMessage().split()[1])
        for r in caplog.records
        if r.name == "webhookd.alerts" and r.getMessage().startswith("alert kind=")
    ]
    assert told == [(logging.WARNING, "kind=backlog"), (logging.INFO, "kind=recovered")]


async def test_an_action_failing_for_failing_s_is_told_each_interval_then_its_recovery(
    make_rig: MakeRig,
) -> None:
    """A target answering 500 under a retry policy that takes hours to go dead: no job dies,
    so no dead alert would come for hours. Once an attempt fails failing_s after the first
    failure with none done between, a "failing" alert names the action, its attempts and its
    last error; it is told again each min_interval_s while attempts keep failing, not when
    nothing was tried meanwhile; the first attempt done after that brings one "recovered"
    alert with how long it failed."""
    rig = await make_rig("failing_s = 120\nmin_interval_s = 300")
    rig.target.default_status = 500
    await rig.ingest()
    await rig.pool.run_until_idle()  # attempt 1 fails; its retry waits out a backoff
    assert await rig.alerter.tick() == []
    assert rig.alerter.next_due_s() is None  # one failure says nothing of the next minutes
    rig.clock.advance(119.0)
    await rig.pool.run_until_idle()  # the retry fails too, 119 s in
    assert await rig.alerter.tick() == []
    rig.clock.advance(1.0)
    await rig.ingest()
    await rig.pool.run_until_idle()  # another webhook's attempt fails, 120 s in
    [alert] = await rig.alerter.tick()
    doc = await rig.alert_doc(alert)
    assert (doc["kind"], doc["count"], doc["events"]) == ("failing", 1, [])
    assert doc["text"] == (
        "webhookd: shop/forward failing for 2m (3 attempt(s), none done; last:"
        f" {rig.target.url}/shop answered 500)"
    )
    rig.clock.advance(300.0)
    await rig.pool.run_until_idle()  # the retries due fail again (the alert is sent)
    [again] = await rig.alerter.tick()
    assert "shop/forward failing for 7m (5 attempt(s)" in (await rig.alert_doc(again))["text"]
    rig.clock.advance(300.0)
    assert await rig.alerter.tick() == []  # nothing tried since: not told as if it still failed

    rig.target.default_status = 200
    rig.clock.advance(3600.0)
    await rig.pool.run_until_idle()
    [recovered] = await rig.alerter.tick()
    assert await rig.alert_doc(recovered) == {
        "text": "webhookd: recovered: shop/forward done again after 72m failing",
        "kind": "recovered",
        "count": 1,
        "events": [],
    }
    rig.clock.advance(600.0)
    assert await rig.alerter.tick() == []
    assert rig.alerter.next_due_s() is None


async def test_a_catch_alls_names_fail_as_one_action_and_one_unwatched_is_forgotten(
    make_rig: MakeRig,
) -> None:
    """The names a catch-all took (a sender's choice) are followed as its one action, so 300 of
    them cannot fill the table and hide a configured source's failures; an action nothing
    has tried for FAILING_STALE_S is no longer followed."""
    rig = await make_rig("failing_s = 60\nmin_interval_s = 0")
    catch_all = loads('[sources.shop]\n[sources."*"]\n')  # shop, and "*" for any other name
    rig.alerter.reconfigure(rig.alerter.config, catch_all.counted_as)
    for n in range(300):
        _attempt(rig, "retry", source=f"name{n}")
    rig.clock.advance(60.0)
    _attempt(rig, "retry", source="name300")
    _attempt(rig, "retry")
    rig.clock.advance(60.0)
    _attempt(rig, "retry")
    [alert] = await rig.alerter.tick()
    doc = await rig.alert_doc(alert)
    assert doc["count"] == 2
    assert doc["text"].startswith("webhookd: */forward failing for 2m (301 attempt(s)")
    assert "; shop/forward failing for 60s (2 attempt(s)" in doc["text"]
    rig.clock.advance(FAILING_STALE_S + 1)
    _attempt(rig, "retry")  # shop fails on, alone: the catch-all's entry is dropped
    rig.clock.advance(60.0)
    _attempt(rig, "retry")
    [later] = await rig.alerter.tick()
    assert (await rig.alert_doc(later))["count"] == 1


async def test_an_alert_the_journal_cannot_take_is_logged_once_per_outage(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full or read-only disk refuses the alert every INGEST_RETRY_S: that is said once at
    ERROR (not every 5 s for the outage's length), and once more when alerts are journaled
    again; the dead job is told then."""
    rig = await make_rig("min_interval_s = 0")
    rig.target.default_status = 400
    first = await rig.ingest()
    await rig.pool.run_until_idle()
    ingest = rig.journal.ingest

    async def refused(item: NewEvent) -> None:
        raise JournalUnavailable("journal write failed: database or disk is full")

    monkeypatch.setattr(rig.journal, "ingest", refused)
    caplog.set_level(logging.DEBUG, logger="webhookd.alerts")
    for _ in range(3):
        assert await rig.alerter.tick() == []
        rig.clock.advance(INGEST_RETRY_S)
    monkeypatch.setattr(rig.journal, "ingest", ingest)
    [alert] = await rig.alerter.tick()
    assert (await rig.alert_doc(alert))["events"] == [first]
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "journaled" in r.getMessage()]
    refusal = "alert kind=dead not journaled, will try again: journal write failed: database or"
    assert [level for level, _ in said] == ["ERROR", "DEBUG", "DEBUG", "INFO"]
    assert said[0][1].startswith(refusal) and said[-1][1] == "alerts are journaled again"


def _attempt(rig: Rig, kind: str, source: str = "shop", **detail: Any) -> None:
    """Hand the alerter one attempt of ``source``'s forward that ended as ``kind``."""
    event = new_event(source, rig.clock.time())
    [new_job] = jobs_for(rig.cfg.sources["shop"])
    job = Job(new_job.id, event.id, new_job.action, "forward", JobState.RUNNING, 1, 5, 0.0)
    outcome = Outcome(kind, error=None if kind == "done" else f"{kind} here", detail=detail)  # type: ignore[arg-type]
    state = {"done": JobState.DONE, "dead": JobState.DEAD}.get(kind, JobState.QUEUED)
    finished = Finished(job.id, 1, state, 0.0, 0.0, kind, error=outcome.error)
    rig.alerter.observe(Claimed(job, event, 0), outcome, finished)


async def test_a_wait_the_lane_planned_is_neither_a_failure_nor_a_success(
    make_rig: MakeRig,
) -> None:
    """A lane's own pace (``paced``: its RPM, a pause, an open circuit's refusals) neither
    starts nor ends a run of failures; a wait it did not plan (a 429, insufficient_quota)
    is a failure, so a lane out of quota, whose jobs never go dead, is told: its circuit's
    probe, a call a minute, fails again."""
    rig = await make_rig("failing_s = 60\nmin_interval_s = 0")
    _attempt(rig, "wait", paced=True)
    assert rig.alerter.next_due_s() is None
    _attempt(rig, "wait", status=429, code="insufficient_quota")
    for _ in range(3):
        _attempt(rig, "wait", paced=True)  # the circuit, open, refusing calls
    rig.clock.advance(60.0)
    assert await rig.alerter.tick() == []
    _attempt(rig, "wait", status=429, code="insufficient_quota")  # the probe
    [alert] = await rig.alerter.tick()
    assert "last: wait here" in (await rig.alert_doc(alert))["text"]
    _attempt(rig, "done")
    [recovered] = await rig.alerter.tick()
    assert (await rig.alert_doc(recovered))["kind"] == "recovered"


def _during_next_ingest(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, then: Callable[[], None], refused: bool = False
) -> None:
    """Run ``then`` once the next ingest is submitted and before it is committed (or, with
    ``refused``, before the journal refuses it): a worker finishing an attempt while an alert
    is being journaled."""
    submit = rig.journal.submit_ingest
    fired: list[bool] = []

    async def ingest(item: NewEvent) -> Any:
        if fired:
            return await submit(item)
        fired.append(True)
        future = None if refused else submit(item)
        then()
        if future is None:
            raise JournalUnavailable("journal write failed: database or disk is full")
        return await future

    monkeypatch.setattr(rig.journal, "ingest", ingest)


async def test_a_recovery_observed_while_a_recovered_alert_is_journaled_is_told_next(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two actions told failing; one is done again, and while its "recovered" alert is being
    committed the other is too: that one is told by the next "recovered" alert, not dropped
    with the first's."""
    rig = await make_rig("failing_s = 60\nmin_interval_s = 0")
    for _ in range(2):
        for source in ("a", "b"):
            _attempt(rig, "retry", source=source)
        rig.clock.advance(60.0)
    [failing] = await rig.alerter.tick()
    assert (await rig.alert_doc(failing))["count"] == 2
    _attempt(rig, "done", source="a")
    _during_next_ingest(rig, monkeypatch, lambda: _attempt(rig, "done", source="b"))
    [first] = await rig.alerter.tick()
    assert (await rig.alert_doc(first))["text"] == (
        "webhookd: recovered: a/forward done again after 2m failing"
    )
    [second] = await rig.alerter.tick()
    assert (await rig.alert_doc(second))["text"] == (
        "webhookd: recovered: b/forward done again after 2m failing"
    )
    assert rig.alerter.next_due_s() is None


async def test_an_action_done_while_its_failing_alert_is_journaled_is_told_recovered(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An action done again while the "failing" alert naming it is being committed: the alert
    goes out, so its recovery is told too (by the same tick, as it is due)."""
    rig = await make_rig("failing_s = 60\nmin_interval_s = 0")
    _attempt(rig, "retry")
    rig.clock.advance(60.0)
    _attempt(rig, "retry")
    _during_next_ingest(rig, monkeypatch, lambda: _attempt(rig, "done"))
    [failing, recovered] = await rig.alerter.tick()
    assert (await rig.alert_doc(failing))["kind"] == "failing"
    assert (await rig.alert_doc(recovered))["text"] == (
        "webhookd: recovered: shop/forward done again after 60s failing"
    )
    assert rig.alerter.next_due_s() is None


async def test_a_failing_alert_the_journal_refuses_is_told_at_the_next_try(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing alert not journaled leaves its actions untold: told at the next try, with the
    attempts made meanwhile; and one done meanwhile, never told failing, is not told recovered."""
    rig = await make_rig("failing_s = 60\nmin_interval_s = 0")
    for source in ("a", "b"):
        _attempt(rig, "retry", source=source)
    rig.clock.advance(60.0)

    def meanwhile() -> None:
        _attempt(rig, "retry", source="a")
        _attempt(rig, "done", source="b")

    for source in ("a", "b"):
        _attempt(rig, "retry", source=source)
    _during_next_ingest(rig, monkeypatch, meanwhile, refused=True)
    assert await rig.alerter.tick() == []
    rig.clock.advance(INGEST_RETRY_S)
    [failing] = await rig.alerter.tick()
    doc = await rig.alert_doc(failing)
    assert (doc["count"], doc["text"]) == (
        1,
        "webhookd: a/forward failing for 65s (3 attempt(s), none done; last: retry here)",
    )
    assert rig.alerter.next_due_s() is None
    assert await rig.alerter.tick() == []


def test_alerts_config_defaults_and_the_forward_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """[alerts] needs only url (env: allowed); the rest default, and its job retries like a
    forward; without [alerts] there is no alert source."""
    monkeypatch.setenv("ALERT_URL", "https://hooks.example.com/services/T0/B0/abc")
    cfg = loads('[alerts]\nurl = "env:ALERT_URL"', kinds=action_registry.kind_defaults)
    assert cfg.alerts is not None
    assert cfg.alerts.url.reveal().endswith("/abc")
    assert (cfg.alerts.on_dead, cfg.alerts.backlog_age_s, cfg.alerts.min_interval_s) == (
        True,
        None,
        300.0,
    )
    source = cfg.source_for(ALERT_SOURCE)
    assert source is cfg.alerts.source and ALERT_SOURCE not in cfg.sources
    [action] = source.actions
    assert action.retry == action_registry.kind("forward", "type").DEFAULTS.retry
    assert "abc" not in repr(cfg)
    action_registry.validate(cfg)
    assert loads("").alerts is None
    assert loads('[sources."*"]').source_for(ALERT_SOURCE) is None  # never the catch-all


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[sources.webhookd]", "sources.webhookd", "reserved"),
        ("[alerts]\non_dead = true", "alerts.url", "is required"),
        ('[alerts]\nurl = "hooks.example.com/s3cr3t"', "alerts.url", "must be an http(s) URL"),
        ('[alerts]\nurl = "http://u:s3cr3t@[bad/x"', "alerts.url", "must be an http(s) URL"),
        ('[alerts]\nurl = "https://x.example"\nmin_interval_s = -1', "alerts.min_interval_s", ""),
        ('[alerts]\nurl = "https://x.example"\nbacklog_age_s = 0', "alerts.backlog_age_s", ""),
        ('[alerts]\nurl = "https://x.example"\ncolour = 1', "alerts.colour", "unknown key"),
        (
            '[alerts]\nurl = "https://x.example"\nretry = { max_attempts = 0 }',
            "alerts.retry.max_attempts",
            "",
        ),
        ('[alerts]\nurl = "env:UNSET_ALERT_URL"', "alerts.url", "UNSET_ALERT_URL"),
    ],
)
def test_bad_alerts_config_names_the_key(text: str, key: str, message: str) -> None:
    """Each mistake in [alerts] is one error naming its dotted key, never showing the URL."""
    with pytest.raises(ConfigError) as caught:
        loads(text)
    assert caught.value.key == key
    assert message in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


async def test_a_poison_pill_found_at_start_is_alerted_and_counted_as_a_dead_letter(
    tmp_path: Path, target: Target, run_daemon: Callable[..., Any]
) -> None:
    """A job interrupted for the third time goes to dead when the daemon starts, without a
    worker ever seeing it end: it is still a dead job to the alerts and to
    ``webhookd_dead_letters_total``, and it is never run."""
    cfg = shop_config(tmp_path, target)
    item = NewEvent(new_event("shop", time.time()), jobs_for(cfg.sources["shop"]))
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
        [pill] = item.jobs
        for boot in ("boot_a", "boot_b", "boot_c"):
            await journal.claim([pill.id], boot)
            if boot != "boot_c":  # boot_c is still "running" it when the daemon starts
                await journal.recover(f"{boot}_next", cfg.workers.max_recoveries)

    running = await run_daemon(cfg)
    await target.wait_for(lambda t: any(s.path == "/alerts" for s in t.seen))
    [alert] = [json.loads(s.body) for s in target.seen if s.path == "/alerts"]
    assert (alert["kind"], alert["count"], alert["events"]) == ("dead", 1, [item.event.id])
    async with running.http.get(running.admin_url + "/metrics") as r:
        metrics = await r.text()
    assert f'webhookd_dead_letters_total{{action="{pill.action}",source="shop"}} 1.0' in metrics
    assert not [s for s in target.seen if s.path == "/shop"]


def _pragma(text: str) -> Callable[[Any], Any]:
    return lambda conn: conn.execute(f"PRAGMA {text}").fetchall()


async def _fill_the_disk(journal: Journal) -> None:
    """SQLite may not grow the file by another page (SQLITE_FULL, as on ENOSPC); PRAGMAs go
    through the journal's writer, the one connection that writes. Free pages are handed back
    first: a small write (the probe of a write that leaves nothing) would fit in them."""
    await journal._call(
        lambda conn: conn.executescript("PRAGMA incremental_vacuum;"), transaction=False
    )
    [(pages,)] = await journal._call(_pragma("page_count"), transaction=False)
    await journal._call(_pragma(f"max_page_count = {pages}"), transaction=False)


async def _make_room(journal: Journal) -> None:
    await journal._call(_pragma("max_page_count = 1073741823"), transaction=False)


BIG = b'{"pad": "' + b"x" * 60_000 + b'"}'  # bigger than any free page: the file must grow


async def test_a_journal_refusing_webhooks_is_alerted_directly_and_its_end_journaled(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A full disk refuses every webhook: the alert URL gets a "journal" alert at once, posted
    directly (the journal cannot take it) with /readyz' reason; once space returns, a
    journaled "recovered" alert says how long webhooks were refused and how many."""
    cfg = make_config(
        tmp_path,
        f'[[sources.a.actions]]\ntype = "log"\n[alerts]\nurl = "{target.url}/alerts"\n',
    )
    running = await run_daemon(cfg)
    journal = running.daemon.journal
    assert journal is not None

    def alerts(t: Target) -> list[dict[str, Any]]:
        return [json.loads(s.body) for s in t.seen if s.path == "/alerts"]

    await _fill_the_disk(journal)
    for i in range(3):
        assert (await running.post("/hooks/a", BIG.replace(b"x", b"abc"[i : i + 1], 1)))[0] == 503
    await target.wait_for(lambda t: len(alerts(t)) == 1)
    [alert] = alerts(target)
    assert (alert["kind"], alert["events"]) == ("journal", [])
    assert 1 <= alert["count"] <= 3
    assert alert["text"] == (
        f"webhookd: the journal refuses webhooks, each answered 503 ({alert['count']} so far):"
        " journal: database or disk is full; this alert is not journaled, the recovered alert"
        " tells when it ends"
    )
    assert await journal.list_events(source=ALERT_SOURCE) == []

    await _make_room(journal)
    await target.wait_for(lambda t: len(alerts(t)) == 2, timeout_s=20)
    recovered = alerts(target)[1]
    assert (recovered["kind"], recovered["count"]) == ("recovered", 0)
    assert re.fullmatch(
        r"webhookd: recovered: the journal takes webhooks again after \d+s refusing them"
        r" \(3 answered 503\)",
        recovered["text"],
    ), recovered["text"]
    [journaled] = await journal.list_events(source=ALERT_SOURCE)  # the recovered alert alone
    assert json.loads((await journal.get_event(journaled.id)).event.body) == recovered
    assert (await running.post("/hooks/a", BIG))[0] == 202


async def test_a_journal_alert_is_retried_in_memory_and_held_by_min_interval_s(
    make_rig: MakeRig,
) -> None:
    """The journal alert the alert URL refuses is posted again after the alerts' backoff, up
    to their max_attempts; the outage's end is journaled as a recovered alert with how long
    and how many; an outage again within min_interval_s of the last journal alert is told
    once the interval has passed."""
    rig = await make_rig(
        "min_interval_s = 60\nretry = { max_attempts = 3, base_s = 2, factor = 1, cap_s = 2 }"
    )
    refused = [0]  # what the receiver would count: webhooks answered 503 for the journal
    assert rig.cfg.alerts is not None
    alerter = Alerter(
        rig.cfg.alerts,
        rig.journal,
        clock=rig.clock,
        journal_problems=functools.partial(journal_problems, rig.journal, 10.0),
        refused=lambda: refused[0],
        sender=lambda: rig.pool.actions.get((ALERT_SOURCE, ALERT_ACTION)),
    )

    async def refuse_one() -> None:
        with pytest.raises(JournalUnavailable, match="database or disk is full"):
            await rig.journal.ingest(
                NewEvent(
                    new_event("shop", rig.clock.time(), BIG),
                    jobs_for(rig.cfg.sources["shop"]),
                )
            )
        refused[0] += 1

    await alerter.watch_journal()
    assert alerter.journal_due_s() == JOURNAL_CHECK_S  # nothing wrong: looked at each second
    await _fill_the_disk(rig.journal)
    await refuse_one()
    rig.target.statuses = [500]
    rig.clock.advance(JOURNAL_CHECK_S)
    began = rig.clock.time()
    await alerter.watch_journal()
    assert [a["kind"] for a in rig.alerts_received()] == ["journal"]  # answered 500
    assert 1.0 <= alerter.journal_due_s() <= 2.0  # the backoff: base_s 2, jittered
    rig.clock.advance(2.0)
    await alerter.watch_journal()
    [_, told] = rig.alerts_received()
    assert (told["kind"], told["count"]) == ("journal", 1)
    assert await rig.journal.list_events(source=ALERT_SOURCE) == []

    await _make_room(rig.journal)
    rig.clock.advance(JOURNAL_CHECK_S)
    await alerter.watch_journal()  # the probe goes through: no reason seen from now
    ended = rig.clock.time()
    assert await alerter.tick() == []  # not over yet: a nearly full disk may fail again
    rig.clock.advance(JOURNAL_BACK_AFTER_S)
    await alerter.watch_journal()
    [recovered] = await alerter.tick()
    assert (await rig.alert_doc(recovered))["text"] == (
        f"webhookd: recovered: the journal takes webhooks again after {ended - began:.0f}s"
        " refusing them (1 answered 503)"
    )

    await _fill_the_disk(rig.journal)
    await refuse_one()
    rig.clock.advance(JOURNAL_CHECK_S)
    await alerter.watch_journal()
    assert len(rig.alerts_received()) == 2  # within min_interval_s of the last journal alert
    assert alerter.journal_due_s() == JOURNAL_CHECK_S  # looked at, and held
    rig.clock.advance(60.0)
    await alerter.watch_journal()
    assert [a["kind"] for a in rig.alerts_received()] == ["journal"] * 3
    await _make_room(rig.journal)


async def test_a_commit_that_does_not_end_is_alerted_while_it_hangs(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A stalled disk holds the journal's writer: webhooks get 503 past ack_timeout_s, and the
    journal alert reaches the alert URL while the commit still hangs, naming it as /readyz
    does; nothing of it waits for the writer."""
    cfg = make_config(
        tmp_path,
        f'[[sources.a.actions]]\ntype = "log"\n[alerts]\nurl = "{target.url}/alerts"\n',
        server="ack_timeout_s = 0.2",
    )
    running = await run_daemon(cfg)
    journal = running.daemon.journal
    assert journal is not None
    async with writer_held(journal):
        assert (await running.post("/hooks/a", b"{}"))[0] == 503
        await target.wait_for(lambda t: any(s.path == "/alerts" for s in t.seen))
        [seen] = target.seen
        alert = json.loads(seen.body)
        assert alert["kind"] == "journal" and re.search(
            r": journal: a commit has taken \d+\.\d s, past server\.ack_timeout_s: webhooks are"
            r" answered 503; this alert is not journaled",
            alert["text"],
        ), alert
