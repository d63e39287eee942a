"""Configuration: TOML → frozen dataclasses, validated, with dotted-key errors and ``env:`` secrets.

Every key is checked: an unknown key, a wrong type or a bad value raises ``ConfigError`` naming
the dotted key (``sources.shop.actions[0].url``). Secrets written ``"env:NAME"`` or
``"file:PATH"`` are resolved here, at each load, and wrapped in ``Secret`` so that no ``repr``
or log line can show them.
Action-specific keys (``url`` for ``forward``, ``model`` for ``openai`` …) are kept in
``ActionConfig.options`` and validated by the action's own module when actions are built; a
``verify`` table is read here and checked by its signature scheme (``webhookd.schemes``).

A default is written once, on its dataclass field; ``setting()`` keeps the field's bounds
beside it, and ``Table.read`` fills a dataclass from a table with them. Action kinds read their
options with the same ``Table``, and hand their own defaults for the shared action keys
(``timeout_s``, ``retry``) to ``parse`` as ``kinds``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import fnmatch
import functools
import hashlib
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from webhookd.errors import ConfigError
from webhookd.models import Priority
from webhookd.schemes import SCHEMES
from webhookd.schemes.base import OPTION_KEYS
from webhookd.schemes.base import VerifyConfig as VerifyConfig
from webhookd.secret import Secret as Secret

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

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

EMBEDDED_DEFAULT = """\
# webhookd's embedded default: a development setup on loopback.
[server]
listen = "127.0.0.1:8080"

[admin]
listen = "127.0.0.1:8081"

[journal]
path = "./webhookd.db"

# The catch-all source: any POST /hooks/<name> is accepted unsigned and logged.
[sources."*"]
[[sources."*".actions]]
type = "log"
"""

_BARE_KEY = re.compile(r"[A-Za-z0-9_*-]+")


T = TypeVar("T")
_RULE = "webhookd.rule"


@dataclass(frozen=True, slots=True)
class Rule:
    """How ``Table.read`` checks one key: bounds for numbers, choices for strings, or a parser.

    A field's type says which getter reads it (``int``, ``float``, ``str``, ``bool``, ``Path``,
    ``Secret``, a ``Literal`` of strings, any of them ``| None``); ``parse(value, dotted_key)``
    replaces the getter for anything else.
    """

    minimum: float | None = None
    positive: bool = False
    choices: tuple[str, ...] = ()
    parse: Callable[[Any, str], Any] | None = None


def setting(
    default: T,
    *,
    minimum: float | None = None,
    positive: bool = False,
    choices: tuple[str, ...] = (),
    parse: Callable[[Any, str], Any] | None = None,
) -> T:
    """A dataclass field holding a config key: its one default, and how its value is checked."""
    rule = Rule(minimum=minimum, positive=positive, choices=choices, parse=parse)
    return field(default=default, metadata={_RULE: rule})


@dataclass(frozen=True, slots=True)
class Extractor:
    """Where a value is in a request: ``header:NAME``, ``json:a.b``, ``form:FIELD`` or ``body``."""

    kind: Literal["header", "json", "form", "body"]
    arg: str = ""

    @property
    def spec(self) -> str:
        return self.kind if self.kind == "body" else f"{self.kind}:{self.arg}"


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def overlaps(self, other: Listen) -> bool:
        """Whether binding both would fail: the same port, not 0 (each 0 gets a free port of its
        own), on addresses that meet. As the kernel sees it (asyncio binds IPv6 only on IPv6
        sockets): a wildcard (``0.0.0.0``, ``::``) meets every address of its family, so
        ``0.0.0.0:8080`` and ``127.0.0.1:8080`` conflict while ``0.0.0.0`` and ``::`` do not.
        ``localhost`` is ``127.0.0.1`` and ``::1``; any other name meets itself and the
        wildcards of both families, its address being unknown until it is resolved."""
        if self.port == 0 or self.port != other.port:
            return False
        return any(_meet(a, b) for a in _addresses(self.host) for b in _addresses(other.host))


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address | str  # str: a name, lowercased


def _addresses(host: str) -> tuple[_Address, ...]:
    if host.lower() == "localhost":
        return (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        return (host.lower(),)


def _meet(a: _Address, b: _Address) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        ip = b if isinstance(a, str) else a
        return a == b or (not isinstance(ip, str) and ip.is_unspecified)
    return a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: Any, key: str) -> tuple[Network, ...]:
    """An array of IP addresses or networks (``"10.0.0.0/8"``, ``"::1"``)."""
    shape = 'must be an array of IP addresses or networks, like ["127.0.0.1", "10.0.0.0/8"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, shape)
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(key, f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def parse_listen(value: Any, key: str) -> Listen:
    if not isinstance(value, str):
        raise ConfigError(key, 'must be a string like "127.0.0.1:8080"')
    host, sep, port_text = value.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):  # "²" is a digit too
        raise ConfigError(key, f"{value!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range")
    if not host:
        # Every interface is a choice to write out: a bare ":8080" read as one took webhooks
        # from the whole network where loopback was meant.
        raise ConfigError(
            key,
            f"{value!r} names no host: write 127.0.0.1:{port} (0.0.0.0:{port}: every interface)",
        )
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(key, f"{value!r} is not HOST:PORT (an IPv6 host is written [::1]:PORT)")
    return Listen(host.strip("[]"), port)


def parse_extractor(value: Any, key: str) -> Extractor:
    if not isinstance(value, str):
        raise ConfigError(key, 'must be "header:NAME", "json:a.b", "form:FIELD" or "body"')
    if value == "body":
        return Extractor("body")
    kind, sep, arg = value.partition(":")
    if not sep or not arg or kind not in ("header", "json", "form"):
        raise ConfigError(
            key, f'{value!r} must be "header:NAME", "json:a.b", "form:FIELD" or "body"'
        )
    if kind == "json" and "" in arg.split("."):  # a value no request could ever have there
        raise ConfigError(key, f"{value!r} has an empty step in its path (json:a.b)")
    return Extractor(kind, arg)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Condition:
    """One key of an action's ``when``: where the value is, and the values it may have."""

    extractor: Extractor
    accepts: tuple[str, ...]  # shell-style globs (``*``, ``?``, ``[...]``), case-sensitive

    def allows(self, value: str | None) -> bool:
        """Whether ``value`` is one of the accepted ones; a missing value (``None``) never is."""
        return value is not None and any(fnmatch.fnmatchcase(value, p) for p in self.accepts)


def parse_when(value: Any, key: str) -> tuple[Condition, ...]:
    """An action's ``when``: extractor keys, each with a non-empty array of accepted strings."""
    t = Table(value, key)
    if not t.data:
        raise ConfigError(key, "needs at least one key (leave when out to run on every event)")
    conditions = []
    for name in list(t.data):
        ckey = t.path(name)
        try:
            spec = parse_extractor(name, ckey)
        except ConfigError:
            if name.startswith("json:") and name != "json:":  # a path with an empty step
                raise
            spec = Extractor("body")
        if spec.kind == "body":  # a body hash: no one can write the value it would have to be
            raise ConfigError(ckey, 'must be "header:NAME", "json:a.b" or "form:FIELD"')
        accepts = t.raw(name)
        if not isinstance(accepts, list) or not accepts:
            raise ConfigError(ckey, "must be a non-empty array of strings")
        for i, item in enumerate(accepts):
            if not isinstance(item, str):
                raise ConfigError(f"{ckey}[{i}]", f"must be a string, not {_type_name(item)}")
        conditions.append(Condition(spec, tuple(accepts)))
    t.finish()
    return tuple(conditions)


def _admin_listen(value: Any, key: str) -> Listen | None:
    return None if value == "" else parse_listen(value, key)  # "": no admin listener


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


# ---------------------------------------------------------------------------------------------
# Reloading (SIGHUP)

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


# ---------------------------------------------------------------------------------------------
# Parsing


_MISSING: Any = object()
D = TypeVar("D", bound="DataclassInstance")


class Table:
    """A TOML table being read: typed getters that remember which keys were used.

    Every error names the dotted key (``sources.a.actions[0].url``). The whole config, action
    options included, is read with it.
    """

    def __init__(self, data: Any, key: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(key, f"must be a table, not {_type_name(data)}")
        self.data = data
        self.key = key
        self._used: set[str] = set()
        # Every key looked for, here or not: what a "did you mean" may offer.
        self._asked: set[str] = set()

    def path(self, name: str) -> str:
        part = name if _BARE_KEY.fullmatch(name) else json.dumps(name)  # as TOML would quote it
        return f"{self.key}.{part}" if self.key else part

    def has(self, name: str) -> bool:
        self._asked.add(name)
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._used.add(name)
        self._asked.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            # A key written beside it may be this one misspelt: ``tpe`` for ``type``.
            close = closest(name, [k for k in self.data if isinstance(k, str)], 0.75)
            said = f" (is {json.dumps(close)} a misspelling of it?)" if close else ""
            raise ConfigError(self.path(name), f"is required{said}")
        return default

    def string(self, name: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str):
            raise ConfigError(self.path(name), f"must be a string, not {_type_name(value)}")
        if choices and value not in choices:
            raise ConfigError(self.path(name), f"must be one of {', '.join(choices)}")
        return value

    def number(
        self,
        name: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        integer: bool = False,
        positive: bool = False,
    ) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        return check_number(
            value, self.path(name), minimum=minimum, integer=integer, positive=positive
        )

    def bool(self, name: str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ConfigError(self.path(name), f"must be true or false, not {_type_name(value)}")
        return value

    def secret(self, name: str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        return read_secret(value, self.path(name))

    def table(self, name: str) -> Table:
        return Table(self.raw(name, {}), self.path(name))

    def read(self, base: D, *, only: Iterable[str] | None = None) -> D:
        """``base`` with each of its fields that this table holds read, checked, and put in.

        ``base`` carries the defaults (most often the dataclass's own: ``ServerConfig()``); a
        field is read from the key of its name, as its type and its ``setting()`` rule say.
        ``only`` limits which fields are keys of this table.
        """
        wanted = None if only is None else set(only)
        hints = _type_hints(type(base))
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(base):
            if (wanted is None or f.name in wanted) and self.has(f.name):
                rule: Rule = f.metadata.get(_RULE) or Rule()
                changes[f.name] = self._value(f.name, hints[f.name], rule)
        return dataclasses.replace(base, **changes)

    def _value(self, name: str, hint: Any, rule: Rule) -> Any:
        if rule.parse is not None:
            return rule.parse(self.raw(name), self.path(name))
        kind = _unoptional(hint)
        if kind is bool:
            return self.bool(name)
        if kind in (int, float):
            value = self.number(
                name, integer=kind is int, minimum=rule.minimum, positive=rule.positive
            )
            return kind(value)
        if kind is str or get_origin(kind) is Literal:
            return self.string(name, choices=rule.choices or get_args(kind))
        if kind is Path:
            return Path(self.string(name))
        if kind is Secret:
            return self.secret(name)
        raise TypeError(f"no reader for {name}: {hint!r}; give its setting() a parse")

    def only(self, names: Iterable[str], what: str, near: Iterable[str] = ()) -> None:
        """Refuse a key not in ``names`` at once, before any value is checked (``what``: whose).

        A misspelt key then shows as itself, not as the required key it was meant to be. The
        key it is closest to, of ``names`` and ``near`` (keys read elsewhere), is suggested.
        """
        allowed = set(names)
        for name in self.data:
            if name not in allowed:
                said = _unknown(name, allowed | set(near), f"unknown key {what}")
                raise ConfigError(self.path(name), said)
        self._used.update(self.data)

    def finish(self) -> None:
        for name in self.data:
            if name not in self._used:
                raise ConfigError(self.path(name), _unknown(name, self._asked, "unknown key"))


def _unknown(name: str, known: Iterable[str], said: str, cutoff: float = 0.8) -> str:
    """``said``, and the known key ``name`` is most likely a misspelling of, if one is close."""
    close = closest(name, known, cutoff)
    return f"{said} (did you mean {close}?)" if close else said


# Names other tools use, or that a reader guesses, for keys spelt another way here: no
# misspelling of them, so the ratio alone does not find them. The first one known wins (an
# action's max_attempts is its retry table's).
_MEANT = {
    "lvl": ("level",),
    "loglevel": ("level",),
    "max_retries": ("max_attempts", "retry"),
    "retries": ("max_attempts", "retry"),
    "attempts": ("max_attempts", "retry"),
    "max_attempts": ("retry",),
    "backoff": ("retry",),
    "timeout": ("timeout_s",),
    "medium": ("normal",),
}


def closest(name: str, known: Iterable[str], cutoff: float = 0.8) -> str | None:
    """The known name ``name`` is most likely a misspelling of: the same but for case, else
    by difflib's ratio, or one letter off (a short key's ratio is low for one slip: rpn, rpm)."""
    keys = sorted(known)
    meant = [key for key in _MEANT.get(name.lower(), ()) if key in known]
    if meant:
        return meant[0]
    close = [key for key in keys if key.lower() == name.lower() and key != name][:1]
    close = close or difflib.get_close_matches(name, keys, n=1, cutoff=cutoff)
    if not close and len(name) >= 3:
        close = [key for key in keys if _one_letter_off(name, key)][:1]
    return close[0] if close else None


def _one_letter_off(a: str, b: str) -> bool:
    """One letter changed, added, dropped, or two neighbours swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return len(diff) == 1 or (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unoptional(hint: Any) -> Any:
    """``X`` for ``X | None``; anything else as it is."""
    if isinstance(hint, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _except(name: str, cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != name)


def _field_default(cls: type, name: str) -> Any:
    """The default written on dataclass ``cls``'s field ``name`` (for keys read by hand)."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    raise LookupError(f"{cls.__name__}.{name} has no default")


def check_journal_url(url: Secret, key: str) -> None:
    """A PostgreSQL URL, or a ``ConfigError`` naming ``key`` (the URL itself is never shown).

    What would otherwise fail only as the daemon connects, with an error that names no key: a
    port that is not a port, and an ``@``, ``/``, ``?`` or ``#`` in the user or password, which
    the driver takes for the end of them (a host that does not exist, while the URL as masked
    shows the right one, or the rest of the password).
    """
    text = url.reveal()
    if not text.startswith(("postgresql://", "postgres://")):
        raise ConfigError(key, "must be a postgresql:// URL")
    if credentials_unclear(text):
        raise ConfigError(
            key,
            "has an @ or # that leaves unclear where its password ends: in a user, password or"
            " option, write / as %2F, ? as %3F, @ as %40 and # as %23",
        )
    netloc = text.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
    hosts = netloc.rpartition("@")[2]
    for host in hosts.split(","):  # libpq's list of hosts, each with its own port
        if host.startswith("[") and "]" not in host:
            raise ConfigError(key, "has a [ with no ] after it: write an IPv6 host [addr]:port")
        name, colon, port = host.rpartition(":")
        if not colon or name.endswith(":") or (host.startswith("[") and not name.endswith("]")):
            continue  # no port (an IPv6 address's own colons are inside its brackets)
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            # Not quoted: with a / or ? in a password, what stands here is part of the password.
            raise ConfigError(
                key,
                "has a port that is not a number from 1 to 65535 (in a password, write / as %2F"
                " and ? as %3F)",
            )


def credentials_unclear(url: str) -> bool:
    """Whether ``url`` may hold a password that a parser would split, so that a part of it
    reads as the host, path, options or fragment: an ``@`` past the first ``/``, ``?`` or
    ``#`` after ``//``, two ``@`` before it, or a ``#`` at all (a libpq URL has no fragment).
    Such a URL is neither taken nor shown, since no reading of it is sure."""
    rest = url.partition("://")[2]
    if "#" in rest:
        return True
    end = next((i for i, c in enumerate(rest) if c in "/?"), len(rest))
    return rest.count("@", 0, end) > 1 or "@" in rest[end:]


def check_number(
    value: Any,
    key: str,
    *,
    minimum: float | None = None,
    integer: bool = False,
    positive: bool = False,
) -> Any:
    """``value`` if it is a finite number within bounds, else a ``ConfigError`` naming ``key``.

    Every number in a config goes through here. TOML has ``nan`` and ``inf``; neither is a
    usable timeout, rate or size (``nan`` fails every comparison, so it slips past the bounds).
    """
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(key, f"must be {kind}, not {_type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, not {value}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        # TOML's own range, which Python's reader does not hold to; SQLite and PostgreSQL
        # refuse such a number at the first write (a max_attempts: every webhook a 503).
        raise ConfigError(key, "is beyond a 64-bit integer")
    if positive and value <= 0:
        raise ConfigError(key, "must be greater than 0")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be at least {minimum}")
    name = key.rpartition(".")[2]
    unit = None if name.endswith("per_s") else _DURATION_UNITS.get(name.rpartition("_")[2])
    if unit is not None and value * unit > _LONGEST_S:
        # A deadline that far off is past what the clock can say (1e300 s of shutdown_grace_s
        # crashed the stop's watchdog), and no wait that long is meant.
        raise ConfigError(key, "is longer than 100 years")
    return value


# Durations are named by their unit (``_s``, ``_h``, ``_d``); none may pass 100 years.
_DURATION_UNITS = {"s": 1, "h": 3_600, "d": 86_400}
_LONGEST_S = 100 * 365 * 86_400


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


# The most bytes read of a file: secret (a token, a key, a URL), of a config file, and of a
# PEM file (a CA bundle: the system's is a few hundred KB).
SECRET_FILE_BYTES = 64 * 1024
CONFIG_FILE_BYTES = 4 * 1024 * 1024
PEM_FILE_BYTES = 16 * 1024 * 1024


class Unfit(Exception):
    """A file that is not read: a pipe or a device (reading one may block, or never end), or
    one larger than any file of its kind."""


def read_small(path: str | Path, most: int) -> bytes:
    """A regular file's bytes, at most ``most`` of them (``Unfit`` otherwise; ``OSError`` as
    reading it raises one). Opened without blocking, so a FIFO with no writer is refused, not
    waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Unfit("not a regular file (a pipe or a device)")
        data = f.read(most + 1)
    if len(data) > most:
        raise Unfit(f"larger than {most // 1024:,} KiB")
    return data


def read_small_text(path: Path, most: int) -> str:
    """``read_small`` as UTF-8 text (``UnicodeDecodeError`` if it is not)."""
    return read_small(path, most).decode("utf-8")


def no_reference(value: str, key: str, what: str) -> None:
    """``ConfigError`` for an ``env:``/``file:`` reference in a key that takes no secret and
    would use the text as written."""
    if value.startswith(("env:", "file:")):
        raise ConfigError(key, f"is {what}, written as it is (env: and file: are for secrets)")


def read_secret(value: Any, key: str = "", *, lines: bool = False) -> Secret:
    """A secret as written in config: ``"env:NAME"``, ``"file:PATH"`` or the value itself; one
    that cannot be had (unset, unreadable, empty) is *missing* (see ``Secret``). So is one read
    from a variable or a file that holds a line break, unless ``lines`` (a command's
    environment: a PEM key): two secrets in one file (``cat old new``) verified nothing."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, 'must be a non-empty string (a secret, "env:NAME" or "file:PATH")')
    if value == "env:":
        raise ConfigError(key, '"env:" names no variable: write "env:NAME"')
    if value == "file:":
        raise ConfigError(key, '"file:" names no file: write "file:PATH"')
    for prefix, what in (("env:", "NAME"), ("file:", "PATH")):
        if value[: len(prefix)].lower() == prefix and not value.startswith(prefix):
            # "ENV:NAME" would be taken as the secret itself, and no webhook would verify. The
            # value is not shown: as written it is a secret.
            raise ConfigError(
                key,
                f'reads no {"variable" if prefix == "env:" else "file"}: write "{prefix}{what}"'
                " in lower case (as written, it would be the secret itself)",
            )
    if value.startswith("env:") and not _variable_name(value[4:]):
        # A secret pasted after the prefix: every error naming the variable (the log, /stats,
        # the dashboard, check) showed it whole.
        raise ConfigError(
            key,
            "env: must name an environment variable; this one does not look like a name (not"
            " shown: it may be the secret itself)",
        )
    if value.startswith("file:") and _not_a_path(value[5:]):
        raise ConfigError(
            key,
            "file: must name a file; this one does not look like a path (not shown: it may be"
            " the secret itself)",
        )
    if value.startswith("env:"):
        read = os.environ.get(value[4:])  # None: not set
        flaw = "" if lines or read is None else _line_breaks(read, "variable")
        return Secret(read, origin=value, key=key, flaw=flaw)
    if value.startswith("file:"):
        # A file's whole text, less its trailing newline (Docker secrets, systemd credentials);
        # read at every load, so a reload (SIGHUP) takes a rotated one.
        try:
            text = read_small_text(Path(value[5:]), SECRET_FILE_BYTES)
        except (OSError, UnicodeDecodeError, ValueError, Unfit) as exc:  # ValueError: a NUL
            if isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror
            elif isinstance(exc, UnicodeDecodeError):
                reason = "not UTF-8"
            elif isinstance(exc, Unfit):
                reason = str(exc)
            else:
                reason = "not a file path"
            return Secret(None, origin=value, key=key, unreadable=reason)
        text = text.rstrip("\r\n")
        flaw = "" if lines else _line_breaks(text, "file")
        return Secret(text, origin=value, key=key, flaw=flaw)
    return Secret(value, key=key)


# How the secrets of providers and APIs begin (Stripe, OpenAI, Shopify, Slack, GitHub, GitLab,
# Mailgun, SendGrid, Standard Webhooks): after env: or file:, one was pasted in place of a name.
_SECRET_PREFIXES = (
    "whsec_",
    "sk-",
    "sk_",
    "rk_",
    "shpss_",
    "shpat_",
    "shpca_",
    "shppa_",
    "xoxb-",
    "xoxp-",
    "xapp-",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "glpat-",
    "key-",
    "SG.",
)
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _variable_name(name: str) -> bool:
    """Whether ``name``, after ``env:``, reads as the name of an environment variable (which an
    error may show), not as a secret: letters, digits and ``_``, 128 at most (names run long:
    ACME_STRIPE_WEBHOOK_SIGNING_SECRET_PRODUCTION), not beginning as a provider's secret does
    nor a run of 16 letters and digits (a hex key)."""
    return bool(_VARIABLE_NAME.fullmatch(name)) and not _reads_as_secret(name)


def _not_a_path(path: str) -> bool:
    """Whether ``path``, after ``file:``, is clearly a secret rather than a file's path: one
    beginning as a provider's secret does, or a run of letters and digits with no ``/``."""
    return path.startswith(_SECRET_PREFIXES) or ("/" not in path and _reads_as_secret(path))


def _reads_as_secret(text: str) -> bool:
    return text.startswith(_SECRET_PREFIXES) or (
        len(text) >= 16
        and text.isascii()
        and text.isalnum()
        and any(c.isdigit() for c in text)
        and any(c.isalpha() for c in text)
    )


def _line_breaks(value: str, where: str) -> str:
    """What is wrong with a secret read from a ``where`` (a file, a variable) that holds a line
    break, for ``Secret``'s error; "" when it holds none."""
    count = len(re.split(r"\r\n?|\n", value.rstrip("\r\n")))
    if count == 1:
        # A file's trailing newline is dropped as it is read; a variable's is kept.
        return "ends in a line break, which no secret does" if value.endswith(("\r", "\n")) else ""
    return (
        f"holds {count} lines: one secret per {where} (secrets = [...] takes two, each from"
        f" its own {where})"
    )


def resolve_secret(value: Any, key: str, *, lines: bool = False) -> Secret:
    """A secret from config: ``"env:NAME"`` is looked up in the environment (and must be set),
    ``"file:PATH"`` read from its file (which must be readable and not empty); ``lines``: as
    ``read_secret`` takes it."""
    secret = read_secret(value, key, lines=lines)
    secret.reveal()
    return secret


# The action options whose value may be a secret written ``env:``/``file:`` (an action keeps its
# options as written), and the tables whose every value may be one.
SECRET_OPTIONS = frozenset({"url", "forward", "proxy", "secret", "secrets", "api_key"})
SECRET_TABLES = frozenset({"headers", "env"})


def secret_options(table: Mapping[str, Any], key: str) -> Iterator[tuple[str, Any]]:
    """The options of one action's table that take a secret, with their dotted keys (at module
    level: a nested generator calling itself is a cycle, garbage the daemon seldom frees)."""
    for name, value in table.items():
        path = f"{key}.{name}"
        if name in SECRET_OPTIONS:
            if isinstance(value, list) and name == "secrets":  # elsewhere: the wrong type
                yield from ((f"{path}[{i}]", item) for i, item in enumerate(value))
            else:
                yield path, value
        elif name in SECRET_TABLES and isinstance(value, Mapping):
            yield from ((f"{path}.{k}", item) for k, item in value.items())
        elif isinstance(value, Mapping):  # then = { forward = ..., headers = ... }
            yield from secret_options(value, path)


def read_digest(options: Mapping[str, Any]) -> str:
    """A digest of the values an action's ``env:`` and ``file:`` options hold now, read as its
    kind reads them: what a reload compares to tell which actions' secrets changed, never
    showing them. One that cannot be read adds its error; the action's build reports it."""
    digest = hashlib.sha256()
    for where, value in secret_options(options, ""):
        if isinstance(value, str) and value.startswith(("env:", "file:")):
            try:
                secret = read_secret(value, where, lines=True)
                read = "" if secret.missing else secret.reveal()
            except ConfigError as exc:
                read = f"\0{exc}"
            digest.update(f"{where}\0{read}\0".encode())
    return digest.hexdigest()


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token


def header_value(value: str, key: str) -> str:
    """``value`` if an HTTP header can carry it, else ``ConfigError`` naming ``key`` (without the
    value: it may be a secret). Refused here, at the start, rather than by every
    request that sends it."""
    if any(c in value for c in "\r\n\0"):
        raise ConfigError(
            key,
            "holds a line break or a NUL, which no header can carry (an env: value ending in"
            " a newline?)",
        )
    return value


# An openai action's api_key when none is written: the openai package's own variable.
DEFAULT_OPENAI_API_KEY = "env:OPENAI_API_KEY"


def text_or_secret(value: str, key: str, *, lines: bool = False) -> str:
    """An option's text, or, written ``"env:NAME"`` or ``"file:PATH"``, the secret it names
    (which must be there, as ``resolve_secret`` says): a header's credential or a URL that is
    one stays out of the config file. Its value is masked wherever shown (``secret_values``)."""
    if value.startswith(("env:", "file:")):
        return resolve_secret(value, key, lines=lines).reveal()
    return value


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


def _priority(value: Any, key: str) -> PriorityRule:
    names = tuple(p.label for p in Priority)
    if isinstance(value, str):
        if value not in names:
            raise ConfigError(key, f"must be one of {', '.join(names)}")
        return PriorityRule(default=Priority.parse(value))
    t = Table(value, key)
    default_label = _field_default(PriorityRule, "default").label
    default = Priority.parse(t.string("default", default_label, choices=names))
    by = parse_extractor(t.raw("by"), t.path("by")) if t.has("by") else None
    sets: dict[str, frozenset[str]] = {}
    for name in names:
        items = t.raw(name, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(t.path(name), "must be an array of strings")
        values = frozenset(items)
        for other, earlier in sets.items():
            # One value, two classes: which wins would be the code's choice, unsaid.
            if both := sorted(values & earlier):
                raise ConfigError(t.path(name), f"{both[0][:64]!r} is also in {other}")
        sets[name] = values
    t.finish()
    return PriorityRule(default=default, by=by, **sets)


def _verify(value: Any, key: str) -> VerifyConfig:
    t = Table(value, key)
    scheme = t.string("scheme", choices=tuple(SCHEMES))
    if t.has("secret") and t.has("secrets"):
        raise ConfigError(t.path("secrets"), "give either secret or secrets, not both")
    secrets: tuple[Secret, ...] = ()
    if t.has("secret"):
        secrets = (t.secret("secret"),)
    elif t.has("secrets"):
        items = t.raw("secrets")
        if not isinstance(items, list) or not items:
            raise ConfigError(t.path("secrets"), "must be a non-empty array")
        secrets = tuple(read_secret(v, f"{t.path('secrets')}[{i}]") for i, v in enumerate(items))
    impl = SCHEMES[scheme]
    tolerance_s = float(t.number("tolerance_s", impl.default_tolerance_s, positive=True))
    url = t.string("url", None)
    verify_token = t.secret("verify_token", None)
    header = t.string("header", None)
    algorithm = t.string("algorithm", "sha256", choices=("sha1", "sha256", "sha512"))
    encoding = t.string("encoding", "hex", choices=("hex", "base64"))
    prefix = t.string("prefix", "")
    timestamp_header = t.string("timestamp_header", None)
    signed = t.string("signed", None)
    allow_sha1 = t.bool("allow_sha1", False)
    dedup_body = t.bool("dedup_body", True)
    for name, value in (("header", header), ("timestamp_header", timestamp_header)):
        if value and not HEADER_NAME.fullmatch(value):
            # No request can carry it: every webhook would be refused 401 "missing signature".
            raise ConfigError(t.path(name), f"{value[:64]!r} is not a header name")
    t.finish()
    for name in OPTION_KEYS:
        if t.has(name) and name not in impl.option_keys:
            # A tolerance_s on github, say, would promise a replay window that is not there.
            takes = ", ".join(k for k in OPTION_KEYS if k in impl.option_keys) or "none of them"
            raise ConfigError(
                t.path(name), f"does not apply to scheme {scheme!r} (its own keys: {takes})"
            )
    if t.has("allow_sha1") and not impl.legacy_sha1:
        legacy = [name for name, s in SCHEMES.items() if s.legacy_sha1]
        raise ConfigError(t.path("allow_sha1"), f"only applies to schemes {' and '.join(legacy)}")
    made = VerifyConfig(
        scheme=scheme,
        secrets=secrets,
        tolerance_s=tolerance_s,
        url=url,
        verify_token=verify_token,
        header=header,
        algorithm=algorithm,
        encoding=encoding,
        prefix=prefix,
        timestamp_header=timestamp_header,
        signed=signed,
        allow_sha1=allow_sha1,
        dedup_body=dedup_body,
    )
    impl.check_config(made, t)
    if t.has("dedup_body") and not impl.untimed(made):
        untimed = sorted(name for name, s in SCHEMES.items() if s.untimed_always)
        untimed += [
            f"{name} without {s.untimed_unless}" for name, s in SCHEMES.items() if s.untimed_unless
        ]
        raise ConfigError(
            t.path("dedup_body"),
            f"only applies to schemes without a signed timestamp ({', '.join(untimed)})",
        )
    return made


# The keys every action takes; the rest are its kind's own (``actions.base.options``).
COMMON_ACTION_KEYS = ("type", "name", "timeout_s", "retry", "concurrency", "ordered_by", "when")


def _action(value: Any, key: str, kinds: KindDefaults | None) -> tuple[str, ActionConfig]:
    t = Table(value, key)
    kind = t.string("type", choices=ACTION_KINDS)
    name = t.string("name", "")
    defaults = ActionDefaults() if kinds is None else kinds(kind, t.path("type"))
    timeout_s = t.read(defaults, only=("timeout_s",)).timeout_s
    r = t.table("retry")
    retry = r.read(defaults.retry)
    r.finish()
    action = t.read(
        ActionConfig(name=name, type=kind, key=key, timeout_s=timeout_s, retry=retry),
        only=("concurrency", "ordered_by", "when"),
    )
    options = {k: v for k, v in t.data.items() if k not in COMMON_ACTION_KEYS}
    return name, dataclasses.replace(action, options=options, read=read_digest(options))


def source_key(name: str) -> str:
    """``sources.<name>``, the name quoted where TOML would need it (``sources."a b"``)."""
    return f"sources.{name if _BARE_KEY.fullmatch(name) else json.dumps(name)}"


def _source(name: str, value: Any, key: str, kinds: KindDefaults | None) -> SourceConfig:
    if name != CATCH_ALL and not SOURCE_NAME.fullmatch(name):
        raise ConfigError(key, f"a source name must be {SOURCE_NAME_RULE}")
    if name == ALERT_SOURCE:
        raise ConfigError(key, f"the source name {ALERT_SOURCE!r} is reserved for [alerts]")
    t = Table(value, key)
    if name == CATCH_ALL and t.has("path"):
        # It takes /hooks/<name> for every name no source has: a path of its own is not read.
        raise ConfigError(
            t.path("path"), "is not taken by the catch-all (it answers /hooks/<name>)"
        )
    path = t.string("path", f"/hooks/{name}")
    if not path.startswith("/"):
        raise ConfigError(t.path("path"), "must start with '/'")
    if "?" in path or "#" in path:
        # A request's path never holds its query string or fragment: such a source never matches.
        raise ConfigError(t.path("path"), "must not contain '?' or '#' (a path only, no query)")
    verify = _verify(t.raw("verify"), t.path("verify")) if t.has("verify") else None
    dedup = parse_extractor(t.raw("dedup"), t.path("dedup")) if t.has("dedup") else None
    tenant = parse_extractor(t.raw("tenant"), t.path("tenant")) if t.has("tenant") else None
    source = SourceConfig(name=name, path=path, verify=verify, dedup=dedup, tenant=tenant)
    if t.has("priority"):
        source = dataclasses.replace(
            source, priority=_priority(t.raw("priority"), t.path("priority"))
        )
    source = t.read(
        source,
        only=(
            "intake_per_s",
            "ack_status",
            "concurrency",
            "tenant_concurrency",
            "allow_from",
            "max_body_bytes",
        ),
    )
    if t.has("allow_from") and not source.allow_from:
        raise ConfigError(
            t.path("allow_from"),
            "is empty, which would refuse every webhook: leave it out to take any sender",
        )
    if not 200 <= source.ack_status <= 299 or source.ack_status in (204, 205):
        # 204 and 205 have no body; the ack's JSON after one breaks a keep-alive client.
        raise ConfigError(t.path("ack_status"), "must be a 2xx status code other than 204 or 205")
    raw_actions = t.raw("actions", [])
    if not isinstance(raw_actions, list):
        raise ConfigError(t.path("actions"), "must be an array of tables")
    actions: list[ActionConfig] = []
    for i, raw in enumerate(raw_actions):
        akey = f"{t.path('actions')}[{i}]"
        given, action = _action(raw, akey, kinds)
        if not given:
            same = sum(
                1 for r in raw_actions if isinstance(r, Mapping) and r.get("type") == action.type
            )
            given = action.type if same == 1 else f"{action.type}-{i + 1}"
            action = dataclasses.replace(action, name=given, named=False)
        if any(a.name == given for a in actions):
            raise ConfigError(f"{akey}.name", f"duplicate action name {given!r}")
        actions.append(action)
    t.finish()
    return dataclasses.replace(source, actions=tuple(actions))


# What [alerts] takes of a forward's options: a chat service reached through an egress proxy,
# or a relay of your own behind a private CA.
_ALERT_FORWARD_OPTIONS = ("tls", "proxy")


def _alerts(t: Table, kinds: KindDefaults | None) -> AlertsConfig:
    """``[alerts]``, with its reserved source: one forward action to ``url``, retried with the
    forward defaults unless ``timeout_s`` or ``retry`` say otherwise."""
    url = t.secret("url")
    if not url.missing:
        # The value is not shown: an incoming-webhook URL is itself the credential.
        try:
            parts = urlsplit(url.reveal())
        except ValueError:  # "http://[bad": what urlsplit says would quote the URL
            raise ConfigError(t.path("url"), "must be an http(s) URL") from None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(t.path("url"), "must be an http(s) URL")
    defaults = ActionDefaults() if kinds is None else kinds("forward", t.path("url"))
    timeout_s = t.read(defaults, only=("timeout_s",)).timeout_s
    r = t.table("retry")
    retry = r.read(defaults.retry)
    r.finish()
    action = ActionConfig(
        name=ALERT_ACTION,
        type="forward",
        key=t.key,
        timeout_s=timeout_s,
        retry=retry,
        # The forward's own options, read (and checked, naming alerts.tls...) as it is built.
        options={"url": url, **{k: t.raw(k) for k in _ALERT_FORWARD_OPTIONS if t.has(k)}},
    )
    source = SourceConfig(
        name=ALERT_SOURCE,
        path=f"/hooks/{ALERT_SOURCE}",  # never served: the receiver refuses this source
        priority=PriorityRule(default=Priority.HIGH),
        actions=(action,),
    )
    alerts = t.read(
        AlertsConfig(url=url, source=source),
        only=("on_dead", "backlog_age_s", "min_interval_s", "failing_s"),
    )
    t.finish()
    return alerts


def parse(
    data: Mapping[str, Any],
    origin: str = "config",
    *,
    secrets: bool = True,
    kinds: KindDefaults | None = None,
) -> Config:
    """Build a validated ``Config`` from parsed TOML (raises ``ConfigError``).

    With ``secrets=False`` a secret that cannot be had (an unset variable, an unreadable file) is
    left missing instead of being an error: for commands that read the journal and verify or
    sign nothing.
    ``kinds`` gives each action kind's defaults for ``timeout_s`` and ``retry`` (the action
    registry's ``webhookd.actions.kind_defaults``); without it every action gets the common
    ``ActionDefaults()``, which is enough for commands that run no action.
    """
    root = Table(data, "")
    s = root.table("server")
    server = s.read(ServerConfig())
    if server.max_inflight_body_bytes < server.max_body_bytes:
        # Else a body of the allowed size could never be read.
        raise ConfigError(
            s.path("max_inflight_body_bytes"),
            f"must be at least server.max_body_bytes ({server.max_body_bytes})",
        )
    s.finish()

    a = root.table("admin")
    admin = a.read(AdminConfig())
    a.finish()
    if admin.listen is not None and admin.listen.overlaps(server.listen):
        # Else check passes and serve fails at start, binding the second of the two.
        raise ConfigError(
            a.path("listen"),
            f"{admin.listen} is also used by server.listen ({server.listen}): "
            "give each its own port",
        )
    if admin.token is not None and not admin.token.missing:
        # Sent in an Authorization header: one no client can send makes every request a 401.
        token = header_value(admin.token.reveal(), a.path("token"))
        if token != token.strip(" \t") or not token:
            # HTTP drops a header value's outer whitespace, so no request could match it.
            raise ConfigError(
                a.path("token"),
                "is empty or starts or ends with a space or tab, which an Authorization"
                " header cannot carry (a copy and paste's stray space?)",
            )
        if not all(" " <= c <= "~" for c in token):
            # A browser sends a header's characters as one byte each (and refuses any past
            # U+00FF), the CLI as UTF-8: the dashboard could never send what is compared.
            raise ConfigError(
                a.path("token"),
                "holds a character that is not printable ASCII, which the dashboard cannot"
                " send (openssl rand -hex 24 makes one)",
            )
    if admin.listen is not None and not admin.listen.is_loopback and admin.token is None:
        # Events, their results and replay would be open to anyone who can reach the port.
        raise ConfigError(
            a.path("token"), f"is required when admin.listen ({admin.listen}) is not loopback"
        )
    if (
        admin.listen is not None
        and not admin.listen.is_loopback
        and admin.token is not None
        and not admin.token.missing
        and len(admin.token.reveal()) < MIN_ADMIN_TOKEN_CHARS
    ):
        # All that guards the API there, and nothing slows a guesser down.
        raise ConfigError(
            a.path("token"),
            f"must have {MIN_ADMIN_TOKEN_CHARS} characters or more when admin.listen"
            f" ({admin.listen}) is not loopback (openssl rand -hex 24 makes one)",
        )

    j = root.table("journal")
    if j.has("path") and j.has("url"):
        raise ConfigError(j.path("url"), "cannot be set together with journal.path: choose one")
    if j.has("path") and not j.raw("path"):  # "" would be read as the working directory
        raise ConfigError(j.path("path"), "must name the journal's file (like ./webhookd.db)")
    if j.has("path"):  # read as written, "env:DBPATH" would name a file by that very name
        no_reference(str(j.raw("path")), j.path("path"), "a path")
    journal = j.read(JournalConfig())
    j.finish()
    if journal.keep_dead_d * 24 < journal.keep_done_h:
        # Retention looks only at events past keep_done_h: dead ones would stay that long.
        raise ConfigError(
            j.path("keep_dead_d"),
            f"must keep dead events at least as long as keep_done_h ({journal.keep_done_h:g} h)"
            " keeps done ones",
        )
    if journal.url is None:
        try:
            folder = journal.path.is_dir()
        except (OSError, ValueError) as exc:  # a name too long, a NUL
            raise ConfigError(j.path("path"), f"is not a usable path: {exc}") from None
        if folder:
            raise ConfigError(
                j.path("path"), f"{str(journal.path)!r} is a folder: name the journal's file in it"
            )
    if journal.url is not None and not journal.url.missing:
        check_journal_url(journal.url, j.path("url"))
    if journal.listen_url is not None:
        if journal.url is None:
            raise ConfigError(j.path("listen_url"), "needs journal.url (it is for PostgreSQL)")
        if not journal.listen_url.missing:
            check_journal_url(journal.listen_url, j.path("listen_url"))

    w = root.table("workers")
    wt = w.table("weights")
    high, normal, low = (
        int(wt.number(p.label, default, integer=True, minimum=1))
        for p, default in zip(Priority, _field_default(WorkersConfig, "weights"), strict=True)
    )
    wt.finish()
    workers = w.read(
        WorkersConfig(weights=(high, normal, low)), only=_except("weights", WorkersConfig)
    )
    w.finish()

    lg = root.table("log")
    log = lg.read(LogConfig())
    lg.finish()

    lanes: dict[str, LaneConfig] = {}
    lanes_table = root.table("lanes")
    for lane_name in list(lanes_table.data):
        lt = lanes_table.table(lane_name)
        lane_config = lt.read(LaneConfig(name=lane_name), only=_except("name", LaneConfig))
        lt.finish()  # a misspelt rpm is named as such, not as a lane without one
        if lane_config.rpm is None and lane_config.tpm is None:
            raise ConfigError(lt.key, "needs rpm, tpm or both")
        lanes[lane_name] = lane_config
    lanes_table.finish()

    sources: dict[str, SourceConfig] = {}
    src_table = root.table("sources")
    for name in list(src_table.data):
        sources[name] = _source(name, src_table.raw(name), src_table.path(name), kinds)
    src_table.finish()
    check_sources(sources, server, journal, lanes)
    alerts = _alerts(root.table("alerts"), kinds) if root.has("alerts") else None
    root.finish()
    config = Config(
        server=server,
        admin=admin,
        journal=journal,
        workers=workers,
        log=log,
        lanes=lanes,
        sources=sources,
        alerts=alerts,
        origin=origin,
    )
    if secrets:
        reveal_secrets(config)
    return config


def reveal_secrets(config: Config) -> None:
    """Read every secret of ``config`` now: the first unset variable or unreadable file is a
    ``ConfigError`` naming its key."""
    for secret in secrets_in(config):
        secret.reveal()


def loads(
    text: str,
    origin: str = "config",
    *,
    secrets: bool = True,
    kinds: KindDefaults | None = None,
) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{origin}: not valid TOML: {exc}") from exc
    except RecursionError:  # arrays or tables nested thousands deep
        raise ConfigError("", f"{origin}: not valid TOML: nested too deep") from None
    return parse(data, origin, secrets=secrets, kinds=kinds)


def load(
    path: str | os.PathLike[str] | None,
    *,
    secrets: bool = True,
    kinds: KindDefaults | None = None,
) -> Config:
    """Load ``path``, or the embedded default when ``path`` is ``None`` (keywords: see parse)."""
    if path is None:
        return loads(EMBEDDED_DEFAULT, "embedded default", kinds=kinds)
    p = Path(path)
    try:
        text = read_small_text(p, CONFIG_FILE_BYTES)
    except OSError as exc:
        raise ConfigError("", f"cannot read {p}: {exc.strerror or exc}") from exc
    except Unfit as exc:
        raise ConfigError("", f"cannot read {p}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{p} is not UTF-8 text") from exc
    return loads(text, str(p), secrets=secrets, kinds=kinds)
