"""``python -m bench pg``: the PostgreSQL journal with one and two nodes beside SQLite, in one run.

It starts a throwaway PostgreSQL itself (``.ci/postgres.sh start``: Debian's package, data in a
temp dir, fsync on, a loopback port) and removes it at the end, whatever happened. Three setups
are measured in interleaved rounds, each round a fresh journal (a new SQLite file, a new
database) and fresh ``webhookd serve`` processes:

* ``sqlite``: one node on its SQLite file (the default);
* ``pg×1``: one node on PostgreSQL;
* ``pg×2``: two nodes on the same database, the load split evenly between them.

*Intake*: closed loop for ``duration_s`` with 64 connections in all (wrk when installed, else the
built-in generator), a unique 1 KB body per request, a source without actions: durable intake,
acknowledged after the commit. *End to end*: the source (one ``log`` action at level ``debug``
while the daemon logs at ``warning``, a no-op job) is paused, ``jobs`` webhooks are posted
(spread over the nodes), then resumed; jobs/s counts from the first poll that saw the backlog
shrink to the one that saw it empty.

Nothing is pinned: PostgreSQL, the nodes and the generator share the machine's CPUs, as they
would not in production (PostgreSQL on its own host). The headline is the median of per-round
ratios to the SQLite run of the same round.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.cluster import postgres, running_nodes
from bench.harness import post_many, session, stats, tag
from bench.machine import CpuMeter, describe
from bench.servers import Server, cli, proc_cpu_s, running_webhookd
from bench.table import Row, scenario_main

SETUPS = ("sqlite", "pg×1", "pg×2")
CONNECTIONS = 64
POLL_S = 0.05
DRAIN_TIMEOUT_S = 300.0
PG_TARGET = 0.5  # the hope: PostgreSQL intake at least half of SQLite's on the same machine


@dataclass(frozen=True)
class Options:
    rounds: int
    duration_s: float
    jobs: int
    e2e_rounds: int


def fresh_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server; its URL."""
    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(server_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def sources(log_action: bool) -> str:
    """The one source, ``bench``: no actions (intake) or one ``log`` action whose lines the
    daemon's ``warning`` level drops (a no-op job)."""
    action = '\n[[sources.bench.actions]]\ntype = "log"\nlevel = "debug"\n' if log_action else ""
    return f"[sources.bench]\n{action}"


@dataclass
class Cluster:
    servers: list[Server]
    configs: list[Path]
    db_url: str | None  # PostgreSQL only

    def cpu_s(self) -> float:
        return sum(proc_cpu_s(s.proc.pid) for s in self.servers)


@contextmanager
def cluster(
    setup: str,
    pg_url: str,
    n: int,
    *,
    log_action: bool,
    before_start: Callable[[Path], None] | None = None,
) -> Iterator[Cluster]:
    """``setup``'s nodes on a fresh journal, ready; stopped (SIGTERM) and removed afterwards."""
    body = sources(log_action)
    db_url: str | None = None
    with ExitStack() as stack:
        if setup == "sqlite":
            servers = [
                stack.enter_context(
                    running_webhookd(body, cpu=None, probe=False, before_start=before_start)
                )
            ]
        else:
            db_url = fresh_database(pg_url, f"bench_{n}_{os.getpid()}")
            nodes = 2 if setup == "pg×2" else 1
            servers = stack.enter_context(
                running_nodes(
                    body, nodes=nodes, journal_url=db_url, cpu=None, before_start=before_start
                )
            )
        configs = [s.config for s in servers if s.config is not None]
        yield Cluster(servers, configs, db_url)


# -- intake ----------------------------------------------------------------------------------------


def intake_round(setup: str, pg_url: str, n: int, duration_s: float) -> dict[str, Any]:
    with cluster(setup, pg_url, n, log_action=False) as c:
        per_node = CONNECTIONS // len(c.servers)
        cpu_before = c.cpu_s()
        with ThreadPoolExecutor(len(c.servers)) as pool:
            loads = list(
                pool.map(
                    lambda s: loadgen.closed_loop(
                        s.url,
                        connections=per_node,
                        duration_s=duration_s,
                        expect_status=202,
                        cpu=None,
                        use_wrk=True,
                    ),
                    c.servers,
                )
            )
        cpu_s = c.cpu_s() - cpu_before
    acked = sum(load.rps * load.elapsed_s for load in loads)
    return {
        "setup": setup,
        "rps": sum(load.rps for load in loads),
        "p50_ms": max(load.p50_ms for load in loads),
        "p99_ms": max(load.p99_ms for load in loads),
        "errors": sum(load.errors for load in loads),
        "webhookd_cpu_us_per_webhook": 1e6 * cpu_s / acked if acked else 0.0,
        "generator": loads[0].generator,
    }


# -- end to end ------------------------------------------------------------------------------------


def e2e_round(setup: str, pg_url: str, n: int, jobs: int) -> dict[str, Any]:
    def pause(config: Path) -> None:
        if setup == "sqlite":
            asyncio.run(_create_sqlite(config.parent / "bench.db"))
        cli("pause", "bench", config=config)  # on PostgreSQL this also creates the schema

    with cluster(setup, pg_url, n, log_action=True, before_start=pause) as c:
        return asyncio.run(_drain(setup, c, jobs))


async def _create_sqlite(path: Path) -> None:
    from webhookd.journal import Journal

    async with Journal(path):
        pass


async def _backlog(c: Cluster, http: Any) -> int:
    if c.db_url is None:
        return int((await stats(http, c.servers[0].admin_url))["backlog"])
    import asyncpg

    conn = await asyncpg.connect(c.db_url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
        )
    finally:
        await conn.close()


async def _drain(setup: str, c: Cluster, jobs: int) -> dict[str, Any]:
    share = jobs // len(c.servers)
    posted = await asyncio.gather(
        *(post_many(s.url, share, CONNECTIONS // len(c.servers), tag()) for s in c.servers)
    )
    async with session(2) as http:
        queued = await _backlog(c, http)
        cpu_before = c.cpu_s()
        await asyncio.to_thread(cli, "resume", "bench", config=c.configs[0])
        first: tuple[float, int] | None = None
        backlog = queued
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while backlog > 0 and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            backlog = await _backlog(c, http)
            if first is None and backlog < queued:
                first = (time.monotonic(), backlog)
        emptied = time.monotonic()
        cpu_s = c.cpu_s() - cpu_before
    drain_s = emptied - first[0] if first is not None else 0.0
    return {
        "setup": setup,
        "jobs": queued,
        "acked_per_s": sum(p.rate for p in posted),
        "jobs_per_s": first[1] / drain_s if first is not None and drain_s > 0 else 0.0,
        "backlog_after": backlog,
        "webhookd_cpu_us_per_job": 1e6 * cpu_s / queued if queued else 0.0,
    }


# -- the run ---------------------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def interleaved(
    what: str,
    rounds: int,
    run: Callable[[str, int], dict[str, Any]],
    line: Callable[[dict[str, Any]], str],
    names: Iterator[int],
) -> list[dict[str, Any]]:
    """``rounds`` rounds, each running every setup in turn, so a busy spell on the machine hits
    them all; ``run(setup, n)`` gets the next of ``names`` for its fresh database."""
    runs = []
    for round_no in range(1, rounds + 1):
        for setup in SETUPS:
            r = run(setup, next(names))
            r["round"] = round_no
            runs.append(r)
            say(f"{what} round {round_no} {setup:<7} {line(r)}")
    return runs


def measure(quick: bool = False, size: int | None = None) -> dict[str, Any]:
    opts = Options(
        rounds=3 if quick else 5,
        duration_s=3.0 if quick else 10.0,
        jobs=size if size is not None else (3_000 if quick else 10_000),
        e2e_rounds=1 if quick else 3,
    )
    meter = CpuMeter()
    started = time.monotonic()
    with ExitStack() as stack:
        # The first run may install the package: a longer wait than the two-node scenarios'.
        pg_url = stack.enter_context(postgres(start_timeout_s=900)).url
        names = itertools.count(1)  # each run's database has a name of its own
        intake = interleaved(
            "intake",
            opts.rounds,
            lambda setup, k: intake_round(setup, pg_url, k, opts.duration_s),
            lambda r: f"{r['rps']:8,.0f} acks/s",
            names,
        )
        e2e = interleaved(
            "e2e",
            opts.e2e_rounds,
            lambda setup, k: e2e_round(setup, pg_url, k, opts.jobs),
            lambda r: f"{r['jobs_per_s']:8,.0f} jobs/s",
            names,
        )
    use = meter.read()
    return {
        "options": opts.__dict__,
        "machine": describe(tempfile.gettempdir()).to_json(),
        "steal_pct": use.steal_pct if use is not None else None,
        "elapsed_s": time.monotonic() - started,
        "intake": intake,
        "e2e": e2e,
    }


def _median(runs: Sequence[dict[str, Any]], setup: str, key: str) -> float:
    values = [r[key] for r in runs if r["setup"] == setup]
    return statistics.median(values) if values else 0.0


def _ratios(runs: Sequence[dict[str, Any]], setup: str, key: str) -> list[float]:
    """Per round, ``setup``'s value over the SQLite run of the same round."""
    base = {r["round"]: r[key] for r in runs if r["setup"] == "sqlite"}
    return [r[key] / base[r["round"]] for r in runs if r["setup"] == setup and base.get(r["round"])]


def rows(result: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    for setup in SETUPS:
        ratios = _ratios(result["intake"], setup, "rps")
        spread = f" (×{min(ratios):.2f}–{max(ratios):.2f})" if setup != "sqlite" and ratios else ""
        value = (
            f"{_median(result['intake'], setup, 'rps'):,.0f} acks/s, "
            f"p99 {_median(result['intake'], setup, 'p99_ms'):.0f} ms, "
            f"{_median(result['intake'], setup, 'webhookd_cpu_us_per_webhook'):.0f} µs CPU/webhook"
        )
        target, verdict = "", ""
        if setup != "sqlite" and ratios:
            ratio = statistics.median(ratios)
            target = f"≥ {PG_TARGET:.1f}× sqlite"
            verdict = f"{'PASS' if ratio >= PG_TARGET else 'MISS'} ×{ratio:.2f}{spread}"
        out.append(Row("pg", f"intake {setup}", value, target, verdict))
    for setup in SETUPS:
        ratios = _ratios(result["e2e"], setup, "jobs_per_s")
        value = (
            f"{_median(result['e2e'], setup, 'jobs_per_s'):,.0f} jobs/s, "
            f"{_median(result['e2e'], setup, 'webhookd_cpu_us_per_job'):.0f} µs CPU/job"
        )
        note = f"×{statistics.median(ratios):.2f} sqlite" if setup != "sqlite" and ratios else ""
        out.append(Row("pg", f"e2e {setup} (no-op job)", value, "", note))
    return out


def notes(result: dict[str, Any]) -> list[str]:
    opts = result["options"]
    machine = result["machine"]
    out = [
        f"pg: {opts['rounds']} interleaved intake rounds × {opts['duration_s']:g} s, "
        f"{opts['e2e_rounds']} e2e round(s) × {opts['jobs']:,} jobs; medians; "
        f"generator {result['intake'][0]['generator'] if result['intake'] else '?'}; "
        "nothing pinned: PostgreSQL, nodes and generator share the CPUs",
        f"pg: {machine.get('cpu_model', '?')}, {machine.get('usable_cores', '?')} usable core(s), "
        f"temp dir on {machine.get('disk', '?')}; run took {result['elapsed_s']:.0f} s",
    ]
    stuck = [r for r in result["e2e"] if r["backlog_after"]]
    if stuck:
        out.append(f"pg: ! {len(stuck)} e2e run(s) ended with jobs left")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "pg",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help="3 intake rounds × 3 s, 1 e2e round of 3,000 jobs",
        size_help="jobs per e2e round",
    )


if __name__ == "__main__":
    sys.exit(main())
