"""The action registry: maps each ``type`` to its module and builds configured actions.

Each action kind lives in its own module and exports ``create(config, resources)``; modules are
imported on first use so that, say, ``openai`` is only loaded when a source uses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from webhookd.actions.base import Action, Outcome, Resources
from webhookd.config import ACTION_KINDS, ActionConfig, Config
from webhookd.errors import ConfigError

_MODULES: Mapping[str, str] = {
    "log": "webhookd.actions.log",
    "forward": "webhookd.actions.forward",
    "openai": "webhookd.actions.openai",
    "command": "webhookd.actions.command",
    "python": "webhookd.actions.python",
}
KINDS = ACTION_KINDS

__all__ = ["KINDS", "Action", "Outcome", "Resources", "build", "validate"]


def _module_for(config: ActionConfig) -> object:
    name = _MODULES.get(config.type)
    if name is None:
        raise ConfigError(f"{config.key}.type", f"unknown action type {config.type!r}")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        raise ConfigError(
            f"{config.key}.type", f"action type {config.type!r} is not available in this build"
        ) from exc


def validate(config: Config) -> None:
    """Check every action's own options (raises ``ConfigError`` naming the dotted key)."""
    for source in config.sources.values():
        for action in source.actions:
            module = _module_for(action)
            module.validate(action)  # type: ignore[attr-defined]


def build(resources: Resources) -> dict[tuple[str, str], Action]:
    """Create every configured action, keyed by ``(source name, action name)``."""
    actions: dict[tuple[str, str], Action] = {}
    for source in resources.config.sources.values():
        for action in source.actions:
            module = _module_for(action)
            actions[(source.name, action.name)] = module.create(  # type: ignore[attr-defined]
                action, resources
            )
    return actions
