"""Reading a TOML table: typed getters whose every error names its dotted key, and ``setting()``.

A default is written once, on its dataclass field; ``setting()`` keeps the field's bounds
beside it, and ``Table.read`` fills a dataclass from a table with them. The whole config is read
with ``Table``, and action kinds read their options with it too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from webhookd.config.checks import _type_name, _unknown, check_number, closest
from webhookd.config.reading import read_secret
from webhookd.errors import ConfigError
from webhookd.secret import Secret

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


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


def source_key(name: str) -> str:
    """``sources.<name>``, the name quoted where TOML would need it (``sources."a b"``)."""
    return f"sources.{name if _BARE_KEY.fullmatch(name) else json.dumps(name)}"
