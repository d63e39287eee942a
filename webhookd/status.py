"""The daemon's status in one line: the heartbeat's log line and the service manager's status."""

from __future__ import annotations

from webhookd.stats import AdminContext, journal_problems_now


def heartbeat_line(ctx: AdminContext) -> str:
    """One key=value line: backlog, rates, workers, paused sources and lanes, and what the
    journal refuses webhooks for, if anything (``/readyz``' words: a full disk, a commit past
    ``ack_timeout_s``, a journal moved away), as last seen."""
    stats = ctx.pool.statistics()
    rates = ctx.throughput.rates() if ctx.throughput is not None else {}
    parts = [
        f"heartbeat backlog={ctx.journal.backlog_jobs}",
        f"accepted_per_s={rates.get('accepted_per_s', 0):.1f}",
        f"finished_per_s={rates.get('finished_per_s', 0):.1f}",
        f"busy={stats.busy}/{stats.concurrency}",
        f"window={stats.window}",
        "outcomes=" + (",".join(f"{k}:{v}" for k, v in sorted(stats.outcomes.items())) or "-"),
    ]
    if ctx.pool.holding:
        parts.append("holding=burst")  # no new job starts while the receiver has a burst
    if ctx.pool.paused:
        parts.append("paused=" + ",".join(sorted(ctx.pool.paused)))
    for name, lane in sorted(ctx.lanes.items()):
        s = lane.statistics()
        parts.append(
            f"lane.{name}=waiting:{s.waiting},admitted:{s.admitted_total}"
            + (f",cooldown_s:{s.cooling_until_s:.0f}" if s.cooling_until_s else "")
            + (",circuit:open" if s.circuit_open else "")
        )
    # Last: text that is not the daemon's own (an OS error, a database's message), quoted.
    if problems := journal_problems_now(ctx.journal, ctx.config.server.ack_timeout_s):
        parts.append(f"journal_problem={'; '.join(problems)!r}")
    return " ".join(parts)


PAUSED_SHOWN = 5  # paused sources a status line names; the rest are counted


def status_line(doing: str, ctx: AdminContext) -> str:
    """What the daemon does, its backlog, workers and intake, then whatever is wrong: a
    commit that does not end, a journal that refuses writes, paused sources, a refused
    reload."""
    stats = ctx.pool.statistics()
    rates = ctx.throughput.rates() if ctx.throughput is not None else {}
    parts = [
        f"{doing}; backlog {ctx.journal.backlog_jobs}, busy {stats.busy}/{stats.concurrency},"
        f" {rates.get('accepted_per_s', 0):.1f} accepted/s"
    ]
    journal = ctx.journal
    if (late_s := journal.writing_for_s()) > ctx.config.server.ack_timeout_s:
        # A stalled disk: no write fails, each just does not end (as /readyz says it).
        parts.append(f"journal: a commit has taken {late_s:.0f} s, webhooks answered 503")
    if journal.writer_problem:
        parts.append(journal.writer_problem)
    elif journal.last_write_error:
        parts.append(f"journal: {journal.last_write_error}")
    if ctx.pool.holding:
        parts.append("new jobs held while a burst is answered")
    if paused := sorted(ctx.pool.paused):
        more = f" and {len(paused) - PAUSED_SHOWN} more" if len(paused) > PAUSED_SHOWN else ""
        parts.append("paused: " + ", ".join(paused[:PAUSED_SHOWN]) + more)
    if ctx.reload_refused:
        parts.append("config reload refused (see the log)")
    return "; ".join(parts)
