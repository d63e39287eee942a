"""Every CLI verb and admin endpoint against a real journal and a running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner, Result
from conftest import DatabaseOutage, Running, Target, fresh_database, make_config
from ops_support import (
    TOKEN_ENV,
    accepted,
    cli,
    event_state,
    forward_source,
    ingest,
    write_config,
)
from procs import Procs, clean_env, poll, spawn
from test_journal_contract import Store, finished, new_event
from test_workers import hung_target

from webhookd import __version__, actions, models
from webhookd import config as config_mod
from webhookd.cli import _verified_line, main
from webhookd.cli import reads as cli_reads
from webhookd.cli import serving as cli_serving
from webhookd.clock import ManualClock
from webhookd.errors import ConfigError
from webhookd.journal import (
    BaseJournal,
    Finished,
    Journal,
    NewEvent,
    NewJob,
    _take_serve_lock,
    open_journal,
    serve_lock_file,
)
from webhookd.journal import schema as sqlite_schema
from webhookd.journal.postgres import schema as postgres_schema
from webhookd.journal.postgres.db import redact_url
from webhookd.journal.records import EventSummary
from webhookd.models import JobState, event_id_time, new_event_id, new_job_id


async def dead_event(running: Running, target: Target, source: str = "shop") -> str:
    """One event whose single delivery attempt failed: in the dead-letter queue."""
    target.statuses = [500]
    event_id = await accepted(running, source)
    await event_state(running.http, running.admin_url, event_id, "dead")
    return event_id


async def _wire(
    request: pytest.FixtureRequest, tmp_path: Path, body: str, run_daemon: Any
) -> AsyncIterator[tuple[Path, Running]]:
    """A config file of ``body`` and a daemon running it, with the journal in SQLite or in
    PostgreSQL (``request.param``): every verb works against either with the same file."""
    path, cfg = write_config(tmp_path, body)
    if request.param == "sqlite":
        yield path, await run_daemon(cfg)
        return
    async with fresh_database(request.getfixturevalue("pg_server_url")) as url:
        text = path.read_text().replace(f'path = "{cfg.journal.path}"', f'url = "{url}"')
        path.write_text(text, encoding="utf-8")
        cfg = config_mod.loads(text, str(path))
        actions.validate(cfg)
        running = await run_daemon(cfg)
        yield path, running
        await running.stop()  # before its database is dropped


@pytest.fixture(params=["sqlite", "postgres"])
async def wired(
    request: pytest.FixtureRequest, tmp_path: Path, target: Target, run_daemon: Any
) -> AsyncIterator[tuple[Path, Running]]:
    """Two forwarding sources, shop and mail, on either journal."""
    body = forward_source("shop", target.url + "/shop") + forward_source("mail", target.url + "/m")
    async for wire in _wire(request, tmp_path, body, run_daemon):
        yield wire


@pytest.fixture(params=["sqlite", "postgres"])
async def tenanted(
    request: pytest.FixtureRequest, tmp_path: Path, target: Target, run_daemon: Any
) -> AsyncIterator[tuple[Path, Running]]:
    """Two forwarding sources on either journal: shop's tenant is a plain header, api's the
    Authorization header, which the journal keeps as its digest."""
    body = forward_source("shop", target.url + "/shop", tenant="header:X-Shop") + forward_source(
        "api", target.url + "/api", tenant="header:Authorization"
    )
    async for wire in _wire(request, tmp_path, body, run_daemon):
        yield wire


async def test_show_events_and_stats_read_the_journal_beside_a_running_daemon(
    wired: tuple[Path, Running], target: Target
) -> None:
    """show (text, --json), events (--json, --state, --source, --since), stats (table, --json)."""
    config, running = wired
    dead = await dead_event(running, target)
    done = await accepted(running, "mail")
    await event_state(running.http, running.admin_url, done, "done")

    out = await cli("show", dead, "--config", str(config))
    assert out.exit_code == 0, out.output
    assert f"event    {dead}  [dead]" in out.output and "answered 500" in out.output
    assert "\n      response: answer 500\n" in out.output  # what the target said, on its line
    out = await cli("show", dead, "--json", "--config", str(config))
    doc = json.loads(out.output)
    assert doc["state"] == "dead" and doc["jobs"][0]["errors"][0]["outcome"] == "dead"
    async with running.http.get(f"{running.admin_url}/events/{dead}") as r:
        assert await r.json() == doc  # one shape for the API and the CLI

    out = await cli("events", "--json", "--config", str(config))
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [r["id"] for r in rows] == [done, dead]  # newest first
    out = await cli("events", "--state", "dead", "--config", str(config))
    assert dead in out.output and done not in out.output
    out = await cli("events", "--source", "mail", "--since", "10m", "--config", str(config))
    assert done in out.output and dead not in out.output
    out = await cli("events", "--since", "2000-01-01T00:00", "--json", "--config", str(config))
    assert len(out.output.splitlines()) == 2
    out = await cli("events", "--since", "2999-01-01T00:00", "--config", str(config))
    assert out.exit_code == 0 and "no events" in out.output
    # A page with more after it says so; a source not configured is said to be so.
    out = await cli("events", "--limit", "1", "--config", str(config))
    assert out.stdout.count("\n") == 1 and out.stderr == (
        f"webhookd: note: the newest 1 shown; --limit for more, or --before {done} for the"
        " next page\n"
    )
    # The next page: past --limit's 100,000 too.
    out = await cli("events", "--limit", "1", "--before", done, "--json", "--config", str(config))
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == [dead]
    assert out.stderr == ""  # the last page: no pointer to a page that is not there
    out = await cli("events", "--before", "evt_nope", "--config", str(config))
    assert out.exit_code == 2 and "--before" in out.output
    for verb in (
        ["events", "--source", "mali"],
        ["replay", "--dead", "--source", "mali", "--dry-run"],
    ):
        out = await cli(*verb, "--config", str(config))
        assert out.exit_code == 0, out.output
        assert out.stderr.splitlines()[0] == (
            f"webhookd: note: no source 'mali' in {config} (did you mean mail?): only events"
            " journaled under that name match"
        )
    out = await cli("cancel", dead, "--config", str(config))
    assert out.stdout == (
        "cancelled 0 job(s) of 1 event(s) (only queued jobs are cancelled: none of theirs was)\n"
    )

    out = await cli("stats", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert "backlog        0 job(s)" in out.output
    assert "attempts 5 min dead 1  done 1" in out.output
    assert any(line.startswith("shop ") for line in out.output.splitlines())
    out = await cli("stats", "--json", "--config", str(config))
    doc = json.loads(out.output)
    assert doc["jobs"]["dead"] == 1 and doc["sources"]["mail"]["done"] == 1
    assert doc["daemon"] is None  # the admin port is 0 in the file: not reachable by the CLI
    # The dead letters by cause: source, action, the start of the error, how many, how recent.
    [cause] = doc["dead_causes"]
    assert (cause["source"], cause["action"], cause["jobs"]) == ("shop", "deliver", 1)
    assert cause["error"].endswith("answered 500") and cause["last_at"] <= time.time()
    table = await cli("stats", "--config", str(config))
    said = r"\n      1  shop/deliver  gave up .*: http://\S+ answered 500  \(latest \d+s ago\)"
    assert re.search(said, table.output), table.output
    # A SQLite journal's files and their sizes; PostgreSQL's tables with their indexes.
    on_sqlite = isinstance(running.daemon.journal, Journal)
    sizes = doc["journal_bytes"]
    assert set(sizes) == ({"db", "wal"} if on_sqlite else {"tables"})
    assert sizes["db" if on_sqlite else "tables"] > 0
    table = await cli("stats", "--config", str(config))
    (line,) = [line for line in table.output.splitlines() if line.startswith("journal  ")]
    assert (
        line.endswith(" MB") and " MB   WAL " in line
        if on_sqlite
        else line.endswith(" MB in PostgreSQL")
    )

    # Found by what its body holds.
    order = await accepted(running, "mail", '{"order": "ord_77", "name": "Zoë"}')
    out = await cli("events", "--contains", "ord_77", "--config", str(config))
    assert out.exit_code == 0 and order in out.output and done not in out.output
    out = await cli("events", "--contains", "Zoë", "--source", "shop", "--config", str(config))
    assert out.exit_code == 0 and out.output == "no events\n"
    out = await cli("events", "--contains", '"Zoë"', "--json", "--config", str(config))
    assert [json.loads(line)["id"] for line in out.output.splitlines()] == [order]


async def test_replay_ids_and_dead_with_filters_and_dry_run(
    wired: tuple[Path, Running], target: Target
) -> None:
    """replay <id> and --dead [--source] [--since] [--dry-run] re-queue; the daemon delivers."""
    config, running = wired
    first = await dead_event(running, target)
    second = await dead_event(running, target, "mail")

    out = await cli("replay", "--dead", "--dry-run", "--config", str(config))
    assert out.exit_code == 0 and "would replay 2 event(s)" in out.output
    assert (await event_state(running.http, running.admin_url, first, "dead"))["state"] == "dead"

    args = ("--dead", "--source", "mail", "--since", "1h")
    out = await cli("replay", *args, "--config", str(config))
    assert out.exit_code == 0 and "replayed 1 event(s), 1 job(s) re-queued" in out.output
    await event_state(running.http, running.admin_url, second, "done")

    out = await cli("replay", first, "--config", str(config))
    assert out.exit_code == 0, out.output
    await event_state(running.http, running.admin_url, first, "done")
    assert len(target.seen) == 4
    out = await cli("show", first, "--config", str(config))
    # The replay's fresh first attempt follows the dead one's, marked as such.
    shown = r"#1 .* dead: .*\n      response: answer 500\n    replayed:\n    #1 .* done"
    assert re.search(shown, out.output), out.output

    out = await cli("replay", "evt_nope", "--config", str(config))
    assert out.exit_code == 1 and "no event evt_nope" in out.output

    pause = f"{running.admin_url}/sources/shop/pause"
    async with running.http.post(pause, headers={"X-Webhookd": "1"}) as r:
        assert r.status == 200  # answered once the dispatcher holds the source's jobs
    held = await accepted(running, "shop", '{"held": 1}')  # queued, due: nothing to add
    out = await cli("replay", held, "--config", str(config))
    assert out.output == "nothing to replay: the jobs of 1 event(s) are queued or running\n"


async def test_cancel_dead_dismisses_dead_letters_and_replay_brings_them_back(
    wired: tuple[Path, Running], target: Target
) -> None:
    """cancel --dead [--source] [--dry-run], or with ids: the dead jobs become cancelled, the
    events leave the dead letters, nothing is delivered; replay still runs them again."""
    config, running = wired
    first = await dead_event(running, target)
    second = await dead_event(running, target, "mail")
    delivered = len(target.seen)

    out = await cli("cancel", "--dead", "--dry-run", "--config", str(config))
    assert out.exit_code == 0 and "would cancel the dead jobs of 2 event(s)" in out.output
    out = await cli("cancel", "--dead", "--source", "mail", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert out.output == (
        "dismissed 1 dead job(s) of 1 event(s): cancelled, attempts and errors kept\n"
    )
    doc = await event_state(running.http, running.admin_url, second, "cancelled")
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("cancelled", 1)]
    out = await cli("events", "--state", "dead", "--config", str(config))
    assert first in out.output and second not in out.output

    out = await cli("cancel", first, second, "--dead", "--config", str(config))
    assert out.exit_code == 0 and "dismissed 1 dead job(s) of 2 event(s)" in out.output
    out = await cli("cancel", second, "--dead", "--config", str(config))
    assert out.output == "dismissed 0 dead job(s) of 1 event(s) (none of theirs was dead)\n"
    await event_state(running.http, running.admin_url, first, "cancelled")
    assert len(target.seen) == delivered

    out = await cli("show", first, "--config", str(config))
    assert "dismissed " in out.output and "(replay --dismissed undoes it)" in out.output
    out = await cli("replay", "--dismissed", "--dead", "--config", str(config))
    assert out.exit_code == 2
    assert "give one of --dead, --dismissed, --done and --cancelled" in out.output
    out = await cli(
        "replay", "--dismissed", "--source", "shop", "--dry-run", "--config", str(config)
    )
    assert out.exit_code == 0 and "would replay 1 event(s)" in out.output and first in out.output
    out = await cli("replay", "--dismissed", "--source", "shop", "--config", str(config))
    assert out.exit_code == 0 and "1 job(s) re-queued" in out.output
    await event_state(running.http, running.admin_url, first, "done")
    out = await cli("replay", first, "--dismissed", "--config", str(config))
    assert out.output == "nothing to replay: none of the jobs of 1 event(s) was dismissed\n"


async def test_the_daemon_counts_the_jobs_a_replay_from_the_cli_queues(
    wired: tuple[Path, Running], target: Target
) -> None:
    """A replay from the CLI is another process's write: within a sweep (a heartbeat on
    PostgreSQL) the daemon's backlog, which ``/stats``, ``/metrics`` and ``max_backlog`` read,
    counts the job it queued again, and is 0 once that job is done, not below."""
    config, running = wired
    dead = await dead_event(running, target)
    pause = f"{running.admin_url}/sources/shop/pause"
    async with running.http.post(pause, headers={"X-Webhookd": "1"}) as r:
        assert r.status == 200  # answered once the dispatcher holds the source's jobs
    out = await cli("replay", dead, "--config", str(config))
    assert out.exit_code == 0 and "1 job(s) re-queued" in out.output

    async def backlog_is(n: int) -> bool:
        async with running.http.get(running.admin_url + "/stats") as r:
            return int((await r.json())["backlog"]) == n

    await poll(lambda: backlog_is(1), timeout_s=20)
    target.statuses = [200]
    assert (await cli("resume", "shop", "--config", str(config))).exit_code == 0
    await event_state(running.http, running.admin_url, dead, "done")
    assert await backlog_is(0)
    async with running.http.get(running.admin_url + "/metrics") as r:
        assert re.search(r"^webhookd_backlog_jobs 0\.0$", await r.text(), re.M)


async def test_pause_holds_processing_but_keeps_accepting_and_resume_releases(
    wired: tuple[Path, Running], target: Target
) -> None:
    """A paused source's webhooks are acked and journaled but not run until resumed. With the
    daemon's admin API at a port the config names, the CLI has it apply the pause before it
    answers: a webhook sent right after the answer starts no job (the daemon's own reading of
    the journal would take up to a second). On PostgreSQL the answer speaks of the nodes, the
    one asked and the others (it spoke of one daemon). The resume's line, as the pause's,
    says which."""
    config, running = wired
    pool = running.daemon.pool
    assert pool is not None
    cluster = running.daemon.config.journal.url is not None
    unknown_port = await cli("pause", "shop", "--config", str(config))  # admin port 0: unknown
    assert unknown_port.exit_code == 0 and unknown_port.output == (
        "paused shop: the nodes start none of its jobs within a second (running ones finish"
        " their attempt)\n"
        if cluster
        else "paused shop: the daemon starts none of its jobs within a second, if one runs"
        " (running ones finish their attempt)\n"
    )
    out = await cli("resume", "shop", "--config", str(config))
    assert out.exit_code == 0 and out.output == (
        "resumed shop: the nodes start its jobs again within a second\n"
        if cluster
        else "resumed shop: the daemon starts its jobs again within a second, if one runs\n"
    )
    text = config.read_text().replace(
        '[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "{running.daemon.bound.admin}"'
    )
    config.write_text(text, encoding="utf-8")
    out = await cli("pause", "shop", "--config", str(config))
    assert out.exit_code == 0 and out.output == (
        "paused shop: this config's node starts none of its jobs from now, the other nodes"
        " within a second (running ones finish their attempt)\n"
        if cluster
        else "paused shop: the daemon starts none of its jobs from now (running ones finish"
        " their attempt)\n"
    )
    assert "shop" in pool.paused  # applied before the CLI answered
    out = await cli("pause", "shop", "--config", str(config))
    assert "already paused" in out.output
    out = await cli("pause", "shop", "--json", "--config", str(config))
    assert (out.exit_code, json.loads(out.stdout)) == (
        0,
        {
            "source": "shop",
            "paused": True,
            "changed": False,
            "applied": True,
            "removed": False,
            "catch_all": False,
            "journaled": False,
        },
    )
    held = await accepted(running, "shop")
    other = await accepted(running, "mail")
    await event_state(running.http, running.admin_url, other, "done")
    assert [s.path for s in target.seen] == ["/m"]
    async with running.http.get(running.admin_url + "/stats") as r:
        stats = await r.json()
    assert stats["paused"] == ["shop"] and stats["backlog"] == 1
    out = await cli("stats", "--config", str(config))
    assert "paused         shop" in out.output
    out = await cli("show", held, "--config", str(config))  # not a next run long past
    assert "\n    held: shop is paused (webhookd resume shop)\n" in out.output

    out = await cli("resume", "shop", "--config", str(config))
    assert out.exit_code == 0 and out.output == (
        "resumed shop: this config's node starts its jobs again from now, the other nodes"
        " within a second\n"
        if cluster
        else "resumed shop: the daemon starts its jobs again from now\n"
    )
    await event_state(running.http, running.admin_url, held, "done")
    assert [s.path for s in target.seen] == ["/m", "/shop"]
    out = await cli("resume", "shop", "--config", str(config))
    assert "was not paused" in out.output


async def test_resuming_a_removed_source_beside_a_running_daemon_notes_nothing_amiss(
    wired: tuple[Path, Running],
) -> None:
    """A paused source the config no longer has, resumed while the daemon runs: the CLI does
    not ask the daemon to apply it (it would answer 404, the name being paused no more) and so
    writes no note saying the daemon was not asked; the daemon reads the resume by itself."""
    config, running = wired
    text = config.read_text().replace(
        '[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "{running.daemon.bound.admin}"'
    )
    config.write_text(text, encoding="utf-8")
    await running.daemon.journal.pause("gone")
    out = await cli("resume", "gone", "--config", str(config))
    assert (out.exit_code, out.output) == (
        0,
        f"resumed gone, which {config} has no more: its queued jobs go dead at their turn"
        " (webhookd replay --dead runs them once it is back)\n",
    )
    async with running.http.get(running.admin_url + "/stats") as r:
        assert "gone" not in (await r.json())["paused"]


async def test_the_catch_alls_own_name_is_refused_for_a_pause_and_noted_for_a_filter(
    tmp_path: Path,
) -> None:
    """A catch-all's jobs go by the name each webhook came to, never "*" (which stats sums
    them under): a pause of "*" would hold nothing, so it is refused; the filters say that
    nothing is journaled under it; a name it takes is paused as any source is. So would a
    pause of a configured source's name in another case (the receiver refuses /hooks/Shop
    beside "shop"): it used to say "paused Shop" while shop's jobs ran on."""
    path, cfg = write_config(
        tmp_path,
        '[sources."*"]\n[[sources."*".actions]]\ntype = "log"\n'
        '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n',
    )
    async with Journal(cfg.journal.path):
        pass  # made, as a first start makes it
    config = ("--config", str(path))
    said = (
        '"*" is the catch-all: its events and jobs go by the name each webhook came to'
        " (/hooks/<name>); give that name (webhookd events lists them)"
    )
    out = await cli("pause", "*", *config)
    assert (out.exit_code, out.stderr) == (2, f"webhookd: error: {said}\n")
    out = await cli("pause", "billing", *config)
    assert (out.exit_code, out.stdout.partition(":")[0]) == (0, "paused billing")
    out = await cli("pause", "Shop", *config)
    assert (out.exit_code, out.stderr) == (
        2,
        "webhookd: error: no source 'Shop': source names are case-sensitive, and the receiver"
        " refuses /hooks/Shop beside 'shop' (did you mean shop?)\n",
    )
    out = await cli("events", "--source", "SHOP", *config)
    assert out.stderr.startswith("webhookd: note: no source 'SHOP': source names are case-")
    out = await cli("resume", "*", *config)  # one paused by an earlier webhookd can go
    assert (out.exit_code, out.stdout) == (0, "* was not paused\n")
    out = await cli("events", "--source", "*", *config)
    assert out.stderr.startswith(f"webhookd: note: {said}: nothing is journaled under it\n")
    # A name the catch-all takes has the catch-all's actions: a slip of one is noted.
    out = await cli("replay", "--done", "--source", "billing", "--action", "lgo", *config)
    assert out.stderr.startswith(
        f"webhookd: note: no action 'lgo' of source 'billing' in {path} (did you mean log?)"
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def caught(
    request: pytest.FixtureRequest, tmp_path: Path, run_daemon: Any
) -> AsyncIterator[tuple[Path, Running]]:
    """Sources github and stripe beside a catch-all, on either journal, the config naming the
    daemon's admin API (so the CLI has it apply a pause)."""
    body = "".join(
        f'[[sources.{name}.actions]]\ntype = "log"\n' for name in ("github", "stripe", '"*"')
    )
    async for path, running in _wire(request, tmp_path, body, run_daemon):
        text = path.read_text().replace(
            '[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "{running.daemon.bound.admin}"'
        )
        path.write_text(text, encoding="utf-8")
        yield path, running


async def test_a_pause_of_a_slip_of_a_sources_name_beside_a_catch_all_is_refused(
    caught: tuple[Path, Running],
) -> None:
    """Beside a catch-all, ``pause githb`` said "paused githb", exit 0, while github's jobs ran
    on: the catch-all takes every name. A slip of a configured source's name (the did-you-mean
    of the other verbs) is refused as it is without a catch-all, for a resume too, unless the
    catch-all has taken webhooks under it; a name it takes that is close to none is paused,
    the line and the JSON saying it is no configured source and, until one comes, that no
    webhook has come under it. A slip paused before (by an earlier webhookd) can be resumed."""
    path, running = caught
    config = ("--config", str(path))
    for verb in ("pause", "resume"):
        for slip, meant in (("githb", "github"), ("stripee", "stripe")):
            out = await cli(verb, slip, "--json", *config)
            assert (out.exit_code, out.stdout, out.stderr) == (
                2,
                "",
                f"webhookd: error: no source {slip!r} (did you mean {meant}?): the catch-all"
                ' "*" would take the name, but no webhook has come under it\n',
            )
    async with running.http.get(running.admin_url + "/stats") as r:
        assert (await r.json())["paused"] == []

    said = {"paused": True, "changed": True, "applied": True, "removed": False}
    await accepted(running, "stripes")  # close to stripe, but a name the catch-all took
    out = await cli("pause", "stripes", "--json", *config)
    assert (out.exit_code, out.stderr) == (0, ""), out.output
    assert _json_of(out) == {**said, "source": "stripes", "catch_all": True, "journaled": True}
    out = await cli("pause", "stripes", *config)
    assert (out.exit_code, out.stdout) == (
        0,
        "stripes was already paused; stripes is no configured source but a name the catch-all"
        ' "*" takes\n',
    )
    out = await cli("pause", "billing", *config)
    held = (
        "this config's node starts none of its jobs from now, the other nodes within a second"
        if running.daemon.config.journal.url is not None
        else "the daemon starts none of its jobs from now"
    )
    assert (out.exit_code, out.stdout) == (
        0,
        f"paused billing: {held} (running ones finish their attempt); billing is no configured"
        ' source but a name the catch-all "*" takes, and no webhook has come under it yet\n',
    )
    out = await cli("pause", "github", "--json", *config)
    assert _json_of(out) == {**said, "source": "github", "catch_all": False, "journaled": False}
    out = await cli("resume", "github", *config)
    cluster = running.daemon.config.journal.url is not None
    assert (out.exit_code, out.stdout) == (
        0,
        "resumed github: this config's node starts its jobs again from now, the other nodes"
        " within a second\n"
        if cluster
        else "resumed github: the daemon starts its jobs again from now\n",
    )

    await running.daemon.journal.pause("githb")
    assert running.daemon.pool is not None
    await running.daemon.pool.pause_applied()  # the daemon holds it too
    out = await cli("resume", "githb", *config)
    resumed = (
        "the nodes start its jobs again within a second"
        if cluster
        else "the daemon starts its jobs again within a second, if one runs"
    )
    assert out.stderr == "", out.stderr
    assert (out.exit_code, out.stdout) == (
        0,
        f"resumed githb: {resumed}; githb is no configured source but a name the catch-all"
        ' "*" takes, and no webhook has come under it yet\n',
    )
    async with running.http.get(running.admin_url + "/stats") as r:
        assert (await r.json())["paused"] == ["billing", "stripes"]


async def test_a_pause_of_the_catch_alls_name_without_one_says_there_is_none(
    tmp_path: Path,
) -> None:
    """``pause '*'`` of a config with no catch-all said "*" broke the rule of a source's name:
    it says "*" is the catch-all, and that this config has none."""
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    async with Journal(cfg.journal.path):
        pass
    for verb in ("pause", "resume"):
        out = await cli(verb, "*", "--config", str(path))
        assert (out.exit_code, out.stderr) == (
            2,
            f"webhookd: error: no source '*': \"*\" is the catch-all, and {path} has none"
            " (configured: shop)\n",
        )


async def test_help_says_what_follow_and_cancel_queued_take() -> None:
    """events --help said --follow was "not with --state", but --before is refused with it too;
    cancel --help said --queued cancels "every event that has a queued job", where it cancels
    running jobs too, as its --dry-run says."""
    out = await cli("events", "--help")
    assert "not with --state or --before" in " ".join(out.output.split())
    out = await cli("cancel", "--help")
    assert "Cancel the queued and running jobs of every event" in " ".join(out.output.split())


async def test_a_paused_source_the_config_no_longer_has_can_still_be_resumed(
    tmp_path: Path,
) -> None:
    """A source paused, then taken out of the config: its queued jobs would wait for good, as
    nothing could resume it. It is resumed (its jobs then go dead at their turn, as other
    removed sources' do); a pause of it, or a resume of a name never paused, is still refused."""
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    async with Journal(cfg.journal.path) as journal:
        await journal.pause("gone")
    config = ("--config", str(path))
    out = await cli("pause", "gone", *config)
    assert out.exit_code == 2 and "no source 'gone'" in out.output
    out = await cli("resume", "gone", *config)
    assert (out.exit_code, out.stdout) == (
        0,
        f"resumed gone, which {path} has no more: its queued jobs go dead at their turn"
        " (webhookd replay --dead runs them once it is back)\n",
    )
    async with Journal(cfg.journal.path) as journal:
        assert await journal.paused_sources() == set()
    out = await cli("resume", "gone", *config)
    assert out.exit_code == 2 and "no source 'gone'" in out.output


async def test_cancel_ids_and_queued_with_filters_and_dry_run_and_the_daemon_runs_none(
    wired: tuple[Path, Running], target: Target
) -> None:
    """cancel <id> and --queued [--source] [--since] [--dry-run]: the running daemon starts
    none of the cancelled jobs, delivers the rest, and a replay undoes a cancel."""
    config, running = wired
    pool = running.daemon.pool
    assert pool is not None
    await cli("pause", "shop", "--config", str(config))

    async def seen_by_daemon() -> bool:
        return "shop" in pool.paused

    await poll(seen_by_daemon, timeout_s=20)
    first, second, third = [await accepted(running, "shop", f'{{"n": {n}}}') for n in range(3)]

    out = await cli("cancel", first, "--config", str(config))
    assert out.exit_code == 0 and out.output.strip() == "cancelled 1 job(s) of 1 event(s)"
    out = await cli("cancel", "--queued", "--dry-run", "--config", str(config))
    lines = ["would cancel the queued and running jobs of 2 event(s)", second, third]
    assert out.output.splitlines() == lines
    out = await cli("cancel", "--queued", "--source", "mail", "--config", str(config))
    assert out.output.strip() == "cancelled 0 job(s) of 0 event(s)"
    out = await cli(
        "cancel", "--queued", "--since", "1h", "--source", "shop", "--config", str(config)
    )
    assert out.output.strip() == "cancelled 2 job(s) of 2 event(s)"
    out = await cli("show", second, "--config", str(config))
    assert f"event    {second}  [cancelled]" in out.output
    assert re.search(r"\n    cancelled \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z\n", out.output)
    out = await cli("replay", second, "--config", str(config))
    assert "1 job(s) re-queued" in out.output

    await cli("resume", "shop", "--config", str(config))
    await event_state(running.http, running.admin_url, second, "done")
    # The first was ahead of the second in the queue: had it been claimed, it would be too.
    for event_id in (first, third):
        doc = await event_state(running.http, running.admin_url, event_id, "cancelled")
        assert doc["jobs"][0]["attempts"] == 0
    assert [s.body for s in target.seen] == [b'{"n": 1}']

    out = await cli("cancel", first, "evt_nope", "--config", str(config))
    assert out.exit_code == 1 and "no event evt_nope" in out.output
    for args in ((), (first, "--queued"), (first, "--source", "shop")):
        out = await cli("cancel", *args, "--config", str(config))
        assert out.exit_code == 2


async def test_events_follow_prints_each_new_event_as_it_is_journaled(
    wired: tuple[Path, Running], tmp_path: Path
) -> None:
    """``events --follow`` (a real process beside the daemon): the listing oldest first (cut by
    --limit: the older one never shows), then each webhook accepted after it, in the order
    they came, filtered as asked; SIGINT ends it as a shell expects (130)."""
    config, running = wired
    await accepted(running, "shop", '{"n": "cut by the limit"}')
    listed = await accepted(running, "shop", '{"n": "listed"}')
    follow = await spawn(
        [
            "events",
            "--follow",
            "--json",
            "--limit",
            "1",
            "--source",
            "shop",
            "--config",
            str(config),
        ],
        tmp_path,
        stdout=asyncio.subprocess.PIPE,
    )
    assert follow.stdout is not None

    async def next_id() -> str:
        line = await asyncio.wait_for(follow.stdout.readline(), 15)
        assert line, "events --follow ended"
        doc: dict[str, Any] = json.loads(line)
        return str(doc["id"])

    try:
        assert await next_id() == listed
        later = [await accepted(running, "shop", json.dumps({"n": n})) for n in range(3)]
        await accepted(running, "mail")  # another source: not shown
        last = await accepted(running, "shop", '{"n": "last"}')
        assert [await next_id() for _ in range(4)] == [*later, last]
    finally:
        follow.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(follow.communicate(), 15)
    assert follow.returncode == 130, err

    out = await cli("events", "--follow", "--state", "dead", "--config", str(config))
    assert out.exit_code == 2
    assert "--follow prints events as they arrive, in whatever state" in out.output


class _Follower:
    """``events --follow --json`` as a process of its own: the ids it prints, what it says."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def ids(self, n: int, timeout_s: float = 15) -> list[str]:
        """The next ``n`` ids it prints, each within ``timeout_s``."""
        assert self.proc.stdout is not None
        got = []
        for _ in range(n):
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
            assert line, f"events --follow ended after {got}"
            got.append(json.loads(line)["id"])
        return got

    async def says(self, text: str, timeout_s: float = 30) -> None:
        """Until a line on its stderr holds ``text``."""
        assert self.proc.stderr is not None
        said = []
        while not said or text not in said[-1]:
            line = await asyncio.wait_for(self.proc.stderr.readline(), timeout_s)
            assert line, f"events --follow ended, having said {said} (not {text!r})"
            said.append(line.decode())

    async def stop(self) -> str:
        """End it as Ctrl-C does (exit 130); the rest of its stderr."""
        self.proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(self.proc.communicate(), 15)
        assert self.proc.returncode == 130, err
        return err.decode()


@contextlib.asynccontextmanager
async def _following(tmp_path: Path, config: Path, *args: str) -> AsyncIterator[_Follower]:
    proc = await spawn(
        ["events", "--follow", "--json", *args, "--config", str(config)],
        tmp_path,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        yield _Follower(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_events_follow_goes_on_after_an_event_stamped_ahead_of_the_clock(
    wired: tuple[Path, Running], tmp_path: Path
) -> None:
    """An event stamped an hour ahead (journaled before the clock was stepped back, or by a node
    whose clock runs ahead) is listed, and the webhooks after it are printed as they come, not
    once the clock has caught up with it."""
    config, running = wired
    assert running.daemon.journal is not None
    ahead = new_event(received_at=time.time() + 3600, jobs=0)
    await running.daemon.journal.ingest(ahead)
    async with _following(tmp_path, config) as follow:
        assert await follow.ids(1) == [ahead.event.id]
        sent = [await accepted(running, "shop", json.dumps({"n": n})) for n in range(3)]
        assert await follow.ids(3) == sent
        await follow.stop()


async def test_events_follow_prints_what_is_journaled_late_whatever_the_listing_cut(
    wired: tuple[Path, Running], tmp_path: Path
) -> None:
    """--limit cuts the listing, not what comes after it: an event journaled after the listing
    but stamped before its oldest line (by a node whose clock is 2 s behind, or a commit that
    waited) is printed, in the order it was journaled."""
    config, running = wired
    assert running.daemon.journal is not None
    listed = await accepted(running, "shop", '{"n": "listed"}')
    async with _following(tmp_path, config, "--limit", "1") as follow:
        assert await follow.ids(1) == [listed]
        late = new_event(received_at=event_id_time(listed) - 2, jobs=0)
        await running.daemon.journal.ingest(late)
        later = await accepted(running, "shop", '{"n": "later"}')
        assert await follow.ids(2) == [late.event.id, later]
        await follow.stop()


@pytest.mark.subprocess
async def test_events_follow_says_nothing_is_missing_of_a_listing_of_10000(
    tmp_path: Path,
) -> None:
    """``--follow --limit 10000`` on a journal of more: the listing is cut as asked, and the
    note that a poll found more new events than it prints is not said of it."""
    config, cfg = write_config(tmp_path, "")
    start = time.time() - 86400
    async with Journal(cfg.journal.path) as journal:
        for b in range(0, 12_000, 1000):  # a day of events, 7 s apart
            await asyncio.gather(
                *(
                    journal.ingest(new_event(received_at=start + (b + i) * 7, jobs=0))
                    for i in range(1000)
                )
            )
        async with _following(tmp_path, config, "--limit", "10000") as follow:
            assert len(await follow.ids(10_000)) == 10_000
            after = new_event(received_at=time.time(), jobs=0)
            await journal.ingest(after)
            assert await follow.ids(1) == [after.event.id]
            said = await follow.stop()
    assert "not shown" not in said


@pytest.mark.subprocess
async def test_events_follow_waits_out_a_database_outage(
    tmp_path: Path, pg_url: str, db_outage: DatabaseOutage
) -> None:
    """A PostgreSQL restart under ``events --follow``: it says once that the journal does not
    answer, asks again until it does, says so, and goes on printing (it runs until Ctrl-C)."""
    from webhookd.journal.postgres import PostgresJournal

    config, cfg = write_config(tmp_path, "")
    text = config.read_text().replace(f'path = "{cfg.journal.path}"', f'url = "{pg_url}"')
    config.write_text(text, encoding="utf-8")
    first = new_event(received_at=time.time(), jobs=0)
    async with PostgresJournal(pg_url, heartbeat_s=3600) as node:
        await node.ingest(first)
    async with _following(tmp_path, config) as follow:
        assert await follow.ids(1) == [first.event.id]
        await db_outage.begin()
        await follow.says("asking again until it answers")
        await db_outage.end()
        after = new_event(received_at=time.time(), jobs=0)
        async with PostgresJournal(pg_url, heartbeat_s=3600) as node:
            await node.ingest(after)
        assert await follow.ids(1) == [after.event.id]
        await follow.says("the journal answers again")
        await follow.stop()


@pytest.fixture(params=["sqlite", "postgres"])
async def follow_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A SQLite file or a PostgreSQL database, and a manual clock, for ``_follow`` in process."""
    if request.param == "sqlite":
        yield Store("sqlite", str(tmp_path / "journal.db"), ManualClock(time.time()))
        return
    async with fresh_database(request.getfixturevalue("pg_server_url")) as url:
        yield Store("postgres", url, ManualClock(time.time()))


class _Printed(list[str]):
    """The ids ``_follow`` prints (it is the ``echo``), and a wait for what it prints."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(self, row: EventSummary) -> None:
        self.append(row.id)
        self.changed.set()

    async def until(self, check: Callable[[list[str]], bool], timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while not check(self):
                self.changed.clear()
                await self.changed.wait()


def _listing(journal: BaseJournal, **filters: Any) -> Any:
    """What ``events --follow`` asks, as the verb builds it."""
    kept = {"state": None, "source": None, "tenant": None, "contains": None} | filters
    return partial(journal.list_events, **kept)


async def test_events_follow_goes_on_after_the_clock_steps_back(
    follow_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event journaled after the clock stepped back an hour is stamped an hour before the
    ones printed: ``--follow`` prints it, and none of the hour before the step a second time."""
    monkeypatch.setattr(cli_reads, "FOLLOW_EVERY_S", 0.01)
    clock = follow_store.clock
    printed = _Printed()
    async with follow_store.journal() as journal:
        first = new_event(received_at=clock.time(), jobs=0)
        await journal.ingest(first)
        follow = asyncio.create_task(
            cli_reads._follow(journal, _listing(journal), 50, None, printed, clock)
        )
        try:
            await printed.until(lambda p: p == [first.event.id])
            later = []
            for _ in range(3):  # twenty minutes apart, over the hour before the step
                clock.advance(1200)
                item = new_event(received_at=clock.time(), jobs=0)
                later.append(item.event.id)
                await journal.ingest(item)
                await printed.until(lambda p: len(p) == 1 + len(later))
            clock.step_wall(-3600)
            after = new_event(received_at=clock.time(), jobs=0)
            await journal.ingest(after)
            await printed.until(lambda p: after.event.id in p)
        finally:
            follow.cancel()
    assert printed == [first.event.id, *later, after.event.id]


class _Asks:
    """``events --follow``'s asks of a SQLite journal counted, and the SQLite VM steps (in
    hundreds) they take: what each costs, in work rather than in time."""

    def __init__(self, journal: Journal, **filters: Any) -> None:
        self.journal = journal
        self.base = _listing(journal, **filters)
        self.asked = 0
        self.steps = 0
        self.changed = asyncio.Event()

    async def listing(self, **kw: Any) -> list[EventSummary]:
        try:
            return list(await self.base(**kw))
        finally:
            self.asked += 1
            self.changed.set()

    def step(self) -> int:
        self.steps += 1
        return 0

    async def asks(self, n: int) -> None:
        """Until ``n`` more asks are done."""
        target = self.asked + n
        async with asyncio.timeout(10):
            while self.asked < target:
                self.changed.clear()
                await self.changed.wait()

    async def idle_cost(self, n: int = 3) -> float:
        """The steps of one ask with nothing new to read, over ``n`` of them: after the one
        under way, and the next, which reads what that one's position left out."""
        await self.asks(2)
        await self.journal.reader.set_progress_handler(self.step, 100)
        try:
            self.steps = 0
            await self.asks(n)
            return self.steps / n
        finally:
            await self.journal.reader.set_progress_handler(None, 100)


@pytest.mark.subprocess  # one loop: what is measured is SQLite's work
async def test_an_idle_events_follow_asks_as_little_of_a_big_journal_as_of_a_small_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ask of ``events --follow`` (twice a second, for as long as it runs) reads what was
    journaled since the one before, a seek: an idle follow asks as little of 100,000 events as
    of 1,000, where it read every one of them each time."""
    monkeypatch.setattr(cli_reads, "FOLLOW_EVERY_S", 0.01)
    old = time.time() - 86400  # yesterday's events
    costs = []
    async with Journal(tmp_path / "webhookd.db") as journal:
        for n in (1_000, 99_000):
            for b in range(0, n, 1000):
                await asyncio.gather(
                    *(
                        journal.ingest(new_event(received_at=old + i * 0.5, jobs=0))
                        for i in range(b, b + 1000)
                    )
                )
            asks = _Asks(journal)
            follow = asyncio.create_task(
                cli_reads._follow(journal, asks.listing, 50, None, lambda r: None)
            )
            try:
                costs.append(await asks.idle_cost())
            finally:
                follow.cancel()
    small, big = costs
    assert big <= 2 * small + 10, (
        f"an idle ask took {big * 100:,.0f} SQLite steps on a journal of 100,000 events,"
        f" {small * 100:,.0f} on one of 1,000"
    )


@pytest.mark.subprocess  # one loop: what is measured is SQLite's work
async def test_a_long_events_follow_with_a_filter_asks_no_more_than_at_its_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``events --follow --contains TEXT`` (or --source, --tenant) through an hour of events of
    which none matches: an idle ask costs what it did at the start, not a scan of every body
    journaled since."""
    monkeypatch.setattr(cli_reads, "FOLLOW_EVERY_S", 0.01)
    async with Journal(tmp_path / "webhookd.db") as journal:
        asks = _Asks(journal, contains=b"order-4711")
        follow = asyncio.create_task(
            cli_reads._follow(journal, asks.listing, 50, None, lambda r: None)
        )
        try:
            first = await asks.idle_cost()
            for _ in range(60):  # an hour, 300 webhooks a minute, none of them matching
                now = time.time()
                await asyncio.gather(
                    *(
                        journal.ingest(new_event(b"x" * 1000, received_at=now, jobs=0))
                        for _ in range(300)
                    )
                )
            last = await asks.idle_cost()
        finally:
            follow.cancel()
    assert last <= 2 * first + 10, (
        f"an idle ask took {last * 100:,.0f} SQLite steps after 18,000 events that do not"
        f" match, {first * 100:,.0f} at the start"
    )


async def test_events_replay_and_cancel_take_a_tenant_as_sent(
    tenanted: tuple[Path, Running], target: Target
) -> None:
    """events --tenant, GET /events?tenant=, the bulk verbs' --tenant and a source's
    replay-dead?tenant= find a tenant by what was sent, also one the journal keeps only as a
    digest (a credential header)."""
    config, running = tenanted
    target.statuses = [500, 500, 500]
    posted = [
        running.post("/hooks/shop", b'{"n": 1}', headers={"X-Shop": "acme"}),
        running.post("/hooks/shop", b'{"n": 2}', headers={"X-Shop": "globex"}),
        running.post("/hooks/api", b'{"n": 3}', headers={"Authorization": "Bearer key-vip"}),
    ]
    acme, globex, vip = [(await p)[1]["id"] for p in posted]
    for event_id in (acme, globex, vip):
        await event_state(running.http, running.admin_url, event_id, "dead")

    out = await cli("events", "--tenant", "Bearer key-vip", "--json", "--config", str(config))
    [row] = [json.loads(line) for line in out.output.splitlines()]
    assert row["id"] == vip and row["tenant"].startswith("sha256:")  # the credential is not kept
    out = await cli("events", "--tenant", "acme", "--config", str(config))
    assert acme in out.output and globex not in out.output and vip not in out.output
    out = await cli("events", "--tenant", "key-vip", "--config", str(config))
    assert out.output == "no events\n"  # a tenant is matched whole
    async with running.http.get(f"{running.admin_url}/events?tenant=globex") as r:
        assert [e["id"] for e in (await r.json())["events"]] == [globex]

    out = await cli("replay", "--dead", "--tenant", "acme", "--dry-run", "--config", str(config))
    assert out.output.splitlines() == ["would replay 1 event(s)", acme]
    out = await cli("replay", "--dead", "--tenant", "Bearer key-vip", "--config", str(config))
    assert "replayed 1 event(s), 1 job(s) re-queued" in out.output
    await event_state(running.http, running.admin_url, vip, "done")
    replay_dead = f"{running.admin_url}/sources/shop/replay-dead?tenant=globex"
    async with running.http.post(replay_dead, headers={"X-Webhookd": "1"}) as r:
        assert (r.status, await r.json()) == (202, {"source": "shop", "events": 1, "requeued": 1})
    await event_state(running.http, running.admin_url, globex, "done")
    assert (await event_state(running.http, running.admin_url, acme, "dead"))["state"] == "dead"
    out = await cli("replay", acme, "--tenant", "acme", "--config", str(config))
    assert out.exit_code == 2 and "--source, --since, --until and --tenant go with --dead" in (
        out.output
    )


async def test_show_finds_an_event_by_its_dedup_key(
    wired: tuple[Path, Running], target: Target
) -> None:
    """show --key SOURCE:KEY shows the event a delivery's dedup key names (here the body's
    hash, the key of an unsigned source); an unknown key is exit 1 (one without its source's
    name says the form), and id or key, not both."""
    config, running = wired
    body = '{"order": 42}'
    event_id = await accepted(running, "shop", body)
    key = "shop:sha256:" + hashlib.sha256(body.encode()).hexdigest()
    out = await cli("show", "--key", key, "--config", str(config))
    assert out.exit_code == 0 and f"event    {event_id}  [" in out.output
    assert f"dedup    {key}" in out.output
    out = await cli("show", "--key", "shop:nope", "--config", str(config))
    assert out.exit_code == 1 and "no event has the dedup key 'shop:nope':" in out.output
    out = await cli("show", "--key", "nope", "--config", str(config))  # the source left out
    assert "no event has the dedup key 'nope' (a key is SOURCE:DELIVERY_ID, e.g." in out.output
    for args in ((), (event_id, "--key", key)):
        assert (await cli("show", *args, "--config", str(config))).exit_code == 2


async def test_show_finds_an_event_by_a_delivery_id_over_256_characters(tmp_path: Path) -> None:
    """A delivery id over 256 characters is journaled as its digest: show --key finds its
    event by the id as the provider sent it, not "never seen"."""
    config, cfg = write_config(tmp_path, "")
    delivery = "d" * 300
    item = new_event(key=f"shop:{models.kept_long(delivery)}")  # as the receiver keeps it
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
    out = await cli("show", "--key", f"shop:{delivery}", "--config", str(config))
    assert out.exit_code == 0 and f"event    {item.event.id}  [" in out.output, out.output


async def test_show_by_key_says_a_missing_key_may_be_a_duplicate_by_what_was_signed(
    tmp_path: Path,
) -> None:
    """A delivery found a duplicate by its signed body (or Mailgun's token) keeps no key of its
    own: show --key names that, at a source where it can happen and only there."""
    sources = """
[sources.gh]
verify = { scheme = "github", secret = "s" }
[sources.mg]
verify = { scheme = "mailgun", secret = "s" }
[sources.st]
verify = { scheme = "stripe", secret = "s" }
"""
    config, cfg = write_config(tmp_path, sources)
    async with Journal(cfg.journal.path):
        pass
    notes = {
        "gh": "answered as a duplicate of another delivery with the same signed body,",
        "mg": "answered as a duplicate by its signature's token,",
        "st": None,
    }
    for source, note in notes.items():
        out = await cli("show", "--key", f"{source}:d-2", "--config", str(config))
        assert out.exit_code == 1 and "never seen, " in out.output
        assert (note in out.output) if note else "answered" not in out.output


async def test_show_by_key_says_when_the_keys_event_was_pruned(tmp_path: Path) -> None:
    """A dedup key outlives a done event (7 days against a day): show --key says what it was
    and that it is gone, rather than that the key is unknown."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        item = new_event(key="shop:delivery-1")
        await journal.ingest(dataclasses.replace(item, jobs=()))
        pruned = await journal.prune(keep_done_s=0, keep_dead_s=0, keep_dedup_s=86_400)
        assert pruned.events == 1
    out = await cli("show", "--key", "shop:delivery-1", "--config", str(config))
    assert out.exit_code == 1
    assert f"first seen {time.strftime('%Y-%m-%d', time.gmtime())}" in out.output
    assert f"as {item.event.id}, which has been pruned since" in out.output


async def test_show_says_when_no_daemon_runs_for_a_job_left_running(tmp_path: Path) -> None:
    """A daemon killed mid-attempt leaves its job running in the journal until the next start
    recovers it: show says no daemon runs on the journal. While one holds it, show says
    nothing more (the job may well be running)."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        [job_id] = await ingest(journal, "mail", 1)
        await journal.claim([job_id], "boot")
        [event] = await journal.list_events(limit=1)
    hint = "    no daemon runs on this journal: the next start queues it again\n"
    out = await cli("show", event.id, "--config", str(config))
    assert out.exit_code == 0 and "[running]  attempts 1/" in out.output, out.output
    assert hint in out.output
    lock = _take_serve_lock(cfg.journal.path)  # as a running daemon holds it
    try:
        out = await cli("show", event.id, "--config", str(config))
    finally:
        os.close(lock)
    assert "[running]" in out.output and hint not in out.output
    # Killed: the pid its lock file names runs no more.
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "")
    await gone.wait()
    serve_lock_file(cfg.journal.path).write_text(f"{gone.pid}\n")
    out = await cli("show", event.id, "--config", str(config))
    assert hint in out.output
    # A daemon in another container: the pid its lock file names (pid 1, there) runs here too,
    # so nothing is said.
    serve_lock_file(cfg.journal.path).write_text("1\n")
    out = await cli("show", event.id, "--config", str(config))
    assert "[running]" in out.output and hint not in out.output


async def test_purge_deletes_a_tenants_events_after_a_dry_run_and_says_what_is_left(
    tmp_path: Path,
) -> None:
    """``purge --tenant`` lists with --dry-run, refuses without --yes, deletes with it (an
    event whose job runs left whole and named, and exit 1: a script erasing a customer's data
    saw 0 and went on); by id, an unknown one changes nothing."""
    config, cfg = write_config(tmp_path, "")
    alice = [new_event(tenant="alice@example.com", body=b'{"n": %d}' % n) for n in range(3)]
    bob = new_event(tenant="bob@example.com")
    async with Journal(cfg.journal.path) as journal:
        for item in (*alice, bob):
            await journal.ingest(item)
        await journal.claim([alice[2].jobs[0].id], "b")
    where = ("--config", str(config))
    refused = await cli("purge", "--tenant", "alice@example.com", *where)
    assert refused.exit_code == 2 and "--dry-run, then delete with --yes" in refused.output
    listed = await cli("purge", "--tenant", "alice@example.com", "--dry-run", *where)
    assert listed.output.splitlines() == [
        "would purge 3 event(s)",
        *[item.event.id for item in reversed(alice)],
    ]
    done = await cli("purge", "--tenant", "alice@example.com", "--yes", *where)
    assert done.exit_code == 1, done.output
    assert done.stdout.splitlines() == [
        "purged 2 event(s) with 2 job(s); 1 left whole, a job of theirs running: cancel, then"
        " purge again",
        f"  running: {alice[2].event.id}",
    ]
    assert "overwritten in the journal file" in done.stderr
    by_id = await cli("purge", alice[2].event.id, *where)
    assert (by_id.exit_code, by_id.stdout.splitlines()) == (
        1,
        [
            "purged 0 event(s) with 0 job(s); 1 left whole, a job of theirs running: cancel,"
            " then purge again",
            f"  running: {alice[2].event.id}",
        ],
    )
    listed = await cli("purge", "--tenant", "alice@example.com", "--dry-run", *where)
    assert (listed.exit_code, listed.stdout) == (
        0,
        f"would purge 1 event(s)\n{alice[2].event.id}\n",
    )
    unknown = await cli("purge", bob.event.id, "evt_nope", *where)
    assert unknown.exit_code == 1 and "evt_nope" in unknown.output
    async with Journal(cfg.journal.path) as journal:
        left = [e.id for e in await journal.list_events(limit=10)]
    assert sorted(left) == sorted([alice[2].event.id, bob.event.id])


async def test_show_names_the_kind_a_provider_says_in_a_header(tmp_path: Path) -> None:
    """A Shopify or GitHub webhook's kind is in a header, not its body: show prints it."""
    config, cfg = write_config(tmp_path, "")
    item = new_event(source="mail")
    headers = (("X-Shopify-Topic", "orders/create"), ("X-Other", "x"), ("Shopify-Topic", "a/b"))
    item = dataclasses.replace(item, event=dataclasses.replace(item.event, headers=headers))
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
    out = await cli("show", item.event.id, "--config", str(config))
    assert out.exit_code == 0, out.output
    assert "\ntype     X-Shopify-Topic: orders/create   Shopify-Topic: a/b\n" in out.output
    assert "X-Other" not in out.output


async def test_show_says_which_job_of_its_order_key_a_queued_job_waits_for(
    tmp_path: Path,
) -> None:
    """A job queued behind the head of its order key (ordered_by) is due, yet does not run:
    show says which job it waits for, not a 'next run' already past."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        head, later = await ingest(journal, "mail", 2, order_key="customer-1")
        events = [await journal.get_event(e.id) for e in await journal.list_events(limit=2)]
        event_of = {detail.jobs[0].id: detail.event.id for detail in events}
    out = await cli("show", event_of[later], "--config", str(config))
    assert f"    waits for {head}, before it in its order key\n" in out.output, out.output
    assert "next run" not in out.output
    out = await cli("show", event_of[head], "--config", str(config))
    assert "next run" in out.output and "waits for" not in out.output


async def test_version_names_the_journal_schemas_it_reads() -> None:
    """What an upgrade or a rollback turns on: a journal past these versions is refused."""
    out = await cli("--version")
    assert out.exit_code == 0
    assert out.output == (
        f"webhookd {__version__} (journal schema: SQLite {len(sqlite_schema.MIGRATIONS)},"
        f" PostgreSQL {len(postgres_schema.MIGRATIONS)})\n"
    )


async def test_show_says_why_a_queued_job_waits_when_no_attempt_says_it(tmp_path: Path) -> None:
    """A lane's 429 puts the job back without an attempt: show says what it waits for beside
    its next run; a retry's reason is its attempt's own line, not said twice."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        waiting, retried = await ingest(journal, "mail", 2)
        await journal.claim([waiting, retried], "boot")
        now = journal.clock.time()
        await journal.finish(
            [
                Finished(waiting, 1, JobState.QUEUED, now, now, "wait", now + 30, "429 slow down"),
                Finished(retried, 1, JobState.QUEUED, now, now, "retry", now + 30, "answered 500"),
            ]
        )
        events = [await journal.get_event(e.id) for e in await journal.list_events(limit=2)]
        event_of = {detail.jobs[0].id: detail.event.id for detail in events}
    out = await cli("show", event_of[waiting], "--config", str(config))
    assert re.search(r"\n    next run .* \(waits: 429 slow down\)\n", out.output), out.output
    out = await cli("show", event_of[retried], "--config", str(config))
    assert "waits:" not in out.output and out.output.count("answered 500") == 1, out.output


async def test_show_prints_a_models_answer_as_text_under_its_result(tmp_path: Path) -> None:
    """A model's answer (an ``openai`` job's ``text``) reads as the text it is, line by line,
    under the rest of its result, not as one JSON string full of escapes."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        job_ids = await ingest(journal, "mail", 2)
        await journal.claim(job_ids, "boot")
        now = journal.clock.time()
        answer = {"text": 'Dear Zoë,\n\nthanks: "noted".', "model": "m", "finish_reason": "stop"}
        results = [answer, {"text": "x" * 5000, "model": "m"}]
        await journal.finish(
            [
                Finished(job_id, 1, JobState.DONE, now, now, "done", result=result)
                for job_id, result in zip(job_ids, results, strict=True)
            ]
        )
        events = [await journal.get_event(e.id) for e in await journal.list_events(limit=2)]
        event_of = {detail.jobs[0].id: detail.event.id for detail in events}
        event_id, long_id = (event_of[job_id] for job_id in job_ids)
    out = await cli("show", long_id, "--config", str(config))
    assert out.output.endswith(
        f"      {'x' * 4000}\n      … (5,000 characters: --json has them all)\n"
    )
    out = await cli("show", event_id, "--config", str(config))
    assert out.exit_code == 0, out.output
    assert out.output.endswith(
        '    result {"model": "m", "finish_reason": "stop"}\n'
        "    text:\n"
        "      Dear Zoë,\n"
        "\n"
        '      thanks: "noted".\n'
    )


async def test_show_says_where_it_cut_a_long_result(tmp_path: Path) -> None:
    """A result whose JSON is longer than show prints ends in a line saying how long it was
    and that --json has it all, not where the cut fell as if it ended there."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        [job_id] = await ingest(journal, "mail", 1)
        await journal.claim([job_id], "boot")
        now = journal.clock.time()
        result = {"rows": "y" * 3000}
        await journal.finish([Finished(job_id, 1, JobState.DONE, now, now, "done", result=result)])
        [summary] = await journal.list_events(limit=1)
    out = await cli("show", summary.id, "--config", str(config))
    assert out.exit_code == 0, out.output
    shown = '    result {"rows": "' + "y" * (2000 - len('{"rows": "')) + " … (3,012 characters:"
    assert f"{shown} --json has them all)\n" in out.output, out.output[-300:]


async def test_check_and_prune(tmp_path: Path, wired: tuple[Path, Running]) -> None:
    """check names the sources and exits 2 on a bad key; prune reports what it removed."""
    config, _running = wired
    out = await cli("check", "--config", str(config))
    assert out.exit_code == 0 and "2 source(s) (mail, shop)" in out.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = "127.0.0.1:0"\nlisen = 1\n')
    out = await cli("check", "--config", str(bad))
    assert out.exit_code == 2 and "server.lisen" in out.output
    out = await cli("prune", "--config", str(config))
    assert out.exit_code == 0 and out.output.startswith("pruned 0 event(s) and 0 dedup key(s)")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_check_warns_of_queued_jobs_the_config_has_no_action_for(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """A config about to be deployed that drops or renames a source or action: ``check`` reads
    the journal (read only: no upgrade, no file made, no node joined) and names what the new
    daemon would let go dead, whether a daemon has the journal open or not."""
    async with contextlib.AsyncExitStack() as stack:
        if backend == "postgres":
            server = request.getfixturevalue("pg_server_url")
            where = f'url = "{await stack.enter_async_context(fresh_database(server))}"'
        else:
            where = f'path = "{tmp_path / "j.db"}"'
        config = tmp_path / "webhookd.toml"
        config.write_text(
            f'[journal]\n{where}\n[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'
        )
        out = await cli("check", "--config", str(config))  # no journal yet: nothing to say
        assert (out.exit_code, out.stderr) == (0, ""), out.output
        async with open_journal(config_mod.loads(f"[journal]\n{where}\n").journal) as journal:
            for source in ("gone", "gone", "shop"):
                await journal.ingest(new_event(source=source))  # each with a job forward-0
            out = await cli("check", "--config", str(config))  # beside a daemon that has it
        assert out.exit_code == 0, out.output
        said = (
            "webhookd: warning: the journal holds queued jobs that this config has no action"
            " for: gone/forward-0 (2), shop/forward-0 (1); started with it, the daemon lets"
            " them go dead at their turn\n"
        )
        assert out.stderr == said
        if backend == "sqlite":
            files = sorted(os.listdir(tmp_path))
            out = await cli("check", "--config", str(config))  # and with none
            assert out.stderr == said and sorted(os.listdir(tmp_path)) == files
            assert "j.db-wal" not in files
        out = await cli("check", "--no-journal", "--config", str(config))
        assert (out.exit_code, out.stderr) == (0, "")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_check_of_a_journal_a_newer_webhookd_upgraded_exits_3_as_serve_would(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Before a rollback, ``check`` of the older release on the journal answers what ``serve``
    would: the journal is refused (exit 3, its schema named), not "ok" with a note."""
    async with contextlib.AsyncExitStack() as stack:
        if backend == "postgres":
            server = request.getfixturevalue("pg_server_url")
            url = await stack.enter_async_context(fresh_database(server))
            where = f'url = "{url}"'
        else:
            where = f'path = "{tmp_path / "j.db"}"'
        config = tmp_path / "webhookd.toml"
        config.write_text(
            f'[journal]\n{where}\n[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'
        )
        async with open_journal(config_mod.loads(f"[journal]\n{where}\n").journal) as journal:
            await journal.ingest(new_event(source="shop"))
        if backend == "postgres":
            conn = await asyncpg.connect(url)
            try:
                newer = len(postgres_schema.MIGRATIONS) + 1
                await conn.execute(f"INSERT INTO webhookd_schema VALUES ({newer})")
            finally:
                await conn.close()
        else:
            newer = len(sqlite_schema.MIGRATIONS) + 1
            with contextlib.closing(sqlite3.connect(tmp_path / "j.db")) as db:
                db.execute(f"PRAGMA user_version = {newer}")
        out = await cli("check", "--config", str(config))
        assert (out.exit_code, out.stdout) == (3, ""), out.output  # no "ok" before the refusal
        [error] = out.stderr.splitlines()
        assert error.startswith("webhookd: error: ")
        # Both versions, as serve names them: the journal's, and the newest this one reads.
        assert (
            f"schema version {newer}, newer than this webhookd understands ({newer - 1})" in error
        )
        assert "`webhookd serve` of this webhookd refuses it" in error
        out = await cli("check", "--no-journal", "--config", str(config))  # not read: ok
        assert (out.exit_code, out.stderr) == (0, "")
        for verb in ("stats", "events", "prune"):  # every verb refuses it as serve does: 3
            out = await cli(verb, "--config", str(config))
            assert out.exit_code == 3 and "newer than this webhookd" in out.stderr, out.output
        for args in (  # and with --json, nothing on stdout
            ("replay", "--dead"),
            ("cancel", "--queued"),
            ("purge", "--tenant", "t", "--yes"),
            ("pause", "shop"),
            ("prune",),
        ):
            out = await cli(*args, "--json", "--config", str(config))
            assert (out.exit_code, out.stdout) == (3, ""), out.output
            assert "newer than this webhookd" in out.stderr
        if backend == "sqlite":  # backup and copy too, which read the file themselves
            out = await cli("backup", str(tmp_path / "copy.db"), "--config", str(config))
            assert out.exit_code == 3 and "newer than this webhookd" in out.stderr, out.output
            assert "copy.db" not in os.listdir(tmp_path)
            # copy said to upgrade it with this webhookd's serve, which refuses it (exit 1).
            pg = tmp_path / "pg.toml"
            pg.write_text('[journal]\nurl = "postgresql://webhookd@127.0.0.1:1/none"\n')
            out = await cli("copy", "--to", str(pg), "--config", str(config))
            assert out.exit_code == 3 and "newer than this webhookd" in out.stderr, out.output
            assert "webhookd serve" not in out.stderr


async def _pg_schema_at(conn: Any, version: int) -> None:
    """Make the PostgreSQL journal's schema as ``version`` of its migrations left it."""
    await conn.execute("CREATE TABLE webhookd_schema (version integer NOT NULL)")
    for n, migration in enumerate(postgres_schema.MIGRATIONS[:version], start=1):
        await conn.execute(migration)
        await conn.execute("INSERT INTO webhookd_schema VALUES ($1)", n)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_check_says_serve_will_upgrade_a_journal_of_an_older_schema_and_leaves_it_so(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Run before a restart on a newer webhookd, ``check`` of a journal of an older schema says
    in a note (exit 0) that ``serve`` upgrades it as it starts and answers nothing until done,
    from and to which version, how many events it holds, and on SQLite the disk it may take;
    it upgrades nothing and makes no file. Once ``serve`` has upgraded it, no note."""
    async with contextlib.AsyncExitStack() as stack:
        insert = (
            "INSERT INTO events (id, source, received_at, dedup_key, tenant, priority, headers,"
            " body) VALUES ({}, 'shop', 1700000000, {}, '', 1, '[]', {})"
        )
        if backend == "postgres":
            url = await stack.enter_async_context(
                fresh_database(request.getfixturevalue("pg_server_url"))
            )
            where, latest = f'url = "{url}"', len(postgres_schema.MIGRATIONS)
            conn = await asyncpg.connect(url)
            try:
                await _pg_schema_at(conn, 4)
                for n in range(3):
                    await conn.execute(insert.format("$1", "$2", "$3"), f"e{n}", f"k{n}", b"{}")
                await conn.execute("ANALYZE events")  # the note counts by the planner's estimate
            finally:
                await conn.close()
        else:
            path = tmp_path / "j.db"
            where, latest = f'path = "{path}"', len(sqlite_schema.MIGRATIONS)
            with contextlib.closing(sqlite3.connect(path)) as db:
                sqlite_schema.add_functions(db)
                for migration in sqlite_schema.MIGRATIONS[:4]:
                    db.executescript(migration)
                db.execute("PRAGMA user_version = 4")
                for n in range(3):
                    db.execute(insert.format("?", "?", "?"), (f"e{n}", f"k{n}", b"{}"))
                db.commit()
            files = sorted(os.listdir(tmp_path))
        config = tmp_path / "webhookd.toml"
        config.write_text(
            f'[journal]\n{where}\n[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'
        )
        out = await cli("check", "--config", str(config))
        assert out.exit_code == 0 and out.stdout.startswith("ok: "), out.output
        if backend == "postgres":
            assert out.stderr == (
                f"webhookd: note: journal {redact_url(url)} is at schema version 4: the first"
                f" node of this webhookd to start upgrades it to {latest} (the others wait for"
                " it), and none answers until that is done; it holds about 3 event(s)\n"
            )
            conn = await asyncpg.connect(url)
            try:
                assert await conn.fetchval("SELECT max(version) FROM webhookd_schema") == 4
            finally:
                await conn.close()
        else:
            said = re.escape(
                f"webhookd: note: journal {path} is at schema version 4: `webhookd serve` of"
                f" this webhookd upgrades it to {latest} as it starts, and answers nothing until"
                " that is done; it holds 3 event(s), and the upgrade may take up to"
            )
            disk = r" [\d.]+ MB more of its disk meanwhile \([\d,.]+ MB free\)\n"
            assert re.fullmatch(said + disk, out.stderr), out.stderr
            assert sorted(os.listdir(tmp_path)) == [*files, "webhookd.toml"]
            with contextlib.closing(sqlite3.connect(path)) as db:
                assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        # serve's start upgrades it (as a node's open does); then there is nothing to say.
        async with open_journal(config_mod.loads(f"[journal]\n{where}\n").journal):
            pass
        out = await cli("check", "--config", str(config))
        assert (out.exit_code, out.stderr) == (0, ""), out.output


async def test_check_counts_the_events_of_an_older_postgres_journal_never_analysed(
    tmp_path: Path, pg_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check``'s upgrade note counts the events of a PostgreSQL journal the planner has never
    analysed (a database restored from a dump, or a small one), rather than saying it holds
    about 0, and estimates them from the table's size past ``COUNTED_EVENTS``."""
    async with fresh_database(pg_server_url) as url:
        conn = await asyncpg.connect(url)
        try:
            await _pg_schema_at(conn, 4)
            await conn.execute(
                "INSERT INTO events (id, source, received_at, dedup_key, tenant, priority,"
                " headers, body) SELECT 'e' || n, 'shop', 1700000000, 'k' || n, '', 1, '[]',"
                " '\\x7b7d' FROM generate_series(1, 300) n"
            )
            assert (
                await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'events'::regclass")
                == -1
            )
        finally:
            await conn.close()
        config = tmp_path / "webhookd.toml"
        config.write_text(
            f'[journal]\nurl = "{url}"\n[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'
        )
        out = await cli("check", "--config", str(config))
        assert out.exit_code == 0, out.output
        assert out.stderr.endswith(" it holds about 300 event(s)\n"), out.stderr
        monkeypatch.setattr(postgres_schema, "COUNTED_EVENTS", 100)
        out = await cli("check", "--config", str(config))
        held = re.search(r" it holds about ([\d,]+) event\(s\)\n$", out.stderr)
        assert held is not None and int(held[1].replace(",", "")) >= 100, out.stderr


async def test_check_notes_a_journal_it_cannot_read_and_goes_on(tmp_path: Path) -> None:
    """A journal ``check`` cannot reach (its database elsewhere, here a port nothing listens
    on) is a note, without the password, not an error: the config itself is valid."""
    config = tmp_path / "webhookd.toml"
    config.write_text('[journal]\nurl = "postgresql://app:pw-of-the-app@127.0.0.1:1/db"\n')
    out = await cli("check", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert out.stderr.splitlines()[-1].startswith(
        "webhookd: note: journal not read for queued jobs this config has no action for:"
        " PostgreSQL app:***@127.0.0.1:1/db: "
    )
    assert "pw-of-the-app" not in out.output


async def test_check_warns_of_a_host_name_an_action_delivers_to_that_does_not_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward's url and an openai action's base_url and then-forward whose host the resolver
    says does not exist are each a warning naming the key: a mistyped host is otherwise
    retried for the whole retry policy. Not a host reached through a proxy, nor one the
    resolver does not answer for (within LOOKUP_S) or fails on another way. The resolver is
    stood in for: whether a name exists depends on the machine's DNS."""
    unanswered = threading.Event()

    def look_up(name: str) -> None:
        if name.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if name == "down.example":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if name == "silent.example":
            unanswered.wait(30)

    monkeypatch.setattr(cli_serving, "_look_up", look_up)
    monkeypatch.setattr(cli_serving, "LOOKUP_S", 0.3)
    body = """
[sources.shop]
[[sources.shop.actions]]
type = "forward"
name = "typo"
url = "https://shop.invalid/in"
[[sources.shop.actions]]
type = "forward"
name = "proxied"
url = "https://behind.invalid/in"
proxy = "http://127.0.0.1:3128"
[[sources.shop.actions]]
type = "forward"
name = "local"
url = "http://127.0.0.1:9/in"
[[sources.shop.actions]]
type = "forward"
name = "silent"
url = "http://silent.example/in"
[[sources.shop.actions]]
type = "forward"
name = "down"
url = "http://down.example/in"
[[sources.shop.actions]]
type = "openai"
name = "summary"
api_key = "env:NO_SUCH_KEY_IS_READ_HERE"
base_url = "http://llm.invalid/v1"
model = "m"
max_tokens = 100
prompt = "{{ body }}"
then = { forward = "http://after.invalid/in" }
"""
    monkeypatch.setenv("OPENAI_TEST_KEY", "k")
    path, _ = write_config(tmp_path, body.replace("NO_SUCH_KEY_IS_READ_HERE", "OPENAI_TEST_KEY"))
    started = time.monotonic()
    out = await cli("check", "--config", str(path))
    unanswered.set()
    assert out.exit_code == 0, out.output
    tail = "fail, and are retried for the whole retry policy, until it does"
    assert [line for line in out.stderr.splitlines() if "does not resolve" in line] == [
        f"webhookd: warning: sources.shop.actions[{n}].{key}: host {host} does not resolve"
        f" here (Name or service not known): its deliveries {tail}"
        for n, key, host in (
            (0, "url", "shop.invalid"),
            (5, "base_url", "llm.invalid"),
            (5, "then.forward", "after.invalid"),
        )
    ]
    assert time.monotonic() - started < 10  # the silent resolver was not waited for


@pytest.mark.parametrize("password", ["Abc@Sec/ret99", "Abc@Sec?ret99", "Abc#Secret99"])
@pytest.mark.parametrize("verb", ["check", "serve", "stats", "events", "prune"])
async def test_a_journal_url_whose_password_would_be_split_stops_every_verb_unshown(
    tmp_path: Path, password: str, verb: str
) -> None:
    """A journal URL in its env: variable whose password holds a bare @ beside a /, ? or # (or
    a #) is a config error naming journal.url, exit 2, before any connection: one line, no
    traceback, no part of the password."""
    config = tmp_path / "webhookd.toml"
    config.write_text('[journal]\nurl = "env:WEBHOOKD_JOURNAL_URL"\n')
    url = f"postgresql://wh:{password}@127.0.0.1:1/whtrial"
    out = await cli(verb, "--config", str(config), env={"WEBHOOKD_JOURNAL_URL": url})
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith("webhookd: error: journal.url: ") and out.stderr.count("\n") == 1
    assert "write / as %2F, ? as %3F, @ as %40 and # as %23" in out.stderr
    assert not any(part in out.output for part in ("Abc", "Sec", "ret99", "Secret99"))


async def dead_letters(path: Path, source: str, n: int, age_s: float = 0.0) -> None:
    """Journal ``n`` events of ``source`` whose one job went dead ``age_s`` seconds ago."""
    clock = ManualClock(time.time() - age_s)
    async with Journal(path, clock=clock) as journal:
        job_ids = await ingest(journal, source, n)
        at = clock.time()
        await journal.finish(
            [
                Finished(job_id, 1, JobState.DEAD, at, at, "dead", error="answered 500")
                for job_id in job_ids
            ]
        )


async def bulk_journal(tmp_path: Path) -> Path:
    """A config whose journal holds 450 recent dead letters of shop and 300 expired ones of
    mail (dead 30 days ago, past the 7-day default)."""
    path, cfg = write_config(
        tmp_path,
        forward_source("shop", "http://127.0.0.1:9/")
        + forward_source("mail", "http://127.0.0.1:9/"),
    )
    await dead_letters(cfg.journal.path, "shop", 450)
    await dead_letters(cfg.journal.path, "mail", 300, age_s=30 * 86400)
    return path


def on_a_terminal(*args: str) -> tuple[str, str, int]:
    """``python -m webhookd ARGS`` with stderr on a pseudo-terminal and stdout on a pipe:
    (stdout, what the terminal showed, exit code)."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "webhookd", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=clean_env(),
        )
    finally:
        os.close(slave)
    shown = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return out, shown.decode("utf-8", "replace"), proc.wait(timeout=60)


async def test_bulk_replay_and_prune_print_one_summary_line_when_not_on_a_terminal(
    tmp_path: Path,
) -> None:
    """Into a log or a pipe, replay --dead and prune write their one-line summary and nothing
    else: no progress bar, not even its label."""
    config = await bulk_journal(tmp_path)
    out = await cli("replay", "--dead", "--source", "shop", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert out.output == "replayed 450 event(s), 450 job(s) re-queued, 0 waiting job(s) due now\n"
    out = await cli("prune", "--config", str(config))
    assert out.exit_code == 0, out.output
    [line] = out.output.splitlines()
    assert line.startswith("pruned 300 event(s) and ")


async def test_replay_counts_the_events_it_changed_and_warns_of_a_backlog_past_the_cap(
    tmp_path: Path,
) -> None:
    """A bulk replay that matches nothing says so; one that matches counts only the events it
    re-queued a job of (a listed event another replay took meanwhile is not its own); and one
    that takes the backlog past server.max_backlog says intake now answers 503 (dead jobs do
    not count towards the cap, so a large dead-letter queue replayed at once closes intake)."""
    config = await bulk_journal(tmp_path)
    text = config.read_text().replace("[server]\n", "[server]\nmax_backlog = 400\n", 1)
    config.write_text(text)
    out = await cli("replay", "--dead", "--tenant", "nobody", "--config", str(config))
    assert (out.exit_code, out.output) == (
        0,
        "nothing to replay: no event has a dead job that matches\n",
    )
    [shop_id, *_] = await _dead_ids(config)
    out = await cli("replay", "--dead", "--source", "shop", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert out.stdout == "replayed 450 event(s), 450 job(s) re-queued, 0 waiting job(s) due now\n"
    assert out.stderr == (
        "webhookd: warning: the backlog is now 450 job(s), past server.max_backlog (400): new"
        " webhooks to any source are answered 503 until it drains below; replaying in parts"
        " (--since, --source, --action) spares intake\n"
    )
    [mail_id, *_] = await _dead_ids(config)
    out = await cli("replay", "--dead", shop_id, mail_id, "--config", str(config))
    assert out.stdout == "replayed 1 event(s), 1 job(s) re-queued, 0 waiting job(s) due now\n"


async def test_replay_cancelled_undoes_a_cancel_that_stopped_a_replay(tmp_path: Path) -> None:
    """A mass replay of dead letters stopped with cancel --queued left its jobs cancelled: no
    longer dead letters (replay --dead does not see them), nor dismissed ones (nor --dismissed),
    and pruned keep_done_h after the cancel. replay --cancelled runs them again in bulk."""
    config = await bulk_journal(tmp_path)
    where = ("--source", "shop", "--config", str(config))
    out = await cli("replay", "--dead", *where)
    assert out.stdout.startswith("replayed 450 event(s), 450 job(s) re-queued")
    out = await cli("cancel", "--queued", *where)
    assert out.exit_code == 0 and out.stdout.startswith("cancelled 450 job(s)"), out.output
    out = await cli("replay", "--dead", *where)
    assert out.stdout == "nothing to replay: no event has a dead job that matches\n"
    out = await cli("replay", "--cancelled", "--dry-run", *where)
    assert out.stdout.startswith("would replay 450 event(s)\n")
    out = await cli("replay", "--cancelled", *where)
    assert out.stdout == "replayed 450 event(s), 450 job(s) re-queued, 0 waiting job(s) due now\n"
    out = await cli("replay", "--cancelled", *where)
    assert out.stdout == "nothing to replay: no event has a cancelled job that matches\n"


async def test_replay_and_cancel_until_take_the_events_of_a_window_alone(
    tmp_path: Path,
) -> None:
    """replay --dead --since 2d --until 1d takes the dead letters of yesterday's outage alone:
    those of the day before and of the last hour stay dead. --until alone takes what came
    before it, and an ISO time as --since does; cancel --dead takes the same window."""
    config, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    await dead_letters(cfg.journal.path, "shop", 2, age_s=3 * 86400)
    before = set(await _dead_ids(config))
    await dead_letters(cfg.journal.path, "shop", 3, age_s=1.5 * 86400)
    outage = set(await _dead_ids(config)) - before
    await dead_letters(cfg.journal.path, "shop", 4, age_s=3600)
    recent = set(await _dead_ids(config)) - before - outage
    window = ("--since", "2d", "--until", "1d", "--config", str(config))

    out = await cli("replay", "--dead", *window, "--dry-run")
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == ["would replay 3 event(s)", *sorted(outage)]
    day_ago = dt.datetime.fromtimestamp(time.time() - 86400, dt.UTC).strftime("%Y-%m-%dT%H:%M")
    out = await cli("cancel", "--dead", "--until", day_ago, "--dry-run", "--config", str(config))
    assert out.stdout.splitlines() == [
        "would cancel the dead jobs of 5 event(s)",
        *sorted(before | outage),
    ]
    out = await cli("replay", "--dead", *window)
    assert out.exit_code == 0, out.output
    assert out.stdout == "replayed 3 event(s), 3 job(s) re-queued, 0 waiting job(s) due now\n"
    assert set(await _dead_ids(config)) == before | recent
    out = await cli("cancel", "--dead", *window)
    assert out.stdout == "dismissed 0 dead job(s) of 0 event(s)\n"


async def _dead_ids(config: Path, *filters: str) -> list[str]:
    out = await cli(
        "events", "--state", "dead", "--limit", "1000", "--json", "--config", str(config), *filters
    )
    return [json.loads(line)["id"] for line in out.output.splitlines()]


def _json_of(out: Result) -> dict[str, Any]:
    """The one JSON document a verb's --json printed: stdout holds it and nothing else."""
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


async def test_replay_json_says_what_it_did_to_each_event_and_keeps_warnings_on_stderr(
    tmp_path: Path,
) -> None:
    """replay --json prints one document: the ids it went over, what it did to each (the
    admin API's requeued and run_now), their sums and how many events it changed. A dry run
    has the ids and changes nothing; "nothing to replay" is exit 0 with no event changed; the
    backlog warning stays on stderr; an unknown id is exit 1 with nothing on stdout."""
    config = await bulk_journal(tmp_path)
    text = config.read_text().replace("[server]\n", "[server]\nmax_backlog = 400\n", 1)
    config.write_text(text)
    where = ("--config", str(config))
    shop = sorted(await _dead_ids(config, "--source", "shop"))
    mail = sorted(await _dead_ids(config, "--source", "mail"))
    zero = {"skipped": 0, "events": 0, "requeued": 0, "run_now": 0}

    out = await cli("replay", "--dead", "--until", "1d", "--dry-run", "--json", *where)
    assert (out.exit_code, out.stderr) == (0, ""), out.output
    assert _json_of(out) == {
        "dry_run": True,
        "selected": 300,
        **zero,
        "ids": mail,
        "per_event": [],
    }
    assert sorted(await _dead_ids(config)) == sorted(shop + mail)  # a dry run changed nothing

    out = await cli("replay", "--dead", "--source", "shop", "--json", *where)
    assert out.exit_code == 0, out.output
    assert _json_of(out) == {
        "dry_run": False,
        "selected": 450,
        "skipped": 0,
        "events": 450,
        "requeued": 450,
        "run_now": 0,
        "ids": shop,
        "per_event": [{"id": i, "requeued": 1, "run_now": 0} for i in shop],
    }
    assert out.stderr.startswith("webhookd: warning: the backlog is now 450 job(s)")

    out = await cli("replay", "--dead", "--source", "shop", "--json", *where)
    assert (out.exit_code, out.stderr) == (0, "")
    assert _json_of(out) == {"dry_run": False, "selected": 0, **zero, "ids": [], "per_event": []}
    # By id: its job is queued and due already, so nothing changed, and it is said per event.
    out = await cli("replay", shop[0], "--json", *where)
    assert out.exit_code == 0, out.output
    assert _json_of(out) == {
        "dry_run": False,
        "selected": 1,
        **zero,
        "ids": [shop[0]],
        "per_event": [{"id": shop[0], "requeued": 0, "run_now": 0}],
    }
    out = await cli("replay", "evt_typo", "--json", *where)
    assert (out.exit_code, out.stdout, out.stderr) == (
        1,
        "",
        "webhookd: error: no event evt_typo\n",
    )


async def test_replay_json_counts_an_event_pruned_since_it_was_listed_as_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event retention deleted between the listing and its batch is counted under skipped
    and is not among the ids replayed; the line that says so stays on stderr."""
    config = await bulk_journal(tmp_path)
    ids = sorted(await _dead_ids(config))
    _prune_before_the_second_batch(config, ids[220], monkeypatch)
    out = await cli("replay", "--dead", "--json", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert out.stderr == "1 event(s) pruned since listed: skipped\n"
    doc = _json_of(out)
    assert (doc["selected"], doc["skipped"], doc["events"], doc["requeued"]) == (750, 1, 749, 749)
    assert doc["ids"] == ids[:220] + ids[221:]
    assert [row["id"] for row in doc["per_event"]] == doc["ids"]


async def test_cancel_json_counts_each_events_cancelled_and_running_jobs(tmp_path: Path) -> None:
    """cancel --json: each event's cancelled and running jobs (the admin API's names) and their
    sums; a running job is counted as running (it ends with its attempt). cancel --dead
    --dry-run --json lists the dead letters it would dismiss, and dismisses none."""
    config, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    items = [new_event(received_at=time.time()) for _ in range(3)]
    async with Journal(cfg.journal.path) as journal:
        for item in items:
            await journal.ingest(item)
        await journal.claim([items[2].jobs[0].id], "boot")
    await dead_letters(cfg.journal.path, "shop", 1)
    [dead] = await _dead_ids(config)
    where = ("--config", str(config))
    queued, running = sorted(i.event.id for i in items[:2]), items[2].event.id

    out = await cli("cancel", "--queued", "--json", *where)
    assert (out.exit_code, out.stderr) == (0, ""), out.output
    assert _json_of(out) == {
        "dry_run": False,
        "selected": 3,
        "skipped": 0,
        "events": 3,
        "cancelled": 2,
        "running": 1,
        "ids": sorted([*queued, running]),
        "per_event": sorted(
            [
                *({"id": i, "cancelled": 1, "running": 0} for i in queued),
                {"id": running, "cancelled": 0, "running": 1},
            ],
            key=lambda row: row["id"],
        ),
    }
    out = await cli("cancel", "--dead", "--dry-run", "--json", *where)
    doc = _json_of(out)
    assert (doc["dry_run"], doc["ids"], doc["cancelled"], doc["per_event"]) == (True, [dead], 0, [])
    assert await _dead_ids(config) == [dead]
    out = await cli("cancel", "--dead", "--json", *where)
    doc = _json_of(out)
    assert (doc["dry_run"], doc["events"], doc["cancelled"], doc["running"]) == (False, 1, 1, 0)
    assert doc["per_event"] == [{"id": dead, "cancelled": 1, "running": 0}]
    assert await _dead_ids(config) == []


async def test_purge_json_says_what_it_deleted_and_what_it_left_whole(tmp_path: Path) -> None:
    """purge --json: the ids gone over, each with its jobs deleted (queued among them) or
    left whole for a running one (purged false, and under held), and the sums; exit 1 with a
    held event as without --json, the note of what is left elsewhere on stderr. A dry run
    lists the ids and deletes nothing."""
    config, cfg = write_config(tmp_path, "")
    alice = [new_event(tenant="alice@example.com", body=b'{"n": %d}' % n) for n in range(3)]
    async with Journal(cfg.journal.path) as journal:
        for item in alice:
            await journal.ingest(item)
        await journal.claim([alice[2].jobs[0].id], "b")
    where = ("--tenant", "alice@example.com", "--json", "--config", str(config))
    newest_first = [item.event.id for item in reversed(alice)]
    held = alice[2].event.id

    out = await cli("purge", *where, "--dry-run")
    assert (out.exit_code, out.stderr) == (0, ""), out.output
    assert _json_of(out) == {
        "dry_run": True,
        "selected": 3,
        "skipped": 0,
        "events": 0,
        "jobs": 0,
        "queued": 0,
        "running": 0,
        "held": [],
        "ids": newest_first,
        "per_event": [],
    }
    out = await cli("purge", *where, "--yes")
    assert out.exit_code == 1, out.output
    assert "overwritten in the journal file" in out.stderr
    assert _json_of(out) == {
        "dry_run": False,
        "selected": 3,
        "skipped": 0,
        "events": 2,
        "jobs": 2,
        "queued": 2,
        "running": 1,
        "held": [held],
        "ids": newest_first,
        "per_event": [
            {"id": held, "jobs": 0, "queued": 0, "running": 1, "purged": False},
            *(
                {"id": i, "jobs": 1, "queued": 1, "running": 0, "purged": True}
                for i in newest_first[1:]
            ),
        ],
    }
    async with Journal(cfg.journal.path) as journal:
        assert [e.id for e in await journal.list_events(limit=10)] == [held]


async def test_pause_and_resume_json_say_the_sources_state_and_what_changed(
    tmp_path: Path,
) -> None:
    """pause and resume --json: the source, whether it is paused and whether this changed it
    (the admin API's answer), whether a running daemon applied it already (none here), and
    whether the config has the source no more (a paused source removed can be resumed)."""
    config, cfg = write_config(
        tmp_path,
        forward_source("shop", "http://127.0.0.1:9/") + forward_source("mail", "http://x/"),
    )
    async with Journal(cfg.journal.path):
        pass
    where = ("--json", "--config", str(config))
    said = {
        "source": "shop",
        "applied": False,
        "removed": False,
        "catch_all": False,
        "journaled": False,
    }
    for verb, changed in (("pause", True), ("pause", False), ("resume", True), ("resume", False)):
        out = await cli(verb, "shop", *where)
        assert (out.exit_code, out.stderr) == (0, ""), out.output
        assert _json_of(out) == {**said, "paused": verb == "pause", "changed": changed}
    assert (await cli("pause", "mail", *where)).exit_code == 0
    config.write_text(config.read_text().replace("sources.mail", "sources.other"))
    out = await cli("resume", "mail", *where)
    assert out.exit_code == 0, out.output
    assert _json_of(out) == {
        "source": "mail",
        "paused": False,
        "changed": True,
        "applied": False,
        "removed": True,
        "catch_all": False,
        "journaled": False,
    }
    out = await cli("resume", "mail", *where)  # not paused, and not configured: nothing to do
    assert (out.exit_code, out.stdout) == (2, "")
    assert "no source 'mail'" in out.stderr


async def test_prune_json_counts_the_events_jobs_and_dedup_keys_it_deleted(tmp_path: Path) -> None:
    """prune --json: the expired events deleted, their jobs and the dedup keys; a second run
    finds nothing to do, exit 0."""
    config = await bulk_journal(tmp_path)
    out = await cli("prune", "--json", "--config", str(config))
    assert (out.exit_code, out.stderr) == (0, ""), out.output
    assert _json_of(out) == {"events": 300, "jobs": 300, "dedup_keys": 300}
    out = await cli("prune", "--json", "--config", str(config))
    assert (out.exit_code, _json_of(out)) == (0, {"events": 0, "jobs": 0, "dedup_keys": 0})


def _id_received_ago(seconds: float) -> str:
    """An event id as one received ``seconds`` ago would have."""
    fresh = new_event_id()
    return fresh[:4] + models._encode(int((time.time() - seconds) * 1000), 5) + fresh[14:]


async def test_an_old_event_id_not_found_names_retention(tmp_path: Path) -> None:
    """An id of an event received two days ago and not in the journal was most likely pruned:
    the error says when it was received and the retention keys with their values; one
    received an hour ago is younger than anything retention takes (keep_done_h = 24), so it
    is not this journal's (one moved from, a node of another cluster); a made-up id says
    only "no event"."""
    config = await bulk_journal(tmp_path)

    def received(event_id: str) -> str:
        at = dt.datetime.fromtimestamp(event_id_time(event_id) or 0, dt.UTC)
        return at.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"

    keep = "journal.keep_done_h = 24, keep_dead_d = 14"
    old = _id_received_ago(2 * 86400)
    out = await cli("show", old, "--config", str(config))
    assert (out.exit_code, out.output) == (
        1,
        f"webhookd: error: no event {old}: its id says it was received {received(old)}, and"
        f" retention prunes an event that long past its last job ({keep})\n",
    )
    recent = _id_received_ago(3600)
    out = await cli("replay", recent, "--config", str(config))
    assert (out.exit_code, out.output) == (
        1,
        f"webhookd: error: no event {recent}: its id says it was received {received(recent)},"
        f" sooner than retention prunes any ({keep}): is it another journal's?\n",
    )
    out = await cli("replay", "evt_typo", "--config", str(config))
    assert (out.exit_code, out.output) == (1, "webhookd: error: no event evt_typo\n")


async def test_replay_of_listed_ids_with_one_unknown_replays_none_of_them(tmp_path: Path) -> None:
    """Every id given is looked up before anything changes: a typo among 250 ids (past the
    first batch) re-queues none, so fixing it and running again repeats nothing."""
    config = await bulk_journal(tmp_path)
    ids = (await _dead_ids(config))[:250]
    out = await cli("replay", *ids[:240], "evt_typo", *ids[240:], "--config", str(config))
    assert out.exit_code == 1 and "no event evt_typo" in out.output
    assert len(await _dead_ids(config)) == 750


async def test_replay_that_finds_an_event_pruned_meanwhile_says_how_far_it_got(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event pruned between the look-up and its batch stops the replay there, and the
    error says which ids were replayed: the batches before it, none after."""
    config = await bulk_journal(tmp_path)
    ids = (await _dead_ids(config))[:250]
    _prune_before_the_second_batch(config, ids[220], monkeypatch)
    out = await cli("replay", *ids, "--config", str(config))
    assert out.exit_code == 1
    assert f"no event {ids[220]} (pruned meanwhile): the first 200 of 250 event(s)" in out.output
    assert len(await _dead_ids(config)) == 749 - 200


async def test_replay_dead_skips_an_event_pruned_since_it_was_listed_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``replay --dead`` found the event; retention pruned it before its batch (its dead job
    was kept long enough to go). The rest are replayed, and a line says one was skipped."""
    config = await bulk_journal(tmp_path)
    ids = await _dead_ids(config)
    _prune_before_the_second_batch(config, ids[220], monkeypatch)
    out = await cli("replay", "--dead", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert "1 event(s) pruned since listed: skipped" in out.output
    assert "replayed 749 event(s), 749 job(s) re-queued" in out.output
    assert await _dead_ids(config) == []


def _prune_before_the_second_batch(
    config: Path, event_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delete ``event_id`` as a prune would, in its own transaction, just before the second
    batch of a bulk replay."""
    journal_path = config_mod.load(str(config)).journal.path
    replay = Journal.replay
    batches = 0

    async def pruned_before_the_second_batch(self: Journal, event_ids: list[str], **kw: Any) -> Any:
        nonlocal batches
        batches += 1
        if batches == 2:
            with contextlib.closing(sqlite3.connect(journal_path)) as db, db:
                job_ids = "SELECT id FROM jobs WHERE event_id = ?"
                db.execute(f"DELETE FROM attempts WHERE job_id IN ({job_ids})", (event_id,))
                db.execute("DELETE FROM jobs WHERE event_id = ?", (event_id,))
                db.execute("DELETE FROM events WHERE id = ?", (event_id,))
            db.close()
        return await replay(self, event_ids, **kw)

    monkeypatch.setattr(Journal, "replay", pruned_before_the_second_batch)


def test_ctrl_c_in_a_bulk_replay_says_how_far_it_got_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGINT while the second batch is written: the batches before it are replayed, that
    one perhaps (each commits whole), none after; said on stderr, and the exit is 130."""
    config = asyncio.run(bulk_journal(tmp_path))
    replay = Journal.replay
    batches = 0

    async def interrupted_in_the_second_batch(
        self: Journal, event_ids: list[str], **kw: Any
    ) -> Any:
        nonlocal batches
        batches += 1
        if batches == 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C: asyncio.run cancels the command
        return await replay(self, event_ids, **kw)

    monkeypatch.setattr(Journal, "replay", interrupted_in_the_second_batch)
    args = ["replay", "--dead", "--source", "shop", "--config", str(config)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == (
        "interrupted: the first 200 of 450 event(s) were replayed, perhaps the 200 after"
        " them, none after that"
    )
    assert batches == 2
    left = asyncio.run(_dead_ids(config))
    assert len(left) in (450 - 200 + 300, 450 - 400 + 300)  # the second batch, or not


async def test_an_id_given_twice_is_replayed_once_and_counted_once(tmp_path: Path) -> None:
    config = await bulk_journal(tmp_path)
    [first, *_] = await _dead_ids(config)
    out = await cli("replay", first, first, "--config", str(config))
    assert out.exit_code == 0, out.output
    assert out.output == "replayed 1 event(s), 1 job(s) re-queued, 0 waiting job(s) due now\n"


@pytest.mark.subprocess
async def test_bulk_replay_and_prune_show_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, replay --dead and prune draw click's progress bar, counting the events
    done out of all of them (in batches), and still print their summary on stdout."""
    config = await bulk_journal(tmp_path)
    replay = ("replay", "--dead", "--source", "shop", "--config", str(config))
    out, shown, code = await asyncio.to_thread(on_a_terminal, *replay)
    assert code == 0, shown
    assert out == "replayed 450 event(s), 450 job(s) re-queued, 0 waiting job(s) due now\n"
    assert "replaying" in shown and "200/450" in shown and "450/450" in shown
    out, shown, code = await asyncio.to_thread(on_a_terminal, "prune", "--config", str(config))
    assert code == 0, shown
    assert out.startswith("pruned 300 event(s) and ")
    assert "pruning" in shown and "300/300" in shown


@pytest.mark.subprocess
async def test_json_goes_to_stdout_alone_while_the_progress_bar_is_drawn_on_a_terminal(
    tmp_path: Path,
) -> None:
    """With --json on a terminal, the bar is drawn on stderr as without it, and stdout holds
    the document alone: a script reads it whole."""
    config = await bulk_journal(tmp_path)
    replay = ("replay", "--dead", "--source", "shop", "--json", "--config", str(config))
    out, shown, code = await asyncio.to_thread(on_a_terminal, *replay)
    assert code == 0, shown
    assert json.loads(out)["requeued"] == 450
    assert "replaying" in shown and "450/450" in shown and "{" not in shown
    prune = ("prune", "--json", "--config", str(config))
    out, shown, code = await asyncio.to_thread(on_a_terminal, *prune)
    assert code == 0, shown
    assert json.loads(out)["events"] == 300
    assert "pruning" in shown and "300/300" in shown and "{" not in shown


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["replay"], "give event ids or --dead"),
        (["cancel", "evt_1", "--queued"], "give event ids or --queued, not both"),
        (["replay", "evt_1", "--dead", "--source", "x"], "go with --dead and no event ids"),
        (["replay", "evt_1", "--source", "x"], "--source, --since, --until and --tenant go with"),
        (["replay", "--dead", "--since", "yesterday"], "Invalid value for '--since': use 30m"),
        (["replay", "--dead", "--until", "yesterday"], "Invalid value for '--until': use 30m"),
        (
            ["replay", "--dead", "--since", "1h", "--until", "2h"],
            "is not later than --since 1h (",
        ),
        (
            ["cancel", "--queued", "--since", "2026-01-02", "--until", "2026-01-01T00:00"],
            "--until 2026-01-01T00:00 (2026-01-01 00:00:00.000Z) is not later than --since"
            " 2026-01-02 (2026-01-02 00:00:00.000Z)",
        ),
        (["cancel", "evt_1", "--until", "1h"], "--source, --since, --until and --tenant go with"),
        (["events", "--since", "yesterday"], "Invalid value for '--since': use 30m"),
        (["events", "--state", "lost"], "'lost' is not one of"),
        (["events", "--limit", "0"], "0 is not in the range"),
        (["events", "--contains", ""], "give 1 to 1000 characters"),
        (["pause", "nosuch"], "no source 'nosuch'"),
        (["show"], "give an event id or --key"),
        (["cancel"], "give event ids or --queued"),
        (["cancel", "evt_1", "--since", "1h"], "--until and --tenant go with --queued"),
        (["cancel", "evt_1", "--tenant", "a"], "--until and --tenant go with --queued"),
        (["cancel", "--queued", "--dead"], "give --queued or --dead, not both"),
        (["cancel", "evt_1", "--dead", "--source", "x"], "go with --dead and no event ids"),
        (["frobnicate"], "No such command"),
    ],
)
async def test_bad_arguments_exit_2_with_one_clear_error(
    wired: tuple[Path, Running], args: list[str], needle: str
) -> None:
    """Usage mistakes exit 2 and say what is wrong."""
    config, _ = wired
    out = await cli(*args, "--config", str(config))
    assert out.exit_code == 2, out.output
    assert needle in out.output


async def test_verbs_that_take_a_source_say_the_same_of_one_there_is_not(
    wired: tuple[Path, Running],
) -> None:
    """pause, resume and send word an unknown source alike: the file, the configured names and
    the closest one when the name looks misspelt."""
    config, _ = wired
    said = {
        verb: (await cli(verb, "shopp", "--config", str(config))).output
        for verb in ("pause", "resume", "send")
    }
    swapped = await cli("pause", "shpo", "--config", str(config))  # two letters swapped
    assert swapped.output.endswith("(did you mean shop?)\n"), swapped.output
    line = (
        f"webhookd: error: no source 'shopp' in {config} (configured: mail, shop)"
        " (did you mean shop?)\n"
    )
    assert said == {"pause": line, "resume": line, "send": line}


async def test_the_alerts_own_source_is_no_unknown_source_with_alerts_set(tmp_path: Path) -> None:
    """With [alerts] set, --source webhookd names the alerts' own source: events, replay --dead
    and cancel --dead list or act on its events with no "no source" note. Without [alerts] the
    note is there, as for any name no source has."""
    alerts = '[alerts]\nurl = "http://127.0.0.1:9/alerts"\n'
    config, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/") + alerts)
    await dead_letters(cfg.journal.path, config_mod.ALERT_SOURCE, 1)
    verbs = (
        ["events", "--source", "webhookd"],
        ["replay", "--dead", "--source", "webhookd", "--dry-run"],
        ["cancel", "--dead", "--source", "webhookd", "--dry-run"],
    )
    for verb in verbs:
        out = await cli(*verb, "--config", str(config))
        assert out.exit_code == 0, out.output
        assert out.stderr == "", out.stderr
    listed = await cli("events", "--source", "webhookd", "--json", "--config", str(config))
    assert [json.loads(line)["source"] for line in listed.stdout.splitlines()] == ["webhookd"]
    config.write_text(config.read_text().replace(alerts, ""), encoding="utf-8")
    out = await cli("events", "--source", "webhookd", "--config", str(config))
    assert out.stderr.startswith("webhookd: note: no source 'webhookd' in "), out.stderr


async def test_the_alerts_own_source_is_no_other_case_of_itself_beside_a_catch_all(
    tmp_path: Path,
) -> None:
    """With [alerts] and a catch-all, --source webhookd and resume webhookd name the alerts' own
    source: no "did you mean webhookd?" of the name given exactly; "Webhookd" still gets it."""
    config, cfg = write_config(
        tmp_path,
        '[alerts]\nurl = "http://127.0.0.1:9/alerts"\n'
        '[sources."*"]\n[[sources."*".actions]]\ntype = "log"\n',
    )
    await dead_letters(cfg.journal.path, config_mod.ALERT_SOURCE, 1)
    out = await cli("events", "--source", "webhookd", "--config", str(config))
    assert (out.exit_code, out.stderr) == (0, "")
    async with Journal(cfg.journal.path) as journal:
        await journal.pause("webhookd")  # as an earlier webhookd could
    out = await cli("resume", "webhookd", "--config", str(config))
    assert (out.exit_code, out.stdout.partition(":")[0]) == (0, "resumed webhookd"), out.output
    out = await cli("pause", "Webhookd", "--config", str(config))
    assert out.exit_code == 2 and out.stderr.endswith("(did you mean webhookd?)\n"), out.stderr


@pytest.mark.parametrize("alerts", [True, False], ids=["alerts", "no-alerts"])
async def test_a_pause_of_the_alerts_own_source_is_refused_saying_why(
    tmp_path: Path, alerts: bool
) -> None:
    """pause webhookd held every alert back, silently: it is refused, exit 2, in one line
    saying why and what quiets alerts instead, and nothing is paused; a resume of the alerts'
    source an earlier webhookd paused still goes."""
    config, cfg = write_config(
        tmp_path,
        ('[alerts]\nurl = "http://127.0.0.1:9/alerts"\n' if alerts else "")
        + '[sources."*"]\n[[sources."*".actions]]\ntype = "log"\n',
    )
    for flags in ((), ("--json",)):
        out = await cli("pause", "webhookd", *flags, "--config", str(config))
        assert (out.exit_code, out.stdout) == (2, ""), out.output
        assert out.stderr == (
            "webhookd: error: the alerts' source 'webhookd' cannot be paused: its jobs are the"
            " alerts, and held they would tell no one of anything, their own backlog included;"
            " to quiet alerts, raise [alerts] min_interval_s, or remove [alerts], and reload\n"
        )
    async with Journal(cfg.journal.path) as journal:
        assert await journal.paused_sources() == frozenset()
        await journal.pause("webhookd")  # as an earlier webhookd could
    out = await cli("resume", "webhookd", "--config", str(config))
    assert out.exit_code == 0, out.output
    async with Journal(cfg.journal.path) as journal:
        assert await journal.paused_sources() == frozenset()


# An argument that is not UTF-8 ("café" typed in a Latin-1 terminal): Python gives its bytes
# as lone surrogates.
NOT_UTF8 = os.fsdecode(b"caf\xe9")


async def test_events_contains_searches_for_the_bytes_typed_even_when_not_utf8(
    tmp_path: Path,
) -> None:
    """events --contains is byte for byte: text typed in another encoding finds a body holding
    those bytes (a form posted in ISO-8859-1), and not the UTF-8 spelling of the same word."""
    config, cfg = write_config(tmp_path, "")
    latin1, utf8 = new_event(body=b"name=caf\xe9&n=1"), new_event(body="name=café".encode())
    async with Journal(cfg.journal.path) as journal:
        for item in (latin1, utf8):
            await journal.ingest(item)
    out = await cli("events", "--contains", NOT_UTF8, "--json", "--config", str(config))
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == [latin1.event.id]
    out = await cli("events", "--contains", "café", "--json", "--config", str(config))
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == [utf8.event.id]


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["events", "--source", NOT_UTF8], 2, "--source 'caf\\xe9' is not UTF-8 text"),
        (["events", "--tenant", NOT_UTF8], 2, "--tenant 'caf\\xe9' is not UTF-8 text"),
        (["show", "--key", NOT_UTF8], 2, "--key 'caf\\xe9' is not UTF-8 text"),
        (["show", NOT_UTF8], 1, "no event caf\\xe9\n"),
    ],
    ids=["events-source", "events-tenant", "show-key", "show-id"],
)
async def test_an_argument_that_is_not_utf8_is_a_one_line_error(
    tmp_path: Path, args: list[str], code: int, said: str
) -> None:
    """A --source, --tenant or --key that is not UTF-8 text (no journaled one is) is one line
    naming it and exit 2, and an id that is not an event id's shape is no event, exit 1: not a
    traceback from the database it was handed to."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(new_event())
    out = await cli(*args, "--config", str(config))
    assert (out.exit_code, out.stdout) == (code, ""), out.output
    assert out.stderr.startswith(f"webhookd: error: {said}")
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["pause", NOT_UTF8], "webhookd: error: no source 'caf\\xe9': a source's name is"),
        (["resume", NOT_UTF8], "webhookd: error: no source 'caf\\xe9': a source's name is"),
        (["send", NOT_UTF8], "webhookd: error: no source 'caf\\xe9': a source's name is"),
        (["events", "--state", NOT_UTF8], "Error: Invalid value for '--state': 'caf\\xe9' is"),
        (["events", "--limit", NOT_UTF8], "Error: Invalid value for '--limit': 'caf\\xe9' is"),
        (["show", f"--{NOT_UTF8}"], "Error: No such option '--caf\\xe9'"),
        ([NOT_UTF8], "Error: No such command 'caf\\xe9'"),
    ],
    ids=["pause", "resume", "send", "events-state", "events-limit", "option", "verb"],
)
async def test_an_argument_that_is_not_utf8_is_shown_as_typed_in_the_error(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """A byte that is not UTF-8 in an argument an error quotes (webhookd's own, or click's for
    a bad value, option or verb) is shown as typed, `caf\\xe9`, not as Python's `caf\\udce9`;
    resume says so as pause does, not in a traceback from the journal it was handed to."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(new_event())
    out = await cli(*args, "--config", str(config))
    assert (out.exit_code, out.stdout) == (2, ""), out.output
    assert said in out.stderr and "\\udc" not in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["replay", NOT_UTF8], 1, "no event caf\\xe9\n"),
        (["replay", "--dead", "--source", NOT_UTF8], 2, "--source 'caf\\xe9' is not UTF-8"),
        (["replay", "--dead", "--tenant", NOT_UTF8], 2, "--tenant 'caf\\xe9' is not UTF-8"),
        (["replay", "--dead", "--action", NOT_UTF8], 2, "--action 'caf\\xe9' is not UTF-8"),
        (["cancel", NOT_UTF8], 1, "no event caf\\xe9\n"),
        (["cancel", "--queued", "--source", NOT_UTF8], 2, "--source 'caf\\xe9' is not UTF-8"),
        (["cancel", "--queued", "--tenant", NOT_UTF8], 2, "--tenant 'caf\\xe9' is not UTF-8"),
        (["cancel", "--queued", "--action", NOT_UTF8], 2, "--action 'caf\\xe9' is not UTF-8"),
        (["purge", NOT_UTF8], 1, "no event caf\\xe9\n"),
        (["purge", "--tenant", NOT_UTF8, "--yes"], 2, "--tenant 'caf\\xe9' is not UTF-8"),
        (
            ["purge", "--contains", "x", "--source", NOT_UTF8, "--yes"],
            2,
            "--source 'caf\\xe9' is not UTF-8",
        ),
    ],
    ids=[
        "replay-id",
        "replay-source",
        "replay-tenant",
        "replay-action",
        "cancel-id",
        "cancel-source",
        "cancel-tenant",
        "cancel-action",
        "purge-id",
        "purge-tenant",
        "purge-source",
    ],
)
async def test_replay_cancel_and_purge_refuse_an_argument_that_is_not_utf8_in_one_line(
    tmp_path: Path, args: list[str], code: int, said: str
) -> None:
    """The verbs that change the journal take such an argument as events and show do: an id
    that is not UTF-8 is no event (exit 1), a --source, --tenant or --action one line and exit
    2; not a traceback from the database, and the journal is left as it was."""
    config, cfg = write_config(tmp_path, "")
    item = new_event()
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
        before = await journal.get_event(item.event.id)
    out = await cli(*args, "--config", str(config))
    assert (out.exit_code, out.stdout) == (code, ""), out.output
    assert out.stderr.startswith(f"webhookd: error: {said}")
    assert out.stderr.count("\n") == 1
    async with Journal(cfg.journal.path) as journal:
        assert await journal.get_event(item.event.id) == before


async def test_no_journal_is_a_runtime_error_exit_1(tmp_path: Path) -> None:
    """A command that needs the journal exits 1 with one line when there is none yet."""
    path, _ = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    out = await cli("events", "--config", str(path))
    assert out.exit_code == 1
    assert out.output.strip().startswith("webhookd: error: no journal at")
    assert "`webhookd serve` makes it at its first start" in out.output
    assert len(out.output.strip().splitlines()) == 1
    # A relative journal.path is named as the absolute path it meant from here.
    relative = tmp_path / "relative.toml"
    relative.write_text('[journal]\npath = "data/webhookd.db"\n')
    out = await cli("events", "--config", str(relative))
    assert out.output.startswith(
        f"webhookd: error: no journal at {Path.cwd()}/data/webhookd.db yet"
    )


@pytest.mark.parametrize(
    "verb",
    [["stats"], ["events"], ["show", "evt_01M94DE3Q2TBERCWG70N3TACQC"], ["backup", "copy.db"]],
)
def test_an_empty_file_at_journal_path_is_no_journal_and_is_left_empty(
    tmp_path: Path, verb: list[str]
) -> None:
    """A read verb never makes a journal: an empty file at journal.path (a ``touch``, or a
    daemon's first start just begun) is no journal, exit 1 as for none, and stays empty (a
    backup gave it an id, then failed with a traceback)."""
    path, cfg = write_config(tmp_path, "")
    cfg.journal.path.touch()
    before = sorted(p.name for p in tmp_path.iterdir())
    out = CliRunner().invoke(main, [*verb, "--config", str(path)])
    assert (out.exit_code, out.stdout) == (1, ""), out.output
    assert out.stderr == (
        f"webhookd: error: no journal at {cfg.journal.path} yet (an empty file): `webhookd serve`"
        " makes it at its first start (or set journal.path or --config)\n"
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert (names, cfg.journal.path.stat().st_size) == (before, 0)


@pytest.mark.parametrize(
    "verb",
    [
        ["stats"],
        ["events"],
        ["show", "evt_01M94DE3Q2TBERCWG70N3TACQC"],
        ["replay", "evt_01M94DE3Q2TBERCWG70N3TACQC"],
        ["cancel", "evt_01M94DE3Q2TBERCWG70N3TACQC"],
        ["purge", "evt_01M94DE3Q2TBERCWG70N3TACQC"],
        ["pause", "shop"],
        ["prune"],
        ["backup", "copy.db"],
    ],
    ids=lambda verb: verb[0],
)
def test_a_database_of_another_program_at_journal_path_is_refused_and_left_as_it_is(
    tmp_path: Path, verb: list[str]
) -> None:
    """A journal.path that names another program's SQLite file (its own tables, no webhookd
    schema): a verb that reads, one that changes and a backup each made webhookd's schema in
    it (a backup gave it an id, then failed with a traceback). Each is now one line naming it,
    exit 1, and the file is left as it was, with nothing beside it."""
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    with contextlib.closing(sqlite3.connect(cfg.journal.path)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('mine')")
        db.commit()
    before = (cfg.journal.path.read_bytes(), sorted(os.listdir(tmp_path)))
    verb = [str(tmp_path / a) if a == "copy.db" else a for a in verb]
    out = CliRunner().invoke(main, [*verb, "--config", str(path)])
    assert (out.exit_code, out.stdout) == (1, ""), out.output
    assert out.stderr.startswith(
        f"webhookd: error: {cfg.journal.path} holds a database that is not a webhookd journal"
    )
    assert out.stderr.count("\n") == 1
    assert (cfg.journal.path.read_bytes(), sorted(os.listdir(tmp_path))) == before


def test_check_says_a_database_of_another_program_is_no_journal_and_an_empty_file_none_yet(
    tmp_path: Path,
) -> None:
    """`check` read another program's SQLite file at journal.path, and an empty one (a
    `touch`, which serve makes its journal in), as a journal, and noted `no such table: jobs`:
    it now says the first is no webhookd journal, as serve and the other verbs refuse it, and
    says nothing of the second, as of a journal not made yet; both are left as they were."""
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    with contextlib.closing(sqlite3.connect(cfg.journal.path)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.commit()
    before = (cfg.journal.path.read_bytes(), sorted(os.listdir(tmp_path)))
    out = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert out.exit_code == 0, out.output
    assert out.stderr.endswith(
        "webhookd: note: journal not read for queued jobs this config has no action for:"
        f" {cfg.journal.path} holds a database that is not a webhookd journal (tables of its"
        " own, none of webhookd's): set journal.path to a file of webhookd's own; it was left"
        " as it is\n"
    )
    assert (cfg.journal.path.read_bytes(), sorted(os.listdir(tmp_path))) == before
    cfg.journal.path.write_bytes(b"")
    out = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert (out.exit_code, out.stderr) == (0, ""), out.output
    assert cfg.journal.path.read_bytes() == b"" and sorted(os.listdir(tmp_path)) == before[1]


@pytest.mark.subprocess
async def test_cli_exit_codes_in_a_real_process(tmp_path: Path) -> None:
    """The installed entry point maps errors to exit codes 0, 1 and 2 with one stderr line."""
    path, _ = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    procs = Procs()
    try:
        missing = await procs.cli("show", "evt_x", "--config", str(path))
        assert missing.returncode == 1 and missing.stderr.count("\n") == 1
        bad = await procs.cli("pause", "nosuch", "--config", str(path))
        assert bad.returncode == 2 and "no source 'nosuch'" in bad.stderr
        ok = await procs.cli("check", "--config", str(path))
        assert ok.returncode == 0, ok.stderr
    finally:
        await procs.aclose()


def garble_jobs_pages(db: Path) -> None:
    """A failing disk under the jobs table: its pages (and its indexes') read back as garbage,
    the schema on the first pages as it was."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute(
            "SELECT pageno FROM dbstat WHERE name IN"
            " (SELECT name FROM sqlite_master WHERE tbl_name = 'jobs')"
        ).fetchall()
    with open(db, "r+b") as f:
        for (page,) in pages:
            f.seek((page - 1) * page_size)
            f.write(b"\xff" * page_size)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "verb", [["stats"], ["events"], ["show", "evt_01M94DE3Q2TBERCWG70N3TACQC"]]
)
async def test_a_read_verb_on_a_journal_with_unreadable_pages_says_so_and_exits_1(
    tmp_path: Path, procs: Procs, verb: list[str]
) -> None:
    """A journal whose jobs pages read back as garbage fails the first read of its open: the
    verb says so in one line and its process exits 1, rather than being kept alive by the
    reader it left open (a cron'd ``stats`` would pile up hung processes)."""
    config, cfg = write_config(tmp_path, "")
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(new_event())
    garble_jobs_pages(cfg.journal.path)
    out = await procs.cli(*verb, "--config", str(config), timeout_s=20)
    assert (out.returncode, out.stderr) == (
        1,
        "webhookd: error: journal read failed: database disk image is malformed\n",
    )


# -- the admin API ------------------------------------------------------------------------------


ENDPOINTS = [
    ("GET", "/readyz"),
    ("GET", "/stats"),
    ("GET", "/metrics"),
    ("GET", "/events"),
    ("GET", "/events/evt_x"),
    ("POST", "/events/evt_x/replay"),
]


async def test_every_admin_endpoint_refuses_a_missing_or_wrong_token(
    tmp_path: Path, run_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With admin.token set, each endpoint but /healthz answers 401 without it or with a wrong
    one."""
    monkeypatch.setenv(TOKEN_ENV, "right-token-123")
    _, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"), token=True)
    running = await run_daemon(cfg)
    for method, path in ENDPOINTS:
        for headers in ({}, {"Authorization": "Bearer wrong-token-123"}):
            async with running.http.request(method, running.admin_url + path, headers=headers) as r:
                assert r.status == 401, (method, path)
                assert r.headers["WWW-Authenticate"] == "Bearer"
                assert "error" in await r.json()
    good = {"Authorization": "Bearer right-token-123"}
    async with running.http.get(running.admin_url + "/healthz", headers=good) as r:
        assert r.status == 200 and (await r.json())["ok"] is True


async def test_admin_endpoints_answer_with_the_documented_shapes(
    wired: tuple[Path, Running], target: Target
) -> None:
    """healthz, readyz, stats, events (filters, bad params), event detail and replay; what
    /readyz answers 503 for is in /stats' problems and on a `not ready` line of `stats`."""
    path, running = wired
    http, base = running.http, running.admin_url
    dead = await dead_event(running, target)

    async def get(path: str) -> tuple[int, Any]:
        async with http.get(base + path) as r:
            return r.status, await r.json()

    assert (await get("/healthz"))[1]["boot_id"] == running.daemon.boot_id
    assert await get("/readyz") == (200, {"ready": True})
    status, stats = await get("/stats")
    assert status == 200 and stats["jobs"]["dead"] == 1 and stats["backlog"] == 0
    assert {"workers", "throughput", "lanes", "paused", "oldest_queued_age_s"} <= set(stats)
    assert set(stats["journal_bytes"]) == set(await running.daemon.journal.sizes())
    assert min(stats["journal_bytes"].values()) >= 0 and max(stats["journal_bytes"].values()) > 0
    status, doc = await get("/events?state=dead&source=shop&limit=5")
    assert [e["id"] for e in doc["events"]] == [dead]
    assert (await get("/events?state=lost"))[0] == 400
    assert (await get("/events?limit=abc"))[0] == 400
    assert (await get("/events?limit=0"))[0] == 400
    assert (await get("/events/evt_nope")) == (404, {"error": "no such event"})
    intent = {"X-Webhookd": "1"}
    async with http.post(base + "/events/evt_nope/replay", headers=intent) as r:
        assert r.status == 404
    async with http.post(f"{base}/events/{dead}/replay", headers=intent) as r:
        assert r.status == 202 and await r.json() == {"id": dead, "requeued": 1, "run_now": 0}
    await event_state(http, base, dead, "done")
    running.daemon.intake.draining = True  # what a SIGTERM sets first
    status, doc = await get("/readyz")
    assert status == 503 and doc["problems"] == ["draining"]
    assert (await get("/stats"))[1]["problems"] == ["draining"]
    text = path.read_text().replace(
        '[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "{running.daemon.bound.admin}"'
    )
    path.write_text(text, encoding="utf-8")
    table = await cli("stats", "--config", str(path))
    assert "\nnot ready      draining\n" in table.output, table.output
    running.daemon.intake.draining = False
    assert (await get("/stats"))[1]["problems"] == []
    assert "not ready" not in (await cli("stats", "--config", str(path))).output


async def test_journal_verbs_need_no_secrets_but_serve_and_check_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """show, replay, events, stats, prune, pause and resume work with an unexported env: secret;
    serve and check refuse to start, naming the key."""
    monkeypatch.setenv("WEBHOOKD_TEST_UNSET_SECRET", "gh-secret")
    monkeypatch.setenv(TOKEN_ENV, "admin-token")
    verify = '{ scheme = "github", secret = "env:WEBHOOKD_TEST_UNSET_SECRET" }'
    path, cfg = write_config(
        tmp_path, forward_source("shop", "http://127.0.0.1:9/", verify=verify), token=True
    )
    monkeypatch.delenv("WEBHOOKD_TEST_UNSET_SECRET")
    monkeypatch.delenv(TOKEN_ENV)
    async with Journal(cfg.journal.path) as journal:
        [job_id] = await ingest(journal, "shop", 1)
        event_id = (await journal.list_events(limit=1))[0].id
    config = ["--config", str(path)]
    for args in (
        ["show", event_id],
        ["show", event_id, "--json"],
        ["replay", event_id],
        ["replay", "--dead", "--dry-run"],
        ["events"],
        ["stats", "--json"],
        ["prune"],
        ["pause", "shop"],
        ["resume", "shop"],
    ):
        out = await cli(*args, *config)
        assert out.exit_code == 0, (args, out.output)
    assert job_id  # the event's job was journaled and shown above
    for verb in ("check", "serve"):
        out = await cli(verb, *config)
        assert out.exit_code == 2, out.output
        assert f"admin.token: environment variable {TOKEN_ENV} is not set" in out.output
    monkeypatch.setenv(TOKEN_ENV, "admin-token")
    out = await cli("check", *config)
    assert out.exit_code == 2 and "sources.shop.verify.secret: " in out.output


async def event_finished_as(tmp_path: Path, *states: JobState) -> tuple[Path, Any, NewEvent]:
    """A journal holding one event whose jobs (one per state) finished in ``states``: (config
    file, config, the event)."""
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    item = new_event(jobs=len(states))
    ids = [job.id for job in item.jobs]
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
        await journal.claim(ids, "boot_test")
        await journal.finish(
            [finished(i, state, str(state)) for i, state in zip(ids, states, strict=True)]
        )
    return path, cfg, item


async def test_replay_of_ids_with_dead_leaves_their_done_jobs_alone(tmp_path: Path) -> None:
    """An event with a done job and a dead one: `replay <id>` runs both again (the delivery
    that succeeded too), `replay <id> --dead` only the dead one, as `--dead` alone does."""
    path, cfg, item = await event_finished_as(tmp_path, JobState.DONE, JobState.DEAD)
    done_id, dead_id = (job.id for job in item.jobs)
    out = await cli("replay", item.event.id, "--dry-run", "--config", str(path))
    assert out.stderr == (
        "webhookd: note: 1 done job(s) among them run again (a delivery that succeeded is"
        " made again); --dead replays only the dead ones\n"
    )
    out = await cli("replay", item.event.id, "--dead", "--config", str(path))
    assert out.stdout == "replayed 1 event(s), 1 job(s) re-queued, 0 waiting job(s) due now\n"
    assert out.stderr == ""
    async with Journal(cfg.journal.path) as journal:
        jobs = {job.id: job.state for job in (await journal.get_event(item.event.id)).jobs}
    assert jobs == {done_id: "done", dead_id: "queued"}


async def test_replay_dead_of_an_event_with_no_dead_job_says_none_was_dead(
    tmp_path: Path,
) -> None:
    """`replay <id> --dead` of an event whose jobs are all done said they were "queued or
    running", and with --action that it had "no finished or waiting job" of it: it says, as
    --done and the rest do, that none of them was dead."""
    path, _, item = await event_finished_as(tmp_path, JobState.DONE, JobState.DONE)
    config = ("--config", str(path))
    out = await cli("replay", item.event.id, "--dead", *config)
    assert (out.exit_code, out.stdout) == (
        0,
        "nothing to replay: none of the jobs of 1 event(s) was dead\n",
    )
    out = await cli("replay", item.event.id, "--dead", "--action", "forward-1", *config)
    assert (out.exit_code, out.stdout) == (
        0,
        "nothing to replay: none of the jobs of action 'forward-1' of 1 event(s) was dead\n",
    )


async def test_replay_done_and_action_make_one_actions_deliveries_again(tmp_path: Path) -> None:
    """`replay --done --action deliver` (a target that answered 2xx and lost the webhooks)
    queues that action's done jobs alone, not the event's model call; `cancel --action` and
    `replay <id> --action` touch that action's jobs alone; a name no source has is a note."""
    path, cfg = write_config(
        tmp_path,
        forward_source("shop", "http://127.0.0.1:9/")
        + '[[sources.shop.actions]]\nname = "draft"\ntype = "log"\n',
    )
    base = new_event()
    item = NewEvent(
        base.event,
        (NewJob(new_job_id(), "deliver", "forward", 3), NewJob(new_job_id(), "draft", "log", 3)),
    )
    deliver_id, draft_id = (job.id for job in item.jobs)
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
        await journal.claim([deliver_id, draft_id], "boot_test")
        await journal.finish(
            [finished(deliver_id, JobState.DONE, "done"), finished(draft_id, JobState.DONE, "done")]
        )

    async def states() -> dict[str, str]:
        async with Journal(cfg.journal.path) as journal:
            return {job.action: job.state for job in (await journal.get_event(item.event.id)).jobs}

    config = ("--config", str(path))
    out = await cli("replay", "--done", "--dead", *config)
    assert out.exit_code == 2
    assert "give one of --dead, --dismissed, --done and --cancelled" in out.output
    done_of_deliver = ("--done", "--action", "deliver")
    out = await cli("replay", *done_of_deliver, "--source", "shop", "--dry-run", *config)
    assert out.stdout == f"would replay 1 event(s)\n{item.event.id}\n"
    out = await cli("replay", *done_of_deliver, *config)
    assert out.stdout == "replayed 1 event(s), 1 job(s) re-queued, 0 waiting job(s) due now\n"
    assert out.stderr == ""
    assert await states() == {"deliver": "queued", "draft": "done"}
    out = await cli("replay", item.event.id, *done_of_deliver, *config)
    assert out.stdout == (
        "nothing to replay: none of the jobs of action 'deliver' of 1 event(s) was done\n"
    )
    out = await cli("cancel", item.event.id, "--action", "deliver", *config)
    assert out.stdout == "cancelled 1 job(s) of 1 event(s)\n"
    assert await states() == {"deliver": "cancelled", "draft": "done"}

    out = await cli("replay", item.event.id, "--action", "drat", *config)
    assert out.stderr == (
        f"webhookd: note: no action 'drat' of any source in {path} (did you mean draft?):"
        " only jobs journaled under that name match\n"
    )
    assert (
        out.stdout
        == "nothing to replay: 1 event(s) have no finished or waiting job of action 'drat'\n"
    )
    out = await cli("replay", item.event.id, "--action", "draft", *config)
    assert out.stderr == (
        "webhookd: note: 1 done job(s) among them run again (a delivery that succeeded is"
        " made again); --dead replays only the dead ones\n"
    )
    assert await states() == {"deliver": "cancelled", "draft": "queued"}


async def test_show_prints_a_python_handlers_traceback_under_its_attempt(tmp_path: Path) -> None:
    """The traceback a handler's exception left was only in ``show --json``; the text form
    prints it under the attempt, as it prints a command's output."""
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    item = new_event()
    tb = 'Traceback (most recent call last):\n  File "h.py", line 3, in handle\nValueError: boom\n'
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
        await journal.claim([item.jobs[0].id], "boot_test")
        await journal.finish(
            [
                finished(
                    item.jobs[0].id,
                    JobState.DEAD,
                    "dead",
                    error="ValueError: boom",
                    detail={"traceback": tb},
                )
            ]
        )
    out = await cli("show", item.event.id, "--config", str(path))
    assert (
        "      traceback:\n        Traceback (most recent call last):\n"
        '          File "h.py", line 3, in handle\n        ValueError: boom\n'
    ) in out.output


async def test_show_prints_a_commands_output_and_escapes_what_a_terminal_would_obey(
    tmp_path: Path,
) -> None:
    """Text ``show`` prints the body's start and a command's stdout and stderr, line by line.
    What a sender or a target chose (dedup key, tenant, body, error, output) reaches the
    terminal with its control characters escaped: no escape sequence is passed through."""
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    item = new_event(
        body=b'{"title": "\x1b]0;owned\x07"}' + b" " * 300,
        key="shop:\x1b[2Jdelivery",
        tenant="acme\x9b31m",
    )
    job_id = item.jobs[0].id
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
        await journal.claim([job_id], "boot_test")
        detail = {"stdout": "done 1\ndone 2\n", "stderr": "\x1b[31mred\x1b[0m\n"}
        dead = finished(job_id, JobState.DEAD, "dead", error="exited 1\x1b[1A", detail=detail)
        await journal.finish([dead])
    out = await cli("show", item.event.id, "--config", str(path))
    assert out.exit_code == 0, out.output
    assert not any(c in out.output for c in "\x1b\x07\x9b"), repr(out.output)
    lines = out.output.splitlines()
    assert "dedup    shop:\\x1b[2Jdelivery" in lines
    assert any(line.startswith("tenant   acme\\x9b31m   priority normal") for line in lines)
    assert '\\x1b]0;owned\\x07"}' in out.output and out.output.count(" …\n") == 1
    attempt = next(i for i, line in enumerate(lines) if line.startswith("    #1 "))
    assert lines[attempt].endswith("dead: exited 1\\x1b[1A")
    assert lines[attempt + 1 :][:5] == [
        "      stdout:",
        "        done 1",
        "        done 2",
        "      stderr:",
        "        \\x1b[31mred\\x1b[0m",
    ]
    out = await cli("events", "--config", str(path))
    assert "tenant=acme\\x9b31m" in out.output and "\x9b" not in out.output
    out = await cli("show", item.event.id, "--json", "--config", str(path))
    assert not any(c in out.output for c in "\x1b\x07\x9b"), repr(out.output)
    doc = json.loads(out.output)  # the same document, its strings intact
    assert doc["tenant"] == "acme\x9b31m" and doc["dedup_key"] == "shop:\x1b[2Jdelivery"


async def test_show_says_when_a_commands_pipes_were_held_past_its_exit(tmp_path: Path) -> None:
    """A program that left a process of its own session holding its output is done by its
    exit status, and what that process wrote after is not kept: text ``show`` said nothing of
    it (only ``--json`` had it), so the output looked cut short for no reason."""
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"))
    item = new_event()
    job_id = item.jobs[0].id
    held = "still held open after the program exited, by a process it left in a session of its own"
    async with Journal(cfg.journal.path) as journal:
        await journal.ingest(item)
        await journal.claim([job_id], "boot_test")
        detail = {"exit_code": 0, "stdout": "deployed\n", "stderr": "", "pipes": held}
        await journal.finish([finished(job_id, JobState.DONE, "done", detail=detail)])
    out = await cli("show", item.event.id, "--config", str(path))
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    attempt = next(i for i, line in enumerate(lines) if line.startswith("    #1 "))
    assert lines[attempt + 1 :][:3] == ["      stdout:", "        deployed", f"      pipes: {held}"]


async def test_prune_help_states_the_real_interval() -> None:
    """prune --help says the daemon prunes every journal.prune_interval_s (60 s), not hourly."""
    out = await cli("prune", "--help")
    assert out.exit_code == 0
    assert "hourly" not in out.output and "prune_interval_s, 60 s" in out.output


@pytest.mark.parametrize("value", ["pässwort-0123456789abcdef", "token-€-0123456789abcdef"])
async def test_a_token_the_dashboard_could_not_send_is_refused_by_the_cli_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """admin.token from the environment with a character past ASCII: the CLI, which would send
    it as UTF-8, refuses it as `serve` does (a browser sends a header a byte a character, so
    the dashboard could never log in), in one line naming the key and never the value."""
    monkeypatch.setenv(TOKEN_ENV, "an-ascii-token-to-write-the-config")
    path, _ = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"), token=True)
    for verb in (["stats"], ["pause", "shop"]):
        out = await cli(*verb, "--config", str(path), env={TOKEN_ENV: value})
        assert out.exit_code == 2, out.output
        assert out.stderr.startswith("webhookd: error: admin.token: holds a character that")
        assert out.stderr.count("\n") == 1 and value not in out.stderr


async def test_stats_tells_a_refused_token_from_a_daemon_that_is_not_there(
    tmp_path: Path, run_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 401 from the admin API (the token's variable unset where the CLI runs, or another
    value) is said as such, naming the variable and never a value; "not reachable" is for a
    daemon that does not answer at all. A reload the daemon refused is said beside its figures."""
    monkeypatch.setenv(TOKEN_ENV, "the-daemons-token")
    path, cfg = write_config(tmp_path, forward_source("shop", "http://127.0.0.1:9/"), token=True)

    def loader() -> Any:
        raise ConfigError("sources.shop.bogus", "unknown key")

    running = await run_daemon(cfg, loader=loader)
    text = path.read_text().replace(
        '[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "{running.daemon.bound.admin}"'
    )
    path.write_text(text, encoding="utf-8")
    config = ("--config", str(path))

    async def stats(value: str | None) -> tuple[str, dict[str, Any]]:
        table = await cli("stats", *config, env={TOKEN_ENV: value})
        doc = await cli("stats", "--json", *config, env={TOKEN_ENV: value})
        assert table.exit_code == doc.exit_code == 0, (table.output, doc.output)
        daemon = [line for line in table.output.splitlines() if line.startswith("daemon ")]
        return (daemon[0] if daemon else ""), json.loads(doc.stdout)

    line, doc = await stats(None)
    assert line == (
        f"daemon         the admin API refused the request: admin.token is env:{TOKEN_ENV},"
        f" which is not set here (journal figures only)"
    )
    assert doc["daemon"] is None and doc["daemon_error"] == line[15:].removesuffix(
        " (journal figures only)"
    )
    line, doc = await stats("not-the-token")
    assert line == (
        f"daemon         the admin API refused the token in {TOKEN_ENV} (admin.token):"
        " not the daemon's (journal figures only)"
    )
    assert "not-the-token" not in line and "the-daemons-token" not in line
    line, doc = await stats("the-daemons-token")
    assert line == "" and doc["daemon"]["workers"] and doc["daemon_error"] is None
    # pause says why the daemon was not asked to apply it at once: the token, by its name.
    paused = await cli("pause", "shop", *config, env={TOKEN_ENV: "not-the-token"})
    assert paused.exit_code == 0 and "within a second" in paused.stdout
    assert paused.stderr == (
        "webhookd: note: the daemon was not asked to apply it now: the admin API refused the"
        f" token in {TOKEN_ENV} (admin.token): not the daemon's\n"
    )
    resumed = await cli("resume", "shop", *config, env={TOKEN_ENV: "the-daemons-token"})
    assert (resumed.exit_code, resumed.stderr) == (0, "")
    # A refused reload is said too: what runs is not what the file says.
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    table = await cli("stats", *config, env={TOKEN_ENV: "the-daemons-token"})
    assert (
        "\nconfig         reload refused, still running the previous config: sources.shop.bogus:"
        " unknown key\n" in table.output
    ), table.output

    # Another journal's config whose admin.listen is this daemon's port (a staging config
    # beside production's, say): its figures are not mixed with that daemon's.
    other = tmp_path / "other"
    other.mkdir()
    async with Journal(other / "webhookd.db"):
        pass
    other_path = other / "webhookd.toml"
    other_path.write_text(text.replace(str(cfg.journal.path), str(other / "webhookd.db")))
    out = await cli(
        "stats", "--json", "--config", str(other_path), env={TOKEN_ENV: "the-daemons-token"}
    )
    doc = json.loads(out.output)
    assert doc["daemon"] is None and doc["daemon_error"] == (
        f"the daemon answering on the admin API at {running.daemon.bound.admin} serves another"
        f" journal (admin.listen in {other_path} is another config's?)"
    )

    await running.stop()
    line, doc = await stats("the-daemons-token")
    assert line == (
        f"daemon         not reachable on the admin API at {running.daemon.bound.admin}"
        " (journal figures only)"
    )
    assert doc["daemon"] is None and doc["daemon_error"] == line[15:].removesuffix(
        " (journal figures only)"
    )


async def test_stats_beside_the_daemon_prints_its_counts_and_alone_reads_the_same_from_the_journal(
    wired: tuple[Path, Running], target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the daemon's admin API answering, stats prints the counts the daemon keeps (its
    /stats) and counts no job itself: on a large journal that reads every job, as the daemon
    did already. With the daemon stopped it reads them from the journal: the same document
    and the same table, but for the daemon's own lines."""
    config, running = wired
    await dead_event(running, target)
    done = await accepted(running, "mail")
    await event_state(running.http, running.admin_url, done, "done")
    config.write_text(
        config.read_text().replace(
            '[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "{running.daemon.bound.admin}"'
        ),
        encoding="utf-8",
    )
    # Which journal counts: the daemon's, or the one the CLI opens.
    kind = type(running.daemon.journal)
    counted_by: list[object] = []
    real_counts = kind.counts

    async def counts(self: Any, *args: Any, **kwargs: Any) -> Any:
        counted_by.append(self)
        return await real_counts(self, *args, **kwargs)

    monkeypatch.setattr(kind, "counts", counts)

    async def stats() -> tuple[dict[str, Any], str]:
        doc = await cli("stats", "--json", "--config", str(config))
        table = await cli("stats", "--config", str(config))
        assert doc.exit_code == table.exit_code == 0, (doc.output, table.output)
        # What the daemon adds (workers, nodes) aside, and the dead letter's age in seconds.
        lines = [
            re.sub(r"\(latest \d+s ago\)", "(latest)", line)
            for line in table.output.splitlines()
            if not line.startswith(("workers ", "node ", "daemon ", "journal "))
        ]
        return json.loads(doc.output), "\n".join(lines)

    beside, beside_table = await stats()
    assert beside["daemon"] is not None and beside["daemon_error"] is None
    assert all(journal is running.daemon.journal for journal in counted_by)
    for key in ("events", "jobs", "sources", "paused", "journal_bytes"):
        assert beside[key] == beside["daemon"][key], key
    assert beside["jobs"]["dead"] == beside["sources"]["mail"]["done"] == 1
    # Not in the daemon's document, so read from the journal: the recent outcomes, the causes.
    assert beside["outcomes_5m"] == {"dead": 1, "done": 1}
    assert [c["action"] for c in beside["dead_causes"]] == ["deliver"]

    await running.stop()
    counted_by.clear()
    alone, alone_table = await stats()
    assert alone["daemon"] is None and counted_by  # counted by the CLI's own journal
    assert list(alone) == list(beside)
    for key in set(alone) - {"journal_bytes", "nodes", "daemon", "daemon_error"}:
        assert alone[key] == beside[key], key
    assert alone_table == beside_table


async def test_stats_says_which_windows_are_longer_than_retention_keeps(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A figure of the last 5 minutes or hour is counted from the journal, which keeps done
    events keep_done_h: a window longer than that counts only what is kept (at 20 webhooks/s
    and 36 s kept, "received 150.0/min" beside the daemon's 1,200), and stats, /stats and
    /stats/series say so. stats takes the retention the daemon runs when it answers."""
    shop = forward_source("shop", f"{target.url}/shop")
    config, _ = write_config(tmp_path, shop)
    keep = "keep_done_h = 0.5\n"  # 30 min: the last 5 minutes are whole, the last hour cut
    path_line = f'path = "{tmp_path / "webhookd.db"}"\n'
    config.write_text(config.read_text().replace(path_line, path_line + keep), encoding="utf-8")
    running = await run_daemon(make_config(tmp_path, shop, journal=keep))
    await event_state(running.http, running.admin_url, await accepted(running, "shop"), "done")

    out = await cli("stats", "--json", "--config", str(config))
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert doc["retention_keeps_s"] == 1800.0
    assert doc["cut_by_retention"] == {"5m": False, "1h": True}
    table = (await cli("stats", "--config", str(config))).output.splitlines()
    note = "   (retention keeps 30m: counts cover what is kept)"
    assert "received       0.2/min (last 5 min)" in table
    assert "attempts 5 min done 1" in table
    assert f"attempts 1 h   done 1{note}" in table
    for minutes, cut in ((30, False), (31, True)):
        async with running.http.get(f"{running.admin_url}/stats/series?minutes={minutes}") as r:
            series = await r.json()
        assert (series["cut_by_retention"], series["retention_keeps_s"]) == (cut, 1800.0)
    async with running.http.get(f"{running.admin_url}/stats") as r:
        assert (await r.json())["retention_keeps_s"] == 1800.0

    # Beside the daemon: its retention, not the file's (a [journal] change waits for a restart).
    text = config.read_text().replace(keep, "keep_done_h = 24\n")
    admin = f'[admin]\nlisten = "{running.daemon.bound.admin}"'
    config.write_text(text.replace('[admin]\nlisten = "127.0.0.1:0"', admin), encoding="utf-8")
    doc = json.loads((await cli("stats", "--json", "--config", str(config))).output)
    assert doc["daemon"] is not None and doc["retention_keeps_s"] == 1800.0
    assert doc["cut_by_retention"] == {"5m": False, "1h": True}


async def test_stats_names_a_removed_sources_dead_letters_the_catch_all_has_no_action_for(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """The dead letters of a name the catch-all took, of an action it has, are one cause under
    "*"; those of a source the config has no more, of an action the catch-all lacks, keep the
    source's name, marked as not in the config: they are not the catch-all's."""
    shop = forward_source("shop", f"{target.url}/shop").replace('"deliver"', '"notify"')
    catch = forward_source('"*"', f"{target.url}/catch")
    config, cfg = write_config(tmp_path, shop + catch)
    running = await run_daemon(cfg)
    await dead_event(running, target, "shop")
    await dead_event(running, target, "orders")  # the catch-all's
    config.write_text(config.read_text().replace(shop, ""), encoding="utf-8")  # shop removed
    out = await cli("stats", "--json", "--config", str(config))
    assert out.exit_code == 0, out.output
    causes = json.loads(out.output)["dead_causes"]
    assert [(c["source"], c["action"], c["jobs"], c["removed"]) for c in causes] == [
        ("*", "deliver", 1, False),
        ("shop", "notify", 1, True),
    ]
    table = (await cli("stats", "--config", str(config))).output
    assert re.search(r"\n      1  \*/deliver  gave up .*/catch answered 500", table), table
    said = r"\n      1  shop/notify \(not in the config\)  gave up .*/shop answered 500"
    assert re.search(said, table), table


async def test_stats_lists_the_actions_the_daemon_runs_one_job_at_a_time(
    tmp_path: Path, run_daemon: Any
) -> None:
    """An action whose attempts keep timing out runs one job at a time; stats said nothing of
    it (only the log and webhookd_action_slow did), and its queued jobs beside idle workers
    were taken for a resume that did not happen. /stats lists it under workers.slow, and the
    CLI on a line of its own."""
    async with hung_target(asyncio.Event()) as url:
        body = f"""
[sources.shop]
[[sources.shop.actions]]
type = "forward"
url = "{url}/shop"
timeout_s = 0.2
retry = {{ max_attempts = 1 }}
"""
        config, cfg = write_config(tmp_path, body)
        running = await run_daemon(cfg)
        config.write_text(
            config.read_text().replace(
                '[admin]\nlisten = "127.0.0.1:0"',
                f'[admin]\nlisten = "{running.daemon.bound.admin}"',
            ),
            encoding="utf-8",
        )
        table = await cli("stats", "--config", str(config))
        assert table.exit_code == 0, table.output
        assert "slow " not in table.output

        # workers.slow_after_timeouts (3) attempts in a row end by their timeout.
        events = [await accepted(running, "shop", f'{{"n": {n}}}') for n in range(3)]
        for event_id in events:
            await event_state(running.http, running.admin_url, event_id, "dead")
        doc = await cli("stats", "--json", "--config", str(config))
        slow = json.loads(doc.output)["daemon"]["workers"]["slow"]
        assert slow == [{"source": "shop", "action": "forward"}]
        table = await cli("stats", "--config", str(config))
        assert (
            "\nslow           shop/forward: one job at a time, its last attempts timed out"
            " (workers.slow_after_timeouts)\n" in table.output
        ), table.output
        await running.stop()


def test_show_says_how_a_webhook_verified_in_words_and_its_own_times() -> None:
    """``show`` printed the verdict as JSON with epoch floats, the one line of it not in its
    time format; ``--json`` keeps the fields."""
    at = 1796311712.8183098  # 2026-12-03 15:28:32.818Z
    rotated = {"scheme": "stripe", "secret_index": 1, "timestamp": at - 12.8183098}
    assert _verified_line({**rotated, "received_at": at}) == (
        "verified stripe with secrets[1], signed 2026-12-03 15:28:20.000Z,"
        " checked 2026-12-03 15:28:32.818Z"
    )
    untimed = {"scheme": "github", "secret_index": 0, "timestamp": None, "received_at": at}
    assert _verified_line(untimed) == "verified github, checked 2026-12-03 15:28:32.818Z"


async def test_reading_verbs_answer_while_another_process_holds_the_write_lock(
    tmp_path: Path,
) -> None:
    """``events``, ``show`` and ``stats`` waited 5 s for SQLite's write lock and failed
    "database is locked" while any other process held it (a copy, a long transaction): each
    connection asked for auto_vacuum, which takes that lock and means something on a new
    file only."""
    config, cfg = write_config(tmp_path, '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"')
    async with Journal(cfg.journal.path) as journal:
        [job_id] = await ingest(journal, "shop", 1)
        event_id = (await journal.list_events(limit=1))[0].id
    holder = sqlite3.connect(cfg.journal.path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        listed = await cli("events", "--json", "--config", str(config))
        shown = await cli("show", event_id, "--config", str(config))
        counted = await cli("stats", "--json", "--config", str(config))
    finally:
        holder.close()
    assert [r.exit_code for r in (listed, shown, counted)] == [0, 0, 0], listed.output
    assert json.loads(listed.stdout)["id"] == event_id
    assert job_id in shown.stdout


async def test_show_says_when_a_secret_it_cannot_read_is_left_unmasked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under cron the daemon's env: variables are not set: show cannot mask what it cannot
    read, and says so on stderr rather than pass for masked output."""
    monkeypatch.setenv(TOKEN_ENV, "tok-abcdef-123456")
    config, cfg = write_config(
        tmp_path, '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"', token=True
    )
    async with Journal(cfg.journal.path) as journal:
        await ingest(journal, "shop", 1, body=b'{"leak": "tok-abcdef-123456"}')
        event_id = (await journal.list_events(limit=1))[0].id
    masked = await cli("show", event_id, "--json", "--config", str(config))
    bare = await cli("show", event_id, "--json", "--config", str(config), env={TOKEN_ENV: None})  # type: ignore[dict-item]
    assert (masked.exit_code, bare.exit_code) == (0, 0)
    assert "tok-abcdef-123456" not in masked.stdout and "note:" not in masked.stderr
    assert "tok-abcdef-123456" in bare.stdout
    assert "1 secret(s) of the config cannot be read here" in bare.stderr
