"""Two real ``webhookd serve`` nodes on one PostgreSQL sharing a lane against the OpenAI
stand-in, which enforces its limits the way the real API does (429 ``rate_limit_exceeded`` with
``retry-after`` and ``x-ratelimit-*`` headers).

The stand-in's window is scaled down so a test shows saturation in seconds: a lane of ``rpm``
admits at most its burst plus ``window + chunk lifetime`` of refill in any window of the
stand-in's, so the stand-in allows that (for a 10 s window) and refuses anything more. Two
nodes each spending the whole lane, as they did before lanes were shared, send twice that.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster import node_config, post_acked, serve_nodes, stop
from openai_standin import StandIn
from procs import DaemonProc, Procs, get_json, poll

from webhookd.limiter import CHUNK_TTL_S, JITTER_GUARD_S

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("journal_env"),
]

KEY = "sk-standin"


def lane_config(path: Path, standin: StandIn, *, rpm: int, burst_s: float) -> Path:
    body = f"""\
[lanes.llm]
rpm = {rpm}
burst_s = {burst_s}
max_cooldown_s = 30

[sources.mail]
[[sources.mail.actions]]
type = "openai"
api_key = "env:WEBHOOKD_TEST_OPENAI_KEY"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
prompt = "Reply to {{{{ subject }}}}"
max_tokens = 20
lane = "llm"
"""
    return node_config(path, body)


async def post(http: aiohttp.ClientSession, daemon: DaemonProc) -> str:
    return await post_acked(http, daemon.url, "mail", {"subject": uuid.uuid4().hex})


async def event(http: aiohttp.ClientSession, daemon: DaemonProc, event_id: str) -> dict[str, Any]:
    status, doc = await get_json(http, f"{daemon.admin_url}/events/{event_id}")
    assert status == 200, doc
    assert doc is not None
    return doc


async def lane_stats(http: aiohttp.ClientSession, daemon: DaemonProc) -> dict[str, Any]:
    status, doc = await get_json(http, f"{daemon.admin_url}/stats")
    assert status == 200 and doc is not None, doc
    lanes: dict[str, Any] = doc["lanes"]  # type: ignore[assignment]
    return dict(lanes["llm"])


async def test_two_nodes_sharing_a_lane_get_no_429_and_use_over_90_percent_of_it(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A saturated lane fed through two nodes: the provider never answers 429 (the nodes
    together stay within the lane) and its calls arrive at 90 % or more of the lane's rate."""
    rpm, burst_s, window_s = 180, 1.0, 10.0
    rate = rpm / 60
    allowed = math.ceil(rate * (window_s + burst_s + CHUNK_TTL_S + JITTER_GUARD_S))
    standin = await StandIn(rpm=allowed, window_s=window_s).start()
    monkeypatch.setenv("WEBHOOKD_TEST_OPENAI_KEY", KEY)
    try:
        cfg = lane_config(tmp_path / "webhookd.toml", standin, rpm=rpm, burst_s=burst_s)
        a, b = await serve_nodes(procs, cfg)
        for _ in range(45):
            await asyncio.gather(post(http, a), post(http, b))
        measured = 40
        await asyncio.wait_for(standin.wait_received(measured + 6), 60)
        await stop(a, b)
    finally:
        await standin.aclose()

    assert standin.rate_limited == 0
    served = [c.at for c in standin.served]
    # Past the first calls (the burst), over the next 40: the lane's rate, nearly all of it.
    span_s = served[5 + measured] - served[5]
    assert measured / span_s >= 0.9 * rate, (measured, span_s)


async def test_a_429_on_one_node_cools_the_lane_on_the_other(
    tmp_path: Path,
    procs: Procs,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the provider answers one node 429 ``rate_limit_exceeded``, jobs on both nodes wait
    out the cool-down instead of calling it again."""
    standin = await StandIn(rpm=1).start()
    monkeypatch.setenv("WEBHOOKD_TEST_OPENAI_KEY", KEY)
    try:
        cfg = lane_config(tmp_path / "webhookd.toml", standin, rpm=600, burst_s=3.0)
        a, b = await serve_nodes(procs, cfg)
        await post(http, a)
        await asyncio.wait_for(standin.wait_received(1), 30)
        refused = await post(http, a)

        async def refused_and_recorded() -> bool:
            doc = await event(http, a, refused)
            return any("429" in (j["last_error"] or "") for j in doc["jobs"])

        await poll(refused_and_recorded, timeout_s=30)
        assert standin.rate_limited == 1
        later = [await post(http, node) for node in (a, b, a, b, a, b)]

        async def all_cooling() -> bool:
            for event_id in later:
                doc = await event(http, a, event_id)
                if not any("cooling down" in (j["last_error"] or "") for j in doc["jobs"]):
                    return False
            return True

        await poll(all_cooling, timeout_s=30)
        cooling = [await lane_stats(http, node) for node in (a, b)]
        await stop(a, b)
    finally:
        await standin.aclose()

    assert (standin.received, standin.rate_limited) == (2, 1)
    assert all(stats["cooling_until_s"] > 0 for stats in cooling), cooling
