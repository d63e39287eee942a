"""Draw the suite's results (the JSON document of ``python -m bench all``) as one PNG.

The only home of matplotlib (the optional ``bench`` extra). Four panels: intake throughput,
latencies against their targets, job throughput, and use of a limit (lanes, backlog memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.backlog import RSS_TARGET_MB
from bench.dispatch import P50_TARGET_MS, P99_TARGET_MS
from bench.intake import LATENCY_P99_TARGET_MS

_BLUE, _ORANGE, _GREY, _RED = "#3b6ea5", "#e08a2c", "#9a9a9a", "#c0392b"


def draw(doc: dict[str, Any], path: Path) -> None:
    scenarios = doc["scenarios"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _intake(axes[0][0], _result(scenarios, "intake"))
    _latency(axes[0][1], _result(scenarios, "intake"), _result(scenarios, "dispatch"))
    _throughput(axes[1][0], _result(scenarios, "e2e"), _result(scenarios, "burst"))
    _limits(axes[1][1], _result(scenarios, "lanes"), _result(scenarios, "backlog"))
    machine = doc["machine"]
    fig.suptitle(
        f"webhookd benchmarks{' (--quick)' if doc['quick'] else ''} — {machine['cpu_model']}, "
        f"{machine['cores']} cores, {machine['python']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _result(scenarios: dict[str, Any], name: str) -> dict[str, Any]:
    entry = scenarios.get(name) or {}
    result: dict[str, Any] = entry.get("result") or {}
    return result


def _bars(ax: Axes, labels: list[str], values: list[float], colors: list[str]) -> None:
    if not values:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    bars = ax.bar(labels, values, color=colors)
    texts = [f"{v:,.0f}" if v >= 10 else f"{v:.2f}" for v in values]
    ax.bar_label(bars, labels=texts, label_type="center", color="white", fontweight="bold")


def _intake(ax: Axes, intake: dict[str, Any]) -> None:
    summary = intake.get("summary", {})
    names = list(summary)
    medians = [summary[n]["rps_median"] for n in names]
    colors = [_GREY if n == "bare" else _BLUE for n in names]
    labels = [n.replace("+", "\n+") for n in names]  # five side by side: "webhookd+job" is long
    _bars(ax, labels, medians, colors)
    if names:
        low = [summary[n]["rps_median"] - summary[n]["rps_min"] for n in names]
        high = [summary[n]["rps_max"] - summary[n]["rps_median"] for n in names]
        ax.errorbar(labels, medians, yerr=[low, high], fmt="none", ecolor="black", capsize=4)
        ratio = intake.get("ratios", {}).get("webhookd")
        if ratio:
            ax.set_xlabel(f"webhookd / bare = {ratio['median']:.2f} (target ≥ 0.60)")
    ax.set_title("Intake, closed loop: req/s (median, min–max)")


def _latency(ax: Axes, intake: dict[str, Any], dispatch: dict[str, Any]) -> None:
    labels, p50, p99 = [], [], []
    for run in intake.get("fixed_rate", []):
        # Two lines per label: the server, then the rate (both servers run every rate).
        labels.append(f"{run.get('target', 'webhookd')}\n@{run['target_rps']:,.0f}/s")
        p50.append(run["p50_ms"])
        p99.append(run["p99_ms"])
    if dispatch.get("ack_to_arrival"):
        labels.append("dispatch")
        p50.append(dispatch["ack_to_arrival"]["p50_ms"])
        p99.append(dispatch["ack_to_arrival"]["p99_ms"])
    if not labels:
        _bars(ax, [], [], [])
    else:
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], p50, width=0.4, color=_BLUE, label="p50")
        ax.bar([x + 0.2 for x in xs], p99, width=0.4, color=_ORANGE, label="p99")
        ax.set_xticks(list(xs), labels, fontsize=8)
        # The targets: webhookd's ack p99 at 1,000/s, and the dispatch's p50 and p99.
        ack, p99_ms, p50_ms = LATENCY_P99_TARGET_MS, P99_TARGET_MS, P50_TARGET_MS
        ax.axhline(ack, color=_RED, linestyle="--", linewidth=1, label=f"ack p99 target {ack:g} ms")
        ax.axhline(
            p99_ms,
            color=_GREY,
            linestyle="--",
            linewidth=1,
            label=f"dispatch p99 target {p99_ms:g} ms",
        )
        ax.axhline(
            p50_ms,
            color=_RED,
            linestyle=":",
            linewidth=1,
            label=f"dispatch p50 target {p50_ms:g} ms",
        )
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("Latency, ms (log scale)")


def _throughput(ax: Axes, e2e: dict[str, Any], burst: dict[str, Any]) -> None:
    labels, values = [], []
    if e2e.get("jobs_per_s"):
        labels.append(f"no-op jobs\n({e2e['jobs']:,} queued)")
        values.append(e2e["jobs_per_s"])
    if burst.get("posted"):
        labels.append(f"burst acks\n({burst['webhooks']:,})")
        values.append(burst["posted"]["acked_per_s"])
        if burst.get("process_all_s"):
            labels.append("burst processed\n(forwarded)")
            values.append(burst["webhooks"] / burst["process_all_s"])
    _bars(ax, labels, values, [_BLUE] * len(values))
    ax.set_title("Jobs and webhooks per second")


def _limits(ax: Axes, lanes: dict[str, Any], backlog: dict[str, Any]) -> None:
    labels, values = [], []
    if lanes.get("configured"):
        rpm, tpm = lanes["configured"]["rpm"], lanes["configured"]["tpm"]
        window = f"{lanes['window_s']:g} s"
        labels += [f"RPM max\n({window})", f"TPM max\n({window})", "RPM avg", "TPM avg"]
        values += [
            100 * lanes["max_rpm"] / rpm,
            100 * lanes["max_tpm"] / tpm,
            100 * lanes["avg_rpm"] / rpm,
            100 * lanes["avg_tpm"] / tpm,
        ]
    if backlog.get("peak_rss_mb"):
        labels.append("backlog\npeak RSS")
        values.append(
            100 * float(backlog["peak_rss_mb"]) / float(backlog.get("target_rss_mb", RSS_TARGET_MB))
        )
    _bars(ax, labels, values, [_BLUE] * len(values))
    ax.axhline(100, color=_RED, linestyle="--", linewidth=1, label="limit")
    ax.axhline(90, color=_GREY, linestyle=":", linewidth=1, label="90 % (lanes, saturated)")
    ax.legend(fontsize=8)
    ax.set_title("Share of a limit, % (lanes: configured RPM/TPM; RSS: its target)")
