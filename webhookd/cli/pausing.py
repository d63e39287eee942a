"""``pause`` and ``resume`` a source's jobs: in the journal, and in a running daemon."""

from __future__ import annotations

import click

from webhookd import pauses
from webhookd.cli.base import (
    CONFIG_HELP,
    JSON_HELP,
    _fail,
    _journal,
    _read_config,
    _refuse_copied,
    _run,
    _utf8,
)
from webhookd.cli.daemon import _daemon_applies
from webhookd.cli.group import main
from webhookd.cli.text import _echo_json


@main.command()
@click.argument("source")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def pause(source: str, config_path: str | None, as_json: bool) -> None:
    """Hold processing of SOURCE's jobs; its webhooks are still accepted and journaled."""
    _pause_or_resume(source, config_path, pausing=True, as_json=as_json)


@main.command()
@click.argument("source")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def resume(source: str, config_path: str | None, as_json: bool) -> None:
    """Let SOURCE's jobs run again (a running daemon notices within a second)."""
    _pause_or_resume(source, config_path, pausing=False, as_json=as_json)


def _pause_or_resume(
    source: str, config_path: str | None, *, pausing: bool, as_json: bool = False
) -> None:
    """``pause`` or ``resume``; with ``as_json``, what ``POST /sources/<name>/pause`` answers
    (``source``, ``paused``, ``changed``, and ``catch_all`` and ``journaled``: see
    ``pauses.Named``), and whether the running daemon has ``applied`` it already and the
    config has the source no more (``removed``)."""
    cfg = _read_config(config_path)
    if pausing and (refused := pauses.refused_pause(source)):
        _fail(refused, 2)
    _refuse_copied(cfg, "pause" if pausing else "resume")
    # A source the config no longer has can still be resumed while it is paused: its jobs would
    # otherwise wait for good (they go dead at their turn, as other removed sources' do).
    removed = cfg.source_for(source) is None
    # A name that is not UTF-8 text was never paused (no journaled name is), nor can the
    # journal be asked of it.
    if removed and (pausing or not _utf8(source)):
        _fail(cfg.no_source(source), 2)
    # Only a pause is refused: a "*" paused by an earlier webhookd can still be resumed.
    if pausing and (said := cfg.by_other_names(source)):
        _fail(said, 2)

    async def go() -> tuple[pauses.Named, bool | None, tuple[bool, str | None]]:
        async with _journal(cfg) as journal:
            paused = source in await journal.paused_sources()
            named = await pauses.name_of(cfg, journal, source, pausing=pausing, paused=paused)
            if (removed and not paused) or named.refused is not None:
                return named, None, (False, None)
            changed = await (journal.pause(source) if pausing else journal.resume(source))
            identity = await journal.identity()
        if named.slip_of is not None or removed:
            # A slip, or a source the config has no more, resumed as it was paused: the daemon,
            # asked now, would refuse it (a slip, or a 404: it is paused no more), and reads
            # the resume within a second.
            return named, changed, (False, None)
        # The daemon reads the change at its next sweep (within a second); asked, it applies
        # it before it answers, so no job of a source said paused starts after the answer.
        return named, changed, await _daemon_applies(cfg, identity, source, pausing)

    named, changed, (applied, why_not) = _run(go)
    if changed is None:
        _fail(named.refused or cfg.no_source(source), 2)
    # On PostgreSQL the daemon asked is one node, the one at this config's admin API: every
    # node hears of the change within a second (a NOTIFY), that one before it answers.
    cluster = cfg.journal.url is not None
    daemon = "this config's node" if cluster else "the daemon"
    if why_not is not None:
        click.echo(f"webhookd: note: {daemon} was not asked to apply it now: {why_not}", err=True)
    # A name the catch-all takes: said so, so that a slip of an expected name shows.
    taken = f"; {said}" if (said := named.said()) else ""
    if as_json:
        _echo_json(
            {
                "source": source,
                "paused": pausing,
                "changed": changed,
                "applied": applied,
                "removed": removed,
                **named.fields(),
            }
        )
    elif pausing:
        held = _when(cluster, applied, "none of its jobs")
        click.echo(
            f"paused {source}: {held} (running ones finish their attempt){taken}"
            if changed
            else f"{source} was already paused{taken}"
        )
    elif removed:
        click.echo(
            f"resumed {source}, which {cfg.origin} has no more: its queued jobs go dead at"
            " their turn (webhookd replay --dead runs them once it is back)"
        )
    else:
        click.echo(
            f"resumed {source}: {_when(cluster, applied, 'its jobs again')}{taken}"
            if changed
            else f"{source} was not paused{taken}"
        )


def _when(cluster: bool, applied: bool, what: str) -> str:
    """Who starts ``what`` (``none of its jobs``) and from when: the daemon, from now if it
    applied the change; on a cluster this config's node from now and the other nodes within
    a second (a NOTIFY), or every node within a second when the one asked did not answer."""
    if not cluster:
        when = "from now" if applied else "within a second, if one runs"
        return f"the daemon starts {what} {when}"
    if applied:
        return f"this config's node starts {what} from now, the other nodes within a second"
    return f"the nodes start {what} within a second"
