"""Faults: a full disk, hostile connections, and downstreams that hang or reset.

Each test fails if webhookd answers 2xx without storing, loses a job, or stops serving after the
fault clears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, Target, make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ops_support import writer_held
from procs import poll

from webhookd import actions
from webhookd.config import parse
from webhookd.errors import ConfigError
from webhookd.journal import Journal

pytestmark = pytest.mark.timeout(60)

JSON = {"Content-Type": "application/json"}


def pragma(text: str) -> Any:
    return lambda conn: conn.execute(f"PRAGMA {text}").fetchall()


def journaled_ids(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {row[0] for row in db.execute("SELECT id FROM events")}


async def test_full_disk_answers_503_never_2xx_and_recovers_by_itself(
    tmp_path: Path, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With the journal out of space every webhook gets 503 and /readyz 503; once space
    returns, /readyz is 200 at once and webhooks get 202 again. The failed commits, which any
    sender causes, are logged ten a minute, not one each."""
    caplog.set_level(logging.ERROR, logger="webhookd.journal")
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    journal = running.daemon.journal
    assert journal is not None
    status, _ = await running.post("/hooks/a", b'{"before": 1}', headers=JSON)
    assert status == 202
    # The disk fills: SQLite may not grow the file by another page (SQLITE_FULL, as on ENOSPC).
    # PRAGMAs go through the journal's writer, the one connection that writes.
    [(pages,)] = await journal._call(pragma("page_count"), transaction=False)
    await journal._call(pragma(f"max_page_count = {pages}"), transaction=False)
    answers: list[tuple[int, Any]] = []
    big = b'{"pad": "' + b"x" * 60_000 + b'"}'
    for i in range(20):  # bodies bigger than any free page: each needs the file to grow
        answers.append(await running.post("/hooks/a", big.replace(b"x", bytes([97 + i]), 1)))
    assert {s for s, _ in answers} == {503}, answers
    assert all("error" in doc for _, doc in answers)
    failed = [
        r
        for r in caplog.records
        if r.name == "webhookd.journal" and "journal write failed" in r.getMessage()
    ]
    assert len(failed) == 10, [r.getMessage() for r in failed]
    # /readyz tells a load balancer the journal cannot take writes.
    async with running.http.get(running.admin_url + "/readyz") as r:
        assert r.status == 503
    # Space returns: no restart. /readyz says so before any webhook comes (a load balancer
    # that took the node out sends it none), and the next webhook is stored and acknowledged.
    await journal._call(pragma("max_page_count = 1073741823"), transaction=False)
    async with running.http.get(running.admin_url + "/readyz") as r:
        assert (r.status, await r.json()) == (200, {"ready": True})
    assert await journal.paused_sources() == frozenset()
    status, doc = await running.post("/hooks/a", big, headers=JSON)
    assert status == 202
    assert await running.stop() == 0
    assert doc["id"] in journaled_ids(cfg.journal.path)


async def test_the_stop_line_comes_after_the_write_failures_held_back(
    tmp_path: Path, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon stopped while its journal cannot write says how many failures it held back
    before its last line, not after it."""
    caplog.set_level(logging.INFO, logger="webhookd")
    running: Running = await run_daemon(
        make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    )
    journal = running.daemon.journal
    assert journal is not None
    [(pages,)] = await journal._call(pragma("page_count"), transaction=False)
    await journal._call(pragma(f"max_page_count = {pages}"), transaction=False)
    for i in range(12):  # ten failures logged, two held back
        body = b'{"pad": "' + bytes([97 + i]) * 60_000 + b'"}'
        assert (await running.post("/hooks/a", body, headers=JSON))[0] == 503
    assert await running.stop() == 0
    said = [r.getMessage() for r in caplog.records if r.name.startswith("webhookd")]
    held = said.index(
        "suppressed=2 more journal write failures in the last 60 s, not logged one by one"
    )
    assert said[-1].startswith("stopped cleanly") and held < len(said) - 1, said[held:]


async def test_a_last_checkpoint_that_fails_at_stop_is_said_and_its_wal_read_back(
    tmp_path: Path,
    run_daemon: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At a full disk the checkpoint the stop makes last fails: one warning says why and that
    the WAL is kept, to be read back at the next start, and the last line does not say
    "stopped cleanly". The failure is injected; a connection held open from outside stands
    for the rest of a full disk, under which SQLite's own checkpoint, as the daemon's last
    connection closes, fails as well and leaves the WAL."""
    caplog.set_level(logging.INFO, logger="webhookd")

    def disk_full(self: Journal) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Journal, "_truncate_wal", disk_full)
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    status, doc = await running.post("/hooks/a", b'{"n": 1}', headers=JSON)
    assert status == 202
    wal = Path(f"{cfg.journal.path}-wal")
    with contextlib.closing(sqlite3.connect(cfg.journal.path)) as other:
        other.execute("SELECT count(*) FROM events").fetchone()
        assert await running.stop() == 0
        kept = (await asyncio.to_thread(wal.stat)).st_size
        said = [r.getMessage() for r in caplog.records if r.name.startswith("webhookd")]
        assert kept > 0 and said[-2] == (
            f"journal {cfg.journal.path}: the last checkpoint failed (database or disk is full):"
            f" its WAL ({kept / 1e6:.1f} MB) is kept, and replayed at the next start"
        ), said
        assert said[-1] == (
            "stopped (0 job(s) re-queued), not cleanly: the journal's last checkpoint failed"
        )
        assert doc["id"] in journaled_ids(cfg.journal.path)  # there for the next start


async def test_a_last_checkpoint_a_reader_held_back_is_not_a_clean_stop(
    tmp_path: Path, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite reports a checkpoint a reader's snapshot held back (``events --follow``, a
    backup) as a result, not an error: the stop still says the WAL is kept, and why."""
    caplog.set_level(logging.INFO, logger="webhookd")
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    assert (await running.post("/hooks/a", b'{"n": 1}', headers=JSON))[0] == 202
    with contextlib.closing(sqlite3.connect(cfg.journal.path, isolation_level=None)) as other:
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM events").fetchone()  # a snapshot, held
        assert await running.stop() == 0
        other.execute("COMMIT")
    said = [r.getMessage() for r in caplog.records if r.name.startswith("webhookd")]
    assert "the last checkpoint failed (another process was reading the journal)" in said[-2]
    assert said[-1].endswith("not cleanly: the journal's last checkpoint failed"), said[-1]


async def test_a_writer_that_hangs_holds_a_bounded_queue_of_bodies(
    tmp_path: Path, run_daemon: Any
) -> None:
    """While the journal's writer hangs (a stalled disk), each webhook is answered 503 after
    ack_timeout_s but stays queued to be written; past server.max_inflight_body_bytes of them
    the receiver answers 503 without queueing more, so memory stays bounded however long the
    hang lasts, and /readyz says so (a balancer then sends the webhooks elsewhere). Once the
    writer goes on, what was queued is stored and the daemon is ready again."""
    cfg = make_config(
        tmp_path,
        '[[sources.a.actions]]\ntype = "log"',
        server="ack_timeout_s = 0.1\nmax_body_bytes = 10000\nmax_inflight_body_bytes = 20000",
    )
    running: Running = await run_daemon(cfg)
    journal = running.daemon.journal
    assert journal is not None
    async with writer_held(journal):
        answers = []
        for i in range(12):
            body = b'{"n": %d, "pad": "%s"}' % (i, b"x" * 5000)
            answers.append((await running.post("/hooks/a", body, headers=JSON))[0])
        assert set(answers) == {503}
        assert journal.queued_body_bytes <= 20_000 + 5_100  # the limit, and the one past it
        queued = len(journal._queue)
        assert 4 <= queued < 12
        async with running.http.get(running.admin_url + "/readyz") as r:
            status, doc = r.status, await r.json()
        assert status == 503 and re.fullmatch(
            r"journal: a commit has taken \d+\.\d s, past server\.ack_timeout_s: webhooks are"
            r" answered 503",
            doc["problems"][0],
        ), doc
        # /stats says it as /readyz does, at once: a write that failed before the hang (a
        # full disk) is not probed behind the stalled commit, holding the dashboard's poll.
        journal.last_write_error = "database or disk is full"
        async with asyncio.timeout(2), running.http.get(running.admin_url + "/stats") as r:
            assert r.status == 200
            said = (await r.json())["problems"]
        assert said[0].startswith("journal: a commit has taken ") and said[1:] == [
            "journal: database or disk is full"
        ]
        journal.last_write_error = None
        # systemctl status says it too (STATUS=), though no write has failed.
        assert running.daemon.status_now is not None
        assert re.search(
            r"; journal: a commit has taken \d+ s, webhooks answered 503",
            running.daemon.status_now(),
        )

    async def ready() -> bool:
        async with running.http.get(running.admin_url + "/readyz") as r:
            return r.status == 200

    await poll(ready, timeout_s=10)  # once what queued behind the hang is written
    assert await running.stop() == 0
    assert len(journaled_ids(cfg.journal.path)) == queued


async def test_a_writer_that_hangs_holds_a_bounded_count_of_empty_webhooks(
    tmp_path: Path, run_daemon: Any
) -> None:
    """Bodies bound what a hung writer keeps, and tiny ones weigh nothing: each with its
    headers (a few KB a sender chooses) stayed queued after its 503, without end. Past
    server.max_connections of them waiting (each connection has one in flight at a time) the
    receiver answers 503 without queueing more."""
    cfg = make_config(
        tmp_path,
        '[[sources.a.actions]]\ntype = "log"',
        server="ack_timeout_s = 0.05\nmax_connections = 20",
    )
    running: Running = await run_daemon(cfg)
    journal = running.daemon.journal
    assert journal is not None
    async with writer_held(journal):
        pad = "x" * 4000
        for i in range(60):  # one at a time: each answered 503, by its timeout or the bound
            status, _ = await running.post("/hooks/a", b"%d" % i, headers={"X-Pad": pad})
            assert status == 503
        assert journal.queued_body_bytes < 100
        assert journal.queued_ingests == 21  # the limit, and the one that passed it
    assert await running.stop() == 0
    assert len(journaled_ids(cfg.journal.path)) == 21


async def test_idle_and_half_sent_connections_do_not_stop_others(
    tmp_path: Path, run_daemon: Any
) -> None:
    """Hundreds of connections that send half a request leave the receiver serving others."""
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    host, port = running.daemon.bound.receiver.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    slow: list[socket.socket] = []
    try:
        for _ in range(200):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, (host, int(port)))
            await loop.sock_sendall(s, b"POST /hooks/a HTTP/1.1\r\nHost: x\r\nContent-Le")
            slow.append(s)
        status, doc = await running.post("/hooks/a", b'{"ok": 1}', headers=JSON)
        assert status == 202 and doc["duplicate"] is False
    finally:
        for s in slow:
            s.close()


async def test_oversized_headers_are_refused_early_and_the_daemon_goes_on(
    tmp_path: Path, run_daemon: Any
) -> None:
    """A 64 KB header gets a 4xx, not a crash or a 500; the next request is served."""
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    async with running.http.post(
        running.url + "/hooks/a", data=b"{}", headers={"X-Huge": "y" * 65_536}
    ) as r:
        assert 400 <= r.status < 500
    status, _ = await running.post("/hooks/a", b'{"after": 1}', headers=JSON)
    assert status == 202
    assert len(journaled_ids(cfg.journal.path)) == 1


async def _raw_server(handle: Any) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    return server, f"http://{host}:{port}"


async def test_too_many_headers_are_refused_before_the_body(
    tmp_path: Path, run_daemon: Any
) -> None:
    """More than 100 headers is a 4xx (the receiver's limit is set, not inherited)."""
    cfg = make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"')
    running: Running = await run_daemon(cfg)
    many = {f"X-H{i}": "v" for i in range(110)}  # over ours, under aiohttp's 128
    async with running.http.post(running.url + "/hooks/a", data=b"{}", headers=many) as r:
        assert 400 <= r.status < 500
    assert journaled_ids(cfg.journal.path) == set()


@pytest.fixture
async def resetting() -> AsyncIterator[str]:
    """A downstream that accepts each connection and closes it without answering."""

    async def reset(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server, url = await _raw_server(reset)
    async with server:
        yield url + "/reset"


@pytest.fixture
async def hanging() -> AsyncIterator[str]:
    """A downstream that reads the request and never answers (until the test ends)."""
    done = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await done.wait()
        writer.close()

    server, url = await _raw_server(hang)
    async with server:
        yield url + "/hang"
        done.set()


async def test_downstreams_that_hang_or_reset_never_stick_every_worker(
    tmp_path: Path, run_daemon: Any, target: Target, resetting: str, hanging: str
) -> None:
    """Hanging and resetting targets time out and retry; other work keeps flowing meanwhile."""
    retry = "{ max_attempts = 100, base_s = 0.05, factor = 1, cap_s = 0.05 }"
    cfg = make_config(
        tmp_path,
        f"""
[[sources.hang.actions]]
type = "forward"
url = "{hanging}"
timeout_s = 0.3
retry = {retry}
[[sources.reset.actions]]
type = "forward"
url = "{resetting}"
retry = {retry}
[[sources.ok.actions]]
type = "forward"
url = "{target.url}/ok"
""",
        workers="concurrency = 2",
    )
    running: Running = await run_daemon(cfg)
    for i in range(4):
        assert (await running.post("/hooks/hang", f'{{"h": {i}}}', headers=JSON))[0] == 202
        assert (await running.post("/hooks/reset", f'{{"r": {i}}}', headers=JSON))[0] == 202
    status, doc = await running.post("/hooks/ok", b'{"ok": 1}', headers=JSON)
    assert status == 202
    await target.wait_for(lambda t: any(s.path == "/ok" for s in t.seen), timeout_s=20)
    journal = running.daemon.journal
    assert journal is not None

    async def ok_done() -> bool:
        return [j.state for j in (await journal.get_event(doc["id"])).jobs] == ["done"]

    await poll(ok_done, timeout_s=10)


# -- the config loader under arbitrary input ------------------------------------------------

_KEYS = st.sampled_from(
    [
        "server", "admin", "journal", "workers", "log", "lanes", "sources", "listen", "path",
        "verify", "scheme", "secret", "actions", "type", "url", "retry", "max_attempts",
        "concurrency", "priority", "dedup", "tenant", "rpm", "tpm", "weights", "high", "x",
    ]
)  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["github", "forward", "log", "127.0.0.1:0", "env:NOPE", "json:a", "body"]),
)
_VALUES = st.recursive(
    _SCALARS.filter(lambda v: v is not None),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_KEYS | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_any_config_document_gives_a_config_or_one_line_config_error(data: dict[str, Any]) -> None:
    """Arbitrary TOML-shaped data: a Config, or a ConfigError of one line; never a crash."""
    try:
        actions.validate(parse(data))
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
