"""``show`` one event and list ``events`` (``--follow`` too): the verbs that only read."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import click

from webhookd import config as config_mod
from webhookd.cli.base import (
    CONFIG_HELP,
    MAX_CONTAINS,
    _event,
    _journal,
    _masker,
    _read_config,
    _run,
    _unknown_source_note,
    _utf8_only,
)
from webhookd.cli.group import main
from webhookd.cli.text import _when, parse_since
from webhookd.clock import SYSTEM_CLOCK, Clock
from webhookd.errors import JournalUnavailable, WebhookdError
from webhookd.journal import EVENT_STATES, BaseJournal, EventDetail, serve_lock_held
from webhookd.journal.records import EventSummary
from webhookd.models import EVENT_ID
from webhookd.redact import Masker, printable
from webhookd.schemes import SCHEMES


def _json_shown(text: str) -> str:
    """JSON text as it may go to a terminal: ``ensure_ascii=False`` keeps non-ASCII text
    readable but passes C1 controls (U+009B is CSI to some terminals) and the like through
    raw; each is written as its ``\\u`` escape, which leaves the document the same."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\n" else json.dumps(c)[1:-1] for c in text)


# How much of a body ``show`` prints on its line (``--json`` has the first 64 KB), of a failed
# attempt's answer (its first 1 KB is kept), and of a model's answer.
_BODY_PREVIEW_CHARS = 200


_RESPONSE_PREVIEW_CHARS = 200


_TEXT_PREVIEW_CHARS = 4000


def _waits(job: dict[str, Any]) -> str:
    """Why a queued job waits, when no attempt of it says so: a lane's 429 or an exhausted
    quota puts it back without using an attempt."""
    reason = job.get("last_error")
    if not reason or any(a["error"] == reason for a in job["errors"]):
        return ""
    return printable(f" (waits: {reason})")


def _verified_line(verified: dict[str, Any]) -> str:
    """How a webhook verified, in ``show``'s words and times (``--json`` has the fields)."""
    line = f"verified {verified.get('scheme')}"
    if verified.get("secret_index"):  # not the first: a rotation's older secret still in use
        line += f" with secrets[{verified['secret_index']}]"
    if verified.get("timestamp") is not None:
        line += f", signed {_when(verified['timestamp'])}"
    return printable(line + f", checked {_when(verified.get('received_at'))}")


# The headers a provider names a webhook's kind in (GitHub's event, Shopify's topic and shop),
# for show: its body alone does not say whether it was a push or an order's update.
_SAYS_WHAT = frozenset(
    {
        "x-github-event",
        "x-shopify-topic",
        "x-shopify-shop-domain",
        "shopify-topic",
        "shopify-shop-domain",
    }
)


def _second_key_note(cfg: config_mod.Config, key: str) -> str:
    """What else a missing key may mean at a source whose webhooks have a second dedup key (what
    was signed): a delivery found a duplicate by that one keeps no key of its own."""
    src = cfg.sources.get(key.partition(":")[0])
    verify = src.verify if src is not None else None
    if verify is None:
        return ""
    scheme = SCHEMES[verify.scheme]
    if not scheme.keeps_signed_key(verify):
        return ""
    if scheme.body_unsigned:
        return " answered as a duplicate by its signature's token,"
    return " answered as a duplicate of another delivery with the same signed body,"


@main.command()
@click.argument("event_id", required=False)
@click.option(
    "--key",
    help="Instead of an id: the event that owns this dedup key, SOURCE:KEY (the source's name"
    " and the provider's delivery id, as `show` prints it under dedup).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the event as JSON.")
def show(event_id: str | None, key: str | None, config_path: str | None, as_json: bool) -> None:
    """Show one event: its jobs, attempts, errors and results."""
    if bool(event_id) == bool(key):
        raise click.UsageError("give an event id or --key, not both and not neither")
    _utf8_only(key, "--key")
    cfg = _read_config(config_path)

    async def go() -> tuple[EventDetail, bool]:
        async with _journal(cfg) as journal:
            detail = await found_event(journal)
            return detail, detail.event.source in await journal.paused_sources()

    async def found_event(journal: BaseJournal) -> EventDetail:
        if event_id is not None:
            return await _event(journal, event_id)
        assert key is not None  # one of the two: checked above
        found = await journal.event_by_key(key)
        if found is None:
            # A key without its source's name is the commonest miss: say the form.
            form = "" if ":" in key else " (a key is SOURCE:DELIVERY_ID, e.g. shopify:<id>)"
            raise WebhookdError(
                printable(
                    f"no event has the dedup key {key!r}{form}: never seen,"
                    f"{_second_key_note(cfg, key)} or its key is older than"
                    f" journal.keep_dedup_d ({cfg.journal.keep_dedup_d:g} d)"
                )
            )
        owner, first_seen_at, detail = found
        if detail is None:
            raise WebhookdError(
                printable(
                    f"the dedup key {key!r} was first seen {_when(first_seen_at)} as"
                    f" {owner}, which has been pruned since"
                )
            )
        return detail

    detail, paused = _run(go, cfg.journal)
    # Masked as the log and the admin API mask it (secrets whose variable is exported here).
    source = cfg.source_for(detail.event.source)
    doc = _masker(cfg).deep(detail.as_dict(source.verify if source else None))
    if as_json:
        click.echo(_json_shown(json.dumps(doc, indent=2, ensure_ascii=False)))
        return
    # A job left running by a daemon that is gone (kill -9, a crash) until a start recovers it.
    idle_journal = cfg.journal.url is None and serve_lock_held(cfg.journal.path) is False
    click.echo(f"event    {doc['id']}  [{doc['state']}]")
    click.echo(f"source   {doc['source']}   received {_when(doc['received_at'])}")
    if doc["query"]:
        click.echo(printable(f"query    {doc['query']}"))
    click.echo(
        printable(
            f"tenant   {doc['tenant'] or '-'}   priority {doc['priority']}   "
            f"{doc['body_bytes']} bytes {doc['content_type']}"
        )
    )
    click.echo(printable(f"dedup    {doc['dedup_key']}"))
    # What the webhook is, where the provider says it in a header, not the body.
    kinds = [f"{n}: {v}" for n, v in doc["headers"] if n.lower() in _SAYS_WHAT]
    if kinds:
        click.echo(printable(f"type     {'   '.join(kinds)}"))
    if doc["body"]:
        more = len(doc["body"]) > _BODY_PREVIEW_CHARS or doc["body_truncated"]
        preview = doc["body"][:_BODY_PREVIEW_CHARS] + (" …" if more else "")
        click.echo(f"body     {printable(preview)}")
    if doc["verified"]:
        click.echo(_verified_line(doc["verified"]))
    if doc["filtered"]:
        whose = "their" if len(doc["filtered"]) > 1 else "its"
        click.echo(f"filtered {', '.join(doc['filtered'])} ({whose} when did not match: no job)")
    for job in doc["jobs"]:
        click.echo(
            f"\n  job {job['id']}  {job['action']} ({job['type']})  [{job['state']}"
            f"{', cancel pending' if job['cancel_requested'] else ''}]  "
            f"attempts {job['attempts']}/{job['max_attempts']}"
        )
        if job["state"] == "queued" and job["waiting_for"]:
            click.echo(f"    waits for {job['waiting_for']}, before it in its order key")
        elif job["state"] == "queued" and paused:
            click.echo(f"    held: {doc['source']} is paused (webhookd resume {doc['source']})")
        elif job["state"] == "queued":
            click.echo(f"    next run {_when(job['run_at'])}{_waits(job)}")
        elif job["state"] == "running" and idle_journal:
            click.echo("    no daemon runs on this journal: the next start queues it again")
        elif job["state"] == "cancelled" and job["dismissed_at"] is not None:
            click.echo(f"    dismissed {_when(job['dismissed_at'])} (replay --dismissed undoes it)")
        elif job["state"] == "cancelled" and job["finished_at"] is not None:
            click.echo(f"    cancelled {_when(job['finished_at'])}")
        last = 0
        for attempt in job["errors"]:
            if attempt["attempt"] <= last:  # a replay starts the count over
                click.echo("    replayed:")
            # An attempt a drain cut off is not counted: the next one has its number.
            uncounted = (attempt["detail"] or {}).get("counted") is False
            last = attempt["attempt"] - 1 if uncounted else attempt["attempt"]
            line = f"    #{attempt['attempt']} {_when(attempt['started_at'])} {attempt['outcome']}"
            line += " (not counted)" if uncounted else ""
            if attempt["error"]:
                line += f": {attempt['error']}"
            click.echo(printable(line))
            response = (attempt["detail"] or {}).get("response")
            if response and attempt["outcome"] != "done":  # what the target said about it
                head = " ".join(str(response).split())[:_RESPONSE_PREVIEW_CHARS]
                more = " …" if len(str(response)) > _RESPONSE_PREVIEW_CHARS else ""
                click.echo(printable(f"      response: {head}{more}"))
            # A command's output, kept with its attempt; a python handler's traceback.
            for stream in ("stdout", "stderr", "traceback"):
                output = (attempt["detail"] or {}).get(stream)
                if output:
                    click.echo(f"      {stream}:")
                    for output_line in output.rstrip("\n").split("\n"):
                        click.echo("        " + printable(output_line))
            # Why a command's output may end early: a process it left held its pipes.
            if pipes := (attempt["detail"] or {}).get("pipes"):
                click.echo(printable(f"      pipes: {pipes}"))
        result = job["result"]
        text = result.get("text") if isinstance(result, dict) else None
        if isinstance(text, str):  # a model's answer: read as text, not as an escaped string
            rest = {k: v for k, v in result.items() if k != "text"}
            click.echo(printable(f"    result {_cut_shown(json.dumps(rest, ensure_ascii=False))}"))
            click.echo("    text:")
            for text_line in text[:_TEXT_PREVIEW_CHARS].split("\n"):
                click.echo("      " + printable(text_line) if text_line else "")
            if len(text) > _TEXT_PREVIEW_CHARS:
                click.echo(f"      … ({len(text):,} characters: --json has them all)")
        elif result is not None:
            shown = _cut_shown(json.dumps(result, ensure_ascii=False))
            click.echo(printable(f"    result {shown}"))


_RESULT_SHOWN_CHARS = 2000


def _cut_shown(text: str) -> str:
    """A result's JSON as ``show`` prints it: its start, saying so when it was cut (the whole
    was shown to end there, with nothing to tell it was not)."""
    if len(text) <= _RESULT_SHOWN_CHARS:
        return text
    return f"{text[:_RESULT_SHOWN_CHARS]} … ({len(text):,} characters: --json has them all)"


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--state", type=click.Choice(EVENT_STATES), help="Only events in this state.")
@click.option("--source", help="Only events of this source.")
@click.option("--tenant", help="Only events of this tenant (as sent, even one kept as a digest).")
@click.option(
    "--since", help="Only events received since (30m, 2h, 7d, or an ISO time, UTC unless it says)."
)
@click.option(
    "--contains",
    help="Only events whose body holds this text (an order id, an email): a scan of the"
    " bodies, newest first, in this process (not the daemon's); --since and --source make it"
    " shorter.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="At most this many events, newest first.",
)
@click.option(
    "--before",
    help="Only events journaled before this event id: the next page, given the last id of one"
    " (past --limit's 100,000, say).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Then print each new event as it is journaled, oldest first, until interrupted (the"
    " listing itself is then oldest first too); not with --state or --before.",
)
def events(
    config_path: str | None,
    state: str | None,
    source: str | None,
    tenant: str | None,
    since: str | None,
    contains: str | None,
    limit: int,
    before: str | None,
    as_json: bool,
    follow: bool,
) -> None:
    """List recent events, newest first."""
    if before is not None and not EVENT_ID.fullmatch(before):
        raise click.BadParameter(
            "must be an event id (evt_ and 26 characters)", param_hint="--before"
        )
    if follow and before is not None:
        raise click.UsageError("--follow prints what arrives from now; --before is for a listing")
    _utf8_only(source, "--source")
    _utf8_only(tenant, "--tenant")
    cfg = _read_config(config_path)
    _unknown_source_note(cfg, source)
    since_ts = parse_since(since) if since else None
    if contains is not None and not 1 <= len(contains) <= MAX_CONTAINS:
        raise click.BadParameter(f"give 1 to {MAX_CONTAINS} characters", param_hint="--contains")
    if follow and state is not None:
        raise click.UsageError(
            "--follow prints events as they arrive, in whatever state; --state is for a listing"
        )
    masker = _masker(cfg)

    async def go() -> list[Any]:
        async with _journal(cfg) as journal:
            listing = partial(
                journal.list_events,
                state=state,
                source=source,
                tenant=tenant,
                # Byte for byte: text typed in another encoding is searched for as its bytes.
                contains=contains.encode("utf-8", "surrogateescape") if contains else None,
            )
            if follow:
                echo = partial(_echo_event, masker=masker, as_json=as_json)
                await _follow(journal, listing, limit, since_ts, echo)
                return []
            # One more than shown: whether there is a next page to point to.
            return await listing(limit=limit + 1, since=since_ts, before=before)

    rows = _run(go)
    more = not follow and len(rows) > limit
    rows = rows[:limit]
    for r in rows:
        _echo_event(r, masker, as_json)
    if not rows and not as_json:
        click.echo("no events", err=True)
    elif more:
        which = "the next" if before else "the newest"
        click.echo(
            f"webhookd: note: {which} {limit} shown; --limit for more, or --before"
            f" {rows[-1].id} for the next page",
            err=True,
        )


def _echo_event(r: EventSummary, masker: Masker, as_json: bool) -> None:
    if as_json:
        row = {
            "id": r.id,
            "source": r.source,
            "received_at": r.received_at,
            "tenant": r.tenant or None,
            "priority": r.priority,
            "state": r.state,
            "jobs": r.jobs,
        }
        click.echo(json.dumps(masker.deep(row)))
    else:
        click.echo(
            printable(
                masker.text(
                    f"{r.id}  {_when(r.received_at)}  {r.state:<9} {r.source}"
                    f"{'  tenant=' + r.tenant if r.tenant else ''}"
                )
            )
        )


# ``events --follow``: how often the journal is asked, and how many events one ask reads at most.
# Each ask reads the events journaled since the journal's position (``position()``) at the one
# before, not since a receive time: a wall clock stepped either way, or a node's running ahead
# or behind, moves no event in or out of it. Where several nodes write (PostgreSQL), an event
# can commit after one at a later position: each ask reads back to the position of the ask
# FOLLOW_LOOK_BACK_S before (on the monotonic clock), and the ids printed since keep what it
# reads again from being printed twice.
FOLLOW_EVERY_S = 0.5


FOLLOW_LOOK_BACK_S = 10.0


FOLLOW_PAGE = 10_000


# An ask the database did not answer (a restart, a failover) is made again this long after,
# doubling up to FOLLOW_RETRY_MAX_S.
FOLLOW_RETRY_MAX_S = 8.0


async def _follow(
    journal: BaseJournal,
    listing: Callable[..., Awaitable[list[EventSummary]]],
    limit: int,
    since: float | None,
    echo: Callable[[EventSummary], None],
    clock: Clock = SYSTEM_CLOCK,
) -> None:
    """Print the listing (``listing``'s newest ``limit``) oldest first, then each event
    journaled after it, until cancelled."""
    back_s = 0.0 if journal.one_writer else FOLLOW_LOOK_BACK_S
    high = await journal.position()
    rows = await listing(limit=limit, since=since, positions=(0, high))
    asks: deque[tuple[float, int]] = deque()  # (monotonic time, position) of each ask
    shown: dict[str, int] = {}  # id → the position it was read up to, while an ask may read it
    said_more = False
    while True:
        asks.append((clock.monotonic(), high))
        for r in reversed(rows):  # newest first from the journal: printed oldest first
            if r.id not in shown:
                shown[r.id] = high
                echo(r)
        pause_s, failed = FOLLOW_EVERY_S, False
        while True:
            await asyncio.sleep(pause_s)
            # Back to the latest ask at least back_s old, or to the first while none is.
            while len(asks) > 1 and asks[1][0] <= clock.monotonic() - back_s:
                asks.popleft()
            low = asks[0][1]
            try:
                high = max(await journal.position(), low)
                rows = await listing(limit=FOLLOW_PAGE, since=since, positions=(low, high))
                break
            except JournalUnavailable as exc:  # a database's outage: waited out
                if not failed:
                    failed = True
                    click.echo(f"webhookd: {exc}; asking again until it answers", err=True)
                pause_s = min(max(pause_s, FOLLOW_EVERY_S) * 2, FOLLOW_RETRY_MAX_S)
        if failed:
            click.echo("webhookd: the journal answers again", err=True)
        for event_id in [i for i, upto in shown.items() if upto <= low]:
            del shown[event_id]
        if len(rows) == FOLLOW_PAGE and not said_more:
            said_more = True
            click.echo(
                f"webhookd: note: over {FOLLOW_PAGE:,} events at once: some are not shown"
                " (--source or --contains shows fewer)",
                err=True,
            )
