"""What the receiver reads from a request (the client's address, the payload, the values a
source extracts) and how it refuses what it cannot take or store."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from typing import Any

from webhookd import forms
from webhookd.config.sections import (
    ActionConfig,
)
from webhookd.config.values import Extractor, Network
from webhookd.http1 import Request
from webhookd.json_errors import json_error
from webhookd.models import (
    kept_digest,
    kept_long,
    sha256_key,
)


class _Payload:
    """Lazily parsed views of a body, shared by every extractor of one request."""

    __slots__ = ("_form", "_json", "body", "headers")

    def __init__(self, body: bytes, headers: Mapping[str, str]) -> None:
        self.body = body
        self.headers = headers  # read for the form's kind only when a field is asked for
        self._json: Any = _UNSET
        self._form: dict[str, str] | None = None

    def json(self) -> Any:
        if self._json is _UNSET:
            try:
                self._json = json.loads(self.body)
            except (ValueError, UnicodeDecodeError, RecursionError):
                self._json = None
        return self._json

    def form(self) -> dict[str, str]:
        if self._form is None:
            content_type = self.headers.get("Content-Type", "")
            if forms.is_json(content_type):
                # No form (as Event.form and templates read it): split on "&", a JSON text
                # holding "&id=7&" would have fields.
                self._form = {}
                return self._form
            try:
                self._form = forms.fields(content_type, self.body, forms.MOST_FIELDS)
            except forms.TooManyFields as exc:
                raise _Refused(400, str(exc)) from None
        return self._form


_UNSET: Any = object()


def client_of(request: Request, trusted: Sequence[Network]) -> str | None:
    """Who sent ``request``: its peer, or when the peer is a trusted proxy, the address its
    ``X-Forwarded-For`` names last that is not one too (each proxy appends the address it got
    the request from; what is left of that was written by the client, and may be anything)."""
    peer = request.remote
    if not trusted or peer is None or not _within(peer, trusted):
        return peer
    hops = ",".join(request.headers.getall("X-Forwarded-For", ())).split(",")
    for hop in reversed([_without_port(h.strip()) for h in hops if h.strip()]):
        if not _within(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:  # not an address: what a client wrote, told as such
                return f"{peer} (forwarded for {hop[:64]!r})"
    return peer


def _without_port(hop: str) -> str:
    """An ``X-Forwarded-For`` entry's address without the port some proxies append (Azure's
    Application Gateway: ``203.0.113.7:51234``, ``[2001:db8::7]:443``); a bare IPv6 address,
    colons and all, as it is."""
    if hop.startswith("["):
        end = hop.find("]")
        if end > 0 and (hop[end + 1 :] == "" or hop[end + 1 :].lstrip(":").isdigit()):
            return hop[1:end]
        return hop
    host, colon, port = hop.partition(":")
    return host if colon and port.isdigit() and ":" not in port else hop


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
    return any(ip in network for network in networks)


def extract(spec: Extractor, headers: Any, payload: _Payload, *, typed: bool = False) -> str | None:
    """The value ``spec`` points at in a request, as a string, or ``None`` if absent.

    A JSON ``true`` or ``1`` reads as ``"true"`` or ``"1"``, as users write them in tenant,
    priority and ordering rules. With ``typed`` (dedup keys) a JSON non-string reads as ``=``
    and its JSON text (``=true``, ``=1``) and a string that starts with ``=`` as ``=`` and its
    JSON text (``="=x"``), so ``true`` and ``"true"`` are different deliveries.
    """
    if spec.kind == "header":
        value = headers.get(spec.arg)
        return value if value else None
    if spec.kind == "form":
        return payload.form().get(spec.arg) or None
    if spec.kind == "body":
        return sha256_key(payload.body)
    node = payload.json()
    for part in spec.arg.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    # An empty string is no value, as an empty header or form field is: a dedup key of ""
    # would make every later webhook with it a duplicate of the first.
    if node is None or node == "" or isinstance(node, dict | list):
        return None
    if typed:
        if isinstance(node, str) and not node.startswith("="):
            return node
        return "=" + json.dumps(node)
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def _kept(spec: Extractor, value: str | None, masked: frozenset[str]) -> str | None:
    """What the journal keeps of a value ``spec`` read (a dedup key, a tenant, an order key):
    one read from a credential header (``masked``: Authorization, the token scheme's header)
    is kept as its digest, as the header itself is stored masked. Equal values still match."""
    if value is not None and spec.kind == "header" and spec.arg.lower() in masked:
        return kept_digest(value)
    return value


def sift(
    actions: tuple[ActionConfig, ...], headers: Any, payload: _Payload
) -> tuple[tuple[ActionConfig, ...], tuple[str, ...]]:
    """The actions whose ``when`` the request matches, and the names of those it does not.

    Every condition must allow its extracted value (a missing one allows nothing); the values
    are read as tenant and ordering rules read them (JSON ``true`` is ``"true"``).
    """
    wanted: list[ActionConfig] = []
    filtered: list[str] = []
    for a in actions:
        if all(c.allows(extract(c.extractor, headers, payload)) for c in a.when):
            wanted.append(a)
        else:
            filtered.append(a.name)
    return tuple(wanted), tuple(filtered)


class _Refused(Exception):
    """A request answered with an error before anything was stored."""

    def __init__(
        self,
        status: int,
        message: str,
        retry_after_s: float | None = None,
        *,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.response = json_error(status, message, retry_after_s)
        # Close the connection right after the answer rather than wait for the rest of a
        # body that is not coming (aiohttp would otherwise linger reading it for 10 s).
        self.close = close


def _too_large(most_bytes: int) -> _Refused:
    return _Refused(413, f"body larger than {most_bytes} bytes")


def _storable(value: str | None, role: str, spec: Extractor | None = None) -> str | None:
    """``value`` as the journal can store and index it: a lone surrogate (``"\\udcff"`` in
    JSON, a raw non-UTF-8 byte in a header) cannot be encoded, and a NUL (``"\\u0000"`` in
    JSON) is no PostgreSQL text: either is refused with a 400 naming the field
    (on PostgreSQL a NUL failed the whole group commit, 503 for every webhook in it). One over
    ``MOST_KEY_CHARS`` is kept as its digest."""
    if value is not None and (not value.isascii() or "\x00" in value):
        field = f"{role} ({spec.spec})" if spec is not None else role
        if "\x00" in value:
            raise _Refused(400, f"{field} holds a NUL character")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise _Refused(400, f"{field} is not valid UTF-8 text") from None
    return None if value is None else kept_long(value)
