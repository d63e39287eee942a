"""Reloading (SIGHUP): what a new config changes, what waits for a restart, what nodes compare.

``plan_reload`` takes a new file's sources, lanes, ``[log]`` and ``[alerts]`` and keeps what a
running daemon cannot change in place; ``check_sources`` holds the sources to the rest of the
config, at a load and at a reload. ``cluster_digest`` and ``cluster_names`` are what the nodes
sharing a PostgreSQL journal publish and compare.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from webhookd.config.checks import _type_name
from webhookd.config.sections import (
    ALERT_SOURCE,
    CATCH_ALL,
    SOURCE_NAME,
    ActionConfig,
    AlertsConfig,
    Config,
    JournalConfig,
    LaneConfig,
    LogConfig,
    ServerConfig,
    SourceConfig,
)
from webhookd.config.table import source_key
from webhookd.errors import ConfigError
from webhookd.schemes import SCHEMES
from webhookd.secret import Secret

# What a running daemon cannot change in place: its listeners, its journal, its pool. A reload
# keeps these as they were and says which changed. (``[log]`` changes in place, but for a key
# the command line set: see ``plan_reload``.)
RESTART_ONLY = ("server", "admin", "journal", "workers")


@dataclass(frozen=True, slots=True)
class Reload:
    """What a reload changes: ``config`` is what the daemon runs from then on."""

    config: Config
    added: tuple[str, ...] = ()  # sources
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()  # changed keys that wait for a restart, e.g. "server", "lanes.x"
    lanes_added: tuple[str, ...] = ()
    lanes_removed: tuple[str, ...] = ()
    alerts: str = ""  # "added", "removed" or "changed" when ``[alerts]`` did
    # "source/action" of each action a changed source no longer has: its queued jobs will
    # find no action to run on (an unnamed action's name is its type, and its type and place
    # once its source has two of that type: adding a second forward renames the first).
    actions_gone: tuple[str, ...] = ()
    # Of those, the unnamed ones the new file gives another name by their place, with it:
    # (key, type, old name, new name). A reload refuses them (their jobs would go dead).
    renamed: tuple[tuple[str, str, str, str], ...] = ()
    # "source/action" of each action whose env: or file: options read other values (a secret
    # rotated in its file): their options as written are the same.
    secrets: tuple[str, ...] = ()
    # Changed sources whose dedup key is made otherwise now (``dedup``, ``tenant``, the
    # verify scheme, ``dedup_body``), with what changed: a provider's retry of a delivery
    # taken before the reload is a new event there.
    rekeyed: tuple[str, ...] = ()

    def summary(self) -> str:
        parts = [
            f"{what} {some(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
                ("new secrets in", self.secrets),
                ("added lanes", self.lanes_added),
                ("removed lanes", self.lanes_removed),
            )
            if names
        ]
        if self.alerts:
            parts.append(f"{self.alerts} [alerts]")
        return "; ".join(parts) or "no source changed"


def _changed(name: str, old: Any, new: Any) -> list[str]:
    """The dotted keys under ``name`` whose values differ (a whole table when it was added or
    removed)."""
    a, b = getattr(old, name), getattr(new, name)
    if a == b:
        return []
    if a is None or b is None or not dataclasses.is_dataclass(a):
        return [name]
    return [
        f"{name}.{f.name}"
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def check_sources(
    sources: Mapping[str, SourceConfig],
    server: ServerConfig,
    journal: JournalConfig,
    lanes: Mapping[str, LaneConfig],
) -> None:
    """What a source's settings must agree with beyond its own table: the server's body limits,
    the journal's dedup window, the lanes, and the other sources' paths. At a load, and again
    at a reload against the sections the running daemon keeps until a restart (a reload takes
    the sources, not ``[server]`` or ``[journal]``).
    """
    seen: dict[str, str] = {}
    inflight = server.max_inflight_body_bytes
    for src in sources.values():
        if (src.max_body_bytes or 0) > inflight:  # else a body that size could never be read
            raise ConfigError(
                f"{source_key(src.name)}.max_body_bytes",
                f"must be at most server.max_inflight_body_bytes ({inflight})",
            )
        if src.name == CATCH_ALL:
            continue
        if src.path in seen:
            raise ConfigError(
                f"{source_key(src.name)}.path",
                f"{src.path} is also used by {source_key(seen[src.path])}",
            )
        seen[src.path] = src.name
    keep_dedup_s = journal.keep_dedup_d * 86_400
    for src in sources.values():
        verify = src.verify
        if (
            verify
            and not SCHEMES[verify.scheme].untimed(verify)
            and verify.tolerance_s > keep_dedup_s
        ):
            # A request re-sent once its delivery id is forgotten would verify as a new event.
            raise ConfigError(
                f"{source_key(src.name)}.verify.tolerance_s",
                f"{verify.tolerance_s:g} s is longer than journal.keep_dedup_d keeps delivery"
                f" ids ({keep_dedup_s:g} s): a request re-sent after would verify again",
            )
        for action in src.actions:
            lane = action.options.get("lane")
            if lane is not None and not isinstance(lane, str):
                raise ConfigError(f"{action.key}.lane", f"must be a string, not {_type_name(lane)}")
            if lane is not None and lane not in lanes:
                raise ConfigError(f"{action.key}.lane", f"no lane named {lane!r} in [lanes]")


def cluster_digest(cfg: Config) -> str:
    """A digest of what nodes sharing a journal must agree on to take each other's webhooks and
    run each other's jobs alike: every key of every source that changes what a node does with a
    webhook or its jobs, and the lanes. Of a source: its path, ``verify`` (the scheme, each key,
    and its secrets by their ``env:``/``file:`` reference, never a value), ``allow_from``,
    ``max_body_bytes``, ``ack_status``, ``dedup``, ``tenant``, ``priority``, its caps and its
    actions (names, types, options as written but those holding only a secret, ``when``,
    ``ordered_by``, caps, ``timeout_s``, retries). Left out, as each node's own: ``[server]``,
    ``[admin]``, ``[journal]``, ``[workers]``, ``[log]``, a source's ``intake_per_s`` (each
    node's receiver answers 429 past its own rate), and what tells no webhook apart (an action's
    place in the file). The same config gives the same digest in every process: tables and sets
    are compared sorted (the order keys are written in, the entries of ``when`` and
    ``allow_from``), arrays in their order (actions, a rotation's secrets)."""
    doc = {
        "sources": {src.name: _digested(src) for src in cfg.all_sources()},
        "lanes": {name: _digested(lane) for name, lane in cfg.lanes.items()},
    }
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cluster_names(cfg: Config) -> str:
    """What this node runs, as the other nodes sharing its journal read it: each source's name
    (the catch-all's ``*``, the alerts' own ``webhookd``) with its actions' names, as JSON. A
    node lacking a job's source or action leaves the job to a live node whose names take it
    (``names_take``)."""
    doc = {src.name: sorted(a.name for a in src.actions) for src in cfg.all_sources()}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def names_take(names: Mapping[str, Collection[str]], source: str, action: str) -> bool:
    """Whether a node whose ``cluster_names`` are ``names`` runs ``action`` of jobs journaled
    under ``source``: found as ``Config.source_for`` finds it (the source of that name, else
    the catch-all for a name it takes, never for the alerts' own)."""
    actions = names.get(source)
    if actions is None and source != ALERT_SOURCE and SOURCE_NAME.fullmatch(source):
        actions = names.get(CATCH_ALL)
    return actions is not None and action in actions


# What ``cluster_digest`` leaves out of a table: each node's own, or nothing a webhook meets
# (an action's dotted key and whether its name was written; ``read``: its secrets' values).
_NOT_DIGESTED: dict[type, frozenset[str]] = {
    SourceConfig: frozenset({"intake_per_s"}),
    ActionConfig: frozenset({"key", "named", "read"}),
}
# Arrays whose entries' order means nothing: every condition must hold, any of its globs or
# networks lets a webhook through.
_UNORDERED = frozenset({"when", "accepts", "allow_from"})


def _digested(value: Any) -> Any:
    """``value`` as JSON for ``cluster_digest``: a secret by its reference, never its value."""
    if isinstance(value, Secret):
        return {"secret": value.reference or "inline"}
    if isinstance(value, ActionConfig):
        value = dataclasses.replace(value, options=_unsecret(value.options))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        skip = _NOT_DIGESTED.get(type(value), frozenset())
        doc = {}
        for f in dataclasses.fields(value):
            if f.name not in skip:
                item = _digested(getattr(value, f.name))
                doc[f.name] = sorted(item, key=json.dumps) if f.name in _UNORDERED else item
        return doc
    if isinstance(value, Mapping):
        return {str(k): _digested(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted((_digested(v) for v in value), key=json.dumps)
    if isinstance(value, (list, tuple)):
        return [_digested(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)  # a network, a TOML date


def _renamed(was: ActionConfig, unnamed: list[ActionConfig]) -> tuple[str, str, str, str]:
    """``Reload.renamed`` of ``was``, an unnamed action the new file names otherwise: the new
    one with its options, else (changed too) its source's actions, which the operator tells
    apart."""
    same = [b for b in unnamed if b.options == was.options]
    if len(same) == 1:
        return same[0].key, was.type, was.name, same[0].name
    where = was.key.rpartition("[")[0]  # sources.<name>.actions
    return where, was.type, was.name, ", ".join(b.name for b in unnamed)


# An action's options that hold nothing but a secret, left out of ``cluster_digest``: a digest
# other nodes read, and one a rotation (a node at a time) would tell apart.
_SECRET_ONLY = frozenset({"secret", "secrets", "api_key"})


def _unsecret(options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: _unsecret(v) if isinstance(v, Mapping) else v
        for k, v in options.items()
        if k not in _SECRET_ONLY
    }


def _key_parts_changed(before: SourceConfig, after: SourceConfig) -> list[str]:
    """What makes ``after``'s dedup keys other than ``before``'s: its ``dedup`` or ``tenant``
    rule (the tenant prefixes a body-hash key), its verify scheme (whose delivery id is the
    key), or ``dedup_body``."""
    was, now = before.verify, after.verify
    parts = [
        ("dedup", before.dedup != after.dedup),
        ("tenant", before.tenant != after.tenant),
        ("verify.scheme", (was and was.scheme) != (now and now.scheme)),
        ("verify.dedup_body", (was and was.dedup_body) != (now and now.dedup_body)),
    ]
    return [name for name, differs in parts if differs]


def plan_reload(old: Config, new: Config, *, fixed: Collection[str] = ()) -> Reload:
    """Take ``new``'s sources (their actions with them), its ``[alerts]``, any lane it adds
    and its ``[log]`` but for the dotted keys in ``fixed`` (those the command line set, e.g.
    ``log.level``); keep everything else of ``old``. A lane that already exists keeps its
    settings (and its buckets' state): changing one in place could let a minute's requests
    through twice."""
    kept = [key for name in RESTART_ONLY for key in _changed(name, old, new)]
    kept += [key for key in _changed("log", old, new) if key in fixed]
    log = dataclasses.replace(
        new.log,
        **{
            f.name: getattr(old.log, f.name)
            for f in dataclasses.fields(LogConfig)
            if f"log.{f.name}" in fixed
        },
    )
    lanes = dict(new.lanes)
    for name, lane in old.lanes.items():
        if name in lanes and lanes[name] != lane:
            kept.append(f"lanes.{name}")
            lanes[name] = lane
    before, after = old.sources, new.sources
    # Checked at the load against the new file's [server] and [journal]; the daemon keeps its
    # own until a restart, so the sources must agree with those (ConfigError: refused).
    check_sources(after, old.server, old.journal, lanes)
    changed = tuple(n for n in after if n in before and after[n] != before[n])
    # The actions whose queued jobs have nothing left to run them: those of a changed source
    # that no longer has them, and all of a source removed (or renamed).
    gone = [
        f"{n}/{a.name}"
        for n, src in before.items()
        for a in src.actions
        if n not in after or a.name not in {b.name for b in after[n].actions}
    ]
    rotated = [
        f"{n}/{a.name}"
        for n in changed
        for a in after[n].actions
        if (was := before[n].action(a.name)) is not None and was.read != a.read
    ]
    renamed = [
        _renamed(a, [b for b in after[n].actions if b.type == a.type and not b.named])
        for n, src in before.items()
        if n in after
        for a in src.actions
        if not a.named and a.name not in {b.name for b in after[n].actions}
        if any(b.type == a.type and not b.named for b in after[n].actions)
    ]
    rekeyed = [
        f"{n} ({', '.join(what)})"
        for n in changed
        if (what := _key_parts_changed(before[n], after[n]))
    ]
    return Reload(
        config=dataclasses.replace(
            old, sources=after, lanes=lanes, log=log, alerts=new.alerts, origin=new.origin
        ),
        added=tuple(n for n in after if n not in before),
        removed=tuple(n for n in before if n not in after),
        changed=changed,
        kept=tuple(kept),
        lanes_added=tuple(n for n in lanes if n not in old.lanes),
        lanes_removed=tuple(n for n in old.lanes if n not in lanes),
        alerts=_alerts_change(old.alerts, new.alerts),
        actions_gone=tuple(gone),
        renamed=tuple(renamed[:1]),
        rekeyed=tuple(rekeyed),
        secrets=tuple(rotated),
    )


def some(names: Sequence[str], most: int = 10) -> str:
    """``names`` for a line of the log or of ``check``: the first ``most``, and how many more (a
    reload of 300 sources made a line of 2 KB)."""
    shown = ", ".join(names[:most])
    return f"{shown} and {len(names) - most} more" if len(names) > most else shown


def _alerts_change(old: AlertsConfig | None, new: AlertsConfig | None) -> str:
    if old == new:
        return ""
    return "added" if old is None else "removed" if new is None else "changed"
