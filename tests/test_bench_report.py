"""What the benchmark reports: a verdict the figure does not contradict, measured on what it
says it measured."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import bisect, intake, peers, servers, suite
from bench.intake import ratio_text
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
    postmaster and its backends); a process new in the window counts whole. Kernel threads are
    never in the table (``_user_processes`` leaves them out)."""
    # pid -> (parent pid, CPU seconds so far); 100 is the benchmark.
    start = {1: (0, 50.0), 100: (1, 3.0), 101: (100, 1.0), 500: (1, 2.0), 900: (1, 7.0)}
    end = {
        1: (0, 50.1),  # init, a stranger: +0.1
        100: (1, 4.0),  # the benchmark: +1.0, ours
        101: (100, 3.0),  # the server it started: +2.0, ours
        102: (101, 0.5),  # a command the server ran, new: ours
        500: (1, 2.5),  # the postmaster it names: +0.5, ours
        501: (500, 0.7),  # a backend of it, new: ours
        900: (1, 7.2),  # another tenant's process: +0.2
        901: (1, 0.2),  # and one that started meanwhile: +0.2
    }
    tables = iter([start, end])
    times = iter([10.0, 12.0])
    others = OtherProcesses(
        also=lambda: (500,), root=100, read=lambda: next(tables), clock=lambda: next(times)
    )
    assert others.pct() == pytest.approx(100 * (0.1 + 0.2 + 0.2) / 2.0)


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
