"""The action registry: maps each ``type`` to its module and builds configured actions.

Each action kind lives in its own module, which is an ``ActionKind``: its ``DEFAULTS``, and
``validate(config)`` and ``create(config, resources)``. Modules are imported on first use so
that, say, ``openai`` is only loaded when a source uses it. The config parser gets each kind's
defaults from here (``kind_defaults``), so config stays below the actions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from webhookd.actions.base import Action, ActionKind, Outcome, Resources
from webhookd.config.sections import ActionDefaults, Config
from webhookd.config.table import Table, source_key
from webhookd.errors import ConfigError


# One loader per kind, so that mypy checks each module against ``ActionKind``.
def _log() -> ActionKind:
    import webhookd.actions.log as module

    return module


def _forward() -> ActionKind:
    import webhookd.actions.forward as module

    return module


def _openai() -> ActionKind:
    import webhookd.actions.openai as module

    return module


def _command() -> ActionKind:
    import webhookd.actions.command as module

    return module


def _python() -> ActionKind:
    import webhookd.actions.python as module

    return module


_KINDS: Mapping[str, Callable[[], ActionKind]] = {
    "log": _log,
    "forward": _forward,
    "openai": _openai,
    "command": _command,
    "python": _python,
}

__all__ = [
    "Action",
    "ActionKind",
    "Outcome",
    "Resources",
    "build",
    "kind",
    "kind_defaults",
    "rebuild",
    "validate",
    "warnings",
]


def kind(name: str, key: str) -> ActionKind:
    """The module of action type ``name``; ``key`` is the dotted key of that ``type``."""
    loader = _KINDS.get(name)
    if loader is None:
        raise ConfigError(key, f"unknown action type {name!r}")
    try:
        return loader()
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise ConfigError(key, f"action type {name!r} is not available in this build") from exc


def kind_defaults(name: str, key: str) -> ActionDefaults:
    """Action type ``name``'s ``timeout_s`` and ``retry`` defaults: ``parse(kinds=…)`` takes it."""
    return kind(name, key).DEFAULTS


def validate(config: Config) -> None:
    """Check every action's own options (raises ``ConfigError`` naming the dotted key)."""
    for source in config.all_sources():
        for action in source.actions:
            kind(action.type, f"{action.key}.type").validate(action)


def warnings(config: Config) -> list[str]:
    """What ``check`` and the daemon's start warn of in the actions, key first: a command whose
    program is not there, an openai action whose calls are bigger than its lane's tpm or whose
    templates look nothing up in the webhook, a python handler's folder holding a file named as
    a standard library module, a forward's (or a ``then``'s) ``headers`` giving every event one
    Idempotency-Key or webhook-id."""
    from webhookd.actions.command import missing_program
    from webhookd.actions.openai_config import lane_too_small, shows_no_webhook
    from webhookd.actions.python import stdlib_names_in_folder
    from webhookd.actions.targets import fixed_repeat_keys

    said = []
    for source in config.all_sources():
        by_place = [a for a in source.actions if not a.named and a.name != a.type]
        if by_place:
            said.append(
                f"{source_key(source.name)}.actions: {', '.join(a.name for a in by_place)}"
                f" {'has' if len(by_place) == 1 else 'have'} no name and"
                f" {'is' if len(by_place) == 1 else 'are'} named by place: adding, removing or"
                " moving an action of that type renames it, and its queued jobs then go dead"
                " (a reload refuses it; a restart, or another node, does not): give each a name"
            )
        for action in source.actions:
            if action.type == "command" and (why := missing_program(action)):
                said.append(f"{action.key}.argv[0]: {why}: its jobs fail until it is")
            elif action.type == "openai" and (big := lane_too_small(action, config.lanes)):
                said.append(f"{action.key}.{big[0]}: {big[1]}")
            elif action.type == "python":
                said.extend(stdlib_names_in_folder(action))
            if action.type == "openai" and (blind := shows_no_webhook(action)):
                said.append(f"{action.key}.prompt: {blind}")
            if action.type == "forward":
                headers = action.options.get("headers")
                said.extend(fixed_repeat_keys(headers, f"{action.key}.headers"))
            elif action.type == "openai" and isinstance(then := action.options.get("then"), dict):
                said.extend(fixed_repeat_keys(then.get("headers"), f"{action.key}.then.headers"))
    return said


def looked_up_hosts(config: Config) -> list[tuple[str, str]]:
    """``(key, host name)`` of each host the actions (the alerts' own among them) look up to
    reach: a forward's ``url``, an openai action's ``base_url`` (when set) and its ``then``'s
    ``forward``; none reached through a proxy, no IP address (``targets.looked_up_hosts``)."""
    from webhookd.actions import targets

    found = []
    for source in config.all_sources():
        for action in source.actions:
            t = Table(action.options, action.key)
            if action.type == "forward":
                found += targets.looked_up_hosts(t, ("url",))
            elif action.type == "openai":
                found += targets.looked_up_hosts(t, ("base_url",))
                if isinstance(then := action.options.get("then"), dict):
                    found += targets.looked_up_hosts(Table(then, t.path("then")), ("forward",))
    return found


def build(
    resources: Resources,
    keep: Mapping[tuple[str, str], Action] | None = None,
    made: list[Action] | None = None,
) -> dict[tuple[str, str], Action]:
    """Create every configured action, keyed by ``(source name, action name)``. An action of
    ``keep`` whose config is unchanged is kept instead of created; ``made`` collects those
    created."""
    actions: dict[tuple[str, str], Action] = {}
    for source in resources.config.all_sources():
        for action in source.actions:
            old = keep.get((source.name, action.name)) if keep else None
            if old is not None and old.config == action and not _reads_pem(action.options):
                actions[(source.name, action.name)] = old
                continue
            module = kind(action.type, f"{action.key}.type")
            created = module.create(action, resources)
            if made is not None:
                made.append(created)
            actions[(source.name, action.name)] = created
    return actions


def _reads_pem(options: Mapping[str, Any]) -> bool:
    """Whether an action's options name PEM files (``tls``, an openai ``then``'s too), read
    when it is created: such an action is created again at every reload, its options
    unchanged, so a renewed certificate is taken. Its ``env:`` and ``file:`` secrets need no
    such rule: ``ActionConfig.read`` differs once one of them does."""
    return "tls" in options or any(
        isinstance(value, Mapping) and _reads_pem(value) for value in options.values()
    )


async def rebuild(
    resources: Resources, keep: Mapping[tuple[str, str], Action]
) -> dict[tuple[str, str], Action]:
    """``build`` for a reload: the running actions whose config is unchanged live on (their
    clients and pools with them), but those that read PEM files (``_reads_pem``). Should
    creating one fail, those created so far are closed."""
    made: list[Action] = []
    try:
        return build(resources, keep, made)
    except BaseException:
        for action in made:
            await action.aclose()
        raise
