"""The ``python`` action: call the user's ``"package.module:function"`` with the event.

The handler is imported when the config is loaded (``webhookd check`` included; a reload's as
the action is made, on the event loop's thread, as at a start), from the directories on
``sys.path`` and then ``path`` (default: the current directory), which is searched last so that
its files never stand in for the standard library's or an installed package's; a missing module
or function is a ``ConfigError`` naming ``….handler``. It receives the ``Event`` (``.id``,
``.source``, ``.headers``, ``.header(name)``, ``.body``, ``.json()``, ``.form()``, ``.tenant``,
``.query``: the URL's query as received, ``""`` when it had none).
An ``async def`` handler is awaited; a plain function runs in a thread so it cannot stall the
daemon (hazard: a thread cannot be stopped, so a sync handler that overruns ``timeout_s`` is
abandoned, not killed, and keeps running in the background, holding its thread; while such
calls hold every thread the action may use, its jobs wait, no attempt used, rather than time
out before they run, and the job's own retry waits for the call and takes what it returned).
The threads are the action's own,
started as needed up to the workers' concurrency and kept: handing a call to one that waits
costs a fraction of ``asyncio.to_thread``, which matters when the handler itself is quick.

Outcomes: a return value is the job's result (what JSON cannot hold is stored as its ``str()``);
``webhookd.Retry(after_s=…)`` asks for another attempt, ``webhookd.Reject(reason)`` sends the job
to the dead-letter queue, and any other exception is retried with its message and the tail of
its traceback recorded. So is a ``BaseException`` such as ``SystemExit`` or
``KeyboardInterrupt``: a handler cannot stop the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import reprlib
import stat
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from webhookd.actions.base import (
    HANDLER_IMPORTS_DEFERRED,
    MOST_RESULT_CHARS,
    Outcome,
    Resources,
    keep_note,
    masker_of,
    options,
)
from webhookd.config.sections import ActionConfig, ActionDefaults
from webhookd.errors import ActionError, ConfigError
from webhookd.models import Event, Job
from webhookd.redact import Masker
from webhookd.threads import CallThreads, ThreadCall

log = logging.getLogger("webhookd.actions.python")

DEFAULTS = ActionDefaults(timeout_s=300.0)  # a handler may do real work: a report, a sync
_OPTIONS = ("handler", "path")
_TRACEBACK_CHARS = 2000
# How long a job waits (no attempt used) when every handler thread runs an abandoned call,
# or its own call cut off at timeout_s still runs.
_HELD_BACK_WAIT_S = 30.0
# Calls cut off at timeout_s that have since returned, kept for their job's next attempt: the
# oldest are let go past this many (those still running are bounded by the threads).
_RAN_ON_KEPT = 64

Handler = Callable[[Event], Any]


def resolve_handler(config: ActionConfig) -> Handler:
    """Import the configured handler (raises ``ConfigError`` naming ``….handler``)."""
    t = options(config, _OPTIONS)
    key = t.path("handler")
    spec = t.raw("handler", None)
    if not isinstance(spec, str):
        raise ConfigError(key, 'is required: "package.module:function"')
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, f'{spec!r} must look like "package.module:function"')
    if "/" in module_name or "\\" in module_name:  # a file's path written for a module
        raise ConfigError(key, f"{spec!r}: {_DOTTED}")
    path = t.raw("path", ".")  # the current directory
    if not isinstance(path, str) or not path:
        raise ConfigError(t.path("path"), "must be a directory path")
    directory = os.path.abspath(path)
    _refuse_if_others_may_write(t.path("path"), directory)
    # At the end of the import path: in front, it held up the daemon's own imports too, and a
    # secrets.py or csv.py of the operator's was what the daemon and the packages it imports
    # after the handlers got for the standard library's (a KeyError from one ended serve). The
    # handler's module stays the folder's: one of a name taken before it is refused below.
    if directory not in sys.path:
        sys.path.append(directory)
    loaded_before = module_name in sys.modules  # by another action, or a load before a reload
    parts = module_name.split(".")
    try:
        # Each of the dotted name's modules and packages is found (its parent imported, not
        # itself) and looked at before it runs: code another user may change would run as ours.
        for depth in range(1, len(parts) + 1):
            found = importlib.util.find_spec(".".join(parts[:depth]))
            if found is None:
                break  # the import below says so
            _refuse_writable_spec(key, found)
        module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name not in {".".join(parts[:depth]) for depth in range(1, len(parts) + 1)}:
            # Found, but what it imports is not (a dependency not installed): said as below.
            raise ConfigError(key, _import_failed(module_name, exc)) from exc
        if not os.path.isdir(directory):
            raise ConfigError(
                key, f"cannot import {module_name!r}: {exc} (path: {directory} is not a directory)"
            ) from exc
        if module_name.endswith(".py"):
            raise ConfigError(key, f"cannot import {module_name!r}: {exc}; {_DOTTED}") from exc
        raise ConfigError(key, f"cannot import {module_name!r}: {exc}") from exc
    except BaseException as exc:  # the user's module failed while importing
        if isinstance(exc, asyncio.CancelledError):
            raise
        # SystemExit too (a module that calls sys.exit() when a variable is missing, or parses
        # its arguments at import): left to propagate, a reload's import would end the daemon.
        raise ConfigError(key, _import_failed(module_name, exc)) from exc
    if t.has("path"):
        _refuse_another_module(key, parts[0], directory)
    target: Any = module
    for name in attr.split("."):
        target = getattr(target, name, None)
        if target is None:
            # A module is imported once per process: one edited since is not read again.
            again = " (as imported before: a changed file takes a restart)" if loaded_before else ""
            raise ConfigError(key, f"module {module_name!r} has no {attr!r}{again}")
    if not callable(target):
        raise ConfigError(key, f"{spec!r} is not callable")
    if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
        # Called, it hands back a generator and runs none of its body: every job would be
        # done, its result "<generator object ...>", with nothing done.
        raise ConfigError(
            key,
            f"{spec!r} is a generator function (it has a yield): a call runs none of its body;"
            " return the result instead",
        )
    handler: Handler = target
    return handler


_DOTTED = (
    'write "package.module:function", the module by its dotted name, not by its file (the'
    " folder that holds it goes in path)"
)


def _import_failed(module_name: str, exc: BaseException) -> str:
    """What ``check`` and the start say of a handler's module that failed while importing:
    the error, and where in the code it was raised (the last frame of the traceback outside
    the import machinery), without which a ``NameError`` in a long module names no line."""
    said = f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")
    ]
    if frames and not isinstance(exc, SyntaxError):  # a SyntaxError's own text says where
        said += f" ({frames[-1].filename}, line {frames[-1].lineno})"
    return said


def _refuse_another_module(key: str, name: str, directory: str) -> None:
    """``ConfigError`` when the module ``name`` in ``directory`` (the action's ``path``) is not
    the one imported under that name: another action's of the same name imported first, from
    its own ``path``, or one found before the folder on the import path, the standard
    library's or an installed package's (a ``queue.py`` or ``csv.py`` of one's own). Python
    keeps one module per name, so the handler would be the other module's."""
    mine = importlib.machinery.PathFinder.find_spec(name, [directory])
    loaded = sys.modules.get(name)
    spec = getattr(loaded, "__spec__", None)
    if mine is None or spec is None or mine.origin == spec.origin:
        return
    raise ConfigError(
        key,
        f"module {name!r} is already {spec.origin or 'imported'}, not the one in {directory}"
        " (Python keeps one module per name: give this one a name of its own)",
    )


def _refuse_writable_spec(key: str, spec: importlib.machinery.ModuleSpec) -> None:
    """``_refuse_if_others_may_write`` for a found module: its file, its bytecode cache, the
    folders holding them, and a package's (or a namespace package's) folders."""
    files = [f for f in (spec.origin, spec.cached) if f is not None and os.path.isabs(f)]
    for file in files:
        _refuse_if_others_may_write(key, file)
    for folder in {*map(os.path.dirname, files), *(spec.submodule_search_locations or ())}:
        _refuse_if_others_may_write(key, folder)


def _refuse_if_others_may_write(key: str, path: str) -> None:
    """A handler's folder or file that other users may change would let them run their code as
    the daemon's user (as root, under sudo): a config error instead. That is: one every user
    may write (``/tmp``, a ``chmod 777`` folder, the default ``path`` when the current
    directory is one of those); or one inside a folder every user may write, which they could
    rename and put their own in its place, unless that folder is sticky (as ``/tmp`` is) and
    what is in it is owned by root or by us. A file or folder not there yet is looked at when
    the config is next read. Its owner is not otherwise asked: a deploy user's files are
    theirs to change."""
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        mode = None
    if mode is not None and mode & stat.S_IWOTH:
        raise ConfigError(
            key,
            f"{real} is writable by every user (mode {stat.S_IMODE(mode):04o}): any of them"
            f" could put code there for webhookd to import; {_USE}",
        )
    child, parent = real, os.path.dirname(real)
    while parent != child:
        try:
            info = os.stat(parent)
        except OSError:
            info = None
        if info is not None and info.st_mode & stat.S_IWOTH:
            if not info.st_mode & stat.S_ISVTX:
                raise ConfigError(
                    key,
                    f"{parent}, which holds {real}, is writable by every user (mode"
                    f" {stat.S_IMODE(info.st_mode):04o}) and not sticky: any of them could put"
                    f" their own in its place; {_USE}",
                )
            try:
                owner = os.stat(child).st_uid
            except OSError:  # not there yet: nothing to hijack now
                owner = 0
            if owner not in (0, os.geteuid()):
                raise ConfigError(
                    key,
                    f"{child} is owned by another user (uid {owner}) in {parent}, which every"
                    f" user may write: they could change what webhookd imports; {_USE}",
                )
        child, parent = parent, os.path.dirname(parent)


_USE = "use folders and modules only their owner can write"


def stdlib_names_in_folder(config: ActionConfig) -> list[str]:
    """What ``check`` and the daemon's start warn of, one line each: a module or package in the
    handler's folder named as a standard library module. The folder is searched after the
    standard library, so that file is not what ``import`` gets, in the handler either; one the
    operator meant to use would be silently the standard library's."""
    path = config.options.get("path", ".")
    if not isinstance(path, str) or not path:
        return []  # a config error, said by validate
    directory = os.path.abspath(path)
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []  # not there (yet): nothing in it can be imported
    said = []
    for entry in entries:
        file = os.path.join(directory, entry)
        if entry.endswith(".py") and os.path.isfile(file):
            name = entry.removesuffix(".py")
        elif os.path.isfile(os.path.join(file, "__init__.py")):
            name = entry
        else:
            continue
        if name in sys.stdlib_module_names:
            said.append(
                f"{config.key}.path: {file} is named as the standard library's {name}:"
                f" `import {name}` gets the standard library's, not this file, in the handler too"
            )
    return said


def validate(config: ActionConfig) -> None:
    spec = config.options.get("handler")
    module_name = spec.partition(":")[0] if isinstance(spec, str) else ""
    if module_name and module_name not in sys.modules and HANDLER_IMPORTS_DEFERRED.get():
        return  # checked and imported by ``create``, on the event loop's thread
    resolve_handler(config)


class PythonAction:
    def __init__(
        self,
        config: ActionConfig,
        max_threads: int = 32,
        masker: Callable[[], Masker] = Masker,
    ) -> None:
        self.config = config
        self.masker = masker
        self.handler = resolve_handler(config)
        self.is_async = inspect.iscoroutinefunction(self.handler)
        self._threads = CallThreads(
            config.concurrency or max_threads, f"webhookd-python-{config.name}", self._overran
        )
        # A sync call cut off at timeout_s runs on in its thread: by job id, until that job's
        # next attempt here takes what it returned (``_ran_on_outcome``).
        self._ran_on: dict[str, ThreadCall] = {}

    async def run(self, event: Event, job: Job) -> Outcome:
        if not self.is_async and (late := self._ran_on_outcome(job)) is not None:
            return late
        try:
            if self.is_async:
                value = await self.handler(event)
            elif held := self._threads.held_back():
                # Every thread this action may use is busy, and some run calls that overran
                # timeout_s: this one would only wait for a thread, and its attempt would end
                # before it ran.
                overran, threads = held
                if overran == threads:
                    why = f"all {threads} handler thread(s) still run calls that overran timeout_s"
                else:
                    why = (
                        f"all {threads} handler threads are busy, {overran} of them still running"
                        " a call that overran timeout_s"
                    )
                return Outcome.wait(why, min(self.config.timeout_s, _HELD_BACK_WAIT_S))
            else:
                call = self._threads.call(self.handler, event)
                try:
                    value = await call.future
                except asyncio.CancelledError as exc:
                    if call.running:  # the worker's timeout error says so (docs/actions.md#python)
                        keep_note(exc, _RUNS_ON)
                    if call.running or call.ended:
                        self._keep_ran_on(job.id, call)
                    raise
            if inspect.isawaitable(value):  # a sync callable that hands back a coroutine
                value = await value
        except ActionError:
            raise  # Retry and Reject: the worker turns them into outcomes
        except Exception as exc:
            tb = self._traceback(exc)
            return Outcome.retry(f"{type(exc).__name__}: {_text_of(exc)}", traceback=tb)
        except BaseException as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise  # a real cancellation (timeout, drain), not something the handler raised
            # SystemExit, KeyboardInterrupt …: left to propagate, they would stop the event loop
            # from inside a job. They are this attempt's failure, retried like any exception.
            tb = self._traceback(exc)
            said = _text_of(exc)
            return Outcome.retry(
                f"handler raised {type(exc).__name__}{f': {said}' if said else ''}", traceback=tb
            )
        return Outcome.done(_json_safe(value))

    def _traceback(self, exc: BaseException) -> str:
        """The traceback's last ``_TRACEBACK_CHARS``, masked before the cut: a secret the
        cut falls inside (an API's error quoting the key) shows as ``***``, not as its end."""
        text = "".join(traceback.format_exception(exc))
        return self.masker().after(text, max(len(text) - _TRACEBACK_CHARS, 0))

    def _ran_on_outcome(self, job: Job) -> Outcome | None:
        """For a job whose last call here was cut off at timeout_s and ran on: wait (no
        attempt used) while it still runs, and once it has returned, what it returned is this
        attempt's result, the handler not called again. ``None`` (call the handler) when there
        is no such call, or it raised.

        A retry beside the call it retries did the work twice, and ended before it: the key's
        next ``ordered_by`` jobs then ran while it still did (a trial saw 20 handled out of
        order, 54 handled two or three times)."""
        call = self._ran_on.get(job.id)
        if call is None:
            return None
        if not call.ended:
            return Outcome.wait(
                f"its previous call, cut off at timeout_s ({self.config.timeout_s:g}s), still"
                " runs in its thread: this attempt takes what it returns",
                min(self.config.timeout_s, _HELD_BACK_WAIT_S),
            )
        del self._ran_on[job.id]
        value, call.result = call.result, None
        if call.error is not None:
            return None  # its failure is the attempt recorded at the cut: a retry calls again
        if inspect.iscoroutine(value):
            value.close()  # a sync callable that handed back a coroutine: nothing awaited it
            return None
        return Outcome.done(_json_safe(value), ran_on=True)

    def _keep_ran_on(self, job_id: str, call: ThreadCall) -> None:
        self._ran_on[job_id] = call
        over = len(self._ran_on) - _RAN_ON_KEPT
        if over > 0:
            for gone in [j for j, c in self._ran_on.items() if c.ended][:over]:
                del self._ran_on[gone]

    def _overran(self, event: Event, ran_s: float) -> None:
        """From its thread: a call whose attempt was cut off while it ran has returned."""
        log.warning(
            "event=%s source=%s action=%s: a handler call that ran on after its attempt was"
            " cut off (timeout_s %gs) returned after %.1fs, freeing its thread",
            event.id,
            event.source,
            self.config.name,
            self.config.timeout_s,
            ran_s,
        )

    async def aclose(self) -> None:
        self._threads.close()


_RUNS_ON = "the handler's call runs on in its thread (Python cannot stop one) until it returns"


def _cut(text: str) -> str:
    """``text``, or past ``MOST_RESULT_CHARS`` its start saying how long it was: a handler
    returning megabytes would otherwise grow the journal and every read of its event by as
    much."""
    if len(text) <= MOST_RESULT_CHARS:
        return text
    return f"{text[:MOST_RESULT_CHARS]} … (cut: {len(text):,} characters in all)"


def _json_safe(value: Any) -> Any:
    """The handler's return value as JSON can hold it: a value JSON has no form for (a date, a
    set) as its ``str()``; an int past the 4,300 digits Python reads by default as a short
    form giving its size (``_shorten_ints``); and the whole value as its ``str()`` when it
    cannot be JSON at all (keys that are not strings or numbers, NaN or an infinity, a cycle).
    Never an error: the handler's work is done, and failing here would run it again; what even
    ``str()`` cannot write (nesting past the recursion limit) is kept as ``reprlib``'s short
    form, or failing that, as what it is. Past ``MOST_RESULT_CHARS`` of JSON, the start of it,
    as text (``_cut``)."""
    if value is None or type(value) is bool:  # already JSON (most handlers)
        return value
    if type(value) is str:
        return _cut(value)
    try:
        text: str | None = json.dumps(value, default=_text_of, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        text = None
    # Only JSON with a run of that many digits can hold an int too long to read; none at all
    # (an int past the limit fails, unless a handler lifted the limit for the whole process)
    # may too. Not a walk of every result longer than the limit: the scan is one regex.
    if text is None or _LONG_DIGITS.search(text):
        shorter = _shorten_ints(value)
        if shorter is not value:
            return _json_safe(shorter)
    if text is not None:
        if len(text) > MOST_RESULT_CHARS:
            return _cut(text)
        with contextlib.suppress(ValueError, RecursionError):
            return json.loads(text)
    try:
        return _cut(str(value))
    except Exception:  # a value whose str() raises: written as below
        pass
    try:
        return reprlib.repr(value)
    except Exception as exc:  # an int past the limit, nested too deep, a str() that raises
        return f"<{type(value).__name__} that cannot be written as text: {_text_of(exc)}>"


def _text_of(value: Any) -> str:
    """``str(value)``, or when that raises, a note naming the value's type and the error: an
    object whose ``str()`` fails (an ORM object read after its session closed) in what a
    handler returned or raised failed the attempt that had done the work, which its retry then
    did again."""
    try:
        return str(value)
    except RecursionError:
        raise  # nested too deep: _json_safe's short form
    except Exception as exc:  # any error of the value's own __str__
        return f"<{type(value).__name__} whose str() raised {type(exc).__name__}>"


# The digits of an int that Python reads and writes as text by default. A handler may lift the
# limit (``sys.set_int_max_str_digits(0)``) for the whole daemon, but a result is read again by
# a restarted daemon, ``show`` and the API, under this one: its short form goes by its size.
_INT_DIGITS = sys.int_info.default_max_str_digits
_TOO_LONG = 10**_INT_DIGITS
_LONG_DIGITS = re.compile(f"[0-9]{{{_INT_DIGITS + 1}}}")


def _shorten_ints(value: Any) -> Any:
    """``value`` with each int in it past ``_INT_DIGITS`` (in its lists, tuples, sets and
    mappings, keys too) as a short form saying how long it is; ``value`` itself when it holds
    none, or when it is nested too deep to look through."""
    try:
        return _shorter(value)
    except RecursionError:
        return value


def _shorter(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) < _TOO_LONG:
            return value
        digits = int(value.bit_length() * math.log10(2)) + 1  # one too many at most
        if abs(value) < 10 ** (digits - 1):
            digits -= 1
        return f"<int of {digits:,} digits, past the {_INT_DIGITS:,} Python reads by default>"
    if isinstance(value, Mapping):
        pairs = [(_shorter(k), _shorter(v)) for k, v in value.items()]
        if all(k is k2 and v is v2 for (k, v), (k2, v2) in zip(value.items(), pairs, strict=True)):
            return value
        return dict(pairs)
    if isinstance(value, list | tuple | set | frozenset):
        items = [_shorter(v) for v in value]
        if all(v is v2 for v, v2 in zip(value, items, strict=True)):
            return value
        for kind in (list, tuple, set, frozenset):  # a tuple or a frozenset may be a key
            if isinstance(value, kind):
                return kind(items)
    return value


def create(config: ActionConfig, resources: Resources) -> PythonAction:
    return PythonAction(config, resources.config.workers.concurrency, masker_of(resources))
