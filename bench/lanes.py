"""``python -m bench lanes``: lane accuracy against the OpenAI stand-in (target: never above
the configured RPM/TPM over any 60 s window; ≥ 90 % used when saturated).

``webhookd serve`` (pinned to its own CPU) has one source with an ``openai`` action on a lane of
120 requests/min and 60,000 tokens/min, pointed at the tests' OpenAI stand-in
(``tests/openai_standin.py``) running in this process with the same limits over a sliding 60 s
window, so any overshoot comes back as a 429. Each job's prompt is ~1,780 characters and
``max_tokens`` 50, about 500 tokens a request: 120 of them are ~60,000 tokens, so both limits
bind at once. Far more jobs are posted at the start than the lane can pass in the run; the run
lasts 65 s (20 s with ``--quick``) from the first request the stand-in sees.

Reported, from the stand-in's own record of the requests it served: the most requests and
tokens in any window as long as the run allows (60 s; with ``--quick`` the window is the 20 s
run, scaled to a minute, so the lane's initial burst weighs three times as much), the average
rate over the run, both against the configured limits, and the 429s the stand-in answered.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.harness import Busy, PostResult, busy_note, placed, post_one, session, tag
from bench.servers import free_port, running_webhookd
from bench.table import Row, scenario_main, verdict

TESTS = Path(__file__).resolve().parent.parent / "tests"
RPM = 120
TPM = 60_000
MAX_TOKENS = 50
PROMPT_CHARS = 1780
WINDOW_S = 60.0
SATURATED_TARGET = 0.90
API_KEY = "sk-bench-standin"
QUICK_HELP = "a 20 s run instead of 65 s"
SIZE_HELP = "seconds to run the saturated lane"


def config(base_url: str) -> str:
    return f"""\
[workers]
shutdown_grace_s = 1

[lanes.llm]
rpm = {RPM}
tpm = {TPM}

[sources.bench]

[[sources.bench.actions]]
type = "openai"
lane = "llm"
base_url = "{base_url}"
api_key = "env:BENCH_OPENAI_KEY"
model = "gpt-4o-mini"
prompt = "{{{{ text }}}}"
max_tokens = {MAX_TOKENS}
"""


def measure(quick: bool = False, seconds: int | None = None) -> dict[str, Any]:
    """Run the lane saturated for `seconds` (default 65; 20 with `quick`)."""
    run_s = float(seconds if seconds is not None else (20 if quick else 65))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    env = {"BENCH_OPENAI_KEY": API_KEY}
    with placed() as cpu, running_webhookd(config(base_url), cpu=cpu, probe=False, env=env) as s:
        busy = Busy(s.proc.pid)
        result = asyncio.run(_run([s.url], port, run_s))
        result["other_cpu_pct"] = busy.other_pct()
    return result


async def _run(urls: Sequence[str], port: int, run_s: float) -> dict[str, Any]:
    """Serve the stand-in on `port`, post the jobs over the daemons at `urls` in turn, and
    measure `run_s` from the first request the stand-in sees."""
    sys.path.insert(0, str(TESTS))
    from openai_standin import StandIn  # the tests' stand-in, on the path just set

    standin = StandIn(rpm=RPM, tpm=TPM, api_key=API_KEY, window_s=WINDOW_S)
    standin.completion_tokens = MAX_TOKENS
    app = web.Application()
    app.router.add_post("/v1/chat/completions", standin.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    jobs = int(run_s * RPM / 60 * 1.5) + 20  # more than the lane can pass in the run
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        posts = PostResult(count=jobs, elapsed_s=0.0)
        prefix = tag()
        async with session(16) as http:
            await asyncio.gather(
                *(
                    post_one(http, urls[i % len(urls)], _body(prefix, i), posts, i)
                    for i in range(jobs)
                )
            )
        await standin.wait_received(1)
        await asyncio.sleep(run_s)  # the measurement itself: the lane runs on its own
    finally:
        await runner.cleanup()
    first = standin.served[0].at if standin.served else time.monotonic()
    served = [(c.at, c.tokens) for c in standin.served if c.at <= first + run_s]
    return {
        "run_s": run_s,
        "window_s": min(WINDOW_S, run_s),
        "configured": {"rpm": RPM, "tpm": TPM},
        "jobs_posted": jobs,
        "jobs_acked": len(posts.acked),
        "received": standin.received,
        "served": len(served),
        "rate_limited_429": standin.rate_limited,
        **usage(served, first, run_s),
    }


def _body(prefix: str, n: int) -> bytes:
    text = f"{prefix}-{n} " + "x" * PROMPT_CHARS
    return ('{"text": "' + text[:PROMPT_CHARS] + '"}').encode()


def usage(served: Sequence[tuple[float, int]], first: float, run_s: float) -> dict[str, Any]:
    """Per-minute use: the most in any window (as long as the run allows) and the average."""
    window = min(WINDOW_S, run_s)
    scale = 60.0 / window
    max_requests = max_tokens = 0
    for i, (start, _) in enumerate(served):
        inside = [t for at, t in served[i:] if at < start + window]
        max_requests = max(max_requests, len(inside))
        max_tokens = max(max_tokens, sum(inside))
    total_tokens = sum(t for _, t in served)
    return {
        "max_rpm": max_requests * scale,
        "max_tpm": max_tokens * scale,
        "avg_rpm": len(served) / run_s * 60,
        "avg_tpm": total_tokens / run_s * 60,
        "tokens_per_request": total_tokens / len(served) if served else 0.0,
    }


def window_label(result: dict[str, Any]) -> tuple[str, Callable[[float, int], str]]:
    """The busiest-window metric's label, and the verdict on a use against its limit: none for a
    window shorter than a minute, which is not what the target speaks of."""
    window = result["window_s"]
    label = f"max in any {window:g} s" + ("" if window >= WINDOW_S else " (scaled to /min)")
    judged = window >= WINDOW_S

    def within(used: float, limit: int) -> str:
        return verdict(used <= limit) if judged else "(short window)"

    return label, within


def rows(result: dict[str, Any]) -> list[Row]:
    label, within = window_label(result)
    saturated = max(result["avg_rpm"] / RPM, result["avg_tpm"] / TPM)
    return [
        Row(
            "lanes",
            f"requests/min, {label}",
            f"{result['max_rpm']:,.0f} of {RPM:,}",
            f"≤ {RPM:,}",
            within(result["max_rpm"], RPM),
        ),
        Row(
            "lanes",
            f"tokens/min, {label}",
            f"{result['max_tpm']:,.0f} of {TPM:,}",
            f"≤ {TPM:,}",
            within(result["max_tpm"], TPM),
        ),
        Row(
            "lanes",
            f"average over the {result['run_s']:g} s run (req, tokens)",
            f"{100 * result['avg_rpm'] / RPM:.0f} %, {100 * result['avg_tpm'] / TPM:.0f} %",
            f"≥ {100 * SATURATED_TARGET:.0f} % of the binding one",
            verdict(saturated >= SATURATED_TARGET),
        ),
        Row(
            "lanes",
            "429s from the stand-in",
            f"{result['rate_limited_429']}",
            "0",
            verdict(result["rate_limited_429"] == 0),
        ),
    ]


def notes(result: dict[str, Any]) -> list[str]:
    out = []
    if result["window_s"] < WINDOW_S:
        out.append(
            f"lanes: a {result['run_s']:g} s run (--quick): the window is {result['window_s']:g} s,"
            " not 60 s, so the lane's opening burst counts for more than it would over a minute"
        )
    note = busy_note(result.get("other_cpu_pct"))
    if note:
        out.append(f"lanes: {note}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "lanes",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help=QUICK_HELP,
        size_help=SIZE_HELP,
    )


if __name__ == "__main__":
    sys.exit(main())
