"""Templates: ``{{ a.b.c }}`` lookups into an event's payload, and nothing else.

A template is literal text with lookups. A lookup is a dotted path whose segments are letters,
digits, ``_`` and ``-`` (``{{ body-plain }}``, ``{{ data.object.id }}``, ``{{ items.0.name }}``:
a number indexes a list), or a dot alone, ``{{ . }}``: the whole payload. There are no
expressions, filters, calls or attribute access, so a payload can never make a template run
anything. Templates are compiled when the config is loaded; a stray ``{{`` or a bad path is a
``ConfigError`` naming the key.

The payload is the body parsed as JSON; or, for ``application/x-www-form-urlencoded`` and
``multipart/form-data`` bodies, the form's fields (files are skipped). Rendering: a string as is,
``null`` and a missing key as the empty string (a webhook that lacks an optional field must not
fail the job), numbers and booleans as JSON writes them, objects and arrays as compact JSON
(so ``{{ . }}`` is a JSON body as compact JSON, and a form's fields as a JSON object). A number
no float or int here holds (``1e400``, an int past the digits Python reads) is kept as the
text it was sent as, and ``NaN`` or ``Infinity`` (which Python reads, JSON has not) as a string.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from webhookd import forms
from webhookd.errors import ConfigError
from webhookd.models import Event

_TAG = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_PATH = re.compile(r"[\w-]+(?:\.[\w-]+)*")
_MISSING: Any = object()

Part = str | tuple[str, ...]  # literal text, or a lookup path (``()``: the whole payload)


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: render it against a payload from ``payload_of``."""

    text: str
    parts: tuple[Part, ...]

    @property
    def has_lookups(self) -> bool:
        return any(isinstance(p, tuple) for p in self.parts)

    def render(self, payload: Any) -> str:
        return self.render_noting_misses(payload)[0]

    def render_noting_misses(self, payload: Any) -> tuple[str, tuple[str, ...]]:
        """The rendered text, and its lookups (their paths, ``.`` for ``{{ . }}``) when every one
        found nothing: then the text is the template's literal text alone, most likely because
        the payload is not shaped as the template expects. A missing key and ``null`` found
        nothing; an empty string is a value. ``()`` when any lookup found one, or there are none."""
        out: list[str] = []
        misses: list[str] = []
        found = False
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = lookup(payload, part)
            if value is None:
                misses.append(".".join(part) or ".")
            else:
                found = True
            out.append(_text(value))
        return "".join(out), () if found else tuple(dict.fromkeys(misses))


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
        if path == ".":  # the whole payload: a path of no steps
            parts.append(())
        elif _PATH.fullmatch(path):
            parts.append(tuple(path.split(".")))
        else:
            raise ConfigError(
                key,
                f"{{{{{match.group(1)}}}}} is not a lookup: write a dotted path of letters, "
                "digits, '_' and '-', like {{ data.object.id }}, or {{ . }} for the whole payload",
            )
        at = match.end()
    tail = text[at:]
    _check_literal(tail, key)
    if tail:
        parts.append(tail)
    return Template(text, tuple(parts))


def _check_literal(literal: str, key: str) -> None:
    if "{{" in literal:
        raise ConfigError(key, "has a '{{' that is not closed by '}}'")


class NoPayload(dict[str, Any]):
    """The payload of a body that is neither JSON nor a form: empty, and ``{{ . }}`` finds
    nothing in it (it rendered ``{}``, and a model was asked about "{}" with no warning)."""


def lookup(payload: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` (the payload itself at ``()``), or ``None`` when any step is
    missing."""
    if not path and isinstance(payload, NoPayload):
        return None
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
    put in a template as ``1.50`` (a price), not as the float's ``1.5``, alone or within an
    object or a list put whole."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> _Number:
        number = super().__new__(cls, text)
        number.text = text
        return number


class _Sent:
    """A JSON number no float or int here holds, as the text it was sent as: ``1e400`` (a
    float's ``Infinity``, which is no JSON), an int past the digits Python reads (which failed
    the whole payload). Written as that text, alone or within an object put whole."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:  # as str() writes it too (an excerpt of a body holding one)
        return self.text


def _float(text: str) -> _Number | _Sent:
    number = _Number(text)
    return number if math.isfinite(number) else _Sent(text)


def _int(text: str) -> int | _Sent:
    try:
        return int(text)
    except ValueError:  # past the digits Python reads
        return _Sent(text)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, _Number | _Sent):
        return value.text
    return to_json(value)


def to_json(value: Any) -> str:
    """``value`` (a payload, or a document holding one) as compact JSON, each number with a
    fraction or an exponent as the text it was sent as: what ``{{ . }}`` puts in and an openai
    action's ``then`` posts, valid JSON."""
    if not _holds_sent_text(value):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    out: list[str] = []  # json's encoder writes a float subclass as the float: piece by piece
    _write(value, out)
    return "".join(out)


def _holds_sent_text(value: Any) -> bool:
    """Whether a number in ``value`` is written otherwise than as a float or int is. A walk
    with a list of its own, not the call stack: a payload nested 450 deep is JSON too."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, _Sent):
            return True
        if isinstance(item, _Number):
            if item.text != float.__repr__(item):
                return True
        elif isinstance(item, Mapping):
            todo.extend(item.values())
        elif isinstance(item, list | tuple):
            todo.extend(item)
    return False


class _Written(str):
    """JSON text already written: ``_write`` puts it out as it is."""

    __slots__ = ()


def _write(value: Any, out: list[str]) -> None:
    """``value`` as compact JSON onto ``out``, each sent number as its text; with a list of
    its own for what is still to write (as ``_holds_sent_text`` walks)."""
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, _Written):
            out.append(item)
        elif isinstance(item, _Sent | _Number):
            out.append(item.text)
        elif isinstance(item, Mapping):
            parts: list[Any] = [_Written("{")]
            for i, (key, member) in enumerate(item.items()):
                parts += [_Written(("," if i else "") + json.dumps(key, ensure_ascii=False) + ":")]
                parts.append(member)
            parts.append(_Written("}"))
            todo.extend(reversed(parts))
        elif isinstance(item, list | tuple):
            parts = [_Written("[")]
            for i, member in enumerate(item):
                if i:
                    parts.append(_Written(","))
                parts.append(member)
            parts.append(_Written("]"))
            todo.extend(reversed(parts))
        else:
            out.append(json.dumps(item, ensure_ascii=False))


def payload_of(event: Event) -> Any:
    """What templates look into: the JSON body, or the form's fields; an empty ``NoPayload``
    when neither, or a form of more than ``forms.MOST_FIELDS`` fields (lookups find nothing
    in it, ``{{ . }}`` included)."""
    if forms.media_type(event.content_type) in (forms.URLENCODED, forms.MULTIPART):
        try:  # as many fields as the receiver reads: a form of more is read on the event loop
            return forms.fields(event.content_type, event.body, forms.MOST_FIELDS)
        except forms.TooManyFields:
            return NoPayload()
    try:
        return json.loads(event.body, parse_float=_float, parse_constant=str)
    except (json.JSONDecodeError, RecursionError):  # nested deeper than Python's stack: none
        return NoPayload()
    except ValueError:
        pass  # an int past the digits Python reads (or no UTF-8): its text is kept this time
    try:
        return json.loads(event.body, parse_float=_float, parse_constant=str, parse_int=_int)
    except (ValueError, RecursionError):
        return NoPayload()
