"""Reloading the config (SIGHUP): sources and new lanes at once, the rest at the next restart.

The first tests send SIGHUP to real ``webhookd serve`` processes and forward to real loopback
servers; the last ones run the daemon in this process, to see a job that runs across a reload
end on the action it started on, and a request being received across one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from conftest import Running, Target, fresh_database, make_config
from openai_standin import StandIn
from ops_support import event_state
from procs import DaemonProc, Procs, write_config
from procs import Target as ServerTarget
from rawhttp import RawConn
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from webhookd import actions, logs
from webhookd import config as config_mod
from webhookd.app import Daemon
from webhookd.config import Config
from webhookd.sdnotify import Notifier
from webhookd.stats import AdminContext

JSON = {"Content-Type": "application/json"}
TOKEN = "token-of-a-reloaded-source-7c41"
T = TypeVar("T")


async def _reloaded(running: Running) -> str | None:
    """Reload the daemon's config; what /stats then says of a refusal (None: applied)."""
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    async with running.http.get(running.admin_url + "/stats") as r:
        refused: str | None = (await r.json())["reload_refused"]
    return refused


def forward(name: str, url: str) -> str:
    return f"""
[sources.{name}]
[[sources.{name}.actions]]
type = "forward"
url = "{url}"
"""


def served(test: T) -> T:
    """A test of real ``webhookd serve`` processes (the test's own loop only drives them)."""
    for mark in (pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(60)):
        test = mark(test)
    return test


async def deliver(
    http: aiohttp.ClientSession, daemon: DaemonProc, source: str, body: str = '{"n": 1}'
) -> tuple[int, Any]:
    async with http.post(f"{daemon.url}/hooks/{source}", data=body, headers=JSON) as r:
        return r.status, await r.json()


@served
async def test_sighup_adds_and_changes_sources_and_keeps_restart_only_keys_as_they_were(
    tmp_path: Path, procs: Procs, downstream: ServerTarget, http: aiohttp.ClientSession
) -> None:
    """A source added is taken, a changed action forwards to its new URL, and a changed key
    that needs a restart is named in a warning and left as it was."""
    config, journal = tmp_path / "webhookd.toml", tmp_path / "webhookd.db"
    write_config(config, journal, forward("a", f"{downstream.url}/one"))
    daemon = await procs.serve(config)
    assert (await deliver(http, daemon, "b"))[0] == 404

    async with ServerTarget() as second:
        text = config.read_text(encoding="utf-8").replace(
            "[server]\n", "[server]\nmax_body_bytes = 1024\n"
        )
        text = text.replace(f"{downstream.url}/one", f"{second.url}/two")
        text += forward("b", f"{second.url}/two") + "\n[lanes.llm]\nrpm = 60\n"
        config.write_text(text, encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        line = await daemon.wait_said(r"config reloaded")
        assert line.endswith(f"config reloaded from {config}: added b; changed a; added lanes llm")
        warning = await daemon.wait_said(r"config reload: .* changed")
        assert "server.max_body_bytes changed, kept as it was until the next restart" in warning
        # Not only in that line: /stats and a gauge say a restart is pending, and for what.
        async with http.get(f"{daemon.admin_url}/stats") as r:
            assert (await r.json())["restart_pending"] == ["server.max_body_bytes"]
        async with http.get(f"{daemon.admin_url}/metrics") as r:
            assert "\nwebhookd_config_restart_pending_keys 1.0\n" in await r.text()

        status, a = await deliver(http, daemon, "a", json.dumps({"pad": "x" * 4096}))
        assert status == 202  # max_body_bytes is still the 1 MiB it started with
        status, b = await deliver(http, daemon, "b")
        assert status == 202
        await second.wait_for(lambda: {a["id"], b["id"]} <= set(second.ids))
        assert downstream.ids == []

    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


@served
async def test_a_bad_config_on_sighup_is_refused_naming_the_key_and_the_daemon_goes_on(
    tmp_path: Path, procs: Procs, downstream: ServerTarget, http: aiohttp.ClientSession
) -> None:
    config, journal = tmp_path / "webhookd.toml", tmp_path / "webhookd.db"
    write_config(config, journal, forward("a", downstream.url) + forward("c", downstream.url))
    daemon = await procs.serve(config)
    good = config.read_text(encoding="utf-8")

    config.write_text(good + 'bogus = "x"\n', encoding="utf-8")  # under [[sources.c.actions]]
    daemon.signal(signal.SIGHUP)
    line = await daemon.wait_said(r"config reload refused")
    assert line.endswith(
        "config reload refused, still running the previous config: "
        "sources.c.actions[0].bogus: unknown key for a forward action"
    )
    # The environment is the one it started with: a secret whose variable is not in it (set
    # since in the EnvironmentFile, say, which only a restart reads). The refusal says so.
    unset = forward("d", downstream.url).replace(
        "[sources.d]",
        '[sources.d]\nverify = { scheme = "github", secret = "env:WEBHOOKD_NOT_SET" }',
    )
    config.write_text(good + unset, encoding="utf-8")
    daemon.signal(signal.SIGHUP)
    line = await daemon.wait_said(r"environment variable WEBHOOKD_NOT_SET")
    why = (
        "sources.d.verify.secret: environment variable WEBHOOKD_NOT_SET is not set (a reload"
        " keeps the environment the daemon started with; a restart reads a new one)"
    )
    assert line.endswith(why)
    async with http.get(f"{daemon.admin_url}/stats") as r:  # not only in the log and a gauge
        assert (await r.json())["reload_refused"] == why
    status, first = await deliver(http, daemon, "a")
    assert status == 202
    # Forwarded before its source goes: a job whose source a reload removed has no action.
    await downstream.wait_for(lambda: first["id"] in downstream.ids)

    # Then a good one: source a removed.
    config.write_text(good.replace(forward("a", downstream.url), ""), encoding="utf-8")
    daemon.signal(signal.SIGHUP)
    await daemon.wait_said(r"config reloaded from .*: removed a$")
    async with http.get(f"{daemon.admin_url}/stats") as r:
        assert (await r.json())["reload_refused"] is None
    assert (await deliver(http, daemon, "a"))[0] == 404
    status, other = await deliver(http, daemon, "c")
    assert status == 202
    await downstream.wait_for(lambda: other["id"] in downstream.ids)
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


async def test_a_job_running_across_a_reload_ends_on_its_action_which_is_then_closed(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """The forward in flight ends on the action it started on; the next job runs on the
    changed one; the old one is closed only once its attempt has ended, and an action whose
    config did not change is kept, not created again."""
    target.hold = asyncio.Event()
    configs: list[Config] = []

    def config(path: str) -> Config:
        cfg = make_config(
            tmp_path, forward("a", f"{target.url}/{path}") + forward("c", f"{target.url}/c")
        )
        configs.append(cfg)
        return cfg

    running: Running = await run_daemon(config("one"), loader=lambda: config("two"))
    daemon = running.daemon
    assert daemon.pool is not None
    pool = daemon.pool
    status, first = await running.post("/hooks/a", b'{"n": 1}')
    assert status == 202
    await target.wait_for(lambda t: len(t.seen) == 1)

    old, kept = pool.actions[("a", "forward")], pool.actions[("c", "forward")]
    closed = asyncio.Event()
    close = old.aclose

    async def aclose() -> None:
        closed.set()
        await close()

    old.aclose = aclose  # type: ignore[method-assign]
    daemon.request_reload()
    await daemon.reloaded.wait()
    assert daemon.config.sources == configs[-1].sources
    assert pool.actions[("a", "forward")] is not old
    assert pool.actions[("c", "forward")] is kept
    assert not closed.is_set()  # its attempt is still waiting for the held target

    status, _ = await running.post("/hooks/a", b'{"n": 2}')
    assert status == 202
    await target.wait_for(lambda t: len(t.seen) == 2)
    assert [s.path for s in target.seen] == ["/one", "/two"]
    assert not closed.is_set()
    recorded = asyncio.Event()
    pool.on_finish.append(lambda c, o, f: c.event.id == first["id"] and recorded.set())
    target.hold.set()
    await asyncio.wait_for(closed.wait(), 10)
    await asyncio.wait_for(recorded.wait(), 10)

    async with running.http.get(f"{running.admin_url}/events/{first['id']}") as r:
        doc = await r.json()
    assert [(j["state"], j["attempts"]) for j in doc["jobs"]] == [("done", 1)]


async def test_a_reload_adds_alerts_that_tell_of_the_next_dead_job(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A daemon started without ``[alerts]`` takes them from a reload: the next job to go dead
    is told to the alert URL (a real loopback server), through the reloaded alert action."""
    target.default_status = 400  # every forward is refused: dead at its first attempt
    plain = forward("a", f"{target.url}/a")
    alerting = plain + f'[alerts]\nurl = "{target.url}/alerts"\nmin_interval_s = 0\n'
    running: Running = await run_daemon(
        make_config(tmp_path, plain), loader=lambda: make_config(tmp_path, alerting)
    )
    daemon = running.daemon
    assert daemon.pool is not None
    dead: list[str] = []
    pool_dead = asyncio.Event()

    def finished(claimed: Any, outcome: Any, done: Any) -> None:
        if claimed.event.source == "a" and str(done.state) == "dead":
            dead.append(claimed.event.id)
            pool_dead.set()

    daemon.pool.on_finish.append(finished)
    status, _ = await running.post("/hooks/a", b'{"n": 1}')
    assert status == 202
    await asyncio.wait_for(pool_dead.wait(), 10)

    daemon.request_reload()
    await daemon.reloaded.wait()
    assert daemon.config.alerts is not None
    status, second = await running.post("/hooks/a", b'{"n": 2}')
    assert status == 202
    await target.wait_for(lambda t: any(s.path == "/alerts" for s in t.seen))
    [alert] = [json.loads(s.body) for s in target.seen if s.path == "/alerts"]
    # Only the job that died after the reload: the daemon was not watching before.
    assert (alert["kind"], alert["count"], alert["events"]) == ("dead", 1, [second["id"]])
    assert dead[0] != second["id"]


async def test_a_webhook_being_received_when_its_source_is_removed_is_still_accepted(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A request is judged by the config it arrived under: told to send its body (``100
    Continue``: its source is resolved) when the reload removes that source, it is still
    acked, and the next request to that path is a 404."""
    cfg = make_config(tmp_path, forward("a", target.url))
    signed = forward("b", target.url).replace(
        "[sources.b]",
        '[sources.b]\nverify = { scheme = "token", header = "X-Webhook-Token",'
        f' secret = "{TOKEN}" }}',
    )
    running: Running = await run_daemon(cfg, loader=lambda: make_config(tmp_path, signed))
    body = b'{"sent": "after the reload"}'
    conn = await RawConn.open(running.daemon.bound.receiver)
    try:
        await conn.head(
            b"/hooks/a",
            [
                (b"Content-Type", b"application/json"),
                (b"Content-Length", b"%d" % len(body)),
                (b"Expect", b"100-continue"),
            ],
        )
        assert (await conn.answer()).status == 100
        running.daemon.request_reload()
        await running.daemon.reloaded.wait()
        await conn.send(body)
        answer = await conn.answer()
    finally:
        await conn.close()
    assert answer.status == 202, answer.body
    status, _ = await running.post("/hooks/a")
    assert status == 404

    # The source it added: its secret is masked by the admin API too, and its actions have
    # their metrics series from the start, at 0.
    status, doc = await running.post(
        "/hooks/b", json.dumps({"echo": TOKEN}), headers={"X-Webhook-Token": TOKEN}
    )
    assert status == 202
    async with running.http.get(f"{running.admin_url}/events/{doc['id']}") as r:
        shown = await r.text()
    assert TOKEN not in shown and '\\"echo\\": \\"***\\"' in shown
    async with running.http.get(f"{running.admin_url}/metrics") as r:
        metrics = await r.text()
    assert 'webhookd_dead_letters_total{action="forward",source="b"} 0.0' in metrics


async def test_a_reload_takes_a_rotated_file_secret(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A ``file:`` secret is read at every load: rotated in its file, it is taken by a reload
    (an ``env:`` one is the environment's the daemon started with). An emptied one is refused,
    and ``webhookd_config_last_reload_successful`` goes to 0."""
    secret = tmp_path / "token"
    secret.write_text("first-token-0a1b2c\n", encoding="utf-8")
    source = forward("shop", target.url).replace(
        "[sources.shop]",
        '[sources.shop]\nverify = { scheme = "token", header = "X-Webhook-Token",'
        f' secret = "file:{secret}" }}',
    )
    running: Running = await run_daemon(
        make_config(tmp_path, source), loader=lambda: make_config(tmp_path, source)
    )

    async def post(token: str, n: int) -> int:
        status, _ = await running.post(
            "/hooks/shop", json.dumps({"n": n}), headers={"X-Webhook-Token": token}
        )
        return status

    assert await post("first-token-0a1b2c", 1) == 202
    secret.write_text("second-token-3d4e5f\n", encoding="utf-8")
    assert await post("second-token-3d4e5f", 2) == 401  # read at load, not per request
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    assert (await post("first-token-0a1b2c", 3), await post("second-token-3d4e5f", 4)) == (401, 202)
    assert await reload_metrics(running) == 1.0

    # Emptied, the file is refused (the secret it had stays), and the metric says so.
    secret.write_text("", encoding="utf-8")
    running.daemon.reloaded.clear()
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    assert await post("second-token-3d4e5f", 5) == 202
    assert await reload_metrics(running) == 0.0


async def test_a_reload_refusing_a_secret_pasted_after_env_does_not_show_it(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``secret = "env:whsec_..."``: the secret in place of a variable's name. The refusal in
    the log and in /stats' ``reload_refused`` (which the dashboard shows) names the key, and
    not the "variable": it showed the secret whole."""
    pasted = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    one = forward("a", target.url)
    added = forward("d", target.url).replace(
        "[sources.d]", f'[sources.d]\nverify = {{ scheme = "standard", secret = "env:{pasted}" }}'
    )
    running: Running = await run_daemon(
        make_config(tmp_path, one), loader=lambda: make_config(tmp_path, one + added)
    )
    caplog.set_level(logging.ERROR, logger="webhookd.app")
    assert await _reloaded(running) == (
        "sources.d.verify.secret: env: must name an environment variable; this one does not"
        " look like a name (not shown: it may be the secret itself)"
    )
    assert "config reload refused" in caplog.text and pasted[6:] not in caplog.text


async def test_a_reload_takes_an_actions_rotated_file_secrets(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A forward's ``file:`` header value and signing secret are read again by a reload, its
    options unchanged (they compared equal, and the action kept what it read at start: a
    revoked credential stayed in use with nothing to say a restart was needed)."""
    token, key = tmp_path / "token", tmp_path / "signing"
    token.write_text("header-token-one\n", encoding="utf-8")
    first, second = "whsec_" + "A" * 32, "whsec_" + "B" * 32
    key.write_text(first, encoding="utf-8")
    source = forward("shop", target.url) + (
        f'secret = "file:{key}"\nheaders = {{ "X-Tok" = "file:{token}" }}\n'
    )
    running: Running = await run_daemon(
        make_config(tmp_path, source), loader=lambda: make_config(tmp_path, source)
    )

    async def delivered(n: int) -> dict[str, str]:
        status, _ = await running.post("/hooks/shop", json.dumps({"n": n}))
        assert status == 202
        await target.wait_for(lambda t: len(t.seen) == n)
        return target.seen[-1].headers

    def signed_by(headers: dict[str, str], secret: str) -> bool:
        body = target.seen[-1].body
        try:
            Webhook(secret).verify(body, headers)
        except WebhookVerificationError:
            return False
        return True

    sent = await delivered(1)
    assert sent["X-Tok"] == "header-token-one" and signed_by(sent, first)
    # Its files as they were: the action is kept, not built again (nor its state reset).
    assert running.daemon.pool is not None
    kept = running.daemon.pool.actions[("shop", "forward")]
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    assert running.daemon.pool.actions[("shop", "forward")] is kept
    running.daemon.reloaded.clear()
    token.write_text("header-token-two\n", encoding="utf-8")
    key.write_text(second, encoding="utf-8")
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    sent = await delivered(2)
    assert sent["X-Tok"] == "header-token-two"
    assert signed_by(sent, second) and not signed_by(sent, first)


@served
async def test_a_reload_names_the_actions_whose_file_secrets_changed(
    tmp_path: Path, procs: Procs, downstream: ServerTarget
) -> None:
    """A forward's signing secret and an openai action's key rotated in their files: the
    reload's line names those actions (their options as written are the same, and it said
    "no source changed"), and never the values. A reload with nothing changed says so."""
    signing, key = tmp_path / "signing", tmp_path / "api-key"
    signing.write_text("whsec_" + "A" * 32 + "\n", encoding="utf-8")
    key.write_text("sk-first-key-0123456789\n", encoding="utf-8")
    ask = f"""
[sources.ai]
[[sources.ai.actions]]
type = "openai"
name = "ask"
api_key = "file:{key}"
base_url = "{downstream.url}/v1"
model = "gpt-4o-mini"
prompt = "Summarise"
max_tokens = 50
"""
    body = forward("shop", downstream.url) + f'secret = "file:{signing}"\n' + ask
    config = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", body)
    daemon = await procs.serve(config)

    async def reloaded(n: int) -> str:
        daemon.signal(signal.SIGHUP)
        async with asyncio.timeout(10):  # each reload's line, woken by each line said
            while daemon.log.count("config reloaded") < n:
                daemon.said.clear()
                await daemon.said.wait()
        return [line for line in daemon.lines if "config reloaded" in line][-1]

    assert (await reloaded(1)).endswith(f"config reloaded from {config}: no source changed")
    signing.write_text("whsec_" + "B" * 32 + "\n", encoding="utf-8")
    key.write_text("sk-second-key-0123456789\n", encoding="utf-8")
    assert (await reloaded(2)).endswith(
        f"config reloaded from {config}: changed shop, ai; new secrets in shop/forward, ai/ask"
    )
    assert "A" * 32 not in daemon.log and "B" * 32 not in daemon.log
    assert "first-key" not in daemon.log and "second-key" not in daemon.log
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


@served
async def test_a_handler_module_a_start_takes_is_taken_by_a_reload(
    tmp_path: Path, procs: Procs
) -> None:
    """A python handler's module is imported on the thread that imports it: a reload read its
    config on a thread of its own, so a module that asks for its thread's event loop at import
    (or sets a signal handler), which ``check`` and a start take, was refused by the reload
    ("There is no current event loop in thread ..."). It is imported on the loop's thread."""
    folder = tmp_path / "handlers"
    folder.mkdir()
    (folder / "loopy.py").write_text(
        "import asyncio\n\nLOOP = asyncio.get_event_loop()\n\n\ndef handle(event):\n"
        '    return "ok"\n',
        encoding="utf-8",
    )
    for made, mode in ((tmp_path, 0o755), (folder, 0o755), (folder / "loopy.py", 0o644)):
        made.chmod(mode)
    config = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", LOG_SOURCE)
    text = config.read_text(encoding="utf-8") + (
        f'[sources.p]\n[[sources.p.actions]]\ntype = "python"\npath = "{folder}"\n'
        'handler = "loopy:handle"\n'
    )
    (tmp_path / "check.toml").write_text(text, encoding="utf-8")
    checked = await procs.cli("check", "--config", str(tmp_path / "check.toml"))
    assert checked.returncode == 0, checked.stderr
    daemon = await procs.serve(config)
    config.write_text(text, encoding="utf-8")
    daemon.signal(signal.SIGHUP)
    line = await daemon.wait_said(r"config reload(ed| refused)")
    assert line.endswith(f"config reloaded from {config}: added p"), line
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0


async def test_a_handler_module_a_reload_adds_is_imported_on_the_loops_thread(
    tmp_path: Path, target: Target, run_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload adding a python action imports its module as it makes the action, on the
    event loop's thread; a module whose import fails is refused as a reload's config error,
    the previous config running on."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "reload_imported", raising=False)
    module = tmp_path / "reload_imported.py"
    module.write_text("raise RuntimeError('a setting it needs is missing')\n", encoding="utf-8")
    one = forward("a", target.url)
    added = (
        f'[sources.p]\n[[sources.p.actions]]\ntype = "python"\npath = "{tmp_path}"\n'
        'handler = "reload_imported:handle"\n'
    )
    running: Running = await run_daemon(
        make_config(tmp_path, one), loader=lambda: make_config(tmp_path, one + added)
    )
    assert await _reloaded(running) == (
        "sources.p.actions[0].handler: importing 'reload_imported' failed: RuntimeError: a"
        f" setting it needs is missing ({module}, line 1)"
    )
    assert sorted(running.daemon.config.sources) == ["a"]
    assert (await running.post("/hooks/p", b"{}"))[0] == 404

    module.write_text(
        "import threading\n\nIMPORTED_ON = threading.current_thread()\n\n\n"
        "def handle(event):\n    return 1\n",
        encoding="utf-8",
    )
    running.daemon.reloaded.clear()
    assert await _reloaded(running) is None
    assert sys.modules["reload_imported"].IMPORTED_ON is threading.current_thread()
    assert (await running.post("/hooks/p", b"{}"))[0] == 202


async def test_a_reload_is_refused_when_its_sources_need_a_server_not_running_yet(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """The new file's [server] waits for a restart, so its sources are checked against the
    running one: a source taking bodies larger than the running max_inflight_body_bytes (each
    such webhook would get 503 for good) is refused, the previous config running on."""
    server = "max_body_bytes = 1000\nmax_inflight_body_bytes = 2000"
    later = "max_body_bytes = 1000\nmax_inflight_body_bytes = 10000"
    big = forward("m", target.url).replace("[sources.m]", "[sources.m]\nmax_body_bytes = 5000")
    running: Running = await run_daemon(
        make_config(tmp_path, forward("a", target.url), server=server),
        loader=lambda: make_config(tmp_path, forward("a", target.url) + big, server=later),
    )
    refused = await _reloaded(running)
    assert refused == (
        "sources.m.max_body_bytes: must be at most server.max_inflight_body_bytes (2000) (the"
        " value running now: [server] and [journal] change at a restart)"
    )
    assert (await running.post("/hooks/m", b"{}"))[0] == 404  # not added


async def test_a_reload_of_a_file_with_no_source_is_refused_and_a_start_on_one_warns(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty file, or one cut short before its first source (a copy under way when the
    SIGHUP came), would take every source and its queued jobs away: the reload is refused and
    the sources run on. A daemon started on such a file warns as ``check`` does."""
    running: Running = await run_daemon(
        make_config(tmp_path, forward("a", target.url)), loader=lambda: make_config(tmp_path)
    )
    refused = await _reloaded(running)
    assert refused.endswith(
        "configures no source, where 1 run now (an empty file, or one cut short?); a restart"
        " takes it as it is"
    )
    assert (await running.post("/hooks/a", b"{}"))[0] == 202
    with caplog.at_level(logging.WARNING, logger="webhookd"):
        await run_daemon(make_config(tmp_path / "empty"))
    assert "sources: none configured: every webhook is answered 404" in caplog.text


async def test_a_reload_of_a_file_whose_only_source_is_the_catch_all_is_applied(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A file whose one source is the catch-all configures a source (every webhook goes to
    it), as a start and ``check`` take it: the reload was refused as an empty file."""
    catch = forward('"*"', f"{target.url}/catch")
    running: Running = await run_daemon(
        make_config(tmp_path, forward("a", f"{target.url}/a") + catch),
        loader=lambda: make_config(tmp_path, catch),
    )
    assert await _reloaded(running) is None
    assert sorted(running.daemon.config.sources) == ["*"]


async def reload_metrics(running: Running) -> float:
    """``webhookd_config_last_reload_successful``, as a scrape reads it."""
    async with running.http.get(f"{running.admin_url}/metrics") as r:
        text = await r.text()
    [line] = [
        x for x in text.splitlines() if x.startswith("webhookd_config_last_reload_successful")
    ]
    return float(line.split()[-1])


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_reload_adds_a_lane_and_an_openai_source_that_runs_through_it(
    tmp_path: Path, run_daemon: Any, request: pytest.FixtureRequest, backend: str
) -> None:
    """The one part of a reload a journal takes part in: a new lane, shared through the
    journal on PostgreSQL. The source added with it calls the model through the lane, and its
    answer is the job's result."""
    standin = await StandIn().start()
    added = f"""
[lanes.llm]
rpm = 600
[sources.mail]
[[sources.mail.actions]]
type = "openai"
lane = "llm"
api_key = "sk-standin"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
prompt = "Reply to {{{{ subject }}}}"
max_tokens = 50
"""
    try:
        if backend == "sqlite":
            await _lane_added_by_reload(tmp_path, run_daemon, added, "")
        else:
            async with fresh_database(request.getfixturevalue("pg_server_url")) as url:
                await _lane_added_by_reload(tmp_path, run_daemon, added, f'url = "{url}"')
    finally:
        await standin.aclose()
    assert standin.received == len(standin.served) == 1


async def _lane_added_by_reload(tmp_path: Path, run_daemon: Any, added: str, url: str) -> None:
    journal = url or f'path = "{tmp_path / "webhookd.db"}"'

    def config(extra: str) -> Config:
        text = (
            '[server]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
            f"[journal]\n{journal}\n{forward('a', 'http://127.0.0.1:9/')}{extra}"
        )
        cfg = config_mod.loads(text, "test", kinds=actions.kind_defaults)
        actions.validate(cfg)
        return cfg

    running: Running = await run_daemon(config(""), loader=lambda: config(added))
    assert running.daemon.pool is not None
    finished = asyncio.Event()
    running.daemon.pool.on_finish.append(lambda claimed, outcome, done: finished.set())
    assert (await running.post("/hooks/mail", b'{"subject": "x"}'))[0] == 404
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    assert set(running.daemon.lanes) == {"llm"}
    status, doc = await running.post("/hooks/mail", b'{"subject": "late kettle"}')
    assert status == 202
    await asyncio.wait_for(finished.wait(), 20)
    async with running.http.get(f"{running.admin_url}/events/{doc['id']}") as r:
        event = await r.json()
    assert event["state"] == "done", event
    assert event["jobs"][0]["result"]["text"] == "Draft: Reply to late kettle"
    await running.stop()  # before its database is dropped


async def reloaded(daemon: DaemonProc) -> None:
    """SIGHUP the daemon; back once that reload's line is said."""
    done = daemon.log.count("config reloaded") + 1
    daemon.signal(signal.SIGHUP)
    async with asyncio.timeout(10):  # woken by each line said
        while daemon.log.count("config reloaded") < done:
            daemon.said.clear()
            await daemon.said.wait()


@served
async def test_a_reload_that_removes_alerts_says_their_queued_alerts_will_go_dead(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """An alert waiting for its retry (the alert URL down) has no action left once a reload
    removes [alerts]: it goes dead at its turn, unsent, and the reload says so as it does of a
    removed source's jobs. A reload that removes [alerts] with no alert queued, or keeps them,
    says nothing of alerts; and the way back the warning names sends the alert."""
    config, journal = tmp_path / "webhookd.toml", tmp_path / "webhookd.db"
    async with ServerTarget(status=400) as shop, ServerTarget(status=503) as sink:
        plain = write_config(config, journal, forward("shop", shop.url)).read_text("utf-8")
        alerting = plain + (
            f'[alerts]\nurl = "{sink.url}/alerts"\nmin_interval_s = 0\n'
            "retry = { base_s = 3600, cap_s = 3600 }\n"
        )
        config.write_text(alerting, encoding="utf-8")
        daemon = await procs.serve(config)
        config.write_text(plain, encoding="utf-8")  # no alert queued: nothing to say
        await reloaded(daemon)
        config.write_text(alerting, encoding="utf-8")
        await reloaded(daemon)
        status, _ = await deliver(http, daemon, "shop")
        assert status == 202  # answered 400: dead, and alerted
        await sink.wait_for(lambda: len(sink.ids) == 1)
        [alert_id] = sink.ids
        await daemon.wait_said(rf"event={alert_id} source=webhookd .*outcome=retry")
        config.write_text(alerting + forward("other", shop.url), encoding="utf-8")  # kept
        await reloaded(daemon)
        config.write_text(plain, encoding="utf-8")
        await reloaded(daemon)
        warning = await daemon.wait_said(r"\[alerts\] removed")
        assert warning.endswith(
            "config reload: [alerts] removed: 1 queued alert(s) go dead when their turn comes,"
            " unsent (`webhookd replay --dead --source webhookd` sends them once [alerts] is"
            " back)"
        )
        # Its turn, now: dead, unsent, naming what this process lacks.
        replayed = await procs.cli("replay", alert_id, "--config", str(config))
        assert replayed.returncode == 0, replayed.stderr
        doc = await event_state(http, daemon.admin_url, alert_id, "dead")
        node = f"{socket.gethostname()} (pid {daemon.pid})"
        assert doc["jobs"][0]["last_error"] == f"source 'webhookd' is not configured on {node}"
        assert sink.ids == [alert_id]
        # As the warning says: once [alerts] is back, the replay sends it.
        sink.status = 200
        config.write_text(alerting, encoding="utf-8")
        await reloaded(daemon)
        replayed = await procs.cli(
            "replay", "--dead", "--source", "webhookd", "--config", str(config)
        )
        assert replayed.returncode == 0, replayed.stderr
        await sink.wait_for(lambda: sink.ids == [alert_id, alert_id])
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0
    said = daemon.log.splitlines()
    reloads = [n for n, line in enumerate(said) if "config reloaded" in line]
    warned = [n for n, line in enumerate(said) if "[alerts] removed" in line]
    assert len(reloads) == 5 and len(warned) == 1 and reloads[3] < warned[0] < reloads[4]


@served
async def test_a_reload_that_hands_a_verified_sources_name_to_an_unverified_catch_all_warns(
    tmp_path: Path, procs: Procs, downstream: ServerTarget, http: aiohttp.ClientSession
) -> None:
    """A verified source removed while an unverified catch-all is configured leaves its path
    to the catch-all, which takes a forged request there as that source's event: the reload
    says so, one line for the source. Not of an unverified source removed, nor of a verified
    one removed with no catch-all left to take its name."""
    config, journal = tmp_path / "webhookd.toml", tmp_path / "webhookd.db"
    stripe = forward("stripe", downstream.url).replace(
        "[sources.stripe]", '[sources.stripe]\nverify = { scheme = "stripe", secret = "whsec_s" }'
    )
    github = forward("gh", downstream.url).replace(
        "[sources.gh]", '[sources.gh]\nverify = { scheme = "github", secret = "gh-secret" }'
    )
    plain, catch = forward("plain", downstream.url), forward('"*"', downstream.url)
    write_config(config, journal, stripe + github + plain + catch)
    head = config.read_text("utf-8").split("\n[sources.")[0] + "\n"
    daemon = await procs.serve(config)
    forged = '{"id": "evt_forged"}'
    assert (await deliver(http, daemon, "stripe", forged))[0] == 401

    config.write_text(head + stripe + github + catch, encoding="utf-8")  # plain: unverified
    await reloaded(daemon)
    config.write_text(head + github + catch, encoding="utf-8")
    await reloaded(daemon)
    warning = await daemon.wait_said(r"stripe removed")
    assert warning.endswith(
        "config reload: stripe removed, which was verified as stripe: its webhooks"
        ' (/hooks/stripe) go to the catch-all "*" now, unverified: anyone may send events as'
        " stripe (configure the source again to keep them verified)"
    )
    assert (await deliver(http, daemon, "stripe", forged))[0] == 202  # what it warns of
    config.write_text(head + plain, encoding="utf-8")  # gh and the catch-all removed at once
    await reloaded(daemon)
    assert (await deliver(http, daemon, "gh", forged))[0] == 404
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit() == 0
    said = daemon.log.splitlines()
    reloads = [n for n, line in enumerate(said) if "config reloaded" in line]
    warned = [n for n, line in enumerate(said) if "removed, which was verified" in line]
    assert len(reloads) == 3 and len(warned) == 1 and reloads[1] < warned[0] < reloads[2]


@served
async def test_a_reload_sets_the_log_settings_unless_the_command_line_did(
    tmp_path: Path, procs: Procs, downstream: ServerTarget
) -> None:
    """``log.level`` and ``log.format`` change in place (the next reload's own debug line
    shows both: written, and as JSON); with ``--log-level`` and ``--log-format`` on the command
    line they stay, and the warning names them."""
    debug_line = "config reload: 1 source(s) and 0 lane(s) read from"
    for flags in ((), ("--log-level", "info", "--log-format", "text")):
        config = write_config(
            tmp_path / "webhookd.toml", tmp_path / "webhookd.db", forward("a", downstream.url)
        )
        daemon = await procs.serve(config, flags=flags)
        text = config.read_text(encoding="utf-8")
        assert 'level = "info"' in text
        config.write_text(
            text.replace('level = "info"', 'level = "debug"\nformat = "json"'), encoding="utf-8"
        )
        for n in (1, 2):
            daemon.signal(signal.SIGHUP)
            async with asyncio.timeout(10):  # each reload's line, woken by each line said
                while daemon.log.count("config reloaded") < n:
                    daemon.said.clear()
                    await daemon.said.wait()
        lines = daemon.log.splitlines()
        [last] = [line for line in lines if "config reloaded" in line][-1:]
        if flags:
            assert (
                "config reload: log.level, log.format changed in the file; the command line's"
                " --log-level, --log-format still set them"
            ) in daemon.log
            assert "until the next restart" not in daemon.log  # a restart keeps them too
            assert debug_line not in daemon.log
            assert not any(line.startswith("{") for line in lines)
        else:
            assert "log level now debug" in daemon.log
            [line] = [json.loads(x) for x in daemon.log.splitlines() if debug_line in x]
            assert line["level"] == "debug" and line["logger"] == "webhookd"
            assert json.loads(last)["msg"].startswith("config reloaded from")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit() == 0


async def test_a_reload_that_would_rename_an_unnamed_action_is_refused(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """Adding a second unnamed forward renames the first ('forward' becomes 'forward-1'): its
    queued jobs, and on other nodes the new ones, would go dead at their turn. The reload is
    refused, saying which name to give; the queued job is delivered where it was meant to."""
    one = forward("a", f"{target.url}/one")
    second = '[[sources.a.actions]]\ntype = "forward"\nurl = "' + target.url + '/two"\n'
    running: Running = await run_daemon(
        make_config(tmp_path, one), loader=lambda: make_config(tmp_path, one + second)
    )
    assert running.daemon.journal is not None and running.daemon.pool is not None
    await running.daemon.journal.pause("a")  # its job stays queued
    await running.daemon.pool.pause_applied()
    status, _ = await running.post("/hooks/a", b"{}")
    assert status == 202
    refused = await _reloaded(running)
    assert refused == (
        "sources.a.actions[0]: an action without a name, named forward until now, would be"
        " forward-1 (an unnamed forward is named by its place once its source has two), and the"
        ' jobs of forward would go dead: give it name = "forward", and each other unnamed one'
        " a name of its own"
    )
    await running.daemon.journal.resume("a")
    await target.wait_for(lambda t: len(t.seen) == 1)
    assert [seen.path for seen in target.seen] == ["/one"]


async def test_a_reload_that_takes_an_action_away_says_its_jobs_will_go_dead(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An action renamed (or taken away) leaves its queued jobs nothing to run on: the reload
    names the actions it took away that leave queued jobs behind, and says how to keep them."""
    one = forward("a", f"{target.url}/one").replace(
        'type = "forward"', 'type = "forward"\nname = "old"'
    )
    two = one.replace('name = "old"', 'name = "new"')
    running: Running = await run_daemon(
        make_config(tmp_path, one), loader=lambda: make_config(tmp_path, two)
    )
    assert running.daemon.journal is not None and running.daemon.pool is not None
    await running.daemon.journal.pause("a")  # its job stays queued
    await running.daemon.pool.pause_applied()
    status, _ = await running.post("/hooks/a", b"{}")
    assert status == 202
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    [line] = [r.getMessage() for r in caplog.records if "no longer configured" in r.getMessage()]
    assert line.startswith("config reload: a/old no longer configured: its queued job(s)")
    assert 'name = "..."' in line


async def test_a_reload_that_makes_a_sources_dedup_key_otherwise_says_so(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A tenant rule added to a source prefixes its body-hash keys: a retry of a delivery
    taken before the reload became a new event, and the reload said only "changed"."""
    one = forward("a", f"{target.url}/one")
    two = one.replace("[sources.a]\n", '[sources.a]\ntenant = "header:X-Shop"\n')
    running: Running = await run_daemon(
        make_config(tmp_path, one), loader=lambda: make_config(tmp_path, two)
    )
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    assert await _reloaded(running) is None
    [line] = [r.getMessage() for r in caplog.records if "dedup key" in r.getMessage()]
    assert line.startswith("config reload: the dedup key of a (tenant) is made otherwise now")


async def test_a_reload_warns_of_what_a_start_would(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A command whose program is not there, added by a reload, is warned of as ``check`` and a
    start warn of it: applied, its jobs would otherwise fail with no word until they ran."""
    one = forward("a", f"{target.url}/one")
    missing = tmp_path / "no-such-program"
    added = f'[sources.c]\n[[sources.c.actions]]\ntype = "command"\nargv = ["{missing}"]\n'
    running: Running = await run_daemon(
        make_config(tmp_path, one), loader=lambda: make_config(tmp_path, one + added)
    )
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    said = [r.getMessage() for r in caplog.records if "argv[0]" in r.getMessage()]
    assert [s.split(": ", 2)[:2] for s in said] == [
        ["config reload", "sources.c.actions[0].argv[0]"]
    ]


async def test_a_reload_works_out_its_warnings_off_the_event_loop(
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The config is read in a thread, as its walks take 10-30 ms at 300 sources and every
    ack waits for the loop meanwhile; but what a reload then warns of (a start's and
    ``check``'s warnings: three more walks of every secret) was worked out on the loop, ~40 ms
    of a 100-120 ms stall per reload at 300 signed sources. Said as before, on the loop."""
    import webhookd.reloading as reloading

    signed = forward("a", target.url).replace(
        "[sources.a]", '[sources.a]\nverify = { scheme = "github", secret = " 0123456789abcdef" }'
    )
    running: Running = await run_daemon(
        make_config(tmp_path, forward("a", target.url)),
        loader=lambda: make_config(tmp_path, signed),
    )
    loop_thread, on_the_loop = threading.current_thread(), []
    for name in ("written_out", "spaced_secrets", "weak_points"):
        real = getattr(reloading, name)

        def walk(cfg: Config, real: Any = real, name: str = name) -> Any:
            if threading.current_thread() is loop_thread:
                on_the_loop.append(name)
            return real(cfg)

        monkeypatch.setattr(reloading, name, walk)
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    assert await _reloaded(running) is None
    assert on_the_loop == []
    said = [r.getMessage() for r in caplog.records if "sources.a.verify.secret" in r.getMessage()]
    assert [line.split(" ", 4)[:4] for line in said] == [
        ["config", "reload:", "sources.a.verify.secret", "is"],
        ["config", "reload:", "sources.a.verify.secret", "starts"],
    ]


async def test_a_command_a_reload_kept_masks_the_secrets_the_reload_added(
    tmp_path: Path, run_daemon: Any
) -> None:
    """An action a reload leaves as it was is kept, not rebuilt: a command's output tails are
    still masked with the daemon's secrets as they are now, so a secret the reload added that
    the tail's 2 KB cut falls inside shows as ***, not as its last characters."""
    secret = "whsec-added-by-the-reload-0123456789"
    code = f"import sys; sys.stdout.write('x' * 5000 + {secret!r} + 'y' * 2028)"
    command = (
        '[sources.c]\n[[sources.c.actions]]\ntype = "command"\n'
        f"argv = {json.dumps([sys.executable, '-c', code])}\n"
    )
    added = f'[sources.b]\n[sources.b.verify]\nscheme = "hmac"\nsecret = "{secret}"\n'
    added += 'header = "X-Sig"\n[[sources.b.actions]]\ntype = "log"\n'
    running: Running = await run_daemon(
        make_config(tmp_path, command), loader=lambda: make_config(tmp_path, command + added)
    )
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    status, answer = await running.post("/hooks/c", b"{}")
    assert status == 202
    doc = await event_state(running.http, running.admin_url, answer["id"], "done")
    assert doc["jobs"][0]["errors"][0]["detail"]["stdout"] == "…***" + "y" * 2028


ROTATIONS = 50


async def test_reloads_rotating_a_file_secret_keep_masking_only_what_may_still_be_printed(
    tmp_path: Path, target: Target, run_daemon: Any, restore_logging: None
) -> None:
    """Each reload that read a rotated ``file:`` secret (what the README advises) added it,
    for good, to the maskers every log line, every attempt's error and detail and every admin
    answer go through: after 300 of them masking a 2 KB text took 540 µs instead of 1. With no
    attempt begun before a reload still running, a secret it rotated out is masked no more (as
    after a restart): the pool's, the admin API's and the log's maskers hold the one secret."""
    secret = tmp_path / "token"

    def token(n: int) -> str:
        return f"token-generation-{n:05d}"

    secret.write_text(token(0) + "\n", encoding="utf-8")
    source = (
        '[sources.shop]\nverify = { scheme = "token", header = "X-Token",'
        f' secret = "file:{secret}" }}\n'
        f'[[sources.shop.actions]]\ntype = "forward"\nurl = "{target.url}"\n'
    )
    cfg = make_config(tmp_path, source)
    handler = logs.setup("info", "text", secrets=logs.secret_values(cfg), stream=io.StringIO())
    running: Running = await run_daemon(cfg, loader=lambda: make_config(tmp_path, source))
    daemon = running.daemon
    for n in range(1, ROTATIONS + 1):
        secret.write_text(token(n) + "\n", encoding="utf-8")
        daemon.reloaded.clear()
        daemon.request_reload()
        await daemon.reloaded.wait()
    status, _ = await running.post("/hooks/shop", b"{}", headers={"X-Token": token(ROTATIONS)})
    assert status == 202  # the rotations were applied
    assert daemon.pool is not None and isinstance(handler.formatter, logs.TextFormatter)
    assert isinstance(daemon.status_now, functools.partial)
    ctx: AdminContext = daemon.status_now.args[0]
    held = {
        "pool": daemon.pool.masker.given,
        "admin API": ctx.masker.given,
        "log": handler.formatter.masker.given,
    }
    assert held == dict.fromkeys(held, frozenset({token(ROTATIONS)}))


async def test_a_secret_a_reload_rotates_out_stays_masked_while_an_attempt_begun_before_runs(
    tmp_path: Path, target: Target, run_daemon: Any, restore_logging: None
) -> None:
    """Why a rotated-out secret is kept at all: a forward in flight across the reload ends on
    the action it started on, and its error names the URL that action had, a secret the reload
    rotated out. It stays masked, in what is journaled and in the log, until that attempt has
    ended; a secret of a config no attempt began on (rotated in and out meanwhile) is not kept,
    and once the attempt has ended only the running config's is."""
    file = tmp_path / "url"
    urls = [f"{target.url}/hooks/T{n}k9Xq27Lm0Zp4Rw8Vb" for n in range(3)]
    file.write_text(urls[0] + "\n", encoding="utf-8")
    source = f'[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\nurl = "file:{file}"\n'
    cfg = make_config(tmp_path, source)
    out = io.StringIO()
    handler = logs.setup("info", "text", secrets=logs.secret_values(cfg), stream=out)
    target.hold = asyncio.Event()
    target.statuses = [403]  # dead at once: one attempt
    running: Running = await run_daemon(cfg, loader=lambda: make_config(tmp_path, source))
    daemon, pool = running.daemon, running.daemon.pool
    assert pool is not None and isinstance(handler.formatter, logs.TextFormatter)
    status, answer = await running.post("/hooks/shop", b"{}")
    assert status == 202
    await target.wait_for(lambda t: len(t.seen) == 1)
    for n in (1, 2):
        file.write_text(urls[n] + "\n", encoding="utf-8")
        daemon.reloaded.clear()
        daemon.request_reload()
        await daemon.reloaded.wait()
    assert pool.masker.text(f"{urls[0]} {urls[1]} {urls[2]}") == f"*** {urls[1]} ***"
    logging.getLogger("webhookd.test").warning("the attempt quoted %s", urls[0])

    ended = asyncio.Event()
    pool.on_finish.append(lambda c, o, f: ended.set())
    target.hold.set()
    await asyncio.wait_for(ended.wait(), 10)
    await asyncio.gather(*pool._running.values())  # its task's end lets its config go
    doc = await event_state(running.http, running.admin_url, answer["id"], "dead")
    assert [a["error"] for a in doc["jobs"][0]["errors"]] == ["*** answered 403"]
    assert "error='*** answered 403'" in out.getvalue()
    assert "the attempt quoted ***" in out.getvalue() and urls[0] not in out.getvalue()
    assert pool.masker.given == {urls[2]} == handler.formatter.masker.given


async def test_a_reload_that_removes_a_source_says_its_jobs_will_go_dead(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A source removed (or renamed) takes its actions with it: the same warning names those
    that leave queued jobs behind, and no other (an action with none has nothing to lose)."""
    kept, dropped = forward("a", f"{target.url}/a"), forward("b", f"{target.url}/b")
    other = forward("c", f"{target.url}/c")
    running: Running = await run_daemon(
        make_config(tmp_path, kept + dropped + other), loader=lambda: make_config(tmp_path, kept)
    )
    assert running.daemon.journal is not None and running.daemon.pool is not None
    await running.daemon.journal.pause("b")
    await running.daemon.pool.pause_applied()
    status, answer = await running.post("/hooks/b", b"{}")
    assert status == 202
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    [line] = [r.getMessage() for r in caplog.records if "no longer configured" in r.getMessage()]
    assert line.startswith("config reload: b/forward no longer configured: its queued job(s)")
    assert "c/forward" not in line  # taken away too, with no job queued
    # Resumed, its job goes dead naming the process whose config lacks the source: on a
    # cluster, the node a reload has not reached.
    await running.daemon.journal.resume("b")
    await running.daemon.pool.pause_applied()
    doc = await event_state(running.http, running.admin_url, answer["id"], "dead")
    node = f"{socket.gethostname()} (pid {os.getpid()})"
    assert doc["jobs"][0]["last_error"] == f"source 'b' is not configured on {node}"


async def test_a_reload_that_removes_a_source_the_catch_all_takes_says_where_its_jobs_go(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A removed source's queued jobs go to the catch-all's action of that name, as the
    workers (and a start) resolve a name: the reload said they would go dead, and they were
    then delivered to the catch-all's target. It says where they go now."""
    kept, catch = forward("a", f"{target.url}/a"), forward('"*"', f"{target.url}/catch")
    shop = forward("shop", f"{target.url}/shop")
    running: Running = await run_daemon(
        make_config(tmp_path, kept + shop + catch),
        loader=lambda: make_config(tmp_path, kept + catch),
    )
    assert running.daemon.journal is not None and running.daemon.pool is not None
    await running.daemon.journal.pause("shop")  # its job stays queued across the reload
    await running.daemon.pool.pause_applied()
    status, answer = await running.post("/hooks/shop", b"{}")
    assert status == 202
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    assert await _reloaded(running) is None
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config reload")]
    assert not [line for line in said if "no longer configured" in line], said
    assert [line for line in said if "catch-all" in line] == [
        'config reload: the queued job(s) of shop/forward go to the catch-all "*" now, each to'
        " its action of the same name"
    ]
    await running.daemon.journal.resume("shop")
    await running.daemon.pool.pause_applied()
    await event_state(running.http, running.admin_url, answer["id"], "done")
    assert [seen.path for seen in target.seen] == ["/catch"]


async def test_a_reload_that_removes_the_catch_all_says_the_jobs_it_took_will_go_dead(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The queued jobs of a name only the catch-all took go dead once it is removed: the
    reload said nothing of them (it looked for jobs journaled under "*", which none is), where
    a start names them."""
    kept, catch = forward("a", f"{target.url}/a"), forward('"*"', f"{target.url}/catch")
    running: Running = await run_daemon(
        make_config(tmp_path, kept + catch), loader=lambda: make_config(tmp_path, kept)
    )
    assert running.daemon.journal is not None and running.daemon.pool is not None
    await running.daemon.journal.pause("orders")  # a name only the catch-all takes
    await running.daemon.pool.pause_applied()
    status, answer = await running.post("/hooks/orders", b"{}")
    assert status == 202
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    assert await _reloaded(running) is None
    [line] = [r.getMessage() for r in caplog.records if "no longer configured" in r.getMessage()]
    assert line.startswith("config reload: orders/forward no longer configured: its queued job(s)")
    await running.daemon.journal.resume("orders")
    await running.daemon.pool.pause_applied()
    doc = await event_state(running.http, running.admin_url, answer["id"], "dead")
    assert "source 'orders' is not configured" in doc["jobs"][0]["last_error"]


async def test_a_reload_that_adds_a_source_in_the_catch_alls_place_says_what_goes_dead(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A source added under a name the catch-all took runs that name's queued jobs from then
    on: those of an action it lacks go dead, and the reload says so (it took nothing away)."""
    catch = forward('"*"', f"{target.url}/catch")
    orders = '[sources.orders]\n[[sources.orders.actions]]\ntype = "log"\n'
    running: Running = await run_daemon(
        make_config(tmp_path, catch), loader=lambda: make_config(tmp_path, catch + orders)
    )
    assert running.daemon.journal is not None and running.daemon.pool is not None
    await running.daemon.journal.pause("orders")
    await running.daemon.pool.pause_applied()
    assert (await running.post("/hooks/orders", b"{}"))[0] == 202
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    assert await _reloaded(running) is None
    [line] = [r.getMessage() for r in caplog.records if "no longer configured" in r.getMessage()]
    assert line.startswith("config reload: orders/forward no longer configured: its queued job(s)")


async def test_a_start_without_the_source_or_action_of_queued_jobs_says_so(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An old config deployed, a source or an action renamed while stopped: their queued jobs
    would go dead one line each with no word before; the start says so once, naming each
    source and action."""
    kept, dropped = forward("a", f"{target.url}/a"), forward("b", f"{target.url}/b")
    renamed = forward("c", f"{target.url}/c") + 'name = "old"\n'
    running: Running = await run_daemon(make_config(tmp_path, kept + dropped + renamed))
    for source in ("b", "c"):
        pause = f"{running.admin_url}/sources/{source}/pause"
        async with running.http.post(pause, headers={"X-Webhookd": "1"}) as r:
            assert r.status == 200  # its webhooks' jobs stay queued
        assert (await running.post(f"/hooks/{source}", b"{}"))[0] == 202
    await running.stop()
    caplog.set_level(logging.WARNING, logger="webhookd.app")
    cfg = make_config(tmp_path, kept + forward("c", f"{target.url}/c") + 'name = "new"\n')
    await run_daemon(cfg)
    said = [r.getMessage() for r in caplog.records if "holds queued jobs" in r.getMessage()]
    assert said == [
        f"the journal holds queued jobs that {cfg.origin} has no action for: b/forward (1),"
        " c/old (1); they go dead at their turn (`webhookd replay --dead --source NAME` runs"
        " them once the source and action are back under those names)"
    ]


@served
async def test_sighups_to_a_draining_daemon_do_not_change_its_exit_status(
    tmp_path: Path, procs: Procs
) -> None:
    """The loop's SIGHUP handler goes as the daemon closes, after the journal: asyncio's removal
    put back the signal's default, so from there to the exit (~15 ms, up to EXIT_DEADLINE_S
    while a thread holds it) a reload (`systemctl reload`, a log rotation's `kill -HUP`) ended
    the process by SIGHUP, not with the drain's 0. Reloads keep coming through each drain."""
    config = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", LOG_SOURCE)
    statuses = []
    for _ in range(3):
        daemon = await procs.serve(config)
        daemon.signal(signal.SIGTERM)
        while daemon.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                os.kill(daemon.pid, signal.SIGHUP)
            await asyncio.sleep(0.0005)  # the pace of the signals, not a wait for anything
        statuses.append(await daemon.wait_exit())
    assert statuses == [0, 0, 0], f"exit statuses {statuses} (-1: ended by SIGHUP)"


def test_the_command_notes_a_sighup_to_serve_before_the_cli_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGHUP in the 0.2 s the CLI takes to import killed ``serve`` (a reload right after a
    start; systemd takes that death for a clean exit). The command's entry point notes it
    before importing the CLI, and importing the package itself pulls in nothing heavy."""
    import subprocess
    import sys
    import types

    from webhookd import entry, hangups

    seen: list[object] = []
    fake = types.ModuleType("webhookd.cli")
    fake.main = lambda: seen.append(signal.getsignal(signal.SIGHUP))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "webhookd.cli", fake)
    before = signal.getsignal(signal.SIGHUP)
    # Only the verb: "serve" as any argument made `events --follow --source serve` outlive
    # its terminal's hangup.
    for argv in (["webhookd", "serve"], ["webhookd", "events", "--source", "serve"]):
        monkeypatch.setattr(sys, "argv", argv)
        try:
            entry.main()
        finally:
            signal.signal(signal.SIGHUP, before)
    assert seen == [hangups.note, before]
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, webhookd.entry; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'webhookd.models'" not in loaded and "'aiohttp'" not in loaded, loaded


# -- reloads and stops at awkward moments (in-process daemons, a notifier that records) --------

LOG_SOURCE = '[sources.a]\n[[sources.a.actions]]\ntype = "log"\n'


class SaidToSystemd(Notifier):
    """What the daemon tells systemd, each with whether it was listening then."""

    def __init__(self) -> None:
        super().__init__(None)
        self.daemon: Daemon | None = None
        self.said: list[tuple[str, bool]] = []
        self.stopping = asyncio.Event()

    def send(self, *fields: str) -> None:
        listening = self.daemon is not None and self.daemon.started.is_set()
        self.said.append((fields[0], listening))
        if fields[0] == "STOPPING=1":
            self.stopping.set()

    def reloading(self) -> None:
        self.send("RELOADING=1")


async def test_a_reload_asked_during_the_start_waits_for_it(tmp_path: Path) -> None:
    """A SIGHUP noted while the daemon starts: its reload ran as soon as the daemon's tasks
    did, and its READY=1 told systemd the daemon was up before either port listened."""
    notifier = SaidToSystemd()
    cfg = make_config(tmp_path, LOG_SOURCE)
    daemon = Daemon(
        cfg,
        install_signals=False,
        notifier=notifier,
        loader=lambda: make_config(tmp_path, LOG_SOURCE),
    )
    notifier.daemon = daemon
    daemon.request_reload()
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.reloaded.wait(), 10)
    daemon.request_stop()
    assert await task == 0
    assert all(listening for what, listening in notifier.said if what == "READY=1"), notifier.said
    assert [what for what, _ in notifier.said][:3] == ["READY=1", "RELOADING=1", "READY=1"]


async def test_sighup_is_never_left_at_its_default_while_the_daemon_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SIGHUP to a daemon with its signal handling reloads it, and at its stop SIGHUP
    goes straight from the daemon's handler to ignored. The loop's own handler, removed, put
    back SIGHUP's default (which ends the process) until the next statement ignored it: on a
    busy machine a reload landing in between ended a drain by the signal (seen in CI)."""
    set_to: list[Any] = []
    real_signal = signal.signal

    def recorded(sig: int, handler: Any) -> Any:
        if sig == signal.SIGHUP:
            set_to.append(handler)
        return real_signal(sig, handler)

    before = signal.getsignal(signal.SIGHUP)
    monkeypatch.setattr(signal, "signal", recorded)
    daemon = Daemon(
        make_config(tmp_path, LOG_SOURCE), loader=lambda: make_config(tmp_path, LOG_SOURCE)
    )
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.started.wait(), 10)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(daemon.reloaded.wait(), 10)
        daemon.request_stop()
        assert await task == 0
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        real_signal(signal.SIGHUP, before)
    assert signal.SIG_DFL not in set_to, set_to


async def test_a_reload_the_drain_overtakes_is_not_applied(tmp_path: Path) -> None:
    """SIGTERM while a reload reads its config: the reload was applied during the drain (the
    draining daemon ran a source it had not started with) and its READY=1 came after
    STOPPING=1. It is dropped, what it built closed, and nothing is said after STOPPING=1."""
    notifier = SaidToSystemd()
    cfg = make_config(tmp_path, LOG_SOURCE)
    reading, read = threading.Event(), threading.Event()

    def loader() -> Config:
        reading.set()
        read.wait(10)
        return make_config(tmp_path, LOG_SOURCE + LOG_SOURCE.replace("sources.a", "sources.b"))

    daemon = Daemon(cfg, install_signals=False, notifier=notifier, loader=loader)
    notifier.daemon = daemon
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.started.wait(), 10)
    assert daemon.pool is not None
    drain = daemon.pool.drain

    async def drain_after_the_reload(grace_s: float) -> int:  # a job the drain waits for
        await daemon.reloaded.wait()
        return await drain(grace_s)

    daemon.pool.drain = drain_after_the_reload  # type: ignore[method-assign]
    daemon.request_reload()
    assert await asyncio.get_running_loop().run_in_executor(None, reading.wait, 10)
    daemon.request_stop()
    await asyncio.wait_for(notifier.stopping.wait(), 10)
    read.set()
    assert await task == 0
    assert sorted(daemon.config.sources) == ["a"]
    said = [what for what, _ in notifier.said]
    assert "READY=1" not in said[said.index("STOPPING=1") :], said


async def test_a_retention_round_survives_an_outage_when_it_reads_the_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size a round's line gives is a query on PostgreSQL, read after the round's own
    error handling: an outage then ended the retention task, and the daemon with it (exit 1,
    "fatal: journal read failed"). The line says the size is unknown, and rounds go on."""
    import webhookd.app as app_module
    from webhookd.errors import JournalUnavailable

    rounds = asyncio.Queue[int]()

    async def pruned(journal: Any, jc: Any, on_batch: Any = None) -> tuple[int, int]:
        rounds.put_nowait(1)
        return 5, 0

    monkeypatch.setattr(app_module, "prune_expired", pruned)

    def outage_at_the_size(daemon: Daemon) -> None:
        async def size() -> int:
            raise JournalUnavailable("journal read failed: connection was closed")

        assert daemon.journal is not None
        daemon.journal.storage_bytes = size  # type: ignore[method-assign]

    cfg = make_config(tmp_path, LOG_SOURCE, journal="prune_interval_s = 0.05")
    daemon = Daemon(cfg, install_signals=False, on_wired=[outage_at_the_size])
    task = asyncio.create_task(daemon.run())
    for _ in range(3):  # the next rounds come: the task lives on
        await asyncio.wait_for(rounds.get(), 10)
    assert not task.done()
    daemon.request_stop()
    assert await task == 0
