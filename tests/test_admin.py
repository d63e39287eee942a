"""The admin API of a running daemon: health, readiness, stats, the events API, replay, auth."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from conftest import DatabaseOutage, Running, Target, make_config, new_event
from ops_support import DOWN_ACTION, Outcomes, cli, event_state, forward_source, write_config
from procs import poll
from rawhttp import RawConn
from test_hostile_intake import MALFORMED, assert_refused_quietly

from webhookd import send
from webhookd.actions.base import Outcome
from webhookd.clock import ManualClock
from webhookd.journal import (
    Claimed,
    Counts,
    Finished,
    Journal,
    NewEvent,
    NewJob,
    present_only,
)
from webhookd.json_errors import JsonErrorAppRunner, json_errors
from webhookd.models import new_job_id
from webhookd.state import IntakeState
from webhookd.stats import Throughput
from webhookd.workers import WorkerPool

EVENT_KEYS = {
    "id",
    "source",
    "received_at",
    "dedup_key",
    "tenant",
    "priority",
    "verified",
    "state",
    "query",
    "jobs",
}
JOB_KEYS = {"id", "action", "type", "state", "attempts", "run_at", "result", "errors"}

StartDaemon = Callable[..., Any]


def forward_sources(url: str, *names: str) -> str:
    return "".join(
        f"""
[sources.{name}]
[[sources.{name}.actions]]
type = "forward"
url = "{url}/{name}"
retry = {{ max_attempts = 1 }}
"""
        for name in names
    )


async def get(running: Running, path: str, **kw: Any) -> tuple[int, Any]:
    async with running.http.get(running.admin_url + path, **kw) as r:
        return r.status, await r.json(content_type=None)


async def post_admin(running: Running, path: str, **kw: Any) -> tuple[int, Any]:
    kw.setdefault("headers", {"X-Webhookd": "1"})  # what the dashboard sends: not a form
    async with running.http.post(running.admin_url + path, **kw) as r:
        return r.status, await r.json(content_type=None)


async def accept(running: Running, path: str, body: str) -> str:
    status, doc = await running.post(path, body, headers={"Content-Type": "application/json"})
    assert status == 202, doc
    event_id: str = doc["id"]
    return event_id


def ids(doc: dict[str, Any]) -> list[str]:
    return [e["id"] for e in doc["events"]]


async def test_healthz_and_stats_describe_the_running_daemon(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """/healthz names the boot; /readyz is ready; /stats counts jobs by state and source."""
    running: Running = await run_daemon(make_config(tmp_path, forward_sources(target.url, "shop")))
    outcomes = Outcomes(running)
    status, health = await get(running, "/healthz")
    assert (status, health) == (200, {"ok": True, "boot_id": running.daemon.boot_id})
    assert await get(running, "/readyz") == (200, {"ready": True})

    event_id = await accept(running, "/hooks/shop", '{"n": 1}')
    await outcomes.wait(event_id, "done")
    status, stats = await get(running, "/stats")
    assert status == 200
    assert {"boot_id", "uptime_s", "draining", "jobs", "sources", "events", "backlog"} <= set(stats)
    assert stats["draining"] is False and stats["events"] == 1 and stats["backlog"] == 0
    assert stats["jobs"]["done"] == 1 and stats["jobs"]["queued"] == 0
    assert stats["sources"] == {"shop": {"done": 1}}
    assert stats["counts_age_s"] == 0  # a small journal is counted afresh for every call
    assert {"concurrency", "busy", "window", "started", "outcomes"} <= set(stats["workers"])
    assert stats["workers"]["outcomes"] == {"done": 1}
    assert stats["workers"]["holding"] is False and stats["intake"]["waiting"] == 0


async def test_stats_journal_id_is_what_the_cli_reads_for_the_same_journal(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """``webhookd stats`` holds the daemon's ``/stats`` to its own journal's identity: the two
    agree for the daemon's journal, reached through a symlink too, and not for another."""
    real = tmp_path / "data" / "webhookd.db"
    real.parent.mkdir()
    link = tmp_path / "webhookd.db"
    link.symlink_to(real)
    running: Running = await run_daemon(
        make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    )
    status, stats = await get(running, "/stats")
    assert status == 200
    for path in (link, real):
        async with Journal(path) as cli_journal:  # as the CLI opens it
            assert await cli_journal.identity() == stats["journal_id"]
    async with Journal(tmp_path / "other.db") as other:
        assert await other.identity() != stats["journal_id"]


async def test_stats_lists_fifty_names_a_catch_all_took_and_sums_the_rest_under_its_own(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """Any ``/hooks/<name>`` adds a name to a catch-all: /stats lists every configured source
    and the 50 taken names with the most jobs; the rest are summed under ``*``, so a client
    posting to a new name each time cannot grow the document (and the dashboard's picker)."""
    catch_all = '[sources."*"]\n[[sources."*".actions]]\ntype = "log"\n'
    configured = '[sources.zz]\n[[sources.zz.actions]]\ntype = "log"\n'
    running: Running = await run_daemon(make_config(tmp_path, catch_all + configured))
    await accept(running, "/hooks/zz", "{}")
    for n, name in enumerate(("a00", "a00", "a01", "a01", *(f"b{i:02}" for i in range(55)))):
        await accept(running, f"/hooks/{name}", f'{{"n": {n}}}')
    status, stats = await get(running, "/stats")
    assert status == 200
    totals = {name: sum(by.values()) for name, by in stats["sources"].items()}
    # a00 and a01 have the most jobs; then by name: b00-b47 are listed, b48-b54 summed.
    assert totals == {"zz": 1, "a00": 2, "a01": 2, **{f"b{i:02}": 1 for i in range(48)}, "*": 7}
    assert stats["removed"] == []  # the catch-all takes every such name
    # Those jobs go by their names: a pause of "*" would hold none of them.
    status, error = await post_admin(running, "/sources/*/pause")
    assert status == 400 and error["error"].startswith('"*" is the catch-all: its events')
    # Nor of a configured source's name in another case, which the receiver refuses.
    status, error = await post_admin(running, "/sources/ZZ/pause")
    assert status == 400 and "did you mean zz?" in error["error"]
    assert (await get(running, "/stats"))[1]["paused"] == []


def test_stats_sources_fold_only_the_names_a_catch_all_took() -> None:
    """Configured sources, and the alerts' own, are listed however many there are."""
    counts = Counts(
        {}, {f"s{i}": {"done": 1} for i in range(4)} | {"webhookd": {"dead": 1}}, None, 0
    )
    shown = counts.sources_shown({"s0", "s1", "s2", "s3"}, most=0)
    assert shown == {**{f"s{i}": {"done": 1} for i in range(4)}, "webhookd": {"dead": 1}}
    shown = counts.sources_shown({"s0"}, most=1)
    assert shown == {
        "s0": {"done": 1},
        "s1": {"done": 1},
        "webhookd": {"dead": 1},
        "*": {"done": 2},
    }
    # A configured source with no job yet is listed, with none (the catch-all's own name not).
    assert Counts({}, {}, None, 0).sources_shown({"quiet", "*"}) == {"quiet": {}}
    # What counts() already folded under "*" is summed with the rest, not ranked as a name:
    # the most names are still shown, catch-all or not.
    folded = Counts({}, {"a": {"done": 3}, "b": {"done": 1}, "*": {"done": 9}}, None, 0)
    for configured in (set(), {"*"}):
        assert folded.sources_shown(configured, most=1) == {
            "a": {"done": 3},
            "*": {"done": 10},
        }


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_http_to_the_admin_api_is_a_json_400_in_one_log_line(
    tmp_path: Path, run_daemon: StartDaemon, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """The admin listener answers what the parser refuses as the receiver does: a JSON 4xx, a
    closed connection, one INFO line without the request's bytes (aiohttp's own: a plain-text
    echo and an ERROR traceback, for anyone who can reach the port to fill the log with)."""
    running: Running = await run_daemon(make_config(tmp_path, "[sources.shop]\n"))
    await assert_refused_quietly(running.daemon.bound.admin, data, caplog)
    assert await get(running, "/healthz") == (200, {"ok": True, "boot_id": running.daemon.boot_id})


async def test_an_error_a_handler_lets_out_is_a_json_500_and_one_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The admin API's middleware leaves a handler's unexpected exception to aiohttp (there is
    no 503 to give, as the receiver does). Its connections still answer JSON, a 500 "internal
    error" on a closed connection, and log the traceback once, at ERROR."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in a handler")

    app = web.Application(middlewares=[json_errors()])
    app.router.add_get("/broken", broken)
    runner = JsonErrorAppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/broken") as r:
            assert (r.status, r.content_type) == (500, "application/json")
            assert await r.json() == {"error": "internal error"}
            assert r.headers.get("Connection", "").lower() == "close"
    finally:
        await runner.cleanup()
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].exc_info is not None and "a bug in a handler" in str(errors[0].exc_info[1])


async def test_readyz_is_503_while_draining(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """Once a drain begins (a job still running), /readyz answers 503 naming the drain."""
    running: Running = await run_daemon(make_config(tmp_path, forward_sources(target.url, "shop")))
    target.hold = asyncio.Event()
    await accept(running, "/hooks/shop", "{}")
    await target.wait_for(lambda t: t.running == 1)
    running.daemon.request_stop()

    async def draining() -> bool:
        return (await get(running, "/readyz"))[0] == 503

    await poll(draining, timeout_s=10)
    assert await get(running, "/readyz") == (503, {"ready": False, "problems": ["draining"]})
    target.hold.set()
    assert await running.task == 0


async def test_events_list_filters_by_state_source_limit_and_before(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """/events lists newest first and filters by derived state, source, limit and cursor."""
    cfg = make_config(tmp_path, forward_sources(target.url, "shop", "mail"))
    running: Running = await run_daemon(cfg)
    outcomes = Outcomes(running)
    first = await accept(running, "/hooks/shop", '{"n": 1}')
    await outcomes.wait(first, "done")
    target.statuses = [400]
    failed = await accept(running, "/hooks/shop", '{"n": 2}')
    await outcomes.wait(failed, "dead")
    last = await accept(running, "/hooks/mail", '{"n": 3}')
    await outcomes.wait(last, "done")

    async def listed(query: str) -> list[str]:
        status, doc = await get(running, "/events" + query)
        assert status == 200, doc
        return ids(doc)

    assert await listed("") == [last, failed, first]
    assert await listed("?state=dead") == [failed]
    assert await listed("?state=done") == [last, first]
    assert await listed("?state=queued") == []
    assert await listed("?source=shop") == [failed, first]
    assert await listed("?limit=1") == [last]
    assert await listed(f"?before={last}") == [failed, first]
    assert await listed(f"?before={failed}&limit=1&source=shop") == [first]
    _, doc = await get(running, "/events?limit=1")
    assert set(doc["events"][0]) >= {"id", "source", "received_at", "state", "priority", "jobs"}
    for bad in ("?state=sleeping", "?limit=0", "?limit=many"):
        status, error = await get(running, "/events" + bad)
        assert status == 400 and isinstance(error["error"], str), bad
    # A filter this endpoint lacks is refused, not ignored: an export "since last week" got
    # every event.
    status, error = await get(running, "/events?since=2099-01-01")
    assert (status, error["error"]) == (
        400,
        "unknown parameter 'since': it takes state, limit, before, source, tenant",
    )
    assert await listed("?tenant=") == [last, failed, first]  # of no tenant, as --tenant ""
    # A cursor that is no event id is refused, not read as text that sorts after every id.
    for bad in ("garbage", "evt_", first.lower(), first + "0"):
        status, error = await get(running, "/events?before=" + bad)
        assert status == 400 and error["error"].startswith("before must be an event id"), bad
    assert await listed("?before=evt_" + "0" * 26) == []  # an id that could be, but is not


async def test_event_detail_has_the_contract_shape_and_unknown_ids_are_404(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """/events/<id> returns the documented fields, its jobs and each attempt; unknown ids are a
    JSON 404."""
    running: Running = await run_daemon(make_config(tmp_path, forward_sources(target.url, "shop")))
    outcomes = Outcomes(running)
    event_id = await accept(running, "/hooks/shop", '{"order": 1}')
    await outcomes.wait(event_id, "done")

    status, doc = await get(running, f"/events/{event_id}")
    assert status == 200
    assert set(doc) >= EVENT_KEYS
    assert (doc["id"], doc["source"], doc["state"], doc["priority"]) == (
        event_id,
        "shop",
        "done",
        "normal",
    )
    assert doc["dedup_key"].startswith("shop:sha256:")
    assert (doc["tenant"], doc["verified"]) == (None, None)
    [job] = doc["jobs"]
    assert set(job) >= JOB_KEYS
    assert (job["action"], job["type"], job["state"], job["attempts"]) == (
        "forward",
        "forward",
        "done",
        1,
    )
    assert job["result"] == {"status": 200}
    [attempt] = job["errors"]
    assert attempt["outcome"] == "done" and attempt["detail"]["status"] == 200

    status, error = await get(running, "/events/evt_00000000000000000000000000")
    assert (status, set(error)) == (404, {"error"})
    status, error = await post_admin(running, "/events/evt_00000000000000000000000000/replay")
    assert (status, set(error)) == (404, {"error"})


async def test_reads_refuse_a_parameter_they_do_not_take_and_probes_take_any(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """/stats, /events/<id> and /keys/<key> take no parameter: one given is a 400 naming it,
    as on the other endpoints (``/stats?source=shop`` answered every source's figures as if
    filtered). /healthz, /readyz and /metrics, which probes and scrapers call with parameters
    of their own, still answer."""
    running: Running = await run_daemon(make_config(tmp_path, forward_sources(target.url, "shop")))
    outcomes = Outcomes(running)
    event_id = await accept(running, "/hooks/shop", '{"order": 1}')
    await outcomes.wait(event_id, "done")
    _, doc = await get(running, f"/events/{event_id}")
    key = quote(doc["dedup_key"], safe="")
    for path, name in (
        ("/stats?source=shop", "source"),
        (f"/events/{event_id}?action=forward", "action"),
        (f"/keys/{key}?pruned=0", "pruned"),
    ):
        status, error = await get(running, path)
        said = f"unknown parameter {name!r}: it takes none"
        assert (status, error) == (400, {"error": said}), path
        assert (await get(running, path.partition("?")[0]))[0] == 200, path
    for path in ("/healthz?probe=1", "/readyz?probe=1", "/metrics?format=text"):
        async with running.http.get(running.admin_url + path) as r:
            assert r.status == 200, path


async def test_replay_requeues_a_dead_event_and_the_daemon_delivers_it(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """POST /events/<id>/replay puts a dead job back; the running daemon delivers it again."""
    running: Running = await run_daemon(make_config(tmp_path, forward_sources(target.url, "shop")))
    outcomes = Outcomes(running)
    target.statuses = [410]
    event_id = await accept(running, "/hooks/shop", '{"n": 1}')
    await outcomes.wait(event_id, "dead")

    status, doc = await post_admin(running, f"/events/{event_id}/replay")
    assert (status, doc) == (202, {"id": event_id, "requeued": 1, "run_now": 0})
    await outcomes.wait(event_id, "done")
    assert [s.headers["webhook-id"] for s in target.seen] == [event_id, event_id]
    _, detail = await get(running, f"/events/{event_id}")
    assert detail["state"] == "done"
    [job] = detail["jobs"]
    assert [a["outcome"] for a in job["errors"]] == ["dead", "done"]


async def test_cancel_stops_a_job_waiting_for_its_retry(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """POST /events/<id>/cancel takes a job parked for its retry out of the queue: the event
    is cancelled, with the failed attempt kept; an unknown id is a JSON 404."""
    source = forward_source("shop", target.url + "/shop", max_attempts=3, base_s=3600)
    running: Running = await run_daemon(make_config(tmp_path, source))
    outcomes = Outcomes(running)
    target.statuses = [503]
    event_id = await accept(running, "/hooks/shop", '{"n": 1}')
    await outcomes.wait(event_id, "queued")  # its retry is an hour away

    status, doc = await post_admin(running, f"/events/{event_id}/cancel")
    assert (status, doc) == (200, {"id": event_id, "cancelled": 1, "running": 0})
    _, detail = await get(running, f"/events/{event_id}")
    assert (detail["state"], detail["jobs"][0]["state"]) == ("cancelled", "cancelled")
    assert [a["outcome"] for a in detail["jobs"][0]["errors"]] == ["retry"]
    status, doc = await post_admin(running, f"/events/{event_id}/cancel")
    assert (status, doc) == (200, {"id": event_id, "cancelled": 0, "running": 0})
    status, error = await post_admin(running, "/events/evt_00000000000000000000000000/cancel")
    assert (status, set(error)) == (404, {"error"})


async def test_pause_holds_a_sources_next_webhook_and_resume_runs_it(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """POST /sources/<name>/pause answers once this daemon holds the source's jobs: the next
    webhook is accepted and its job stays queued (with an idle pool it would otherwise start
    in its own commit); resume runs it. A second pause changes nothing; an unknown source
    is a JSON 404."""
    running: Running = await run_daemon(
        make_config(tmp_path, forward_source("shop", target.url + "/shop"))
    )
    outcomes = Outcomes(running)
    shop = {"source": "shop", "catch_all": False, "journaled": False}  # no webhook yet
    status, doc = await post_admin(running, "/sources/shop/pause")
    assert (status, doc) == (200, {**shop, "paused": True, "changed": True})
    status, doc = await post_admin(running, "/sources/shop/pause")
    assert (status, doc) == (200, {**shop, "paused": True, "changed": False})
    _, stats = await get(running, "/stats")
    assert stats["paused"] == ["shop"]

    event_id = await accept(running, "/hooks/shop", '{"n": 1}')
    _, detail = await get(running, f"/events/{event_id}")
    assert (detail["state"], detail["jobs"][0]["attempts"]) == ("queued", 0)

    shop["journaled"] = True
    status, doc = await post_admin(running, "/sources/shop/resume")
    assert (status, doc) == (200, {**shop, "paused": False, "changed": True})
    await outcomes.wait(event_id, "done")
    assert len(target.seen) == 1
    status, doc = await post_admin(running, "/sources/shop/resume")
    assert (status, doc) == (200, {**shop, "paused": False, "changed": False})
    status, error = await post_admin(running, "/sources/nope/pause")
    assert (status, set(error)) == (404, {"error"})
    # One paused that the config has no more (taken out by a reload): resumed, not a 404.
    await running.daemon.journal.pause("gone")
    status, doc = await post_admin(running, "/sources/gone/resume")
    assert (status, doc) == (
        200,
        {
            "source": "gone",
            "paused": False,
            "changed": True,
            "catch_all": False,
            "journaled": False,
        },
    )
    status, error = await post_admin(running, "/sources/gone/resume")
    assert (status, set(error)) == (404, {"error"})


@pytest.mark.parametrize("catch_all", [False, True], ids=["plain", "catch-all"])
async def test_a_pause_of_the_alerts_own_source_is_a_400_and_its_resume_goes(
    tmp_path: Path, run_daemon: StartDaemon, catch_all: bool
) -> None:
    """POST /sources/webhookd/pause (the alerts' own source, which the dashboard lists once
    it has jobs) held every alert back, silently: it is a 400 saying why, with or without a
    catch-all, and nothing is paused; its resume (one an earlier webhookd paused) goes, its
    exact name no other case of a configured one."""
    sources = (
        '[alerts]\nurl = "http://127.0.0.1:9/alerts"\n[[sources.shop.actions]]\ntype = "log"\n'
    )
    if catch_all:
        sources += '[[sources."*".actions]]\ntype = "log"\n'
    running: Running = await run_daemon(make_config(tmp_path, sources))
    status, doc = await post_admin(running, "/sources/webhookd/pause")
    assert status == 400
    assert doc["error"].startswith("the alerts' source 'webhookd' cannot be paused: ")
    journal = running.daemon.journal
    assert journal is not None
    assert await journal.paused_sources() == frozenset()
    await journal.pause("webhookd")  # as an earlier webhookd could
    status, doc = await post_admin(running, "/sources/webhookd/resume")
    assert (status, doc) == (
        200,
        {
            "source": "webhookd",
            "paused": False,
            "changed": True,
            "catch_all": False,
            "journaled": False,
        },
    )


async def test_a_pause_of_a_slip_of_a_sources_name_beside_a_catch_all_is_a_400(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """Beside a catch-all, POST /sources/githb/pause answered 200 "paused" while github's jobs
    ran on: the catch-all takes every name. A slip of a configured source's name is a 400
    saying which was meant (not a 404: the catch-all takes it), for a resume too, unless the
    catch-all has taken webhooks under it. A name it takes is paused, the answer saying it is
    one (``catch_all``) and whether webhooks have come under it (``journaled``)."""
    sources = "".join(
        f'[[sources.{name}.actions]]\ntype = "log"\n' for name in ("github", "stripe", '"*"')
    )
    running: Running = await run_daemon(make_config(tmp_path, sources))
    for verb in ("pause", "resume"):
        status, error = await post_admin(running, f"/sources/githb/{verb}")
        assert (status, error) == (
            400,
            {
                "error": "no source 'githb' (did you mean github?): the catch-all \"*\" would"
                " take the name, but no webhook has come under it"
            },
        )
    _, stats = await get(running, "/stats")
    assert stats["paused"] == []

    await accept(running, "/hooks/stripes", "{}")  # close to stripe, but taken under its name
    status, doc = await post_admin(running, "/sources/stripes/pause")
    assert (status, doc) == (
        200,
        {
            "source": "stripes",
            "paused": True,
            "changed": True,
            "catch_all": True,
            "journaled": True,
        },
    )
    status, doc = await post_admin(running, "/sources/billing/pause")
    assert (status, doc) == (
        200,
        {
            "source": "billing",
            "paused": True,
            "changed": True,
            "catch_all": True,
            "journaled": False,
        },
    )
    status, doc = await post_admin(running, "/sources/github/pause")
    assert (status, doc["catch_all"], doc["journaled"]) == (200, False, False)
    # A slip paused by an earlier webhookd is resumed: its jobs would otherwise wait for good.
    await running.daemon.journal.pause("githb")
    status, doc = await post_admin(running, "/sources/githb/resume")
    assert (status, doc["changed"]) == (200, True)
    _, stats = await get(running, "/stats")
    assert stats["paused"] == ["billing", "github", "stripes"]


async def test_replay_dead_of_a_source_reruns_its_dead_letters_and_no_other_sources(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """POST /sources/<name>/replay-dead is ``webhookd replay --dead --source <name>``: each of
    its events with a dead job runs again; another source's dead letter stays dead."""
    sources = forward_source("shop", target.url + "/shop") + forward_source("mail", target.url)
    running: Running = await run_daemon(make_config(tmp_path, sources))
    outcomes = Outcomes(running)
    target.statuses = [500, 500, 500]  # one attempt each: dead at once
    dead = [await accept(running, "/hooks/shop", f'{{"n": {n}}}') for n in (1, 2)]
    other = await accept(running, "/hooks/mail", '{"n": 3}')
    for event_id in (*dead, other):
        await outcomes.wait(event_id, "dead")

    status, doc = await post_admin(running, "/sources/shop/replay-dead")
    assert (status, doc) == (202, {"source": "shop", "events": 2, "requeued": 2})
    for event_id in dead:
        await outcomes.wait(event_id, "done")
    _, detail = await get(running, f"/events/{other}")
    assert detail["state"] == "dead" and len(target.seen) == 5
    status, doc = await post_admin(running, "/sources/shop/replay-dead")
    assert (status, doc) == (202, {"source": "shop", "events": 0, "requeued": 0})
    status, error = await post_admin(running, "/sources/nope/replay-dead")
    assert (status, set(error)) == (404, {"error"})
    # A typo or a filter it lacks replayed every dead letter of the source; now nothing.
    target.statuses = [500]
    again = await accept(running, "/hooks/shop", '{"n": 4}')
    await outcomes.wait(again, "dead")
    for query in ("?action=nope&since=2099-01-01", "?Tenant=acme"):
        status, error = await post_admin(running, "/sources/shop/replay-dead" + query)
        assert status == 400 and error["error"].startswith("unknown parameter"), query
    status, error = await post_admin(running, f"/events/{again}/replay?Dead=1")
    assert (status, error["error"]) == (
        400,
        "unknown parameter 'Dead': it takes dead, dismissed, done, cancelled, action",
    )
    # An empty tenant is the events of no tenant (these have none), never "every tenant".
    status, doc = await post_admin(running, "/sources/shop/replay-dead?tenant=")
    assert (status, doc["requeued"]) == (202, 1)
    await outcomes.wait(again, "done")


async def test_replay_dead_of_the_catch_alls_own_name_or_another_case_is_refused_as_a_pause(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """POST /sources/*/replay-dead, and of "Shop" beside "shop", answered 202 with 0 re-queued
    while the names the catch-all took held dead letters: read as "nothing to replay". Each is
    now the 400 a pause of it gets, saying which name to give; that name replays them."""
    down = DOWN_ACTION.replace("sources.shop", 'sources."*"')
    running: Running = await run_daemon(
        make_config(tmp_path, down + '[[sources.shop.actions]]\ntype = "log"\n')
    )
    outcomes = Outcomes(running)
    event_id = await accept(running, "/hooks/foo", '{"n": 1}')
    await outcomes.wait(event_id, "dead")
    for name, says in (("*", '"*" is the catch-all: '), ("Shop", "(did you mean shop?)")):
        paused = await post_admin(running, f"/sources/{name}/pause")
        replayed = await post_admin(running, f"/sources/{name}/replay-dead")
        assert replayed == paused, (name, replayed, paused)
        assert replayed[0] == 400 and says in replayed[1]["error"], (name, replayed)
    status, doc = await post_admin(running, "/sources/foo/replay-dead")
    assert (status, doc) == (202, {"source": "foo", "events": 1, "requeued": 1})


async def test_admin_writes_in_a_postgresql_outage_are_503s_with_retry_after(
    tmp_path: Path,
    target: Target,
    run_daemon: StartDaemon,
    pg_url: str,
    db_outage: DatabaseOutage,
) -> None:
    """While the database is down, replay, cancel, pause and replay-dead answer 503 with
    Retry-After, as the reads do: a script or proxy that honours it is told when to come back
    (docs/scaling.md)."""
    cfg = make_config(tmp_path, forward_source("shop", target.url + "/shop"), journal_url=pg_url)
    running: Running = await run_daemon(cfg)
    event_id = await accept(running, "/hooks/shop", '{"n": 1}')
    await event_state(running.http, running.admin_url, event_id, "done")
    await db_outage.begin()

    async def stats_unavailable() -> bool:
        return (await get(running, "/stats"))[0] == 503

    await poll(stats_unavailable, timeout_s=30)
    answers = {}
    for path in (
        f"/events/{event_id}/replay",
        f"/events/{event_id}/cancel",
        "/sources/shop/pause",
        "/sources/shop/resume",
        "/sources/shop/replay-dead",
    ):
        async with running.http.post(running.admin_url + path, headers={"X-Webhookd": "1"}) as r:
            answers[path] = (r.status, r.headers.get("Retry-After"))
    assert answers == dict.fromkeys(answers, (503, "5"))


async def test_replay_dead_past_max_backlog_answers_a_warning_the_dashboard_shows(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """Dead jobs do not count towards server.max_backlog: a source's replay-dead that takes
    the backlog past it (the dashboard's Replay N dead) says that intake now answers 503, as
    the CLI's replay does."""
    cfg = make_config(
        tmp_path, forward_source("shop", target.url + "/shop"), server="max_backlog = 1"
    )
    running: Running = await run_daemon(cfg)
    outcomes = Outcomes(running)
    target.statuses = [500, 500]
    for n in (1, 2):  # one at a time: a queued job counts towards the cap, a dead one not
        await outcomes.wait(await accept(running, "/hooks/shop", f'{{"n": {n}}}'), "dead")
    status, paused = await post_admin(running, "/sources/shop/pause")
    assert status == 200, paused
    status, doc = await post_admin(running, "/sources/shop/replay-dead")
    assert (status, doc["requeued"]) == (202, 2)
    assert doc["warning"] == (
        "the backlog is now 2 job(s), past server.max_backlog (1): new webhooks to any source"
        " are answered 503 until it drains below"
    )


async def test_replay_dead_runs_the_dead_job_alone_not_the_events_delivered_one(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """An event forwarded to two targets, delivered to one and dead at the other: a source's
    replay-dead (the dashboard's Replay button, ``replay --dead``) runs the dead job alone, and
    the target that had the webhook does not get it a second time."""
    running: Running = await run_daemon(
        make_config(tmp_path, forward_source("shop", target.url + "/shop") + DOWN_ACTION)
    )
    finished: list[tuple[str, str]] = []
    changed = asyncio.Event()

    def on_finish(claimed: Claimed, outcome: Outcome, f: Finished) -> None:
        finished.append((claimed.job.action, str(f.state)))
        changed.set()

    assert running.daemon.pool is not None
    running.daemon.pool.on_finish.append(on_finish)

    async def finishes(n: int) -> None:
        async with asyncio.timeout(15):
            while len(finished) < n:
                changed.clear()
                await changed.wait()

    await accept(running, "/hooks/shop", '{"n": 1}')
    await finishes(2)
    assert sorted(finished) == [("deliver", "done"), ("down", "dead")]
    status, doc = await post_admin(running, "/sources/shop/replay-dead")
    assert (status, doc) == (202, {"source": "shop", "events": 1, "requeued": 1})
    await finishes(3)
    assert finished[2] == ("down", "dead") and len(target.seen) == 1


async def test_replay_of_an_events_dead_jobs_leaves_its_delivered_one_alone(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """POST /events/<id>/replay?dead=1 (a dead letter's Replay on the dashboard) re-queues the
    event's dead job alone, as ``replay --dead`` does; without it every finished job runs."""
    running: Running = await run_daemon(
        make_config(tmp_path, forward_source("shop", target.url + "/shop") + DOWN_ACTION)
    )
    event_id = await accept(running, "/hooks/shop", '{"n": 1}')
    await event_state(running.http, running.admin_url, event_id, "dead")
    assert len(target.seen) == 1

    status, error = await post_admin(running, f"/events/{event_id}/replay?dead=yes")
    assert status == 400 and "dead" in error["error"]
    status, doc = await post_admin(running, f"/events/{event_id}/replay?dead=1")
    assert (status, doc) == (202, {"id": event_id, "requeued": 1, "run_now": 0})

    def down_ran(times: int) -> Callable[[], Awaitable[bool]]:
        async def ran() -> bool:
            _, detail = await get(running, f"/events/{event_id}")
            jobs = {j["action"]: j for j in detail["jobs"]}
            return len(jobs["down"]["errors"]) == times and jobs["down"]["state"] == "dead"

        return ran

    await poll(down_ran(2), timeout_s=15)
    _, detail = await get(running, f"/events/{event_id}")
    assert [j["state"] for j in detail["jobs"] if j["action"] == "deliver"] == ["done"]
    assert len(target.seen) == 1

    # Dismissed (a dead letter's Dismiss, ``cancel --dead``): the dead job alone is cancelled.
    status, error = await post_admin(running, f"/events/{event_id}/cancel?dead=true")
    assert status == 400 and "dead" in error["error"]
    status, doc = await post_admin(running, f"/events/{event_id}/cancel?dead=1")
    assert (status, doc) == (200, {"id": event_id, "cancelled": 1, "running": 0})
    _, detail = await get(running, f"/events/{event_id}")
    assert detail["state"] == "done"
    assert [(j["action"], j["state"]) for j in detail["jobs"]] == [
        ("deliver", "done"),
        ("down", "cancelled"),
    ]
    assert [j["dismissed_at"] is not None for j in detail["jobs"]] == [False, True]

    # Undone (``replay --dismissed``): the dismissed job alone runs again.
    status, error = await post_admin(running, f"/events/{event_id}/replay?dead=1&dismissed=1")
    assert (status, error["error"]) == (
        400,
        "give one of dead=1, dismissed=1, done=1 and cancelled=1",
    )
    # A dismissal is --dismissed's: ?cancelled=1 (a cancel undone) leaves it be.
    status, doc = await post_admin(running, f"/events/{event_id}/replay?cancelled=1")
    assert (status, doc) == (202, {"id": event_id, "requeued": 0, "run_now": 0})
    status, doc = await post_admin(running, f"/events/{event_id}/replay?dismissed=1")
    assert (status, doc) == (202, {"id": event_id, "requeued": 1, "run_now": 0})

    await poll(down_ran(3), timeout_s=15)
    assert len(target.seen) == 1

    # Delivered again (``replay --done --action deliver``): that action's done job alone.
    status, error = await post_admin(running, f"/events/{event_id}/replay?done=1&action=")
    assert (status, error["error"]) == (400, "action must name an action")
    status, doc = await post_admin(running, f"/events/{event_id}/replay?done=1&action=down")
    assert (status, doc) == (202, {"id": event_id, "requeued": 0, "run_now": 0})  # it is dead
    status, doc = await post_admin(running, f"/events/{event_id}/replay?done=1&action=deliver")
    assert (status, doc) == (202, {"id": event_id, "requeued": 1, "run_now": 0})

    async def delivered_again() -> bool:
        _, detail = await get(running, f"/events/{event_id}")
        return [j["state"] for j in detail["jobs"] if j["action"] == "deliver"] == ["done"]

    await poll(delivered_again, timeout_s=15)
    assert len(target.seen) == 2
    assert await down_ran(3)()  # the dead one was not run again


async def test_a_bulk_replays_batch_goes_on_past_an_event_pruned_since_it_was_listed(
    journal: Journal,
) -> None:
    """An event pruned between the listing and its batch is skipped; the rest are replayed."""
    item = NewEvent(new_event("shop", time.time()), (NewJob(new_job_id(), "a", "forward", 3),))
    await journal.ingest(item)
    done = await present_only(journal.replay, [item.event.id, "evt_00000000000000000000000000"])
    assert list(done) == [item.event.id]


async def test_cancel_of_a_running_job_lets_its_attempt_end_with_no_retry_after_it(
    tmp_path: Path, target: Target, run_daemon: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled while its delivery is in flight, a job finishes that attempt (the event's
    document and ``show`` say a cancel is pending); the attempt fails, and instead of its
    retry (due at once here) the job is cancelled: so say the worker's log line and the
    attempt metrics, with no retry counted."""
    source = forward_source("shop", target.url + "/shop", max_attempts=3, base_s=0.01)
    config, cfg = write_config(tmp_path, source)
    running: Running = await run_daemon(cfg)
    outcomes = Outcomes(running)
    caplog.set_level(logging.INFO, logger="webhookd.workers")
    target.hold = asyncio.Event()
    target.statuses = [503]
    event_id = await accept(running, "/hooks/shop", '{"n": 1}')
    await target.wait_for(lambda t: t.running == 1)

    status, doc = await post_admin(running, f"/events/{event_id}/cancel")
    assert (status, doc) == (200, {"id": event_id, "cancelled": 0, "running": 1})
    _, detail = await get(running, f"/events/{event_id}")
    assert (detail["state"], detail["jobs"][0]["cancel_requested"]) == ("running", True)
    out = await cli("show", event_id, "--config", str(config))
    assert "(forward)  [running, cancel pending]  attempts 1/3" in out.output
    target.hold.set()
    await outcomes.wait(event_id, "cancelled")
    detail = await event_state(running.http, running.admin_url, event_id, "cancelled")
    assert [a["outcome"] for a in detail["jobs"][0]["errors"]] == ["retry"]
    assert detail["jobs"][0]["cancel_requested"] is False
    assert len(target.seen) == 1
    [line] = [r.getMessage() for r in caplog.records if f"event={event_id}" in r.getMessage()]
    assert "attempt=1 outcome=cancelled error=" in line
    async with running.http.get(running.admin_url + "/metrics") as r:
        metrics = await r.text()
    assert (
        'webhookd_job_attempts_total{action="deliver",outcome="cancelled",source="shop"} 1.0'
        in metrics
    )
    assert 'webhookd_job_retries_total{action="deliver",source="shop"} 0.0' in metrics


async def test_keys_finds_the_event_of_a_delivery_even_once_it_is_pruned(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """GET /keys/<source:key> names the event a delivery's dedup key belongs to, says when
    that event has been pruned (the key outlives it), and is a JSON 404 for an unknown key."""
    running: Running = await run_daemon(make_config(tmp_path, "[sources.shop]\n"))
    body = '{"order": 7}'
    event_id = await accept(running, "/hooks/shop", body)
    key = "shop:sha256:" + hashlib.sha256(body.encode()).hexdigest()
    status, doc = await get(running, f"/keys/{key}")
    assert status == 200 and doc["first_seen_at"] > 0
    assert doc == {**doc, "key": key, "event_id": event_id, "pruned": False}

    journal = running.daemon.journal
    assert journal is not None
    pruned = await journal.prune(keep_done_s=0, keep_dead_s=0, keep_dedup_s=86_400)
    assert pruned.events == 1  # no actions: done at once
    status, doc = await get(running, f"/keys/{key}")
    assert (status, doc["event_id"], doc["pruned"]) == (200, event_id, True)
    status, error = await get(running, "/keys/shop:nope")
    assert (status, set(error)) == (404, {"error"})


async def test_admin_token_is_required_when_set(
    tmp_path: Path, run_daemon: StartDaemon, monkeypatch: Any
) -> None:
    """With `admin.token`, requests without it or with a wrong one get 401; the right one 200;
    /healthz (liveness only) answers without it, for a container's health probe, to HEAD as
    to GET (a `wget --spider` probe sends HEAD); so does the dashboard's page, which holds no
    data."""
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret-token")
    cfg = make_config(tmp_path, admin='token = "env:TEST_ADMIN_TOKEN"')
    running: Running = await run_daemon(cfg)
    assert (await get(running, "/healthz"))[0] == 200
    for path in ("/healthz", "/"):
        async with running.http.head(running.admin_url + path) as r:
            assert r.status == 200, path
    async with running.http.head(running.admin_url + "/stats") as r:
        assert r.status == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
        for path in ("/readyz", "/events"):
            async with running.http.get(running.admin_url + path, headers=headers) as r:
                assert r.status == 401, (path, headers)
                assert r.headers["WWW-Authenticate"] == "Bearer"
                assert set(await r.json()) == {"error"}
    good = {"Authorization": "Bearer s3cret-token"}
    assert (await get(running, "/healthz", headers=good))[0] == 200
    assert await get(running, "/events", headers=good) == (200, {"events": []})
    # The scheme's name in any case (RFC 9110 §11.1).
    for scheme in ("bearer", "BEARER"):
        lower = {"Authorization": f"{scheme} s3cret-token"}
        assert await get(running, "/events", headers=lower) == (200, {"events": []})


async def test_an_authorization_header_of_undecodable_bytes_is_a_401_not_a_bug(
    tmp_path: Path, run_daemon: StartDaemon, monkeypatch: Any, caplog: Any
) -> None:
    """Bytes that are no UTF-8 are a wrong token: 401, no traceback, before any route runs."""
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret-token")
    running: Running = await run_daemon(
        make_config(tmp_path, admin='token = "env:TEST_ADMIN_TOKEN"')
    )
    conn = await RawConn.open(running.admin_url.removeprefix("http://"))
    try:
        await conn.head(b"/stats", [(b"Authorization", b"Bearer \xff\xfe")], method=b"GET")
        answer = await conn.answer()
    finally:
        await conn.close()
    assert answer.status == 401 and set(answer.doc) == {"error"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_an_unknown_expectation_is_a_json_417_that_echoes_nothing(
    tmp_path: Path, run_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's own answer was plain text, "Unknown Expect: <the header>", before the token
    was asked for; every error of this API is JSON. 100-continue is still met."""
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret-token")
    running: Running = await run_daemon(
        make_config(tmp_path, admin='token = "env:TEST_ADMIN_TOKEN"')
    )
    answers = []
    for expect in (b"<script>x</script>", b"100-continue"):
        conn = await RawConn.open(running.admin_url.removeprefix("http://"))
        try:
            await conn.head(b"/stats", [(b"Expect", expect)], method=b"GET")
            answer = await conn.answer()
            if answer.status == 100:  # met: the final answer follows
                answer = await conn.answer()
            answers.append(answer)
        finally:
            await conn.close()
    odd, met = answers
    assert (odd.status, odd.doc) == (
        417,
        {"error": "unknown expectation: only 100-continue is met"},
    )
    assert met.status == 401 and set(met.doc) == {"error"}  # then the token is asked for


def test_stats_polled_many_times_a_second_still_measure_the_whole_minute() -> None:
    """A dashboard or a script polling ``/stats`` 100 times a second keeps a 60 s window."""
    clock = ManualClock()
    pool = cast(WorkerPool, SimpleNamespace(clock=clock, outcomes={"done": 0}))
    intake = IntakeState()
    throughput = Throughput(pool, intake)
    for _ in range(90 * 100):  # 90 s of polls, 10 ms apart, one webhook accepted per poll
        clock.advance(0.01)
        intake.accepted += 1
        rates = throughput.rates()
    assert rates["window_s"] == pytest.approx(60, abs=1.1)
    assert rates["accepted_per_s"] == pytest.approx(100, rel=0.02)


async def test_a_burst_an_hour_ago_is_not_read_as_the_current_rate() -> None:
    """The rates are over the last minute however seldom they are asked for. Sampled only
    when asked, they measured against the last sample however old: the heartbeat's, 30 s
    apart, made a window of up to 90 s, and with no one asking an hour-old burst was read, an
    hour later, as intake now."""
    clock = ManualClock()
    outcomes = {"done": 0}
    intake = IntakeState()
    throughput = Throughput(
        cast(WorkerPool, SimpleNamespace(clock=clock, outcomes=outcomes)), intake
    )
    start = clock.monotonic()
    during: list[dict[str, float]] = []

    class AnHourLater(Exception):
        pass

    async def sleep(seconds: float) -> None:  # simulated time: no real waiting
        clock.advance(seconds)
        elapsed = clock.monotonic() - start
        if elapsed <= 60:  # a burst in the first minute: 100 webhooks a second, all delivered
            intake.accepted += 100
            outcomes["done"] += 100
            if elapsed == 60:
                during.append(throughput.rates())
        elif elapsed > 3660:  # then an hour with no webhook, and no one asking
            raise AnHourLater

    with pytest.raises(AnHourLater):
        await throughput.run(sleep)
    assert (during[0]["accepted_per_s"], during[0]["finished_per_s"]) == (100, 100)
    rates = throughput.rates()  # the dashboard is opened
    assert (rates["accepted_per_s"], rates["finished_per_s"]) == (0, 0), rates
    assert rates["window_s"] == pytest.approx(60, abs=1.1)


def test_duplicates_are_said_apart_from_accepted_webhooks() -> None:
    """A sender retrying one delivery in a loop is answered 200 each time, and the journal
    takes nothing: accepted/s counted those answers as intake while the dashboard's chart,
    read from the journal, showed none."""
    clock = ManualClock()
    pool = cast(WorkerPool, SimpleNamespace(clock=clock, outcomes={"done": 0}))
    intake = IntakeState(duplicates=Counter(shop=7), accepted=3)  # before the window began
    throughput = Throughput(pool, intake)
    for _ in range(60):  # a minute: 10 new events and 90 duplicates a second
        clock.advance(1)
        intake.accepted += 10
        intake.duplicates["shop"] += 90
        rates = throughput.rates()
    assert rates["accepted_per_s"] == pytest.approx(10, rel=0.02)
    assert rates["duplicates_per_s"] == pytest.approx(90, rel=0.02)


async def test_provider_handshakes_are_not_counted_as_accepted_webhooks(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """Meta's ``hub.challenge`` GET (as Slack's ``url_verification``) is answered 200 and
    journals nothing: counted among the receiver's 2xx answers, 50 of them read as thousands
    of webhooks a second on the dashboard while the journal took none. A new event counts."""
    source = """
[sources.meta]
verify = { scheme = "meta", secret = "app-secret", verify_token = "vt-1" }
[[sources.meta.actions]]
type = "log"

[sources.shop]
[[sources.shop.actions]]
type = "log"
"""
    running: Running = await run_daemon(make_config(tmp_path, source))
    query = "hub.mode=subscribe&hub.verify_token=vt-1&hub.challenge=c"
    for _ in range(50):
        async with running.http.get(f"{running.url}/hooks/meta?{query}") as r:
            assert (r.status, await r.text()) == (200, "c")
    status, stats = await get(running, "/stats")
    assert status == 200 and stats["events"] == 0
    assert stats["throughput"]["accepted_per_s"] == 0, stats["throughput"]
    for duplicate in (False, True):  # one new event, then its duplicate: one of each
        status, answer = await running.post("/hooks/shop", b'{"n": 1}')
        assert answer["duplicate"] is duplicate, (status, answer)
    status, stats = await get(running, "/stats")
    rates = stats["throughput"]
    assert stats["events"] == 1 and rates["accepted_per_s"] == rates["duplicates_per_s"] > 0


def test_only_jobs_that_end_are_counted_as_finished() -> None:
    """A lane's waits (its pace, a 429) reschedule a job that did not run: a busy lane's
    thousands of them made finished/s rise as real throughput fell. A retry (a target
    answering 500 again and again) puts its job back too: against a dead target, finished/s
    read as progress while nothing finished. Done, dead and cancelled jobs are what ends."""
    clock = ManualClock()
    outcomes = {"done": 0, "wait": 0}
    throughput = Throughput(cast(WorkerPool, SimpleNamespace(clock=clock, outcomes=outcomes)))
    throughput.rates()
    clock.advance(10.0)
    outcomes.update(done=40, dead=5, cancelled=5, wait=5000, retry=700, interrupted=3)
    assert throughput.rates()["finished_per_s"] == 5.0


async def test_every_admin_answer_is_kept_from_caches_and_sniffing(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """Answers carry bodies and results: ``no-store``, and JSON is never read as a page."""
    running: Running = await run_daemon(make_config(tmp_path))
    for path in ("/events", "/stats", "/metrics", "/nope"):
        async with running.http.get(running.admin_url + path) as r:
            assert r.headers["Cache-Control"] == "no-store", path
            assert r.headers["X-Content-Type-Options"] == "nosniff", path


async def test_admin_answers_unknown_paths_with_json(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """A path the admin API does not have is a JSON 404, like every other refusal."""
    running: Running = await run_daemon(make_config(tmp_path))
    status, doc = await get(running, "/nope")
    assert (status, set(doc)) == (404, {"error"})


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/stats", "GET,HEAD"),
        ("DELETE", "/events/evt_x", "GET,HEAD"),
        ("GET", "/events/evt_x/replay", "POST"),
        ("PUT", "/", "GET,HEAD"),
    ],
)
async def test_a_method_a_route_does_not_take_is_a_json_405_naming_the_allowed_ones(
    tmp_path: Path, run_daemon: StartDaemon, method: str, path: str, allow: str
) -> None:
    """RFC 9110 §15.5.6: aiohttp's router puts Allow on its 405; the JSON answer keeps it."""
    running: Running = await run_daemon(make_config(tmp_path))
    url = running.admin_url + path
    async with running.http.request(method, url, headers={"X-Webhookd": "1"}) as r:
        assert r.status == 405
        assert r.headers.get("Allow") == allow
        assert r.content_type == "application/json" and set(await r.json()) == {"error"}


async def test_an_unexpected_error_is_a_json_500_with_one_log_record(
    tmp_path: Path, run_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A bug behind an admin route answers JSON like every refusal, and logs one traceback."""
    running: Running = await run_daemon(make_config(tmp_path))
    journal = running.daemon.journal
    assert journal is not None

    async def broken(**_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(journal, "list_events", broken)
    with caplog.at_level(logging.ERROR, logger="webhookd.admin"):
        status, doc = await get(running, "/events")
    assert (status, doc) == (500, {"error": "internal error"})
    records = [r for r in caplog.records if r.name == "webhookd.admin"]
    assert len(records) == 1 and records[0].exc_info is not None


async def test_a_daemon_started_with_tune_gc_freezes_its_startup_objects(
    tmp_path: Path, run_daemon: StartDaemon
) -> None:
    """``webhookd serve`` (``tune_gc=True``) freezes what startup made and collects young
    objects less often, so no full collection walks them while webhooks wait; tests' own
    daemons leave the collector alone."""
    import gc

    from webhookd.process import GC_THRESHOLDS

    before = gc.get_threshold()
    try:
        running: Running = await run_daemon(make_config(tmp_path), tune_gc=True)
        assert gc.get_freeze_count() > 1000
        assert gc.get_threshold() == GC_THRESHOLDS
        assert (await get(running, "/healthz"))[0] == 200
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


SIGNATURE_HEADERS = (
    "X-Hub-Signature-256",
    "Stripe-Signature",
    "X-Shopify-Hmac-Sha256",
    "webhook-signature",
    "X-Twilio-Signature",
    "X-Slack-Signature",
)


async def test_event_detail_shows_the_body_and_headers_with_signatures_masked(
    tmp_path: Path, target: Target, run_daemon: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/events/<id> carries the body as text and the headers, every signature header (any
    provider's) and credential header masked; ordinary headers are shown as sent."""
    monkeypatch.setenv("GH_TEST_SECRET", "gh-test-secret-1")
    cfg = make_config(
        tmp_path,
        forward_source(
            "gh", target.url + "/gh", verify='{ scheme = "github", secret = "env:GH_TEST_SECRET" }'
        ),
    )
    running: Running = await run_daemon(cfg)
    outcomes = Outcomes(running)
    body = b'{"ref": "refs/heads/main", "n": 1}'
    made = send.build(
        cfg.sources["gh"], url=running.url + "/hooks/gh", body=body, now=0, delivery_id="d-1"
    )
    others = {name: f"v1=not-a-real-mac-{i:04}" for i, name in enumerate(SIGNATURE_HEADERS[1:])}
    extra = {**others, "Authorization": "Bearer caller-token", "X-Request-Note": "visible"}
    status, doc = await running.post("/hooks/gh", made.body, headers={**made.headers, **extra})
    assert status == 202, doc
    await outcomes.wait(doc["id"], "done")

    status, detail = await get(running, f"/events/{doc['id']}")
    assert status == 200
    assert set(detail) >= EVENT_KEYS  # the contract's fields are all still there
    assert detail["body"] == body.decode() and detail["body_truncated"] is False
    shown = {k.lower(): v for k, v in detail["headers"]}
    for name in (*SIGNATURE_HEADERS, "Authorization"):
        assert shown[name.lower()] == "***", name
    assert shown["x-request-note"] == "visible"
    assert shown["x-github-delivery"] == "d-1"
    text = json.dumps(detail)
    for secret in (made.headers["X-Hub-Signature-256"], *others.values(), "caller-token"):
        assert secret not in text


async def test_event_detail_truncates_a_big_body_and_says_so(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """A body past 64 KiB comes back as its first 64 KiB with ``body_truncated``; the journal
    keeps it whole (the forward delivers every byte)."""
    running: Running = await run_daemon(make_config(tmp_path, forward_sources(target.url, "shop")))
    outcomes = Outcomes(running)
    body = '{"blob": "' + "x" * 100_000 + '"}'
    event_id = await accept(running, "/hooks/shop", body)
    await outcomes.wait(event_id, "done")
    _, detail = await get(running, f"/events/{event_id}")
    assert detail["body_truncated"] is True and detail["body_bytes"] == len(body)
    assert detail["body"] == body[: 64 * 1024]
    assert target.seen[0].body == body.encode()


async def test_stats_series_counts_accepted_finished_dead_and_backlog_per_minute(
    tmp_path: Path, target: Target, run_daemon: StartDaemon
) -> None:
    """/stats/series gives per-minute accepted, done and dead counts and the backlog from the
    journal, for all sources or one; bad parameters are a JSON 400."""
    cfg = make_config(tmp_path, forward_sources(target.url, "shop", "mail"))
    running: Running = await run_daemon(cfg)
    outcomes = Outcomes(running)
    for path, body in (("/hooks/shop", '{"n": 1}'), ("/hooks/shop", '{"n": 2}')):
        await outcomes.wait(await accept(running, path, body), "done")
    target.statuses = [500]
    await outcomes.wait(await accept(running, "/hooks/mail", '{"n": 3}'), "dead")

    before = running.daemon.clock.time()
    status, doc = await get(running, "/stats/series?minutes=5")
    after = running.daemon.clock.time()
    assert status == 200, doc
    assert set(doc) == {
        "source",
        "start",
        "step_s",
        "accepted",
        "finished",
        "dead",
        "backlog",
        "age_s",
        "cut_by_retention",
        "retention_keeps_s",
    }
    # Retention keeps done events 24 h by default: the window is whole.
    assert doc["cut_by_retention"] is False and doc["retention_keeps_s"] == 24 * 3600
    assert doc["step_s"] == 60 and doc["start"] % 60 == 0 and doc["source"] is None
    assert doc["start"] + 4 * 60 <= after and before < doc["start"] + 5 * 60  # ends this minute
    assert all(len(doc[k]) == 5 for k in ("accepted", "finished", "dead", "backlog"))
    assert (sum(doc["accepted"]), sum(doc["finished"]), sum(doc["dead"])) == (3, 2, 1)
    assert doc["backlog"][-1] == 0

    _, mail = await get(running, "/stats/series?minutes=2&source=mail")
    assert mail["source"] == "mail" and len(mail["accepted"]) == 2
    assert (sum(mail["accepted"]), sum(mail["finished"]), sum(mail["dead"])) == (1, 0, 1)
    _, default = await get(running, "/stats/series")
    assert len(default["accepted"]) == 60 and sum(default["accepted"]) == 3

    for bad in ("minutes=0", "minutes=1441", "minutes=ten", "minutes=1.5", "source=" + "s" * 201):
        status, error = await get(running, "/stats/series?" + bad)
        assert status == 400 and set(error) == {"error"}, bad
