"""What webhookd hides: credential headers before an event is stored, signature headers where
an event is shown, and configured secret values in everything it shows (log lines, ``webhookd
show``, the events API and the dashboard).

One rule everywhere: ``Masker`` replaces every configured secret value (four characters or
more), and the parts of one a target may quote alone (``secret_parts``), with ``***``. The
workers mask an attempt's error and detail before they are journaled; only values the daemon
knows are masked, so an event's body is stored as sent.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

from webhookd.config.reading import (
    DEFAULT_OPENAI_API_KEY,
    SECRET_OPTIONS,
    SECRET_TABLES,
    read_secret,
    secret_options,
)
from webhookd.config.sections import ActionConfig, Config, SourceConfig, leaves, secrets_in
from webhookd.errors import ConfigError
from webhookd.schemes import SCHEMES
from webhookd.schemes.base import VerifyConfig
from webhookd.secret import Secret

MASK = "***"
_MIN_SECRET_CHARS = 4  # shorter values would mask ordinary words and numbers

# Request headers whose value is a credential, not a description of the request: stored as
# MASK. Signature headers (X-Hub-Signature-256, Stripe-Signature …) are MACs of the body, of no
# use without the secret, and are kept as sent.
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
        "x-access-token",
        "x-gitlab-token",
    }
)


def printable(text: str) -> str:
    """``text`` with every character that is not printable shown as its escape (``\\x1b``,
    ``\\n``). What a sender, a target or a program chose (a dedup key, a tenant, an error, a
    command's output) reaches a terminal or a log line as text: never as a control sequence
    the terminal obeys, nor as a line of its own that reads like one of the daemon's."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def secret_headers(verify: VerifyConfig | None) -> frozenset[str]:
    """Lower-case names of a source's credential headers: the common ones, plus its scheme's
    credential header if it has one (the ``token`` scheme's: its value is the shared secret)."""
    scheme = SCHEMES.get(verify.scheme) if verify is not None else None
    extra = scheme.credential_header(verify) if scheme is not None and verify is not None else None
    return SECRET_HEADERS | {extra.lower()} if extra else SECRET_HEADERS


def redact_headers(
    items: Iterable[tuple[str, str]], names: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """The headers as they are stored: each one named in ``names`` keeps its name, not its value."""
    return tuple((k, MASK if k.lower() in names else v) for k, v in items)


def redact_request_headers(
    headers: Mapping[str, str], names: frozenset[str]
) -> tuple[tuple[str, str], ...]:
    """``redact_headers`` for a request's headers, a case-insensitive mapping (aiohttp's): most
    webhooks carry none of ``names``, and asking the mapping for each of those is cheaper than
    lower-casing every header the request has."""
    if any(name in headers for name in names):
        return redact_headers(headers.items(), names)
    return tuple(headers.items())


# Shown masked (events API, dashboard, ``show``) though stored as sent: a signature header is a
# MAC of the body, of no use without the secret, but it is credential material all the same and
# no screen needs it. Matched by name, so a provider this list has never heard of is covered
# too (X-Hub-Signature-256, Stripe-Signature, X-Shopify-Hmac-Sha256, webhook-signature …).
_SHOWN_MASKED_HINTS = ("signature", "hmac", "token", "secret", "password", "api-key", "apikey")


def shown_headers(
    items: Iterable[tuple[str, str]], verify: VerifyConfig | None
) -> tuple[tuple[str, str], ...]:
    """The headers as they are shown: credential and signature headers keep only their names
    (the source's own signature or token header too, whatever it is called)."""
    pairs = tuple(items)
    names = secret_headers(verify) | {
        k.lower() for k, _ in pairs if any(hint in k.lower() for hint in _SHOWN_MASKED_HINTS)
    }
    if verify is not None and verify.header:
        names |= {verify.header.lower()}
    return redact_headers(pairs, names)


def shown_query(query: str) -> str:
    """The query as it is shown: a parameter whose name reads as a credential (a header's
    ``_SHOWN_MASKED_HINTS``, ``_`` read as ``-``, or one of ``_CREDENTIAL_QUERY_NAMES``:
    ``?token=``, ``?api_key=``, ``?sig=``) keeps its name, its value ``***``; the rest as
    received, still percent-encoded. Stored as sent, as signature headers are.

    ``;`` separates parameters as ``&`` does: some frameworks a forward passes the query to
    still split on it (``?a=1;token=…``), so a credential after one is masked too."""
    if not query:
        return query
    parts = _QUERY_SEPARATORS.split(query)  # parameters, each followed by its separator
    for i in range(0, len(parts), 2):
        name, eq, _value = parts[i].partition("=")
        if eq and _credential_param(unquote_plus(name)):
            parts[i] = f"{name}={MASK}"
    return "".join(parts)


_QUERY_SEPARATORS = re.compile(r"([&;])")


def _credential_param(name: str) -> bool:
    low = name.lower()
    dashed = low.replace("_", "-")
    return low in _CREDENTIAL_QUERY_NAMES or any(hint in dashed for hint in _SHOWN_MASKED_HINTS)


# How far past a cut a text is read (or kept), so that a secret the cut falls inside, of this
# length or shorter, is found whole and shown as ``***`` rather than in part (``Masker.after``,
# ``Masker.head``).
SPARE_BYTES = 1024


class Masker:
    """Replaces known secret values with ``***`` in text and in JSON-shaped documents."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        kept = {s for s in secrets if len(s) >= _MIN_SECRET_CHARS}
        self.given = frozenset(kept)  # what a reload's masker starts from
        kept |= {part for s in kept for part in secret_parts(s)}
        # Each also as a log line may carry it: in a %r (a backslash or a quote escaped), in a
        # JSON string, or shown printable (a tab as \t).
        forms = {f for s in kept for f in (repr(s)[1:-1], json.dumps(s)[1:-1], printable(s))}
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted(kept | forms, key=len)[::-1]

    def text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def after(self, text: str, start: int) -> str:
        """``text[start:]`` masked, where ``text[:start]`` is what was read before it: a secret
        that ``start`` falls inside shows as ``***``, not as its last characters (masked alone,
        the part after ``start`` would be no secret the masker knows)."""
        end = start
        for secret in self.secrets:
            n = len(secret)
            at = text.find(secret, max(start - n + 1, 0), start + n - 1)
            while at != -1 and at < start:
                end = max(end, at + n)
                at = text.find(secret, at + 1, start + n - 1)
        return (MASK if end > start else "") + self.text(text[end:])

    def before(self, text: str, end: int) -> str:
        """``text[:end]`` masked, where ``text[end:]`` is what was read after it: a secret that
        ``end`` falls inside shows as ``***``, not as its first characters (``after``'s
        counterpart, for the start of a text)."""
        start = end
        for secret in self.secrets:
            n = len(secret)
            at = text.find(secret, max(end - n + 1, 0), end + n - 1)
            while at != -1:
                start = min(start, at)
                at = text.find(secret, at + 1, end + n - 1)
        return self.text(text[:start]) + (MASK if start < end else "")

    def head(self, data: bytes, most: int) -> str:
        """The first ``most`` bytes of ``data`` as text, masked then cut (``before``): ``data``
        read ``SPARE_BYTES`` past them, so a secret the cut falls inside shows as ``***``."""
        text = data.decode("utf-8", "replace")
        return self.before(text, len(data[:most].decode("utf-8", "replace")))

    def deep(self, value: Any) -> Any:
        """``value`` with every string in it masked but the keys of its mappings (names, the
        documents' own among them: a value that happened to read as a key lost its field);
        other values as they are."""
        if not self.secrets:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.deep(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.deep(v) for v in value]
        return value


# A part of a secret shorter than this is not masked on its own (it would mask ordinary words);
# the whole secret still is.
_MIN_PART_CHARS = 8


def secret_parts(secret: str) -> set[str]:
    """The parts of a secret that a target or a program may quote without the rest: what
    follows the scheme of an ``Authorization``-style value (``Bearer <token>``); of a URL its
    password (unless it is a plain word: a development database's ``postgres``) and the
    ``Basic`` credentials made of its user and password; and of an http(s) URL (a Slack or
    Discord webhook's token is in its path) the path segments that read as a token and the
    values of the query parameters named as credentials. Never a path as a whole, a word, a
    database's name or an id (Slack's ``T0ABC1234``): those are ordinary text elsewhere, and a
    part is masked everywhere, journaled attempts included."""
    parts: set[str] = set()
    scheme, space, token = secret.partition(" ")
    token = token.strip()
    # Not under _MIN_PART_CHARS: that is the second word of a secret with a space, not a token.
    if space and scheme.isalpha() and len(scheme) <= 20 and len(token) >= _MIN_PART_CHARS:
        parts.add(token)
    if "://" in secret:
        try:
            url = urlsplit(secret)
            password = url.password
        except ValueError:
            password, url = None, None
        if url is not None and password:
            user, plain = unquote(url.username or ""), unquote(password)
            if len(plain) >= _MIN_PART_CHARS and not plain.isalpha():
                parts |= {password, plain}
            parts.add(base64.b64encode(f"{user}:{plain}".encode()).decode())
        if url is not None and url.scheme in ("http", "https"):
            parts |= {seg for seg in url.path.split("/") if _looks_like_token(seg)}
            for name, value in parse_qsl(url.query):
                if name.lower() in _CREDENTIAL_QUERY_NAMES or _looks_like_token(value):
                    parts.add(value)
    return {p for p in parts if len(p) >= _MIN_SECRET_CHARS}


# Query parameters whose value is a credential whatever it looks like (?token=, ?api_key=).
_CREDENTIAL_QUERY_NAMES = frozenset(
    {
        "token",
        "access_token",
        "auth",
        "key",
        "api_key",
        "apikey",
        "api-key",
        "secret",
        "sig",
        "signature",
        "code",
        "password",
        "pass",
        "passwd",
        "pwd",
        "jwt",
        "session",
        "sid",
    }
)


def _looks_like_token(text: str) -> bool:
    """A value that reads as a generated credential rather than a word or an id: 16
    characters or more, letters and digits mixed (``order-processing``, ``webhookb2`` and a
    Slack team's ``T0ABC1234`` do not), and not words joined by ``-``, ``_`` or ``.``
    (``payment-status-v2``, ``orders-create-2024``: a path an operator named, which masked
    its every mention, in errors and bodies alike)."""
    if len(text) < 16 or not any(c.isdigit() for c in text) or not any(c.isalpha() for c in text):
        return False
    pieces = _JOINERS.split(text)
    return len(pieces) == 1 or not all(_WORDLIKE.fullmatch(piece) for piece in pieces)


# What joins the words of a name, and a word of one: lowercase letters then digits (``v2``,
# ``webhooks``), digits then lowercase letters (``2024``, ``3ds``) or a capitalised word, at
# most 15 characters. A generated token's pieces mix cases, or letters and digits, or run long:
# ``sk-proj-`` and 48 more, ``xoxb-...-AbCd...``, a UUID's ``5f3c2a1e``.
_JOINERS = re.compile(r"[-_.]")
_WORDLIKE = re.compile(r"(?=.{0,15}$)(?:[a-z]*[0-9]*|[0-9]*[a-z]*|[A-Z][a-z]+[0-9]*)")


_URL_OPTIONS = frozenset({"url", "forward", "proxy"})


# A several-line secret's lines of this many characters or more are masked each on its own
# too (a PEM key's body and its BEGIN and END lines; not a short last line, which as a word of
# its own would mask ordinary text).
_SECRET_LINE_CHARS = 16


def secret_values(obj: Any) -> set[str]:
    """Every secret a config holds, where known: ``Secret`` values, the ``env:`` and ``file:``
    references of the action options that take a secret (a forward's ``url`` and ``headers``,
    a ``secret``, a command's ``env``...), an openai action's default key, and the credentials
    a command inherits from this process's environment (``inherited_credentials``).

    Only those: an ``argv`` item or a prompt that happens to start with ``env:`` is text, not a
    secret (reading it as one masked ``env:HOME``'s value in every line, and a ``file:`` naming
    a FIFO hung the start)."""
    found: set[str] = set()
    for key, value, lines in _references(obj):
        if isinstance(value, str):
            value = read_secret(value, key, lines=lines)
        if not value.missing:
            found.add(value.reveal())
            if lines:  # a PEM key: a program may print a line of it alone, or sort its lines
                found |= {
                    line.strip()
                    for line in value.reveal().splitlines()
                    if len(line.strip()) >= _SECRET_LINE_CHARS
                }
    found |= {value for _key, value in inline_credentials(obj)}
    for action in _actions(obj):
        found |= set(_written_secrets(action.options))
    return found | inherited_credentials(obj)


def _written_secrets(table: Mapping[str, Any]) -> Iterator[str]:
    """The values of the options that hold only a secret (an openai ``api_key``, a signing
    ``secret`` or ``secrets``, a ``then``'s too) written in the file as they are: an API's
    answer quoting the key ("Incorrect API key provided: sk-...") showed it whole."""
    for name, value in table.items():
        if name in _SECRET_ONLY_OPTIONS:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and _written(item):
                    yield item
        elif isinstance(value, Mapping):  # then = { forward = ..., secret = ... }
            yield from _written_secrets(value)


# What names a header or a command's environment variable as holding a credential: a header
# of SECRET_HEADERS, or a name with one of these words in it (split at - and _), or ending in
# API_KEY, ACCESS_KEY, SECRET_KEY or PRIVATE_KEY. Whole words only: GIT_AUTHOR_NAME, SORT_KEY,
# X-Routing-Key, X-Idempotency-Key and OAUTH_REDIRECT_URL are no credentials.
_CREDENTIAL_WORDS = frozenset({"token", "secret", "password", "passwd", "apikey", "credentials"})
_CREDENTIAL_KEYS = frozenset({"api", "access", "secret", "private"})


def _credential_name(name: str) -> bool:
    low = name.lower()
    if low in SECRET_HEADERS:
        return True
    words = re.split(r"[-_.]", low)
    if _CREDENTIAL_WORDS.intersection(words):
        return True
    return len(words) >= 2 and words[-1] == "key" and words[-2] in _CREDENTIAL_KEYS


def inline_credentials(obj: Any) -> Iterator[tuple[str, str]]:
    """Credentials written in an action's options as they are, not as ``env:``/``file:``: a
    forward URL with a credential in it (``_holds_credential``), a header or a command's
    environment variable whose name says it holds a credential (``Authorization``,
    ``X-Api-Key``, ``DEPLOY_TOKEN``). With their dotted keys: ``check`` names them, and the
    daemon masks them as it masks the others."""

    for action in _actions(obj):
        yield from _inline_options(action.options, action.key)


def _inline_options(table: Mapping[str, Any], key: str) -> Iterator[tuple[str, str]]:
    """``inline_credentials`` of one action's options table (at module level: a nested
    generator calling itself is a cycle, garbage the daemon's collector seldom frees)."""
    for name, value in table.items():
        path = f"{key}.{name}"
        if name in _URL_OPTIONS and isinstance(value, str) and _holds_credential(value):
            yield path, value
        elif name in SECRET_TABLES and isinstance(value, Mapping):
            for item, text in value.items():
                # From 8 characters: a short value under such a name (SORT_KEY = "date")
                # is a word, and would be masked in every line.
                if (
                    _credential_name(item)
                    and isinstance(text, str)
                    and len(text) >= _MIN_PART_CHARS
                    and _written(text)
                ):
                    yield f"{path}.{item}", text
        elif isinstance(value, Mapping):  # then = { forward = ..., headers = ... }
            yield from _inline_options(value, path)


def inherited_credentials(obj: Any) -> set[str]:
    """The values of this process's environment variables that a command action passes on to
    its program (its ``inherit_env`` names and globs) whose name says they hold a credential,
    as a ``command``'s ``env`` names are read (``AWS_SECRET_ACCESS_KEY``, not ``AWS_REGION``).
    The program has them and may print them: its output is journaled and shown, masked."""
    patterns = {
        pattern
        for action in _actions(obj)
        if action.type == "command" and isinstance(action.options.get("inherit_env"), list)
        for pattern in action.options["inherit_env"]
        if isinstance(pattern, str)
    }
    return {
        value
        for name, value in inherited_env(patterns).items()
        if len(value) >= _MIN_PART_CHARS and _credential_name(name)
    }


def inherited_env(patterns: Iterable[str]) -> dict[str, str]:
    """The variables of this process's environment that ``inherit_env``'s names and globs pass
    on to a command's program (what its ``env_for`` starts from, and what is masked of it)."""
    patterns = tuple(patterns)
    if not patterns:
        return {}
    return {
        name: value
        for name, value in os.environ.items()
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }


def _written(value: str) -> bool:
    """A value written as it is: not an ``env:``/``file:`` reference, and long enough to mask."""
    return len(value) >= _MIN_SECRET_CHARS and not value.startswith(("env:", "file:"))


def _holds_credential(url: str) -> bool:
    """A URL written out with a password, a query parameter named as a credential (``?key=``)
    or a path segment that reads as a token (a Slack or Discord webhook's): what ``check`` warns
    of and the daemon masks, as it does for such a URL read from ``env:``."""
    return _has_password(url) or (_written(url) and bool(secret_parts(url)))


def _has_password(url: str) -> bool:
    if not _written(url):
        return False
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def unreadable_secrets(obj: Any) -> list[str]:
    """What ``check`` says of each secret a config (read with ``secrets=False``) names but
    cannot have: an ``env:`` variable not set or empty, a ``file:`` not readable, each as the
    one-line error naming its key that loading it would raise (never a value). All of them,
    where the load stops at the first."""
    said = []
    for key, value, lines in _references(obj):
        try:
            (read_secret(value, key, lines=lines) if isinstance(value, str) else value).reveal()
        except ConfigError as exc:
            said.append(str(exc))
    return said


def spaced_secrets(cfg: Config) -> list[str]:
    """What ``check`` and a start warn of each secret that starts or ends with a space or tab:
    most often a stray one from a copy and paste, with which every signature fails. Keys only,
    never a value."""
    said = []
    for key, value, lines in _references(cfg):
        secret = read_secret(value, key, lines=lines) if isinstance(value, str) else value
        if not secret.missing and secret.reveal() != secret.reveal().strip(" \t"):
            said.append(
                f"{key} starts or ends with a space or tab (a stray one from a copy and paste?):"
                " what it signs or checks will not match the other side; remove it unless it"
                " is meant"
            )
    return said


def _references(obj: Any) -> Iterator[tuple[str, Secret | str, bool]]:
    """Each ``Secret`` in ``obj`` and each ``env:``/``file:`` reference in its actions' options
    that take a secret (``secret_values``), with its dotted key, and whether its value may hold
    several lines (a command's environment variable: ``read_secret``'s ``lines``)."""
    for leaf in leaves(obj):
        if isinstance(leaf, Secret):
            yield leaf.key, leaf, False

    for action in _actions(obj):
        found = list(secret_options(action.options, action.key))
        if action.type == "openai" and "api_key" not in action.options:
            found.append((f"{action.key}.api_key", DEFAULT_OPENAI_API_KEY))
        environment = f"{action.key}.env." if action.type == "command" else None
        for key, value in found:
            # A Secret here (the alerts' url) is one of the leaves above.
            if isinstance(value, str) and value.startswith(("env:", "file:")):
                lines = environment is not None and key.startswith(environment)
                yield key, value, lines


# The action options that hold nothing but a secret: a URL may hold one (a password) or not.
_SECRET_ONLY_OPTIONS = sorted(SECRET_OPTIONS - _URL_OPTIONS)


# What is said of each (by ``check``, and by the daemon as it starts).
WRITTEN_OUT = (
    "written in the config file itself: whoever reads the file has it (use env:NAME or file:PATH)"
)


def written_out(cfg: Config) -> list[str]:
    """The keys of the secrets written out in the config file rather than read from ``env:`` or
    ``file:`` (anyone who can read the file, a backup or a repository, has them): signing
    secrets, ``admin.token``, the alerts' URL, the options that hold only a secret, a URL with
    a password in it, and the headers and command environment variables named as credentials
    (``inline_credentials``). Keys only, never a value."""
    keys = []
    for secret in secrets_in(cfg):
        if secret.reference is not None or secret.missing:
            continue
        # A URL is a credential when it has a password; an incoming webhook's URL (the
        # alerts') always is.
        whole = secret.key == "alerts.url"
        if secret.key.endswith("url") and not whole and not _has_password(secret.reveal()):
            continue
        keys.append(secret.key)
    for action in _actions(cfg):
        tables = [(action.key, action.options)]
        if isinstance(then := action.options.get("then"), Mapping):
            tables.append((f"{action.key}.then", then))
        for key, table in tables:
            for name in _SECRET_ONLY_OPTIONS:
                value = table.get(name)
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, str) and item and not item.startswith(("env:", "file:")):
                        keys.append(f"{key}.{name}")
                        break
    keys += [key for key, _value in inline_credentials(cfg)]
    return keys


# A signing secret shorter than this can be guessed offline from one signed webhook (an HMAC's
# secret), or online (the token scheme's): providers' own are 32 characters or more.
MIN_SIGNING_SECRET_CHARS = 16


# The dedup window below which check warns: the longest of the providers' retries (Stripe's).
DEDUP_DAYS_WANTED = 3.0


def weak_points(cfg: Config) -> list[str]:
    """What ``check`` and a start warn of in how the config exposes the daemon: sources that
    take unsigned webhooks on a listener others can reach, a dedup window shorter than the
    providers' retries, and signing secrets short enough to guess. Keys and lengths only,
    never a value."""
    said = []
    listen = cfg.server.listen
    unsigned = sorted(name for name, src in cfg.sources.items() if src.verify is None)
    if unsigned and not listen.is_loopback:
        said.append(
            f"source(s) {', '.join(unsigned)} take unsigned webhooks on {listen}: anyone who can"
            " reach it can post to them (set their verify, or let only a proxy that checks the"
            " senders reach this address)"
        )
    # Sources that take webhooks from listed senders other than the local machine (a list of
    # loopback addresses alone is a development setup, or a sender on the same box).
    allowing = sorted(
        name
        for name, src in cfg.sources.items()
        if any(
            not (n.network_address.is_loopback and n.broadcast_address.is_loopback)
            for n in src.allow_from
        )
    )
    if allowing and listen.is_loopback and not cfg.server.trusted_proxies:
        # On loopback, behind a proxy: every request comes from the proxy's address, which
        # allow_from then judges (all refused, or all taken if it lists loopback too).
        said.append(
            f"source(s) {', '.join(allowing)} take webhooks only from their allow_from, and"
            f" {listen} is loopback, so behind a proxy every sender is the proxy's address,"
            " which allow_from judges instead: list the proxy in server.trusted_proxies"
        )
    if cfg.sources and cfg.journal.keep_dedup_d < DEDUP_DAYS_WANTED:
        # 0 read as "forever" by some: it keeps a key only until the next prune (a minute).
        said.append(
            f"journal.keep_dedup_d is {cfg.journal.keep_dedup_d:g} d: a provider's retry of a"
            " delivery taken longer ago than that is a new event, its jobs run again (Stripe"
            f" retries for {DEDUP_DAYS_WANTED:g} days)"
        )
    for src in cfg.sources.values():
        for secret in src.verify.secrets if src.verify is not None else ():
            if not secret.missing and len(secret.reveal()) < MIN_SIGNING_SECRET_CHARS:
                said.append(
                    f"{secret.key} has {len(secret.reveal())} characters: short enough to"
                    f" guess; use {MIN_SIGNING_SECRET_CHARS * 2} random characters or more"
                    " (openssl rand -hex 32)"
                )
    return said


def _actions(obj: Any) -> list[ActionConfig]:
    """The action configs ``obj`` (a config or a part of one) holds."""
    if isinstance(obj, ActionConfig):
        return [obj]
    if isinstance(obj, Config):  # the alerts' forward too: its proxy may hold a password
        return [a for src in obj.all_sources() for a in src.actions]
    if isinstance(obj, SourceConfig):
        return list(obj.actions)
    return []
