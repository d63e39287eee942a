"""The generic HMAC scheme for providers without their own: a configured header, algorithm,
encoding and prefix, over a signed-string template of ``{timestamp}`` and ``{body}``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

from webhookd.errors import ConfigError, VerificationError
from webhookd.schemes.base import (
    Options,
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    b64,
    check_window,
    content_type,
    digest,
    header,
    match,
    parse_timestamp,
    prefixed_value,
    unb64,
    unhex,
    utf8,
)

_PLACEHOLDER = re.compile(r"(\{timestamp\}|\{body\})")


def _render(template: str, body: bytes, ts: str | None) -> bytes:
    """The signed string; only ``{timestamp}`` and ``{body}`` are special."""
    pieces = _PLACEHOLDER.split(template)
    if ts is None and "{timestamp}" in pieces:
        raise VerificationError("missing timestamp")
    return b"".join(
        body if p == "{body}" else utf8((ts or "") if p == "{timestamp}" else p) for p in pieces
    )


def _check_template(table: Options, signed: str | None, timestamp_header: str | None) -> None:
    """The template must sign the body, and the timestamp whenever one is read.

    A template without ``{body}`` lets any body through under a valid signature; a timestamp
    read from a header but left out of the template can be changed at will, and then its
    tolerance check guards nothing.
    """
    if timestamp_header == "":  # read as no header at all: every webhook "missing timestamp"
        raise ConfigError(table.path("timestamp_header"), "must name a header")
    if timestamp_header is None and table.has("tolerance_s"):
        raise ConfigError(
            table.path("tolerance_s"), "needs timestamp_header: without one no time is checked"
        )
    template = signed or "{body}"
    if "{body}" not in template:
        raise ConfigError(table.path("signed"), "must contain {body}, or the body is not signed")
    if timestamp_header is not None and "{timestamp}" not in template:
        raise ConfigError(
            table.path("signed" if signed is not None else "timestamp_header"),
            "the timestamp is not signed: add {timestamp} to signed"
            ' (e.g. "{timestamp}.{body}"), or its tolerance protects nothing',
        )
    if timestamp_header is None and "{timestamp}" in template:
        raise ConfigError(table.path("timestamp_header"), "is required when signed has {timestamp}")


class Hmac(Scheme):
    name = "hmac"
    option_keys = frozenset(
        {"header", "algorithm", "encoding", "prefix", "timestamp_header", "signed", "tolerance_s"}
    )
    legacy_sha1 = False
    untimed_always = False
    dedup_headers = ()
    dedup_json = None
    untimed_unless = "timestamp_header"
    required_keys: ClassVar[Mapping[str, str]] = {"header": "X-Signature"}

    def check_config(self, cfg: VerifyConfig, table: Options) -> None:
        super().check_config(cfg, table)
        if not cfg.header:
            raise ConfigError(table.path("header"), f"is required for scheme {self.name!r}")
        _check_template(table, cfg.signed, cfg.timestamp_header)

    def untimed(self, cfg: VerifyConfig) -> bool:
        return cfg.timestamp_header is None

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        sig = prefixed_value(cfg, headers)
        received = unhex(sig) if cfg.encoding == "hex" else unb64(sig)
        ts: int | None = None
        t_text = header(headers, cfg.timestamp_header) if cfg.timestamp_header else None
        if cfg.timestamp_header:
            ts = parse_timestamp(t_text)
        signed = _render(cfg.signed or "{body}", body, t_text)
        index = match(cfg, [received], [signed], algorithm=cfg.algorithm)
        if ts is not None:
            check_window(ts, now, cfg.tolerance_s)
        return index, None if ts is None else float(ts)

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        if not cfg.header:
            raise ConfigError("verify.header", f"is required for scheme {self.name!r}")
        headers = {cfg.timestamp_header: ts} if cfg.timestamp_header else {}
        raw = digest(utf8(secret), _render(cfg.signed or "{body}", body, ts), cfg.algorithm)
        headers[cfg.header] = cfg.prefix + (raw.hex() if cfg.encoding == "hex" else b64(raw))
        return headers, body, content_type(body)
