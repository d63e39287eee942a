"""The suite's own wiring: an async test runs on the loop its id names, fixtures included."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from conftest import LOOPS

LOOP_CLASSES: dict[str, type[asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "uvloop": uvloop.Loop,
}


@pytest.fixture
async def fixture_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


async def test_the_loop_in_the_test_id_runs_the_test_and_its_async_fixtures(
    request: pytest.FixtureRequest, fixture_loop: asyncio.AbstractEventLoop
) -> None:
    """``…[uvloop]`` runs on uvloop and ``…[asyncio]`` on the stock loop, fixtures alike."""
    factory = request.node.callspec.params["_asyncio_loop_factory"]
    (name,) = [n for n, f in LOOPS.items() if f is factory]
    loop = asyncio.get_running_loop()
    assert type(loop) is LOOP_CLASSES[name]
    assert fixture_loop is loop
    if len(request.config.getoption("--loops").split(",")) > 1:
        assert request.node.name.endswith(f"[{name}]")
