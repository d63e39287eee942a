"""What the daemon scenarios (dispatch, e2e, burst, lanes) share: a recording target, a poster
that sends N unique webhooks and keeps the event ids it got back, the admin ``/stats`` poll, the
``webhookd`` CLI, CPU placement and load, and latency summaries.

Each scenario runs ``webhookd serve`` (via `bench.servers.running_webhookd`, pinned to one CPU)
and does its own async work (the target, the poster) in this process, inside one
``asyncio.run``, which ends before the daemon is stopped: by then nothing of ours is listening,
so the daemon's drain is never held up by a harness that no longer answers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.intake import BUSY_OTHER_PCT, choose_cpus
from bench.loadgen import BODY_BYTES, make_body, percentile
from bench.machine import OtherProcesses

REQUEST_TIMEOUT_S = 10.0
_HEADERS = {"Content-Type": "application/json"}


def latency_summary(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p99/p99.9/max of a list of seconds, in milliseconds."""
    ordered = sorted(values_s)
    return {
        "count": len(ordered),
        "p50_ms": 1000 * percentile(ordered, 50),
        "p99_ms": 1000 * percentile(ordered, 99),
        "p999_ms": 1000 * percentile(ordered, 99.9),
        "max_ms": 1000 * (ordered[-1] if ordered else 0.0),
    }


# -- the recording target ------------------------------------------------------------------------


@dataclass
class RecordingTarget:
    """An aiohttp server on 127.0.0.1 that answers 200 and records each request's ``webhook-id``
    and arrival time (``time.monotonic()``, read before anything is awaited)."""

    port: int
    arrivals: dict[str, list[float]] = field(default_factory=dict)
    received: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sink"

    async def start(self) -> RecordingTarget:
        app = web.Application()
        app.router.add_post("/sink", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        now = time.monotonic()
        self.received += 1
        self.arrivals.setdefault(request.headers.get("webhook-id", "?"), []).append(now)
        self.changed.set()
        await request.read()
        return web.Response(status=200)

    async def wait_for(self, event_id: str, timeout_s: float) -> float | None:
        """When `event_id` first arrived; ``None`` if it did not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while event_id not in self.arrivals:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return None
        return self.arrivals[event_id][0]

    async def wait_all(self, ids: set[str], timeout_s: float) -> float | None:
        """When the last of `ids` arrived; ``None`` if some did not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        missing = set(ids)
        while True:
            missing = {i for i in missing if i not in self.arrivals}
            if not missing:
                return max(self.arrivals[i][0] for i in ids) if ids else time.monotonic()
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except TimeoutError:
                continue


# -- the poster -----------------------------------------------------------------------------------


@dataclass
class PostResult:
    """What `post_many` saw: the event ids acked (by request number) and how long it took."""

    count: int
    elapsed_s: float
    acked: dict[int, str] = field(default_factory=dict)  # request number → event id
    statuses: Counter[str] = field(default_factory=Counter)  # every answer, retried ones too
    retries: int = 0  # 503/429 answers, retried after Retry-After as a provider would
    failures: int = 0  # connection errors, timeouts, other statuses (given up)
    latencies_s: list[float] = field(default_factory=list)  # per acked request, last try

    @property
    def rate(self) -> float:
        return len(self.acked) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "acked": len(self.acked),
            "elapsed_s": self.elapsed_s,
            "acked_per_s": self.rate,
            "statuses": dict(self.statuses),
            "retries": self.retries,
            "failures": self.failures,
            "ack_latency": latency_summary(self.latencies_s),
        }


def session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )


async def post_one(
    http: aiohttp.ClientSession, url: str, body: bytes, result: PostResult, n: int
) -> str | None:
    """POST one webhook until it is acked (2xx) or refused for good; return its event id."""
    for _ in range(20):
        started = time.monotonic()
        try:
            async with http.post(url, data=body, headers=_HEADERS) as response:
                status = response.status
                doc = await response.json(content_type=None) if status < 300 else None
                retry_after = response.headers.get("Retry-After", "0.2")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            result.failures += 1
            return None
        result.statuses[str(status)] += 1
        if status in (429, 503):
            result.retries += 1
            await asyncio.sleep(min(1.0, max(0.05, _seconds(retry_after))))
            continue
        if status >= 300 or not isinstance(doc, dict) or "id" not in doc:
            result.failures += 1
            return None
        result.latencies_s.append(time.monotonic() - started)
        result.acked[n] = str(doc["id"])
        return str(doc["id"])
    result.failures += 1
    return None


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.2


async def post_many(url: str, count: int, connections: int, tag: str) -> PostResult:
    """POST `count` unique 1 KB webhooks over `connections` connections, as fast as answered."""
    result = PostResult(count=count, elapsed_s=0.0)
    numbers = iter(range(count))

    async def worker(http: aiohttp.ClientSession) -> None:
        for n in numbers:
            await post_one(http, url, make_body(tag, n), result, n)

    async with session(connections) as http:
        started = time.monotonic()
        await asyncio.gather(*(worker(http) for _ in range(connections)))
        result.elapsed_s = time.monotonic() - started
    return result


# ``wrk`` posting until COUNT webhooks are acked, a unique body each. A 503 or 429 is not acked:
# another body goes instead, after the Retry-After it names (on every connection of the thread:
# wrk cannot tie an answer to the body it answers). Once the bodies in flight would make COUNT,
# connections pause (an answer lost on the way would otherwise stall the run; after the pause a
# fresh body goes anyway). At COUNT the acked ids and every status's count go to OUT, which the
# harness waits for (the script says so on stdout) before it stops wrk, which would run to its -d.
_WRK_BURST = """\
local counter, acked, answered, sent, pause_ms = 0, 0, 0, 0, 0
local ids, statuses = {}, {}
local tag = "b"

function init(args)
  tag = args[1]
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function delay()
  if pause_ms > 0 then
    local ms = pause_ms
    pause_ms = 0
    return ms
  end
  if acked + (sent - answered) >= COUNT then return 500 end
  return 0
end

function request()
  counter = counter + 1
  sent = sent + 1
  local head = '{"id":"' .. tag .. '-' .. counter .. '","type":"bench.event","pad":"'
  return wrk.format(nil, nil, nil, head .. string.rep("x", BODY_BYTES - #head - 2) .. '"}')
end

function response(status, headers, body)
  answered = answered + 1
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 or status == 202 then
    acked = acked + 1
    ids[#ids + 1] = string.match(body, '"id": ?"([^"]+)"')
    if acked == COUNT then
      local parts = {}
      for code, n in pairs(statuses) do parts[#parts + 1] = string.format('"%d":%d', code, n) end
      local f = io.open(OUT .. ".part", "w")
      f:write("{" .. table.concat(parts, ",") .. "}\\n", table.concat(ids, "\\n"), "\\n")
      f:close()
      os.rename(OUT .. ".part", OUT)
      io.write("BURST_DONE\\n")
      io.flush()
    end
  elseif status == 503 or status == 429 then
    pause_ms = 1000 * (tonumber(headers["Retry-After"] or headers["retry-after"]) or 1)
  end
end
"""


async def post_many_wrk(
    wrk: str, url: str, count: int, connections: int, tag: str, timeout_s: float
) -> PostResult:
    """`post_many` with ``wrk`` (one thread, on this process's CPU) instead of aiohttp's client,
    which tops out at ~3,000 posts/s on one core here; no per-request latencies."""
    result = PostResult(count=count, elapsed_s=0.0)
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        out = Path(tmp) / "acked"
        script = Path(tmp) / "burst.lua"
        header = f"BODY_BYTES = {BODY_BYTES}\nCOUNT = {count}\nOUT = {json.dumps(str(out))}\n"
        script.write_text(header + _WRK_BURST)
        cmd = [wrk, "-t1", f"-c{connections}", f"-d{math.ceil(timeout_s)}s", "--timeout=30s"]
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *cmd, "-s", str(script), url, "--", tag, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        try:
            async for line in proc.stdout:  # until the script says it is done, or wrk ends
                if line.strip() == b"BURST_DONE":
                    break
            result.elapsed_s = time.monotonic() - started
        finally:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
        if not out.exists():
            result.failures = count
            return result
        first, *ids = out.read_text().split()
    result.statuses.update({code: n for code, n in json.loads(first).items()})
    result.acked = dict(enumerate(ids))
    result.retries = result.statuses["503"] + result.statuses["429"]
    result.failures = sum(n for code, n in result.statuses.items() if code not in _ANSWERED)
    return result


_ANSWERED = ("200", "202", "503", "429")


def tag() -> str:
    """A run-unique prefix for webhook bodies (so no two runs' bodies share a dedup hash)."""
    return f"b{os.getpid()}-{time.time_ns()}"


# -- the daemon's admin API and CLI ----------------------------------------------------------------


async def stats(http: aiohttp.ClientSession, admin_url: str) -> dict[str, Any]:
    async with http.get(f"{admin_url}/stats") as response:
        response.raise_for_status()
        doc: dict[str, Any] = await response.json()
        return doc


def stats_sync(admin_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{admin_url}/stats", timeout=10) as response:
        doc: dict[str, Any] = json.loads(response.read())
        return doc


# -- where things run, and how busy the machine was ------------------------------------------------


@contextmanager
def placed() -> Iterator[int | None]:
    """Yield the CPU for the daemon; meanwhile this process (poster, target, stand-in) is pinned
    to another one, so the two do not compete for a core. No pinning with one usable CPU."""
    daemon_cpu, own_cpu = choose_cpus()
    if own_cpu is None or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {own_cpu})
    try:
        yield daemon_cpu
    finally:
        os.sched_setaffinity(0, before)


class Busy:
    """CPU used by processes other than the daemon and the benchmark's own during a measurement,
    in % of one CPU (``machine.OtherProcesses``): on a shared 2-core machine, another process
    on the daemon's core halves its speed."""

    def __init__(self, daemon_pid: int) -> None:
        self._others = OtherProcesses(also=lambda: (daemon_pid,))

    def other_pct(self) -> float | None:
        return self._others.pct()


def busy_note(other_pct: float | None) -> str | None:
    if other_pct is not None and other_pct >= BUSY_OTHER_PCT:
        return (
            f"other processes used {other_pct:.0f} % of a CPU during the measurement: "
            "the machine was not idle, so these numbers understate webhookd"
        )
    return None
