"""The config's types: a frozen dataclass per section and table, and the ``Config`` of them all.

Each key's default is written once, on its field (``setting()``); ``webhookd.config.parsing``
fills them from a file. Here too: the names the config reserves (the catch-all ``*``, the
alerts' own source) and the walks over a config (``leaves``, ``secrets_in``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from webhookd.config.checks import closest
from webhookd.config.table import setting
from webhookd.config.values import (
    Condition,
    Extractor,
    Listen,
    Network,
    _admin_listen,
    parse_extractor,
    parse_listen,
    parse_networks,
    parse_when,
)
from webhookd.models import Priority
from webhookd.schemes.base import VerifyConfig
from webhookd.secret import Secret

CATCH_ALL = "*"
# A source's name is part of URLs (/hooks/<name>), metric labels, log lines, the journal and CLI
# arguments, whether it is configured or taken by the catch-all: a short printable token only,
# 1 to 64 of [A-Za-z0-9._-] not starting with '.' (no spaces, '%', NUL, ';', escape codes, or
# dot-only names like ".."). A configured source's `path` does not lift it: the name is still
# in the labels, logs and journal.
SOURCE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
SOURCE_NAME_RULE = "1 to 64 characters from [A-Za-z0-9._-], not starting with '.'"
# The source of webhookd's own alert events (``[alerts]``): no user source may take the name,
# and the receiver never accepts it, so only the daemon itself creates its events.
ALERT_SOURCE = "webhookd"
ALERT_ACTION = "alert"

# The action kinds users may write; ``actions`` implements exactly these (a test checks), so
# config stays below it in the import graph. Signature schemes: ``webhookd.schemes.SCHEMES``.
ACTION_KINDS = ("log", "forward", "openai", "command", "python")
DEFAULT_MAX_COOLDOWN_S = 3600.0  # a lane's longest 429 cool-down, whatever the provider asks

# The shortest admin.token taken on an admin.listen that is not loopback.
MIN_ADMIN_TOKEN_CHARS = 16


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Listen = setting(Listen("127.0.0.1", 8080), parse=parse_listen)
    max_body_bytes: int = setting(1_048_576, positive=True)
    ack_timeout_s: float = setting(2.0, positive=True)
    max_backlog: int = setting(1_000_000, positive=True)
    retry_after_s: int = setting(5, positive=True)
    body_timeout_s: float = setting(10.0, positive=True)
    max_inflight_body_bytes: int = setting(64 * 1_048_576, positive=True)
    max_connections: int = setting(1024, positive=True)
    # Peers whose X-Forwarded-For names the client (a TLS proxy's address): what the log lines
    # of refused and rejected webhooks then show as the peer.
    trusted_proxies: tuple[Network, ...] = setting((), parse=parse_networks)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen | None = setting(Listen("127.0.0.1", 8081), parse=_admin_listen)
    token: Secret | None = None


@dataclass(frozen=True, slots=True)
class JournalConfig:
    path: Path = Path("./webhookd.db")
    # A PostgreSQL journal shared by several nodes instead of the SQLite file.
    url: Secret | None = None
    lease_s: float = setting(30.0, positive=True)
    # asyncpg's prepared-statement cache per connection; 0 for PgBouncer < 1.21 (transaction mode).
    statement_cache_size: int = setting(100, minimum=0)
    # A direct URL for LISTEN alone, where ``url`` goes through a pooler in transaction mode.
    listen_url: Secret | None = None
    keep_done_h: float = setting(24.0, minimum=0)
    keep_dead_d: float = setting(14.0, minimum=0)
    keep_dedup_d: float = setting(7.0, minimum=0)
    prune_interval_s: float = setting(60.0, positive=True, minimum=0.01)


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    concurrency: int = setting(32, minimum=1)
    shutdown_grace_s: float = setting(25.0, minimum=0)
    # Each a wake of an idle daemon (prune_interval_s too): at 1e-9 s it used a whole core.
    sweep_interval_s: float = setting(1.0, positive=True, minimum=0.01)
    window: int = setting(1000, minimum=1)
    max_recoveries: int = setting(3, minimum=1)
    # After this many attempts of an action in a row end by its timeout_s, it runs one job at a
    # time on this node until an attempt ends otherwise (0: never).
    slow_after_timeouts: int = setting(3, minimum=0)
    weights: tuple[int, int, int] = (8, 4, 1)  # high, normal, low: read from [workers.weights]


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = setting("info", choices=("debug", "info", "warning", "error"))
    format: Literal["text", "json"] = "text"
    # "all": a line per finished attempt, done ones at info; "failures": done ones (and a
    # lane's paced waits) at debug, so a busy box logs its retries and dead letters only.
    jobs: str = setting("all", choices=("all", "failures"))


@dataclass(frozen=True, slots=True)
class LaneConfig:
    name: str
    rpm: int | None = setting(None, positive=True)
    tpm: int | None = setting(None, positive=True)
    burst_s: float = setting(3.0, positive=True)
    # The longest a provider's 429 (Retry-After, x-ratelimit-reset-*) may close the lane.
    max_cooldown_s: float = setting(DEFAULT_MAX_COOLDOWN_S, positive=True)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """An action's backoff; the defaults are the kinds' common ones (each kind may differ)."""

    max_attempts: int = setting(3, minimum=1)
    base_s: float = setting(1.0, minimum=0)
    factor: float = setting(4.0, minimum=1)
    cap_s: float = setting(300.0, minimum=0)


@dataclass(frozen=True, slots=True)
class ActionDefaults:
    """What an action kind's actions get for the shared keys they leave out.

    Each kind declares its own (``DEFAULTS`` in its module); the field defaults are the ones
    kinds share unless they say otherwise.
    """

    timeout_s: float = setting(30.0, positive=True)
    retry: RetryPolicy = RetryPolicy()


# An action kind's defaults, by its name; the second argument is the dotted key of the action's
# ``type``, for the error of a kind that cannot be loaded.
KindDefaults = Callable[[str, str], ActionDefaults]


@dataclass(frozen=True, slots=True)
class PriorityRule:
    default: Priority = Priority.NORMAL
    by: Extractor | None = None  # None: the tenant
    high: frozenset[str] = frozenset()
    normal: frozenset[str] = frozenset()
    low: frozenset[str] = frozenset()

    def classify(self, value: str | None) -> Priority:
        if value is not None:
            if value in self.high:
                return Priority.HIGH
            if value in self.low:
                return Priority.LOW
            if value in self.normal:
                return Priority.NORMAL
        return self.default


@dataclass(frozen=True, slots=True)
class ActionConfig:
    name: str
    type: str
    key: str  # dotted config key, for error messages
    timeout_s: float
    retry: RetryPolicy
    concurrency: int | None = setting(None, minimum=1)
    ordered_by: Extractor | None = setting(None, parse=parse_extractor)
    # Every condition must allow the event's value, or the action gets no job for it.
    when: tuple[Condition, ...] = setting((), parse=parse_when)
    options: Mapping[str, Any] = field(default_factory=dict)
    # False for a name made from the type (and, beside another of its type, its place).
    named: bool = field(default=True, compare=False)
    # A digest of what its env: and file: options held when the config was read
    # (``read_digest``): options as written compare equal when a file's secret was rotated.
    # Not in its repr, nor in ``cluster_digest``: nodes rotate a secret one at a time.
    read: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    path: str
    verify: VerifyConfig | None = None
    dedup: Extractor | None = None
    tenant: Extractor | None = None
    priority: PriorityRule = PriorityRule()
    # At least one webhook in about 17 minutes: a rate near zero makes a Retry-After no
    # number can hold.
    intake_per_s: float | None = setting(None, minimum=0.001)
    ack_status: int = 202
    concurrency: int | None = setting(None, minimum=1)
    # A cap on one tenant's running jobs of this source.
    tenant_concurrency: int | None = setting(None, minimum=1)
    # This source's own body limit in place of server.max_body_bytes (a mail provider's
    # attachments beside small JSON webhooks); None: the server's.
    max_body_bytes: int | None = setting(None, positive=True)
    # The senders taken (the peer, or the client a trusted proxy names); () takes any. A
    # provider's published ranges, or an internal sender's address, beside its signature.
    allow_from: tuple[Network, ...] = setting((), parse=parse_networks)
    actions: tuple[ActionConfig, ...] = ()

    def action(self, name: str) -> ActionConfig | None:
        for action in self.actions:
            if action.name == name:
                return action
        return None


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """``[alerts]``: where to POST a summary when jobs go dead or the backlog grows old.

    ``source`` is the reserved ``webhookd`` source whose one forward action delivers the
    alerts; it is built here, not written by the user.
    """

    url: Secret
    source: SourceConfig
    on_dead: bool = True
    backlog_age_s: float | None = setting(None, positive=True)  # None: no backlog alerts
    # One alert of a kind per 5 minutes: the first goes out at once, a storm of dead jobs then
    # costs at most 12 summaries an hour per kind, well inside chat services' rate limits.
    min_interval_s: float = setting(300.0, minimum=0)
    # An action whose every attempt has failed for this long is told (its retries may take
    # hours to go dead); then again each interval while it fails, and once when it is done
    # again. 0: no failing alerts.
    failing_s: float = setting(300.0, minimum=0)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    journal: JournalConfig = JournalConfig()
    workers: WorkersConfig = WorkersConfig()
    log: LogConfig = LogConfig()
    lanes: Mapping[str, LaneConfig] = field(default_factory=dict)
    sources: Mapping[str, SourceConfig] = field(default_factory=dict)
    alerts: AlertsConfig | None = None
    origin: str = "embedded default"

    def source_for(self, name: str) -> SourceConfig | None:
        """The configured source called ``name``, else the catch-all (``"*"``) if there is one
        and ``name`` is one it takes (``SOURCE_NAME``: a pause or a replay of ``../x`` names no
        source).

        ``webhookd`` is the alerts' own source (when ``[alerts]`` is set), never the catch-all.
        """
        if name == ALERT_SOURCE:
            return self.alerts.source if self.alerts is not None else None
        found = self.sources.get(name)
        if found is None and SOURCE_NAME.fullmatch(name):
            return self.sources.get(CATCH_ALL)
        return found

    def counted_as(self, name: str) -> str:
        """The name a source's jobs are counted and followed under: the source ``source_for``
        finds (``*`` for a name the catch-all took, so a sender's choice of names is one
        entry), else the name itself (a source since removed)."""
        source = self.source_for(name)
        return source.name if source is not None else name

    def by_other_names(self, name: str) -> str | None:
        """What a verb that acts on one source's events or jobs says of a name the catch-all
        would seem to take but never journals: its own name ``*`` (events go by the name each
        webhook came to; metrics and ``stats`` sum them under ``*``), and a configured source's
        name in another case (the receiver refuses /hooks/Shop beside "shop"), where a pause
        would hold nothing. None for any other."""
        if CATCH_ALL not in self.sources:
            return None
        if name != CATCH_ALL:
            if name in self.sources:
                return None
            names = [*self.sources, *([ALERT_SOURCE] if self.alerts is not None else [])]
            # Another name in another case: the alerts' own, given exactly, is no slip.
            same = sorted(
                n for n in names if n.lower() == name.lower() and n not in (name, CATCH_ALL)
            )
            if not same:
                return None
            return (
                f"no source {name!r}: source names are case-sensitive, and the receiver refuses"
                f" /hooks/{name} beside {same[0]!r} (did you mean {same[0]}?)"
            )
        return (
            f'"{CATCH_ALL}" is the catch-all: its events and jobs go by the name each webhook'
            " came to (/hooks/<name>); give that name (webhookd events lists them)"
        )

    def no_source(self, name: str, *, takes_webhooks: bool = False) -> str:
        """What a verb says of a source name it found no source for: the configured names, and
        the closest if ``name`` looks misspelt; of ``*`` with no catch-all, that ``*`` is the
        catch-all's. ``takes_webhooks`` (``send``): also that the catch-all never takes the
        alerts' own source."""
        names = sorted(n for n in self.sources if n != CATCH_ALL)
        configured = f"(configured: {', '.join(names) or 'none'})"
        if name == CATCH_ALL and CATCH_ALL not in self.sources:  # the catch-all's, not a slip
            return (
                f'no source {name!r}: "{CATCH_ALL}" is the catch-all, and {self.origin} has'
                f" none {configured}"
            )
        if not SOURCE_NAME.fullmatch(name):
            return f"no source {name!r}: a source's name is {SOURCE_NAME_RULE}"
        said = f"no source {name!r} in {self.origin} {configured}"
        if takes_webhooks and CATCH_ALL in self.sources:
            said += f'; the catch-all "{CATCH_ALL}" never takes "{ALERT_SOURCE}" (the alerts\')'
        close = self.close_source(name)
        return f"{said} (did you mean {close}?)" if close else said

    def close_source(self, name: str) -> str | None:
        """The configured source ``name`` is most likely a misspelling of, if one is close."""
        # Names are short: "shpo" scores 0.75 against "shop", under the 0.8 keys are held to.
        return closest(name, (n for n in self.sources if n != CATCH_ALL), cutoff=0.7)

    def all_sources(self) -> tuple[SourceConfig, ...]:
        """The user's sources, and the alerts' own source when there is one (to build actions)."""
        own = (self.alerts.source,) if self.alerts is not None else ()
        return (*self.sources.values(), *own)

    def longest_wait_s(self) -> float:
        """The longest a queued job is ever planned ahead: a retry's ``cap_s`` (a ``Retry-After``
        is capped at it too), a lane's ``max_cooldown_s``, or the hour a 429 without a lane
        waits at most. A job due later was planned by a clock ahead of this one."""
        caps = [a.retry.cap_s for src in self.all_sources() for a in src.actions]
        cooldowns = [lane.max_cooldown_s for lane in self.lanes.values()]
        return max([DEFAULT_MAX_COOLDOWN_S, *caps, *cooldowns])


def no_sources(cfg: Config) -> str | None:
    """What ``check`` and the daemon warn of a config without a source of its own: where
    webhooks go."""
    if any(name != CATCH_ALL for name in cfg.sources):
        return None
    catch_all = cfg.sources.get(CATCH_ALL)
    if catch_all is None:
        return "sources: none configured: every webhook is answered 404"
    how = "unsigned" if catch_all.verify is None else f"verified as {catch_all.verify.scheme}"
    return (
        f'sources: none configured but the catch-all "{CATCH_ALL}": every webhook goes to it, {how}'
    )


def leaves(obj: Any) -> Iterator[Any]:
    """Every value ``obj`` (a config or a part of one) holds below its dataclasses, mappings and
    sequences, in config order, each object once."""
    # A stack of iterators, not a nested generator calling itself: that one referred to itself
    # through its closure, a cycle that kept its ``seen`` set (0.7 MB at 300 sources) alive
    # until a collection, which the daemon's tuned collector seldom runs, so every reload
    # (several walks each) added megabytes: 80 MB to 763 MB over 200 reloads.
    seen: set[int] = set()
    stack: list[Iterator[Any]] = [iter((obj,))]
    while stack:
        for node in stack[-1]:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if dataclasses.is_dataclass(node) and not isinstance(node, type):
                stack.append(iter([getattr(node, f.name) for f in dataclasses.fields(node)]))
            elif isinstance(node, Mapping):
                stack.append(iter(list(node.values())))
            elif isinstance(node, list | tuple | set | frozenset):
                stack.append(iter(node))
            else:
                yield node
                continue
            break  # into the node just pushed
        else:
            stack.pop()


def secrets_in(obj: Any) -> list[Secret]:
    """Every ``Secret`` held by ``obj`` (a config or a part of one), in config order."""
    return [leaf for leaf in leaves(obj) if isinstance(leaf, Secret)]
