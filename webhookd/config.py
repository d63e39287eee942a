"""Configuration: TOML → frozen dataclasses, validated, with dotted-key errors and ``env:`` secrets.

Every key is checked: an unknown key, a wrong type or a bad value raises ``ConfigError`` naming
the dotted key (``sources.shop.actions[0].url``). Secrets written ``"env:NAME"`` are resolved
here, once, and wrapped in ``Secret`` so that no ``repr`` or log line can show them.
Action-specific keys (``url`` for ``forward``, ``model`` for ``openai`` …) are kept in
``ActionConfig.options`` and validated by the action's own module when actions are built; a
``verify`` table is read here and checked by its signature scheme (``webhookd.schemes``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from webhookd.errors import ConfigError
from webhookd.models import Priority
from webhookd.schemes import SCHEMES
from webhookd.schemes.base import VerifyConfig as VerifyConfig
from webhookd.secret import Secret as Secret

CATCH_ALL = "*"

# The action kinds users may write; ``actions`` implements exactly these (a test checks), so
# config stays below it in the import graph. Signature schemes: ``webhookd.schemes.SCHEMES``.
ACTION_KINDS = ("log", "forward", "openai", "command", "python")
DEFAULT_MAX_COOLDOWN_S = 3600.0  # a lane's longest 429 cool-down, whatever the provider asks

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

# DESIGN §2: retry defaults per action kind.
_RETRY_DEFAULTS: dict[str, tuple[int, float, float, float]] = {
    "forward": (10, 10.0, 3.0, 6 * 3600.0),
    "openai": (6, 2.0, 2.0, 60.0),
    "command": (3, 1.0, 4.0, 300.0),
    "python": (3, 1.0, 4.0, 300.0),
    "log": (3, 1.0, 4.0, 300.0),
}
_TIMEOUT_DEFAULTS = {"forward": 30.0, "openai": 120.0, "command": 300.0, "python": 300.0}


_BARE_KEY = re.compile(r"[A-Za-z0-9_*-]+")


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


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: Listen = Listen("127.0.0.1", 8080)
    max_body_bytes: int = 1_048_576
    ack_timeout_s: float = 2.0
    max_backlog: int = 1_000_000
    retry_after_s: int = 5
    body_timeout_s: float = 10.0
    max_inflight_body_bytes: int = 64 * 1_048_576


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Listen | None = Listen("127.0.0.1", 8081)
    token: Secret | None = None


@dataclass(frozen=True, slots=True)
class JournalConfig:
    path: Path = Path("./webhookd.db")
    # A PostgreSQL journal shared by several nodes instead of the SQLite file (DESIGN §7).
    url: Secret | None = None
    lease_s: float = 30.0
    keep_done_h: float = 24.0
    keep_dead_d: float = 14.0
    keep_dedup_d: float = 7.0
    prune_interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    concurrency: int = 32
    shutdown_grace_s: float = 25.0
    sweep_interval_s: float = 1.0
    window: int = 1000
    max_recoveries: int = 3
    weights: tuple[int, int, int] = (8, 4, 1)


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, slots=True)
class LaneConfig:
    name: str
    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = 3.0
    # The longest a provider's 429 (Retry-After, x-ratelimit-reset-*) may close the lane.
    max_cooldown_s: float = DEFAULT_MAX_COOLDOWN_S


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    factor: float
    cap_s: float


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
    concurrency: int | None = None
    ordered_by: Extractor | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    path: str
    verify: VerifyConfig | None = None
    dedup: Extractor | None = None
    tenant: Extractor | None = None
    priority: PriorityRule = PriorityRule()
    intake_per_s: float | None = None
    ack_status: int = 202
    concurrency: int | None = None
    tenant_concurrency: int | None = None  # cap on one tenant's running jobs of this source
    actions: tuple[ActionConfig, ...] = ()

    def action(self, name: str) -> ActionConfig | None:
        for action in self.actions:
            if action.name == name:
                return action
        return None


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    journal: JournalConfig = JournalConfig()
    workers: WorkersConfig = WorkersConfig()
    log: LogConfig = LogConfig()
    lanes: Mapping[str, LaneConfig] = field(default_factory=dict)
    sources: Mapping[str, SourceConfig] = field(default_factory=dict)
    origin: str = "embedded default"

    def source_for(self, name: str) -> SourceConfig | None:
        """The configured source called ``name``, else the catch-all (``"*"``) if there is one."""
        return self.sources.get(name) or self.sources.get(CATCH_ALL)


# ---------------------------------------------------------------------------------------------
# Parsing


_MISSING: Any = object()


class _Table:
    """A TOML table being read: typed getters that remember which keys were used."""

    def __init__(self, data: Any, key: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(key, f"must be a table, not {_type_name(data)}")
        self.data = data
        self.key = key
        self._used: set[str] = set()

    def path(self, name: str) -> str:
        part = name if _BARE_KEY.fullmatch(name) else json.dumps(name)  # as TOML would quote it
        return f"{self.key}.{part}" if self.key else part

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._used.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise ConfigError(self.path(name), "is required")
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
        return _secret(value, self.path(name))

    def table(self, name: str) -> _Table:
        return _Table(self.raw(name, {}), self.path(name))

    def finish(self) -> None:
        for name in self.data:
            if name not in self._used:
                raise ConfigError(self.path(name), "unknown key")


def check_journal_url(url: Secret, key: str) -> None:
    """A PostgreSQL URL, or a ``ConfigError`` naming ``key`` (the URL itself is never shown)."""
    if not url.reveal().startswith(("postgresql://", "postgres://")):
        raise ConfigError(key, "must be a postgresql:// URL")


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
    if positive and value <= 0:
        raise ConfigError(key, "must be greater than 0")
    if minimum is not None and value < minimum:
        raise ConfigError(key, f"must be at least {minimum}")
    return value


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _secret(value: Any, key: str) -> Secret:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, 'must be a non-empty string (a secret, or "env:NAME")')
    if value.startswith("env:"):
        return Secret(os.environ.get(value[4:]) or None, origin=value, key=key)
    return Secret(value, key=key)


def resolve_secret(value: Any, key: str) -> Secret:
    """A secret from config: ``"env:NAME"`` is looked up in the environment (and must be set)."""
    secret = _secret(value, key)
    secret.reveal()
    return secret


def secrets_in(obj: Any) -> list[Secret]:
    """Every ``Secret`` held by ``obj`` (a config or a part of one), in config order."""
    found: list[Secret] = []
    seen: set[int] = set()

    def walk(node: Any) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, Secret):
            found.append(node)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name))
        elif isinstance(node, Mapping):
            for value in node.values():
                walk(value)
        elif isinstance(node, list | tuple | set | frozenset):
            for value in node:
                walk(value)

    walk(obj)
    return found


def parse_listen(value: Any, key: str) -> Listen:
    if not isinstance(value, str):
        raise ConfigError(key, 'must be a string like "127.0.0.1:8080"')
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(key, f"{value!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range")
    host = host.strip("[]") or "0.0.0.0"
    return Listen(host, port)


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
    return Extractor(kind, arg)  # type: ignore[arg-type]


def _priority(value: Any, key: str) -> PriorityRule:
    names = tuple(p.label for p in Priority)
    if isinstance(value, str):
        if value not in names:
            raise ConfigError(key, f"must be one of {', '.join(names)}")
        return PriorityRule(default=Priority.parse(value))
    t = _Table(value, key)
    default = Priority.parse(t.string("default", "normal", choices=names))
    by = parse_extractor(t.raw("by"), t.path("by")) if t.has("by") else None
    sets: dict[str, frozenset[str]] = {}
    for name in names:
        items = t.raw(name, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(t.path(name), "must be an array of strings")
        sets[name] = frozenset(items)
    t.finish()
    return PriorityRule(default=default, by=by, **sets)


def _verify(value: Any, key: str) -> VerifyConfig:
    t = _Table(value, key)
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
        secrets = tuple(_secret(v, f"{t.path('secrets')}[{i}]") for i, v in enumerate(items))
    tolerance_s = float(t.number("tolerance_s", 300.0, positive=True))
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
    t.finish()
    impl = SCHEMES[scheme]
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


_COMMON_ACTION_KEYS = ("type", "name", "timeout_s", "retry", "concurrency", "ordered_by")


def _action(value: Any, key: str, kinds: tuple[str, ...]) -> tuple[str, ActionConfig]:
    t = _Table(value, key)
    kind = t.string("type", choices=kinds)
    name = t.string("name", "")
    timeout_s = float(t.number("timeout_s", _TIMEOUT_DEFAULTS.get(kind, 30.0), positive=True))
    attempts, base_s, factor, cap_s = _RETRY_DEFAULTS.get(kind, (3, 1.0, 4.0, 300.0))
    r = t.table("retry")
    retry = RetryPolicy(
        max_attempts=int(r.number("max_attempts", attempts, integer=True, minimum=1)),
        base_s=float(r.number("base_s", base_s, minimum=0)),
        factor=float(r.number("factor", factor, minimum=1)),
        cap_s=float(r.number("cap_s", cap_s, minimum=0)),
    )
    r.finish()
    concurrency = t.number("concurrency", None, integer=True, minimum=1)
    ordered_by = (
        parse_extractor(t.raw("ordered_by"), t.path("ordered_by")) if t.has("ordered_by") else None
    )
    options = {k: v for k, v in t.data.items() if k not in _COMMON_ACTION_KEYS}
    return name, ActionConfig(
        name=name,
        type=kind,
        key=key,
        timeout_s=timeout_s,
        retry=retry,
        concurrency=concurrency,
        ordered_by=ordered_by,
        options=options,
    )


def _source(name: str, value: Any, key: str, kinds: tuple[str, ...]) -> SourceConfig:
    t = _Table(value, key)
    if name != CATCH_ALL and (not name or "/" in name):
        raise ConfigError(key, "a source name must be non-empty and contain no '/'")
    path = t.string("path", f"/hooks/{name}")
    if not path.startswith("/"):
        raise ConfigError(t.path("path"), "must start with '/'")
    if "?" in path or "#" in path:
        # A request's path never holds its query string or fragment: such a source never matches.
        raise ConfigError(t.path("path"), "must not contain '?' or '#' (a path only, no query)")
    verify = _verify(t.raw("verify"), t.path("verify")) if t.has("verify") else None
    dedup = parse_extractor(t.raw("dedup"), t.path("dedup")) if t.has("dedup") else None
    tenant = parse_extractor(t.raw("tenant"), t.path("tenant")) if t.has("tenant") else None
    priority = (
        _priority(t.raw("priority"), t.path("priority")) if t.has("priority") else PriorityRule()
    )
    intake_per_s = t.number("intake_per_s", None, positive=True)
    ack_status = t.number("ack_status", 202, integer=True)
    if not 200 <= ack_status <= 299:
        raise ConfigError(t.path("ack_status"), "must be a 2xx status code")
    concurrency = t.number("concurrency", None, integer=True, minimum=1)
    tenant_concurrency = t.number("tenant_concurrency", None, integer=True, minimum=1)
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
            action = ActionConfig(**{**_fields(action), "name": given})
        if any(a.name == given for a in actions):
            raise ConfigError(f"{akey}.name", f"duplicate action name {given!r}")
        actions.append(action)
    t.finish()
    return SourceConfig(
        name=name,
        path=path,
        verify=verify,
        dedup=dedup,
        tenant=tenant,
        priority=priority,
        intake_per_s=intake_per_s,
        ack_status=ack_status,
        concurrency=concurrency,
        tenant_concurrency=tenant_concurrency,
        actions=tuple(actions),
    )


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


def parse(data: Mapping[str, Any], origin: str = "config", *, secrets: bool = True) -> Config:
    """Build a validated ``Config`` from parsed TOML (raises ``ConfigError``).

    With ``secrets=False`` an ``env:`` secret whose variable is unset is left missing instead of
    being an error: for commands that read the journal and verify or sign nothing.
    """
    root = _Table(data, "")
    s = root.table("server")
    server = ServerConfig(
        listen=parse_listen(s.raw("listen", "127.0.0.1:8080"), s.path("listen")),
        max_body_bytes=int(s.number("max_body_bytes", 1_048_576, integer=True, positive=True)),
        ack_timeout_s=float(s.number("ack_timeout_s", 2.0, positive=True)),
        max_backlog=int(s.number("max_backlog", 1_000_000, integer=True, positive=True)),
        retry_after_s=int(s.number("retry_after_s", 5, integer=True, positive=True)),
        body_timeout_s=float(s.number("body_timeout_s", 10.0, positive=True)),
        max_inflight_body_bytes=int(
            s.number("max_inflight_body_bytes", 64 * 1_048_576, integer=True, positive=True)
        ),
    )
    if not math.isfinite(server.body_timeout_s):
        raise ConfigError(s.path("body_timeout_s"), "must be a finite number of seconds")
    if server.max_inflight_body_bytes < server.max_body_bytes:
        # Else a body of the allowed size could never be read.
        raise ConfigError(
            s.path("max_inflight_body_bytes"),
            f"must be at least server.max_body_bytes ({server.max_body_bytes})",
        )
    s.finish()

    a = root.table("admin")
    admin_listen = a.raw("listen", "127.0.0.1:8081")
    admin = AdminConfig(
        listen=None if admin_listen == "" else parse_listen(admin_listen, a.path("listen")),
        token=a.secret("token", None),
    )
    a.finish()
    if admin.listen is not None and not admin.listen.is_loopback and admin.token is None:
        # Events, their results and replay would be open to anyone who can reach the port.
        raise ConfigError(
            a.path("token"), f"is required when admin.listen ({admin.listen}) is not loopback"
        )

    j = root.table("journal")
    if j.has("path") and j.has("url"):
        raise ConfigError(j.path("url"), "cannot be set together with journal.path: choose one")
    journal = JournalConfig(
        path=Path(j.string("path", "./webhookd.db")),
        url=j.secret("url", None),
        lease_s=float(j.number("lease_s", 30.0, positive=True)),
        keep_done_h=float(j.number("keep_done_h", 24.0, minimum=0)),
        keep_dead_d=float(j.number("keep_dead_d", 14.0, minimum=0)),
        keep_dedup_d=float(j.number("keep_dedup_d", 7.0, minimum=0)),
        prune_interval_s=float(j.number("prune_interval_s", 60.0, positive=True)),
    )
    j.finish()
    if journal.url is not None and not journal.url.missing:
        check_journal_url(journal.url, j.path("url"))

    w = root.table("workers")
    wt = w.table("weights")
    weights = tuple(
        int(wt.number(name, default, integer=True, minimum=1))
        for name, default in (("high", 8), ("normal", 4), ("low", 1))
    )
    wt.finish()
    workers = WorkersConfig(
        concurrency=int(w.number("concurrency", 32, integer=True, minimum=1)),
        shutdown_grace_s=float(w.number("shutdown_grace_s", 25.0, minimum=0)),
        sweep_interval_s=float(w.number("sweep_interval_s", 1.0, positive=True)),
        window=int(w.number("window", 1000, integer=True, minimum=1)),
        max_recoveries=int(w.number("max_recoveries", 3, integer=True, minimum=1)),
        weights=weights,  # type: ignore[arg-type]
    )
    w.finish()

    lg = root.table("log")
    log = LogConfig(
        level=lg.string("level", "info", choices=("debug", "info", "warning", "error")),
        format=lg.string("format", "text", choices=("text", "json")),
    )
    lg.finish()

    lanes: dict[str, LaneConfig] = {}
    lanes_table = root.table("lanes")
    for lane_name in list(lanes_table.data):
        lt = lanes_table.table(lane_name)
        rpm = lt.number("rpm", None, integer=True, positive=True)
        tpm = lt.number("tpm", None, integer=True, positive=True)
        if rpm is None and tpm is None:
            raise ConfigError(lt.key, "needs rpm, tpm or both")
        lanes[lane_name] = LaneConfig(
            name=lane_name,
            rpm=rpm,
            tpm=tpm,
            burst_s=float(lt.number("burst_s", 3.0, positive=True)),
            max_cooldown_s=lt.number("max_cooldown_s", DEFAULT_MAX_COOLDOWN_S, positive=True),
        )
        lt.finish()
    lanes_table.finish()

    sources: dict[str, SourceConfig] = {}
    src_table = root.table("sources")
    for name in list(src_table.data):
        sources[name] = _source(name, src_table.raw(name), src_table.path(name), ACTION_KINDS)
    src_table.finish()
    seen: dict[str, str] = {}
    for src in sources.values():
        if src.name == CATCH_ALL:
            continue
        if src.path in seen:
            raise ConfigError(
                f"sources.{src.name}.path", f"{src.path} is also used by sources.{seen[src.path]}"
            )
        seen[src.path] = src.name
    for src in sources.values():
        for action in src.actions:
            lane = action.options.get("lane")
            if lane is not None and lane not in lanes:
                raise ConfigError(f"{action.key}.lane", f"no lane named {lane!r} in [lanes]")
    root.finish()
    config = Config(
        server=server,
        admin=admin,
        journal=journal,
        workers=workers,
        log=log,
        lanes=lanes,
        sources=sources,
        origin=origin,
    )
    if secrets:
        for secret in secrets_in(config):
            secret.reveal()  # the first unset variable, as a ConfigError naming its key
    return config


def loads(text: str, origin: str = "config", *, secrets: bool = True) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{origin}: not valid TOML: {exc}") from exc
    return parse(data, origin, secrets=secrets)


def load(path: str | os.PathLike[str] | None, *, secrets: bool = True) -> Config:
    """Load ``path``, or the embedded default when ``path`` is ``None`` (``secrets``: see parse)."""
    if path is None:
        return loads(EMBEDDED_DEFAULT, "embedded default")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{p} is not UTF-8 text") from exc
    return loads(text, str(p), secrets=secrets)
