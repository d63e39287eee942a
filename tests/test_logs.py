"""Logs: readable key=value lines, JSON lines for shippers, a heartbeat, and never a secret."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import io
import json
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from actionkit import action_kit
from conftest import Target, make_config
from openai_standin import StandIn
from ops_support import TOKEN_ENV, event_state, forward_source
from procs import DaemonProc, Procs, get_json, poll, spawn, write_config
from rawhttp import RawConn

import webhookd
from webhookd import logs
from webhookd.stats import AdminContext, Throughput
from webhookd.status import heartbeat_line, status_line
from webhookd.throttle import Throttle


def pragma(text: str) -> Any:
    return lambda conn: conn.execute(f"PRAGMA {text}").fetchall()


GH_SECRET = "gh-signing-secret-5f2a9c"
JSON = {"Content-Type": "application/json"}
ADMIN_SECRET = "admin-token-8d1e77b0"


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_secret_reaches_the_log_even_at_debug_level(
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
    fmt: str,
) -> None:
    """Signed, badly signed and failing webhooks and refused admin calls log no secret value
    (masking is off here, so this shows nothing logs them in the first place)."""
    monkeypatch.setenv("GH_SECRET", GH_SECRET)
    monkeypatch.setenv(TOKEN_ENV, ADMIN_SECRET)
    cfg = make_config(
        tmp_path,
        forward_source("gh", target.url, verify='{ scheme = "github", secret = "env:GH_SECRET" }'),
        admin=f'token = "env:{TOKEN_ENV}"',
    )
    captured = io.StringIO()
    logs.setup("debug", fmt, stream=captured)
    target.statuses = [500]
    running = await run_daemon(cfg)
    body = b'{"action": "opened"}'
    good = "sha256=" + hmac.new(GH_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": good, "X-GitHub-Delivery": "d-1"}
    status, doc = await running.post("/hooks/gh", body, headers=headers)
    assert status == 202
    status, _ = await running.post(
        "/hooks/gh", body, headers={"X-Hub-Signature-256": "sha256=00", "X-GitHub-Delivery": "x"}
    )
    assert status == 401
    auth = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    await event_state(running.http, running.admin_url, doc["id"], "dead", headers=auth)
    async with running.http.get(running.admin_url + "/stats") as r:
        assert r.status == 401
    assert await running.stop() == 0

    text = captured.getvalue()
    assert "rejected webhook source=gh" in text  # the log did capture the interesting part
    assert "outcome=dead" in text
    assert GH_SECRET not in text and ADMIN_SECRET not in text
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        dead = next(d for d in lines if d.get("outcome") == "dead")
        assert dead["source"] == "gh" and dead["attempt"] == 1
        assert dead["event"] == doc["id"] and dead["job"].startswith("job_")


def test_a_secret_that_slips_into_a_message_is_masked(restore_logging: None) -> None:
    """Second line of defence: configured secret values are masked in text and JSON lines."""
    for fmt in ("text", "json"):
        out = io.StringIO()
        logs.setup("info", fmt, secrets={GH_SECRET, "abc"}, stream=out)
        logging.getLogger("webhookd.test").warning("header was %s", f"sha256={GH_SECRET}")
        assert GH_SECRET not in out.getvalue()
        assert logs.MASK in out.getvalue()


def test_a_secret_is_masked_in_the_escaped_forms_a_line_carries(restore_logging: None) -> None:
    """A secret with a tab, a backslash or a quote in it (a ``file:`` one, say) no longer reads
    as itself once a %r, JSON or the text format's escapes have been at it: masked anyway."""
    secrets = ("pa\tss-word-1", "back\\slash-2", 'quo"te-3')
    for fmt in ("text", "json"):
        out = io.StringIO()
        logs.setup("info", fmt, secrets=set(secrets), stream=out)
        log = logging.getLogger("webhookd.test")
        for secret in secrets:
            log.warning("raw %s and repr %r", secret, secret)
            log.warning("an error=%r", RuntimeError(f"wrong key {secret}"))
        written = out.getvalue()
        for secret in secrets:
            for form in (secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]):
                assert form not in written, (fmt, form, written)
        assert written.count(logs.MASK) == 9, written


def test_secrets_a_reload_adds_are_masked_beside_the_earlier_ones(restore_logging: None) -> None:
    for fmt in ("text", "json"):
        out = io.StringIO()
        logs.setup("info", fmt, secrets={GH_SECRET}, stream=out)
        logs.add_secrets({ADMIN_SECRET})
        logging.getLogger("webhookd.test").warning("%s and %s", GH_SECRET, ADMIN_SECRET)
        assert GH_SECRET not in out.getvalue() and ADMIN_SECRET not in out.getvalue()
        assert out.getvalue().count(logs.MASK) == 2


def test_a_log_masks_what_the_pool_says_may_still_be_printed_and_the_last_reloads_secrets(
    restore_logging: None,
) -> None:
    """The secrets ``add_secrets`` adds are those of the reload being read, which may yet be
    refused: the next one's replace them, beside what ``setup`` or the worker pool's last word
    (``mask_only``: the running config's, and those of configs attempts still running began on)
    left. A secret rotated out is not masked for the rest of the process."""
    handler = logs.setup("info", "text", secrets={GH_SECRET}, stream=io.StringIO())
    assert isinstance(handler.formatter, logs.TextFormatter)
    logs.add_secrets({"refused-reload-secret-1"})
    logs.add_secrets({"refused-reload-secret-2"})
    assert handler.formatter.masker.given == {GH_SECRET, "refused-reload-secret-2"}
    logs.mask_only({ADMIN_SECRET})
    logs.add_secrets({ADMIN_SECRET, "next-reload-secret"})
    assert handler.formatter.masker.given == {ADMIN_SECRET, "next-reload-secret"}


def test_a_text_line_stays_one_line_whatever_a_message_carries(restore_logging: None) -> None:
    """What a program or a target wrote (a command's stderr tail, an error) cannot start a line
    of its own that reads like the daemon's, nor send a terminal an escape sequence: the text
    format writes a message's unprintable characters as escapes. A traceback keeps its lines,
    indented under their record."""
    out = io.StringIO()
    logs.setup("info", "text", stream=out)
    forged = "boom\n2026-12-02T00:00:00.000Z info    workers: job j1 outcome=done\x1b[2K"
    logging.getLogger("webhookd.test").warning("stderr tail: %s", forged)
    try:
        raise ValueError("first\nsecond")
    except ValueError:
        logging.getLogger("webhookd.test").exception("failed")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(
        "stderr tail: boom\\n2026-12-02T00:00:00.000Z info    workers: job j1 outcome=done\\x1b[2K"
    )
    assert "\x1b" not in out.getvalue()
    assert lines[1].endswith("test: failed") and lines[2] == "  Traceback (most recent call last):"
    assert lines[-2:] == ["  ValueError: first", "  second"]


def look_up_order(event: webhookd.Event) -> None:
    """A handler logging an exception that quotes the sender's order field, then refusing."""
    order = event.json()["order"]
    try:
        raise LookupError(f"no such order {order}")
    except LookupError:
        logging.getLogger("orders").exception("order lookup failed")
        raise webhookd.Reject("no such order") from None


async def test_an_exceptions_text_from_a_sender_stays_escaped_in_the_text_log(
    tmp_path: Path, restore_logging: None
) -> None:
    """A handler's own ``log.exception`` (formatted like the daemon's lines) whose exception
    quotes a webhook: the sender's escape codes are written as escapes and its line dated like
    the daemon's stands indented in the traceback, not as a line of its own."""
    forged = "2030-01-01T00:00:00.000Z error   app: admin token rotated"
    out = io.StringIO()
    logs.setup("info", "text", stream=out)
    config = '[sources.shop]\n[[sources.shop.actions]]\ntype = "python"\n'
    config += 'handler = "test_logs:look_up_order"\n'
    async with action_kit(tmp_path, config) as kit:
        await kit.send("shop", {"order": f"42\x1b[2J\n{forged}"})
        await kit.run()
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert not [line for line in lines if line.startswith("2030-")]
    [at] = [n for n, line in enumerate(lines) if line.endswith("orders: order lookup failed")]
    assert lines[at + 1] == "  Traceback (most recent call last):"
    assert "  LookupError: no such order 42\\x1b[2J" in lines
    assert f"  {forged}" in lines


def test_secret_values_finds_env_secrets_in_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ``env:`` secret of a config (admin token, verify secrets) is found for masking."""
    monkeypatch.setenv("GH_SECRET", GH_SECRET)
    monkeypatch.setenv(TOKEN_ENV, ADMIN_SECRET)
    cfg = make_config(
        tmp_path,
        '[sources.gh]\nverify = { scheme = "github", secret = "env:GH_SECRET" }\n',
        admin=f'token = "env:{TOKEN_ENV}"',
    )
    assert {GH_SECRET, ADMIN_SECRET} <= logs.secret_values(cfg)


def test_secret_values_are_the_options_that_take_secrets_not_any_text_like_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward's url, headers and secret, a command's env, an openai action's key (written or
    its default) and a then-forward's headers are secrets to mask; an argv item or a prompt
    that starts with ``env:`` or ``file:`` is text. Read as a secret, ``env:HOME`` masked the
    home folder in every line, and a ``file:`` naming a FIFO hung the start."""
    values = {
        "FWD_URL": "http://127.0.0.1:9/url-secret",
        "FWD_AUTH": "Bearer header-secret",
        "CMD_TOKEN": "command-env-secret",
        "OPENAI_API_KEY": "sk-default-key-secret",
        "THEN_AUTH": "Bearer then-header-secret",
        "NOT_SECRET": "plain-text-value",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cfg = make_config(
        tmp_path,
        f"""
[sources.s]
[[sources.s.actions]]
type = "forward"
url = "env:FWD_URL"
headers = {{ Authorization = "env:FWD_AUTH" }}
[[sources.s.actions]]
type = "command"
argv = ["/bin/echo", "env:NOT_SECRET", "file:{fifo}"]
env = {{ TOKEN = "env:CMD_TOKEN" }}
[[sources.s.actions]]
type = "openai"
model = "m"
prompt = "env:NOT_SECRET"
max_tokens = 10
then = {{ forward = "http://127.0.0.1:9/t", headers = {{ Authorization = "env:THEN_AUTH" }} }}
""",
    )
    found = logs.secret_values(cfg)
    assert found == set(values.values()) - {"plain-text-value"}


def test_json_lines_lift_key_value_pairs_into_fields() -> None:
    """``key=value`` pairs of a message become typed JSON fields; quoted values lose quotes."""
    assert logs.fields("job=j1 event=e1 attempt=2 rate=1.5 error='boom: x y' busy=1/4") == {
        "job": "j1",
        "event": "e1",
        "attempt": 2,
        "rate": 1.5,
        "error": "boom: x y",
        "busy": "1/4",
    }


def test_json_fields_keep_a_names_text_and_a_lines_own_values() -> None:
    """A source named like a number (``2024``, ``nan``, ``1e5``, ``007``) stays text, so a field
    keeps one type and the line stays JSON (``nan`` made ``NaN``, which is none); only what JSON
    writes as a number becomes one; a key said twice keeps its first value, the line's own,
    not one a sender's text appended."""
    for name in ("2024", "nan", "Infinity", "-inf", "1e5", "1_000", "007"):
        assert logs.fields(f"event=evt_1 source={name} attempt=2")["source"] == name
    assert logs.fields("n=007 m=1_000 k=1e400 x=-0.5 y=3e2") == {
        "n": "007",
        "m": "1_000",
        "k": "1e400",
        "x": -0.5,
        "y": 300.0,
    }
    said = logs.fields("event=evt_1 source=shop content_type='a source=evil' source=evil")
    assert (said["source"], said["content_type"]) == ("shop", "a source=evil")
    record = logging.LogRecord("webhookd.x", logging.INFO, "", 0, "source=nan k=1e400", (), None)
    doc = json.loads(logs.JsonFormatter().format(record), parse_constant=_no_constant)
    assert (doc["source"], doc["k"]) == ("nan", "1e400")
    # Past Python's 4,300 digits int() raised: the line was lost to a logging error's traceback.
    digits = "9" * 5000
    record = logging.LogRecord("webhookd.x", logging.INFO, "", 0, f"n={digits} m=12", (), None)
    doc = json.loads(logs.JsonFormatter().format(record))
    assert (doc["n"], doc["m"]) == (digits, 12)


async def test_a_log_actions_line_keeps_its_own_fields_whatever_the_content_type_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender's Content-Type is quoted in the log action's line: one carrying
    ``source=shop event=evt_FAKE`` cannot replace the event's own id and source in the JSON
    line's fields."""
    caplog.set_level(logging.INFO, logger="webhookd.actions.log")
    async with action_kit(
        tmp_path, '[sources.new]\n[[sources.new.actions]]\ntype = "log"\n'
    ) as kit:
        event_id = await kit.send(
            "new", b"hello", content_type="text/plain; source=shop event=evt_FAKE bytes=999999"
        )
        await kit.run()
    [record] = [r for r in caplog.records if r.name == "webhookd.actions.log"]
    doc = json.loads(logs.JsonFormatter().format(record))
    assert (doc["event"], doc["source"], doc["bytes"]) == (event_id, "new", 5)
    assert doc["content_type"] == "text/plain; source=shop event=evt_FAKE bytes=999999"


def _no_constant(name: str) -> None:
    raise AssertionError(f"not JSON: {name}")


async def test_a_daemon_starting_with_a_secret_written_in_its_config_warns_naming_the_key(
    tmp_path: Path, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As ``check`` does: one warning per secret written in the file itself, its key and never
    its value; a config without one says nothing of it."""
    caplog.set_level(logging.INFO, logger="webhookd")
    await run_daemon(make_config(tmp_path, "[sources.quiet]\n"))
    assert "written in the config file" not in caplog.text
    caplog.clear()
    inline = '[sources.shop]\nverify = { scheme = "github", secret = "gh-inline-secret" }\n'
    await run_daemon(make_config(tmp_path / "b", inline))
    warned = [r for r in caplog.records if "written in the config file" in r.getMessage()]
    assert [(r.levelname, r.getMessage().split(" is ")[0]) for r in warned] == [
        ("WARNING", "sources.shop.verify.secret")
    ]
    assert "gh-inline-secret" not in caplog.text


async def test_a_daemon_starting_with_a_command_whose_program_is_not_there_warns(
    tmp_path: Path, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As ``check`` does: the start says which command's program is missing, before its jobs
    fail one by one."""
    caplog.set_level(logging.INFO, logger="webhookd")
    missing = tmp_path / "deploy.sh"
    action = f'[[sources.gh.actions]]\ntype = "command"\nargv = ["{missing}"]\n'
    await run_daemon(make_config(tmp_path, action))
    warned = [r.getMessage() for r in caplog.records if "argv[0]" in r.getMessage()]
    assert warned == [
        f"sources.gh.actions[0].argv[0]: {str(missing)!r} is not an executable file: its jobs"
        " fail until it is"
    ]


async def test_heartbeat_line_says_backlog_rates_workers_and_paused(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """The 30 s heartbeat is one key=value line with backlog, rates, busy workers, paused."""
    running = await run_daemon(make_config(tmp_path, forward_source("shop", target.url)))
    daemon = running.daemon
    assert daemon.journal is not None and daemon.pool is not None
    await daemon.journal.pause("shop")
    await daemon.pool._refresh_paused()
    ctx = AdminContext(
        config=daemon.config,
        journal=daemon.journal,
        pool=daemon.pool,
        intake=daemon.intake,
        boot_id=daemon.boot_id,
        started_at=0.0,
        throughput=Throughput(daemon.pool),
    )
    line = heartbeat_line(ctx)
    fields = logs.fields(line)
    assert line.startswith("heartbeat ")
    assert fields["backlog"] == 0
    assert fields["busy"] == f"0/{daemon.config.workers.concurrency}"
    assert {"accepted_per_s", "finished_per_s", "outcomes"} <= set(fields)
    assert fields["paused"] == "shop" and "holding" not in fields
    # Queued jobs beside idle workers while a burst is answered: the line says why.
    daemon.pool.holding = True
    assert logs.fields(heartbeat_line(ctx))["holding"] == "burst"
    assert "new jobs held while a burst is answered" in status_line("serving", ctx)


async def test_heartbeat_line_names_the_journal_problem_webhooks_are_refused_for(
    tmp_path: Path, run_daemon: Any
) -> None:
    """While the journal cannot write (a full disk) the heartbeat says so, in /readyz' words,
    and stops saying it once a commit goes through again."""
    running = await run_daemon(make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"'))
    daemon = running.daemon
    journal = daemon.journal
    assert journal is not None and daemon.pool is not None
    ctx = AdminContext(
        config=daemon.config,
        journal=journal,
        pool=daemon.pool,
        intake=daemon.intake,
        boot_id=daemon.boot_id,
        started_at=0.0,
        throughput=Throughput(daemon.pool),
    )
    assert "journal_problem" not in logs.fields(heartbeat_line(ctx))
    # The disk fills: SQLite may not grow the file by another page (SQLITE_FULL, as ENOSPC).
    [(pages,)] = await journal._call(pragma("page_count"), transaction=False)
    await journal._call(pragma(f"max_page_count = {pages}"), transaction=False)
    big = b'{"pad": "' + b"x" * 60_000 + b'"}'
    assert (await running.post("/hooks/a", big, headers=JSON))[0] == 503
    async with running.http.get(running.admin_url + "/readyz") as r:
        problems = (await r.json())["problems"]
    assert problems == ["journal: database or disk is full"]
    assert logs.fields(heartbeat_line(ctx))["journal_problem"] == problems[0]
    await journal._call(pragma("max_page_count = 1073741823"), transaction=False)
    assert (await running.post("/hooks/a", big, headers=JSON))[0] == 202
    assert "journal_problem" not in logs.fields(heartbeat_line(ctx))


@pytest.mark.subprocess
async def test_serve_flags_override_the_configured_log_format_and_level(tmp_path: Path) -> None:
    """``serve --log-format json --log-level debug`` beats ``[log]`` in the file: JSON lines."""
    config = write_config(tmp_path / "w.toml", tmp_path / "w.db")  # says level = "info", text
    procs = Procs()
    try:
        proc = await spawn(
            ["serve", "--config", str(config), "--log-format", "json", "--log-level", "debug"],
            None,
            stdout=asyncio.subprocess.DEVNULL,
        )
        daemon = DaemonProc(proc)
        daemon.reader = asyncio.create_task(daemon._read())
        procs.daemons.append(daemon)
        await daemon.wait_listening()
        daemon.signal(15)
        assert await daemon.wait_exit() == 0
    finally:
        await procs.aclose()
    docs = [json.loads(line) for line in daemon.lines if line.strip()]
    assert any("listening on" in d["msg"] for d in docs)
    assert {d["level"] for d in docs} <= {"debug", "info", "warning", "error"}


async def test_requests_refused_before_storing_get_a_line_a_flood_of_them_a_count(
    tmp_path: Path, target: Target, run_daemon: Any, restore_logging: None
) -> None:
    """A 404 (an unknown source) or a 413 (a body too large) left no line at any level: a
    provider's "we sent it" had only /metrics to be checked against. Each gets an INFO line
    naming status, path, reason and peer, throttled like the other lines a sender can cause.
    A GET that finds nothing (a load balancer's probe of ``/``) is not a webhook: no line."""
    cfg = make_config(tmp_path, forward_source("shop", target.url), server="max_body_bytes = 1024")
    captured = io.StringIO()
    logs.setup("info", "text", stream=captured)
    running = await run_daemon(cfg)
    assert (await running.post("/hooks/shop", b"x" * 2048))[0] == 413
    async with running.http.get(running.url + "/") as r:  # a probe: no webhook, no line
        assert r.status == 404
    for n in range(12):
        assert (await running.post(f"/hooks/nope{n}", b"{}"))[0] == 404
    assert await running.stop() == 0

    lines = captured.getvalue().splitlines()
    refused = [line for line in lines if "refused webhook status=" in line]
    assert len(refused) == 10
    assert "status=413 path='/hooks/shop' reason='body larger than 1024 bytes' peer=" in refused[0]
    assert "status=404 path='/hooks/nope0' reason='no such source' peer=127.0.0.1" in refused[1]
    said = [line.split(": ", 1)[1] for line in lines if "more refused requests" in line]
    assert said == ["suppressed=3 more refused requests in the last 60 s, not logged one by one"]


async def test_behind_a_trusted_proxy_the_lines_name_the_client_it_forwards_for(
    tmp_path: Path, target: Target, run_daemon: Any, restore_logging: None
) -> None:
    """With ``server.trusted_proxies``, a refused or rejected webhook's line names the client
    the proxy's ``X-Forwarded-For`` gives (the last address not a proxy's), not the proxy; what
    a client wrote there itself is told as such. (Without it the header is ignored: the test
    before this one sends none, and ``client_of``'s own test sends one from an untrusted
    peer.)"""
    signed = forward_source("gh", target.url) + '[sources.gh.verify]\nscheme = "github"\n'
    signed += 'secret = "a-signing-secret-of-some-length"\n'
    cfg = make_config(tmp_path, signed, server='trusted_proxies = ["127.0.0.1", "10.0.0.0/8"]')
    captured = io.StringIO()
    logs.setup("info", "text", stream=captured)
    running = await run_daemon(cfg)
    hops = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7, 10.1.2.3"}
    assert (await running.post("/hooks/nope", b"{}", headers=hops))[0] == 404
    assert (await running.post("/hooks/gh", b"{}", headers=hops))[0] == 401
    junk = {"X-Forwarded-For": "not-an-address"}
    assert (await running.post("/hooks/nope", b"{}", headers=junk))[0] == 404
    assert await running.stop() == 0
    lines = captured.getvalue().splitlines()
    refused = [line for line in lines if "refused webhook" in line]
    rejected = [line for line in lines if "rejected webhook" in line]
    assert refused[0].endswith("peer=198.51.100.7") and rejected[0].endswith("peer=198.51.100.7")
    assert refused[1].endswith("peer=127.0.0.1 (forwarded for 'not-an-address')")


async def test_a_drain_tells_what_the_throttled_lines_held_back(
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> None:
    """A flood of bad signatures and of malformed requests at a real daemon: ten lines of each,
    and the drain writes how many more there were, so no refusal goes untold."""
    monkeypatch.setenv("GH_SECRET", GH_SECRET)
    cfg = make_config(
        tmp_path,
        forward_source("gh", target.url, verify='{ scheme = "github", secret = "env:GH_SECRET" }'),
    )
    captured = io.StringIO()
    logs.setup("info", "text", stream=captured)
    running = await run_daemon(cfg)
    bad = {"X-Hub-Signature-256": "sha256=00", "X-GitHub-Delivery": "x"}
    for _ in range(15):
        assert (await running.post("/hooks/gh", b"{}", headers=bad))[0] == 401
    for _ in range(12):
        conn = await RawConn.open(running.daemon.bound.receiver)
        await conn.send(b"PO(ST /hooks/gh HTTP/1.1\r\n\r\n")
        assert (await conn.answer()).status == 400
        await conn.close()
    assert await running.stop() == 0

    lines = captured.getvalue().splitlines()
    assert len([line for line in lines if "rejected webhook source=gh" in line]) == 10
    assert len([line for line in lines if "refused a malformed request" in line]) == 10
    said = [line.split(": ", 1)[1] for line in lines if "not logged one by one" in line]
    assert sorted(said) == [
        "suppressed=2 more malformed requests refused in the last 60 s, not logged one by one",
        "suppressed=5 more rejected webhooks in the last 60 s, not logged one by one",
    ]


async def test_a_throttled_line_tells_its_count_when_its_period_ends() -> None:
    """With no later line to carry it, the count is written when the period ends; without a
    running loop, by the first line after it."""
    logger = logging.getLogger("webhookd.test.throttle")
    seen: list[str] = []
    told = asyncio.Event()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())
            if "more" in record.getMessage():
                told.set()

    keep = Keep()
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        throttle = Throttle(logger, logging.WARNING, "refusals", burst=2, period_s=0.05)
        for n in range(5):
            throttle("refused n=%d", n)
        await asyncio.wait_for(told.wait(), 10)
        assert seen == [
            "refused n=0",
            "refused n=1",
            "suppressed=3 more refusals in the last 0.05 s, not logged one by one",
        ]
        throttle.flush()  # nothing held back: nothing written
        assert len(seen) == 3
    finally:
        logger.removeHandler(keep)


def test_a_throttle_without_a_loop_tells_its_count_with_the_next_line() -> None:
    logger = logging.getLogger("webhookd.test.throttle")
    now = [100.0]
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        throttle = Throttle(logger, logging.INFO, "refusals", burst=1, clock=lambda: now[0])
        for n in range(3):
            throttle("refused n=%d", n)
        assert seen == ["refused n=0"]
        now[0] += 60
        throttle("refused n=%d", 3)
        assert seen == [
            "refused n=0",
            "suppressed=2 more refusals in the last 60 s, not logged one by one",
            "refused n=3",
        ]
    finally:
        logger.removeHandler(keep)


async def test_a_model_call_logs_the_jobs_line_not_the_http_clients(
    tmp_path: Path, run_daemon: Any, restore_logging: None
) -> None:
    """An ``openai`` job at info level leaves its own outcome line and none of the HTTP
    library's per-request ones."""
    standin = await StandIn().start()
    try:
        cfg = make_config(
            tmp_path,
            f"""
[sources.mail]
[[sources.mail.actions]]
type = "openai"
api_key = "sk-standin"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
prompt = "Reply to {{{{ subject }}}}"
max_tokens = 50
""",
        )
        captured = io.StringIO()
        logs.setup("info", "text", stream=captured)
        running = await run_daemon(cfg)
        status, doc = await running.post("/hooks/mail", b'{"subject": "hi"}')
        assert status == 202
        await event_state(running.http, running.admin_url, doc["id"], "done")
        assert await running.stop() == 0
    finally:
        await standin.aclose()
    text = captured.getvalue()
    assert standin.received == 1 and "outcome=done" in text
    assert "HTTP Request" not in text, text


async def test_a_retry_line_says_in_how_many_seconds_the_job_runs_next(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A job's retry (or wait) line carries ``next_in_s``: without it the log said a job would
    be tried again, never when, and only ``show`` had the time."""
    caplog.set_level(logging.INFO, "webhookd")
    target.statuses = [500]
    source = forward_source("shop", target.url + "/shop", max_attempts=2, base_s=60)
    running = await run_daemon(make_config(tmp_path, source))
    finished = asyncio.Event()
    running.daemon.pool.on_finish.append(lambda *_: finished.set())
    status, _ = await running.post("/hooks/shop", '{"n": 1}')
    assert status == 202
    async with asyncio.timeout(15):
        await finished.wait()
    [line] = [r.getMessage() for r in caplog.records if "outcome=retry" in r.getMessage()]
    found = re.search(r"attempt=1 outcome=retry next_in_s=(\d+\.\d) error='", line)
    assert found is not None, line
    assert 30 <= float(found[1]) <= 60  # the policy's 60 s, its second half random


def test_client_of_trusts_the_forwarded_for_header_of_listed_peers_alone() -> None:
    """``client_of``: from a peer not listed, or with no list, the peer itself whatever the
    header says; from a listed one, the last hop not listed (an IPv4 peer seen by a dual-stack
    listener included), or the peer when every hop is a proxy."""
    from types import SimpleNamespace

    from multidict import CIMultiDict

    from webhookd.config import parse_networks
    from webhookd.receiver import client_of

    def seen(peer: str, *hops: str, trusted: tuple[str, ...] = ("10.0.0.0/8",)) -> str | None:
        headers = CIMultiDict(("X-Forwarded-For", hop) for hop in hops)
        request = SimpleNamespace(remote=peer, headers=headers)
        return client_of(request, parse_networks(list(trusted), "k"))  # type: ignore[arg-type]

    assert seen("203.0.113.5", "6.6.6.6") == "203.0.113.5"  # not a proxy: ignored
    assert seen("10.0.0.2", "6.6.6.6", trusted=()) == "10.0.0.2"
    assert seen("10.0.0.2", "198.51.100.1, 6.6.6.6", "10.0.0.9") == "6.6.6.6"
    assert seen("::ffff:10.0.0.2", "6.6.6.6") == "6.6.6.6"
    assert seen("10.0.0.2", "10.0.0.3, 10.0.0.4") == "10.0.0.2"
    assert seen("10.0.0.2") == "10.0.0.2"
    # A port some proxies append is dropped; a bare IPv6 address keeps its colons.
    assert seen("10.0.0.2", "6.6.6.6:51234") == "6.6.6.6"
    assert seen("10.0.0.2", "[2001:db8::7]:443, 10.0.0.9:80") == "2001:db8::7"
    assert seen("10.0.0.2", "[2001:db8::7]") == "2001:db8::7"
    assert seen("10.0.0.2", "2001:db8::7") == "2001:db8::7"
    assert seen("10.0.0.2", "6.6.6.6:x") == "10.0.0.2 (forwarded for '6.6.6.6:x')"


LOG_ACTION = '[sources.shop]\n[[sources.shop.actions]]\ntype = "log"\n'
# The log action quotes a webhook's Content-Type: this one makes its line 3 KB, so a few
# hundred webhooks write more than a pipe and the daemon's backlog hold.
LONG_TYPE = "text/plain; pad=" + "x" * 3000
DROPPED = re.compile(r"(\d+) log line\(s\) dropped: stderr was not being read")
_LISTENING = re.compile(r"listening on http://(\S+) \(webhooks\) and http://(\S+) \(admin\)")


def _read_lines(stream: IO[bytes], lines: list[str], until: str | None = None) -> None:
    """Read ``stream`` into ``lines`` until a line holds ``until``, else to its end (run in a
    thread: the reads block)."""
    while raw := stream.readline():
        lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
        if until is not None and until in lines[-1]:
            return


async def _serve_into_a_pipe(tmp_path: Path, procs: Procs) -> tuple[DaemonProc, IO[bytes], int]:
    """``webhookd serve`` with a log action, its stderr a pipe whose read end is the test's,
    read up to the "listening on" line; returns the daemon, that read end, and how many bytes
    the daemon can write before a write waits for the test (the pipe and what a read took
    ahead)."""
    config = write_config(tmp_path / "w.toml", tmp_path / "w.db", LOG_ACTION)
    read_end, write_end = os.pipe()
    try:
        proc = await spawn(
            ["serve", "--config", str(config)],
            None,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=write_end,
        )
    finally:
        os.close(write_end)
    daemon = DaemonProc(proc)
    procs.daemons.append(daemon)  # killed at the test's end whatever happens
    stderr = os.fdopen(read_end, "rb")
    async with asyncio.timeout(15):
        await asyncio.to_thread(_read_lines, stderr, daemon.lines, "listening on")
    found = _LISTENING.search(daemon.lines[-1])
    assert found is not None, daemon.log
    daemon.receiver, daemon.admin = found[1], found[2]
    room = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ) + io.DEFAULT_BUFFER_SIZE
    return daemon, stderr, room


async def _log_webhooks(
    http: aiohttp.ClientSession, daemon: DaemonProc, n: int, content_type: str, done: int = 0
) -> list[str]:
    """Post ``n`` webhooks (bodies of their own: not duplicates), 20 at a time, each answered
    202, and wait until the journal has ``done + n`` jobs done (each one a line of the log
    action); returns their event ids."""

    async def post(body: str) -> str:
        headers = {"Content-Type": content_type}
        async with http.post(f"{daemon.url}/hooks/shop", data=body, headers=headers) as r:
            assert r.status == 202
            return str((await r.json())["id"])

    ids: list[str] = []
    while len(ids) < n:
        batch = range(done + len(ids), done + min(len(ids) + 20, n))
        ids += await asyncio.gather(*(post(f'{{"n": {i}}}') for i in batch))

    async def all_done() -> bool:
        _, doc = await get_json(http, f"{daemon.admin_url}/stats")
        jobs = doc["jobs"] if doc else {}
        return isinstance(jobs, dict) and jobs.get("done") == done + n

    await poll(all_done, timeout_s=30)
    return ids


@pytest.mark.subprocess
async def test_a_stalled_stderr_costs_log_lines_not_the_daemon(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """stderr into a pipe the test stops reading (a blocking log driver, a stalled journald):
    webhooks are still answered, their jobs run and /healthz answers, where the whole daemon
    used to wait for the reader once 64 KB were unread. Lines past the backlog are dropped, and
    once stderr is read again the log says how many, where the gap is."""
    daemon, stderr, room = await _serve_into_a_pipe(tmp_path, procs)
    n = (logs.BACKLOG_CHARS + room) // len(LONG_TYPE) + 50
    with stderr:
        async with asyncio.timeout(60):
            stalled = await _log_webhooks(http, daemon, n, LONG_TYPE)
            assert (await get_json(http, f"{daemon.admin_url}/healthz"))[0] == 200

        async with asyncio.timeout(15):  # with no line logged since
            await asyncio.to_thread(_read_lines, stderr, daemon.lines, "log line(s) dropped")
        daemon.signal(signal.SIGTERM)
        await asyncio.to_thread(_read_lines, stderr, daemon.lines)
        assert await daemon.wait_exit() == 0
    told = [i for i, line in enumerate(daemon.lines) if DROPPED.search(line)]
    dropped = sum(int(found[1]) for found in map(DROPPED.search, daemon.lines) if found)
    written = [i for i, line in enumerate(daemon.lines) if "pad=xxx" in line]
    # Each webhook's line was written or is among those counted (with the job lines).
    assert 0 < len(written) < len(stalled) <= len(written) + dropped
    assert written[-1] < told[-1] and "stopped cleanly" in daemon.lines[-1]


@pytest.mark.subprocess
async def test_a_stalled_stderr_does_not_hold_the_exit(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """SIGTERM while nothing reads stderr: the drain runs and the process exits 0, what it
    could not write given up after ``logs.DRAIN_S``, where it used to wait for the reader for
    ever (its signal was not even handled)."""
    daemon, stderr, room = await _serve_into_a_pipe(tmp_path, procs)
    with stderr:
        async with asyncio.timeout(60):
            await _log_webhooks(http, daemon, room // len(LONG_TYPE) + 20, LONG_TYPE)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(timeout_s=15) == 0
        unread = await asyncio.to_thread(stderr.read)
    assert b"draining" not in unread  # queued behind the full pipe: the exit did not wait


@pytest.mark.subprocess
async def test_a_stderr_read_as_it_comes_gets_every_line(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """Written by a thread of its own, no line is lost or said twice when stderr is read: one
    log action line for each of 300 webhooks, and the exit's last line before the process
    ends."""
    daemon = await procs.serve(write_config(tmp_path / "w.toml", tmp_path / "w.db", LOG_ACTION))
    ids = await _log_webhooks(http, daemon, 300, "application/json")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    assert sorted(re.findall(r"actions\.log: event=(\S+) source=shop", daemon.log)) == sorted(ids)
    assert not DROPPED.search(daemon.log) and "stopped cleanly" in daemon.lines[-1]


def test_lines_past_the_backlog_are_dropped_and_counted_warnings_kept_first(
    restore_logging: None,
) -> None:
    """Logging into a pipe nobody reads never waits: info lines past the backlog are dropped
    and a warning still finds a place; each gap is told where it is, by the next line that
    finds room or by the flush at exit, which gives up after ``DRAIN_S`` (once, however often
    asked)."""
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as reader, os.fdopen(write_end, "w") as writer:
        handler = logs.setup("info", "text", stream=writer)
        log = logging.getLogger("webhookd.test")
        room = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)
        infos = (logs.BACKLOG_CHARS + room) // 1000 + 10

        def log_with_nobody_reading() -> None:
            for n in range(infos):
                log.info("info n=%d %s", n, "i" * 1000)
            log.warning("kept")
            log.info("lost")
            handler.flush()  # as at exit: gives up after DRAIN_S...
            handler.flush()  # ...in all

        logging_thread = threading.Thread(target=log_with_nobody_reading, daemon=True)
        logging_thread.start()
        logging_thread.join(timeout=logs.DRAIN_S + 10)
        assert not logging_thread.is_alive(), "a log call waited for the pipe's reader"

        lines: list[str] = []
        reading = threading.Thread(target=_read_lines, args=(reader, lines, "the end"))
        reading.start()
        log.warning("the end")
        reading.join(timeout=30)
    written = [line for line in lines if " info n=" in line]
    told = [int(found[1]) for line in lines if (found := DROPPED.search(line))]
    # Each line was written or counted (in one gap or more: the writer may still have been
    # filling the pipe when the backlog first ran out, and on a busy machine it had made room
    # again by the time "lost" came, which was then written).
    lost_written = any(line.endswith(" test: lost") for line in lines)
    assert 0 < len(written) < infos
    assert len(written) + sum(told) + lost_written == infos + 1
    assert [DROPPED.sub("N dropped", line.split(" ", 1)[1]) for line in lines[-4:]] == [
        "warning logs: N dropped",
        "warning test: kept",
        "info    test: lost" if lost_written else "warning logs: N dropped",
        "warning test: the end",
    ]
    assert lost_written or told[-1] == 1  # "lost", told by the flush


@pytest.mark.subprocess
async def test_under_journald_each_line_carries_its_priority_and_elsewhere_none(
    tmp_path: Path,
) -> None:
    """A stderr that systemd connected to the journal (named by JOURNAL_STREAM) gets each line
    led by its syslog priority, <4> a warning, <6> info, which journald takes as the entry's
    priority (`journalctl -p warning` finds the warnings); a stderr that is not the one named
    gets the lines as they are."""
    missing = tmp_path / "deploy.sh"  # the start warns of it
    action = f'[sources.gh]\n[[sources.gh.actions]]\ntype = "command"\nargv = ["{missing}"]\n'
    config = write_config(tmp_path / "w.toml", tmp_path / "w.db", action)

    async def run(log: Path, named: bool) -> list[str]:
        with log.open("w") as out:
            st = os.fstat(out.fileno())
            stream = f"{st.st_dev}:{st.st_ino}" if named else f"{st.st_dev}:{st.st_ino + 1}"
            proc = await spawn(
                ["serve", "--config", str(config)],
                None,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=out.fileno(),
                env={"JOURNAL_STREAM": stream},
            )
            try:

                async def listening() -> bool:
                    return "webhookd listening on" in await asyncio.to_thread(log.read_text)

                await poll(listening, timeout_s=30)
            finally:
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
        return (await asyncio.to_thread(log.read_text)).splitlines()

    lines = await run(tmp_path / "journald.log", named=True)
    warned = [line for line in lines if "argv[0]" in line]
    assert len(warned) == 1 and warned[0].startswith("<4>"), lines
    assert re.match(r"<4>\S+Z warning ", warned[0]), warned
    listening = [line for line in lines if "webhookd listening on" in line]
    assert len(listening) == 1 and re.match(r"<6>\S+Z info ", listening[0]), lines
    assert all(re.match(r"<[2-7]>", line) for line in lines), lines
    plain = await run(tmp_path / "plain.log", named=False)
    assert plain and not any(line.startswith("<") for line in plain), plain
