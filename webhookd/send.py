"""Test deliveries: build a request the way a source's provider would, and post it.

``build`` is pure (config, body, clock and delivery id in; URL, headers and body out) and signs
as the source's signature scheme does; ``post`` sends it with the standard library and returns
the answer.
``webhookd send`` is the user-facing command over both.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from webhookd import schemes
from webhookd.config.checks import HEADER_NAME
from webhookd.config.sections import ALERT_SOURCE, CATCH_ALL, SOURCE_NAME, Config, SourceConfig
from webhookd.config.table import source_key
from webhookd.config.values import Listen
from webhookd.errors import ConfigError, VerificationError
from webhookd.schemes import SCHEMES
from webhookd.schemes.base import sample_json


@dataclass(frozen=True, slots=True)
class Delivery:
    """One signed request, ready to post."""

    url: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    body: bytes  # at most MOST_ANSWER_BYTES of it
    location: str | None = None  # a redirect's, not followed

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def default_body(scheme: str | None, delivery_id: str) -> bytes:
    """A small test payload; it carries the delivery id where the scheme's dedup looks for it.

    Deterministic in ``delivery_id``, so sending the same id twice is a duplicate even for
    schemes whose dedup key is the body's hash.
    """
    found = SCHEMES.get(scheme or "")
    return found.default_body(delivery_id) if found is not None else sample_json(delivery_id)


# webhookd.redact's mask: send sits beside redact in the import layers, so it has its own.
MASK = "***"


def shown_url(url: str) -> str:
    """``url`` as ``send`` prints it: its password, if it has one, as ``***``
    (``http://u:***@host/``).

    A bare ``/``, ``?`` or ``#`` in a password ends the host there as URLs are read, and the
    rest reads as a port that is none: then all from the first ``:`` of the user part to the
    last ``@`` is masked, which may hide more than the password, never less."""
    span = _password_span(url)
    return url if span is None else url[: span[0]] + MASK + url[span[1] :]


def _password_span(url: str) -> tuple[int, int] | None:
    """Where in ``url`` its password is, if it has one (as ``shown_url`` says)."""
    _, sep, rest = url.partition("://")
    rest = rest if sep else url  # no scheme: "u:pw@host/x", unusable, yet no less a password
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        userinfo = authority.rpartition("@")[0]
    elif "@" in rest and (not sep or not _has_port_or_none(authority)):
        userinfo = rest.rpartition("@")[0]
    else:
        return None
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return None
    start = len(url) - len(rest)
    return start + len(user) + 1, start + len(userinfo)


def _has_port_or_none(authority: str) -> bool:
    """Whether what follows the host in ``authority`` is a port, or nothing."""
    try:
        urlsplit("//" + authority).port  # noqa: B018 (read for its ValueError: not a port)
    except ValueError:
        return False
    return True


def _without_password(text: str, url: str) -> str:
    """``text`` (an error about ``url``) with ``url``'s password masked: urllib and http.client
    quote the host they cannot use, user part and all, decoded or not, or only the start of a
    password that a bare ``/`` cut short."""
    span = _password_span(url)
    if span is None:
        return text
    password = url[span[0] : span[1]]
    parts = {password, unquote(password), *re.split(r"[/?#]", password)} - {""}
    for part in sorted(parts, key=len, reverse=True):  # a part inside another: the longer first
        text = text.replace(part, MASK)
    return text


def _host(listen: Listen) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    return f"[{host}]" if ":" in host else host


def source_url(cfg: Config, name: str) -> str:
    """Where the daemon of ``cfg`` takes ``name``'s webhooks (from ``server.listen``).

    The path is percent-encoded (UTF-8): a source name or ``path`` may hold a space or non-ASCII
    letters, which a request line cannot carry as they are; the receiver matches the decoded
    path.
    """
    listen = cfg.server.listen
    if listen.port == 0:
        raise ConfigError("server.listen", "has port 0: give the daemon's address with --url")
    src = resolve(cfg, name)
    path = f"/hooks/{name}" if src.name == CATCH_ALL else src.path
    return f"http://{_host(listen)}:{listen.port}{quote(path, safe='/')}"


def resolve(cfg: Config, name: str) -> SourceConfig:
    """The source ``name``, or the catch-all when the receiver's would take ``name`` (any name
    a source could have, never the alerts' own source); ConfigError if neither, and if ``name``
    is close to a configured one: a slip would otherwise go to the catch-all, unsigned."""
    if not SOURCE_NAME.fullmatch(name):  # no source has it, and the catch-all would answer 404
        raise ConfigError("", cfg.no_source(name))
    src = cfg.sources.get(name)
    if src is not None:
        return src
    if cfg.close_source(name) is not None:
        raise ConfigError("", cfg.no_source(name))
    catch_all = cfg.sources.get(CATCH_ALL)
    # The alerts' source takes no webhooks: the receiver answers 404 for it, in any case.
    if catch_all is not None and name.lower() != ALERT_SOURCE:
        return catch_all
    raise ConfigError("", cfg.no_source(name, takes_webhooks=True))


def catch_all_note(cfg: Config, name: str, src: SourceConfig) -> str | None:
    """What ``send`` says when ``name`` is no source and goes to the catch-all ``src``."""
    if src.name != CATCH_ALL or name == CATCH_ALL:
        return None
    how = "unsigned" if src.verify is None else f"signed as its {src.verify.scheme} scheme"
    return f'no source {name!r} in {cfg.origin}: it goes to the catch-all "{CATCH_ALL}", {how}'


def refused_note(cfg: Config, src: SourceConfig) -> str | None:
    """What ``send`` adds to a 401: the secret it signed with must be the daemon's. Names the
    secret's key and its variable or file, never its value."""
    if src.verify is None or not src.verify.secrets:
        return None
    secret = src.verify.secrets[0]
    variable = secret.variable
    if variable is not None:
        # The daemon reads its environment once: a reload does not see a value changed since.
        return (
            f"the secret in {variable} ({secret.key}) in this shell must be the one the daemon"
            " was started with (a reload does not read env: values again)"
        )
    if secret.reference is not None:
        where = f"the secret in {secret.reference[5:]} ({secret.key})"
    else:
        where = f"{secret.key} in {cfg.origin}"
    return f"{where} must be the one the daemon read when it started or last reloaded"


def parse_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` as ``send --header`` takes it; ``ValueError`` saying what is wrong."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not HEADER_NAME.fullmatch(name):
        raise ValueError(f"--header {text!r}: write it 'Name: value'")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"--header {name}: a header value cannot hold a line break or a NUL")
    return name, value


def build(
    src: SourceConfig,
    *,
    url: str,
    body: bytes | None,
    now: float,
    delivery_id: str,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> Delivery:
    """The request ``src``'s provider would send to ``url``, signed with its first secret, with
    ``extra_headers`` added (one of the same name, in any case, replaced).

    Raises ``ConfigError`` when the source cannot be signed for, ``ValueError`` when the body
    does not fit the scheme (Mailgun wants a JSON object or a form).
    """
    delivery = _signed(src, url=url, body=body, now=now, delivery_id=delivery_id)
    if not extra_headers:
        return delivery
    replaced = {name.lower() for name, _ in extra_headers}
    headers = {k: v for k, v in delivery.headers.items() if k.lower() not in replaced}
    return Delivery(delivery.url, headers | dict(extra_headers), delivery.body)


def id_note(src: SourceConfig, delivery: Delivery, delivery_id: str) -> str | None:
    """What ``send`` says of ``--id`` beside ``--file`` when the daemon will not read it as the
    delivery id: the scheme takes its id from the body (Stripe's ``id``, Slack's
    ``event_id``), or has none, and ``--file``'s body is sent as it is, or the source's own
    ``dedup`` rule reads something else. None when it will."""
    if src.dedup is not None:
        rule = src.dedup
        sent = {k.lower(): v for k, v in delivery.headers.items()}
        if rule.kind == "header" and sent.get(rule.arg.lower()) == delivery_id:
            return None
        return (
            f"--id is not the delivery id the daemon reads: {source_key(src.name)}.dedup reads"
            f" it from {rule.spec}"
        )
    scheme = SCHEMES.get(src.verify.scheme) if src.verify is not None else None
    key = scheme.dedup_key(delivery.headers, delivery.body) if scheme is not None else None
    if key == delivery_id:
        return None
    if scheme is not None and scheme.dedup_json and not scheme.dedup_headers:
        said = f"--id is not sent: {scheme.name} reads the delivery id from the body's"
        if key is None:
            return f'{said} "{scheme.dedup_json}", which this --file has not: its hash is used'
        return f'{said} "{scheme.dedup_json}", which is {key!r} in this --file'
    if key is None:
        what = scheme.name if scheme else "an unsigned source's"
        return f"--id is not sent: {what} webhooks carry no delivery id: the body's hash is used"
    return f"--id is not the delivery id the daemon reads: that is {key!r}"


def unverified_note(
    src: SourceConfig, delivery: Delivery, extra_headers: Sequence[tuple[str, str]], now: float
) -> str | None:
    """What ``send`` warns of when ``--header`` replaced what the signature needs (the signature
    itself, its timestamp, a Twilio form's Content-Type): ``delivery`` no longer verifies with
    the source's own secret. None when it does, or there is nothing to verify."""
    if src.verify is None or not extra_headers:
        return None
    try:
        schemes.verify(
            src.verify, headers=delivery.headers, body=delivery.body, url=delivery.url, now=now
        )
    except VerificationError as exc:
        provider = _signed_headers(src, delivery, now)
        signed = {name.lower() for name in provider}
        names = [name for name, _ in extra_headers if name.lower() in signed]
        # Of those, the ones that break it alone (not X-GitHub-Event, which send sets too).
        breaking = [
            n
            for n, v in extra_headers
            if n in names and not _verifies(src, delivery, _with(provider, n, v), now)
        ]
        names = breaking or names
        return (
            f"--header {', '.join(names or [n for n, _ in extra_headers])}: replaces what"
            f" {src.verify.scheme} verifies: the request does not verify with"
            f" {source_key(src.name)}.verify's secret ({exc.reason}), so the daemon will likely"
            " answer 401"
        )
    return None


def _with(headers: dict[str, str], name: str, value: str) -> dict[str, str]:
    """``headers`` with ``name`` (in any case) set to ``value``."""
    return {k: v for k, v in headers.items() if k.lower() != name.lower()} | {name: value}


def _verifies(src: SourceConfig, delivery: Delivery, headers: dict[str, str], now: float) -> bool:
    assert src.verify is not None
    try:
        schemes.verify(src.verify, headers=headers, body=delivery.body, url=delivery.url, now=now)
    except VerificationError:
        return False
    return True


def _signed_headers(src: SourceConfig, delivery: Delivery, now: float) -> dict[str, str]:
    """The headers ``src``'s provider sets for ``delivery``'s body (no ``--header`` added)."""
    try:
        return _signed(src, url=delivery.url, body=delivery.body, now=now, delivery_id="").headers
    except (ConfigError, ValueError):
        return {}


def _signed(
    src: SourceConfig, *, url: str, body: bytes | None, now: float, delivery_id: str
) -> Delivery:
    cfg = src.verify
    scheme = SCHEMES.get(cfg.scheme) if cfg is not None else None
    if body is None:
        body = scheme.default_body(delivery_id) if scheme is not None else sample_json(delivery_id)
    if cfg is None:
        content_type = "application/octet-stream"
        try:
            json.loads(body)
            content_type = "application/json"
        except (ValueError, RecursionError):
            pass
        return Delivery(url, {"Content-Type": content_type}, body)
    if scheme is not None:
        url = scheme.delivery_url(url, body)
    headers, body = schemes.sign(
        cfg,
        body=body,
        url=url,
        now=now,
        delivery_id=delivery_id,
        key=f"{source_key(src.name)}.verify",
    )
    return Delivery(url, headers, body)


class PostError(Exception):
    """The request could not be made or got no HTTP answer (its message says why).

    ``unreachable``: urllib could not open the URL (refused, no route, a host not found, a
    connect timed out, TLS); ``refused``: the address answered that nothing listens there.
    """

    def __init__(self, message: str, *, unreachable: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable
        self.refused = refused


def without_user(url: str) -> tuple[str, str | None]:
    """``url`` without its user part (``https://u:pw@host/x``), and the ``Authorization``
    header that carries it instead, as a provider, curl or a browser sends it: Basic, the
    percent-decoded user and password in UTF-8. ``(url, None)`` for a URL without one, or
    one that cannot be read (``post`` then says why it cannot be posted to)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


def trusting(cafile: str) -> ssl.SSLContext:
    """The TLS context of ``send --cacert``: the system's checks, with the CAs in ``cafile``
    (PEM) trusted in place of the system's (a proxy in front of the daemon with a private CA's
    certificate). Raises ``ValueError`` naming the option for a file that holds none."""
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ValueError(
            f"--cacert {cafile}: no CA certificate can be read from it ({exc})"
        ) from exc


# Of an answer's body, what send reads and prints: the daemon's are a line of JSON.
MOST_ANSWER_BYTES = 64 * 1024


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is the answer, not followed: urllib would send the request on with its
    headers, a token scheme's secret and a --url's Basic credentials among them, to wherever
    the Location says (another host too), and print the answer of a GET there as if the
    webhook had been delivered."""

    def redirect_request(self, *_args: Any) -> None:
        return None


def post(delivery: Delivery, timeout_s: float = 30.0, tls: ssl.SSLContext | None = None) -> Answer:
    """POST ``delivery``; any HTTP answer is returned. Anything else, a network failure, a
    URL the standard library cannot send (a space, a non-ASCII letter, a bad host) or an answer
    that is not HTTP, raises ``PostError``.

    A user and password in the URL go as Basic auth (``without_user``), unless ``delivery``
    has an ``Authorization`` header of its own. Proxy settings from the environment are
    ignored: the target is the user's own daemon. ``tls``: the context for an ``https`` URL
    (``trusting``); else the system's CAs.
    """
    try:
        url, authorization = without_user(delivery.url)
        headers = dict(delivery.headers)
        if authorization and not any(k.lower() == "authorization" for k in headers):
            headers["Authorization"] = authorization
        # As UTF-8, as a provider sends a value that is not ASCII (-H 'X-Shop-Name: Café'):
        # http.client encodes a value as Latin-1, and refused a character past it ("✓"), so
        # it is given the UTF-8 bytes as the Latin-1 text that encodes to them (an argument
        # that was not UTF-8 goes as its bytes came, by surrogateescape).
        sent = {
            k: v.encode("utf-8", "surrogateescape").decode("latin-1") for k, v in headers.items()
        }
        request = urllib.request.Request(url, data=delivery.body, headers=sent, method="POST")
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.ProxyHandler({}),
            _NoRedirects(),
        ]
        if tls is not None:
            handlers.append(urllib.request.HTTPSHandler(context=tls))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=timeout_s) as response:
                return Answer(response.status, response.reason, response.read(MOST_ANSWER_BYTES))
        except urllib.error.HTTPError as exc:
            with exc:
                location = exc.headers.get("Location") if 300 <= exc.code < 400 else None
                return Answer(exc.code, str(exc.reason), exc.read(MOST_ANSWER_BYTES), location)
    except urllib.error.URLError as exc:
        # Its text is "<urlopen error [Errno 111] Connection refused>": say only the reason.
        reason = exc.reason
        said = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        refused = isinstance(reason, ConnectionRefusedError)
        if isinstance(reason, ssl.SSLCertVerificationError):
            # "certificate verify failed: unable to get local issuer certificate", and how on.
            said = f"{reason.verify_message}; a private CA's certificate goes in --cacert"
        said = _without_password(said or type(reason).__name__, delivery.url)
        raise PostError(said, unreachable=True, refused=refused) from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        # A timed-out read is an OSError; InvalidURL and a garbled answer are HTTPException.
        said = _without_password(str(exc) or type(exc).__name__, delivery.url)
        raise PostError(said) from exc
