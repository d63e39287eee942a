"""The summary table every scenario reports into, and the command line they share.

A scenario module has ``measure(quick, size) -> dict`` (structured results, JSON-ready),
``rows(result) -> list[Row]`` (its lines of the table), ``notes(result) -> list[str]`` (caveats:
a busy machine, a generator that was the bottleneck) and ``main(argv) -> int``, which is
`scenario_main`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HEADER = ("scenario", "metric", "value", "target", "verdict")


@dataclass(frozen=True)
class Row:
    """One line of the summary table."""

    scenario: str
    metric: str
    value: str
    target: str = ""
    verdict: str = ""  # "PASS", "MISS", "" (information), or a short word such as "skipped"

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """The rows as an aligned text table, then the notes."""
    cells = [HEADER, *((r.scenario, r.metric, r.value, r.target, r.verdict) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = []
    previous = ""
    for n, cell in enumerate(cells):
        if n > 1 and cell[0] != previous:
            lines.append("")
        previous = cell[0]
        shown = (cell[0] if n == 0 or cell[0] != cells[n - 1][0] else "", *cell[1:])
        lines.append("  ".join(v.ljust(w) for v, w in zip(shown, widths, strict=True)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join([*lines, *([""] if notes else []), *notes])


Measure = Callable[[bool, int | None], dict[str, Any]]


def scenario_main(
    name: str,
    doc: str | None,
    measure: Measure,
    rows: Callable[[dict[str, Any]], list[Row]],
    notes: Callable[[dict[str, Any]], list[str]],
    argv: Sequence[str] | None,
    *,
    quick_help: str,
    size_help: str,
) -> int:
    """``python -m bench NAME [--quick] [--size N] [--json PATH]``: measure, print, save."""
    parser = argparse.ArgumentParser(
        prog=f"python -m bench {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--size", type=int, help=size_help)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    result = measure(args.quick, args.size)
    print(render(rows(result), notes(result)))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
