"""``python -m bench chaos [--rounds N] [--seed S]``: the chaos test, for hundreds of kills.

The same harness as ``tests/chaos`` (signed load, ``kill -9`` at random moments, a recording
target), run longer. Prints the counts; exits 1 if any guarantee broke.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__)
    parser.add_argument("--rounds", type=int, default=300, help="kills (default 300)")
    parser.add_argument("--per-round", type=int, default=100, help="webhooks per round")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args(argv)
    sys.path[:0] = [str(TESTS), str(TESTS / "chaos")]
    from chaos_harness import chaos  # the tests' harness, on the path just set

    print(f"chaos: {args.rounds} kills, seed {args.seed} …", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="webhookd-chaos-") as tmp:
        try:
            report = asyncio.run(
                chaos(
                    Path(tmp),
                    rounds=args.rounds,
                    deliveries=args.per_round * args.rounds,
                    seed=args.seed,
                )
            )
        except AssertionError as exc:
            print(f"chaos: FAILED after {time.monotonic() - started:.0f}s: {exc}")
            return 1
    print(report.line(), f"({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
