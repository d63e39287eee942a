"""A wall clock that is not set, or steps while the daemon runs: told, and queued jobs' waits
kept as planned."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, Target, make_config
from ops_support import accepted, forward_source
from procs import poll

from webhookd.app import Daemon
from webhookd.clock import STEP_S, ManualClock, StepWatch, unset_clock


class SteppedClock:
    """The system's clocks, with the wall one stepped by hand (``offset_s``), as NTP or
    ``date -s`` steps it."""

    def __init__(self, offset_s: float = 0.0) -> None:
        self.offset_s = offset_s

    def time(self) -> float:
        return time.time() + self.offset_s

    def monotonic(self) -> float:
        return time.monotonic()


async def retry_recorded(running: Running, event_id: str) -> None:
    """Until the event's job waits out its backoff after a first attempt that failed."""

    async def recorded() -> bool:
        async with running.http.get(f"{running.admin_url}/events/{event_id}") as r:
            job = (await r.json())["jobs"][0]
        return bool(job["state"] == "queued" and job["attempts"] == 1)

    await poll(recorded, timeout_s=10)


def test_a_step_watch_tells_steps_and_not_the_monotonic_clock_going_on() -> None:
    clock = ManualClock()
    watch = StepWatch(clock)
    clock.advance(600)  # both clocks: time passing, no step
    assert watch.step() == 0.0
    clock.step_wall(-3600)
    assert watch.step() == -3600.0
    assert watch.step() == 0.0  # told once
    clock.step_wall(STEP_S / 2)  # under the threshold: what NTP slews, not a step
    assert watch.step() == 0.0
    clock.step_wall(86400)
    assert watch.step() == 86400.0


def test_a_clock_before_2023_is_not_set() -> None:
    assert unset_clock(time.time()) is None
    said = unset_clock(12.0)
    assert said is not None and said.startswith("the system clock reads 1970-01-01T00:00:12Z")


async def test_serve_refuses_to_start_on_a_clock_not_set(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A machine that booted at 1970 and has not synced yet: exit 1 (a supervisor starts it
    again), before the journal is opened, so no event is stamped 1970."""
    cfg = make_config(tmp_path)
    daemon = Daemon(cfg, install_signals=False, clock=ManualClock(start=5.0))
    with caplog.at_level(logging.ERROR, logger="webhookd"):
        assert await daemon.run() == 1
    assert "fatal: the system clock reads 1970-01-01T00:00:05Z, before 2023" in caplog.text
    assert not (tmp_path / "webhookd.db").exists()


async def test_a_step_back_while_serving_leaves_a_retrys_wait_as_planned(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The clock stepped back an hour while a job waits out a 1-2 s backoff: the job runs
    seconds later, not an hour and seconds."""
    clock = SteppedClock()
    source = forward_source("shop", target.url + "/in", max_attempts=2, base_s=2.0)
    running = await run_daemon(make_config(tmp_path, source), clock=clock)
    target.statuses = [500]
    with caplog.at_level(logging.WARNING, logger="webhookd"):
        await retry_recorded(running, await accepted(running, "shop", '{"n": 1}'))
        clock.offset_s = -3600
        await target.wait_for(lambda t: len(t.seen) == 2, timeout_s=15)
    assert "the wall clock stepped back 3600 s (set by hand or NTP): the 1 queued job(s) were" in (
        caplog.text
    )


async def test_a_start_behind_the_journal_says_so_and_brings_in_jobs_planned_too_far_once(
    tmp_path: Path, target: Target, run_daemon: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon ran a month ahead, then starts on the right clock: it says the journal is
    ahead, and a retry planned a month out is made due within the longest wait webhookd plans
    (an hour here). Once: a second start moves nothing (moving jobs by the difference at every
    start ran each retry at once after a few restarts)."""
    source = forward_source("shop", target.url + "/in", max_attempts=2, base_s=6.0)
    cfg = make_config(tmp_path, source)
    month = 30 * 86400.0
    ahead = await run_daemon(cfg, clock=SteppedClock(month))
    target.statuses = [500]
    event_id = await accepted(ahead, "shop", '{"n": 1}')
    await retry_recorded(ahead, event_id)
    await ahead.stop()

    async def run_at_after_a_start() -> float:
        running = await run_daemon(cfg, clock=SteppedClock())
        async with running.http.get(f"{running.admin_url}/events/{event_id}") as r:
            job = (await r.json())["jobs"][0]
        await running.stop()
        assert job["state"] == "queued"
        return float(job["run_at"])

    with caplog.at_level(logging.WARNING, logger="webhookd"):
        first = await run_at_after_a_start()
    assert first <= time.time() + cfg.longest_wait_s()
    assert "the wall clock is 25920" in caplog.text and "behind the newest event" in caplog.text
    assert "1 queued job(s) were due more than 3600 s ahead" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="webhookd"):
        assert await run_at_after_a_start() == first
    assert "were due more than" not in caplog.text
    assert len(target.seen) == 1
