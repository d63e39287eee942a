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

The package's modules, each importing only those named before it: ``checks`` (one value each:
numbers, durations, URLs, header values; ``closest``), ``reading`` (``env:``/``file:`` secrets,
small files), ``table`` (``Table``, ``setting()``), ``values`` (listen addresses, extractors,
networks, ``when``), ``sections`` (the dataclasses and ``Config``), ``reloads``
(``plan_reload``, ``check_sources``, the cluster digest) and ``parsing`` (``parse``, ``loads``,
``load``). Every public name is here too: ``from webhookd.config import X`` wherever ``X`` lives.
"""

from __future__ import annotations

from webhookd.config.checks import (
    HEADER_NAME,
    check_journal_url,
    check_number,
    closest,
    credentials_unclear,
    header_value,
)
from webhookd.config.parsing import (
    COMMON_ACTION_KEYS,
    EMBEDDED_DEFAULT,
    load,
    loads,
    parse,
    reveal_secrets,
)
from webhookd.config.reading import (
    CONFIG_FILE_BYTES,
    DEFAULT_OPENAI_API_KEY,
    PEM_FILE_BYTES,
    SECRET_FILE_BYTES,
    SECRET_OPTIONS,
    SECRET_TABLES,
    Unfit,
    no_reference,
    read_digest,
    read_secret,
    read_small,
    read_small_text,
    resolve_secret,
    secret_options,
    text_or_secret,
)
from webhookd.config.reloads import (
    RESTART_ONLY,
    Reload,
    check_sources,
    cluster_digest,
    cluster_names,
    names_take,
    plan_reload,
    some,
)
from webhookd.config.sections import (
    ACTION_KINDS,
    ALERT_ACTION,
    ALERT_SOURCE,
    CATCH_ALL,
    DEFAULT_MAX_COOLDOWN_S,
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
    RetryPolicy,
    ServerConfig,
    SourceConfig,
    WorkersConfig,
    leaves,
    no_sources,
    secrets_in,
)
from webhookd.config.table import Rule, Table, setting, source_key
from webhookd.config.values import (
    Condition,
    Extractor,
    Listen,
    Network,
    parse_extractor,
    parse_listen,
    parse_networks,
    parse_when,
)
from webhookd.schemes.base import VerifyConfig
from webhookd.secret import Secret

__all__ = [
    "ACTION_KINDS",
    "ALERT_ACTION",
    "ALERT_SOURCE",
    "CATCH_ALL",
    "COMMON_ACTION_KEYS",
    "CONFIG_FILE_BYTES",
    "DEFAULT_MAX_COOLDOWN_S",
    "DEFAULT_OPENAI_API_KEY",
    "EMBEDDED_DEFAULT",
    "HEADER_NAME",
    "MIN_ADMIN_TOKEN_CHARS",
    "PEM_FILE_BYTES",
    "RESTART_ONLY",
    "SECRET_FILE_BYTES",
    "SECRET_OPTIONS",
    "SECRET_TABLES",
    "SOURCE_NAME",
    "SOURCE_NAME_RULE",
    "ActionConfig",
    "ActionDefaults",
    "AdminConfig",
    "AlertsConfig",
    "Condition",
    "Config",
    "Extractor",
    "JournalConfig",
    "KindDefaults",
    "LaneConfig",
    "Listen",
    "LogConfig",
    "Network",
    "PriorityRule",
    "Reload",
    "RetryPolicy",
    "Rule",
    "Secret",
    "ServerConfig",
    "SourceConfig",
    "Table",
    "Unfit",
    "VerifyConfig",
    "WorkersConfig",
    "check_journal_url",
    "check_number",
    "check_sources",
    "closest",
    "cluster_digest",
    "cluster_names",
    "credentials_unclear",
    "header_value",
    "leaves",
    "load",
    "loads",
    "names_take",
    "no_reference",
    "no_sources",
    "parse",
    "parse_extractor",
    "parse_listen",
    "parse_networks",
    "parse_when",
    "plan_reload",
    "read_digest",
    "read_secret",
    "read_small",
    "read_small_text",
    "resolve_secret",
    "reveal_secrets",
    "secret_options",
    "secrets_in",
    "setting",
    "some",
    "source_key",
    "text_or_secret",
]
