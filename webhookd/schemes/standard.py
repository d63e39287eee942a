"""Standard Webhooks (and Svix): ``webhook-signature: v1,<base64>`` over ``"<id>.<ts>.<body>"``,
with the message id in ``webhook-id``. ``sign_standard`` also signs what ``forward`` sends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
    required_header,
    unb64,
    utf8,
)


def standard_keys(text: str) -> list[bytes]:
    """HMAC keys for a Standard Webhooks secret: ``whsec_`` + base64, else base64 or raw UTF-8."""
    if text.startswith("whsec_"):
        key = unb64(text[len("whsec_") :])
        return [key] if key else []
    decoded = unb64(text)
    # The official libraries base64-decode an unprefixed secret; people also paste raw strings.
    return [decoded, utf8(text)] if decoded else [utf8(text)]


def check_whsec(text: str, key: str) -> None:
    """``ConfigError`` naming ``key`` when ``text`` is ``whsec_`` but not then a key in base64.

    Such a secret can sign nothing and verify nothing (``standard_keys`` finds no key in it):
    config refuses it when it is read, rather than every delivery or webhook failing after.
    Only this scheme and the signing of ``forward``/``then`` decode ``whsec_``: Stripe's
    ``whsec_`` secrets are used as written, and are not checked here.
    """
    if text.startswith("whsec_") and not standard_keys(text):
        raise ConfigError(key, "is not valid whsec_ base64")


def sign_standard(secrets: Sequence[str], *, msg_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value: ``v1,<base64>`` per secret."""
    sigs = []
    for index, secret in enumerate(secrets):
        # The first: what Standard Webhooks libraries verify with (whsec_ or not, the base64
        # decoded), the raw UTF-8 only for a secret that is no base64 at all.
        keys = standard_keys(secret)
        if not keys:  # config refuses such a secret naming its key (check_whsec): not reached
            raise ConfigError(f"secrets[{index}]", "is not valid whsec_ base64")
        sigs.append("v1," + b64(digest(keys[0], utf8(f"{msg_id}.{timestamp}.") + body)))
    return " ".join(sigs)


class Standard(Scheme):
    name = "standard"
    option_keys = frozenset({"tolerance_s"})
    legacy_sha1 = False
    untimed_always = False
    dedup_headers = ("webhook-id", "svix-id")
    dedup_json = None

    def check_config(self, cfg: VerifyConfig, table: Options) -> None:
        super().check_config(cfg, table)
        for secret in cfg.secrets:
            # An env: secret's variable is read once, when the config is loaded, so its value is
            # checked here just like an inline one. Only a variable that is not set (or empty)
            # leaves the secret missing, which journal-only commands allow: they verify nothing,
            # and anything that would verify calls reveal(), which refuses it naming the key.
            if not secret.missing:
                check_whsec(secret.reveal(), secret.key)

    def dedup_key(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """The signed message id of the family ``check`` verifies: a ``webhook-id`` beside
        ``svix-*`` headers is signed by nobody, so it must not name the delivery."""
        if header(headers, "webhook-signature") is None and header(headers, "svix-signature"):
            return header(headers, "svix-id")
        return super().dedup_key(headers, body)

    def check(
        self, cfg: VerifyConfig, headers: Mapping[str, str], body: bytes, url: str, now: float
    ) -> Result:
        family = "webhook" if header(headers, "webhook-signature") is not None else "svix"
        sig = required_header(headers, f"{family}-signature")
        msg_id = header(headers, f"{family}-id")
        if msg_id is None:
            raise VerificationError("missing message id")
        t_text = header(headers, f"{family}-timestamp")
        ts = parse_timestamp(t_text)
        received = []
        for item in sig.split():
            version, sep, value = item.partition(",")
            if sep and version == "v1":  # other versions (v1a, v2) are skipped, not failed
                received.append(unb64(value))
        index = match(
            cfg,
            received,
            [utf8(f"{msg_id}.{t_text}.") + body],
            keys_of=lambda s: standard_keys(s.reveal()),
        )
        check_window(ts, now, cfg.tolerance_s)
        return index, float(ts)

    def signature(
        self, cfg: VerifyConfig, secret: str, *, body: bytes, url: str, ts: str, delivery_id: str
    ) -> Signed:
        headers = {
            "webhook-id": delivery_id,
            "webhook-timestamp": ts,
            "webhook-signature": sign_standard(
                [secret], msg_id=delivery_id, timestamp=int(ts), body=body
            ),
        }
        return headers, body, content_type(body)
