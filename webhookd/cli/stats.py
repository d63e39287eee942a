"""``stats``: the backlog, rates and outcomes, from the running daemon or the journal."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import click

from webhookd import config as config_mod
from webhookd.cli.base import CONFIG_HELP, _journal, _masker, _read_config, _run
from webhookd.cli.daemon import _daemon_stats
from webhookd.cli.group import main
from webhookd.journal import BaseJournal, copies
from webhookd.redact import printable
from webhookd.retention import HOUR_S, kept_s

# ``stats``' recent window (its received rate and attempts), beside the last hour's.
RECENT_S = 300.0
# The dead letters' source when the config has no catch-all: sources no longer configured,
# summed as the metrics label them.
REMOVED_SOURCES = "(removed)"


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON document.")
def stats(config_path: str | None, as_json: bool) -> None:
    """Backlog, oldest queued age, recent rates and outcomes, jobs by source (the counts the
    daemon keeps, with its workers and lanes, when its admin API answers; else all read from
    the journal)."""
    cfg = _read_config(config_path)
    masker = _masker(cfg)

    async def go() -> dict[str, Any]:
        async with _journal(cfg) as journal:
            # Asked first: what the daemon has already counted is not read again here.
            daemon, daemon_error = await _daemon_stats(cfg, await journal.identity())
            now = time.time()
            counted = await _counted(journal, cfg, daemon, now)
            recent = await journal.activity(RECENT_S)
            hour = await journal.activity(HOUR_S)
            if daemon is not None and "cluster" in daemon:
                nodes = daemon["cluster"]["nodes"]
            else:
                # The CLI is no node (SQLite's journal lists only the process that opened it).
                nodes = [n.summary(now) for n in await journal.nodes() if not n.this]
            causes = []
            names = {*cfg.sources, config_mod.ALERT_SOURCE}
            if counted["jobs"].get("dead"):
                # The names a catch-all took are one cause under "*", not a row each; without
                # one, the sources since removed are "(removed)", as in the metrics. A job of
                # an action the catch-all lacks was not its own (a source a reload removed):
                # it keeps its source's name, marked as not in the config.
                catch_all = cfg.sources.get(config_mod.CATCH_ALL)
                other = "*" if catch_all is not None else REMOVED_SOURCES
                actions = [a.name for a in catch_all.actions] if catch_all is not None else None
                causes = await journal.dead_causes(names=names, other=other, other_actions=actions)
        jobs = counted["jobs"]
        # The daemon's, when it answers: a [journal] changed in the file waits for a restart.
        keeps_s = (daemon or {}).get("retention_keeps_s", kept_s(cfg.journal))
        return {
            "events": counted["events"],
            "backlog": jobs.get("queued", 0) + jobs.get("running", 0),
            "oldest_queued_age_s": counted["oldest_queued_age_s"],
            "jobs": jobs,
            "sources": counted["sources"],
            "received_per_min_5m": round(recent.received / (RECENT_S / 60), 1),
            "outcomes_5m": dict(recent.attempts_by_outcome),
            "outcomes_1h": dict(hour.attempts_by_outcome),
            # The windows above longer than retention keeps: they count only what is kept.
            "retention_keeps_s": keeps_s,
            "cut_by_retention": {"5m": keeps_s < RECENT_S, "1h": keeps_s < HOUR_S},
            "paused": counted["paused"],
            "dead_causes": [
                {
                    **asdict(c),
                    "error": masker.text(c.error) if c.error is not None else None,
                    # Of sources not in the config, whose jobs the catch-all does not run.
                    "removed": c.source not in names and c.source != config_mod.CATCH_ALL,
                }
                for c in causes
            ],
            "journal_bytes": counted["journal_bytes"],
            "nodes": nodes,
            "daemon": daemon,
            "daemon_error": daemon_error,
        }

    doc = _run(go)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(_stats_table(doc))


# What ``stats`` takes from the daemon's ``/stats`` when it answers: the counts it keeps (reused
# a while on a large journal, where a count reads every job, as the dashboard's are) and what it
# reads at each asking. The journal is read for them only when the daemon does not answer, or
# answers without one of them (an earlier webhookd's).
_DAEMON_COUNTED = ("events", "jobs", "sources", "oldest_queued_age_s", "paused", "journal_bytes")


async def _counted(
    journal: BaseJournal, cfg: config_mod.Config, daemon: dict[str, Any] | None, now: float
) -> dict[str, Any]:
    """``_DAEMON_COUNTED``'s figures, from the daemon's ``/stats`` or read from the journal."""
    if daemon is not None and all(key in daemon for key in _DAEMON_COUNTED):
        counted = {key: daemon[key] for key in _DAEMON_COUNTED}
        age = counted["oldest_queued_age_s"]
        counted["oldest_queued_age_s"] = round(age, 1) if age is not None else None
        return counted
    counts = await journal.counts(cfg.sources)
    oldest = counts.oldest_due_at
    return {
        "events": counts.events,
        "jobs": dict(counts.jobs_by_state),
        "sources": counts.sources_shown(cfg.sources),
        "oldest_queued_age_s": round(now - oldest, 1) if oldest is not None else None,
        "paused": sorted(await journal.paused_sources()),
        "journal_bytes": await journal.sizes(),
    }


def _stats_table(doc: dict[str, Any]) -> str:
    age = doc["oldest_queued_age_s"]
    lines = [
        f"backlog        {doc['backlog']} job(s)   oldest queued {_age(age)}   "
        f"events {doc['events']}",
        f"received       {doc['received_per_min_5m']}/min (last 5 min)" + _cut(doc, "5m"),
        # Attempts, not jobs: a job retried three times before it went dead is four of them.
        "attempts 5 min " + _pairs(doc["outcomes_5m"]) + _cut(doc, "5m"),
        "attempts 1 h   " + _pairs(doc["outcomes_1h"]) + _cut(doc, "1h"),
    ]
    if doc["paused"]:
        lines.append("paused         " + ", ".join(doc["paused"]))
    files = doc["journal_bytes"]
    if "db" in files:
        lines.append(
            f"journal        {copies.megabytes(files['db'])}   WAL {copies.megabytes(files['wal'])}"
        )
    elif "tables" in files:
        lines.append(f"journal        {copies.megabytes(files['tables'])} in PostgreSQL")
    daemon = doc["daemon"]
    if daemon is not None:
        w = daemon["workers"]
        rates = daemon.get("throughput") or {}
        lines.append(
            f"workers        {w['busy']}/{w['concurrency']} busy   window {w['window']}   "
            f"{rates.get('accepted_per_s', 0)} accepted/s, "
            f"{rates.get('finished_per_s', 0)} finished/s"
            # Else queued jobs beside idle workers, with no reason given.
            + ("   holding new jobs: a burst is being answered" if w.get("holding") else "")
        )
        if w.get("slow"):  # else queued jobs of an action beside idle workers, unexplained
            lines.append(
                "slow           "
                + ", ".join(f"{a['source']}/{a['action']}" for a in w["slow"])
                + ": one job at a time, its last attempts timed out"
                " (workers.slow_after_timeouts)"
            )
        for name, lane in daemon.get("lanes", {}).items():
            lines.append(
                f"lane {name:<9} waiting {lane['waiting']}  admitted {lane['admitted_total']}"
                f"  cooldown {lane['cooling_until_s']:.0f}s"
                f"{'  CIRCUIT OPEN' if lane['circuit_open'] else ''}"
            )
        # Why /readyz answers 503 now (a drain; a full disk or a stalled commit, every webhook
        # refused): the counts alone look like a quiet hour.
        for problem in daemon.get("problems", []):
            lines.append(f"not ready      {problem}")
        # What the daemon runs is not what the file says: as the dashboard and systemd say.
        if daemon.get("reload_refused"):
            lines.append(
                f"config         reload refused, still running the previous config:"
                f" {daemon['reload_refused']}"
            )
        if daemon.get("restart_pending"):
            lines.append(
                "config         changed, applied at the next restart: "
                + ", ".join(daemon["restart_pending"])
            )
    elif doc["daemon_error"] is not None:
        lines.append(f"daemon         {doc['daemon_error']} (journal figures only)")
    for node in doc["nodes"]:
        state = "STALE" if node["stale"] else ("this" if node["this"] else "live")
        # Its sources, actions or lanes are not those of the daemon answering (``None``: not
        # known, from a node or a daemon of an earlier webhookd, or with no daemon asked).
        differs = "  config differs" if node.get("same_config") is False else ""
        lines.append(
            f"node {node['node_id'][-12:]:<12} {node['host'] or '-'}:{node['pid'] or '-'}"
            f"  running {node['running']}  heartbeat {_ago(node['heartbeat_age_s'])}"
            f"  {state}{differs}"
        )
    states = list(doc["jobs"])
    lines.append("")
    lines.append(f"{'source':<24}" + "".join(f"{s:>10}" for s in states))
    lines.append(f"{'(all)':<24}" + "".join(f"{doc['jobs'][s]:>10}" for s in states))
    for src, by in doc["sources"].items():
        mark = " (paused)" if src in doc["paused"] else ""
        lines.append(f"{(src + mark)[:24]:<24}" + "".join(f"{by.get(s, 0):>10}" for s in states))
    if doc["dead_causes"]:
        lines += ["", "dead letters by cause (`webhookd events --state dead` lists them)"]
        now = time.time()
        for c in doc["dead_causes"]:
            error = printable(c["error"]) if c["error"] is not None else "(no error recorded)"
            removed = c["removed"] and c["source"] != REMOVED_SOURCES  # which says so itself
            mark = " (not in the config)" if removed else ""
            lines.append(
                f"{c['jobs']:>7}  {c['source']}/{c['action']}{mark}  {error}"
                f"  (latest {_ago(now - c['last_at'])})"
            )
    return "\n".join(lines)


def _cut(doc: dict[str, Any], window: str) -> str:
    """What follows a figure of the last ``window`` when retention keeps less than it: the
    journal it is counted from holds only the events of the kept part."""
    if not doc["cut_by_retention"][window]:
        return ""
    return f"   (retention keeps {_age(doc['retention_keeps_s'])}: counts cover what is kept)"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _ago(seconds: float | None) -> str:
    """How long ago, or how far ahead of this machine's clock a time written by a clock ahead of
    it (another node's, or this one's before a step back) is."""
    if seconds is not None and seconds < -1:
        return f"{_age(-seconds)} ahead of this clock"
    return "-" if seconds is None else f"{_age(max(seconds, 0.0))} ago"


def _pairs(counts: dict[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"
