"""Alerts from a real ``webhookd serve`` process (on uvloop, as users run it): a dead job and an
old backlog each reach a loopback sink as the documented JSON body, and the alert events are
listed by ``webhookd events --source webhookd``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from procs import Procs, Target, write_config

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(60)]

JSON = {"Content-Type": "application/json"}
# The path of an incoming-webhook URL is its credential: it must never show in the log.
TOKEN = "T0001/B0002/s3cr3tT0k3n"


@pytest.fixture
async def shop() -> AsyncIterator[Target]:
    t = Target(status=400)  # refuses everything: each job is dead at its first attempt
    await t.start()
    yield t
    await t.aclose()


@pytest.fixture
async def sink() -> AsyncIterator[Target]:
    t = Target()  # the chat service's incoming webhook
    await t.start()
    yield t
    await t.aclose()


async def post(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(url, data=b'{"order": 1}', headers=JSON) as r:
        answer = await r.json()
        assert r.status == 202, answer
        event_id: str = answer["id"]
        return event_id


def config(tmp_path: Path, shop: Target, alerts: str) -> Path:
    return write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        f"""
[sources."*"]
[[sources."*".actions]]
type = "log"

[sources.shop]
[[sources.shop.actions]]
type = "forward"
url = "{shop.url}/orders"

[alerts]
url = "env:ALERT_URL"
{alerts}
""",
    )


async def test_a_dead_job_reaches_the_alert_url_and_is_listed_as_a_webhookd_event(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    shop: Target,
    sink: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forward answered 400 goes dead; the alert URL gets {"kind": "dead", "count": 1, "events":
    [id]}; `webhookd events --source webhookd` lists the alert; the URL is never logged; and no
    one can post to the alert source from outside, even with a catch-all."""
    monkeypatch.setenv("ALERT_URL", f"{sink.url}/services/{TOKEN}")
    cfg = config(tmp_path, shop, "")
    daemon = await procs.serve(cfg)

    event_id = await post(http, f"{daemon.url}/hooks/shop")
    await sink.wait_for(lambda: len(sink.arrivals) == 1)
    (alert,) = sink.arrivals
    body = json.loads(alert.body)
    assert (body["kind"], body["count"], body["events"]) == ("dead", 1, [event_id])
    assert body["text"] == (
        f"webhookd: 1 job(s) went dead (shop: 1): {event_id}; last error: shop/forward:"
        f" {shop.url}/orders answered 400; `webhookd replay --dead` runs them again"
    )

    async with http.post(f"{daemon.url}/hooks/webhookd", data=b"{}", headers=JSON) as r:
        assert r.status == 404  # the catch-all does not take the reserved name

    listed = await procs.cli("events", "--source", "webhookd", "--json", "--config", str(cfg))
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(r["id"], r["source"]) for r in rows] == [(alert.event_id, "webhookd")]
    await daemon.wait_said(rf"job=\S+ event={alert.event_id} source=webhookd .*outcome=done")
    assert "s3cr3tT0k3n" not in daemon.log


async def test_an_old_backlog_reaches_the_alert_url_as_a_backlog_alert(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    shop: Target,
    sink: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A paused source's webhook waits longer than backlog_age_s: the alert URL gets a "backlog"
    alert naming it, while the paused source's job stays queued."""
    monkeypatch.setenv("ALERT_URL", f"{sink.url}/services/{TOKEN}")
    cfg = config(tmp_path, shop, "backlog_age_s = 0.5")
    daemon = await procs.serve(cfg)
    paused = await procs.cli("pause", "shop", "--config", str(cfg))
    assert paused.returncode == 0, paused.stderr
    await daemon.wait_said(r"source shop processing=paused")

    event_id = await post(http, f"{daemon.url}/hooks/shop")
    await sink.wait_for(lambda: len(sink.arrivals) >= 1)
    body = json.loads(sink.arrivals[0].body)
    assert (body["kind"], body["count"], body["events"]) == ("backlog", 1, [event_id])
    assert "(shop: 1 paused)" in body["text"]
    assert shop.arrivals == []  # paused: nothing was delivered


async def test_a_failing_action_is_alerted_before_its_jobs_die_and_its_recovery_is_told(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    shop: Target,
    sink: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A target that answers 500 to every attempt, under a retry policy that takes long to go
    dead: no job dies, yet once its action has failed for failing_s the alert URL gets a
    "failing" alert naming the action and its last error; when an attempt is done again, a
    "recovered" alert says for how long it failed."""
    monkeypatch.setenv("ALERT_URL", f"{sink.url}/services/{TOKEN}")
    cfg = config(tmp_path, shop, "failing_s = 0.5\nmin_interval_s = 0\non_dead = false")
    text = cfg.read_text().replace(
        f'url = "{shop.url}/orders"',
        f'url = "{shop.url}/orders"\nretry = {{ max_attempts = 50, base_s = 0.2, cap_s = 0.2 }}',
    )
    cfg.write_text(text)
    shop.status = 500
    daemon = await procs.serve(cfg)
    event_id = await post(http, f"{daemon.url}/hooks/shop")

    await sink.wait_for(lambda: len(sink.arrivals) >= 1)
    body = json.loads(sink.arrivals[0].body)
    assert (body["kind"], body["count"], body["events"]) == ("failing", 1, [])
    assert body["text"].startswith("webhookd: shop/forward failing for ")
    assert f"none done; last: {shop.url}/orders answered 500" in body["text"]

    shop.status = 200
    await sink.wait_for(lambda: any(b"recovered" in a.body for a in sink.arrivals))
    [recovered] = [json.loads(a.body) for a in sink.arrivals if b"recovered" in a.body]
    assert (recovered["kind"], recovered["count"]) == ("recovered", 1)
    assert recovered["text"].startswith("webhookd: recovered: shop/forward done again after ")
    shown = await procs.cli("show", event_id, "--json", "--config", str(cfg))
    assert json.loads(shown.stdout)["state"] == "done"
    assert TOKEN not in daemon.log
