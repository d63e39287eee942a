"""Templates: ``{{ a.b.c }}`` lookups into an event's payload, and nothing else.

A template is literal text with lookups. A lookup is a dotted path whose segments are letters,
digits, ``_`` and ``-`` (``{{ body-plain }}``, ``{{ data.object.id }}``, ``{{ items.0.name }}``:
a number indexes a list), or a dot alone, ``{{ . }}``: the whole payload. There are no
expressions, filters, calls or attribute access, so a payload can never make a template run
anything. Templates are compiled when the config is loaded; a stray ``{{`` or a bad path is a
``ConfigError`` naming the key.

The payload is the body parsed as JSON; or, for ``application/x-www-form-urlencoded`` and
``multipart/form-data`` bodies, the form's fields (files are skipped); none for a body that is
neither, or JSON nested deeper than ``json.loads`` reads (about 990 levels, as the stack
allows). Rendering: a string as is, ``null`` and a missing key as the empty string (a webhook
that lacks an optional field must not fail the job), numbers and booleans as JSON writes them,
objects and arrays as compact JSON (so ``{{ . }}`` is a JSON body as compact JSON, and a form's
fields as a JSON object). A number no float or int here holds (``1e400``, an int past the
digits Python reads) is kept as the text it was sent as, and ``NaN`` or ``Infinity`` (which
Python reads, JSON has not) as a string.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Container, Mapping
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
    """The payload of a body that is neither JSON nor a form (nor JSON ``json.loads`` reads:
    nested deeper than the stack allows): empty, and ``{{ . }}`` finds nothing in it (it
    rendered ``{}``, and a model was asked about "{}" with no warning)."""


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
    holding = _holding_sent_text(value)
    out: list[str] = []
    try:
        if not holding:
            return _dumps(value)
        _write(value, out, holding)
    except RecursionError:  # called with little of the stack left: no json.dumps of a tree
        out.clear()
        _write(value, out, _EVERY_ONE)
    return "".join(out)


# One encoder for every call: json.dumps with options of its own makes a new one each time,
# some microseconds, paid once per object when a payload is written piece by piece.
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# Written by json's encoder as ``_text`` writes them: a member of one of these types needs no
# look. A number kept as sent is a ``_Number`` or a ``_Sent``; anything else, an object or a list.
_PLAIN = frozenset({str, int, float, bool, type(None)})
_KEPT = frozenset({_Number, _Sent})


# json.dumps writes an object or a list by calling itself, a level of the stack for each level
# of it, and raises RecursionError where the stack runs out; but json.loads takes a body nested
# almost as deep as the stack allows (about 990). No more levels than this are left to it.
_DUMPS_DEPTH = 200


def _holding_sent_text(value: Any) -> set[int]:
    """The ids of the numbers in ``value`` written otherwise than as a float or int is, and of
    the objects and lists (``value`` itself among them) that hold one at any depth or an object
    or a list ``_DUMPS_DEPTH`` levels below them: ``_write`` writes those piece by piece, and
    the rest with one ``json.dumps`` each. A walk with a list of its own, not the call stack."""
    holding: set[int] = set()

    def mark(entry: Any) -> None:  # this one, and each one above it not marked yet
        while entry is not None and id(entry[0]) not in holding:
            holding.add(id(entry[0]))
            entry = entry[1]

    if isinstance(value, _Sent | _Number):
        holding.add(id(value))
    # An object or a list, with its parent's entry (the way up to mark), and its depth.
    todo: list[tuple[Any, Any, int]] = [(value, None, 0)]
    while todo:
        entry = todo.pop()
        node, _, depth = entry
        if isinstance(node, list | tuple):
            members: Any = node
        elif isinstance(node, Mapping):
            members = node.values()
        else:
            continue
        if depth and depth % _DUMPS_DEPTH == 0:
            mark(entry[1])
        for member in members:
            kind = type(member)
            if kind in _PLAIN:
                continue
            if kind in _KEPT:
                if kind is _Number and member.text == float.__repr__(member):
                    continue  # written as its float is
                holding.add(id(member))
                mark(entry)
            else:
                todo.append((member, entry, depth + 1))
    return holding


class _EveryOne:
    """What ``_write`` takes for ``holding`` to write every object and list piece by piece."""

    def __contains__(self, _id: object) -> bool:
        return True


_EVERY_ONE = _EveryOne()


class _Written(str):
    """JSON text already written: ``_write`` puts it out as it is."""

    __slots__ = ()


def _write(value: Any, out: list[str], holding: Container[int]) -> None:
    """``value`` as compact JSON onto ``out``, each sent number as its text; with a list of
    its own for what is still to write (as ``_holding_sent_text`` walks). Only what is in
    ``holding`` is written piece by piece: each run of members between those is written by
    one ``json.dumps`` (one call per member took seconds for a body of a megabyte holding a
    single 1.50)."""
    todo: list[Any] = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, _Written):
            out.append(item)
        elif id(item) not in holding:
            out.append(_dumps(item))
        elif isinstance(item, _Sent | _Number):
            out.append(item.text)
        elif not isinstance(item, Mapping | list | tuple):  # with every one held
            out.append(_dumps(item))
        else:
            mapping = isinstance(item, Mapping)
            members = item.items() if isinstance(item, Mapping) else enumerate(item)
            parts: list[Any] = []  # written text, and members that hold sent text, in order
            text = ["{" if mapping else "["]
            run: Any = {} if mapping else []  # members between those, written as one
            for key, member in members:
                if id(member) not in holding:
                    if mapping:
                        run[key] = member
                    else:
                        run.append(member)
                    continue
                if run:
                    text += [_dumps(run)[1:-1], ","]
                    run = {} if mapping else []
                if mapping:
                    text.append(_dumps(key) + ":")
                if type(member) in _KEPT:
                    text.append(member.text)
                else:
                    parts += [_Written("".join(text)), member]
                    text = []
                text.append(",")
            if run:
                text += [_dumps(run)[1:-1], ","]
            end = "}" if mapping else "]"
            if text[-1] == ",":
                text[-1] = end  # for the comma after the last member
            else:  # none (every one held)
                text.append(end)
            parts.append(_Written("".join(text)))
            todo.extend(reversed(parts))


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
