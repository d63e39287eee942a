"""Hostile requests against a real ``webhookd serve`` (uvloop, as users run it).

A value SQLite cannot store, junk catch-all names, a stalled body and a bad Content-Encoding:
each is answered with a JSON 4xx, and the daemon keeps taking webhooks afterwards.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from ops_support import event_state
from procs import Procs, write_config
from prometheus_client.parser import text_string_to_metric_families
from rawhttp import RawConn, post

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(90)]

UNSTORABLE = """
[sources.d]
dedup = "json:id"
[[sources.d.actions]]
type = "log"

[sources.h]
dedup = "header:X-Id"
tenant = "header:X-Tenant"
[[sources.h.actions]]
type = "log"

[sources.o]
[[sources.o.actions]]
type = "log"
ordered_by = "json:customer"
"""
CATCH_ALL = """
[sources.known]
[[sources.known.actions]]
type = "log"

[sources."*"]
[[sources."*".actions]]
type = "log"
"""


async def test_a_value_that_cannot_be_stored_is_a_400_and_intake_goes_on(
    tmp_path: Path, procs: Procs
) -> None:
    """A lone surrogate in a dedup/tenant/ordering field gets 400; the next webhook gets 202."""
    cfg = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", UNSTORABLE)
    daemon = await procs.serve(cfg)
    addr = daemon.receiver
    bad = await post(addr, b"/hooks/d", b'{"id": "\\udcff"}')
    assert (bad.status, bad.doc) == (400, {"error": "dedup (json:id) is not valid UTF-8 text"})
    assert (await post(addr, b"/hooks/d", b'{"id": "fine"}')).status == 202
    raw = await post(addr, b"/hooks/h", b"{}", [(b"X-Id", b"1"), (b"X-Tenant", b"acme\xff")])
    assert (raw.status, raw.doc) == (
        400,
        {"error": "tenant (header:X-Tenant) is not valid UTF-8 text"},
    )
    order = await post(addr, b"/hooks/o", b'{"customer": "\\ud800x"}')
    assert order.status == 400, order
    assert (await post(addr, b"/hooks/h", b"{}", [(b"X-Id", b"2")])).status == 202
    assert (await post(addr, b"/hooks/o", b'{"customer": "c-1"}')).status == 202
    assert daemon.proc.returncode is None
    assert "Traceback" not in daemon.log


def source_labels(text: str) -> tuple[set[str], int]:
    """The source label values in a scrape, and how many series carry one."""
    labels, series = set(), 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "source" in sample.labels:
                labels.add(sample.labels["source"])
                series += 1
    return labels, series


async def test_catch_all_names_do_not_become_metric_series(tmp_path: Path, procs: Procs) -> None:
    """1,000 distinct catch-all names and junk paths are counted under "*" and "(none)" only."""
    cfg = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", CATCH_ALL)
    daemon = await procs.serve(cfg)
    async with aiohttp.ClientSession() as http:

        async def scrape() -> tuple[set[str], int]:
            async with http.get(daemon.admin_url + "/metrics") as r:
                assert r.status == 200
                return source_labels(await r.text())

        for path in ("/hooks/known", "/hooks/first"):
            async with http.post(daemon.url + path, data=b"{}") as r:
                assert r.status == 202
                # Once its job is done, every series a source will have (attempts) exists.
                await event_state(http, daemon.admin_url, (await r.json())["id"], "done")
        async with http.post(daemon.url + "/nowhere", data=b"{}") as r:
            assert r.status == 404
        _, before = await scrape()
        for n in range(1000):
            async with http.post(f"{daemon.url}/hooks/name-{n}", data=b"{}") as r:
                assert r.status == 202
            async with http.post(f"{daemon.url}/junk-{n}", data=b"{}") as r:
                assert r.status == 404
        labels, after = await scrape()
    assert labels <= {"known", "*", "(none)"}, labels
    assert after == before


async def test_stalled_and_badly_encoded_bodies_get_json_answers(
    tmp_path: Path, procs: Procs
) -> None:
    """A stalled body gets 408 and is closed; bad gzip gets 400; no traceback; 202 afterwards."""
    cfg = write_config(tmp_path / "webhookd.toml", tmp_path / "webhookd.db", CATCH_ALL)
    text = cfg.read_text()
    cfg.write_text(text.replace("[server]\n", "[server]\nbody_timeout_s = 0.5\n", 1))
    daemon = await procs.serve(cfg)
    conn = await RawConn.open(daemon.receiver)
    await conn.head(b"/hooks/slow", [(b"Content-Length", b"960000")])
    await conn.send(b"{")
    stalled = await conn.answer()
    assert (stalled.status, stalled.doc) == (408, {"error": "body not received in time"})
    assert await conn.closed_by_peer()
    await conn.close()
    bad = await post(daemon.receiver, b"/hooks/gz", b"not gzip", [(b"Content-Encoding", b"gzip")])
    assert (bad.status, bad.doc) == (400, {"error": "body is not valid gzip"})
    assert (await post(daemon.receiver, b"/hooks/ok", b"{}")).status == 202
    assert "Traceback" not in daemon.log
