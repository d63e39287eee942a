"""Load generation for the benchmarks, always in a separate process pinned to its own CPU.

Two measurements, each returning a `LoadResult`:

- `closed_loop`: C connections each send the next request as soon as the previous answer
  arrives, for D seconds → throughput and latency. Uses ``wrk`` (with a generated Lua script) when
  it is on ``PATH``, else the built-in aiohttp generator.
- `fixed_rate`: requests are *scheduled* at a fixed rate whatever the server does (open loop), and
  latency is measured from the scheduled send time, so a stall is charged to every request it
  delayed (no coordinated omission). Always the built-in generator: plain ``wrk`` cannot pace.

Every request is a unique 1 KB JSON body, so webhookd's body-hash dedup never triggers.
The built-in generator is also this module's command line (``python -m bench.loadgen closed|rate``);
it prints one JSON object on stdout, which is how the parent reads its result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

BODY_BYTES = 1024
REQUEST_TIMEOUT_S = 10.0
_JSON_MARK = "BENCH_JSON "
# Slack on top of the run's own duration before a generator is killed: startup, drain, wrk's report.
_GRACE_S = 30.0


@dataclass(frozen=True)
class LoadResult:
    """What one generator run measured. Latencies are in milliseconds."""

    generator: str  # "wrk" or "builtin"
    mode: str  # "closed" or "rate"
    elapsed_s: float
    requests: int  # answers received, whatever their status
    errors: int  # answers with an unexpected status, plus connect/read/write/timeout failures
    statuses: dict[str, int]
    rps: float  # answers with the expected status per second: intake that counts
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    gen_cpu_pct: float  # generator CPU time / wall time; near 100 means the generator was the limit
    target_rps: float | None = None  # fixed rate only
    send_lag_p99_ms: float | None = None  # fixed rate only: how late the generator itself sent

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_body(tag: str, n: int) -> bytes:
    """A JSON body of exactly `BODY_BYTES` bytes, unique per (tag, n)."""
    head = f'{{"id":"{tag}-{n}","type":"bench.event","pad":"'
    return (head + "x" * (BODY_BYTES - len(head) - 2) + '"}').encode()


def wrk_path() -> str | None:
    """The ``wrk`` binary if installed."""
    return shutil.which("wrk")


def wrk_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].split("[")[0].strip() if first else "wrk"


def pin_to(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child to `cpu` (before exec, so every thread inherits it).

    The harness is single-threaded, which is what makes ``preexec_fn`` safe here.
    """
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = math.ceil(pct / 100 * len(sorted_values))
    return sorted_values[min(len(sorted_values) - 1, max(rank, 1) - 1)]


# ---------------------------------------------------------------------------------------------
# Parent side: start a generator process and read its result.


def closed_loop(
    url: str,
    *,
    connections: int,
    duration_s: float,
    expect_status: int,
    cpu: int | None,
    use_wrk: bool,
) -> LoadResult:
    """Closed-loop max throughput with `connections` connections for `duration_s`."""
    wrk = wrk_path() if use_wrk else None
    if wrk is not None:
        return _run_wrk(wrk, url, connections, duration_s, expect_status, cpu)
    args = ["closed", "--connections", str(connections)]
    return _run_builtin(url, args, duration_s, expect_status, cpu)


def fixed_rate(
    url: str, *, rate: float, duration_s: float, expect_status: int, cpu: int | None
) -> LoadResult:
    """Open-loop load at `rate` requests/s for `duration_s`, latency from the scheduled send."""
    return _run_builtin(url, ["rate", "--rate", str(rate)], duration_s, expect_status, cpu)


def _run_builtin(
    url: str, args: list[str], duration_s: float, expect_status: int, cpu: int | None
) -> LoadResult:
    cmd = [sys.executable, "-m", "bench.loadgen", *args, "--url", url]
    cmd += ["--duration", str(duration_s), "--expect", str(expect_status), "--tag", _tag()]
    out = _run(cmd, duration_s, cpu)
    return LoadResult(**json.loads(out.strip().splitlines()[-1]))


def _run(cmd: list[str], duration_s: float, cpu: int | None) -> str:
    # Run from the directory holding the ``bench`` package, so ``-m bench.loadgen`` resolves
    # wherever the harness was started from.
    cwd = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=duration_s + _GRACE_S,
        preexec_fn=pin_to(cpu),
        cwd=cwd,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"load generator {cmd[:4]} exited {proc.returncode}: {proc.stderr[-2000:]}"
        )
    return proc.stdout


def _tag() -> str:
    return f"{os.getpid()}-{os.urandom(4).hex()}"


_WRK_SCRIPT = """\
-- Generated by bench.loadgen: a unique 1 KB JSON POST per request, status counts per thread,
-- and one JSON line with the summary at the end.
threads = {}
statuses = {}
local counter = 0
local tag = "t"

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  tag = args[1] .. "-" .. tostring(tid)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local head = '{"id":"' .. tag .. '-' .. counter .. '","type":"bench.event","pad":"'
  local body = head .. string.rep("x", BODY_BYTES - #head - 2) .. '"}'
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do counts[code] = (counts[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(counts) do parts[#parts + 1] = string.format('"%d":%d', code, n) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"statuses":{%s},' ..
    '"socket_errors":%d,"p50_us":%.1f,"p99_us":%.1f,"p999_us":%.1f,"max_us":%.1f}\\n',
    summary.duration, summary.requests, table.concat(parts, ","),
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


def _run_wrk(
    wrk: str, url: str, connections: int, duration_s: float, expect_status: int, cpu: int | None
) -> LoadResult:
    seconds = max(1, round(duration_s))
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(f"BODY_BYTES = {BODY_BYTES}\n" + _WRK_SCRIPT)
        # One thread: the generator has one CPU to itself, and wrk's event loop keeps up with
        # hundreds of connections on one thread.
        cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds}s", f"--timeout={REQUEST_TIMEOUT_S:g}s"]
        cmd += ["-s", str(script), url, "--", _tag()]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = _run(cmd, seconds, cpu)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(rf"^{_JSON_MARK}(.*)$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out[-2000:]}")
    raw = json.loads(match.group(1))
    elapsed_s = raw["duration_us"] / 1e6
    statuses = {str(k): int(v) for k, v in raw["statuses"].items()}
    unexpected = sum(n for code, n in statuses.items() if code != str(expect_status))
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return LoadResult(
        generator="wrk",
        mode="closed",
        elapsed_s=elapsed_s,
        requests=raw["requests"],
        errors=unexpected + raw["socket_errors"],
        statuses=statuses,
        rps=statuses.get(str(expect_status), 0) / elapsed_s if elapsed_s else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        p999_ms=raw["p999_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        gen_cpu_pct=100 * cpu_s / elapsed_s if elapsed_s else 0.0,
    )


# ---------------------------------------------------------------------------------------------
# Child side: the built-in generator (aiohttp client on uvloop).


class _Tally:
    """Latencies and outcomes of one built-in run."""

    def __init__(self, expect_status: int) -> None:
        self.expect_status = expect_status
        self.latencies_s: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.failures = 0  # no answer at all: connect/read/write errors and timeouts

    def result(
        self, mode: str, elapsed_s: float, cpu_s: float, **extra: float | None
    ) -> LoadResult:
        lat = sorted(self.latencies_s)
        unexpected = sum(n for code, n in self.statuses.items() if code != str(self.expect_status))
        requests = sum(self.statuses.values())
        return LoadResult(
            generator="builtin",
            mode=mode,
            elapsed_s=elapsed_s,
            requests=requests,
            errors=unexpected + self.failures,
            statuses=dict(self.statuses),
            rps=self.statuses[str(self.expect_status)] / elapsed_s if elapsed_s else 0.0,
            p50_ms=1000 * percentile(lat, 50),
            p99_ms=1000 * percentile(lat, 99),
            p999_ms=1000 * percentile(lat, 99.9),
            max_ms=1000 * (lat[-1] if lat else 0.0),
            gen_cpu_pct=100 * cpu_s / elapsed_s if elapsed_s else 0.0,
            **extra,
        )


_HEADERS = {"Content-Type": "application/json"}


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, started: float, tally: _Tally
) -> None:
    """Send one request; record its latency measured from `started`."""
    try:
        async with session.post(url, data=body, headers=_HEADERS) as response:
            await response.read()
    except (aiohttp.ClientError, TimeoutError):
        tally.failures += 1
        return
    tally.latencies_s.append(time.perf_counter() - started)
    tally.statuses[str(response.status)] += 1


def _session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )


async def _closed(
    url: str, connections: int, duration_s: float, expect_status: int, tag: str
) -> LoadResult:
    tally = _Tally(expect_status)
    async with _session(connections) as session:
        start = time.perf_counter()
        cpu_start = time.process_time()
        deadline = start + duration_s

        async def connection(worker: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                body = make_body(f"{tag}-{worker}", n)
                await _post(session, url, body, time.perf_counter(), tally)

        async with asyncio.TaskGroup() as group:
            for worker in range(connections):
                group.create_task(connection(worker))
        elapsed_s = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
    return tally.result("closed", elapsed_s, cpu_s)


async def _rate(
    url: str, rate: float, duration_s: float, expect_status: int, tag: str, connections: int
) -> LoadResult:
    tally = _Tally(expect_status)
    total = max(1, round(rate * duration_s))
    interval_s = 1 / rate
    lags_s: list[float] = []
    async with _session(connections) as session:
        # Open a few connections first so the first scheduled sends do not pay for TCP setup.
        async with asyncio.TaskGroup() as group:
            for n in range(8):
                warm = _Tally(expect_status)
                group.create_task(_post(session, url, make_body(f"{tag}-w", n), 0.0, warm))
        start = time.perf_counter() + 0.01
        cpu_start = time.process_time()
        async with asyncio.TaskGroup() as group:
            sent = 0
            while sent < total:
                due = start + sent * interval_s
                now = time.perf_counter()
                if due > now:
                    # uvloop rounds timers to the nearest millisecond: wake up to 1 ms early and
                    # spin (sleep(0) still serves I/O) rather than send up to 1 ms late. Spinning
                    # costs only the generator's own CPU; `send_lag_p99_ms` shows the precision.
                    await asyncio.sleep(max(0.0, due - now - 0.0005))
                    continue
                lags_s.append(now - due)
                body = make_body(tag, sent)
                group.create_task(_post(session, url, body, due, tally))
                sent += 1
        elapsed_s = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
    lags_s.sort()
    return tally.result(
        "rate",
        elapsed_s,
        cpu_s,
        target_rps=rate,
        send_lag_p99_ms=1000 * percentile(lags_s, 99),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("mode", choices=("closed", "rate"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--connections", type=int, default=64, help="closed: connections")
    parser.add_argument("--rate", type=float, default=1000.0, help="rate: requests per second")
    parser.add_argument("--max-connections", type=int, default=512, help="rate: connection cap")
    parser.add_argument("--expect", type=int, default=202, help="the status that counts as ok")
    parser.add_argument("--tag", default=_tag(), help="makes bodies unique across runs")
    args = parser.parse_args(argv)
    if args.mode == "closed":
        work = _closed(args.url, args.connections, args.duration, args.expect, args.tag)
    else:
        work = _rate(
            args.url, args.rate, args.duration, args.expect, args.tag, args.max_connections
        )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(work)
    print(json.dumps(result.to_json()))


if __name__ == "__main__":
    main()
