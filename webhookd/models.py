"""The core shapes: ids, job states, priorities, and frozen Event / Job / Attempt records."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from webhookd import forms

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every 10-bit value as its two base32 characters: an id is 13 lookups.
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)


class _IdFactory:
    """ULID-style ids: 48-bit milliseconds + 80 random bits, base32, monotonic per process.

    Sortable by creation time as plain strings, unique without coordination, never reused.
    The random part is for uniqueness, not secrecy (ids are not credentials), so it comes from a
    PRNG seeded by the OS once, not a system call per id.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._last_rand = 0
        self._random = random.Random(os.urandom(32))
        # The time part's 10 characters, made once per millisecond rather than once per id.
        self._prefix_ms = -1
        self._prefix = ""

    def new(self) -> str:
        with self._lock:
            ms = int(time.time() * 1000)
            if ms <= self._last_ms:
                # Same (or earlier: clock stepped back) millisecond: keep order by incrementing.
                ms = self._last_ms
                rand = self._last_rand + 1
            else:
                rand = self._random.getrandbits(80)
            self._last_ms, self._last_rand = ms, rand
            if ms != self._prefix_ms:
                self._prefix = _encode(ms, 5)
                self._prefix_ms = ms
            prefix = self._prefix
        # 26 characters of 5 bits: the 128-bit value with two leading zero bits, i.e. the 48-bit
        # time in 10 characters and the 80 random bits in 16 (80 is a multiple of 5).
        r = rand & _RAND_MASK
        p = _PAIRS
        return "".join(
            (
                prefix,
                p[r >> 70],
                p[(r >> 60) & 1023],
                p[(r >> 50) & 1023],
                p[(r >> 40) & 1023],
                p[(r >> 30) & 1023],
                p[(r >> 20) & 1023],
                p[(r >> 10) & 1023],
                p[r & 1023],
            )
        )


_RAND_MASK = (1 << 80) - 1


def _encode(value: int, pairs: int) -> str:
    """``value`` in ``2 * pairs`` Crockford base32 characters, most significant first."""
    return "".join([_PAIRS[(value >> (10 * n)) & 1023] for n in range(pairs - 1, -1, -1)])


_ids = _IdFactory()


def new_event_id() -> str:
    return "evt_" + _ids.new()


# What new_event_id makes: a cursor or a link of any other shape names no event there ever was.
EVENT_ID = re.compile(f"evt_[{_CROCKFORD}]{{26}}")


def event_id_time(event_id: str) -> float | None:
    """When the event ``event_id`` names was received (its id begins with the time, in ms), if
    it has an event id's shape."""
    if not EVENT_ID.fullmatch(event_id):
        return None
    ms = 0
    for c in event_id[4:14]:
        ms = ms * 32 + _CROCKFORD.index(c)
    return ms / 1000


def new_job_id() -> str:
    return "job_" + _ids.new()


def new_boot_id() -> str:
    return "boot_" + _ids.new()


_C = TypeVar("_C")


def quick_init(cls: type[_C]) -> type[_C]:
    """Give a frozen, slotted dataclass an ``__init__`` that fills each slot through its own
    descriptor: the generated one calls ``object.__setattr__`` per field, which made building
    an event (9 fields) cost ~5x a plain class's. Same signature, defaults and default
    factories (called per instance, as the generated ``__init__`` does); the instances stay
    frozen (``__setattr__`` still refuses). Only for classes without ``__post_init__``,
    keyword-only fields or fields left out of ``__init__``: it refuses the others rather than
    skip them.
    """
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if hasattr(cls, "__post_init__") or any(not f.init or f.kw_only for f in fields):
        raise TypeError(f"quick_init cannot build {cls.__name__}.__init__")
    namespace: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    params = []
    lines = []
    for f in fields:
        namespace[f"_set_{f.name}"] = getattr(cls, f.name).__set__
        value = f.name
        if f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            value = f"_factory_{f.name}() if {f.name} is _MISSING else {f.name}"
        elif f.default is dataclasses.MISSING:
            params.append(f.name)
        else:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        lines.append(f"    _set_{f.name}(self, {value})")
    lines = lines or ["    pass"]
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(lines), namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"
    CANCELLED = "cancelled"


class Priority(enum.IntEnum):
    """Lower value is served first; the names are what users write."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, name: str) -> Priority:
        return cls[name.upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


def storable_text(text: str) -> str:
    """``text`` as a journal or a log stream can hold it: a lone surrogate (an undecodable byte
    kept by ``surrogateescape``, in a handler's exception or a failed value) written as its
    escape, and so is a NUL. SQLite and PostgreSQL refuse a surrogate, no log stream can encode
    one, and PostgreSQL's text holds no NUL (a handler's error with one failed its outcome's
    write at every try, the job running for good)."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def sha256_key(data: bytes) -> str:
    """``sha256:`` and the hex SHA-256 of ``data`` (what ``sha256sum`` prints): how the journal
    keeps a body's hash as a dedup key, and a credential's in place of the credential."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def query_body_key(query: str, body: bytes) -> str:
    """The dedup key of a body sent with a query (``/hooks/shop?store=eu``): ``query+body:sha256:``
    and the hex SHA-256 of the query, a line feed and the body. A request line holds no line
    feed, so two different (query, body) pairs never hash the same bytes; the label keeps these
    keys apart from a body's own hash (``sha256_key``), which a request without a query keeps."""
    return "query+body:" + sha256_key(query.encode() + b"\n" + body)


# A dedup key, tenant or order key a sender makes longer than this is kept as its digest (equal
# values still match, and ``tenant_forms`` finds it as sent): PostgreSQL indexes these values
# and refuses an index entry over a few KB, and that refusal failed the whole group commit, so
# one webhook with a 10 KB ``id`` got every webhook committed beside it a 503. Nor does a tenant
# of 500 KB belong in every ``/stats`` the dashboard polls.
MOST_KEY_CHARS = 256


def signed_key(stamp: Any, body: bytes) -> str:
    """The second dedup key of a body signed with a timestamp (``stamp``, as the scheme read
    it) by a provider that sends no delivery id: the hash of what was signed."""
    return sha256_key(b"signed %r\n%b" % (stamp, body))


def kept_long(value: str) -> str:
    """A dedup key, tenant or order key as the journal keeps it: past ``MOST_KEY_CHARS``, its
    digest (``kept_digest``)."""
    return kept_digest(value) if len(value) > MOST_KEY_CHARS else value


def kept_digest(value: str) -> str:
    """What the journal keeps of a value read from a credential header (a tenant, a dedup or an
    order key): its digest, so that equal values still match and the credential is nowhere."""
    return sha256_key(value.encode("utf-8", "surrogatepass"))


def tenant_forms(tenant: str) -> tuple[str, str]:
    """The values a journal may hold for a tenant as sent: itself, or its digest when the
    source reads its tenant from a credential header. A filter matches either."""
    return tenant, kept_digest(tenant)


def key_forms(dedup_key: str) -> tuple[str, ...]:
    """The values a journal may hold for a dedup key as sent (``source:delivery-id``): itself,
    or with its delivery id as its digest, which the receiver keeps of one over
    ``MOST_KEY_CHARS`` or read from a credential header. A look-up tries both."""
    source, colon, value = dedup_key.partition(":")
    return (dedup_key, f"{source}:{kept_digest(value)}") if colon else (dedup_key,)


def event_state(job_states: list[str]) -> str:
    """An event's state from its jobs': dead if any is dead, else running if any is running,
    else queued if any is queued; cancelled if all are; otherwise (or with no jobs) done."""
    if not job_states:
        return JobState.DONE
    if JobState.DEAD in job_states:
        return JobState.DEAD
    if JobState.RUNNING in job_states:
        return JobState.RUNNING
    if JobState.QUEUED in job_states:
        return JobState.QUEUED
    if all(s == JobState.CANCELLED for s in job_states):
        return JobState.CANCELLED
    return JobState.DONE


@quick_init
@dataclass(frozen=True, slots=True)
class Event:
    """An accepted webhook as journaled: the raw body, the headers as received but for
    credential headers, whose values are stored as ``***`` (see ``redact``), and the URL's
    query as received (still percent-encoded, without the ``?``; ``""`` when there was none)."""

    id: str
    source: str
    received_at: float
    dedup_key: str
    tenant: str
    priority: Priority
    headers: tuple[tuple[str, str], ...]
    body: bytes
    verified: Mapping[str, Any] | None = None
    query: str = ""

    def header(self, name: str, default: str | None = None) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return default

    @property
    def content_type(self) -> str:
        return self.header("Content-Type") or "application/octet-stream"

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` if it is not JSON)."""
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        """The form's fields: a ``multipart/form-data`` body's (uploaded files left out), else
        the body read as ``application/x-www-form-urlencoded`` (last value wins). A body sent
        as JSON raises ``ValueError``, as ``json()`` does on one that is not: read as a form,
        ``{"a": 1}`` would be one field named after the whole body. So does a form of more
        than ``forms.MOST_FIELDS`` fields or parts (``forms.TooManyFields``), as many as the
        receiver reads: read whole, a megabyte of tiny parts took 320 ms, on the event loop
        in an async handler."""
        if forms.is_json(self.content_type):
            raise ValueError(f"the body is JSON ({self.content_type}), not a form: use .json()")
        return forms.fields(self.content_type, self.body, forms.MOST_FIELDS)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try of a job: when, how it ended, and what the action reported."""

    n: int
    started_at: float
    finished_at: float | None
    outcome: str  # "done" | "retry" | "dead" | "interrupted" | "running"
    error: str | None
    detail: Mapping[str, Any] | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class Job:
    """One action of one event, with its own state, attempts and result."""

    id: str
    event_id: str
    action: str
    type: str
    state: JobState
    attempts: int
    max_attempts: int
    run_at: float
    recoveries: int = 0
    result: Any = None
    last_error: str | None = None
    # Running, and cancelled meanwhile: cancelled, not queued again, once its attempt ends.
    cancel_requested: bool = False
    # When it became done, dead or cancelled (None while queued or running).
    finished_at: float | None = None
    history: tuple[Attempt, ...] = field(default=())
    # Queued behind a job of its order key (``ordered_by``): that job's id, else None.
    waiting_for: str | None = None
    # Cancelled by dismissing it as a dead letter (``cancel --dead``): when; else None.
    dismissed_at: float | None = None


@dataclass(frozen=True, slots=True)
class LaneSpec:
    """A lane's limits as a shared bucket needs them: every node passes its own config's."""

    name: str
    rpm: int | None
    tpm: int | None
    burst_s: float
    log_s: float  # how long a grant counts against the per-minute limit
    probe_after_s: float | None  # an open circuit lets one call through this often


@dataclass(frozen=True, slots=True)
class LaneGrant:
    """What one round trip to a shared lane bucket gave a node (see ``BaseJournal.reserve_lane``).

    ``at`` names the grant in the shared log: settlements and give-backs refer to it.
    """

    at: float
    requests: float
    tokens: float
    retry_s: float  # nothing granted: when the need may fit (0 when something was granted)
    cooling_s: float  # the lane's shared cool-down left
    circuit: str | None  # why the lane's circuit is open, if it is
    probe_in_s: float  # an open circuit: seconds until a node may probe (0: this grant is it)


# What an attempt that made a call through a lane keeps in its detail (the ``openai`` action),
# so that the next process's lane counts the call (``BaseJournal.lane_calls``): the seconds
# from the attempt's start to the lane letting the call go, and the tokens the lane counts for
# it (the reported usage once answered, 0 after a 429, else the reservation).
LANE_CALL_S = "lane_call_s"
LANE_TOKENS = "lane_tokens"
