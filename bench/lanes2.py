"""``python -m bench lanes2``: the lanes scenario (``bench/lanes.py``) with two nodes.

Two ``webhookd serve`` processes share one throwaway PostgreSQL journal (``bench/cluster.py``)
and one lane of 120 requests/min and 60,000 tokens/min against the OpenAI stand-in, which
enforces those limits over a sliding 60 s window; the jobs are posted to both in turn. Reported
as for one node, plus the share of each limit used: with lanes kept per node each node admits
up to the whole limit, so up to 200 % and the stand-in's 429s show what is not cluster-wide; a
lane shared across nodes keeps it at or under 100 % with no 429s.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from bench import lanes
from bench.cluster import ClusterBusy, postgres, running_nodes
from bench.harness import busy_note, placed
from bench.servers import free_port
from bench.table import Row, scenario_main, verdict

NODES = 2


def measure(quick: bool = False, seconds: int | None = None) -> dict[str, Any]:
    """Run the shared lane saturated for `seconds` (default 65; 20 with `quick`)."""
    run_s = float(seconds if seconds is not None else (20 if quick else 65))
    port = free_port()
    body = lanes.config(f"http://127.0.0.1:{port}/v1")
    env = {"BENCH_OPENAI_KEY": lanes.API_KEY}
    with (
        placed() as cpu,
        postgres() as pg,
        running_nodes(body, nodes=NODES, journal_url=pg.url, cpu=cpu, env=env) as servers,
    ):
        busy = ClusterBusy(servers, pg)
        result = asyncio.run(lanes._run([s.url for s in servers], port, run_s))
        result["other_cpu_pct"] = busy.other_pct()
    result["nodes"] = NODES
    return result


def rows(result: dict[str, Any]) -> list[Row]:
    label, within = lanes.window_label(result)
    rpm, tpm = lanes.RPM, lanes.TPM
    saturated = max(result["avg_rpm"] / rpm, result["avg_tpm"] / tpm)
    n = result["nodes"]
    # What the stand-in served cannot pass its own limit; what the nodes sent can.
    sent_rpm = result["received"] / result["run_s"] * 60
    return [
        Row(
            "lanes2",
            f"{n} nodes: requests/min, {label}",
            f"{result['max_rpm']:,.0f} of {rpm:,} ({100 * result['max_rpm'] / rpm:.0f} % of limit)",
            f"≤ {rpm:,}",
            within(result["max_rpm"], rpm),
        ),
        Row(
            "lanes2",
            f"{n} nodes: tokens/min, {label}",
            f"{result['max_tpm']:,.0f} of {tpm:,} ({100 * result['max_tpm'] / tpm:.0f} % of limit)",
            f"≤ {tpm:,}",
            within(result["max_tpm"], tpm),
        ),
        Row(
            "lanes2",
            f"{n} nodes: used over the {result['run_s']:g} s run (req, tokens)",
            f"{100 * result['avg_rpm'] / rpm:.0f} %, {100 * result['avg_tpm'] / tpm:.0f} %"
            " of limit",
            f"≥ {100 * lanes.SATURATED_TARGET:.0f} % of the binding one",
            verdict(saturated >= lanes.SATURATED_TARGET),
        ),
        Row(
            "lanes2",
            f"{n} nodes: requests sent over the run (served and refused), per min",
            f"{sent_rpm:,.0f} ({100 * sent_rpm / rpm:.0f} % of limit)",
            "",
            "",
        ),
        Row(
            "lanes2",
            f"{n} nodes: 429s from the stand-in",
            f"{result['rate_limited_429']}",
            "0",
            verdict(result["rate_limited_429"] == 0),
        ),
    ]


def notes(result: dict[str, Any]) -> list[str]:
    out = [f"lanes2: {line.split(': ', 1)[1]}" for line in lanes.notes(result)]
    note = busy_note(result.get("other_cpu_pct"))
    if note and not any(note in line for line in out):
        out.append(f"lanes2: {note}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return scenario_main(
        "lanes2",
        __doc__,
        measure,
        rows,
        notes,
        argv,
        quick_help=lanes.QUICK_HELP,
        size_help=lanes.SIZE_HELP,
    )


if __name__ == "__main__":
    sys.exit(main())
