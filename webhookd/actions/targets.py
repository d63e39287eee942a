"""How an action's target is written in the config, checked as ``check`` and a reload read it:
its URL, TLS (a private CA, a client certificate), proxy, extra headers and Standard Webhooks
signing secrets. ``forward`` and ``openai``'s ``then`` read theirs with these; what is sent
with them is ``webhookd.actions.delivery``'s."""

from __future__ import annotations

import base64
import ipaddress
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from yarl import URL

from webhookd.config.checks import HEADER_NAME, header_value
from webhookd.config.reading import (
    PEM_FILE_BYTES,
    Unfit,
    read_small,
    resolve_secret,
    text_or_secret,
)
from webhookd.config.table import Table
from webhookd.errors import ConfigError
from webhookd.schemes.standard import check_whsec
from webhookd.secret import Secret


def check_url(value: Any, key: str, *, secret: bool = False) -> str:
    """An http(s) URL from config, or ``ConfigError`` naming ``key``. The error quotes no more
    than the URL's scheme and host, none of it for a ``secret`` (read from ``env:``/``file:``):
    a Slack-style URL holds its token in the path, and a reload refused for a mistyped scheme
    wrote it whole to the log and /stats (the masker learns a config's secrets only once it is
    taken)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, "is required (the URL to deliver to)")
    try:
        parts = urlsplit(value)
    except ValueError:  # "http://[::1", say
        parts = None
    # A host, not only a netloc: "http://:80/x" and "http://u:pw@/x" have none to deliver to.
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        if secret:
            shown = "its value (a secret, not shown)"
        elif parts is not None and parts.scheme:
            rest = "/… (the rest not shown)" if value.rstrip("/") != f"{parts.scheme}://" else ""
            shown = f"'{parts.scheme}://{parts.hostname or ''}{rest}'"
        else:
            shown = "its value (not shown: it may hold a token)"
        raise ConfigError(key, f"{shown} is not an http(s) URL")
    _check_host(parts.hostname, key)
    _check_port(parts, value, key)
    return value


# What no host name or address holds: white space, control characters, and the characters
# RFC 3986 leaves out of a host ("exa mple.com" fails every attempt with a name lookup).
_NOT_IN_HOST = re.compile(r'[\s\x00-\x1f\x7f<>"{}|\\^`/?#@]')


def _check_host(host: str, key: str) -> None:
    if _NOT_IN_HOST.search(host):
        raise ConfigError(key, "has a host name with a space or a character no host name has")


def _check_port(parts: SplitResult, value: str, key: str) -> int | None:
    """The URL's port (None: the scheme's own), or ``ConfigError`` naming ``key``."""
    try:
        port = parts.port
    except ValueError:  # ":99999", ":http": aiohttp would refuse it at every attempt
        port = 0
    if port == 0:
        # Not quoted: with a / in a password, what stands here is part of the password.
        hint = " (in a password, write / as %2F)" if "@" in value else ""
        raise ConfigError(key, f"has a port that is not a number from 1 to 65535{hint}")
    return port


def read_url(t: Table, name: str) -> str:
    """The required http(s) URL at key ``name``; a ``Secret`` one (``[alerts] url``) revealed,
    an ``env:``/``file:`` one read (a URL with a token in it is a credential)."""
    value = t.raw(name, None)
    secret = isinstance(value, Secret) or (
        isinstance(value, str) and value.startswith(("env:", "file:"))
    )
    if isinstance(value, Secret):
        value = value.reveal()
    elif value is not None:
        # Through the config's own reader: a number or an array is named as the wrong type
        # ("must be a string, not an integer"), not taken for a URL left out.
        value = t.string(name)
        no_template(value, t.path(name))
        value = text_or_secret(value, t.path(name))
    return check_url(value, t.path(name), secret=secret)


def looked_up_hosts(t: Table, names: Sequence[str]) -> list[tuple[str, str]]:
    """``(key, host name)`` of each URL option of ``names`` set in ``t`` that the daemon looks
    up itself: none through a ``proxy`` (the proxy looks the name up), no IP address. For
    ``check``, which warns of a name that does not resolve: a mistyped host retried for the
    whole retry policy (7.5 to 15 h by default) before its jobs go dead."""
    if t.has("proxy"):
        return []
    found = []
    for name in names:
        if not t.has(name):
            continue
        host = urlsplit(read_url(t, name)).hostname or ""
        try:
            ipaddress.ip_address(host)
        except ValueError:
            found.append((t.path(name), host))
    return found


def no_template(written: str, key: str) -> None:
    """A ``{{ }}`` where no template is read would be sent as written: refuse it by name."""
    if "{{" in written:
        raise ConfigError(
            key,
            "is sent as written: {{ }} lookups are read only in a command's argv and an openai"
            " action's prompt and system",
        )


_TLS_OPTIONS = ("ca_file", "cert_file", "key_file")


class _EncryptedKey(Exception):
    """A private key that asks for a password (``ssl`` would read one from the terminal)."""


def _no_password() -> bytes:
    raise _EncryptedKey


def read_tls(t: Table, url: str) -> ssl.SSLContext | None:
    """``tls = { ca_file, cert_file, key_file }`` for an https ``url``: the CA certificates to
    trust in place of the system's (a private CA), and a client certificate with its key to
    present (mutual TLS; ``key_file`` left out, the key is in ``cert_file``). PEM files, read at
    every load: a reload takes renewed ones. None without a ``tls`` table."""
    if not t.has("tls"):
        return None
    tls = t.table("tls")
    tls.only(_TLS_OPTIONS, "in tls")
    if urlsplit(url).scheme != "https":
        raise ConfigError(tls.key, "is for an https url: this url is plain http")
    ca_file = tls.string("ca_file", None)
    cert_file = tls.string("cert_file", None)
    key_file = tls.string("key_file", None)
    if key_file is not None and cert_file is None:
        raise ConfigError(tls.path("key_file"), "needs cert_file, the certificate it goes with")
    if ca_file is None and cert_file is None:
        raise ConfigError(tls.key, "names no file: give ca_file, cert_file, or both")
    if ca_file is not None:
        _pem(ca_file, tls.path("ca_file"), b"-----BEGIN CERTIFICATE-----", "CA certificate")
    try:
        context = ssl.create_default_context(cafile=ca_file)  # a cafile: those CAs only
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(tls.path("ca_file"), f"cannot be used: {_reason(exc)}") from None
    if cert_file is None:
        return context
    cert_key = tls.path("cert_file")
    key_key = tls.path("key_file") if key_file is not None else cert_key
    _pem(cert_file, cert_key, b"-----BEGIN CERTIFICATE-----", "certificate")
    _pem(key_file or cert_file, key_key, b"PRIVATE KEY-----", "private key")
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except _EncryptedKey:
        raise ConfigError(
            key_key,
            "holds an encrypted private key: give it unencrypted, readable by the daemon's user"
            " only",
        ) from None
    except (OSError, ValueError) as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            mismatch = "is not the private key of cert_file's certificate"
            raise ConfigError(key_key, mismatch) from None
        raise ConfigError(cert_key, f"cannot be used: {_reason(exc)}") from None
    return context


@dataclass(frozen=True, slots=True)
class Proxy:
    """``proxy = "http://[user:password@]host:port"``: the HTTP proxy an action's requests go out
    through (a tunnel by CONNECT for an https target, so its TLS is still end to end)."""

    url: str  # without the user and password: the one an error text may name
    authorization: str | None = field(default=None, repr=False)  # Proxy-Authorization, Basic
    written: str = field(default="", repr=False)  # as configured, credentials in it (httpx's)


def read_proxy(t: Table) -> Proxy | None:
    """The ``proxy`` option, or None; ``env:``/``file:`` for one whose URL has a password in
    it. Never quoted in an error: a URL written out may hold one."""
    if not t.has("proxy"):
        return None
    key = t.path("proxy")
    written = t.string("proxy")
    no_template(written, key)
    value = text_or_secret(written, key)
    try:
        parts: SplitResult | None = urlsplit(value)
    except ValueError:  # "http://[::1"
        parts = None
    like = "like http://proxy.internal:3128"
    if parts is not None and parts.scheme == "https":
        raise ConfigError(
            key,
            f"an https:// proxy is not supported: give its http:// address, {like} (an https"
            " target's traffic is tunnelled through it, still TLS from end to end)",
        )
    if parts is None or parts.scheme != "http" or not parts.hostname:
        raise ConfigError(key, f"must be an http:// URL of a proxy, {like}")
    _check_host(parts.hostname, key)
    port = _check_port(parts, value, key)
    if port is None:  # proxies have no one port (3128, 8080, 1080...): say which
        raise ConfigError(key, f"names no port: give the proxy's, {like}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, f"names a host and a port only (and a user and password), {like}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    url = f"http://{host}:{port}"
    authorization = None
    if parts.username is not None or parts.password is not None:
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        if ":" in user:
            said = "has a user name with a : in it, which Basic credentials cannot carry"
            raise ConfigError(key, said)
        pair = f"{user}:{password}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    return Proxy(url, authorization, value)


def _pem(path: str, key: str, marker: bytes, what: str) -> None:
    """A readable file with ``marker`` in it, or ``ConfigError`` naming ``key`` and why not."""
    try:
        data = read_small(path, PEM_FILE_BYTES)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ConfigError(key, f"cannot be read: {_reason(exc)}") from None
    except Unfit as exc:  # a pipe would hold the load (and a reload) for good
        raise ConfigError(key, f"cannot be read: {exc}") from None
    if marker not in data:
        raise ConfigError(key, f"holds no PEM {what}")


def _reason(exc: OSError | ValueError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return "not a file path" if isinstance(exc, ValueError) else str(exc)


_SIGNING_HEADERS = frozenset({"webhook-signature", "webhook-timestamp"})


def read_headers(t: Table, name: str = "headers", *, url: str) -> dict[str, str]:
    """Extra request headers at key ``name`` (default: none) for requests to ``url``; a value
    written ``env:NAME`` or ``file:PATH`` is that secret (``Authorization = "env:TARGET_TOKEN"``).
    """
    value = t.raw(name, {})
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(t.path(name), "must be a table of strings")
    headers = {}
    seen: dict[str, str] = {}
    for k, v in value.items():
        key = f"{t.path(name)}.{k}"
        if not HEADER_NAME.fullmatch(k):
            raise ConfigError(key, "is not a header name (letters, digits and !#$%&'*+-.^_`|~)")
        if k.lower() in seen:  # names are case-insensitive: one of the two would be dropped
            raise ConfigError(key, f"is {seen[k.lower()]} again, in another case")
        seen[k.lower()] = k
        if k.lower() in _SIGNING_HEADERS:
            # With a secret, the signing would replace it; without one, a forged-looking header.
            raise ConfigError(key, "is the signing's to set: give secret or secrets instead")
        if k.lower() == "authorization" and _has_credentials(url):
            # The client refuses to send both: every attempt failed, until the job went dead.
            raise ConfigError(
                key,
                "cannot be sent with the user and password in the URL, which already go as"
                " Basic credentials: give one or the other",
            )
        no_template(v, key)
        headers[k] = header_value(text_or_secret(v, key), key)
    return headers


# What a service drops repeats by: each delivery sets both to the event's id.
_REPEAT_KEYS = frozenset({"idempotency-key", "webhook-id"})


def fixed_repeat_keys(headers: object, key: str) -> list[str]:
    """``check``'s and the start's warning for each of ``headers`` (an action's ``headers``
    option, at ``key``) that gives a key a service drops repeats by one value for every
    event: such a service takes every delivery after the first for a repeat, and drops it."""
    if not isinstance(headers, Mapping):
        return []
    said = []
    for name in headers:
        if isinstance(name, str) and name.lower() in _REPEAT_KEYS:
            said.append(
                f"{key}.{name}: one value for every event, so a service that drops repeats by"
                f" it keeps only the first delivery; without it each delivery's {name} is its"
                " event's id (where two actions post to one service, key the dedup on the path too)"
            )
    return said


def _has_credentials(url: str) -> bool:
    """Whether ``url`` has a user or a password, as the client reads it (``http://@host`` has
    neither)."""
    parts = URL(url)
    return parts.raw_user is not None or parts.raw_password is not None


def read_signing_secrets(t: Table) -> tuple[Secret, ...]:
    """``secret`` or ``secrets`` (rotation: each one signs): Standard Webhooks ``whsec_`` keys.

    Each must be ``whsec_`` and then its key in base64, or ``ConfigError`` names it. An ``env:``
    one is looked up here, so its value is checked like an inline one: the options are read by
    ``validate`` (``check``, ``serve``, ``send``) and again by ``create`` as ``serve`` starts,
    never per delivery, so a bad value stops the start instead of failing every attempt.
    """
    if t.has("secret") and t.has("secrets"):
        raise ConfigError(t.path("secrets"), "give either secret or secrets, not both")
    if t.has("secret"):
        found: tuple[tuple[str, Secret], ...] = (
            (t.path("secret"), resolve_secret(t.raw("secret"), t.path("secret"))),
        )
    else:
        items = t.raw("secrets", [])
        if not isinstance(items, list):
            raise ConfigError(t.path("secrets"), "must be an array")
        found = tuple(
            (f"{t.path('secrets')}[{i}]", resolve_secret(v, f"{t.path('secrets')}[{i}]"))
            for i, v in enumerate(items)
        )
    for where, secret in found:
        value = secret.reveal()
        if not value.startswith("whsec_"):
            raise ConfigError(where, "must be a Standard Webhooks secret (whsec_…)")
        check_whsec(value, where)
    return tuple(secret for _, secret in found)
