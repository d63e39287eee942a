"""Form bodies: ``application/x-www-form-urlencoded``, and ``multipart/form-data`` (RFC 7578)
split into its parts by the boundary alone (``fields`` reads either).

A multipart body's parts are found with ``bytes.find``; only each part's header block goes
through the ``email`` parser, for a bounded count of lines (``_HEAD_LINES``). The standard
library's whole-message parser reads every line of every part: a 24 MB Mailgun post with an
attachment held the event loop for ~380 ms in it (measured), every other webhook's answer
waiting meanwhile, where finding the parts takes a scan of the bytes and an attachment's
content is never read line by line.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.message
import email.parser
import email.policy
import email.utils
import encodings
import quopri
from collections.abc import Collection, Iterator, Sequence
from encodings.aliases import aliases as _ALIASES
from urllib.parse import unquote

_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
# The most fields (urlencoded pairs, or multipart parts) the receiver reads of a form, to verify
# it or to find a value in it. Providers' forms carry tens (Twilio's about 30, Slack's 15,
# Mailgun's 20 and a part per attachment); a body of a few hundred thousand tiny parts held the
# event loop for seconds before its signature was even looked at.
MOST_FIELDS = 1_000


class TooManyFields(ValueError):
    """A form with more fields than the reader was willing to read."""

    def __init__(self, most: int) -> None:
        super().__init__(f"the form has more than {most:,} fields")


_CR = 0x0D
# A part's header block is a few lines; one longer than this is not read as headers (else a
# part of megabytes with no blank line would be parsed line by line after all).
_HEAD_BYTES = 16 * 1024
# The most header lines the email package parses of one body, its parts' blocks together. It
# reads them one at a time, ~2.4 µs each: a body of short "a:" lines, each part's block within
# _HEAD_BYTES, held the event loop ~0.8 s a MB (8.2 s for 16 MB, before a Mailgun signature was
# looked at). A provider's part has one to three. Past this the parts have no headers (so no
# name: they are no field), as one whose block runs past _HEAD_BYTES has, and their blocks are
# not even counted.
_HEAD_LINES = 4_096


# A part's Content-Disposition or Content-Type read for its parameters (name, filename,
# charset) only up to this many ";" and this length: the email package parses a parameter list
# in time that grows with its square (16,000 ";" took 234 ms, a thousand such parts minutes on
# the event loop, before any signature was checked). A provider's run to two or three.
_MOST_PARAMS = 32
_MOST_PARAMS_CHARS = 4096
# How much of one body's parameters the email package parses, its parts' Content-Disposition
# and Content-Type together, each header once: a header costs one for each ";", each eight "%"
# (an RFC 2231 value's escapes, undone one by one in Python) and each 256 characters, each of
# them 1-4 µs of parsing. A thousand parts, each within the limits above, held the event loop
# 0.2-0.9 s before a Mailgun signature was looked at (names sent as 32 RFC 2231 pieces, or as
# 1,350 escapes); a provider's part costs one to three. Past this a part's headers are not
# parsed for their parameters (no name: it is no field), as ones past the limits above are not.
_PARAM_PIECES = 4_096
# The charsets a part's text is decoded by, by any of their names: others (punycode's decoding
# takes quadratic time, idna and "undefined" raise, some are no text encoding at all) are read
# as UTF-8, as a part that names none is. Names are matched here, never looked up as sent: the
# codecs registry keeps every name it was asked for, a sender's random ones too.
_CHARSETS = (
    "utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "ascii", "latin-1",
    "iso8859-2", "iso8859-5", "iso8859-7", "iso8859-9", "iso8859-15", "cp1250", "cp1251",
    "cp1252", "cp1253", "cp1254", "cp1256", "koi8-r", "koi8-u", "shift_jis", "euc-jp",
    "iso2022_jp", "euc-kr", "gb2312", "gbk", "gb18030", "big5",
)  # fmt: skip


def _charset_names() -> frozenset[str]:
    # By name alone: looking each up would import its codec's module at every start.
    modules = {encodings.normalize_encoding(charset).lower() for charset in _CHARSETS}
    return frozenset(modules | {alias for alias, module in _ALIASES.items() if module in modules})


_CHARSET_NAMES = _charset_names()


def text_of(raw: bytes, charset: str | None) -> str:
    """``raw`` decoded by ``charset`` when it names one of ``_CHARSETS``, else as UTF-8; bytes
    it cannot decode become U+FFFD."""
    name = encodings.normalize_encoding(charset.strip().lower()) if charset else ""
    return raw.decode(name if name in _CHARSET_NAMES else "utf-8", "replace")


# A parameter as the email package's ``get_param`` hands it back: a string, or for an RFC 2231
# one (``name*=charset'language'text``) that tuple, its text's percent escapes undone as latin-1.
_Param = str | tuple[str | None, str | None, str]


def _param_text(value: _Param) -> str:
    """A parameter's text, as the email package's ``collapse_rfc2231_value`` makes it, but with
    an RFC 2231 value's charset matched by ``text_of``, never looked up: that function hands a
    sender's charset name to the codecs registry, and the ``encodings`` module keeps every
    name it is asked for, unknown ones too (a thousand parts named ``name*=<random>''x`` in
    each forged post grew a daemon by 148 MB in 120 posts, never given back)."""
    if isinstance(value, tuple):
        charset, _, text = value
        return text_of(bytes(text, "raw-unicode-escape"), charset)
    return email.utils.unquote(value)


def _get_param(headers: email.message.Message, param: str, header: str) -> _Param | None:
    """``header``'s parameter ``param`` as ``get_param`` reads it, None where there is none or
    the parameters cannot be read: one sent both whole and in numbered RFC 2231 pieces
    (``name*=a; name*0=b``) makes the email package sort None with ints, a TypeError (an
    unsigned post to a Mailgun source was answered 503)."""
    try:
        return headers.get_param(param, header=header)
    except TypeError:
        return None


class Part:
    """One part: its parsed header block, and where its content is in the body (copied out
    only when asked for: an attachment skipped costs nothing)."""

    __slots__ = ("_body", "_end", "_left", "_params", "_start", "headers")

    def __init__(
        self, headers: email.message.Message, body: bytes, start: int, end: int, left: list[int]
    ) -> None:
        self.headers = headers
        self._body = body
        self._start = start
        self._end = end
        self._left = left  # what is left of the body's _PARAM_PIECES, shared by its parts
        self._params: dict[str, Sequence[tuple[str, _Param]] | None] = {}

    @property
    def size(self) -> int:
        return self._end - self._start

    @property
    def content(self) -> bytes:
        """As sent: a Content-Transfer-Encoding, if any, not undone (``decoded``)."""
        return self._body[self._start : self._end]

    def _readable(self, *headers: str) -> bool:
        """Whether ``headers``' parameters are few and short enough to be parsed."""
        for header in headers:
            value = self.headers.get(header)
            if value is None:
                continue
            text = str(value)  # a Header object where the line held a byte past ASCII
            if len(text) > _MOST_PARAMS_CHARS or text.count(";") > _MOST_PARAMS:
                return False
        return True

    def _param(self, param: str, header: str) -> _Param | None:
        """``header``'s parameter ``param`` as ``_get_param`` reads it, the header parsed once
        for every parameter asked of it, and not at all (None) past what is left of the body's
        ``_PARAM_PIECES``."""
        if header not in self._params:
            value = self.headers.get(header)
            text = "" if value is None else str(value)
            cost = text.count(";") + text.count("%") // 8 + len(text) // 256
            params = None
            if value is not None and cost <= self._left[0]:
                self._left[0] -= cost
                with contextlib.suppress(TypeError):  # name*=a; name*0=b: see _get_param
                    params = self.headers.get_params(header=header)
            self._params[header] = params
        for key, found in self._params[header] or ():
            if key.lower() == param:
                return found
        return None

    @property
    def name(self) -> str | None:
        """The form field's name (``Content-Disposition: form-data; name=...``); None for a
        part whose parameters are past ``_MOST_PARAMS`` or the body's ``_PARAM_PIECES``, which
        is no provider's field."""
        if not self._readable("content-disposition"):
            return None
        name = self._param("name", "content-disposition")
        if isinstance(name, tuple):  # RFC 2231: name*=utf-8''...
            return _param_text(name)
        return name

    @property
    def filename(self) -> str | None:
        """Set on an uploaded file (an attachment), None on a plain field."""
        # As the email package's get_filename reads it (the Content-Type's name= where the
        # Content-Disposition has no filename=), but with no charset looked up (_param_text).
        if not self._readable("content-disposition", "content-type"):
            return None
        filename = self._param("filename", "content-disposition")
        if filename is None:
            filename = self._param("name", "content-type")
        return None if filename is None else _param_text(filename).strip()

    @property
    def charset(self) -> str | None:
        """The charset its Content-Type names, in lower case, if any (and its parameters can
        be read); None for one that is not ASCII, which names no charset."""
        if not self._readable("content-type"):
            return None
        charset = self._param("charset", "content-type")
        if isinstance(charset, tuple):  # charset*=...: its text as sent, decoded by nothing
            charset = charset[2]  # (a charset's name is ASCII, read alike in any charset)
        return charset.lower() if charset is not None and charset.isascii() else None

    def decoded(self) -> bytes:
        """The content with its transfer encoding undone (base64, quoted-printable), as the
        ``email`` package's ``get_payload(decode=True)`` would; as sent when there is none."""
        content = self.content
        encoding = str(self.headers.get("Content-Transfer-Encoding", "")).strip().lower()
        if encoding == "base64":
            try:
                return base64.b64decode(content)
            except binascii.Error:
                return content
        if encoding == "quoted-printable":
            return quopri.decodestring(content)
        return content


def parts(content_type: str, body: bytes, most: int | None = None) -> Iterator[Part]:
    """Each part of ``body``, by the boundary ``content_type`` names; nothing without one.
    With ``most``, a part past that many raises ``TooManyFields``.

    A delimiter is ``--boundary`` at the start of a line (after CRLF or a bare LF), followed on
    its line by nothing but spaces or tabs, or by ``--`` for the last; the line break before
    it is the delimiter's, not the part's. A body without a last delimiter ends its last part.
    """
    taken, lines_left, params_left = 0, _HEAD_LINES, [_PARAM_PIECES]
    if len(content_type) > _MOST_PARAMS_CHARS or content_type.count(";") > _MOST_PARAMS:
        return  # no provider's: its parameters are not parsed (see _MOST_PARAMS)
    holder = email.message.Message()
    holder["Content-Type"] = content_type
    value = _get_param(holder, "boundary", "content-type")
    boundary = "" if value is None else _param_text(value).rstrip()  # as get_boundary reads it
    if not boundary:
        return
    delimiter = b"--" + boundary.encode("utf-8", "replace")
    at = 0 if _delimits(body, 0, delimiter) else _next(body, delimiter, 0)
    while at >= 0:
        after = at + len(delimiter)
        if body.startswith(b"--", after):  # the close delimiter
            return
        line_end = body.find(b"\n", after)
        if line_end < 0:
            return
        following = _next(body, delimiter, line_end)
        start, end = line_end + 1, len(body) if following < 0 else following - 1
        if end > start and body[end - 1] == _CR:  # the line break before it is its own
            end -= 1
        if most is not None and taken == most:
            raise TooManyFields(most)
        taken += 1
        part, lines = _part(body, start, end, lines_left, params_left)
        lines_left -= lines
        yield part
        at = following


def _next(body: bytes, delimiter: bytes, start: int) -> int:
    """Where the next delimiter after ``start`` begins (past its line feed), or -1."""
    marker = b"\n" + delimiter
    found = body.find(marker, start)
    while found >= 0 and not _delimits(body, found + 1, delimiter):
        found = body.find(marker, found + 1)
    return found + 1 if found >= 0 else -1


def _delimits(body: bytes, at: int, delimiter: bytes) -> bool:
    """Whether a delimiter line begins at ``at``: the delimiter, then ``--``, or only spaces
    and tabs up to the line's end (a line that goes on is content that starts alike)."""
    if not body.startswith(delimiter, at):
        return False
    rest = at + len(delimiter)
    if body.startswith(b"--", rest):
        return True
    line_end = body.find(b"\n", rest)
    tail = body[rest:] if line_end < 0 else body[rest:line_end]
    return not tail.rstrip(b"\r").strip(b" \t")


def _part(
    body: bytes, start: int, end: int, lines_left: int, params_left: list[int]
) -> tuple[Part, int]:
    """A part's header block and its content, split at the first blank line (a part with no
    headers starts with one; a short one with no blank line is all headers), and how many of
    the ``lines_left`` header lines it spent: its block's, or all of them for a block of more,
    whose part then has no headers. The search goes no further than a header block can: the
    content is not scanned."""
    for blank in (b"\r\n", b"\n"):
        if body.startswith(blank, start, end):
            return Part(email.message.Message(), body, start + len(blank), end, params_left), 0
    head_end = min(end, start + _HEAD_BYTES)
    crlf = body.find(b"\r\n\r\n", start, head_end)
    lf = body.find(b"\n\n", start, head_end if crlf < 0 else crlf + 1)  # a bare-LF one first
    if lf >= 0:
        header_end, content_start = lf, lf + 2
    elif crlf >= 0:
        header_end, content_start = crlf, crlf + 4
    elif end - start <= _HEAD_BYTES:
        header_end = content_start = end  # all headers
    else:  # no blank line where headers end: nothing to read it by (no name, no field)
        return Part(email.message.Message(), body, start, end, params_left), 0
    if lines_left > 0:  # lines as the email package breaks them: at CRLF, a bare CR or LF
        lines = 1 + sum(body.count(eol, start, header_end) for eol in (b"\n", b"\r"))
        lines -= body.count(b"\r\n", start, header_end)
        if lines <= lines_left:
            head = _HEADERS.parsebytes(body[start:header_end])
            return Part(head, body, content_start, end, params_left), lines
    return Part(email.message.Message(), body, content_start, end, params_left), lines_left


MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"


def media_type(content_type: str) -> str:
    """A Content-Type's media type alone, in lower case: ``multipart/form-data`` of
    ``Multipart/Form-Data; boundary=x``."""
    return content_type.partition(";")[0].strip().lower()


def is_json(content_type: str) -> bool:
    """Whether a Content-Type names JSON: ``application/json`` or a ``+json`` type."""
    kind = media_type(content_type)
    return kind == "application/json" or kind.endswith("+json")


def pairs(text: str, most: int | None = None, errors: str = "replace") -> list[tuple[str, str]]:
    """An urlencoded form's name and value pairs, blank values kept, as ``urllib.parse``'s
    ``parse_qsl(text, keep_blank_values=True, errors=errors)`` reads them; with ``most``, a
    form of more pairs raises ``TooManyFields`` before any is decoded."""
    if most is not None and text.count("&") >= most:
        raise TooManyFields(most)
    found: list[tuple[str, str]] = []
    for field in text.split("&"):
        if field:
            name, _, value = field.partition("=")
            found.append((_unquote(name, errors), _unquote(value, errors)))
    return found


def pairs_named(
    text: str, names: Collection[str], most: int | None = None, longest: int | None = None
) -> list[tuple[str, str]]:
    """The pairs of an urlencoded form whose name is one of ``names``, in order, as ``pairs``
    reads them, with no other value decoded: a Mailgun source looks for four short fields, and
    undoing the escapes of every value first held the event loop ~1 s for 25 MiB of ``%41=``
    before the signature was checked. A pair whose name as sent is too long to be any of
    ``names`` (three characters, ``%XX``, for each of a name's bytes) is passed over without
    its name decoded, and with ``longest``, one whose value as sent is longer. With ``most``,
    a form of more pairs raises ``TooManyFields``, as in ``pairs``."""
    if most is not None and text.count("&") >= most:
        raise TooManyFields(most)
    widest = 3 * max((len(name.encode()) for name in names), default=0)
    found: list[tuple[str, str]] = []
    for field in text.split("&"):
        sent, _, value = field.partition("=")
        if not field or len(sent) > widest or (longest is not None and len(value) > longest):
            continue
        name = _unquote(sent, "replace")
        if name in names:
            found.append((name, _unquote(value, "replace")))
    return found


_HEX_DIGITS = b"0123456789ABCDEFabcdef"
# What each byte is to a percent escape: "%", "=" (which a2b_qp reads as its own escape), a
# hex digit ("h") or anything else ("x").
_KINDS = bytes(c if c in b"%=" else b"xh"[c in _HEX_DIGITS] for c in range(256))
# Where "E" marks a "%" that starts an escape: what turns it into "=" (0x25 ^ 0x3D), else 0.
_TO_EQUALS = bytes(ord("%") ^ ord("=") if c == ord("E") else 0 for c in range(256))


def _unquote(text: str, errors: str) -> str:
    """``text`` with "+" read as a space and its percent escapes undone as ``urllib.parse``'s
    ``unquote_plus(text, errors=errors)`` does, in a few passes over its bytes in C: that takes
    Python steps for each "%", ~100 ms for 1 MB of "%41" and 350 ms of "%" alone, before a
    Twilio or Mailgun signature is checked. Here binascii.a2b_qp undoes them as
    quoted-printable's "=XX": each "%" that two hex digits follow is made "=" (one that starts
    no escape is kept, as unquote keeps it) once each "=" the text holds is made "=3D"."""
    text = text.replace("+", " ")
    if "%" not in text:
        return text
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no text decoded from a body holds one
        return unquote(text, errors=errors)
    # The escapes' "%" found among the bytes' kinds ("=" made three long there as it is in the
    # bytes, so both stay aligned), and turned "=" in the bytes by an exclusive or of the two.
    kinds = raw.translate(_KINDS).replace(b"=", b"=xx").replace(b"%hh", b"Ehh")
    raw = raw.replace(b"=", b"=3D")
    flips = int.from_bytes(kinds.translate(_TO_EQUALS), "little")
    raw = (int.from_bytes(raw, "little") ^ flips).to_bytes(len(raw), "little")
    return binascii.a2b_qp(raw).decode("utf-8", errors)


def fields(content_type: str, body: bytes, most: int | None = None) -> dict[str, str]:
    """A form's fields by name (the last of a name wins): a multipart form's named parts that
    are no uploaded file, decoded by their charset (UTF-8 when they name none, as browsers and
    Mailgun send them), else the body read as ``application/x-www-form-urlencoded``. With
    ``most``, a form of more fields (or parts) raises ``TooManyFields``."""
    if media_type(content_type) != MULTIPART:
        return dict(pairs(body.decode("utf-8", "replace"), most))
    found: dict[str, str] = {}
    for part in parts(content_type, body, most):
        name = part.name
        if name is None or part.filename is not None:
            continue  # unnamed parts and uploaded files are not fields
        found[name] = text_of(part.decoded(), part.charset)
    return found
