"""A shared token sent as is in a configured header (GitLab's ``X-Gitlab-Token`` and the like):
no MAC and no timestamp, compared in constant time; the header's value is stored masked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from webhookd.errors import ConfigError, VerificationError
from webhookd.schemes.base import (
    Options,
    Result,
    Scheme,
    Signed,
    VerifyConfig,
    content_type,
    prefixed_value,
    same,
)


class Token(Scheme):
    name = "token"
    option_keys = frozenset({"header", "prefix"})
    legacy_sha1 = False
    untimed_always = True
    dedup_headers = ()
    dedup_json = None
    required_keys: ClassVar[Mapping[str, str]] = {"header": "X-Webhook-Token"}

    def check_config(self, cfg: VerifyConfig, table: Options) -> None:
        super().check_config(cfg, table)
        if not cfg.header:
            raise ConfigError(table.path("header"), f"is required for scheme {self.name!r}")

    def credential_header(self, cfg: VerifyConfig) -> str | None:
        return cfg.header

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        token = prefixed_value(cfg, headers)
        if not cfg.secrets:
            raise VerificationError("no secret configured")
        for index, secret in enumerate(cfg.secrets):
            if same(token, secret.reveal()):
                return index, None
        raise VerificationError("token mismatch")

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        if not cfg.header:
            raise ConfigError("verify.header", f"is required for scheme {self.name!r}")
        return {cfg.header: cfg.prefix + secret}, body, content_type(body)
