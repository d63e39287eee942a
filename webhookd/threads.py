"""Threads of webhookd's own for blocking calls: a sync python handler's, a forward's host name
lookups. Not the loop's default executor, which other calls share."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class ThreadCall:
    """One call handed to the threads, and where it is (under ``CallThreads._cond``)."""

    __slots__ = (
        "abandoned",
        "arg",
        "context",
        "ended",
        "error",
        "fn",
        "future",
        "loop",
        "result",
        "running",
    )

    def __init__(self, loop: Any, future: Any, context: Any, fn: Any, arg: Any) -> None:
        self.loop, self.future, self.context, self.fn, self.arg = loop, future, context, fn, arg
        self.running = False  # a thread has taken it
        self.abandoned = False  # and its attempt ended (timed out, drained) before it returned
        # Once it has returned (set by its thread): what it returned or raised. An abandoned
        # call's answer has no future to go to; its caller may still want it.
        self.ended = False
        self.result: Any = None
        self.error: BaseException | None = None


class CallThreads:
    """Daemon threads that run blocking calls (a sync handler's, a host name lookup), started
    on demand up to ``max_threads``.

    A call is a deque entry and, when a thread waits, one wake-up; the result is set on the
    loop's future from the thread with ``call_soon_threadsafe`` (no ``concurrent.futures``
    future in between). Daemon threads: a call stuck past its timeout (a handler, a lookup
    stuck in DNS) does not hold up the interpreter's exit, as a ``ThreadPoolExecutor``'s
    threads would.

    A call whose attempt ends while it runs (past ``timeout_s``) is *abandoned*: a thread cannot
    be stopped, so it keeps its thread until the handler returns, and then ``overran`` is
    told (from that thread) of its argument and how long it ran. ``held_back`` tells when the
    threads such calls hold leave none for another call, which would only wait for one.
    """

    def __init__(
        self,
        max_threads: int,
        name: str,
        overran: Callable[[Any, float], None] = lambda _arg, _ran_s: None,
    ) -> None:
        self._max = max(max_threads, 1)
        self._name = name
        self._overran = overran
        self._cond = threading.Condition()
        self._work: deque[ThreadCall] = deque()
        self._threads = 0
        self._idle = 0
        self._woken = 0  # idle threads told to wake that have not taken work yet
        self._live = 0  # calls whose attempt still waits for them (queued or running)
        self.abandoned = 0  # threads running a call whose attempt has ended
        self._closed = False

    def held_back(self) -> tuple[int, int] | None:
        """When a call made now would wait for a thread that an abandoned call holds: how many
        threads abandoned calls hold, of the most there may be; else ``None``."""
        with self._cond:
            if self.abandoned > 0 and self._live + self.abandoned >= self._max:
                return self.abandoned, self._max
            return None

    def call(self, fn: Callable[[Any], Any], arg: Any) -> ThreadCall:
        """Hand ``fn(arg)`` to a thread; its answer is set on the call's ``future``."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        context = contextvars.copy_context()  # as asyncio.to_thread passes it on
        item = ThreadCall(loop, future, context, fn, arg)
        with self._cond:
            if self._closed:
                raise RuntimeError("the threads are closed")
            self._work.append(item)
            self._live += 1
            if self._idle > self._woken:
                self._woken += 1
                self._cond.notify()
            elif self._threads < self._max:
                self._threads += 1
                threading.Thread(target=self._serve, name=self._name, daemon=True).start()
        future.add_done_callback(functools.partial(self._ended, item))
        return item

    def _ended(self, item: ThreadCall, future: asyncio.Future[Any]) -> None:
        """On the loop: the call's attempt no longer waits for it (answered, or cut off)."""
        with self._cond:
            self._live -= 1
            if future.cancelled() and item.running:
                item.abandoned = True
                self.abandoned += 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._work and not self._closed:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                    self._woken = max(self._woken - 1, 0)
                if not self._work:
                    self._threads -= 1
                    return
                item = self._work.popleft()
                if item.future.cancelled():
                    # Its attempt timed out (or was drained) while it waited for a thread, and
                    # was recorded so: run now, the handler would do the work its retry does
                    # again.
                    continue
                item.running = True
            started = time.monotonic()
            arg = item.arg
            try:
                result, error = item.context.run(item.fn, arg), None
            except BaseException as exc:  # the awaiting side decides what it means
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                item.loop.call_soon_threadsafe(settle, item.future, result, error)
            with self._cond:
                item.running = False
                abandoned = item.abandoned
                if abandoned:
                    self.abandoned -= 1
                item.result, item.error, item.ended = result, error, True
                item.arg = item.context = None  # an event's body is not kept with its answer
            if abandoned:
                self._overran(arg, time.monotonic() - started)
            del item, arg, result, error  # not kept alive while this thread waits


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """On the loop: a thread's answer to ``future``, unless its waiter is gone (timed out,
    drained, cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
