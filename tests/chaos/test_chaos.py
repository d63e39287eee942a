"""Chaos: ``kill -9`` at random moments under continuous signed load loses nothing acknowledged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from chaos_harness import chaos

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(300)]


async def test_random_kills_under_load_lose_no_acknowledged_webhook(tmp_path: Path) -> None:
    """Every 2xx is journaled once and forwarded; the journal stays intact across kills."""
    rounds = int(os.environ.get("WEBHOOKD_CHAOS_ROUNDS", "10"))
    seed = int(os.environ.get("WEBHOOKD_CHAOS_SEED", "1"))
    report = await chaos(tmp_path, rounds=rounds, deliveries=150 * rounds, seed=seed)
    print("\n" + report.line())
    assert report.rounds >= rounds - 1  # a round may find the work already done
    assert report.acked == report.sent == report.journaled == report.delivered
