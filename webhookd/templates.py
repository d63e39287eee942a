"""Templates: ``{{ a.b.c }}`` lookups into an event's payload, and nothing else.

A template is literal text with lookups. A lookup is a dotted path whose segments are letters,
digits, ``_`` and ``-`` (``{{ body-plain }}``, ``{{ data.object.id }}``, ``{{ items.0.name }}``:
a number indexes a list). There are no expressions, filters, calls or attribute access, so a
payload can never make a template run anything. Templates are compiled when the config is
loaded; a stray ``{{`` or a bad path is a ``ConfigError`` naming the key.

The payload is the body parsed as JSON; or, for ``application/x-www-form-urlencoded`` and
``multipart/form-data`` bodies, the form's fields (files are skipped). Rendering: a string as is,
``null`` and a missing key as the empty string (a webhook that lacks an optional field must not
fail the job), numbers and booleans as JSON writes them, objects and arrays as compact JSON.

One path is not the payload's: ``{{ query.NAME }}`` is the parameter ``NAME`` of the URL's query
(decoded, the last of a name winning, as a form's fields are read), and an absent one renders
empty as a missing key does. A payload's own ``query`` is still ``{{ query }}``; its fields
are not reachable under ``query.``, and a deeper ``{{ query.a.b }}`` is a ``ConfigError``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from webhookd import forms
from webhookd.errors import ConfigError
from webhookd.models import Event

_TAG = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_PATH = re.compile(r"[\w-]+(?:\.[\w-]+)*")
_MISSING: Any = object()
# The first segment of a lookup into the URL's query, not the payload: {{ query.store }}.
QUERY = "query"
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Param:
    """A lookup of the URL query's parameter ``name`` (``{{ query.name }}``)."""

    name: str


Part = str | tuple[str, ...] | Param  # literal text, a lookup path, or a query parameter


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: render it against a payload from ``payload_of``."""

    text: str
    parts: tuple[Part, ...]

    @property
    def has_lookups(self) -> bool:
        return any(not isinstance(p, str) for p in self.parts)

    def render(self, payload: Any, query: Mapping[str, str] = _NO_PARAMS) -> str:
        """The text with each lookup's value: into ``payload``, or into ``query`` (the URL
        query's parameters, ``query_of``) for a ``{{ query.NAME }}``."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Param):
                out.append(query.get(part.name, ""))
            else:
                out.append(_text(lookup(payload, part)))
        return "".join(out)


def compile_template(text: Any, key: str) -> Template:
    """Compile ``text`` (raises ``ConfigError`` naming ``key`` when it is malformed)."""
    if not isinstance(text, str):
        raise ConfigError(key, "must be a string")
    parts: list[Part] = []
    at = 0
    for match in _TAG.finditer(text):
        literal = text[at : match.start()]
        _check_literal(literal, key)
        if literal:
            parts.append(literal)
        path = match.group(1).strip()
        if not _PATH.fullmatch(path):
            raise ConfigError(
                key,
                f"{{{{{match.group(1)}}}}} is not a lookup: write a dotted path of letters, "
                "digits, '_' and '-', like {{ data.object.id }}",
            )
        parts.append(_lookup_part(tuple(path.split(".")), match.group(0), key))
        at = match.end()
    tail = text[at:]
    _check_literal(tail, key)
    if tail:
        parts.append(tail)
    return Template(text, tuple(parts))


def _lookup_part(path: tuple[str, ...], tag: str, key: str) -> Part:
    """A parsed lookup: into the query when it starts with ``query.``, else into the payload."""
    if path[0] != QUERY or len(path) == 1:
        return path
    if len(path) > 2:
        raise ConfigError(key, f"{tag}: a query parameter is one name, as in {{{{ query.store }}}}")
    return Param(path[1])


def _check_literal(literal: str, key: str) -> None:
    if "{{" in literal:
        raise ConfigError(key, "has a '{{' that is not closed by '}}'")


def lookup(payload: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path``, or ``None`` when any step is missing."""
    node = payload
    for segment in path:
        if isinstance(node, Mapping):
            node = node.get(segment, _MISSING)
        elif isinstance(node, list) and segment.isascii() and segment.isdigit():
            index = int(segment)
            node = node[index] if index < len(node) else _MISSING
        else:
            return None
        if node is _MISSING:
            return None
    return node


class _Number(float):
    """A JSON number with a fraction or an exponent, and the text it was sent as: ``1.50`` is
    put in a template as ``1.50`` (a price), not as the float's ``1.5``, ``1e400`` as itself,
    not ``Infinity``. Within an object or a list put whole, it is written as a float."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> _Number:
        number = super().__new__(cls, text)
        number.text = text
        return number


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, _Number):
        return value.text
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def query_of(event: Event) -> Mapping[str, str]:
    """What ``{{ query.NAME }}`` looks into: the URL query's parameters, read as an urlencoded
    form's fields are (decoded, the last of a name wins); empty when the URL had no query."""
    if not event.query:
        return _NO_PARAMS
    return dict(forms.pairs(event.query))


def payload_of(event: Event) -> Any:
    """What templates look into: the JSON body, or the form's fields; ``{}`` when neither."""
    if forms.media_type(event.content_type) in (forms.URLENCODED, forms.MULTIPART):
        return event.form()
    try:
        return json.loads(event.body, parse_float=_Number)
    except ValueError:
        return {}
