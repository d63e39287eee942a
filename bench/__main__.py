"""``python -m bench [SCENARIO] [ARGS…]``: run a benchmark scenario (default: ``all``, every one).

Scenarios live in `SCENARIOS`, by module name, so adding one is one line here plus a module with
a ``main(argv) -> int``; modules are imported only when their scenario runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Scenario(NamedTuple):
    module: str  # has main(argv: Sequence[str] | None) -> int
    summary: str


SCENARIOS: dict[str, Scenario] = {
    "intake": Scenario(
        "bench.intake",
        "durable intake vs a bare aiohttp+uvloop handler; ack latency at fixed rates",
    ),
    "dispatch": Scenario("bench.dispatch", "commit → job start on an idle pool, p50/p99"),
    "e2e": Scenario("bench.e2e", "20,000 queued no-op jobs drained: jobs/s to done"),
    "peers": Scenario(
        "bench.peers",
        "webhookd vs FastAPI + Celery and FastAPI + arq over Redis: intake and end to end",
    ),
    "burst": Scenario(
        "bench.burst", "40,000 webhooks at once: time to ack, time to process, lost, duplicates"
    ),
    "lanes": Scenario("bench.lanes", "RPM/TPM used vs configured, against the OpenAI stand-in"),
    "lanes2": Scenario(
        "bench.lanes2", "the lanes scenario with two nodes sharing a PostgreSQL journal"
    ),
    "fairness": Scenario(
        "bench.fairness",
        "a tenant's 10 jobs behind another's 10,000, and 8:4:1 classes: one node and two",
    ),
    "chaos": Scenario("bench.chaos", "kill -9 at random moments under signed load; counts losses"),
    "backlog": Scenario(
        "bench.backlog", "peak RSS while draining a backlog of 1,000,000 queued events"
    ),
    "journal": Scenario(
        "bench.journal", "journal cost per webhook as the journal grows (0, 100k, 300k events)"
    ),
    "pg": Scenario(
        "bench.pg",
        "PostgreSQL journal, one and two nodes, beside SQLite: intake and end to end",
    ),
    "all": Scenario(
        "bench.suite", "every scenario but chaos: one table, JSON and a PNG chart (--quick)"
    ),
}
DEFAULT = "all"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--list", "list"):
        for name, scenario in SCENARIOS.items():
            print(f"{name:<12} {scenario.summary}")
        return 0
    name = args.pop(0) if args and args[0] in SCENARIOS else DEFAULT
    module = importlib.import_module(SCENARIOS[name].module)
    return int(module.main(args))


if __name__ == "__main__":
    sys.exit(main())
