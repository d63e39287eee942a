"""Signature schemes: one module per provider, and ``SCHEMES``, the registry everyone asks.

Each scheme (a ``base.Scheme`` subclass) holds everything webhookd knows about one provider:
how to verify its requests, answer its handshake, find its delivery id for dedup, sign as it
does for ``webhookd send``, whether it signs a timestamp, and which ``verify`` options it needs.
The receiver, ``send`` and the config loader look a scheme up here by name and ask it; none of
them names a provider. Adding a scheme: one module with a ``Scheme`` subclass, one entry below.

Layering: ``config`` imports this package (to offer the names and have each scheme check its
options), so nothing here may import ``config``. Hence ``VerifyConfig`` is defined in ``base``
(config re-exports it), ``Secret`` lives in ``webhookd.secret``, and ``check_config`` names keys
through the small ``base.Options`` protocol (``has``, ``path``) that config's table reader
satisfies, rather than through the reader itself. The schemes thus sit just below config,
above only ``errors`` and ``secret``, and never import receiver, send or cli.
"""

from __future__ import annotations

from collections.abc import Mapping

from webhookd.errors import ConfigError, VerificationError
from webhookd.schemes.base import Handshake, Scheme, Verdict, VerifyConfig
from webhookd.schemes.github import GitHub
from webhookd.schemes.hmac import Hmac
from webhookd.schemes.mailgun import Mailgun
from webhookd.schemes.meta import Meta
from webhookd.schemes.shopify import Shopify
from webhookd.schemes.slack import Slack
from webhookd.schemes.standard import Standard, sign_standard
from webhookd.schemes.stripe import Stripe
from webhookd.schemes.token import Token
from webhookd.schemes.twilio import Twilio

__all__ = [
    "SCHEMES",
    "Handshake",
    "Scheme",
    "Verdict",
    "VerifyConfig",
    "default_dedup",
    "handshake",
    "sign",
    "sign_standard",
    "verify",
]

# The names users may write, in the order config's error message lists them.
SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        GitHub(),
        Stripe(),
        Shopify(),
        Mailgun(),
        Slack(),
        Standard(),
        Meta(),
        Twilio(),
        Hmac(),
        Token(),
    )
}


def verify(
    cfg: VerifyConfig, *, headers: Mapping[str, str], body: bytes, url: str, now: float
) -> Verdict:
    """Check a request against ``cfg``; raise ``VerificationError`` on any failure."""
    scheme = SCHEMES.get(cfg.scheme)
    if scheme is None:
        raise VerificationError("unknown scheme")
    return scheme.verify(cfg, headers=headers, body=body, url=url, now=now)


def handshake(
    cfg: VerifyConfig | None,
    *,
    method: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: bytes,
    url: str,
    now: float,
) -> Handshake | None:
    """The provider's expected answer if this request is a verification handshake, else None."""
    scheme = SCHEMES.get(cfg.scheme) if cfg is not None else None
    if cfg is None or scheme is None:
        return None
    return scheme.handshake(
        cfg, method=method, query=query, headers=headers, body=body, url=url, now=now
    )


def default_dedup(scheme: str | None, headers: Mapping[str, str], body: bytes) -> str | None:
    """The provider's delivery id for this request, or None to fall back to the body's hash."""
    found = SCHEMES.get(scheme or "")
    return found.dedup_key(headers, body) if found is not None else None


def sign(
    cfg: VerifyConfig,
    *,
    body: bytes,
    url: str,
    now: float,
    delivery_id: str,
    key: str = "verify",
) -> tuple[dict[str, str], bytes]:
    """Headers (and body) as ``cfg.scheme``'s provider would send them, signed with secret 0.

    ``key`` is the verify table's dotted key (``sources.NAME.verify``), which errors name.
    Twilio: a JSON body must be posted to a URL whose query already carries ``bodySHA256``
    (the body's SHA-256 hex), as Twilio itself does; ``sign`` raises ``ValueError`` otherwise.
    """
    scheme = SCHEMES.get(cfg.scheme)
    if scheme is None:
        if not cfg.secrets:
            raise ConfigError(f"{key}.secret", f"is required to sign for scheme {cfg.scheme!r}")
        raise ConfigError(f"{key}.scheme", f"unknown scheme {cfg.scheme!r}")
    return scheme.sign(cfg, body=body, url=url, now=now, delivery_id=delivery_id, key=key)
