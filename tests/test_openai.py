"""The ``openai`` action with the real ``openai`` client against an OpenAI-compatible stand-in.

Lanes, the stand-in and the worker pool share one ``ManualClock``: a lane's nap advances it only
after every request it admitted has reached the stand-in, so minutes of rate limiting run in
about a second and the stand-in's sliding windows see the same times the lane acted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import tracemalloc
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from actionkit import ActionKit, action_kit
from conftest import Running, Target, make_config
from openai_standin import StandIn
from procs import poll
from standardwebhooks.webhooks import Webhook

from webhookd.actions import openai as openai_action
from webhookd.actions import openai_config
from webhookd.actions.openai import estimate_tokens
from webhookd.actions.openai_config import Settings
from webhookd.clock import ManualClock
from webhookd.config import loads
from webhookd.errors import ConfigError
from webhookd.journal import Replayed
from webhookd.limiter import Lane
from webhookd.models import JobState

KEY = "OPENAI_TEST_KEY"
SIGNING_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TEXT = "I ordered a blue kettle two weeks ago and it has still not arrived. " * 5  # 345 chars


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY, "sk-standin")


@pytest.fixture
async def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def standin(clock: ManualClock) -> AsyncIterator[StandIn]:
    s = await StandIn(clock=clock, completion_tokens=150).start()
    try:
        yield s
    finally:
        await s.aclose()


def source(
    standin: StandIn,
    *,
    lane: str | None = "llm",
    extra: str = "",
    model: str = "gpt-4o-mini",
    limit: str = "max_tokens = 200",
    prompt: str = "Reply to {{ subject }}: {{ text }}",
) -> str:
    return f"""
[sources.mail]
[[sources.mail.actions]]
type = "openai"
api_key = "env:{KEY}"
base_url = "{standin.base_url}"
model = "{model}"
system = "You draft replies for a support team."
prompt = "{prompt}"
{limit}
{f'lane = "{lane}"' if lane else ""}
{extra}
"""


def lanes_settled(standin: StandIn) -> Any:
    async def settle(lanes: Mapping[str, Lane]) -> None:
        await standin.wait_received(sum(la.statistics().admitted_total for la in lanes.values()))

    return settle


async def burst(kit: ActionKit, count: int) -> list[str]:
    return [await kit.send("mail", {"subject": f"order {i}", "text": TEXT}) for i in range(count)]


async def test_answer_is_stored_with_text_model_usage_and_finish_reason(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A done job's result is the model's answer; the prompt template saw the JSON payload."""
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Where is it?", "text": "Order 7"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.state == JobState.DONE
    assert job.result == {
        "text": "Draft: Reply to Where is it?: Order 7",
        "model": "gpt-4o-mini",
        "usage": {"prompt_tokens": 24, "completion_tokens": 150, "total_tokens": 174},
        "finish_reason": "stop",
    }


async def test_a_prompt_of_the_whole_payload_asks_about_the_whole_webhook(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """``{{ . }}`` puts the whole JSON body in the prompt (the stand-in answers its start)."""
    config = source(standin, lane=None, prompt="Sum: {{ . }}")
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", {"id": 7, "tags": ["a"]})
        await kit.run()
        job = await kit.job(event_id)
    assert job.result["text"] == 'Draft: Sum: {"id":7,"tags":["a"]}'


async def test_a_prompt_whose_lookups_all_miss_is_warned_of_once(
    tmp_path: Path, standin: StandIn, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Two webhooks for which every prompt lookup finds nothing: one warning, naming the source,
    action, option and lookups, with a hint at {{ . }}. A prompt whose lookups are found: none."""
    missing = source(standin, lane=None, prompt="Summarize this webhook: {{ body }}")
    found = source(standin, lane=None)
    caplog.set_level(logging.WARNING, logger="webhookd.actions.openai")
    for i, config in enumerate((missing, found)):
        async with action_kit(tmp_path / f"run{i}", config, clock=clock) as kit:
            for subject in ("Refund", "Late"):
                await kit.send("mail", {"subject": subject, "text": "please"})
            await kit.run_all()
    assert [r.getMessage() for r in caplog.records if r.name == "webhookd.actions.openai"] == [
        "source=mail action=openai option=prompt rendered with every lookup missing"
        " ({{ body }}): the model is asked its literal text alone. The payload is the body"
        " parsed as JSON (a form's fields for a form), and {{ . }} is the whole of it. Said"
        " once for the action"
    ]
    assert len(standin.served) == 4


async def test_lane_reserves_then_settles_to_usage_and_heeds_remaining_headers(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """The lane is charged the usage the server reported and lowered to its remaining tokens."""
    standin.tpm = 1_000
    extra = "[lanes.llm]\ntpm = 100_000\n"  # a 5 000-token burst: only the header can lower it
    async with action_kit(tmp_path, source(standin) + extra, clock=clock) as kit:
        await kit.send("mail", {"subject": "hi", "text": "short"})
        await kit.run()
        stats = kit.lanes["llm"].statistics()
    (served,) = standin.served
    assert stats.tokens_debited_total == served.tokens
    assert stats.tokens_available is not None
    assert stats.tokens_available <= 1_000 - served.tokens


async def test_an_attempt_keeps_when_its_call_left_the_lane_and_what_the_lane_counts(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """Each attempt that called through a lane keeps, for the next start's lane, the seconds
    from its start to the call (``lane_call_s``) and the tokens the lane counts for it
    (``lane_tokens``): the usage once answered, else the reservation (a 503's)."""
    standin.statuses = [503]
    extra = "[lanes.llm]\ntpm = 100_000\n"
    async with action_kit(tmp_path, source(standin) + extra, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "hi", "text": "short"})
        await kit.run_all()
        job = await kit.job(event_id)
        stats = kit.lanes["llm"].statistics()
    failed, answered = (attempt.detail or {} for attempt in job.history)
    (served,) = standin.served
    assert (failed["status"], answered["lane_tokens"]) == (503, served.tokens)
    assert failed["lane_tokens"] == stats.tokens_debited_total - served.tokens  # the reservation
    assert 0 <= failed["lane_call_s"] < 1.0 and 0 <= answered["lane_call_s"] < 1.0


@pytest.mark.parametrize("remaining", ["inf", "nan", "1e999", "-Infinity"])
async def test_a_remaining_header_that_is_no_count_is_ignored_and_the_answer_kept(
    tmp_path: Path, standin: StandIn, clock: ManualClock, remaining: str
) -> None:
    """``x-ratelimit-remaining-tokens: inf`` after an answer raised OverflowError: the paid
    answer became a retry, and the model was asked again. Such a value is not heeded."""
    standin.tpm = 100_000
    standin.answer_headers = {"x-ratelimit-remaining-tokens": remaining}
    extra = "[lanes.llm]\ntpm = 10_000\n"
    async with action_kit(tmp_path, source(standin) + extra, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "hi", "text": "short"})
        await kit.run()
        job = await kit.job(event_id)
        stats = kit.lanes["llm"].statistics()
    assert (job.state, job.attempts, len(standin.served)) == (JobState.DONE, 1, 1)
    assert stats.tokens_available is not None and stats.tokens_available > 0


@pytest.mark.parametrize(
    ("upstream", "lane", "binding"),
    [
        ({"rpm": 60, "tpm": 10_000_000}, "rpm = 54", "requests"),
        ({"rpm": 100_000, "tpm": 12_000}, "tpm = 10_800", "tokens"),
    ],
)
async def test_burst_under_a_lane_below_the_limits_gets_no_429_and_uses_90_percent(
    tmp_path: Path,
    standin: StandIn,
    clock: ManualClock,
    upstream: dict[str, int],
    lane: str,
    binding: str,
) -> None:
    """100 jobs at once: no 429, all done on their first attempt, ≥ 90 % of the lane used."""
    standin.rpm, standin.tpm = upstream["rpm"], upstream["tpm"]
    extra = f"max_lane_wait_s = 30\n[lanes.llm]\n{lane}\n"
    async with action_kit(
        tmp_path,
        source(standin, extra=extra),
        clock=clock,
        settle_before_nap=lanes_settled(standin),
    ) as kit:
        ids = await burst(kit, 100)
        await kit.run_all()
        jobs = [await kit.job(i) for i in ids]
        limit = kit.cfg.lanes["llm"]
    assert standin.rate_limited == 0
    assert all(j.state == JobState.DONE and len(j.history) == 1 for j in jobs)
    served = standin.served
    span_s = served[-1].at - served[0].at
    if binding == "requests":
        assert limit.rpm is not None
        used = (len(served) - 1) / span_s * 60 / limit.rpm
    else:
        assert limit.tpm is not None
        used = sum(c.tokens for c in served[:-1]) / span_s * 60 / limit.tpm
    assert 0.9 <= used <= 1.1, used


async def test_burst_under_a_lane_above_the_limits_waits_out_429s_without_using_attempts(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """429s cool the lane and reschedule jobs without an attempt; every job still completes."""
    standin.rpm = 30
    extra = "[lanes.llm]\nrpm = 120\n"
    async with action_kit(
        tmp_path, source(standin) + extra, clock=clock, settle_before_nap=lanes_settled(standin)
    ) as kit:
        ids = await burst(kit, 40)
        await kit.run_all()
        jobs = [await kit.job(i) for i in ids]
        stats = kit.lanes["llm"].statistics()
    assert standin.rate_limited > 0
    assert stats.busy_total > 0  # jobs found the lane cooling and left it
    assert all(j.state == JobState.DONE for j in jobs)
    assert all(j.attempts == 1 and len(j.history) == 1 for j in jobs)
    assert len(standin.served) == 40


async def test_rate_limit_429_cools_the_lane_for_retry_after_and_keeps_the_attempt(
    tmp_path: Path, standin: StandIn, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 rate_limit_exceeded: the lane cools for Retry-After, the job waits, no attempt used;
    the 429 is logged as a warning."""
    caplog.set_level(logging.INFO, logger="webhookd")
    standin.rpm = 2
    extra = "[lanes.llm]\nrpm = 1000\n"
    async with action_kit(tmp_path, source(standin) + extra, clock=clock, concurrency=1) as kit:
        ids = await burst(kit, 3)
        start = kit.clock.time()
        await kit.run()
        cooling_s = kit.lanes["llm"].statistics().cooling_until_s
        waiting = await kit.job(ids[2])
        await kit.run_all()
        done = await kit.job(ids[2])
    assert standin.rate_limited == 1
    assert cooling_s == pytest.approx(60)
    assert (waiting.state, waiting.attempts, waiting.history) == (JobState.QUEUED, 0, ())
    # Said once (the port in the URL may hold "429" too: counted after it).
    assert waiting.last_error is not None and waiting.last_error.count(" 429 ") == 1
    assert waiting.last_error.startswith(
        f"{standin.base_url}/chat/completions answered 429 rate_limit_exceeded: Rate limit reached"
    )
    assert waiting.run_at == pytest.approx(start + 60, abs=1)
    assert (done.state, done.attempts) == (JobState.DONE, 1)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("outcome=wait" in r.getMessage() and "429" in r.getMessage() for r in warned)


async def test_a_429_without_retry_after_cools_the_lane_for_the_wait_its_message_names(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A 429 with no Retry-After nor reset header ("Please try again in 59.9s." alone): the lane
    cools for that wait, not for a default of a few seconds that would send a call the provider
    refuses again and again until then."""
    standin.rpm = 2
    standin.limited_headers = {
        "retry-after": None,
        "x-ratelimit-reset-requests": None,
        "x-ratelimit-reset-tokens": None,
    }
    extra = "[lanes.llm]\nrpm = 1000\n"
    async with action_kit(tmp_path, source(standin) + extra, clock=clock, concurrency=1) as kit:
        ids = await burst(kit, 3)
        start = kit.clock.time()
        await kit.run()
        cooling_s = kit.lanes["llm"].statistics().cooling_until_s
        waiting = await kit.job(ids[2])
        await kit.run_all()
        done = await kit.job(ids[2])
    assert standin.rate_limited == 1
    assert cooling_s == pytest.approx(60, abs=1)
    assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0)
    assert waiting.run_at == pytest.approx(start + 60, abs=1)
    assert (done.state, done.attempts) == (JobState.DONE, 1)


async def test_a_429_for_spent_requests_cools_the_lane_for_their_reset_not_the_tokens(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A 429 with no Retry-After whose requests are spent (remaining 0, reset in 2s) while its
    tokens have room: the lane cools for the requests' reset, not for the 90 s until the
    tokens' limit is whole again, which held back every call of the lane for nothing."""
    standin.rpm = 2
    standin.limited_headers = {
        "retry-after": None,
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-remaining-tokens": "150000",
        "x-ratelimit-reset-tokens": "1m30s",
    }
    extra = "[lanes.llm]\nrpm = 1000\n"
    async with action_kit(tmp_path, source(standin) + extra, clock=clock, concurrency=1) as kit:
        ids = await burst(kit, 3)
        start = kit.clock.time()
        await kit.run()
        cooling_s = kit.lanes["llm"].statistics().cooling_until_s
        waiting = await kit.job(ids[2])
    assert standin.rate_limited == 1
    assert cooling_s == pytest.approx(2, abs=0.5)
    assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0)
    assert waiting.run_at == pytest.approx(start + 2, abs=0.5)


@pytest.mark.parametrize(
    ("lane_extra", "headers", "cap_s"),
    [
        ("max_cooldown_s = 120\n", {"retry-after": "99999999"}, 120.0),
        ("max_cooldown_s = 120\n", {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, 120.0),
        ("max_cooldown_s = 120\n", {"retry-after-ms": "1e15"}, 120.0),
        (
            "max_cooldown_s = 120\n",
            {"retry-after": None, "x-ratelimit-reset-requests": "99999h"},
            120.0,
        ),
        ("", {"retry-after": "99999999"}, 3600.0),  # the default: one hour
    ],
)
async def test_a_429_asking_for_years_cools_the_lane_only_up_to_max_cooldown_s(
    tmp_path: Path,
    standin: StandIn,
    clock: ManualClock,
    lane_extra: str,
    headers: dict[str, str | None],
    cap_s: float,
) -> None:
    """A 429 with a huge Retry-After (or reset) cools the lane for max_cooldown_s, not years."""
    standin.rpm = 2
    standin.limited_headers = headers
    extra = f"[lanes.llm]\nrpm = 1000\n{lane_extra}"
    async with action_kit(tmp_path, source(standin) + extra, clock=clock, concurrency=1) as kit:
        ids = await burst(kit, 3)
        start = kit.clock.time()
        await kit.run()
        cooling_s = kit.lanes["llm"].statistics().cooling_until_s
        waiting = await kit.job(ids[2])
        await kit.run_all()
        done = await kit.job(ids[2])
    assert standin.rate_limited == 1
    assert cooling_s == pytest.approx(cap_s)
    assert (waiting.state, waiting.attempts) == (JobState.QUEUED, 0)
    assert waiting.run_at == pytest.approx(start + cap_s, abs=1)
    assert (done.state, done.attempts) == (JobState.DONE, 1)


async def test_a_429_asking_for_years_without_a_lane_waits_at_most_an_hour(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """Without a lane, a 429's huge Retry-After reschedules the job an hour ahead at most."""
    standin.rpm = 1
    standin.limited_headers = {"retry-after": "99999999"}
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        ids = await burst(kit, 2)
        start = kit.clock.time()
        await kit.run()
        waiting = [await kit.job(i) for i in ids]
    assert standin.rate_limited == 1
    [parked] = [j for j in waiting if j.state == JobState.QUEUED]
    assert parked.attempts == 0
    assert parked.run_at == pytest.approx(start + 3600, abs=1)


async def test_a_request_over_the_providers_whole_tpm_is_dead_and_holds_no_one_back(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A 429 "Request too large" (the prompt and max_tokens over the provider's tpm) is dead
    at its first call, saying what to shorten: it neither cools the lane nor keeps its tokens,
    and the small call behind it is answered at once."""
    standin.tpm = 6_000
    extra = "[lanes.llm]\nrpm = 1000\ntpm = 100_000\n"  # above the provider's, as it happens
    async with action_kit(tmp_path, source(standin) + extra, clock=clock, concurrency=1) as kit:
        big = await kit.send("mail", {"subject": "log", "text": "x" * 40_000})
        small = await kit.send("mail", {"subject": "hi", "text": "short"})
        start = kit.clock.time()
        await kit.run()
        jobs = [await kit.job(i) for i in (big, small)]
        stats = kit.lanes["llm"].statistics()
    assert kit.clock.time() == start  # nothing waited out
    assert (jobs[0].state, jobs[0].attempts) == (JobState.DEAD, 1)
    assert jobs[0].last_error == (
        f"{standin.base_url}/chat/completions answered 429 rate_limit_exceeded: the request's"
        " 10,220 tokens are over the provider's limit of 6,000 per minute, and no wait lets it"
        " through: shorten the prompt (or what it quotes of the payload) or lower max_tokens"
    )
    assert (jobs[1].state, jobs[1].attempts) == (JobState.DONE, 1)
    assert (standin.too_large, standin.rate_limited, len(standin.served)) == (1, 0, 1)
    assert stats.cooling_until_s == 0
    assert stats.tokens_debited_total == standin.served[0].tokens  # the big one's went back


async def test_insufficient_quota_opens_the_circuit_and_jobs_wait_until_it_is_back(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """insufficient_quota opens the lane's circuit; jobs stay queued; a later probe closes it."""
    standin.quota_exhausted = True
    extra = "[lanes.llm]\nrpm = 1000\n"
    async with action_kit(tmp_path, source(standin) + extra, clock=clock, concurrency=1) as kit:
        ids = await burst(kit, 2)
        await kit.run()
        lane = kit.lanes["llm"]
        assert lane.statistics().circuit_open
        queued = [await kit.job(i) for i in ids]
        standin.quota_exhausted = False
        await kit.run_all()
        done = [await kit.job(i) for i in ids]
        assert not lane.statistics().circuit_open
    assert standin.quota_refused == 1  # the second job never reached the server while open
    assert all(j.state == JobState.QUEUED and j.attempts == 0 for j in queued)
    assert all(j.state == JobState.DONE and j.attempts == 1 for j in done)


async def test_long_lane_wait_frees_the_worker_and_reschedules_without_an_attempt(
    tmp_path: Path, standin: StandIn, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose lane wait exceeds max_lane_wait_s waits (no attempt) for the lane's estimate,
    logged at info: a lane pacing its calls as configured is not a warning, where a 429 is."""
    caplog.set_level(logging.INFO, logger="webhookd")
    extra = "max_lane_wait_s = 0\n[lanes.llm]\nrpm = 6\n"
    async with action_kit(tmp_path, source(standin, extra=extra), clock=clock) as kit:
        ids = await burst(kit, 2)
        await kit.run()
        second = await kit.job(ids[1])
        start = kit.clock.time()
        await kit.run_all()
        done = await kit.job(ids[1])
    assert (second.state, second.attempts) == (JobState.QUEUED, 0)
    assert second.run_at == pytest.approx(start + 10, abs=0.5)  # 6 rpm: one every 10 s
    assert (done.state, done.attempts) == (JobState.DONE, 1)
    waits = [r for r in caplog.records if "outcome=wait" in r.getMessage()]
    assert waits and all(r.levelno == logging.INFO for r in waits)


async def test_a_pause_holds_the_jobs_waiting_for_their_lane_too(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """``webhookd pause`` while a job waits its lane's turn (up to ``max_lane_wait_s``): when
    the lane admits it the call is not made, its tokens go back, and it is queued, held with
    the source's other jobs, no attempt used; a resume runs it."""
    kits: list[ActionKit] = []

    async def pause_while_it_waits(_lanes: Mapping[str, Lane]) -> None:
        kit = kits[0]
        if len(kits) == 1:  # the first nap: the first call made, the second job waiting
            kits.append(kit)
            await standin.wait_received(1)
            await kit.journal.pause("mail")
            kit.pool.paused = frozenset({"mail"})  # what the pool reads of webhookd pause

    extra = "[lanes.llm]\nrpm = 6\n"  # one call every 10 s: the second waits in the lane
    async with action_kit(
        tmp_path, source(standin) + extra, clock=clock, settle_before_nap=pause_while_it_waits
    ) as kit:
        kits.append(kit)
        first, second = await burst(kit, 2)
        await kit.run()
        held = await kit.job(second)
        stats = kit.lanes["llm"].statistics()
        assert len(standin.served) == 1
        await kit.journal.resume("mail")
        await kit.run_all()
        done = [await kit.job(i) for i in (first, second)]
    assert (held.state, held.attempts) == (JobState.QUEUED, 0)
    assert held.last_error == "source paused"
    assert stats.tokens_debited_total == standin.served[0].tokens  # the held one's went back
    assert [(j.state, j.attempts) for j in done] == [(JobState.DONE, 1)] * 2
    assert len(standin.served) == 2


async def test_a_drain_hands_back_a_job_waiting_in_its_lanes_line_without_waiting_for_it(
    tmp_path: Path, standin: StandIn, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain while a job waits its lane's turn: the job is put back to queued at once, its
    call not made and no attempt recorded, and the drain does not spend its grace on it. (It
    waited the whole grace, then cut the job off as if it had started.)"""
    caplog.set_level(logging.INFO, logger="webhookd")
    in_line = asyncio.Event()

    async def never_its_turn(_lanes: Mapping[str, Lane]) -> None:
        in_line.set()
        await asyncio.Event().wait()  # the lane's turn never comes: only the drain ends it

    extra = "[lanes.llm]\nrpm = 6\n"  # one call every 10 s: the second waits in the lane
    async with action_kit(
        tmp_path, source(standin) + extra, clock=clock, settle_before_nap=never_its_turn
    ) as kit:
        first, second = await burst(kit, 2)
        running = asyncio.create_task(kit.run())
        await in_line.wait()  # the second job's call is in the line, at its head
        assert await kit.pool.drain(5.0) == 0
        await running
        handed = await kit.job(second)
        done = await kit.job(first)
        stats = kit.lanes["llm"].statistics()
    assert (done.state, done.attempts) == (JobState.DONE, 1)
    assert (handed.state, handed.attempts, handed.history) == (JobState.QUEUED, 0, ())
    assert len(standin.served) == 1 and stats.waiting == 0
    assert (
        "drain: 1 job(s) waiting for their lane's turn handed back, not started (no attempt"
        " counted): re-queued, for another node or the next start"
    ) in [r.getMessage() for r in caplog.records]


async def test_then_forward_posts_the_answer_signed_with_standard_webhooks(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """then.forward POSTs the answer and payload, signed so the official library verifies it."""
    then = f'then = {{ forward = "{target.url}/drafts", secret = "{SIGNING_SECRET}" }}'
    async with action_kit(tmp_path, source(standin, lane=None, extra=then), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.state == JobState.DONE
    (seen,) = target.seen
    doc = Webhook(SIGNING_SECRET).verify(seen.body, seen.headers)
    assert doc["event_id"] == event_id == seen.headers["Idempotency-Key"]
    assert doc["text"] == "Draft: Reply to Refund: please"
    assert doc["payload"] == {"subject": "Refund", "text": "please"}
    assert json.loads(seen.body)["usage"]["total_tokens"] == job.result["usage"]["total_tokens"]


async def test_then_posts_the_payload_as_sent_and_null_for_a_body_neither_json_nor_a_form(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """The payload's numbers go on as they were sent (10.10, not the float's 10.1); a body
    neither JSON nor a form is ``null``, not an empty object a webhook may well have sent."""
    then = f'then = {{ forward = "{target.url}/drafts" }}'
    async with action_kit(tmp_path, source(standin, lane=None, extra=then), clock=clock) as kit:
        await kit.send("mail", b'{"subject": "Refund", "amount": 10.10, "rate": 1E5}')
        await kit.send("mail", b"plain words", content_type="text/plain")
        await kit.run()
    first, second = sorted(target.seen, key=lambda seen: b"amount" not in seen.body)
    assert b'"payload":{"subject":"Refund","amount":10.10,"rate":1E5}' in first.body
    assert json.loads(second.body)["payload"] is None


async def test_failed_then_retries_without_asking_the_model_again(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """When the then-forward fails the job retries; the retry reuses the stored answer."""
    target.statuses = [503]
    then = f'then = {{ forward = "{target.url}/drafts" }}'
    async with action_kit(tmp_path, source(standin, lane=None, extra=then), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run()
        failed = await kit.job(event_id)
        await kit.run_all()
        job = await kit.job(event_id)
    assert (failed.state, failed.history[0].outcome) == (JobState.QUEUED, "retry")
    assert failed.result["text"] == "Draft: Reply to Refund: please"
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    assert job.history[1].detail is not None and job.history[1].detail["answer_reused"] is True
    assert len(standin.served) == 1
    assert len(target.seen) == 2


async def test_a_refusal_is_kept_in_the_answer(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A model that declines answers no content and says why in ``refusal``: the job is done
    (the model answered) and its result keeps the refusal, not an empty text alone."""
    standin.refusal = "I can't help with that."
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run_all()
        job = await kit.job(event_id)
    assert job.state == JobState.DONE
    assert (job.result["text"], job.result["refusal"]) == ("", "I can't help with that.")


async def test_a_lone_surrogate_in_the_payload_reaches_the_model_as_a_replacement_character(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """JSON may escape half a UTF-16 pair ("\\ud83d"), which no UTF-8 can carry: every attempt
    failed with UnicodeEncodeError, its lane's tokens taken each time. The model is asked with
    U+FFFD in its place, and the answer is posted on, the payload with it."""
    then = f'then = {{ forward = "{target.url}/drafts" }}'
    extra = "[lanes.llm]\nrpm = 1000\ntpm = 100_000\n"
    async with action_kit(tmp_path, source(standin, extra=then) + extra, clock=clock) as kit:
        event_id = await kit.send("mail", b'{"subject": "hi \\ud83d", "text": "x"}')
        await kit.run()
        job = await kit.job(event_id)
    assert (job.state, job.attempts) == (JobState.DONE, 1)
    [asked] = standin.bodies
    assert asked["messages"][-1]["content"] == "Reply to hi \ufffd: x"
    [seen] = target.seen
    posted = json.loads(seen.body)
    assert posted["text"] == "Draft: Reply to hi \ufffd: x"
    assert posted["payload"] == {"subject": "hi \ufffd", "text": "x"}


async def test_a_number_past_what_python_holds_is_posted_on_as_it_was_sent(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """A payload's 1e400 and 5,000-digit int (kept as their text, where the int once emptied
    the whole payload) are posted on by then.forward as sent: valid JSON, not ``Infinity``."""
    then = f'then = {{ forward = "{target.url}/drafts" }}'
    digits = "3" * 5000
    body = f'{{"subject": "hi", "text": "x", "rate": 1e400, "n": {digits}}}'.encode()
    async with action_kit(tmp_path, source(standin, lane=None, extra=then), clock=clock) as kit:
        event_id = await kit.send("mail", body)
        await kit.run()
        job = await kit.job(event_id)
    assert job.state == JobState.DONE
    assert standin.bodies[-1]["messages"][-1]["content"] == "Reply to hi: x"
    [seen] = target.seen
    assert seen.body.endswith(
        f'"payload":{{"subject":"hi","text":"x","rate":1e400,"n":{digits}}}}}'.encode()
    )


async def test_a_body_of_a_megabyte_is_put_in_the_prompt_and_the_post_off_the_event_loop(
    tmp_path: Path,
    standin: StandIn,
    clock: ManualClock,
    target: Target,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A body of 825 KB, 75,000 objects each with a price kept as sent (so written
    piece by piece: most of a second of CPU), put whole in the prompt and posted on by then:
    both renders run on a thread, not the event loop's (it stood still for each render, other
    webhooks unanswered meanwhile). Told by the thread each render ran on: how long the loop
    stood still measures the machine's load as much (0.6 s with the renders on a thread, on a
    machine busy with other tests)."""
    then = f'then = {{ forward = "{target.url}/drafts" }}'
    config = source(standin, lane=None, extra=then, prompt="Sum: {{ . }}")
    body = b"[" + b'{"p":1.50},' * 75_000 + b"7]"  # the prompt's request under aiohttp's 1 MiB
    loop_thread = threading.current_thread()
    ran_on: dict[str, bool] = {}  # each render: whether it ran on the loop's thread
    messages, then_body = openai_action.OpenAIAction._messages, openai_config.Then._body

    def render_messages(self: Any, event: Any) -> Any:
        ran_on["_messages"] = threading.current_thread() is loop_thread
        return messages(self, event)

    def render_body(event: Any, answer: Any) -> Any:
        ran_on["_body"] = threading.current_thread() is loop_thread
        return then_body(event, answer)

    monkeypatch.setattr(openai_action.OpenAIAction, "_messages", render_messages)
    monkeypatch.setattr(openai_config.Then, "_body", staticmethod(render_body))
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", body)
        await kit.run()
        job = await kit.job(event_id)
    assert job.state == JobState.DONE, job.last_error
    assert standin.bodies[-1]["messages"][-1]["content"] == f"Sum: {body.decode()}"
    [seen] = target.seen
    assert seen.body.endswith(b',{"p":1.50},7]}')
    assert ran_on == {"_messages": False, "_body": False}


@pytest.mark.parametrize(
    ("limit", "kept"), [("max_tokens = 200", 65_536), ("max_tokens = 8000", 128_000)]
)
async def test_an_answer_past_what_max_tokens_allows_is_cut_and_marked_truncated(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target, limit: str, kept: int
) -> None:
    """A server that ignores max_tokens answered 3 MB (under the 4 MiB an answer may have),
    stored and posted on whole: the text is kept to 64 KiB or 16 characters a token, whichever
    is more, the result says it was cut, and then posts what was kept."""
    standin.content = "word " * 600_000
    then = f'then = {{ forward = "{target.url}/drafts" }}'
    config = source(standin, lane=None, extra=then, limit=limit)
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.state == JobState.DONE
    assert job.result["text"] == standin.content[:kept]
    assert job.result["truncated"] is True
    [seen] = target.seen
    posted = json.loads(seen.body)
    assert (posted["text"], posted["truncated"]) == (job.result["text"], True)


@pytest.mark.parametrize("sent_as", ["chunked", "content_length", "gzip"])
async def test_an_answer_over_4_mib_is_dead_and_not_read_into_memory(
    tmp_path: Path, standin: StandIn, clock: ManualClock, sent_as: str
) -> None:
    """A server answering a completion of 150 MB was read whole, then parsed: the daemon's
    memory grew by 460 MB. Reading stops past 4 MiB (before the first byte when a Content-Length
    says so; counted decompressed under gzip), the connection is closed, and the attempt is
    dead, naming the limit."""
    size = 128 * 1024 * 1024
    announced = sent_as == "content_length"
    standin.oversized, standin.oversized_length = size, announced
    standin.oversized_gzip = sent_as == "gzip"
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        tracemalloc.start()
        try:
            await kit.run()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        job = await kit.job(event_id)
    await standin.oversized_over.wait()
    assert (job.state, job.attempts, job.result) == (JobState.DEAD, 1, None)
    url = f"{standin.base_url}/chat/completions"
    said = f"is {size:,} bytes, over" if announced else "is over"
    assert job.last_error == (
        f"the answer of {url} {said} the 4 MiB a chat completion may have: not read past it"
        " (does the server ignore max_tokens?)"
    )
    assert standin.sent < size / 4, "the client read on past the limit"
    assert peak < size / 4, f"{peak:,} bytes allocated at the peak"


async def test_an_error_answer_over_4_mib_is_cut_there_and_its_status_decides(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A 503 with a body of 128 MiB is read to 4 MiB only, and retried as a 503 is, its
    error showing how the body began."""
    size = 128 * 1024 * 1024
    standin.oversized, standin.oversized_status = size, 503
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        await kit.run()
        job = await kit.job(event_id)
    await standin.oversized_over.wait()
    assert (job.state, job.history[0].outcome) == (JobState.QUEUED, "retry")
    assert (job.last_error or "").startswith(
        f'{standin.base_url}/chat/completions answered 503: {{"id": "chatcmpl-oversized",'
    )
    assert standin.sent < size / 4, "the client read on past the limit"


async def test_a_replay_of_a_job_dead_in_its_then_delivers_the_kept_answer(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """The then-forward's target failed for good: once it is mended, a replay of the dead job
    (replay --dead, say) delivers the answer the journal kept, without a second completion."""
    target.statuses = [500]  # one attempt: dead at once
    then = f'then = {{ forward = "{target.url}/drafts" }}\nretry = {{ max_attempts = 1 }}'
    async with action_kit(tmp_path, source(standin, lane=None, extra=then), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run_all()
        assert (await kit.job(event_id)).state == JobState.DEAD
        assert await kit.journal.replay([event_id], dead_only=True) == {event_id: Replayed(1, 0)}
        await kit.run_all()
        job = await kit.job(event_id)
    assert job.state == JobState.DONE
    assert job.history[-1].detail is not None and job.history[-1].detail["answer_reused"] is True
    assert len(standin.served) == 1
    assert [json.loads(s.body)["text"] for s in target.seen] == [
        "Draft: Reply to Refund: please"
    ] * 2


async def test_a_then_forward_that_hangs_past_the_attempt_keeps_the_answer(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """A then-target that does not answer within the attempt's timeout_s: the POST is given up
    in time to keep the answer, and the retry posts it without asking the model again."""
    target.hold = asyncio.Event()
    then = f'then = {{ forward = "{target.url}/drafts" }}\ntimeout_s = 0.5'
    async with action_kit(tmp_path, source(standin, lane=None, extra=then), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run()
        failed = await kit.job(event_id)
        target.hold.set()
        await kit.run_all()
        job = await kit.job(event_id)
    assert (failed.state, failed.history[0].outcome) == (JobState.QUEUED, "retry")
    assert failed.last_error == "then.forward: no answer within the attempt's timeout_s"
    assert failed.result["text"] == "Draft: Reply to Refund: please"
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    assert len(standin.served) == 1
    assert len(target.seen) == 2


async def test_the_model_call_does_not_follow_a_redirect(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """A 307 from the model's URL is dead: the prompt, payload data in it, is not posted on."""
    target.statuses = [307]
    target.headers = {"Location": f"{standin.base_url}/chat/completions"}
    config = source(standin, lane=None).replace(standin.base_url, target.url)
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run()
        job = await kit.job(event_id)
    assert (job.state, job.attempts) == (JobState.DEAD, 1)
    assert job.last_error == (
        f"{target.url}/chat/completions answered 307:"
        f" redirect to {standin.base_url}/chat/completions not followed"
    )
    assert len(target.seen) == 1 and standin.served == []


async def test_then_caps_retry_after_and_does_not_follow_a_redirect(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """then: a 503 asking for years waits only cap_s; a 307 after it is dead, never followed."""
    target.statuses = [503, 307]
    target.headers = {"Retry-After": "99999999", "Location": f"{target.url}/elsewhere"}
    then = f'then = {{ forward = "{target.url}/drafts" }}\nretry = {{ base_s = 1, cap_s = 30 }}'
    async with action_kit(tmp_path, source(standin, lane=None, extra=then), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        start = kit.clock.time()
        await kit.run()
        failed = await kit.job(event_id)
        await kit.run_all()
        job = await kit.job(event_id)
    assert (failed.state, failed.run_at) == (JobState.QUEUED, pytest.approx(start + 30))
    assert (job.state, job.attempts) == (JobState.DEAD, 2)
    assert job.last_error == (
        f"then.forward: {target.url}/drafts answered 307:"
        f" redirect to {target.url}/elsewhere not followed"
    )
    assert [s.path for s in target.seen] == ["/drafts", "/drafts"]
    assert job.result["text"] == "Draft: Reply to Refund: please"  # the answer is kept


async def test_an_answer_kept_by_a_failed_then_survives_a_restart(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """The kept answer is in the journal: a new process reuses it, and a replay asks again."""
    target.statuses = [503]
    then = f'then = {{ forward = "{target.url}/drafts" }}'
    config = source(standin, lane=None, extra=then)
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run()
        assert (await kit.job(event_id)).state == JobState.QUEUED
    async with action_kit(tmp_path, config, clock=clock) as kit:  # the restart
        await kit.run_all()
        job = await kit.job(event_id)
        assert (job.state, job.attempts) == (JobState.DONE, 2)
        assert job.history[1].detail is not None and job.history[1].detail["answer_reused"]
        assert len(standin.served) == 1
        assert await kit.journal.replay([event_id]) == {event_id: Replayed(1, 0)}
        await kit.run_all()
        replayed = await kit.job(event_id)
    assert replayed.state == JobState.DONE
    assert replayed.history[-1].detail is not None
    assert replayed.history[-1].detail["answer_reused"] is False
    assert len(standin.served) == 2
    assert len(target.seen) == 3


async def test_a_drain_that_cuts_off_the_then_forward_keeps_the_answer_across_a_restart(
    tmp_path: Path, standin: StandIn, clock: ManualClock, target: Target
) -> None:
    """SIGTERM while the then-target holds the POST, past workers.shutdown_grace_s: the drain's
    interrupted record keeps the answer, so the next process posts it without a second
    completion (paid for once, the same text downstream)."""
    target.hold = asyncio.Event()
    then = f'then = {{ forward = "{target.url}/drafts" }}'
    config = source(standin, lane=None, extra=then)
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        running = asyncio.create_task(kit.run())
        await target.wait_for(lambda t: t.running == 1)
        assert await kit.pool.drain(0.01) == 1
        await running
        cut = await kit.job(event_id)
    assert (cut.state, cut.attempts) == (JobState.QUEUED, 0)
    [interrupted] = cut.history
    assert (interrupted.outcome, interrupted.detail) == (
        "interrupted",
        {"answer_reused": False, "counted": False},
    )
    assert cut.result["text"] == "Draft: Reply to Refund: please"
    target.hold.set()
    async with action_kit(tmp_path, config, clock=clock) as kit:  # the restart
        await kit.run_all()
        job = await kit.job(event_id)
    assert (job.state, job.attempts) == (JobState.DONE, 1)
    assert job.history[-1].detail is not None and job.history[-1].detail["answer_reused"]
    assert len(standin.served) == 1
    assert [json.loads(s.body)["text"] for s in target.seen] == [
        "Draft: Reply to Refund: please"
    ] * 2


@pytest.mark.parametrize(("status", "outcome"), [(401, "dead"), (404, "dead"), (503, "retry")])
async def test_status_errors_map_to_dead_or_retry(
    tmp_path: Path, standin: StandIn, clock: ManualClock, status: int, outcome: str
) -> None:
    """Auth and not-found errors are permanent; server overload is retried."""
    standin.statuses = [status]
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.history[0].outcome == outcome
    assert job.history[0].error is not None and str(status) in job.history[0].error


async def test_a_connection_error_names_the_host_and_why(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A base_url on a port nobody listens on: a retry whose error says where and why, not the
    client's bare "Connection error."."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = source(standin, lane=None).replace(standin.url, f"http://127.0.0.1:{port}")
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        await kit.run()
        job = await kit.job(event_id)
    assert (job.state, job.history[0].outcome) == (JobState.QUEUED, "retry")
    assert job.last_error == (
        f"connection failed: cannot connect to 127.0.0.1:{port}: Connection refused"
    )


@pytest.mark.parametrize(
    "body",
    [b"<html>502 from a proxy</html>", b'{"object": "chat.completion", "choices": "nope"}'],
)
async def test_an_answer_that_is_not_a_chat_completion_is_retried_saying_so(
    tmp_path: Path, standin: StandIn, clock: ManualClock, body: bytes
) -> None:
    """A 200 whose body is not a chat completion (a proxy's page, a server not quite
    compatible) is a retry that says what was wrong, not the parser's bare exception."""
    standin.malformed = body
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.history[0].outcome == "retry"
    assert (job.history[0].error or "").startswith(
        f"the answer of {standin.base_url}/chat/completions is not a chat completion: "
    )


async def test_a_page_that_is_not_json_is_named_by_its_content_type(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A 200 of HTML (a proxy's or a login page) says what came back, not that a str has no
    ``usage``."""
    standin.malformed, standin.malformed_type = b"<html>sign in</html>", "text/html"
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.history[0].outcome == "retry"
    assert job.history[0].error == (
        f"the answer of {standin.base_url}/chat/completions is not a chat completion:"
        " a 200 of text/html: <html>sign in</html>"
    )


async def test_an_error_page_names_the_url_the_status_once_and_the_start_of_the_page(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """A proxy's 502 page was "502: Error code: 502": the URL, the status once, and how the
    page began, on one line and cut short."""
    page = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>" + "x" * 5000
    standin.malformed, standin.malformed_type = page.encode(), "text/html"
    standin.malformed_status = 502
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.history[0].outcome == "retry"
    said = " ".join(page.split())[:300]
    assert job.last_error == f"{standin.base_url}/chat/completions answered 502: {said} …"


async def test_a_base_url_without_v1_is_dead_naming_the_url_it_asked(
    tmp_path: Path, standin: StandIn, clock: ManualClock
) -> None:
    """base_url without its /v1: the server's own 404 (not the API's "no such model"), said
    with the URL asked and the likely cause, where it was "404: Error code: 404"."""
    config = source(standin, lane=None).replace(standin.base_url, standin.url)
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        await kit.run()
        job = await kit.job(event_id)
    assert (job.state, job.attempts) == (JobState.DEAD, 1)
    assert job.last_error == (
        f"{standin.url}/chat/completions answered 404: 404: Not Found"
        " (no such path: is /v1 missing from base_url?)"
    )


@pytest.mark.parametrize(
    ("content", "body", "why"),
    [
        (123, None, "its message's content is not text: 123"),
        (None, b'{"hello": "world"}', 'it has no choices: {"hello": "world"}'),
    ],
)
async def test_a_200_that_holds_no_answer_is_retried_naming_the_url(
    tmp_path: Path,
    standin: StandIn,
    clock: ManualClock,
    content: Any,
    body: bytes | None,
    why: str,
) -> None:
    """A message whose content is 123 was kept as the answer (text 123, model null), and a 200
    of {"hello": "world"} was "the model answered with no choices": neither is an answer, and
    the retry says where it came from and what it was."""
    standin.content, standin.malformed = content, body
    async with action_kit(tmp_path, source(standin, lane=None), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "x"})
        await kit.run()
        job = await kit.job(event_id)
    assert (job.state, job.history[0].outcome, job.result) == (JobState.QUEUED, "retry", None)
    assert job.last_error == (
        f"the answer of {standin.base_url}/chat/completions is not a chat completion: {why}"
    )


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ('prompt = "Hi {{ name"', "sources.s.actions[0].prompt", ""),
        ('prompt = "{{ name | upper }}"', "sources.s.actions[0].prompt", ""),
        ('system = "{{ }}"', "sources.s.actions[0].system", ""),
        ("temperature = 3", "sources.s.actions[0].temperature", ""),
        ('then = { forward = "ftp://x" }', "sources.s.actions[0].then.forward", ""),
        (
            'then = { forward = "http://x", secret = "plain" }',
            "sources.s.actions[0].then.secret",
            "",
        ),
        ('then = { forward = "http://x", retries = 3 }', "sources.s.actions[0].then.retries", ""),
        # The forward action's word for the URL: the error says which keys then takes.
        (
            'then = { url = "http://x" }',
            "sources.s.actions[0].then.url",
            "takes forward (the URL), secret, secrets, headers",
        ),
        ("max_lane_wait_s = 500", "sources.s.actions[0].max_lane_wait_s", ""),
        ("max_completion_tokens = 10", "sources.s.actions[0].max_completion_tokens", ""),
        # Pasted with a space: the server knows no such model, and each job would go dead.
        ('model = " gpt-4o-mini"', "sources.s.actions[0].model", "begins or ends with white"),
        ('model = "gpt-4o-mini\\n"', "sources.s.actions[0].model", "404, no such model"),
        # The endpoint's URL pasted whole: every call would ask .../chat/completions twice.
        (
            'base_url = "https://api.openai.com/v1/chat/completions"',
            "sources.s.actions[0].base_url",
            "ends in /chat/completions, which the client adds itself",
        ),
        (
            'base_url = "http://127.0.0.1:11434/v1/chat/completions/"',
            "sources.s.actions[0].base_url",
            "give the API's root, as https://api.openai.com/v1",
        ),
    ],
)
def test_bad_options_name_their_key(line: str, key: str, says: str) -> None:
    """A malformed template or option is a ConfigError naming the dotted key (and saying
    ``says``)."""
    from webhookd import actions

    text = f"""
[sources.s]
[[sources.s.actions]]
type = "openai"
api_key = "env:{KEY}"
max_tokens = 10
{line}
"""
    if "prompt" not in line:
        text += 'prompt = "p"\n'
    if not line.startswith("model"):
        text += 'model = "m"\n'
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(text))
    assert err.value.key == key and says in str(err.value)


def test_max_tokens_is_required_and_api_key_defaults_to_openai_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without max_tokens the lane cannot reserve: named. Without api_key the key is the
    openai package's own ``OPENAI_API_KEY`` (as the design's example config has it), and its
    absence is named too."""
    from webhookd import actions

    base = '[sources.s]\n[[sources.s.actions]]\ntype = "openai"\nmodel = "m"\nprompt = "p"\n'
    with pytest.raises(ConfigError, match=r"actions\[0\]\.max_tokens"):
        actions.validate(loads(base + f'api_key = "env:{KEY}"\n'))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"actions\[0\]\.api_key: .*OPENAI_API_KEY"):
        actions.validate(loads(base + "max_tokens = 10\n"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    (action,) = loads(base + "max_tokens = 10\n").sources["s"].actions
    assert Settings(action).api_key.reveal() == "sk-from-the-environment"


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("sk-abc ", "begins or ends with a space or a tab"),
        ("\tsk-abc", "begins or ends with a space or a tab"),
        ("sk-\u00e9t\u00e9", "not printable ASCII"),
    ],
)
@pytest.mark.parametrize("written", ["env", "file"])
def test_an_api_key_no_header_can_carry_is_refused_at_load_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, says: str, written: str
) -> None:
    """A key with a stray space (an env: value, a file: one before its newline) passed check,
    then every call failed as "Connection error.": refused at load, named, never shown."""
    from webhookd import actions

    if written == "env":
        monkeypatch.setenv(KEY, key)
        api_key = f"env:{KEY}"
    else:
        (tmp_path / "key").write_text(key + "\n")  # the newline is the file's, and dropped
        api_key = f"file:{tmp_path / 'key'}"
    text = f"""
[sources.s]
[[sources.s.actions]]
type = "openai"
api_key = "{api_key}"
model = "m"
prompt = "p"
max_tokens = 10
"""
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(text))
    assert err.value.key == "sources.s.actions[0].api_key"
    assert says in str(err.value) and "sk-" not in str(err.value)


@pytest.mark.parametrize(
    ("limit", "state", "completion_tokens"),
    [("max_completion_tokens = 40", JobState.DONE, 40), ("max_tokens = 40", JobState.DEAD, None)],
)
async def test_reasoning_models_take_max_completion_tokens(
    tmp_path: Path,
    standin: StandIn,
    clock: ManualClock,
    limit: str,
    state: JobState,
    completion_tokens: int | None,
) -> None:
    """The limit is sent under the name it is written with: a reasoning model answers within
    max_completion_tokens, and refuses max_tokens with a 400 that is dead, not retried."""
    config = source(standin, lane=None, model="o4-mini", limit=limit)
    async with action_kit(tmp_path, config, clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund", "text": "please"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.state == state
    if completion_tokens is not None:
        assert job.result["usage"]["completion_tokens"] == completion_tokens
    else:
        assert job.history[0].error is not None
        assert "max_completion_tokens" in job.history[0].error


async def test_daemon_runs_the_mailgun_case_end_to_end_through_its_lane(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A posted form e-mail is answered 202, drafted under the configured lane, and sent on."""
    upstream = await StandIn().start()
    try:
        cfg = make_config(
            tmp_path,
            source(upstream, extra=f'then = {{ forward = "{target.url}/drafts" }}')
            + "[lanes.llm]\nrpm = 450\ntpm = 450_000\n",
        )
        daemon = await run_daemon(cfg)
        status, answer = await daemon.post(
            "/hooks/mail",
            "subject=Late+parcel&text=Where+is+it%3F",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert status == 202
        await target.wait_for(lambda t: len(t.seen) == 1, timeout_s=30)
    finally:
        await upstream.aclose()
    draft = json.loads(target.seen[0].body)
    assert draft["event_id"] == answer["id"]
    assert draft["text"] == "Draft: Reply to Late parcel: Where is it?"
    assert daemon.daemon.lanes["llm"].statistics().admitted_total == 1


@contextlib.asynccontextmanager
async def model_calls_queued(
    tmp_path: Path, run_daemon: Any, extra: str
) -> AsyncIterator[tuple[Running, Lane]]:
    """A daemon of 8 workers with 40 model calls posted to ``mail`` on a lane of 60 rpm (a
    minute and more of it), beside ``extra`` sources or actions."""
    upstream = await StandIn().start()
    try:
        cfg = make_config(
            tmp_path,
            source(upstream) + extra + "[lanes.llm]\nrpm = 60\nburst_s = 1\n",
            workers="concurrency = 8\nshutdown_grace_s = 1",
        )
        daemon = await run_daemon(cfg)
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        for n in range(40):
            status, _ = await daemon.post("/hooks/mail", f"subject=n{n}&text=hi", headers=form)
            assert status == 202
        yield daemon, daemon.daemon.lanes["llm"]
    finally:
        await upstream.aclose()


async def test_a_full_lane_line_leaves_the_other_workers_to_other_sources(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """Model calls queued far past what their lane admits hold at most ``most_waiting`` workers
    in its line: another source's forwards run at once beside them, not one per admission."""
    shop = f'[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\nurl = "{target.url}/in"\n'
    async with model_calls_queued(tmp_path, run_daemon, shop) as (daemon, lane):

        async def line_full() -> bool:
            return lane.waiting >= lane.most_waiting

        # Deadlines here are only a stop: on a loaded machine the posts and the claims that
        # fill the line (each a commit) take seconds. What is measured is the lane's own pace.
        await poll(line_full, timeout_s=60)
        before = lane.statistics().admitted_total
        for n in range(10):
            status, _ = await daemon.post("/hooks/shop", json.dumps({"n": n}))
            assert status == 202
        await target.wait_for(lambda t: len(t.seen) == 10, timeout_s=60)
        # Without the cap each forward waits for an admission (one a second) to free a worker:
        # 11 admissions for the 10, measured; with it, none is waited for.
        assert lane.statistics().admitted_total - before < 10
        # Not one more: a round counts the jobs picked before whose calls are on their way.
        assert lane.most_waiting == 4 and lane.waiting <= lane.most_waiting


async def test_a_full_lane_line_leaves_the_same_sources_other_actions_running(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """One source with a model call and a forward per webhook: the calls queued past the lane's
    line wait, and the forwards behind them in the same tenant's lane go at once."""
    forward = f'[[sources.mail.actions]]\ntype = "forward"\nurl = "{target.url}/in"\n'
    async with model_calls_queued(tmp_path, run_daemon, forward) as (_, lane):
        # A stop only (a loaded machine is slow to post and deliver): the lane's admissions,
        # one a second, are the measure; without the cap each forward waits for one.
        await target.wait_for(lambda t: len(t.seen) == 40, timeout_s=60)
        assert lane.statistics().admitted_total < 20  # the model calls are far from done


# A lane of 6 rpm that may spend its whole minute at once: a restart that forgot the minute
# before would send 6 more calls at once.
RESTART_LANE = "[lanes.llm]\nrpm = 6\nburst_s = 60\n"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def test_a_restarted_daemons_lane_sends_only_what_the_minute_before_it_left(
    tmp_path: Path, run_daemon: Any
) -> None:
    """4 calls on a lane of 6 rpm, a stop, a start on the same journal and 6 more webhooks:
    the new process's lane counts the 4 (from their attempts) and sends 2 within the minute,
    asking the rest back for when the first calls leave it. Before, it started afresh and sent
    6, and the provider (the stand-in, holding 6 rpm) answered 4 of them 429."""
    upstream = await StandIn(rpm=6).start()
    try:
        cfg = make_config(tmp_path, source(upstream) + RESTART_LANE)
        first = await run_daemon(cfg)
        for n in range(4):
            assert (await first.post("/hooks/mail", f"subject=a{n}&text=hi", headers=FORM))[
                0
            ] == 202
        async with asyncio.timeout(10):
            await upstream.wait_received(4)
        assert await first.stop() == 0
        second = await run_daemon(cfg)
        lane = second.daemon.lanes["llm"]
        for n in range(6):
            assert (await second.post("/hooks/mail", f"subject=b{n}&text=hi", headers=FORM))[
                0
            ] == 202

        async def the_rest_asked_back() -> bool:  # or, as before, sent
            return lane.statistics().busy_total >= 4 or upstream.rate_limited > 0

        await poll(the_rest_asked_back, timeout_s=10)
        stats = lane.statistics()
    finally:
        await upstream.aclose()
    assert (stats.admitted_total, upstream.received, upstream.rate_limited) == (2, 6, 0)
    served = [charge.at for charge in upstream.served]
    assert len(served) == 6 and served[-1] - served[0] < 60  # all six in one minute


async def test_a_lane_after_kill_9_counts_the_minute_before_and_the_call_it_cut_off(
    tmp_path: Path, procs: Any, http: Any
) -> None:
    """``kill -9`` with 3 calls made and a fourth under way (no outcome recorded: the next
    start recovers it as interrupted): the next process's lane counts all four, the one cut
    off as made at the restart, and of 6 more webhooks (and the recovered job) sends 2 within
    the minute."""
    from procs import write_config

    upstream = await StandIn(rpm=6).start()
    try:
        config = write_config(
            tmp_path / "webhookd.toml", tmp_path / "webhookd.db", source(upstream) + RESTART_LANE
        )

        async def post(daemon: Any, subject: str) -> None:
            url = f"{daemon.url}/hooks/mail"
            async with http.post(url, data=f"subject={subject}&text=hi", headers=FORM) as r:
                assert r.status == 202

        first = await procs.serve(config)
        for n in range(3):
            await post(first, f"a{n}")
        async with asyncio.timeout(10):
            await upstream.wait_received(3)
        upstream.hold = asyncio.Event()  # the fourth is under way when the process dies
        await post(first, "a3")
        async with asyncio.timeout(10):
            await upstream.wait_received(4)
        await first.kill9()
        upstream.hold.set()
        upstream.hold = None
        second = await procs.serve(config)
        await second.wait_said(r"lane llm: 4 call\(s\) of the minute before this start counted")
        for n in range(6):
            await post(second, f"b{n}")

        async def the_rest_asked_back() -> bool:
            async with http.get(f"{second.admin_url}/stats") as r:
                lane = (await r.json())["lanes"]["llm"]
            # 7 jobs, the recovered one among them; or, as before, sent
            return bool(lane["busy_total"] >= 5) or upstream.rate_limited > 0

        await poll(the_rest_asked_back, timeout_s=10)
        async with http.get(f"{second.admin_url}/stats") as r:
            admitted = (await r.json())["lanes"]["llm"]["admitted_total"]
    finally:
        await upstream.aclose()
    assert (admitted, upstream.received, upstream.rate_limited) == (2, 6, 0)


@pytest.mark.parametrize(
    ("limit", "lane", "said"),
    [
        ("max_tokens = 4000", "tpm = 1000", "max_tokens: 4,000 is more than lanes.llm.tpm (1,000)"),
        (
            "max_completion_tokens = 1001",
            "tpm = 1000\nrpm = 10",
            "max_completion_tokens: 1,001 is more than lanes.llm.tpm (1,000)",
        ),
        ("max_tokens = 1000", "tpm = 1000", None),
        ("max_tokens = 4000", "rpm = 10", None),
    ],
)
def test_check_and_the_start_warn_of_calls_bigger_than_their_lanes_tpm(
    limit: str, lane: str, said: str | None
) -> None:
    """The lane lets such a call through alone once it has admitted nothing for a minute, over
    its limit: not an error (a local server may enforce no limit), but said before it happens."""
    from webhookd import actions

    cfg = loads(
        f"""
[lanes.llm]
{lane}
[sources.mail]
[[sources.mail.actions]]
type = "openai"
api_key = "env:{KEY}"
model = "gpt-4o-mini"
prompt = "{{{{ text }}}}"
lane = "llm"
{limit}
"""
    )
    warned = actions.warnings(cfg)
    if said is None:
        assert warned == []
    else:
        assert warned == [
            f"sources.mail.actions[0].{said}: each call waits until the lane has"
            " admitted nothing for a minute, then goes over its limit alone (OpenAI refuses a"
            " request bigger than the limit with a 429)"
        ]


@pytest.mark.parametrize(
    ("templates", "warned"),
    [
        ('prompt = "Classify this support e-mail:"', True),
        ('system = "You classify e-mail."\nprompt = "Classify this one:"', True),
        ('prompt = "Classify: {{ subject }}"', False),
        ('system = "Classify {{ . }}"\nprompt = "Which label?"', False),
    ],
)
def test_check_warns_of_a_prompt_that_never_shows_the_model_the_webhook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, templates: str, warned: bool
) -> None:
    """A prompt and system with no lookup ask every event the same text, paid for each, and the
    webhook is never sent: check warns of it (nothing adds the payload to a prompt of itself)."""
    from click.testing import CliRunner

    from webhookd.cli import main

    monkeypatch.setenv(KEY, "sk-standin")
    config = tmp_path / "webhookd.toml"
    config.write_text(
        f"""
[journal]
path = "{tmp_path / "webhookd.db"}"
[sources.mail]
[[sources.mail.actions]]
type = "openai"
api_key = "env:{KEY}"
model = "gpt-4o-mini"
max_tokens = 200
{templates}
""",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "warning" in line]
    if warned:
        assert said == [
            "webhookd: warning: sources.mail.actions[0].prompt: looks nothing up in the webhook"
            + (", nor does system" if "system" in templates else "")
            + ": every call asks the model the same text, without the webhook ({{ . }} puts in"
            " the whole payload, {{ subject }} one field)"
        ]
    else:
        assert said == []


def test_a_prompt_in_chinese_or_japanese_is_not_estimated_at_a_quarter_token_a_character() -> None:
    """Characters / 4 counted 4,250 characters of Chinese as 1,067 tokens, where the tokenizers
    give one or more a character: calls admitted together on such estimates took a lane past
    its tpm before their settles. Other characters count one each, ASCII a quarter."""
    chinese = "订单已发货请确认收货地址" * 100  # 1,200 characters
    assert estimate_tokens([{"role": "user", "content": chinese}]) == 1_200 + 4
    english = "Summarize this order for the support team. " * 25  # 1,075 ASCII characters
    assert estimate_tokens([{"role": "user", "content": english}]) == 269 + 4
    mixed = [
        {"role": "system", "content": "Reply in Japanese."},
        {"role": "user", "content": "注文 #7"},
    ]
    assert estimate_tokens(mixed) == (5 + 4) + (1 + 2 + 4)  # type: ignore[arg-type]
