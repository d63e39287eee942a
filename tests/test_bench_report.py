"""What the benchmark reports: a verdict the figure does not contradict, measured on what it
says it measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import bisect, intake, machine, peers, servers, suite
from bench.intake import ratio_text
from bench.loadgen import LoadResult
from bench.machine import OtherProcesses


@pytest.mark.parametrize(
    ("value", "target", "printed"),
    [
        (0.49877, 0.50, "0.499"),  # run 23's job ratio, a MISS that two decimals showed as 0.50
        (0.5962, 0.60, "0.596"),
        (0.6001, 0.60, "0.60"),
        (0.5597, 0.60, "0.56"),
        (0.49877, None, "0.50"),  # no target: two decimals
        (0.995, 1.0, "0.99"),  # rounded down by float formatting: already on its side
    ],
)
def test_a_ratio_beside_its_target_is_never_rounded_onto_the_other_side(
    value: float, target: float | None, printed: str
) -> None:
    assert ratio_text(value, target) == printed


def test_other_processes_are_those_outside_the_benchmarks_tree_and_what_it_names() -> None:
    """What the busy notes count: CPU of processes that are neither the benchmark, what it
    started (a server, its generator, their children), nor what it names (a daemonized
    postmaster and its backends); a process new in the window counts whole. A stranger's
    children that ended are in its reaped children's time: only its growth in the window counts,
    less what one seen at the start had used before. Kernel threads are never in the table
    (``_user_processes`` leaves them out)."""
    # pid -> (parent pid, CPU seconds so far, reaped children's CPU seconds); 100 is the bench.
    start = {
        1: (0, 50.0, 200.0),
        100: (1, 3.0, 1.0),
        101: (100, 1.0, 0.0),
        103: (100, 0.4, 0.0),
        500: (1, 2.0, 0.0),
        900: (1, 7.0, 100.0),
        902: (900, 1.5, 0.5),
    }
    end = {
        1: (0, 50.1, 200.0),  # init, a stranger: +0.1
        100: (1, 4.0, 5.0),  # the benchmark, +1.0, and what it reaped (103): ours
        101: (100, 3.0, 0.0),  # the server it started: +2.0, ours
        102: (101, 0.5, 0.0),  # a command the server ran, new: ours
        500: (1, 2.5, 0.0),  # the postmaster it names: +0.5, ours
        501: (500, 0.7, 0.0),  # a backend of it, new: ours
        # Another tenant's shell: +0.2 of its own; its reaped children's time grew by 2.4: 902
        # ended (1.7 + 0.5 in all, 2.0 of it before the window) and others came and went (0.2).
        900: (1, 7.2, 102.4),
        901: (1, 0.2, 0.3),  # and one that started meanwhile: +0.5
    }
    tables = iter([start, end])
    times = iter([10.0, 12.0])
    others = OtherProcesses(
        also=lambda: (500,), root=100, read=lambda: next(tables), clock=lambda: next(times)
    )
    assert others.pct() == pytest.approx(100 * (0.1 + 0.2 + (2.4 - 2.0) + 0.5) / 2.0)


def _reaped_s(pid: int) -> float:
    """CPU seconds of the children `pid` has waited for (stat(5) cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def test_a_neighbour_of_short_lived_processes_is_counted_as_other() -> None:
    """A test suite or a build is a stream of processes each gone in a fraction of a second:
    none was in both readings, so none was counted, and a machine busy with one read as idle.
    Here a shell outside the benchmark's process tree runs one short CPU-bound shell after
    another; what it is charged is compared with what its reaped children used meanwhile."""
    loop = "while :; do sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done'; done"
    started = subprocess.run(
        ["sh", "-c", f'setsid sh -c "{loop}" </dev/null >/dev/null 2>&1 & echo $!'],
        capture_output=True,
        text=True,
        check=True,
    )
    neighbour = int(started.stdout)
    try:
        start = machine._user_processes()
        reaped_before = _reaped_s(neighbour)
        deadline = time.monotonic() + 30
        while _reaped_s(neighbour) - reaped_before < 0.5 and time.monotonic() < deadline:
            time.sleep(0.05)  # the neighbour runs on its own: nothing to wait on but its figures
        reaped = _reaped_s(neighbour) - reaped_before
        end = machine._user_processes()
    finally:
        os.killpg(neighbour, signal.SIGTERM)
    assert neighbour not in machine._tree(start, [os.getpid()])  # a stranger's

    def other_s(also: Callable[[], tuple[int, ...]]) -> float:
        tables, times = iter([start, end]), iter([0.0, 1.0])
        found = OtherProcesses(also, read=lambda: next(tables), clock=lambda: next(times)).pct()
        assert found is not None
        return found / 100  # CPU seconds over a window of one second

    charged = other_s(tuple) - other_s(lambda: (neighbour,))
    assert reaped >= 0.5
    assert charged >= 0.9 * reaped, f"charged {charged:.2f} s of the {reaped:.2f} s it used"


@pytest.mark.parametrize("step", range(len(bisect._sql_steps())))
def test_every_step_of_the_bisect_sql_table_opens_and_takes_rows(tmp_path: Path, step: int) -> None:
    """Each schema of ``python -m bench.bisect``'s SQL table (and of ``--only latency``'s
    ``rows:K`` servers) is created whole, the journal's triggers included, and takes a batch."""
    name, schema, write = bisect._sql_steps()[step]
    conn = bisect._open_rows(tmp_path / "j.db", schema)
    conn.execute("BEGIN IMMEDIATE")
    write(conn, [bisect._body(n) for n in range(bisect.BATCH)], time.time())
    conn.execute("COMMIT")
    table = "journal" if step == 0 else "events"
    assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == bisect.BATCH, name
    if "CREATE TRIGGER" in schema:
        triggers = conn.execute("SELECT COUNT(*) FROM sqlite_schema WHERE type = 'trigger'")
        assert triggers.fetchone()[0] == schema.count("CREATE TRIGGER"), name
    conn.close()


def _suite(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """``python -m bench all`` with ``args``; its exit status and JSON document."""
    out = tmp_path / "suite.json"
    status = suite.main([*args, "--json", str(out), "--chart", str(tmp_path / "suite.png")])
    return status, json.loads(out.read_text())


def _failed(doc: dict[str, Any]) -> set[str]:
    return {row["metric"] for row in doc["rows"] if row["verdict"] == "FAILED"}


def test_a_webhookd_that_does_not_start_is_a_failed_row_and_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """README: a scenario that fails (a daemon that does not start) becomes a FAILED line and
    the exit status is then 1. The intake scenario caught webhookd's failure to start, printed
    nothing where its verdicts would have been, and the suite exited 0."""
    monkeypatch.setattr(
        servers, "webhookd_command", lambda: [sys.executable, "-c", "import sys; sys.exit(3)"]
    )
    real_run = intake.run
    short = {"rounds": 1, "duration_s": 0.5, "warmup_s": 0.0, "rate_duration_s": 0.5}
    monkeypatch.setattr(
        intake, "run", lambda options: real_run(replace(options, **short), progress=False)
    )
    status, doc = _suite(tmp_path, "--only", "intake", "--quick")
    assert _failed(doc) == {
        "webhookd / bare",
        "webhookd ack p50 / p99 at 1,000/s",
        "webhookd failed",
    }
    assert doc["scenarios"]["intake"]["result"]["summary"]["bare"]["rounds"] == 1  # bare ran
    assert status == 1


def test_a_failed_peers_row_makes_the_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """webhookd+job failed in its first round of peers' intake: the ratios' rows say FAILED, and
    the suite exited 0 all the same."""
    result: dict[str, Any] = {
        "quick": False,
        "unavailable": {},
        "generator": "wrk",
        "cpus": {"systems": 1, "generator": 0},
        "intake": {
            "rounds": 5,
            "duration_s": 10.0,
            "failures": {"webhookd+job": "webhookd+job exited with 3"},
            "runs": [{"system": "celery", "round": 1, "rps": 1600.0, "p99_ms": 5.0}],
        },
        "e2e": {"reps": 0, "n": 20_000, "failures": {}, "runs": []},
    }
    result["summary"] = peers.summarise(result)
    monkeypatch.setattr(peers, "measure", lambda quick, size: result)
    status, doc = _suite(tmp_path, "--only", "peers")
    assert "intake with a job: webhookd / celery" in _failed(doc)
    assert status == 1


def test_a_webhookd_that_dies_after_its_first_round_is_not_judged_on_that_round(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """webhookd served round 1, then failed to start in round 2 and was dropped: the ratio was
    judged on round 1 alone (a PASS on a fraction of the measurement), under a label that gave
    the rounds asked for, not those measured."""
    real_command = servers.webhookd_command
    starts = iter([real_command()])
    exits_3 = [sys.executable, "-c", "import sys; sys.exit(3)"]
    monkeypatch.setattr(servers, "webhookd_command", lambda: next(starts, exits_3))
    real_run = intake.run
    short = {"rounds": 2, "duration_s": 0.5, "warmup_s": 0.0, "rates": ()}
    monkeypatch.setattr(
        intake, "run", lambda options: real_run(replace(options, **short), progress=False)
    )
    status, doc = _suite(tmp_path, "--only", "intake", "--quick")
    rows = {row["metric"]: row for row in doc["rows"]}
    assert rows["webhookd req/s, closed loop (1 of 2 rounds)"]["verdict"] == ""
    assert rows["bare req/s, closed loop (2 rounds)"]["verdict"] == ""
    assert rows["webhookd / bare (median of 1 of 2 rounds)"]["verdict"] == "FAILED"
    verdict = doc["scenarios"]["intake"]["result"]["verdicts"]["intake_ratio"]
    assert (verdict["rounds"], verdict["complete"], verdict["pass"]) == (1, False, False)
    assert status == 1


def _load(rps: float) -> LoadResult:
    requests = int(rps * 10)
    return LoadResult("wrk", "closed", 10.0, requests, 0, {"202": requests}, rps, 1, 5, 9, 20, 50)


def test_quick_verdicts_are_judged_on_its_rounds_and_said_to_be_indicative(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--quick runs 3 short rounds: every one of them measured is a complete measurement of its
    kind, judged, with a note that it is indicative."""

    def run(options: intake.Options) -> intake.Report:
        report = intake.Report(options=options, machine={}, cpus=(1, 0), generator="wrk")
        for n in range(1, options.rounds + 1):
            report.closed.append(intake.Run("bare", n, _load(25_000), 100, 0))
            report.closed.append(intake.Run("webhookd", n, _load(16_000), 100, 0))
        return report

    monkeypatch.setattr(intake, "run", run)
    outcome = suite.run_intake(True)
    rows = {row.metric: row for row in outcome.rows}
    assert rows["webhookd / bare (median of 3 rounds)"].verdict == "PASS"
    assert any("--quick" in n and "indicative" in n for n in outcome.notes), outcome.notes


def _e2e(system: str, rep: int, jobs_per_s: float | None) -> dict[str, Any]:
    return {
        "system": system,
        "rep": rep,
        "n": 20_000,
        "acked": 20_000,
        "failures": 0,
        "intake_s": 5.0,
        "seconds": 20_000 / jobs_per_s if jobs_per_s else None,
        "jobs_per_s": jobs_per_s,
    }


def test_peers_verdicts_stand_only_on_every_round_and_rep_of_both_systems() -> None:
    """webhookd+job died after round 1 of 5; webhookd's async handler finished rep 1 of 3 and
    then never again, its sync handler failed: both ratios were judged PASS on what was left."""
    result: dict[str, Any] = {
        "quick": False,
        "unavailable": {},
        "generator": "wrk",
        "cpus": {"systems": 1, "generator": 0},
        "intake": {
            "rounds": 5,
            "duration_s": 10.0,
            "failures": {"webhookd+job": "webhookd+job died during the run"},
            "runs": [{"system": "webhookd+job", "round": 1, "rps": 12_000.0, "p99_ms": 5.0}]
            + [{"system": "celery", "round": n, "rps": 1_600.0, "p99_ms": 5.0} for n in range(1, 6)]
            + [{"system": "arq", "round": n, "rps": 2_400.0, "p99_ms": 5.0} for n in range(1, 6)],
        },
        "e2e": {
            "reps": 3,
            "n": 20_000,
            "failures": {"webhookd sync": "19990 of 20000 jobs done once the backlog was empty"},
            "runs": [
                _e2e("webhookd async", 1, 4_500.0),
                _e2e("webhookd async", 2, None),
                _e2e("webhookd async", 3, None),
                *(_e2e("celery", n, 700.0) for n in (1, 2, 3)),
            ],
        },
    }
    result["summary"] = peers.summarise(result)
    rows = {row.metric: row for row in peers.rows(result)}
    assert (
        rows["intake with a job: webhookd / celery (median of 1 of 5 rounds)"].verdict == "FAILED"
    )
    assert rows["intake with a job: webhookd / arq (median of 1 of 5 rounds)"].verdict == "FAILED"
    assert rows["intake req/s: webhookd, one job each (paused) (1 of 5 rounds)"].verdict == ""
    best = rows["e2e: webhookd (faster handler) / celery (median of 1 of 3 reps)"]
    assert (best.value, best.verdict) == ("6.4× (6.4–6.4)", "FAILED")


def test_the_intake_estimate_counts_the_fixed_rates_of_each_server_that_runs_them() -> None:
    """webhookd and the minimal server each run the fixed rates, and the banner's upper bound
    counted them once: 95 s short of a full run's."""
    one = intake.Options(rounds=1, targets=(servers.WEBHOOKD,), rates=(500.0, 1000.0))
    both = replace(one, targets=(servers.WEBHOOKD, servers.MINIMAL))
    assert both.estimate_s() == pytest.approx(2 * one.estimate_s())
    # Without either, the first target runs them.
    assert replace(one, targets=(servers.BARE,)).estimate_s() == pytest.approx(one.estimate_s())
