"""``webhookd.forms``: a multipart body's parts are those the ``email`` package finds, for any
well-formed body (a property test with the standard library's parser as the reference); the
corner cases a boundary search must get right; form fields read from either kind of form."""

from __future__ import annotations

import base64
import email.message
import email.parser
import email.policy
import email.utils
import encodings
import quopri
import random
import string
import time
import tracemalloc
from collections.abc import Callable
from urllib.parse import parse_qsl, quote_from_bytes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhookd.forms import MOST_FIELDS, URLENCODED, fields, pairs, pairs_named, parts
from webhookd.models import Event, Priority
from webhookd.schemes.mailgun import signature_fields

Fields = list[tuple[str | None, str | None, bytes]]  # name, filename, decoded content


def ours(content_type: str, body: bytes) -> Fields:
    return [(p.name, p.filename, p.decoded()) for p in parts(content_type, body)]


def reference(content_type: str, body: bytes) -> Fields:
    """What the ``email`` package's whole-message parser makes of it."""
    head = b"Content-Type: " + content_type.encode() + b"\r\n\r\n"
    message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head + body)
    found: Fields = []
    for part in message.get_payload():
        assert isinstance(part, email.message.Message)
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((name if isinstance(name, str) else None, part.get_filename(), payload))
    return found


# A line of a value: any bytes but line breaks (the reference parser also breaks lines at a
# bare CR, which HTTP's multipart does not).
LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
FIELD = st.tuples(
    st.from_regex(r"[a-z][a-z0-9_-]{0,11}", fullmatch=True),
    st.one_of(st.none(), st.from_regex(r"[a-z]{1,8}\.(pdf|png|txt)", fullmatch=True)),
    st.lists(LINE, min_size=1, max_size=4),
    st.sampled_from([None, "base64", "quoted-printable"]),
)


@given(
    boundary=st.from_regex(r"[A-Za-z0-9'()+_,.:=?-]{1,40}", fullmatch=True),
    fields=st.lists(FIELD, min_size=1, max_size=6),
    crlf=st.booleans(),
    preamble=st.sampled_from([b"", b"This is the preamble.", b"preamble\r\nof two lines"]),
    epilogue=st.sampled_from([b"", b"epilogue", b"\r\n"]),
)
def test_the_parts_are_the_ones_the_email_package_finds(
    boundary: str,
    fields: list[tuple[str, str | None, list[bytes], str | None]],
    crlf: bool,
    preamble: bytes,
    epilogue: bytes,
) -> None:
    nl = b"\r\n" if crlf else b"\n"
    delimiter = b"--" + boundary.encode()
    body = preamble + nl if preamble else b""
    for name, filename, lines, encoding in fields:
        # A line that is a delimiter would end the part: content has none.
        value = nl.join(b"x" + line if line.startswith(delimiter) else line for line in lines)
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = [f"Content-Disposition: {disposition}".encode()]
        if encoding == "base64":
            sent = base64.encodebytes(value).replace(b"\n", nl).rstrip(nl)
        elif encoding == "quoted-printable":
            sent = quopri.encodestring(value).replace(b"\n", nl).rstrip(nl)
        else:
            sent = value
        if encoding:
            head.append(f"Content-Transfer-Encoding: {encoding}".encode())
        body += delimiter + nl + nl.join(head) + nl + nl + sent + nl
    body += delimiter + b"--" + nl + epilogue
    content_type = f'multipart/form-data; boundary="{boundary}"'
    assert ours(content_type, body) == reference(content_type, body)


def test_a_line_that_starts_like_the_boundary_is_content() -> None:
    body = (
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="a"\r\n\r\n'
        b"--XyZabc is not a delimiter\r\n--XyZ  \r\n"  # the delimiter, with spaces after it
        b'Content-Disposition: form-data; name="b"\r\n\r\n'
        b"2\r\n"
        b"--XyZ--"
    )
    assert ours("multipart/form-data; boundary=XyZ", body) == [
        ("a", None, b"--XyZabc is not a delimiter"),
        ("b", None, b"2"),
    ]


def test_an_unfinished_body_ends_its_last_part_and_odd_parts_are_still_parts() -> None:
    body = (
        b"--XyZ\r\n"
        b"\r\n"  # no headers at all
        b"anonymous\r\n"
        b"--XyZ\r\n"
        b"Content-Disposition: form-data; name*=utf-8''r%C3%A9sum%C3%A9\r\n\r\n"
        b"cut short"
    )
    assert ours("multipart/form-data; boundary=XyZ", body) == [
        (None, None, b"anonymous"),
        ("résumé", None, b"cut short"),
    ]


def test_a_part_of_megabytes_without_a_blank_line_is_not_read_as_headers() -> None:
    """Headers end within 16 KiB: past that a part has no name (and is no field), and the
    megabytes are not parsed line by line."""
    long_part = b'Content-Disposition: form-data; name="token"\r\n' + b"X-Pad: y\r\n" * 400_000
    body = b"--XyZ\r\n" + long_part + b"--XyZ\r\n" + b'Content-Disposition: form-data; name="b"'
    assert [p.name for p in parts("multipart/form-data; boundary=XyZ", body)] == [None, "b"]


def forged_heads(count: int, head_bytes: int, line: bytes) -> bytes:
    """``count`` parts whose header blocks hold ``head_bytes`` of ``line`` after their name,
    each block within the 16 KiB a part's headers are read in."""
    return b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="f%d"\r\n' % n
        + line * (head_bytes // len(line))
        + b"\r\n\r\nx\r\n"
        for n in range(count)
    ) + (b"--XyZ--\r\n")


@pytest.mark.parametrize("line", [b"a:\n", b"a:b\r\n", b" \n", b"a:\r"])
@pytest.mark.parametrize("count, head_bytes", [(60, 16_000), (1_000, 1_000)])
def test_a_body_of_short_header_lines_is_parsed_in_milliseconds(
    count: int, head_bytes: int, line: bytes
) -> None:
    """The email package parses a header block one line at a time (~2.4 µs each): 1 MB of
    short lines in parts' header blocks held the event loop 0.3-0.5 s (16 MB: 8 s), before a
    Mailgun signature was looked at. A body's parts are parsed for 4,096 header lines in all,
    so 1 MB of them takes milliseconds (5-25 ms measured; the bound is generous)."""
    body = forged_heads(count, head_bytes, line)
    content_type = "multipart/form-data; boundary=XyZ"
    for read in (
        lambda: signature_fields({"Content-Type": content_type}, body),
        lambda: fields(content_type, body, MOST_FIELDS),
    ):
        started = time.thread_time()
        read()
        assert time.thread_time() - started < 0.05


def test_past_4096_header_lines_a_bodys_parts_have_no_headers() -> None:
    """The parts of a body are parsed for 4,096 header lines in all: a part whose block would
    go past them has no headers (no name), nor has any part after it, however short. A body of
    1,000 parts of four lines each, more than a provider's, is read whole."""
    fields_of_four = b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="f%d"\r\nContent-Type: text/plain\r\n'
        b"Content-Transfer-Encoding: 8bit\r\nX-Pad: y\r\n\r\nv\r\n" % n
        for n in range(1_000)
    )
    found = fields("multipart/form-data; boundary=XyZ", fields_of_four + b"--XyZ--\r\n")
    assert len(found) == 1_000
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n'
        + b"a:\r\n" * 4_000
        + b"\r\nv\r\n"  # 4,001 lines: 95 left
        + b"".join(
            b'--XyZ\r\nContent-Disposition: form-data; name="b%d"\r\nX-Pad: y\r\n\r\nv\r\n' % n
            for n in range(40)
        )  # 15 left
        + b'--XyZ\r\nContent-Disposition: form-data; name="c"\r\n'
        + b"X-Pad: y\r\n" * 15
        + b"\r\nv\r\n"  # 16 lines: past them, so the part has no headers
        + b'--XyZ\r\nContent-Disposition: form-data; name="d"\r\n\r\nv\r\n--XyZ--\r\n'
    )
    names = [p.name for p in parts("multipart/form-data; boundary=XyZ", body)]
    assert names == ["a", *(f"b{n}" for n in range(40)), None, None]
    assert [p.content for p in parts("multipart/form-data; boundary=XyZ", body)][-2:] == [b"v"] * 2


def test_without_a_boundary_or_a_delimiter_there_are_no_parts() -> None:
    assert ours("multipart/form-data", b"--XyZ\r\n\r\nx\r\n--XyZ--") == []
    assert ours("multipart/form-data; boundary=XyZ", b"no delimiter here") == []
    assert ours("multipart/form-data; boundary=XyZ", b"--XyZ") == []  # no line after it


# Bits of urlencoded text dense in what unquoting must get right: escapes whole, cut short or
# of no hex, "%" and "=" side by side, UTF-8 cut between escapes and characters as sent.
URLENCODED_BITS = st.sampled_from(
    ["%", "=", "&", "+", " ", "a", "F", "0", "g", "\r", "\n", "\x00", "é", "€", "%41", "%e9"]
) | st.sampled_from(
    ["%E2", "%82", "%AC", "%C3", "%A9", "%F0%9F", "%4", "%zz", "%3D", "%3d", "=3D", "%25"]
)
URLENCODED_TEXT = st.lists(URLENCODED_BITS | st.text(max_size=3), max_size=40).map("".join)


@given(text=URLENCODED_TEXT)
def test_pairs_are_the_ones_parse_qsl_finds(text: str) -> None:
    """``pairs`` reads a form as ``urllib.parse.parse_qsl`` does, escapes undone by its own
    means (see the next test), with bytes that are no UTF-8 replaced or refused alike."""
    assert pairs(text) == parse_qsl(text, keep_blank_values=True)
    try:
        expected = parse_qsl(text, keep_blank_values=True, errors="strict")
    except ValueError:
        with pytest.raises(ValueError):
            pairs(text, errors="strict")
    else:
        assert pairs(text, errors="strict") == expected
    lone = text + "&\udcff=%41\udcff"  # a lone surrogate: no decoded body holds one
    assert pairs(lone) == parse_qsl(lone, keep_blank_values=True)


@pytest.mark.parametrize("text", ["a=" + "%41" * 349_525, "%" * 1_000_000, "a=%41é" * 166_666])
def test_pairs_of_a_megabyte_of_escapes_take_milliseconds(text: str) -> None:
    """``urllib.parse.unquote`` takes Python steps for each "%": 1 MB of "%41" took ~170 ms of
    the event loop, of "%" ~350 ms, before a Twilio or Mailgun signature was checked. ``pairs``
    undoes them in a few passes over the bytes (~10 ms measured; the bound is generous)."""
    started = time.thread_time()
    found = pairs(text, MOST_FIELDS)
    assert time.thread_time() - started < 0.05
    assert found == parse_qsl(text, keep_blank_values=True)


@given(
    text=URLENCODED_TEXT,
    names=st.sets(st.sampled_from(["a", "A", "é", "€", "=", "", " ", "aa", "\ufffd"])),
    longest=st.one_of(st.none(), st.integers(0, 12)),
)
def test_pairs_named_are_the_ones_pairs_finds(
    text: str, names: set[str], longest: int | None
) -> None:
    """``pairs_named`` finds the pairs of those names that ``pairs`` finds, in their order, less
    those whose value as sent is longer than ``longest``."""
    expected = []
    for field in filter(None, text.split("&")):
        [(name, value)] = pairs(field)
        if name in names and (longest is None or len(field.partition("=")[2]) <= longest):
            expected.append((name, value))
    assert pairs_named(text, names, longest=longest) == expected


def least_cpu(read: Callable[[], object], times: int = 3) -> float:
    """The least CPU time of ``times`` runs of ``read``: its cost, less a busy machine's noise."""
    spent = []
    for _ in range(times):
        started = time.thread_time()
        read()
        spent.append(time.thread_time() - started)
    return min(spent)


MAILGUN_EXAMPLE_LIMIT = 26_214_400  # examples/mailgun-openai.toml: 25 MiB, for attachments


@pytest.mark.parametrize("name", [b"a", b"token"])
def test_a_mailgun_form_is_read_for_its_signature_without_decoding_the_rest(name: bytes) -> None:
    """A Mailgun source reads four short fields of an urlencoded form before its signature is
    checked, but undid the escapes of every value first: an unsigned form of 25 MiB of ``%41=``
    (the example's limit; 25 KB gzipped) held the event loop ~1 s and allocated ~245 MB, where
    a body of plain letters, which has nothing to decode, takes ~80 ms and ~50 MB. Only those
    fields' values are decoded, and one longer than 1 KiB as sent is no signature field, so
    either costs what the plain body does (twice is the bound; it was ten times)."""
    headers = {"Content-Type": URLENCODED}
    forged = name + b"=" + b"%41=" * ((MAILGUN_EXAMPLE_LIMIT - len(name) - 1) // 4)
    plain = b"a=" + b"A" * (len(forged) - 2)
    tracemalloc.start()
    try:
        assert signature_fields(headers, forged) == {}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(forged), f"{peak / 2**20:.0f} MiB allocated"
    spent = least_cpu(lambda: signature_fields(headers, forged))
    assert spent < 2 * least_cpu(lambda: signature_fields(headers, plain)), f"{spent:.3f} s"


def test_mailgun_reads_its_fields_of_a_form_and_passes_over_long_values() -> None:
    """The signature fields are found as before, each name decoded as the form's reader
    decodes it (``%74oken`` is ``token``) and the first of a name taken, now among values left
    undecoded; a value over 1 KiB as sent is passed over, as a multipart form's part is."""
    body = (
        b"subject=caf%E9+%%&%74oken=t%2B1&timestamp=1700000000&token=second"
        + b"&signature="
        + b"%61" * 342
        + b"&signature="
        + b"ab" * 32
        + b"&parent-signature=cd&"
        + b"x%41" * 10_000
        + b"=y"
    )
    assert signature_fields({"Content-Type": URLENCODED}, body) == {
        "token": "t+1",
        "timestamp": "1700000000",
        "signature": "ab" * 32,
        "parent-signature": "cd",
    }


def test_fields_read_either_kind_of_form_and_leave_files_out() -> None:
    urlencoded = fields("application/x-www-form-urlencoded", b"a=1&b=%C3%A9&a=2&empty=")
    assert urlencoded == {"a": "2", "b": "é", "empty": ""}
    body = (
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="subject"\r\n'
        b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n"
        b"caf\xe9\r\n"
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
        b"not a field\r\n"
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="odd"\r\n'
        b"Content-Type: text/plain; charset=no-such-charset\r\n\r\n"
        b"caf\xc3\xa9\r\n"
        b"--XyZ--\r\n"
    )
    assert fields("multipart/form-data; boundary=XyZ", body) == {"subject": "café", "odd": "café"}


@pytest.mark.parametrize("charset", ["punycode", "undefined", "idna", "rot13", "base64"])
def test_a_part_is_decoded_only_by_a_text_charset(charset: str) -> None:
    """A charset a sender names is used only when it is a text encoding of a known kind:
    punycode's decoding takes quadratic time (a 1 MB value held the event loop 160 s),
    ``undefined`` and ``idna`` raise (the receiver answered 503), others are no text encoding.
    Such a part is read as UTF-8, as one that names no charset."""
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="id"\r\n'
        b"Content-Type: text/plain; charset=" + charset.encode() + b"\r\n\r\n"
        b"caf\xc3\xa9-" + b"zz" * 1000 + b"\r\n--XyZ--\r\n"
    )
    found = fields("multipart/form-data; boundary=XyZ", body)
    assert found == {"id": "café-" + "zz" * 1000}


def made_up_charsets(seed: int) -> tuple[str, bytes]:
    """A form's Content-Type and a body of 1,000 parts, each naming charsets no codec has in
    every RFC 2231 parameter a part is read by (name, filename, the Content-Type's name and
    charset), as does the form's own boundary."""
    rnd = random.Random(seed)

    def charset() -> bytes:
        return "".join(rnd.choices(string.ascii_letters, k=12)).encode()

    body = b""
    for n in range(1_000):  # a field, a file by its filename, a file by its Content-Type's name
        disposition = b"form-data; name*=" + charset() + b"''f%d" % n
        kind = b"text/plain; charset*=" + charset() + b"''utf-8"
        if n % 3 == 1:
            disposition += b"; filename*=" + charset() + b"''a.txt"
        elif n % 3 == 2:
            kind += b"; name*=" + charset() + b"''b.txt"
        body += b"--XyZ\r\nContent-Disposition: %s\r\nContent-Type: %s\r\n\r\nv\r\n" % (
            disposition,
            kind,
        )
    return f"multipart/form-data; boundary*={charset().decode()}''XyZ", body + b"--XyZ--\r\n"


def test_no_charset_a_sender_names_is_looked_up() -> None:
    """A sender's charset names are matched against the allowed ones, never looked up: the
    ``encodings`` module keeps every name it was asked for, unknown ones too, for the life of
    the process (a thousand in each forged post to a Mailgun source, read before its
    signature, grew a daemon by 148 MB in 120 posts)."""
    content_type, body = made_up_charsets(0)
    fields(content_type, body)  # whatever the allowed charsets add, once
    before = dict(encodings._cache)  # type: ignore[attr-defined]
    for seed in (1, 2):
        content_type, body = made_up_charsets(seed)
        read = [(p.name, p.filename, p.charset) for p in parts(content_type, body)]
        assert read[:3] == [
            ("f0", None, "utf-8"),
            ("f1", "a.txt", "utf-8"),
            ("f2", "b.txt", "utf-8"),
        ]
        assert len(fields(content_type, body)) == 334  # the others are files
        mailgun_type = content_type.replace("boundary*=", "x=1; boundary*=")
        assert signature_fields({"Content-Type": mailgun_type}, body) == {}
    assert encodings._cache == before  # type: ignore[attr-defined]


ALLOWED = ["utf-8", "UTF-8", "iso-8859-1", "latin-1", "cp1252", "koi8-r", "shift_jis", "gb18030"]


@given(charset=st.sampled_from(ALLOWED), text=st.text(min_size=1, max_size=20))
def test_an_rfc_2231_name_in_an_allowed_charset_reads_as_the_email_package_reads_it(
    charset: str, text: str
) -> None:
    """A name, filename or boundary sent as ``name*=charset''...`` in one of the charsets a
    part is decoded by reads as the email package's ``collapse_rfc2231_value`` reads it."""
    sent = text.encode(charset, "replace")
    escaped = quote_from_bytes(sent, safe="").encode()
    value = charset.encode() + b"''" + escaped
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name*="
        + value
        + b"; filename*="
        + value
        + b"\r\n\r\ncontent\r\n--XyZ--\r\n"
    )
    [part] = parts(f"multipart/form-data; boundary*={charset}''XyZ", body)
    expected = email.utils.collapse_rfc2231_value((charset, "", sent.decode("latin-1")))
    assert part.name == expected == sent.decode(charset)
    assert part.filename == expected.strip()
    assert part.content == b"content"


def test_an_rfc_2231_name_in_a_charset_not_allowed_reads_as_utf_8() -> None:
    """As a part's content is: by a charset of the allowed ones, else as UTF-8 (the email
    package read one it did not know as latin-1, one it knew by that charset)."""
    for charset in (b"x-made-up", b"", b"punycode"):
        body = (
            b"--XyZ\r\nContent-Disposition: form-data; name*=" + charset + b"''r%C3%A9sum%C3%A9"
            b"\r\n\r\nv\r\n--XyZ\r\nContent-Disposition: form-data; name*=caf%E9\r\n\r\nw\r\n"
            b"--XyZ--\r\n"
        )
        assert fields("multipart/form-data; boundary=XyZ", body) == {
            "résumé": "v",
            "caf\ufffd": "w",
        }


def test_a_part_whose_parameters_run_long_is_no_field() -> None:
    """The email package parses a parameter list in time that grows with its square: a part
    whose Content-Disposition (or Content-Type) holds thousands of ";" is not parsed for its
    name (no provider's has more than a few), nor is such a form's own Content-Type; one of a
    provider's shape still is."""
    many = b"; a=1" * 1000  # within the 16 KiB a head is read in
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="odd"' + many + b"\r\n\r\nx\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="id"\r\n'
        b"Content-Type: text/plain; charset=iso-8859-1" + many + b"\r\n\r\ncaf\xc3\xa9\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="ok"; filename="a.txt"\r\n\r\nf\r\n'
        b"--XyZ--\r\n"
    )
    found = [
        (p.name, p.filename, p.charset) for p in parts("multipart/form-data; boundary=XyZ", body)
    ]
    assert found == [(None, None, None), ("id", None, None), ("ok", "a.txt", None)]
    assert fields("multipart/form-data; boundary=XyZ", body) == {"id": "café"}
    long_type = "multipart/form-data; boundary=XyZ" + "; a=1" * 5000
    assert list(parts(long_type, body)) == []


def forged_names(disposition: bytes) -> bytes:
    """A multipart body of 1,000 parts, each with that Content-Disposition."""
    part = b"--XyZ\r\nContent-Disposition: " + disposition + b"\r\n\r\nx\r\n"
    return part * MOST_FIELDS + b"--XyZ--\r\n"


# Parts' parameters each within _MOST_PARAMS and _MOST_PARAMS_CHARS: a name sent as 32
# RFC 2231 pieces (963 KB, under the default body limit), 32 tiny parameters, a name of 1,350
# escapes (4 MB, under the Mailgun example's 25 MiB).
FORGED_NAMES = {
    "pieces": b"form-data"
    + b"".join(b"; name*%d*=%s" % (n, b"''" * (n == 0) + b"%41" * 6) for n in range(32)),
    "params": b"form-data" + b"".join(b"; a%d=b" % n for n in range(32)),
    "escapes": b"form-data; name*=''" + b"%41" * 1_350,
}


@pytest.mark.parametrize("shape", FORGED_NAMES)
def test_the_names_of_a_forged_forms_parts_are_read_in_milliseconds(shape: str) -> None:
    """A thousand parts whose names the email package decodes in Python, piece by piece and
    escape by escape: reading them held the event loop 70-300 ms for a Mailgun signature, on
    top of finding the parts, and twice that for a ``form:`` rule, which asked each part for
    its name and its filename and so parsed the header twice. A body's parameters are parsed
    for 4,096 pieces in all, each header once (10-20 ms measured; the bound is generous)."""
    found = list(parts("multipart/form-data; boundary=XyZ", forged_names(FORGED_NAMES[shape])))
    assert len(found) == MOST_FIELDS
    started = time.thread_time()
    read = [(part.name, part.filename, part.charset) for part in found]
    spent = time.thread_time() - started
    assert spent < 0.05, f"{spent:.3f} s"
    assert read[-1] == (None, None, None)


def test_a_bodys_parts_are_parsed_for_4096_parameter_pieces_in_all_each_header_once() -> None:
    """A part's Content-Disposition or Content-Type costs a piece for each ";", each eight
    "%" and each 256 characters, and is parsed once however many of its parameters are asked
    for: 128 parts of 32 pieces are read whole, for their name and their filename; the part
    after them has no name. A thousand parts of a provider's shape, each with a name, a
    filename and a charset, are read whole."""
    thirty_two = b"".join(  # 31 ";" and 8 "%" in under 256 characters
        b'--XyZ\r\nContent-Disposition: form-data; name="f%d"' % n
        + b"; a*=''%41%41%41%41%41%41%41%41; c*0=x; c*1=y"
        + b";" * 27
        + b"\r\n\r\nv\r\n"
        for n in range(128)
    )
    body = thirty_two + b'--XyZ\r\nContent-Disposition: form-data; name="g"\r\n\r\nw\r\n--XyZ--\r\n'
    expected = [f"f{n}" for n in range(128)]
    assert list(fields("multipart/form-data; boundary=XyZ", body)) == expected
    names = [p.name for p in parts("multipart/form-data; boundary=XyZ", body)]
    assert names == [*expected, None]
    attachments = b"".join(
        b'--XyZ\r\nContent-Disposition: form-data; name="attachment-%d"; filename="r %d.pdf"\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nv\r\n" % (n, n)
        for n in range(MOST_FIELDS)
    )
    found = [
        (p.name, p.filename, p.charset)
        for p in parts("multipart/form-data; boundary=XyZ", attachments + b"--XyZ--\r\n")
    ]
    assert found == [(f"attachment-{n}", f"r {n}.pdf", "utf-8") for n in range(MOST_FIELDS)]


def test_odd_bytes_in_a_parts_headers_and_charset_raise_nothing() -> None:
    """A byte past ASCII in a part's header (which the email package hands back as a
    ``Header``), a NUL or an unknown name in its charset, or a Content-Type whose ``name=``
    parameters run long (``filename`` falls back to it): each read as the rest are, no error
    (the receiver answered an unsigned request 503)."""
    many = b"; a=1" * 1000
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="id\xff"\r\n\r\nx\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="c"\r\n'
        b"Content-Type: text/plain; charset=a\x00b\r\n\r\ncaf\xc3\xa9\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="d"\r\n'
        b"Content-Type: text/plain; charset=x-no-such-" + b"z" * 100 + b"\r\n\r\nd\r\n"
        b"--XyZ\r\nContent-Disposition: form-data\r\nContent-Type: text/plain"
        + many
        + b"\r\n\r\nf\r\n--XyZ--\r\n"
    )
    found = fields("multipart/form-data; boundary=XyZ", body)
    assert found == {"id\ufffd": "x", "c": "café", "d": "d"}


def test_a_parameter_sent_whole_and_in_numbered_pieces_makes_its_header_unreadable() -> None:
    """``name*=a; name*0=b``: the email package's parameter decoding raises TypeError on it
    (sorting None with ints). The header's parameters are not read, as ones past their limits
    are not: no name (so no field), no filename, no charset, or no boundary for the form."""
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name*=a; name*0=b\r\n\r\nv\r\n"
        b'--XyZ\r\nContent-Disposition: form-data; name="f"; filename*1=a; filename*=b\r\n'
        b"Content-Type: text/plain; charset*0=utf-8; charset*=x\r\n\r\nw\r\n--XyZ--\r\n"
    )
    found = [
        (p.name, p.filename, p.charset) for p in parts("multipart/form-data; boundary=XyZ", body)
    ]
    assert found == [(None, None, None), (None, None, None)]
    assert list(parts("multipart/form-data; boundary*=XyZ; boundary*0=XyZ", body)) == []


def test_a_handler_asking_a_json_body_for_its_form_is_told_to_read_json() -> None:
    """``event.form()`` on a JSON body raises as ``json()`` does on a form, instead of one
    field named after the whole body; a form, or a body sent without a type, is read."""
    for content_type in ("application/json", "Application/JSON; charset=utf-8", "x/y+json"):
        event = Event(
            "e", "s", 0.0, "k", "", Priority.NORMAL, (("Content-Type", content_type),), b'{"a": 1}'
        )
        with pytest.raises(ValueError, match=r"is JSON .*use \.json\(\)"):
            event.form()
    form = Event("e", "s", 0.0, "k", "", Priority.NORMAL, (("Content-Type", URLENCODED),), b"a=1")
    untyped = Event("e", "s", 0.0, "k", "", Priority.NORMAL, (), b"a=1")
    assert form.form() == untyped.form() == {"a": "1"}
