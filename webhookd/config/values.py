"""The values a key holds beyond numbers and strings: listen addresses, extractors, ``when``.

Each with the parser its ``setting()`` names: ``parse_listen`` (``HOST:PORT``),
``parse_extractor`` (``header:NAME``, ``json:a.b``, ``form:FIELD``, ``body``),
``parse_networks`` (addresses and networks) and ``parse_when`` (an action's conditions).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from webhookd.config.checks import _type_name
from webhookd.config.table import Table
from webhookd.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Extractor:
    """Where a value is in a request: ``header:NAME``, ``json:a.b``, ``form:FIELD`` or ``body``."""

    kind: Literal["header", "json", "form", "body"]
    arg: str = ""

    @property
    def spec(self) -> str:
        return self.kind if self.kind == "body" else f"{self.kind}:{self.arg}"


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def overlaps(self, other: Listen) -> bool:
        """Whether binding both would fail: the same port, not 0 (each 0 gets a free port of its
        own), on addresses that meet. As the kernel sees it (asyncio binds IPv6 only on IPv6
        sockets): a wildcard (``0.0.0.0``, ``::``) meets every address of its family, so
        ``0.0.0.0:8080`` and ``127.0.0.1:8080`` conflict while ``0.0.0.0`` and ``::`` do not.
        ``localhost`` is ``127.0.0.1`` and ``::1``; any other name meets itself and the
        wildcards of both families, its address being unknown until it is resolved."""
        if self.port == 0 or self.port != other.port:
            return False
        return any(_meet(a, b) for a in _addresses(self.host) for b in _addresses(other.host))


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address | str  # str: a name, lowercased


def _addresses(host: str) -> tuple[_Address, ...]:
    if host.lower() == "localhost":
        return (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        return (host.lower(),)


def _meet(a: _Address, b: _Address) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        ip = b if isinstance(a, str) else a
        return a == b or (not isinstance(ip, str) and ip.is_unspecified)
    return a.version == b.version and (a == b or a.is_unspecified or b.is_unspecified)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: Any, key: str) -> tuple[Network, ...]:
    """An array of IP addresses or networks (``"10.0.0.0/8"``, ``"::1"``)."""
    shape = 'must be an array of IP addresses or networks, like ["127.0.0.1", "10.0.0.0/8"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, shape)
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(key, f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def parse_listen(value: Any, key: str) -> Listen:
    if not isinstance(value, str):
        raise ConfigError(key, 'must be a string like "127.0.0.1:8080"')
    host, sep, port_text = value.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()):  # "²" is a digit too
        raise ConfigError(key, f"{value!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} is out of range")
    if not host:
        # Every interface is a choice to write out: a bare ":8080" read as one took webhooks
        # from the whole network where loopback was meant.
        raise ConfigError(
            key,
            f"{value!r} names no host: write 127.0.0.1:{port} (0.0.0.0:{port}: every interface)",
        )
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(key, f"{value!r} is not HOST:PORT (an IPv6 host is written [::1]:PORT)")
    return Listen(host.strip("[]"), port)


def parse_extractor(value: Any, key: str) -> Extractor:
    if not isinstance(value, str):
        raise ConfigError(key, 'must be "header:NAME", "json:a.b", "form:FIELD" or "body"')
    if value == "body":
        return Extractor("body")
    kind, sep, arg = value.partition(":")
    if not sep or not arg or kind not in ("header", "json", "form"):
        raise ConfigError(
            key, f'{value!r} must be "header:NAME", "json:a.b", "form:FIELD" or "body"'
        )
    if kind == "json" and "" in arg.split("."):  # a value no request could ever have there
        raise ConfigError(key, f"{value!r} has an empty step in its path (json:a.b)")
    return Extractor(kind, arg)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Condition:
    """One key of an action's ``when``: where the value is, and the values it may have."""

    extractor: Extractor
    accepts: tuple[str, ...]  # shell-style globs (``*``, ``?``, ``[...]``), case-sensitive

    def allows(self, value: str | None) -> bool:
        """Whether ``value`` is one of the accepted ones; a missing value (``None``) never is."""
        return value is not None and any(fnmatch.fnmatchcase(value, p) for p in self.accepts)


def parse_when(value: Any, key: str) -> tuple[Condition, ...]:
    """An action's ``when``: extractor keys, each with a non-empty array of accepted strings."""
    t = Table(value, key)
    if not t.data:
        raise ConfigError(key, "needs at least one key (leave when out to run on every event)")
    conditions = []
    for name in list(t.data):
        ckey = t.path(name)
        try:
            spec = parse_extractor(name, ckey)
        except ConfigError:
            if name.startswith("json:") and name != "json:":  # a path with an empty step
                raise
            spec = Extractor("body")
        if spec.kind == "body":  # a body hash: no one can write the value it would have to be
            raise ConfigError(ckey, 'must be "header:NAME", "json:a.b" or "form:FIELD"')
        accepts = t.raw(name)
        if not isinstance(accepts, list) or not accepts:
            raise ConfigError(ckey, "must be a non-empty array of strings")
        for i, item in enumerate(accepts):
            if not isinstance(item, str):
                raise ConfigError(f"{ckey}[{i}]", f"must be a string, not {_type_name(item)}")
        conditions.append(Condition(spec, tuple(accepts)))
    t.finish()
    return tuple(conditions)


def _admin_listen(value: Any, key: str) -> Listen | None:
    return None if value == "" else parse_listen(value, key)  # "": no admin listener
