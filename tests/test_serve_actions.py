"""Each action kind, run by a real ``webhookd serve`` process (on uvloop, as users run it).

A webhook is posted over HTTP to the daemon; the test waits on the admin API until the event's
jobs have settled (polled with a deadline) and then checks what a user would see: the request at
the forward target, the OpenAI answer kept as the job's result, a handler's return value, the log
line. The ``command`` kind has its own serve tests beside the rest of its tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Target
from openai_standin import StandIn
from procs import Procs, settled_event, write_config
from standardwebhooks.webhooks import Webhook

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(60)]

JSON = {"Content-Type": "application/json"}
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> str:
    """Post a webhook; returns its event id once the daemon has accepted it."""
    async with http.post(url, data=body, headers=JSON) as r:
        answer = await r.json()
        assert r.status == 202, answer
        event_id: str = answer["id"]
        return event_id


def jobs_by_action(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["action"]: job for job in doc["jobs"]}


def handler_config(
    tmp_path: Path, modules: dict[str, str], source: str, handler: str, extra: str = ""
) -> Path:
    """A config whose source ``source`` runs the python ``handler`` from a folder of its own,
    ``tmp_path / "project"``, holding ``modules`` (file name: text); ``extra`` TOML after it."""
    project = tmp_path / "project"
    project.mkdir()
    for name, text in modules.items():
        (project / name).write_text(text, encoding="utf-8")
    return write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        f"""
[sources.{source}]
[[sources.{source}.actions]]
type = "python"
handler = "{handler}"
path = "{project}"
{extra}""",
    )


async def test_forward_delivers_the_raw_body_signed_to_a_real_target(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The target gets the exact body with ``webhook-id`` = the event id and a valid signature."""
    monkeypatch.setenv("FORWARD_SIGNING_SECRET", SIGNING_SECRET)
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        f"""
[sources.shop]
[[sources.shop.actions]]
type = "forward"
url = "{target.url}/orders"
secret = "env:FORWARD_SIGNING_SECRET"
""",
    )
    daemon = await procs.serve(cfg)
    body = '{"order": 42, "note": "café"}'.encode()

    event_id = await post(http, f"{daemon.url}/hooks/shop", body)
    doc = await settled_event(http, daemon.admin_url, event_id)

    assert doc["state"] == "done", doc
    assert jobs_by_action(doc)["forward"]["result"] == {"status": 200}
    (seen,) = target.seen
    assert (seen.method, seen.path, seen.body) == ("POST", "/orders", body)
    assert seen.headers["webhook-id"] == seen.headers["Idempotency-Key"] == event_id
    assert Webhook(SIGNING_SECRET).verify(seen.body, seen.headers) == {"order": 42, "note": "café"}


async def test_openai_answer_from_the_real_client_is_the_jobs_result_in_show(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``openai`` client in the daemon reaches ``base_url`` with the ``env:`` key, and
    ``webhookd show --json`` shows the drafted answer as the job's result."""
    standin = await StandIn(api_key="sk-from-the-environment").start()
    try:
        monkeypatch.setenv("WEBHOOKD_TEST_OPENAI_KEY", "sk-from-the-environment")
        cfg = write_config(
            tmp_path / "webhookd.toml",
            tmp_path / "webhookd.db",
            f"""
[sources.mail]
[[sources.mail.actions]]
type = "openai"
api_key = "env:WEBHOOKD_TEST_OPENAI_KEY"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
system = "You draft replies for a support team."
prompt = "Reply to {{{{ subject }}}}"
max_tokens = 100
""",
        )
        daemon = await procs.serve(cfg)

        event_id = await post(http, f"{daemon.url}/hooks/mail", b'{"subject": "late kettle"}')
        doc = await settled_event(http, daemon.admin_url, event_id)
        shown = await procs.cli("show", event_id, "--json", "--config", str(cfg))
    finally:
        await standin.aclose()

    assert doc["state"] == "done", doc
    assert shown.returncode == 0, shown.stderr
    result = jobs_by_action(json.loads(shown.stdout))["openai"]["result"]
    assert result["text"] == "Draft: Reply to late kettle"
    assert result["model"] == "gpt-4o-mini"
    assert result["finish_reason"] == "stop"
    assert standin.received == len(standin.served) == 1


async def test_an_openai_action_on_a_body_of_a_megabyte_does_not_hold_up_other_webhooks(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three bodies of 900 KB, each a list of numbers with one ``1.50`` last, put whole in a
    prompt with ``{{ . }}`` and posted on by ``then``: meanwhile each tiny webhook to another
    source is answered 202 within a second (``{{ . }}`` of such a body took seconds of the
    event loop's time, once for the prompt and once for the post, and they waited or got 503)."""
    standin = await StandIn(completion_tokens=5).start()
    try:
        monkeypatch.setenv("WEBHOOKD_TEST_OPENAI_KEY", "sk-standin")
        cfg = write_config(
            tmp_path / "webhookd.toml",
            tmp_path / "webhookd.db",
            f"""
[sources.big]
[[sources.big.actions]]
type = "openai"
api_key = "env:WEBHOOKD_TEST_OPENAI_KEY"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
max_tokens = 5
prompt = "Summarize this webhook: {{{{ . }}}}"
then = {{ forward = "{target.url}/answers" }}

[sources.ping]
[[sources.ping.actions]]
type = "log"
""",
        )
        daemon = await procs.serve(cfg)
        # Under the default aiohttp limit of a megabyte a request, as the prompt and the post.
        bodies = [b"[%d," % i + b"1," * 450_000 + b"1.50]" for i in range(3)]
        ids = [await post(http, f"{daemon.url}/hooks/big", body) for body in bodies]
        statuses, worst, n = [], 0.0, 0
        deadline = asyncio.get_running_loop().time() + 30
        while len(target.seen) < len(ids) and asyncio.get_running_loop().time() < deadline:
            started = asyncio.get_running_loop().time()
            async with http.post(f"{daemon.url}/hooks/ping", json={"n": n}) as r:
                statuses.append(r.status)
            worst = max(worst, asyncio.get_running_loop().time() - started)
            n += 1
            await asyncio.sleep(0.05)  # a webhook every 50 ms or so, while they are rendered
        docs = [await settled_event(http, daemon.admin_url, i, timeout_s=30) for i in ids]
    finally:
        await standin.aclose()

    assert [doc["state"] for doc in docs] == ["done"] * 3, docs
    posted = sorted(json.loads(seen.body)["payload"][0] for seen in target.seen)
    assert posted == [0, 1, 2]
    assert all(seen.body.endswith(b",1,1.50]}") for seen in target.seen)
    refused = [status for status in statuses if status != 202]
    assert not refused and worst < 1.0, (
        f"{len(refused)} of {len(statuses)} tiny webhooks refused ({sorted(set(refused))}), the"
        f" slowest answered in {worst:.2f}s"
    )


async def test_a_payload_nested_as_deep_as_a_body_parses_reaches_argv_and_then(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Webhooks nested 940 to 1,000 lists deep, each to a command with ``{{ . }}`` in its argv
    and to an openai action with a ``then``: every job is done, each body that parses posted
    on whole, the rest (deeper than json.loads goes, about 990) with ``"payload": null``. Some
    levels short of that, json.dumps raised RecursionError where json.loads had not: the
    command never ran, and a then could lose its post of an answer paid for the same way."""
    standin = await StandIn(completion_tokens=5).start()
    try:
        monkeypatch.setenv("WEBHOOKD_TEST_OPENAI_KEY", "sk-standin")
        cfg = write_config(
            tmp_path / "webhookd.toml",
            tmp_path / "webhookd.db",
            f"""
[sources.deep]
[[sources.deep.actions]]
name = "cmd"
type = "command"
argv = ["/bin/true", "{{{{ . }}}}"]
retry = {{ max_attempts = 1 }}

[[sources.deep.actions]]
name = "ai"
type = "openai"
api_key = "env:WEBHOOKD_TEST_OPENAI_KEY"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
max_tokens = 5
prompt = "A webhook came"
then = {{ forward = "{target.url}/answers" }}
retry = {{ max_attempts = 1 }}
""",
        )
        daemon = await procs.serve(cfg)
        bodies = {
            await post(http, f"{daemon.url}/hooks/deep", b"[" * n + b"1" + b"]" * n): n
            for n in range(940, 1001)
        }
        docs = [await settled_event(http, daemon.admin_url, i, timeout_s=30) for i in bodies]
    finally:
        await standin.aclose()

    dead = [
        f"{bodies[doc['id']]} deep: {job['action']}: {job['last_error']}"
        for doc in docs
        for job in doc["jobs"]
        if job["state"] != "done"
    ]
    assert not dead, f"{len(dead)} jobs not done: " + "; ".join(dead)
    # Read as text: json.loads, here as in the daemon, takes no body much deeper than that.
    posted = {seen.headers["webhook-id"]: seen.body for seen in target.seen}
    assert sorted(posted) == sorted(bodies)
    whole = {n for i, n in bodies.items() if posted[i].endswith(b"]" * n + b"}")}
    empty = {n for i, n in bodies.items() if posted[i].endswith(b'"payload":null}')}
    assert whole | empty == set(bodies.values()) and max(whole) < min(empty)
    for event_id, n in bodies.items():
        assert n in empty or posted[event_id].endswith(
            b'"payload":' + b"[" * n + b"1" + b"]" * n + b"}"
        )


HANDLERS = """
import asyncio
import threading


def on_sync(event):
    return {
        "order": event.json()["order"],
        "off_the_loop_thread": threading.current_thread() is not threading.main_thread(),
    }


async def on_async(event):
    await asyncio.sleep(0)
    return {"order": event.json()["order"], "loop": type(asyncio.get_running_loop()).__module__}
"""


async def test_python_sync_and_async_handlers_return_the_jobs_results(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """Handlers from the user's own directory run in the daemon: a plain function in a thread,
    an ``async def`` on the daemon's (uvloop) loop; each return value is its job's result."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "shop_hooks.py").write_text(HANDLERS, encoding="utf-8")
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        f"""
[sources.shop]
[[sources.shop.actions]]
name = "sync"
type = "python"
handler = "shop_hooks:on_sync"
path = "{project}"

[[sources.shop.actions]]
name = "async"
type = "python"
handler = "shop_hooks:on_async"
path = "{project}"
""",
    )
    daemon = await procs.serve(cfg)

    event_id = await post(http, f"{daemon.url}/hooks/shop", b'{"order": 7}')
    doc = await settled_event(http, daemon.admin_url, event_id)

    assert doc["state"] == "done", doc
    jobs = jobs_by_action(doc)
    assert jobs["sync"]["result"] == {"order": 7, "off_the_loop_thread": True}
    assert jobs["async"]["result"] == {"order": 7, "loop": "uvloop"}


SHADOWING_HOOKS = """
import secrets

import shop_helpers


def on_order(event):
    return {"total": shop_helpers.total(event.json()), "secrets": secrets.__file__}
"""


async def test_a_handlers_folder_cannot_shadow_the_standard_library_for_the_daemon(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """A handler's folder holding a ``secrets.py`` of its own (one that raises at import) once
    went in front of the standard library for the whole daemon: the ``secrets`` that pydantic,
    and so the daemon, imports after the handlers was that file, and ``check`` printed ok and a
    traceback, ``serve`` died after its start. The folder is searched last now: the handler
    still imports its sibling module, the daemon and the handler get the standard library's
    ``secrets``, and ``check`` and ``serve`` warn that the file is not what it imports."""
    modules = {
        "secrets.py": "raise KeyError('not the stdlib secrets')\n",
        "shop_helpers.py": "def total(order):\n    return sum(order['items'])\n",
        "shop_hooks.py": SHADOWING_HOOKS,
    }
    cfg = handler_config(tmp_path, modules, "shop", "shop_hooks:on_order")
    project = tmp_path / "project"
    warning = (
        f"sources.shop.actions[0].path: {project / 'secrets.py'} is named as the standard"
        " library's secrets: `import secrets` gets the standard library's, not this file,"
        " in the handler too"
    )

    checked = await procs.cli("check", "--config", str(cfg))
    assert (checked.returncode, checked.stdout.startswith("ok: ")) == (0, True), checked
    assert checked.stderr == f"webhookd: warning: {warning}\n"

    daemon = await procs.serve(cfg)
    await daemon.wait_said(re.escape(warning))
    event_id = await post(http, f"{daemon.url}/hooks/shop", b'{"items": [2, 3]}')
    doc = await settled_event(http, daemon.admin_url, event_id)

    assert doc["state"] == "done", doc
    result = jobs_by_action(doc)["python"]["result"]
    assert result == {"total": 5, "secrets": secrets.__file__}
    assert "fatal" not in daemon.log and "Traceback" not in daemon.log


LIFTED_HOOKS = """
import sys


def on_order(event):
    sys.set_int_max_str_digits(0)  # for the whole daemon
    return {"order": event.json()["order"], "n": 10**5000}
"""


async def test_a_result_past_the_int_digits_limit_is_read_after_a_restart(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """A handler that lifted Python's int digits limit and returned 10**5000 was journaled as
    done with its 5,001 digits; after a restart the events API answered 500 and ``show`` and
    ``replay`` crashed, reading it back under the limit. The int is journaled as a short form
    now; and a result stored that way before (written here into the journal) is shown as its
    text, saying why, by the API and ``show``, and ``replay`` runs its job again."""
    cfg = handler_config(
        tmp_path, {"lifted_hooks.py": LIFTED_HOOKS}, "shop", "lifted_hooks:on_order"
    )
    journal = tmp_path / "webhookd.db"
    daemon = await procs.serve(cfg)
    ids = [await post(http, f"{daemon.url}/hooks/shop", b'{"order": %d}' % n) for n in (1, 2)]
    for event_id in ids:
        assert (await settled_event(http, daemon.admin_url, event_id))["state"] == "done"
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    with contextlib.closing(sqlite3.connect(journal)) as db, db:
        db.execute("UPDATE jobs SET result = ? WHERE event_id = ?", ("1" + "0" * 5000, ids[1]))

    daemon = await procs.serve(cfg)
    async with http.get(f"{daemon.admin_url}/events/{ids[0]}") as r:
        assert r.status == 200
        short = (await r.json())["jobs"][0]["result"]
    long_int = "<int of 5,001 digits, past the 4,300 Python reads by default>"
    assert short == {"order": 1, "n": long_int}
    async with http.get(f"{daemon.admin_url}/events/{ids[1]}") as r:
        assert r.status == 200
        unread = (await r.json())["jobs"][0]["result"]
    why = "<not read as JSON here: Exceeds the limit (4300 digits) for integer string conversion"
    assert unread.startswith(why) and unread.endswith("> 1" + "0" * 5000)
    shown = await procs.cli("show", ids[1], "--config", str(cfg))
    assert shown.returncode == 0, shown.stderr
    assert f"    result {json.dumps(unread)[:2000]}" in shown.stdout
    replayed = await procs.cli("replay", ids[1], "--config", str(cfg))
    assert replayed.returncode == 0, replayed.stderr
    doc = await settled_event(http, daemon.admin_url, ids[1])
    assert doc["jobs"][0]["result"] == {"order": 2, "n": short["n"]}


async def test_a_sync_handler_past_its_timeout_is_said_to_run_on_and_its_end_is_logged(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """Python cannot stop a thread: a sync handler past timeout_s runs on to its end. Its
    attempt said only "timed out after 1s"; it says the call runs on now, and the daemon logs
    one line when that call returns at last, with how long it ran."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    hooks = f"def on_push(event):\n    with open({str(fifo)!r}) as f:\n        return f.read()\n"
    cfg = handler_config(
        tmp_path,
        {"slow_hooks.py": hooks},
        "gh",
        "slow_hooks:on_push",
        "timeout_s = 1\nretry = { max_attempts = 1 }\n",
    )
    daemon = await procs.serve(cfg)
    event_id = await post(http, f"{daemon.url}/hooks/gh", b"{}")
    doc = await settled_event(http, daemon.admin_url, event_id)
    runs_on = (
        "timed out after 1s; the handler's call runs on in its thread (Python cannot stop one)"
        " until it returns"
    )
    assert doc["state"] == "dead"
    assert doc["jobs"][0]["last_error"] == f"gave up after 1 attempt(s): {runs_on}"
    assert "ran on" not in daemon.log  # the call still blocks, reading the FIFO

    # Opening the FIFO to write lets the handler's open return; it reads to the end.
    await asyncio.get_running_loop().run_in_executor(None, fifo.write_text, "go")
    line = await daemon.wait_said("returned after")
    said = re.search(
        rf"event={event_id} source=gh action=python: a handler call that ran on after its"
        r" attempt was cut off \(timeout_s 1s\) returned after (\d+\.\d)s, freeing its thread",
        line,
    )
    assert said is not None, line
    assert float(said[1]) >= 1.0


async def test_log_writes_one_line_with_the_event_and_its_body(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """The ``log`` action writes the event id, source, size and body preview to the log."""
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        '[sources.dev]\n[[sources.dev.actions]]\ntype = "log"\n',
    )
    daemon = await procs.serve(cfg)
    body = b'{"hello": "world"}'

    event_id = await post(http, f"{daemon.url}/hooks/dev", body)
    doc = await settled_event(http, daemon.admin_url, event_id)
    line = await daemon.wait_said(f"event={event_id} source=dev bytes=")

    assert doc["state"] == "done", doc
    assert jobs_by_action(doc)["log"]["result"] == {"logged": True}
    assert f"source=dev bytes={len(body)}" in line
    assert f"body={body.decode()!r}" in line


async def test_log_shows_no_part_of_a_secret_that_the_body_previews_cut_falls_inside(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configured secret from byte 186 of a body to byte 214: the preview, cut at 200 bytes,
    shows it as ``***`` (the line was masked after the cut, when the first 14 characters were
    no secret the masker knew, and they were logged)."""
    secret = "dpl-tok-7Qx2mZ9wLk4vR8sT1uY6"
    monkeypatch.setenv("WEBHOOKD_TEST_DEPLOY_TOKEN", secret)
    cfg = write_config(
        tmp_path / "webhookd.toml",
        tmp_path / "webhookd.db",
        """
[sources.ci]
[[sources.ci.actions]]
type = "log"

[[sources.ci.actions]]
type = "command"
argv = ["/bin/true"]
env = { DEPLOY_TOKEN = "env:WEBHOOKD_TEST_DEPLOY_TOKEN" }
""",
    )
    daemon = await procs.serve(cfg)
    # A CI webhook quoting the job's output, the token in it.
    body = json.dumps({"log": "x" * (186 - len('{"log": "')) + secret + " done"}).encode()
    assert body.index(secret.encode()) == 186

    event_id = await post(http, f"{daemon.url}/hooks/ci", body)
    doc = await settled_event(http, daemon.admin_url, event_id)
    line = await daemon.wait_said(f"event={event_id} source=ci bytes=")

    assert doc["state"] == "done", doc
    assert line.endswith(f"body='{body[:186].decode()}***'…"), line[-80:]


async def test_each_kind_gives_its_jobs_the_kinds_own_retry_defaults(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under ``serve``, actions without ``retry`` get their kind's attempts: forward 10, openai
    6, log 3 (each kind declares them; the daemon must hand them to the config)."""
    standin = await StandIn(api_key="sk-from-the-environment").start()
    try:
        monkeypatch.setenv("WEBHOOKD_TEST_OPENAI_KEY", "sk-from-the-environment")
        cfg = write_config(
            tmp_path / "webhookd.toml",
            tmp_path / "webhookd.db",
            f"""
[sources.mixed]
[[sources.mixed.actions]]
type = "forward"
url = "{target.url}/orders"
[[sources.mixed.actions]]
type = "openai"
api_key = "env:WEBHOOKD_TEST_OPENAI_KEY"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
prompt = "Hello"
max_tokens = 10
[[sources.mixed.actions]]
type = "log"
""",
        )
        daemon = await procs.serve(cfg)
        event_id = await post(http, f"{daemon.url}/hooks/mixed", b"{}")
        doc = await settled_event(http, daemon.admin_url, event_id)
    finally:
        await standin.aclose()

    assert doc["state"] == "done", doc
    jobs = jobs_by_action(doc)
    assert {name: job["max_attempts"] for name, job in jobs.items()} == {
        "forward": 10,
        "openai": 6,
        "log": 3,
    }
