"""Parsing: TOML → a validated ``Config`` (``parse``, ``loads``, ``load``), every key checked.

An unknown key, a wrong type or a bad value raises ``ConfigError`` naming the dotted key
(``sources.shop.actions[0].url``). Action-specific keys (``url`` for ``forward``, ``model`` for
``openai`` …) are kept in ``ActionConfig.options`` and validated by the action's own module when
actions are built; a ``verify`` table is read here and checked by its signature scheme
(``webhookd.schemes``). Action kinds hand their own defaults for the shared action keys
(``timeout_s``, ``retry``) to ``parse`` as ``kinds``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from webhookd.config.checks import HEADER_NAME, check_journal_url, header_value
from webhookd.config.reading import (
    CONFIG_FILE_BYTES,
    Unfit,
    no_reference,
    read_digest,
    read_secret,
    read_small_text,
)
from webhookd.config.reloads import check_sources
from webhookd.config.sections import (
    ACTION_KINDS,
    ALERT_ACTION,
    ALERT_SOURCE,
    CATCH_ALL,
    MIN_ADMIN_TOKEN_CHARS,
    SOURCE_NAME,
    SOURCE_NAME_RULE,
    ActionConfig,
    ActionDefaults,
    AdminConfig,
    AlertsConfig,
    Config,
    JournalConfig,
    KindDefaults,
    LaneConfig,
    LogConfig,
    PriorityRule,
    ServerConfig,
    SourceConfig,
    WorkersConfig,
    secrets_in,
)
from webhookd.config.table import Table
from webhookd.config.values import parse_extractor
from webhookd.errors import ConfigError
from webhookd.models import Priority
from webhookd.schemes import SCHEMES
from webhookd.schemes.base import OPTION_KEYS, VerifyConfig
from webhookd.secret import Secret

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


def _except(name: str, cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != name)


def _field_default(cls: type, name: str) -> Any:
    """The default written on dataclass ``cls``'s field ``name`` (for keys read by hand)."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    raise LookupError(f"{cls.__name__}.{name} has no default")


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
