"""The command line: click commands over the daemon and the journal; errors become exit codes.

Exit codes: 0 ok, 1 runtime error, 2 bad usage or configuration. Commands that read or change
the journal open the SQLite file directly, so they work whether or not the daemon is running.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import click

from webhookd import __version__
from webhookd import config as config_mod
from webhookd.errors import ConfigError, JournalError, NotFound, WebhookdError
from webhookd.journal import EVENT_STATES, EventDetail, Journal

T = TypeVar("T")

CONFIG_HELP = "Config file (default: $WEBHOOKD_CONFIG, else the embedded default)."


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"webhookd: error: {message}", err=True)
    sys.exit(code)


def _load(path: str | None) -> config_mod.Config:
    from webhookd import actions

    path = path or os.environ.get("WEBHOOKD_CONFIG") or None
    try:
        cfg = config_mod.load(path)
        actions.validate(cfg)
    except ConfigError as exc:
        _fail(str(exc), 2)
    return cfg


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    try:
        return asyncio.run(main())
    except NotFound as exc:
        _fail(f"no event {exc}", 1)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except WebhookdError as exc:
        _fail(str(exc), 1)


def _journal(cfg: config_mod.Config) -> Journal:
    if not cfg.journal.path.exists():
        _fail(f"no journal at {cfg.journal.path} (set journal.path or --config)", 1)
    return Journal(cfg.journal.path)


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")


def parse_since(value: str, now: float | None = None) -> float:
    """``30m``, ``2h``, ``7d`` ago, or an ISO 8601 time (UTC unless it says otherwise)."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(value.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use 30m, 2h, 7d or an ISO time like 2026-01-31T12:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")[:-4] + "Z"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="webhookd")
def main() -> None:
    """webhookd: receive webhooks durably, answer in milliseconds, work in the background."""


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format (overrides log.format).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Log level (overrides log.level).",
)
def serve(config_path: str | None, log_format: str | None, log_level: str | None) -> None:
    """Run the daemon until SIGTERM/SIGINT (a second signal exits at once)."""
    from webhookd import app, logs

    cfg = _load(config_path)
    logs.setup(log_level or cfg.log.level, log_format or cfg.log.format)
    sys.exit(app.run(cfg))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def check(config_path: str | None) -> None:
    """Validate a config file: prints one line, exits 2 naming the bad key."""
    cfg = _load(config_path)
    sources = ", ".join(sorted(cfg.sources)) or "none"
    actions = sum(len(s.actions) for s in cfg.sources.values())
    click.echo(
        f"ok: {cfg.origin}: {len(cfg.sources)} source(s) ({sources}), {actions} "
        f"action(s), {len(cfg.lanes)} lane(s)"
    )


@main.command()
@click.argument("event_id")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the event as JSON.")
def show(event_id: str, config_path: str | None, as_json: bool) -> None:
    """Show one event: its jobs, attempts, errors and results."""
    cfg = _load(config_path)

    async def go() -> EventDetail:
        async with _journal(cfg) as journal:
            return await journal.get_event(event_id)

    detail = _run(go)
    doc = detail.as_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    click.echo(f"event    {doc['id']}  [{doc['state']}]")
    click.echo(f"source   {doc['source']}   received {_when(doc['received_at'])}")
    click.echo(
        f"tenant   {doc['tenant'] or '-'}   priority {doc['priority']}   "
        f"{doc['body_bytes']} bytes {doc['content_type']}"
    )
    click.echo(f"dedup    {doc['dedup_key']}")
    if doc["verified"]:
        click.echo(f"verified {json.dumps(doc['verified'])}")
    for job in doc["jobs"]:
        click.echo(
            f"\n  job {job['id']}  {job['action']} ({job['type']})  [{job['state']}]  "
            f"attempts {job['attempts']}/{job['max_attempts']}"
        )
        if job["state"] == "queued":
            click.echo(f"    next run {_when(job['run_at'])}")
        for attempt in job["errors"]:
            line = f"    #{attempt['attempt']} {_when(attempt['started_at'])} {attempt['outcome']}"
            if attempt["error"]:
                line += f": {attempt['error']}"
            click.echo(line)
        if job["result"] is not None:
            click.echo(f"    result {json.dumps(job['result'], ensure_ascii=False)[:2000]}")


@main.command()
@click.argument("event_ids", nargs=-1)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--dead", is_flag=True, help="Replay every event that has a dead job.")
@click.option("--source", help="With --dead: only this source.")
@click.option("--since", help="With --dead: only events received since (30m, 2h, 7d, ISO time).")
@click.option("--dry-run", is_flag=True, help="Say what would be replayed, change nothing.")
def replay(
    event_ids: tuple[str, ...],
    config_path: str | None,
    dead: bool,
    source: str | None,
    since: str | None,
    dry_run: bool,
) -> None:
    """Re-queue events' jobs with fresh attempts (a running daemon picks them up within 1 s)."""
    if bool(event_ids) == dead:
        raise click.UsageError("give event ids or --dead, not both and not neither")
    if (source or since) and not dead:
        raise click.UsageError("--source and --since go with --dead")
    since_ts = parse_since(since) if since else None
    cfg = _load(config_path)

    async def go() -> dict[str, int]:
        async with _journal(cfg) as journal:
            ids = list(event_ids) or await journal.dead_event_ids(source, since_ts)
            if dry_run:
                for event_id in ids:
                    await journal.get_event(event_id)  # NotFound for a bad id
                return dict.fromkeys(ids, 0)
            out: dict[str, int] = {}
            chunk = 200
            with click.progressbar(
                length=len(ids), label="replaying", file=sys.stderr, hidden=len(ids) < chunk
            ) as bar:
                for start in range(0, len(ids), chunk):
                    out.update(await journal.replay(ids[start : start + chunk]))
                    bar.update(len(ids[start : start + chunk]))
            return out

    result = _run(go)
    if dry_run:
        click.echo(f"would replay {len(result)} event(s)")
        for event_id in result:
            click.echo(event_id)
        return
    jobs = sum(result.values())
    click.echo(f"replayed {len(result)} event(s), {jobs} job(s) re-queued")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--state", type=click.Choice(EVENT_STATES), help="Only events in this state.")
@click.option("--source", help="Only events of this source.")
@click.option("--since", help="Only events received since (30m, 2h, 7d, ISO time).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(
    config_path: str | None,
    state: str | None,
    source: str | None,
    since: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List recent events, newest first."""
    cfg = _load(config_path)
    since_ts = parse_since(since) if since else None

    async def go() -> list[Any]:
        async with _journal(cfg) as journal:
            return await journal.list_events(
                state=state, source=source, limit=limit, since=since_ts
            )

    rows = _run(go)
    for r in rows:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "id": r.id,
                        "source": r.source,
                        "received_at": r.received_at,
                        "tenant": r.tenant or None,
                        "priority": r.priority,
                        "state": r.state,
                        "jobs": r.jobs,
                    }
                )
            )
        else:
            click.echo(
                f"{r.id}  {_when(r.received_at)}  {r.state:<9} {r.source}"
                f"{'  tenant=' + r.tenant if r.tenant else ''}"
            )
    if not rows and not as_json:
        click.echo("no events", err=True)


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True)
def stats(config_path: str | None, as_json: bool) -> None:
    """Counts by state and source, backlog and its oldest age (read from the journal)."""
    cfg = _load(config_path)

    async def go() -> Any:
        async with _journal(cfg) as journal:
            return await journal.counts()

    counts = _run(go)
    now = time.time()
    age = round(now - counts.oldest_queued_at, 1) if counts.oldest_queued_at else None
    doc = {
        "events": counts.events,
        "jobs": dict(counts.jobs_by_state),
        "sources": {k: dict(v) for k, v in counts.jobs_by_source.items()},
        "oldest_queued_age_s": age,
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"events {counts.events}   oldest queued {age if age is not None else '-'} s")
    states = list(counts.jobs_by_state)
    click.echo(f"{'source':<24}" + "".join(f"{s:>10}" for s in states))
    click.echo(f"{'(all)':<24}" + "".join(f"{counts.jobs_by_state[s]:>10}" for s in states))
    for src, by in sorted(counts.jobs_by_source.items()):
        click.echo(f"{src:<24}" + "".join(f"{by.get(s, 0):>10}" for s in states))


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def prune(config_path: str | None) -> None:
    """Delete expired done/dead events and dedup keys now (the daemon also does it hourly)."""
    cfg = _load(config_path)
    jc = cfg.journal

    async def go() -> tuple[int, int]:
        events = dedup = 0
        async with _journal(cfg) as journal:
            while True:
                p = await journal.prune(
                    keep_done_s=jc.keep_done_h * 3600,
                    keep_dead_s=jc.keep_dead_d * 86400,
                    keep_dedup_s=jc.keep_dedup_d * 86400,
                )
                events, dedup = events + p.events, dedup + p.dedup
                if not (p.events or p.dedup):
                    return events, dedup

    events_n, dedup_n = _run(go)
    click.echo(f"pruned {events_n} event(s) and {dedup_n} dedup key(s)")


@main.command()
@click.argument("source")
@click.option(
    "--file",
    "body_file",
    type=click.File("rb"),
    help="Body to send ('-' for stdin; default: a small test payload).",
)
@click.option("--url", help="Where to post (default: server.listen and the source's path).")
@click.option(
    "--id", "delivery_id", help="Delivery id (default: a fresh one; reuse it to test dedup)."
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
def send(
    source: str,
    body_file: Any,
    url: str | None,
    delivery_id: str | None,
    config_path: str | None,
) -> None:
    """Sign a test webhook the way SOURCE's provider would and post it; print the answer.

    Exits 0 on a 2xx answer, 1 on any other answer or a network failure.
    """
    import secrets

    from webhookd import send as send_mod

    cfg = _load(config_path)
    try:
        src = send_mod.resolve(cfg, source)
        delivery = send_mod.build(
            src,
            url=url or send_mod.source_url(cfg, source),
            body=body_file.read() if body_file is not None else None,
            now=time.time(),
            delivery_id=delivery_id or "test_" + secrets.token_hex(8),
        )
    except ConfigError as exc:
        _fail(str(exc), 2)
    except ValueError as exc:
        _fail(str(exc), 2)
    try:
        answer = send_mod.post(delivery)
    except (OSError, ValueError) as exc:  # refused, timed out, or a URL urllib cannot use
        _fail(f"could not post to {delivery.url}: {exc}", 1)
    click.echo(f"{answer.status} {answer.reason}")
    if answer.body:
        click.echo(answer.body.decode("utf-8", "replace"))
    sys.exit(0 if answer.ok else 1)


__all__ = ["JournalError", "main"]
