"""The admin API of a real ``webhookd serve`` against hostile browsers: DNS rebinding, cross-site
writes, a public admin without a token, and the container health probe once a token is set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from procs import DaemonProc, Procs, poll, write_config

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(60)]

LOG_SOURCE = """
[sources.shop]
[[sources.shop.actions]]
type = "log"
"""


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, url, **kw) as r:
        doc: dict[str, Any] = await r.json(content_type=None)
        return r.status, doc


async def done_event(http: aiohttp.ClientSession, daemon: DaemonProc) -> str:
    """A webhook accepted and handled: an event whose job is done."""
    status, doc = await call(http, "POST", daemon.url + "/hooks/shop", data=b"{}")
    assert status == 202, doc
    event_id: str = doc["id"]

    async def done() -> bool:
        return (await call(http, "GET", f"{daemon.admin_url}/events/{event_id}"))[1].get(
            "state"
        ) == "done"

    await poll(done, timeout_s=20)
    return event_id


async def test_without_a_token_foreign_hosts_and_cross_site_writes_are_refused(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession
) -> None:
    """A page that rebinds its name to loopback cannot read events, and a cross-site form or
    fetch cannot replay or cancel one, nor pause a source; the admin's own and loopback names,
    and API clients that send X-Webhookd or JSON, still work."""
    daemon = await procs.serve(write_config(tmp_path / "c.toml", tmp_path / "j.db", LOG_SOURCE))
    admin, port = daemon.admin_url, daemon.admin.rpartition(":")[2]
    event_id = await done_event(http, daemon)

    for host in ("evil.example", f"evil.example:{port}", f"10.0.0.1:{port}", "127.0.0.1.evil:1"):
        status, doc = await call(http, "GET", admin + "/events", headers={"Host": host})
        assert (status, set(doc)) == (421, {"error"}), host
    # Loopback names on any port: an SSH tunnel from another local port (-L 9000:...:8081).
    loopback = (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}")
    for host in (*loopback, "127.0.0.1:9000", "[::1]:9000", "localhost"):
        status, doc = await call(http, "GET", admin + "/events", headers={"Host": host})
        assert status == 200 and [e["id"] for e in doc["events"]] == [event_id], host

    replay = f"{admin}/events/{event_id}/replay"
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "http://evil.example", "Content-Type": "application/json"},
        {"Origin": f"http://evil.example:{port}", "X-Webhookd": "1"},
        {"Origin": "http://127.0.0.1:3000", "X-Webhookd": "1"},  # another local site
        {"Origin": f"https://127.0.0.1:{port}", "X-Webhookd": "1"},
        {"Origin": "null", "X-Webhookd": "1"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "text/plain"},
        {},
    ):
        for url in (
            replay,
            f"{admin}/events/{event_id}/cancel",
            f"{admin}/sources/shop/pause",
            f"{admin}/sources/shop/resume",
            f"{admin}/sources/shop/replay-dead",
        ):
            status, doc = await call(http, "POST", url, headers=headers, data=b"a=1")
            assert (status, set(doc)) == (403, {"error"}), (url, headers)
    status, doc = await call(http, "GET", f"{admin}/events/{event_id}")
    assert doc["jobs"][0]["attempts"] == 1  # nothing was replayed
    # A method or path no route takes changes nothing: it gets its 405 or 404, not a 403.
    async with http.delete(f"{admin}/stats") as r:
        assert (r.status, r.headers["Allow"]) == (405, "GET,HEAD")
    status, doc = await call(http, "POST", f"{admin}/nowhere", headers={"Origin": "null"})
    assert (status, set(doc)) == (404, {"error"})
    status, doc = await call(http, "GET", f"{admin}/stats")
    assert doc["paused"] == []  # nor paused

    for headers in (
        {"Origin": f"http://127.0.0.1:{port}"},
        {"Origin": f"http://localhost:{port}"},
        {"X-Webhookd": "1"},
        {"Content-Type": "application/json"},
    ):
        status, doc = await call(http, "POST", replay, headers=headers)
        assert status == 202 and doc["id"] == event_id, headers  # requeued (once: then queued)
    # The dashboard's own POSTs through a tunnel: same origin as the tunnel's address.
    tunnel = {"Host": "localhost:9000", "Origin": "http://localhost:9000"}
    status, doc = await call(http, "POST", replay, headers=tunnel)
    assert status == 202 and doc["id"] == event_id


@pytest.mark.parametrize("verb", ["check", "serve"])
async def test_a_public_admin_address_without_a_token_is_a_config_error(
    tmp_path: Path, procs: Procs, verb: str
) -> None:
    """admin.listen on 0.0.0.0 without admin.token does not start: exit 2 naming admin.token."""
    path = write_config(tmp_path / "c.toml", tmp_path / "j.db", LOG_SOURCE)
    path.write_text(
        path.read_text().replace(
            'listen = "127.0.0.1:0"\n\n[journal]', 'listen = "0.0.0.0:0"\n\n[journal]'
        )
    )
    assert 'listen = "0.0.0.0:0"' in path.read_text()
    out = await procs.cli(verb, "--config", str(path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("webhookd: error: admin.token: is required")
    assert not (tmp_path / "j.db").exists()


async def test_with_a_token_the_health_probe_needs_none_and_everything_else_does(
    tmp_path: Path, procs: Procs, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container's HEALTHCHECK (GET /healthz, no header) answers 200 with a token set on a
    public admin address; the data endpoints still answer 401 without the token."""
    monkeypatch.setenv("WEBHOOKD_TEST_GUARD_TOKEN", "guard-token-5678")
    path = write_config(tmp_path / "c.toml", tmp_path / "j.db", LOG_SOURCE)
    path.write_text(
        path.read_text().replace(
            'listen = "127.0.0.1:0"\n\n[journal]',
            'listen = "0.0.0.0:0"\ntoken = "env:WEBHOOKD_TEST_GUARD_TOKEN"\n\n[journal]',
        )
    )
    daemon = await procs.serve(path)
    port = daemon.admin.rpartition(":")[2]
    admin = f"http://127.0.0.1:{port}"  # as the Dockerfile's HEALTHCHECK asks
    status, doc = await call(http, "GET", admin + "/healthz")
    assert status == 200 and doc["ok"] is True
    for path_ in ("/readyz", "/stats", "/events", "/metrics"):
        assert (await call(http, "GET", admin + path_))[0] == 401, path_
    good = {"Authorization": "Bearer guard-token-5678"}
    assert (await call(http, "GET", admin + "/events", headers=good))[0] == 200
    # A wrong token is someone guessing: said (throttled), never the token sent. A missing one
    # (the dashboard before its token is typed in) is not.
    guess = {"Authorization": "Bearer guess-0001"}
    assert (await call(http, "GET", admin + "/events", headers=guess))[0] == 401
    line = await daemon.wait_said("wrong bearer token")
    assert "GET '/events' from 127.0.0.1" in line and "guess-0001" not in daemon.log
    assert sum("wrong bearer token" in said for said in daemon.lines) == 1
