"""One contract for every action kind: success, retryable failure, permanent failure, timeout.

Each case runs a real configured action through the real worker pool and journal and checks the
job's state and its attempt's outcome, as ``webhookd show`` would report them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from actionkit import action_kit, toml_list
from conftest import Target
from openai_standin import StandIn

from webhookd.models import JobState

CASES = ("success", "retryable", "permanent", "timeout")


@dataclass
class World:
    target: Target
    standin: StandIn


def forward_action(case: str, world: World) -> str:
    if case == "retryable":
        world.target.statuses.append(503)
    elif case == "permanent":
        world.target.statuses.append(400)
    elif case == "timeout":
        world.target.hold = asyncio.Event()
    return f'type = "forward"\nurl = "{world.target.url}/orders"'


def openai_action(case: str, world: World) -> str:
    if case == "retryable":
        world.standin.statuses.append(500)
    elif case == "permanent":
        world.standin.statuses.append(400)
    elif case == "timeout":
        world.standin.hold = asyncio.Event()
    return f"""type = "openai"
api_key = "env:CONTRACT_OPENAI_KEY"
base_url = "{world.standin.base_url}"
model = "gpt-4o-mini"
prompt = "Reply to {{{{ subject }}}}"
max_tokens = 50"""


def command_action(case: str, world: World) -> str:
    code = {
        "success": "import sys; sys.stdout.write(sys.stdin.read())",
        "retryable": "import sys; sys.exit(1)",
        "permanent": "import sys; sys.exit(3)",
        "timeout": "import time; time.sleep(60)",  # outlives timeout_s; the action kills it
    }[case]
    return f"""type = "command"
argv = {toml_list([sys.executable, "-c", code])}
permanent_exit_codes = [3]"""


def python_action(case: str, world: World) -> str:
    handler = {"success": "echo", "retryable": "flaky", "permanent": "reject", "timeout": "hang"}
    return f'type = "python"\nhandler = "actionkit:{handler[case]}"'


KINDS: dict[str, Callable[[str, World], str]] = {
    "forward": forward_action,
    "openai": openai_action,
    "command": command_action,
    "python": python_action,
}


@pytest.fixture
async def world(target: Target, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.setenv("CONTRACT_OPENAI_KEY", "sk-standin")
    standin = await StandIn().start()
    try:
        yield World(target, standin)
    finally:
        await standin.aclose()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", list(KINDS))
async def test_action_contract(kind: str, case: str, world: World, tmp_path: Path) -> None:
    """Every kind maps success/retryable/permanent/timeout to done/retry/dead/retry."""
    action = KINDS[kind](case, world)
    timeout_s = 1 if case == "timeout" else 30
    extra = f"""
[sources.s]
[[sources.s.actions]]
{action}
timeout_s = {timeout_s}
"""
    async with action_kit(tmp_path, extra) as kit:
        event_id = await kit.send("s", {"subject": "Where is my order?"})
        await kit.run()
        job = await kit.job(event_id)
    assert job.attempts == 1
    (attempt,) = job.history
    if case == "success":
        assert (job.state, attempt.outcome) == (JobState.DONE, "done")
        assert job.result is not None
    elif case == "permanent":
        assert (job.state, attempt.outcome) == (JobState.DEAD, "dead")
        assert attempt.error
    else:
        assert (job.state, attempt.outcome) == (JobState.QUEUED, "retry")
        assert job.run_at > kit.clock.time()
        if case == "timeout":
            assert attempt.error is not None and "timed out" in attempt.error
            where = {"forward": world.target.url, "openai": world.standin.base_url}.get(kind)
            assert where is None or f"({where}" in attempt.error  # named by where it went
