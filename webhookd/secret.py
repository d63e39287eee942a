"""``Secret``: a configured credential that never shows itself in ``repr``, ``str`` or logs.

Its own module, below both ``config`` (which reads secrets) and ``schemes`` (which use them), so
that ``config`` can ask the signature schemes to validate their options without an import cycle.
"""

from __future__ import annotations

import os

from webhookd.errors import ConfigError, UnsetVariable


class Secret:
    """A secret value that never shows itself in ``repr``, ``str`` or logs.

    An ``env:`` secret whose variable is not set, or set but empty, and a ``file:`` secret
    whose file cannot be read or is empty, are *missing*: a command that only reads the journal
    can still load the config; ``reveal()`` raises the ``ConfigError`` naming its key and
    saying why (``unreadable``: the reason a file could not be read). So is one whose value
    was read but cannot be a secret (``flaw``: what is wrong with it, as "holds 2 lines").
    """

    __slots__ = ("_flaw", "_key", "_origin", "_unreadable", "_value")

    def __init__(
        self,
        value: str | None,
        origin: str = "inline",
        key: str = "",
        unreadable: str = "",
        flaw: str = "",
    ) -> None:
        self._value = None if flaw else value
        self._origin = origin
        self._key = key
        self._unreadable = unreadable
        self._flaw = flaw

    @property
    def missing(self) -> bool:
        return not self._value

    @property
    def key(self) -> str:
        """The dotted config key the secret was read from (for errors about its value)."""
        return self._key

    @property
    def variable(self) -> str | None:
        """The environment variable an ``env:`` secret is read from (None for an inline one):
        what a message may name instead of the value."""
        return self._origin[4:] if self._origin.startswith("env:") else None

    @property
    def reference(self) -> str | None:
        """``env:NAME`` or ``file:PATH`` as written (None for an inline value): what a message
        may name instead of the value."""
        return None if self._origin == "inline" else self._origin

    def reveal(self) -> str:
        if not self._value:
            if self._origin.startswith("file:"):
                state = f"cannot be read: {self._unreadable}" if self._value is None else "is empty"
                raise ConfigError(self._key, f"{_file(self._origin[5:])} {self._flaw or state}")
            where = f"environment variable {self.variable}"
            if self._flaw:
                raise ConfigError(self._key, f"{where} {self._flaw}")
            state = "is not set" if self._value is None else "is empty"
            raise UnsetVariable(self._key, f"{where} {state}")
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self._origin}, ***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _file(path: str) -> str:
    """How an error names a ``file:`` secret's file: by its path when it reads as one (from
    ``/``, ``./``, ``../`` or ``~/``, no white space, and there, or in a folder that is there
    other than ``/``: a typo in a file's name is shown), else not at all: a secret pasted after
    ``file:`` (base64 holds ``/``, ``+`` and ``=``, and begins with ``/`` one time in 64)
    showed whole in the log, ``/stats`` and ``check``."""
    if not path.startswith(("/", "./", "../", "~/")) or any(c.isspace() for c in path):
        return "file: (not shown: it does not begin with / or ./, and may be the secret itself)"
    real = os.path.expanduser(path)
    folder = os.path.dirname(real)
    if os.path.lexists(real) or (os.path.isdir(folder) and os.path.realpath(folder).strip("/")):
        return f"file {path}"
    return (
        "file: (not shown: neither it nor its folder, other than /, is there; it may be the"
        " secret itself)"
    )
