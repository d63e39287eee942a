"""``python -m bench all [--quick] [--json PATH] [--chart PATH]``: every scenario, one table.

Runs intake, journal, dispatch, e2e, peers, burst, lanes, lanes2 (two nodes on PostgreSQL),
fairness (one node and two) and backlog (not chaos: it tests guarantees, not speed), one after
the other, each with its own fresh daemon or journal.
A scenario that fails, or a system in it that fails, is reported as a FAILED line and the rest
still run; the exit status is then 1.
Prints one table (scenario, metric, value, target, verdict) and the notes (a busy machine, a
generator that was the bottleneck), writes everything as JSON (default
``bench/results/latest.json``) and draws a PNG chart (default ``bench/results/latest.png``;
needs matplotlib: ``pip install -e '.[bench]'``).
``--quick`` (about 3 minutes) runs every scenario smaller; the full run takes about 20 minutes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.backlog import RSS_TARGET_MB
from bench.machine import CpuMeter, describe
from bench.servers import WEBHOOKD
from bench.table import Row, render, verdict

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = (
    "intake",
    "journal",
    "dispatch",
    "e2e",
    "peers",
    "burst",
    "lanes",
    "lanes2",
    "fairness",
    "backlog",
)
# (events queued, jobs drained) full and quick: memory is about the backlog's size, and draining
# all of a million would take most of the time budget.
BACKLOG_SIZES = {False: (1_000_000, 100_000), True: (100_000, 10_000)}
BACKLOG_TIMEOUT_S = {False: 600.0, True: 90.0}


@dataclass
class Outcome:
    """One scenario's part of the run."""

    name: str
    result: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "rows": [r.to_json() for r in self.rows],
            "notes": self.notes,
            "elapsed_s": self.elapsed_s,
            "error": self.error,
        }


Runner = Callable[[bool], Outcome]


def run_intake(quick: bool) -> Outcome:
    from bench import intake

    options, _ = intake.parse_args(["--quick"] if quick else [])
    report = intake.run(options)
    options = report.options  # what it ran with
    data = intake.to_json(report)
    rows: list[Row] = []
    for name, s in data["summary"].items():
        rows.append(
            Row(
                "intake",
                f"{name} req/s, closed loop ({intake.rounds_text(s['rounds'], options.rounds)})",
                f"{s['rps_median']:,.0f} ({s['rps_min']:,.0f}–{s['rps_max']:,.0f})",
            )
        )
    verdicts = data["verdicts"]
    for name, r in data["ratios"].items():
        key, least = intake.RATIO_TARGETS.get(name, ("", 0.0))
        v = verdicts.get(key)
        rows.append(
            Row(
                "intake",
                f"{name} / bare (median of"
                f" {intake.rounds_text(len(r['per_round']), options.rounds)})",
                f"{intake.ratio_text(r['median'], least if v else None)}"
                f" ({r['min']:.2f}–{r['max']:.2f})",
                f"≥ {least:.2f}" if v else "",
                _verdict_of(v),
            )
        )
    targets = {t.name for t in options.targets}
    for name, (key, least) in intake.RATIO_TARGETS.items():
        if name in targets and key not in verdicts:  # it, or bare, failed in every round
            rows.append(Row("intake", f"{name} / bare", "not measured", f"≥ {least:.2f}", "FAILED"))
    for run in report.rate:
        load = run.load
        # Only webhookd's own row is judged; the minimal server's rows are there to compare.
        is_target = load.target_rps == intake.LATENCY_RATE and run.target == WEBHOOKD.name
        v = verdicts.get("ack_p99_at_1000") if is_target else None
        rows.append(
            Row(
                "intake",
                f"{run.target} ack p50 / p99 at {load.target_rps or 0:,.0f}/s",
                f"{load.p50_ms:.2f} / {load.p99_ms:.2f} ms",
                f"p99 ≤ {intake.LATENCY_P99_TARGET_MS:g} ms" if v else "",
                _verdict_of(v),
            )
        )
    if (
        WEBHOOKD.name in targets
        and intake.LATENCY_RATE in options.rates
        and "ack_p99_at_1000" not in verdicts
    ):
        rows.append(
            Row(
                "intake",
                f"{WEBHOOKD.name} ack p50 / p99 at {intake.LATENCY_RATE:,.0f}/s",
                "not measured",
                f"p99 ≤ {intake.LATENCY_P99_TARGET_MS:g} ms",
                "FAILED",
            )
        )
    for name, why in report.failures.items():  # the why is in the notes
        rows.append(
            Row("intake", f"{name} failed", (why.splitlines() or ["?"])[0][:60], "", "FAILED")
        )
    notes = [f"intake: {n.lstrip('!* ')}" for n in intake._notes(report, data)]
    notes.insert(0, f"intake: closed-loop generator {report.generator}; {_pinning(report.cpus)}")
    if quick:
        notes.append(
            f"intake: --quick: {options.rounds} rounds × {options.duration_s:g} s, fixed rates"
            f" {options.rate_duration_s:g} s each; the verdicts are indicative, not a measurement"
        )
    return Outcome("intake", data, rows, notes)


def _verdict_of(v: dict[str, Any] | None) -> str:
    if v is None:
        return ""
    if not v["complete"]:  # judged on the rounds that were measured, it would stand on a part
        return "FAILED"
    return verdict(bool(v["pass"])) + ("" if v["conclusive"] else "*")


def _pinning(cpus: tuple[int | None, int | None]) -> str:
    if cpus[0] is None:
        return "not pinned"
    return f"server on CPU {cpus[0]}, generator on CPU {cpus[1]}"


def run_module(name: str) -> Runner:
    """A runner for a scenario module with ``measure``, ``rows`` and ``notes``."""

    def runner(quick: bool) -> Outcome:
        module = importlib.import_module(f"bench.{name}")
        result = module.measure(quick, None)
        return Outcome(name, result, module.rows(result), module.notes(result))

    return runner


def run_backlog(quick: bool) -> Outcome:
    """The backlog scenario, in a child process, since it measures its own peak RSS."""
    events, drain = BACKLOG_SIZES[quick]
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.backlog", "--json"),
            *("--events", str(events), "--drain", str(drain)),
        ],
        capture_output=True,
        text=True,
        timeout=BACKLOG_TIMEOUT_S[quick],
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"bench.backlog exited {done.returncode}: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    rss = float(result["peak_rss_mb"])
    target = float(result.get("target_rss_mb", RSS_TARGET_MB))
    rows = [
        Row(
            "backlog",
            f"peak RSS, {events:,} queued, {drain:,} drained",
            f"{rss:.0f} MB",
            f"≤ {target:.0f} MB",
            verdict(rss <= target),
        )
    ]
    if "jobs_per_s" in result:
        rows.append(Row("backlog", "drain rate", f"{float(result['jobs_per_s']):,.0f} jobs/s"))
    notes = []
    if quick:
        notes.append(f"backlog: {events:,} events queued (--quick), not 1,000,000")
    return Outcome("backlog", result, rows, notes)


RUNNERS: dict[str, Runner] = {
    "intake": run_intake,
    "journal": run_module("journal"),
    "dispatch": run_module("dispatch"),
    "e2e": run_module("e2e"),
    "peers": run_module("peers"),
    "burst": run_module("burst"),
    "lanes": run_module("lanes"),
    "lanes2": run_module("lanes2"),
    "fairness": run_module("fairness"),
    "backlog": run_backlog,
}


def run_all(names: Sequence[str], quick: bool) -> list[Outcome]:
    outcomes = []
    for name in names:
        print(f"[{name}] …", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            outcome = RUNNERS[name](quick)
        except Exception as exc:  # one scenario failing must not lose the others' numbers
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            outcome = Outcome(
                name,
                rows=[Row(name, "FAILED", first[:60], "", "FAILED")],
                notes=[f"{name}: failed: {first}"],
                error=traceback.format_exc(),
            )
        outcome.elapsed_s = time.monotonic() - started
        print(f"[{name}] {outcome.elapsed_s:.0f} s", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench all",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="every scenario, smaller: < 3 min")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--json", metavar="PATH", default=str(RESULTS / "latest.json"))
    parser.add_argument("--chart", metavar="PATH", default=str(RESULTS / "latest.png"))
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(ORDER)
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {list(ORDER)}")

    started = time.monotonic()
    meter = CpuMeter()
    machine = describe(tempfile.gettempdir())
    outcomes = run_all(names, args.quick)
    use = meter.read()
    elapsed = time.monotonic() - started

    rows = [r for o in outcomes for r in o.rows]
    notes = [n for o in outcomes for n in o.notes]
    steal = f"{use.steal_pct:.1f} %" if use is not None else "?"
    print(
        f"webhookd benchmarks{' (--quick)' if args.quick else ''}: {elapsed:.0f} s\n"
        f"machine  {machine.summary()}\n"
        f"         CPU steal during the run {steal}\n"
    )
    print(render(rows, notes))
    doc = {
        "quick": args.quick,
        "machine": machine.to_json(),
        "steal_pct": use.steal_pct if use is not None else None,
        "elapsed_s": elapsed,
        "rows": [r.to_json() for r in rows],
        "scenarios": {o.name: o.to_json() for o in outcomes},
    }
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nJSON: {json_path}")
    try:
        from bench.chart import draw
    except ImportError:
        print("chart: skipped (matplotlib is not installed: pip install -e '.[bench]')")
    else:
        chart_path = Path(args.chart)
        chart_path.parent.mkdir(parents=True, exist_ok=True)
        draw(doc, chart_path)
        print(f"chart: {chart_path}")
    # A scenario that raised, or one that caught a failure into a FAILED row.
    return 1 if any(o.error for o in outcomes) or any(r.verdict == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
