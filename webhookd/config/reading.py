"""Reading what a config names: secrets written ``env:``/``file:``, and small files, unblocked.

A secret written ``"env:NAME"`` or ``"file:PATH"`` is read at each load and wrapped in
``Secret`` (``webhookd.secret``), so that no ``repr`` or log line can show it. A file is read
only if it is a regular file within a size (a FIFO with no writer is refused, not waited on).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from webhookd.errors import ConfigError
from webhookd.secret import Secret

# The most bytes read of a file: secret (a token, a key, a URL), of a config file, and of a
# PEM file (a CA bundle: the system's is a few hundred KB).
SECRET_FILE_BYTES = 64 * 1024
CONFIG_FILE_BYTES = 4 * 1024 * 1024
PEM_FILE_BYTES = 16 * 1024 * 1024


class Unfit(Exception):
    """A file that is not read: a pipe or a device (reading one may block, or never end), or
    one larger than any file of its kind."""


def read_small(path: str | Path, most: int) -> bytes:
    """A regular file's bytes, at most ``most`` of them (``Unfit`` otherwise; ``OSError`` as
    reading it raises one). Opened without blocking, so a FIFO with no writer is refused, not
    waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Unfit("not a regular file (a pipe or a device)")
        data = f.read(most + 1)
    if len(data) > most:
        raise Unfit(f"larger than {most // 1024:,} KiB")
    return data


def read_small_text(path: Path, most: int) -> str:
    """``read_small`` as UTF-8 text (``UnicodeDecodeError`` if it is not)."""
    return read_small(path, most).decode("utf-8")


def no_reference(value: str, key: str, what: str) -> None:
    """``ConfigError`` for an ``env:``/``file:`` reference in a key that takes no secret and
    would use the text as written."""
    if value.startswith(("env:", "file:")):
        raise ConfigError(key, f"is {what}, written as it is (env: and file: are for secrets)")


def read_secret(value: Any, key: str = "", *, lines: bool = False) -> Secret:
    """A secret as written in config: ``"env:NAME"``, ``"file:PATH"`` or the value itself; one
    that cannot be had (unset, unreadable, empty) is *missing* (see ``Secret``). So is one read
    from a variable or a file that holds a line break, unless ``lines`` (a command's
    environment: a PEM key): two secrets in one file (``cat old new``) verified nothing."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, 'must be a non-empty string (a secret, "env:NAME" or "file:PATH")')
    if value == "env:":
        raise ConfigError(key, '"env:" names no variable: write "env:NAME"')
    if value == "file:":
        raise ConfigError(key, '"file:" names no file: write "file:PATH"')
    for prefix, what in (("env:", "NAME"), ("file:", "PATH")):
        if value[: len(prefix)].lower() == prefix and not value.startswith(prefix):
            # "ENV:NAME" would be taken as the secret itself, and no webhook would verify. The
            # value is not shown: as written it is a secret.
            raise ConfigError(
                key,
                f'reads no {"variable" if prefix == "env:" else "file"}: write "{prefix}{what}"'
                " in lower case (as written, it would be the secret itself)",
            )
    if value.startswith("env:") and not _variable_name(value[4:]):
        # A secret pasted after the prefix: every error naming the variable (the log, /stats,
        # the dashboard, check) showed it whole.
        raise ConfigError(
            key,
            "env: must name an environment variable; this one does not look like a name (not"
            " shown: it may be the secret itself)",
        )
    if value.startswith("file:") and _not_a_path(value[5:]):
        raise ConfigError(
            key,
            "file: must name a file; this one does not look like a path (not shown: it may be"
            " the secret itself)",
        )
    if value.startswith("env:"):
        read = os.environ.get(value[4:])  # None: not set
        flaw = "" if lines or read is None else _line_breaks(read, "variable")
        return Secret(read, origin=value, key=key, flaw=flaw)
    if value.startswith("file:"):
        # A file's whole text, less its trailing newline (Docker secrets, systemd credentials);
        # read at every load, so a reload (SIGHUP) takes a rotated one.
        try:
            text = read_small_text(Path(value[5:]), SECRET_FILE_BYTES)
        except (OSError, UnicodeDecodeError, ValueError, Unfit) as exc:  # ValueError: a NUL
            if isinstance(exc, OSError) and exc.strerror:
                reason = exc.strerror
            elif isinstance(exc, UnicodeDecodeError):
                reason = "not UTF-8"
            elif isinstance(exc, Unfit):
                reason = str(exc)
            else:
                reason = "not a file path"
            return Secret(None, origin=value, key=key, unreadable=reason)
        text = text.rstrip("\r\n")
        flaw = "" if lines else _line_breaks(text, "file")
        return Secret(text, origin=value, key=key, flaw=flaw)
    return Secret(value, key=key)


# How the secrets of providers and APIs begin (Stripe, OpenAI, Shopify, Slack, GitHub, GitLab,
# Mailgun, SendGrid, Standard Webhooks): after env: or file:, one was pasted in place of a name.
_SECRET_PREFIXES = (
    "whsec_",
    "sk-",
    "sk_",
    "rk_",
    "shpss_",
    "shpat_",
    "shpca_",
    "shppa_",
    "xoxb-",
    "xoxp-",
    "xapp-",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "glpat-",
    "key-",
    "SG.",
)
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _variable_name(name: str) -> bool:
    """Whether ``name``, after ``env:``, reads as the name of an environment variable (which an
    error may show), not as a secret: letters, digits and ``_``, 128 at most (names run long:
    ACME_STRIPE_WEBHOOK_SIGNING_SECRET_PRODUCTION), not beginning as a provider's secret does
    nor a run of 16 letters and digits (a hex key)."""
    return bool(_VARIABLE_NAME.fullmatch(name)) and not _reads_as_secret(name)


def _not_a_path(path: str) -> bool:
    """Whether ``path``, after ``file:``, is clearly a secret rather than a file's path: one
    beginning as a provider's secret does, or a run of letters and digits with no ``/``."""
    return path.startswith(_SECRET_PREFIXES) or ("/" not in path and _reads_as_secret(path))


def _reads_as_secret(text: str) -> bool:
    return text.startswith(_SECRET_PREFIXES) or (
        len(text) >= 16
        and text.isascii()
        and text.isalnum()
        and any(c.isdigit() for c in text)
        and any(c.isalpha() for c in text)
    )


def _line_breaks(value: str, where: str) -> str:
    """What is wrong with a secret read from a ``where`` (a file, a variable) that holds a line
    break, for ``Secret``'s error; "" when it holds none."""
    count = len(re.split(r"\r\n?|\n", value.rstrip("\r\n")))
    if count == 1:
        # A file's trailing newline is dropped as it is read; a variable's is kept.
        return "ends in a line break, which no secret does" if value.endswith(("\r", "\n")) else ""
    return (
        f"holds {count} lines: one secret per {where} (secrets = [...] takes two, each from"
        f" its own {where})"
    )


def resolve_secret(value: Any, key: str, *, lines: bool = False) -> Secret:
    """A secret from config: ``"env:NAME"`` is looked up in the environment (and must be set),
    ``"file:PATH"`` read from its file (which must be readable and not empty); ``lines``: as
    ``read_secret`` takes it."""
    secret = read_secret(value, key, lines=lines)
    secret.reveal()
    return secret


# The action options whose value may be a secret written ``env:``/``file:`` (an action keeps its
# options as written), and the tables whose every value may be one.
SECRET_OPTIONS = frozenset({"url", "forward", "proxy", "secret", "secrets", "api_key"})
SECRET_TABLES = frozenset({"headers", "env"})


def secret_options(table: Mapping[str, Any], key: str) -> Iterator[tuple[str, Any]]:
    """The options of one action's table that take a secret, with their dotted keys (at module
    level: a nested generator calling itself is a cycle, garbage the daemon seldom frees)."""
    for name, value in table.items():
        path = f"{key}.{name}"
        if name in SECRET_OPTIONS:
            if isinstance(value, list) and name == "secrets":  # elsewhere: the wrong type
                yield from ((f"{path}[{i}]", item) for i, item in enumerate(value))
            else:
                yield path, value
        elif name in SECRET_TABLES and isinstance(value, Mapping):
            yield from ((f"{path}.{k}", item) for k, item in value.items())
        elif isinstance(value, Mapping):  # then = { forward = ..., headers = ... }
            yield from secret_options(value, path)


def read_digest(options: Mapping[str, Any]) -> str:
    """A digest of the values an action's ``env:`` and ``file:`` options hold now, read as its
    kind reads them: what a reload compares to tell which actions' secrets changed, never
    showing them. One that cannot be read adds its error; the action's build reports it."""
    digest = hashlib.sha256()
    for where, value in secret_options(options, ""):
        if isinstance(value, str) and value.startswith(("env:", "file:")):
            try:
                secret = read_secret(value, where, lines=True)
                read = "" if secret.missing else secret.reveal()
            except ConfigError as exc:
                read = f"\0{exc}"
            digest.update(f"{where}\0{read}\0".encode())
    return digest.hexdigest()


# An openai action's api_key when none is written: the openai package's own variable.
DEFAULT_OPENAI_API_KEY = "env:OPENAI_API_KEY"


def text_or_secret(value: str, key: str, *, lines: bool = False) -> str:
    """An option's text, or, written ``"env:NAME"`` or ``"file:PATH"``, the secret it names
    (which must be there, as ``resolve_secret`` says): a header's credential or a URL that is
    one stays out of the config file. Its value is masked wherever shown (``secret_values``)."""
    if value.startswith(("env:", "file:")):
        return resolve_secret(value, key, lines=lines).reveal()
    return value
