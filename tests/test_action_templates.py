"""Templates: ``{{ a.b }}`` lookups into JSON and form payloads, nothing executable."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhookd.errors import ConfigError
from webhookd.models import Event, Priority
from webhookd.templates import NoPayload, Template, compile_template, payload_of

ORDER = {
    "id": 42,
    "paid": True,
    "customer": {"name": "Ada", "tags": ["vip", "eu"]},
    "items": [{"name": "kettle", "qty": 2}],
    "note": None,
    "body-plain": "Hello",
}


def event(body: bytes, content_type: str) -> Event:
    return Event(
        id="evt_1",
        source="s",
        received_at=0.0,
        dedup_key="k",
        tenant="",
        priority=Priority.NORMAL,
        headers=(("Content-Type", content_type),),
        body=body,
    )


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("Order {{ id }} for {{customer.name}}", "Order 42 for Ada"),
        ("{{ items.0.name }} x{{ items.0.qty }}", "kettle x2"),
        ("{{ body-plain }}", "Hello"),
        (
            "paid={{ paid }} note=[{{ note }}] missing=[{{ nope.deeper }}]",
            "paid=true note=[] missing=[]",
        ),
        ("{{ customer.tags }}", '["vip","eu"]'),
        ("{{ items.5.name }}|{{ items.x }}|{{ id.0 }}", "||"),
        ("no lookups, just } braces }}", "no lookups, just } braces }}"),
        ("{{ customer.name.__class__ }}{{ __class__ }}", ""),
    ],
)
def test_lookups_render_values_and_missing_keys_render_empty(text: str, rendered: str) -> None:
    """Paths walk objects and list indexes; missing and null render empty, others as JSON."""
    assert compile_template(text, "k").render(ORDER) == rendered


@pytest.mark.parametrize(
    "text",
    [
        "Hi {{ name",
        "{{ }}",
        "{{ a + b }}",
        "{{ name | upper }}",
        "{{ f(x) }}",
        "{{ a..b }}",
        "{{ .. }}",
        "{{ .id }}",
        "{{ . . }}",
    ],
)
def test_malformed_templates_are_config_errors_naming_the_key(text: str) -> None:
    """Anything but a dotted path, or an unclosed tag, fails at config load with the key."""
    with pytest.raises(ConfigError) as err:
        compile_template(text, "sources.s.actions[0].prompt")
    assert err.value.key == "sources.s.actions[0].prompt"


def test_payload_is_json_or_urlencoded_form() -> None:
    """The JSON body, a urlencoded form's fields, or nothing for a body that is neither."""
    assert payload_of(event(b'{"a": [1]}', "application/json")) == {"a": [1]}
    form = event(b"subject=Hi&body-plain=Line+1", "application/x-www-form-urlencoded")
    assert payload_of(form) == {"subject": "Hi", "body-plain": "Line 1"}
    assert payload_of(event(b"\x00 not json", "application/octet-stream")) == {}
    # Nested past Python's stack: nothing, as for any body that is not JSON (a RecursionError
    # escaped, and every templated job of the webhook retried until it went dead).
    for deep in (b"[" * 100_000, b"[" * 100_000 + b"1" + b"]" * 100_000):
        assert payload_of(event(deep, "application/json")) == {}
    assert payload_of(event(b'{"n": ' + b"9" * 5000 + b', "a": ' + b"[" * 100_000, "")) == {}


def test_a_dot_alone_is_the_whole_payload_as_compact_json() -> None:
    """``{{ . }}`` puts the whole JSON body in as compact JSON, numbers as they were sent, and a
    form's fields as their JSON object: a prompt can ask about the webhook as a whole."""
    body = '{"id": 7, "price": 1.50,\n "who": {"name": "Zoë"}, "tags": [], "note": null}'
    payload = payload_of(event(body.encode(), "application/json"))
    rendered = compile_template("Summarize: {{ . }}|{{.}}", "k").render(payload)
    whole = '{"id":7,"price":1.50,"who":{"name":"Zoë"},"tags":[],"note":null}'
    assert rendered == f"Summarize: {whole}|{whole}"
    form = payload_of(event(b"subject=Hi&body-plain=Line+1", "application/x-www-form-urlencoded"))
    assert compile_template("{{ . }}", "k").render(form) == '{"subject":"Hi","body-plain":"Line 1"}'
    assert compile_template("[{{ . }}]", "k").render([1, "a"]) == '[[1,"a"]]'
    # A body neither JSON nor a form: nothing found, said as a miss (it rendered "{}").
    text = payload_of(event(b"<order id='7'/>", "application/xml"))
    assert compile_template("Summarize: {{ . }}", "k").render_noting_misses(text) == (
        "Summarize: ",
        (".",),
    )


@pytest.mark.parametrize(
    ("text", "misses"),
    [
        ("Summarize: {{ body }} {{ data.id }} {{ body }}", ("body", "data.id")),
        ("{{ note }}{{ items.9 }}", ("note", "items.9")),  # null found nothing too
        ("{{ nope }} {{ id }}", ()),  # one found a value
        ("{{ nope }} {{ customer.tags.1 }}", ()),
        ("no lookups", ()),
        ("{{ . }}", ()),
    ],
)
def test_render_noting_misses_names_the_lookups_when_every_one_found_nothing(
    text: str, misses: tuple[str, ...]
) -> None:
    """The lookups come back only when none found a value (the text is then the template's
    literal text alone), each once; the text is what ``render`` makes."""
    template = compile_template(text, "k")
    assert template.render_noting_misses(ORDER) == (template.render(ORDER), misses)


def test_an_empty_string_is_a_value_and_a_null_payload_is_nothing() -> None:
    """An empty field was sent, so it is no miss; a JSON ``null`` body leaves even ``{{ . }}``
    with nothing."""
    assert compile_template("{{ a }}", "k").render_noting_misses({"a": ""}) == ("", ())
    assert compile_template("[{{ . }}]", "k").render_noting_misses(None) == ("[]", (".",))


def test_a_number_is_put_in_as_it_was_sent() -> None:
    """A price of 1.50 renders 1.50, not the float's 1.5, and 1e400 as itself, not Infinity;
    inside an object put whole too (it was the float's there)."""
    body = b'{"price": 1.50, "huge": 1e400, "qty": 2, "line": {"price": 2.50}}'
    payload = payload_of(event(body, "application/json"))
    rendered = compile_template("{{ price }} {{ huge }} {{ qty }} {{ line }}", "k").render(payload)
    assert rendered == '1.50 1e400 2 {"price":2.50}'


def strict_json(text: str) -> Any:
    """``text`` read as JSON allows it: no NaN or Infinity, ints kept as their digits (Python
    reads no more than 4,300 of them)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_int=str, parse_constant=refuse)


def test_a_number_past_what_python_holds_keeps_its_text_and_the_rest_of_the_payload() -> None:
    """An int of 5,000 digits made the whole body unreadable: every lookup rendered empty (a
    command ran with empty arguments, recorded done). 1e400 put whole was ``Infinity``, and a
    body's ``NaN`` ``NaN``: not JSON. Each keeps its text now, a lookup of the rest finds it,
    and ``{{ . }}`` is valid JSON."""
    digits = "9" * 5000
    body = f'{{"ref": "main", "amount": {digits}, "rate": 1e400, "x": NaN, "p": 1.50}}'
    payload = payload_of(event(body.encode(), "application/json"))
    parts = compile_template("{{ ref }}|{{ amount }}|{{ rate }}|{{ x }}|{{ p }}", "k")
    assert parts.render(payload) == f"main|{digits}|1e400|NaN|1.50"
    whole = compile_template("{{ . }}", "k").render(payload)
    assert whole == f'{{"ref":"main","amount":{digits},"rate":1e400,"x":"NaN","p":1.50}}'
    assert strict_json(whole)["amount"] == digits
    listed = payload_of(event(b'[-1e400, 1, {"a": Infinity}]', "application/json"))
    assert compile_template("{{ . }}", "k").render(listed) == '[-1e400,1,{"a":"Infinity"}]'


def test_multipart_form_fields_are_looked_up_and_files_skipped() -> None:
    """A Mailgun-style multipart post: text fields are payload, attachments are not."""
    body = (
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="subject"\r\n\r\n'
        b"R\xc3\xa9sum\xc3\xa9 please\r\n"
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="body-plain"\r\n\r\n'
        b"Line one\r\nLine two\r\n"
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="attachment-1"; filename="cv.pdf"\r\n'
        b"Content-Type: application/pdf\r\n\r\n"
        b"%PDF-1.4 binary\r\n"
        b"--XyZ--\r\n"
    )
    payload = payload_of(event(body, "multipart/form-data; boundary=XyZ"))
    assert payload == {"subject": "Résumé please", "body-plain": "Line one\r\nLine two"}
    rendered = compile_template("{{ subject }}: {{ body-plain }}", "k").render(payload)
    assert rendered == "Résumé please: Line one\r\nLine two"


def test_a_payload_nested_deep_is_put_in_whole() -> None:
    """``{{ . }}`` of a payload nested 450 deep (JSON the body's parser takes) holding a sent
    number: written whole, as sent, not a job gone dead with a RecursionError."""
    body = "[" * 450 + '{"price": 1.50}' + "]" * 450
    payload = payload_of(event(body.encode(), "application/json"))
    assert compile_template("{{ . }}", "k").render(payload) == body.replace(" ", "")


def test_every_payload_that_parses_is_put_in_whole_however_deep() -> None:
    """A body nested up to the depth ``json.loads`` takes (about 990) is a payload, and
    ``{{ . }}`` puts it in whole: json.dumps, a few calls deeper on the stack, raised
    RecursionError from about 955 levels on (a command never ran, an answer paid for was never
    posted on). Deeper than json.loads goes, the body is no payload."""
    template = compile_template("{{ . }}", "k")
    parsed = []
    for depth in range(800, 1100):
        for inner in (b"1", b"1.50"):
            body = b"[" * depth + inner + b"]" * depth
            payload = payload_of(event(body, "application/json"))
            if not isinstance(payload, NoPayload):
                assert template.render(payload) == body.decode()
                parsed.append(depth)
    assert 900 < max(parsed) < 1099


def test_a_payload_is_put_in_whole_with_little_of_the_stack_left() -> None:
    """Rendered where the stack has no room left for json.dumps of 150 levels: written piece by
    piece instead, still whole (not a RecursionError)."""
    body = "[" * 150 + '{"a": [1, 2.5, "x", [], {}], "é": null}' + "]" * 150
    payload = payload_of(event(body.encode(), "application/json"))
    template = compile_template("{{ . }}", "k")

    def deep_down(levels: int) -> str:
        return deep_down(levels - 1) if levels else template.render(payload)

    frame, frames = sys._getframe(), 0
    while frame is not None:
        frame, frames = frame.f_back, frames + 1
    assert deep_down(sys.getrecursionlimit() - frames - 60) == body.replace(" ", "")


@dataclass(frozen=True)
class _AsSent:
    """A number as it is written in the body."""

    text: str


def _json_of(tree: Any) -> str:
    """``tree`` (an object or a list of ``JSON_TREES``, its numbers as text) as compact JSON."""
    if isinstance(tree, _AsSent):
        return tree.text
    if isinstance(tree, dict):
        members = (f"{json.dumps(k, ensure_ascii=False)}:{_json_of(v)}" for k, v in tree.items())
        return "{" + ",".join(members) + "}"
    if isinstance(tree, list):
        return "[" + ",".join(_json_of(v) for v in tree) + "]"
    return json.dumps(tree, ensure_ascii=False)


# Numbers written as their float or int is, and some that are not (kept as they were sent).
_NUMBERS = st.sampled_from(["7", "-0.0", "1.5", "0.1", "1.50", "2.50", "1e5", "1E400", "9" * 5000])
_MEMBERS = st.none() | st.booleans() | st.text(max_size=3) | _NUMBERS.map(_AsSent)
JSON_TREES = st.recursive(
    st.lists(_MEMBERS, max_size=5) | st.dictionaries(st.text(max_size=3), _MEMBERS),
    lambda inner: (
        st.lists(inner | _MEMBERS, max_size=5)
        | st.dictionaries(st.text(max_size=3), inner | _MEMBERS)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(JSON_TREES)
def test_a_payload_is_put_in_whole_as_it_was_sent_wherever_its_numbers_are(tree: Any) -> None:
    """``{{ . }}`` is the compact JSON of the body, each number as sent, whatever holds the
    numbers kept as sent: first, last or between other members, alone or beside objects and
    lists that hold none (written whole) or some (written piece by piece)."""
    body = _json_of(tree)
    payload = payload_of(event(body.encode(), "application/json"))
    assert compile_template("{{ . }}", "k").render(payload) == body


def deepest_parsed() -> int:
    """The most lists a body can be nested in and still be a payload, from here."""
    for depth in range(1000, 0, -1):
        body = b"[" * depth + b"1" + b"]" * depth
        if not isinstance(payload_of(event(body, "application/json")), NoPayload):
            return depth
    raise AssertionError("no depth parsed")


@pytest.mark.parametrize("other", ["with-one-number-kept-as-sent", "nested-as-deep-as-it-parses"])
def test_a_megabyte_costs_about_what_one_plainly_written_does(other: str) -> None:
    """``{{ . }}`` of 500,000 ints (a megabyte, the default body limit) with a ``1.50`` last,
    or nested as deep as a body parses, takes about what the ints take in one list: written by
    one ``json.dumps`` but for the way down to the ``1.50``, or down the levels json.dumps has
    no stack for, not with a call for every number (seconds of the event loop's time, while
    every other sender's webhook waited)."""
    template = compile_template("{{ . }}", "k")
    plain = b"[" + b"1," * 500_000 + b"1]"
    if other == "with-one-number-kept-as-sent":
        body = plain.replace(b"1]", b"1.50]")
    else:
        depth = deepest_parsed() - 1  # one level for the list of ints
        body = b"[" * depth + plain + b"]" * depth
    payload = payload_of(event(body, "application/json"))
    assert not isinstance(payload, NoPayload)
    plain_s = render_s(template, payload_of(event(plain, "application/json")), plain)
    other_s = render_s(template, payload, body)
    assert other_s < 3 * plain_s + 0.1, f"{other_s:.2f}s against {plain_s:.2f}s"


def render_s(template: Template, payload: Any, body: bytes) -> float:
    """The seconds ``template`` takes to render ``payload`` (of ``body``), at the quickest of
    three (the machine's other work aside)."""
    took = []
    for _ in range(3):
        started = time.perf_counter()
        assert template.render(payload) == body.decode()
        took.append(time.perf_counter() - started)
    return min(took)
