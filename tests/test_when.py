"""``when`` on an action: which webhooks get a job, config errors, and the event's ``filtered``.

The receiver tests serve the real receiver application over a real journal file with no worker
pool, so the jobs a request leaves are there to be counted; the last test drives a real
``webhookd serve`` with a forward target.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Target, make_config, serving
from procs import Procs, get_json, settled_event, write_config

from webhookd import actions
from webhookd.config import Condition, Extractor, loads
from webhookd.errors import ConfigError
from webhookd.journal import MIGRATIONS, Journal
from webhookd.journal.records import EventDetail
from webhookd.receiver import Receiver
from webhookd.state import IntakeState

JSON = {"Content-Type": "application/json"}

ROUTES = """
[sources.gh]
[[sources.gh.actions]]
type = "log"
name = "deploy"
[sources.gh.actions.when]
"json:ref" = ["refs/heads/main", "refs/heads/release-*"]
"header:X-GitHub-Event" = ["push"]

[[sources.gh.actions]]
type = "log"
name = "billing"
when = { "json:type" = ["invoice.paid", "invoice.payment_failed"] }

[[sources.gh.actions]]
type = "log"
name = "audit"

[sources.only]
[[sources.only.actions]]
type = "log"
name = "live"
when = { "json:livemode" = ["true"] }

[[sources.only.actions]]
type = "log"
name = "signup"
[sources.only.actions.when]
"form:event" = ["signup"]
"""


# -- config ----------------------------------------------------------------------------------

A = "sources.a.actions[0]"


@pytest.mark.parametrize(
    ("when", "key"),
    [
        ('{ "cookie:x" = ["a"] }', f'{A}.when."cookie:x"'),
        ('{ "json:" = ["a"] }', f'{A}.when."json:"'),
        ('{ "json:a..b" = ["a"] }', f'{A}.when."json:a..b"'),
        ('{ "json:a." = ["a"] }', f'{A}.when."json:a."'),
        ('{ body = ["a"] }', f"{A}.when.body"),
        ('{ "json:type" = [] }', f'{A}.when."json:type"'),
        ('{ "json:type" = "invoice.paid" }', f'{A}.when."json:type"'),
        ('{ "json:n" = ["1", 2] }', f'{A}.when."json:n"[1]'),
        ('{ "header:X-Event" = [true] }', f'{A}.when."header:X-Event"[0]'),
        ("{}", f"{A}.when"),
        ('"json:type"', f"{A}.when"),
    ],
)
def test_bad_when_is_a_config_error_naming_its_dotted_key(when: str, key: str) -> None:
    """A bad extractor, a body hash, an empty or non-string list is refused naming the key."""
    with pytest.raises(ConfigError) as info:
        actions.validate(loads(f'[[sources.a.actions]]\ntype = "log"\nwhen = {when}'))
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ") and "\n" not in str(info.value)


def test_when_is_read_as_conditions_and_is_no_action_option() -> None:
    """Each key becomes a condition in the order written; the action kind never sees `when`."""
    cfg = loads(ROUTES)
    actions.validate(cfg)  # the log kind refuses options it does not know
    deploy = cfg.sources["gh"].actions[0]
    assert deploy.when == (
        Condition(Extractor("json", "ref"), ("refs/heads/main", "refs/heads/release-*")),
        Condition(Extractor("header", "X-GitHub-Event"), ("push",)),
    )
    assert "when" not in deploy.options
    assert cfg.sources["gh"].actions[2].when == ()


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        ("refs/heads/main", True),
        ("refs/heads/release-2.1", True),
        ("refs/heads/release-", True),
        ("refs/heads/mainline", False),
        ("Refs/heads/main", False),  # case-sensitive
        ("refs/heads/hotfix", False),
        (None, False),  # a missing value matches nothing, not even "*"
    ],
)
def test_condition_allows_listed_values_and_globs_only(value: str | None, allowed: bool) -> None:
    """A value passes when it equals a listed one or matches its `*` glob, case and all."""
    cond = Condition(Extractor("json", "ref"), ("refs/heads/main", "refs/heads/release-*"))
    assert cond.allows(value) is allowed
    assert Condition(Extractor("json", "ref"), ("*",)).allows(value) is (value is not None)


# -- receiver and journal ----------------------------------------------------------------------

Post = Callable[..., Awaitable[tuple[int, EventDetail]]]


@pytest.fixture
async def intake(tmp_path: Path) -> AsyncIterator[tuple[Post, Journal]]:
    """A receiver over a real journal for ``ROUTES``; ``post`` returns the status and event."""
    cfg = make_config(tmp_path, ROUTES)
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        journal = await stack.enter_async_context(Journal(cfg.journal.path))
        address = await stack.enter_async_context(serving(Receiver(cfg, journal, IntakeState())))

        async def post(path: str, body: Any, **headers: str) -> tuple[int, EventDetail]:
            data = json.dumps(body) if isinstance(body, dict) else body
            url = f"http://{address}{path}"
            async with http.post(url, data=data, headers=headers) as r:
                doc = await r.json()
                return r.status, await journal.get_event(doc["id"])

        yield post, journal


def job_actions(detail: EventDetail) -> list[str]:
    return [j.action for j in detail.jobs]


CASES = {
    # AND: the branch and the event header must both match; OR: any listed value or glob.
    "push-to-main": ({"ref": "refs/heads/main"}, {"X-GitHub-Event": "push"}, ["deploy", "audit"]),
    "push-to-release-glob": (
        {"ref": "refs/heads/release-7"},
        {"x-github-event": "push"},
        ["deploy", "audit"],
    ),
    "ping-to-main": ({"ref": "refs/heads/main"}, {"X-GitHub-Event": "ping"}, ["audit"]),
    "push-to-dev": ({"ref": "refs/heads/dev"}, {"X-GitHub-Event": "push"}, ["audit"]),
    "payment-failed": ({"type": "invoice.payment_failed"}, {}, ["billing", "audit"]),
    "paid": ({"type": "invoice.paid"}, {}, ["billing", "audit"]),
    "created": ({"type": "invoice.created"}, {}, ["audit"]),
    # Missing fields (a body that is not JSON, a ref that is an object) never match.
    "no-ref": ({}, {"X-GitHub-Event": "push"}, ["audit"]),
    "not-json": (b"not json", {"X-GitHub-Event": "push"}, ["audit"]),
    "ref-object": ({"ref": {"name": "refs/heads/main"}}, {"X-GitHub-Event": "push"}, ["audit"]),
}


@pytest.mark.parametrize(("body", "headers", "jobs"), CASES.values(), ids=CASES.keys())
async def test_only_actions_whose_when_matches_get_a_job(
    intake: tuple[Post, Journal],
    body: Any,
    headers: dict[str, str],
    jobs: list[str],
) -> None:
    """Every key of `when` must match, any listed value will do, and the event lists the rest
    under "filtered"."""
    post, _ = intake
    status, detail = await post("/hooks/gh", body, **headers)
    assert status == 202
    assert job_actions(detail) == jobs
    assert detail.as_dict()["filtered"] == [a for a in ("deploy", "billing") if a not in jobs]
    assert detail.state == "queued"


async def test_json_true_and_form_fields_match_as_text(intake: tuple[Post, Journal]) -> None:
    """A JSON `true` matches "true" (as in tenant rules); a form field matches by its value."""
    post, _ = intake
    _, live = await post("/hooks/only", {"livemode": True})
    assert (job_actions(live), live.filtered) == (["live"], ("signup",))
    _, text = await post("/hooks/only", {"livemode": "true"})
    assert job_actions(text) == ["live"]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    _, signup = await post("/hooks/only", b"event=signup&user=7", **form)
    assert (job_actions(signup), signup.filtered) == (["signup"], ("live",))


async def test_a_json_body_has_no_form_fields_whatever_its_text_holds(
    intake: tuple[Post, Journal],
) -> None:
    """A JSON event whose text holds ``&event=signup&`` (a customer's note, an e-mail subject)
    matches no ``form:`` rule: split on "&" as a form, it matched ``form:event = signup``."""
    post, _ = intake
    for kind in ("application/json", "application/vnd.api+json; charset=utf-8"):
        body = json.dumps({"livemode": False, "note": "hi&event=signup&", "as": kind}).encode()
        status, detail = await post("/hooks/only", body, **{"Content-Type": kind})
        assert status == 202
        assert (job_actions(detail), detail.filtered) == ([], ("live", "signup")), kind


async def test_an_event_whose_actions_are_all_filtered_is_done_with_no_jobs(
    intake: tuple[Post, Journal],
) -> None:
    """Nothing to run: the event is stored, reads as done (also in the state filter and
    counts) and lists every action as filtered."""
    post, journal = intake
    status, detail = await post("/hooks/only", {"livemode": False})
    assert status == 202
    doc = detail.as_dict()
    assert (doc["state"], doc["jobs"], doc["filtered"]) == ("done", [], ["live", "signup"])
    done = await journal.list_events(state="done")
    assert [(e.id, e.state, e.jobs) for e in done] == [(detail.event.id, "done", 0)]
    assert await journal.list_events(state="queued") == []
    counts = await journal.counts()
    assert counts.events == 1 and counts.jobs_by_state["queued"] == 0
    assert await journal.backlog() == 0


async def test_filtered_names_are_stored_with_the_event(
    intake: tuple[Post, Journal], tmp_path: Path
) -> None:
    """The names of the filtered actions are journaled with the event, as a JSON array."""
    post, _ = intake
    _, detail = await post("/hooks/gh", {"type": "invoice.paid"})
    _, plain = await post("/hooks/only", {"livemode": True, "n": 1})
    assert detail.as_dict()["filtered"] == ["deploy"]
    with closing(sqlite3.connect(tmp_path / "webhookd.db")) as conn:
        stored = dict(conn.execute("SELECT id, filtered FROM events").fetchall())
    assert stored == {detail.event.id: '["deploy"]', plain.event.id: '["signup"]'}


async def test_a_source_without_when_lists_nothing_filtered(tmp_path: Path) -> None:
    """Sources without `when` create every job, and their events say "filtered": []."""
    cfg = make_config(tmp_path, '[[sources.s.actions]]\ntype = "log"')
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        journal = await stack.enter_async_context(Journal(cfg.journal.path))
        address = await stack.enter_async_context(serving(Receiver(cfg, journal, IntakeState())))
        async with http.post(f"http://{address}/hooks/s", data=b"{}") as r:
            event_id = (await r.json())["id"]
        detail = await journal.get_event(event_id)
    assert job_actions(detail) == ["log"] and detail.as_dict()["filtered"] == []
    with closing(sqlite3.connect(cfg.journal.path)) as conn:
        assert conn.execute("SELECT filtered FROM events").fetchall() == [(None,)]


async def test_a_journal_from_before_when_is_migrated_and_reads_nothing_filtered(
    tmp_path: Path,
) -> None:
    """A journal written by the previous schema opens, and its events show "filtered": []."""
    db = tmp_path / "old.db"
    with closing(sqlite3.connect(db)) as conn:
        for migration in MIGRATIONS[:3]:
            conn.executescript(migration)
        conn.execute("PRAGMA user_version = 3")
        conn.execute(
            "INSERT INTO events(id, source, received_at, dedup_key, priority, headers, body)"
            " VALUES ('evt_old', 's', 1.0, 's:k', 1, '[]', x'7b7d')"
        )
        conn.commit()
    async with Journal(db, serving=True) as journal:
        detail = await journal.get_event("evt_old")
    assert (detail.state, detail.as_dict()["filtered"]) == ("done", [])
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


# -- a real daemon ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(60)
async def test_serve_runs_only_the_matching_actions_and_shows_the_filtered_ones(
    tmp_path: Path, target: Target
) -> None:
    """Through `webhookd serve`: a push to main is forwarded, an invoice only logged, a push to
    another branch gets no job and is done at once; `show --json` lists what was filtered."""
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        f"""
[sources.gh]
[[sources.gh.actions]]
type = "forward"
name = "deploy"
url = "{target.url}/deploy"
when = {{ "json:ref" = ["refs/heads/main"], "header:X-GitHub-Event" = ["push"] }}

[[sources.gh.actions]]
type = "log"
name = "billing"
when = {{ "json:type" = ["invoice.*"] }}
""",
    )
    procs = Procs()
    try:
        daemon = await procs.serve(cfg)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:

            async def post(body: dict[str, str], **headers: str) -> str:
                url = f"{daemon.url}/hooks/gh"
                async with http.post(url, json=body, headers=headers) as r:
                    assert r.status == 202
                    event_id: str = (await r.json())["id"]
                    return event_id

            push = await post({"ref": "refs/heads/main"}, **{"X-GitHub-Event": "push"})
            invoice = await post({"type": "invoice.paid"}, **{"X-GitHub-Event": "ping"})
            other = await post({"ref": "refs/heads/dev"}, **{"X-GitHub-Event": "push"})

            pushed = await settled_event(http, daemon.admin_url, push)
            invoiced = await settled_event(http, daemon.admin_url, invoice)
            status, skipped = await get_json(http, f"{daemon.admin_url}/events/{other}")

        assert [(j["action"], j["state"]) for j in pushed["jobs"]] == [("deploy", "done")]
        assert pushed["filtered"] == ["billing"]
        assert [(j["action"], j["state"]) for j in invoiced["jobs"]] == [("billing", "done")]
        assert invoiced["filtered"] == ["deploy"]
        assert status == 200 and skipped is not None
        assert (skipped["state"], skipped["jobs"], skipped["filtered"]) == (
            "done",
            [],
            ["deploy", "billing"],
        )
        assert [(s.path, json.loads(s.body)) for s in target.seen] == [
            ("/deploy", {"ref": "refs/heads/main"})
        ]

        shown = await procs.cli("show", other, "--json", "--config", str(cfg))
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert (doc["state"], doc["jobs"], doc["filtered"]) == ("done", [], ["deploy", "billing"])
        shown = await procs.cli("show", push, "--json", "--config", str(cfg))
        assert json.loads(shown.stdout)["filtered"] == ["billing"]
        for event_id, line in (
            (other, "filtered deploy, billing (their when did not match: no job)"),
            (push, "filtered billing (its when did not match: no job)"),
        ):
            shown = await procs.cli("show", event_id, "--config", str(cfg))
            assert f"\n{line}\n" in shown.stdout, shown.stdout
        listed = await procs.cli("events", "--state", "done", "--json", "--config", str(cfg))
        states = {row["id"]: row["jobs"] for row in map(json.loads, listed.stdout.splitlines())}
        assert states == {push: 1, invoice: 1, other: 0}
    finally:
        await procs.aclose()
