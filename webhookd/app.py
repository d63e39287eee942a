"""The composition root: wires every part, runs until a signal, drains, and closes in reverse.

Start order:
  1. journal: open, migrate, recover jobs an earlier boot left ``running``;
  2. the HTTP client session, the lanes and the configured actions;
  3. the worker pool and the background tasks (retention, heartbeat, alerts);
  4. the admin listener, then the receiver listener last: nothing is accepted before all of
     the above is ready.

Shutdown (first SIGTERM or SIGINT):
  1. mark draining: ``/readyz`` answers 503;
  2. close the receiver's listener at once (new connections are refused) and its idle
     connections; requests in flight finish their commit and get their answer, for up to
     ``server.ack_timeout_s`` + 1 s, and their connections then close (a request pipelined
     behind one in flight is not taken and gets no answer: nothing acknowledged, nothing lost);
  3. stop claiming; give running jobs ``workers.shutdown_grace_s``; cancel the stragglers and
     put them back to ``queued`` without counting the attempt;
  4. journal the dead-job alert still held back by its interval (sent by the next start);
     stop the background tasks; close the admin listener, the actions and the HTTP session;
  5. flush and checkpoint the journal (a checkpoint that fails, at a full disk, leaves the
     WAL, which the next start reads back: a warning says so); exit 0.
A second signal exits at once; boot recovery covers whatever was left.

Should a long-lived task end (the dispatcher, retention, the heartbeat, alerts, the journal's
writer), the task group cancels the rest, the listeners close, and ``run()`` returns 1 with one
line.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from webhookd import actions as action_registry
from webhookd.actions.base import Resources
from webhookd.actions.client import Lookup, open_session
from webhookd.actions.command import kill_running_commands
from webhookd.admin import Admin
from webhookd.alerts import Alerter
from webhookd.boot import (
    check_the_clock,
    clock_stepped,
    count_earlier_calls,
    warn_of_orphans,
)
from webhookd.clock import SYSTEM_CLOCK, Clock, StepWatch, unset_clock
from webhookd.config.reloads import cluster_digest, cluster_names
from webhookd.config.sections import ALERT_ACTION, ALERT_SOURCE, Config
from webhookd.config.values import Listen
from webhookd.errors import (
    EXIT_JOURNAL_NEWER,
    JournalError,
    JournalGone,
    JournalNewer,
    WebhookdError,
)
from webhookd.http1 import host_port
from webhookd.journal import open_journal
from webhookd.journal.base import BaseJournal
from webhookd.journal.records import Poisoned, Pruned
from webhookd.json_errors import JsonErrorAppRunner
from webhookd.limiter import Lane, build_lanes
from webhookd.metrics import Metrics
from webhookd.models import new_boot_id
from webhookd.process import (
    EXIT_DEADLINE_S,
    STOP_MARGIN_S,
    exit_within,
    keep_descriptors_private,
    keep_memory_private,
    open_files_for,
    tune_collector,
)
from webhookd.receiver import Receiver
from webhookd.reloading import Reloading, Running, config_warnings
from webhookd.retention import prune_expired
from webhookd.sdnotify import Notifier
from webhookd.state import IntakeState
from webhookd.stats import AdminContext, Throughput, journal_problems, journal_problems_now
from webhookd.status import heartbeat_line, status_line
from webhookd.workers import WorkerPool

log = logging.getLogger("webhookd")

HEARTBEAT_S = 30.0
# A retention round that runs longer than this says how far it has got, this often.
PRUNE_PROGRESS_S = 10.0
# How often the wall clock is compared with the monotonic one: a retry planned between a step
# and its sight is moved with the jobs planned before it, by mistake; a short look keeps those few.
CLOCK_CHECK_S = 0.25

# Both listeners' per-connection settings, set on purpose, not inherited: an idle keep-alive
# connection is closed after 75 s (aiohttp's own default is an hour of held sockets); request
# lines and header fields over 8 KB and more than 100 headers are refused with a 4xx before the
# body is read, as is (431) a request line and headers over 32 KiB in all (the receiver's
# ``http1.MAX_HEAD_BYTES``). No provider sends anything near these.
_HANDLER: dict[str, Any] = {
    "keepalive_timeout": 75.0,
    "max_line_size": 8190,
    "max_field_size": 8190,
    "max_headers": 100,
}


class _Listener(Protocol):
    """An open listener (aiohttp's runner for the admin API, ``Http1Server`` for webhooks)."""

    async def cleanup(self) -> None: ...


@dataclass
class Bound:
    """Where the daemon actually listens (ports may be 0 in the config, for tests)."""

    receiver: str = ""
    admin: str = ""


@dataclass
class Daemon(Reloading):
    """One webhookd process. ``run()`` returns the exit status."""

    config: Config
    clock: Clock = SYSTEM_CLOCK
    install_signals: bool = True
    tune_gc: bool = False  # freeze startup objects and collect less often (see `tune_collector`)
    # Once a drain begins, exit by STOP_MARGIN_S past its grace whatever hangs (`webhookd
    # serve` only: it ends the process).
    exit_if_stuck: bool = False
    # systemd's notifications (``webhookd serve`` under a ``Type=notify`` unit): ready, stopping,
    # and the watchdog's pings.
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    stop_watchdog: threading.Timer | None = field(default=None, init=False)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    bound: Bound = field(default_factory=Bound)
    # The receiver's cap on open connections, once running: server.max_connections, or fewer
    # when the open-files limit leaves no room for that many (``open_files_for``).
    max_connections: int | None = field(default=None, init=False)
    boot_id: str = field(default_factory=new_boot_id)
    # Set once wired, for tests and embedding: the parts themselves.
    journal: BaseJournal | None = None
    pool: WorkerPool | None = None
    lanes: dict[str, Lane] = field(default_factory=dict)
    intake: IntakeState = field(default_factory=IntakeState)
    # What systemd's STATUS= line would say now (``systemctl status``), once wired.
    status_now: Callable[[], str] | None = None
    on_wired: list[Callable[[Daemon], None]] = field(default_factory=list)
    # Reads the config again for a reload (SIGHUP, ``request_reload``); raises ConfigError.
    loader: Callable[[], Config] | None = None
    # The config's dotted keys the command line set (``log.level``, ``log.format``): a reload
    # keeps them as they are.
    fixed: frozenset[str] = frozenset()
    # Set after each reload, applied or refused (for tests and embedding).
    reloaded: asyncio.Event = field(default_factory=asyncio.Event)
    # How the actions' HTTP client looks up a host name, on its own threads (tests give one
    # that hangs).
    lookup: Lookup = socket.getaddrinfo
    _force: asyncio.Event = field(default_factory=asyncio.Event)
    _stop_why: str = "asked to stop"
    _reload_wanted: asyncio.Event = field(default_factory=asyncio.Event)

    def request_reload(self) -> None:
        """Read the config again and apply what can change in place (``Daemon._reload``).
        Safe to call from a signal handler; one asked for while starting runs once started."""
        self._reload_wanted.set()

    def request_stop(self, why: str = "asked to stop") -> None:
        """Begin a drain; a second call exits at once. Safe to call from a signal handler.
        ``why`` (the signal's name) is what the drain's log line says started it. Asked for
        during the start (a journal that does not answer, a long schema upgrade), the stop's
        budget runs from now: the start does not make it wait."""
        if self.stop_event.is_set():
            self._force.set()
        else:
            self._stop_why = why
            if not self.started.is_set():
                log.info(
                    "%s during the start: draining once it is done; a second signal exits at once",
                    why,
                )
                self._arm_stop_watchdog()
        self.stop_event.set()

    def _arm_stop_watchdog(self) -> None:
        """Exit within the stop's budget, however the close goes. A database that hangs holds
        each write of the close for its answer deadline (a minute): the stop would outlast a
        service manager's stop timeout (systemd's 40 s in the shipped unit) and end in its
        SIGKILL, with no word of why."""
        if not self.exit_if_stuck or self.stop_watchdog is not None:
            return
        cfg = self.config
        budget_s = cfg.server.ack_timeout_s + 1 + cfg.workers.shutdown_grace_s + STOP_MARGIN_S
        self.stop_watchdog = exit_within(
            budget_s,
            1,
            f"stop took longer than {budget_s:g}s (a step of the start or the close did not"
            " end: a journal that does not answer, say): exiting now; the next start recovers"
            " what was left",
        )

    async def run(self) -> int:
        try:
            return await self._run()
        except Exception as exc:
            errors = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
            for error in errors:
                # webhookd's own errors say what happened; anything else is named by its type.
                kind = "" if isinstance(error, WebhookdError) else f"{type(error).__name__}: "
                log.error("fatal: %s%s", kind, error, exc_info=log.isEnabledFor(logging.DEBUG))
            # A journal a newer release upgraded stays newer: a supervisor should not retry.
            if any(isinstance(error, JournalNewer) for error in errors):
                return EXIT_JOURNAL_NEWER
            return 1

    async def _run(self) -> int:
        cfg = self.config
        self.max_connections = open_files_for(cfg)
        loop = asyncio.get_running_loop()
        if self.install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop, sig.name)
            # A handler of Python's, not the loop's: removing the loop's puts back SIGHUP's
            # default, which ends the process, until the next statement ignores it, and a
            # reload landing there (a busy machine preempts the process in between) ended a
            # drain by the signal. This one is replaced by SIG_IGN in one step at the end.
            # It runs on the loop's thread, woken by the loop's wake-up descriptor (SIGTERM's
            # and SIGINT's handlers keep one set), and hands the reload to the loop.
            signal.signal(signal.SIGHUP, lambda *_: loop.call_soon_threadsafe(self.request_reload))
        started_at = self.clock.time()
        if (unset := unset_clock(started_at)) is not None:
            raise WebhookdError(unset)
        async with AsyncExitStack() as stack:
            # A second signal exits at once from here on, during the start too (a journal
            # that does not answer, a schema upgrade).
            force_exit = asyncio.create_task(self._force_exit(), name="force-exit")
            stack.callback(force_exit.cancel)
            # First in, last out: pings from the start (a long schema upgrade) to the end of
            # the drain and the journal's close.
            await stack.enter_async_context(self.notifier.watchdog())
            if self.install_signals:
                # A SIGHUP from the journal's close to the exit (up to EXIT_DEADLINE_S) is
                # ignored, as there is nothing left to reload (not ``hangups.note``: the
                # interpreter's exit puts back the default of a signal Python handles, which
                # ends the process, and keeps one ignored).
                stack.callback(signal.signal, signal.SIGHUP, signal.SIG_IGN)
                stack.callback(loop.remove_signal_handler, signal.SIGINT)
                stack.callback(loop.remove_signal_handler, signal.SIGTERM)
            journal = open_journal(
                cfg.journal, clock=self.clock, max_recoveries=cfg.workers.max_recoveries
            )
            journal.config_digest = cluster_digest(cfg)
            journal.config_names = cluster_names(cfg)
            await stack.enter_async_context(journal)
            self.journal = journal
            recovered = await journal.recover(self.boot_id, cfg.workers.max_recoveries)
            if recovered.requeued or recovered.dead or recovered.cancelled:
                log.warning(
                    "recovered %d interrupted job(s) %s; %d poison "
                    "pill(s) sent to dead%s; %d cancelled while running",
                    recovered.requeued,
                    recovered.whose() or "from an earlier run",
                    recovered.dead,
                    recovered.named(),
                    recovered.cancelled,
                )
            orphans = await warn_of_orphans(journal, cfg)
            await check_the_clock(journal, cfg, self.clock.time())

            http = await stack.enter_async_context(
                open_session(max(cfg.workers.concurrency * 2, 100), self.lookup)
            )
            self.lanes = build_lanes(cfg.lanes, store=journal if journal.shares_lanes else None)
            # The pool's masker, asked when a job runs (the pool is made below).
            resources = Resources(
                config=cfg,
                http=http,
                lanes=self.lanes,
                masker=lambda: pool.masker,
                held=lambda source: source in pool.paused,
            )
            actions = action_registry.build(resources)
            if not journal.shares_lanes:  # a shared lane's log is in the journal already
                await count_earlier_calls(journal, cfg, actions, self.lanes, self.clock.time())

            pool = WorkerPool(
                config=cfg,
                journal=journal,
                actions=actions,
                boot_id=self.boot_id,
                clock=self.clock,
                intake=self.intake,
                rate_lanes=self.lanes,
            )
            self.pool = pool
            # The actions, and those a reload replaced, closed before the HTTP session.
            stack.push_async_callback(pool.close_actions)
            journal.on_commit = pool.notify
            journal.starter = pool  # an idle pool's new jobs are claimed by their own commit
            journal.on_remote_jobs = pool.poke
            journal.on_pause_change = pool.pause_changed
            for hook in self.on_wired:
                hook(self)

            # Made without [alerts] too, watching nothing, so that a reload can add them.
            alerter = Alerter(
                cfg.alerts,
                journal,
                clock=self.clock,
                counted_as=cfg.counted_as,
                journal_problems=functools.partial(
                    _journal_problems, journal, cfg.server.ack_timeout_s
                ),
                refused=self.intake.refused_by_journal,
                sender=lambda: pool.actions.get((ALERT_SOURCE, ALERT_ACTION)),
            )
            pool.on_finish.append(alerter.observe)
            try:
                await alerter.restore(started_at)
            except JournalError as exc:  # a database slow to answer: alerts start afresh
                log.warning("alerts: the earlier run's alerts could not be read: %s", exc)

            metrics = Metrics(journal, pool, lanes=lambda: resources.lanes)
            metrics.attach(self.intake, pool.on_finish)
            for source, action in orphans:
                metrics.expect(source, action)
            journal.on_commit_seconds = metrics.commit.observe

            def poisoned(pills: Sequence[Poisoned]) -> None:
                metrics.observe_poisoned(pills)
                alerter.observe_poisoned(pills)

            # Poison pills are dead letters to alerts and metrics too: this start's recovery
            # now, and a silent node's later (the PostgreSQL leader's).
            journal.on_poisoned = poisoned
            if recovered.poisoned:
                poisoned(recovered.poisoned)
            throughput = Throughput(pool, self.intake)
            ctx = AdminContext(
                config=cfg,
                journal=journal,
                pool=pool,
                intake=self.intake,
                boot_id=self.boot_id,
                started_at=started_at,
                metrics=metrics.render,
                lanes=resources.lanes,
                throughput=throughput,
                counts=metrics.counts,
            )
            self.status_now = functools.partial(self._status, ctx)
            receiver = Receiver(cfg, journal, self.intake, clock=self.clock)
            running = Running(http, pool, receiver, metrics, ctx, alerter)
            # If any of these tasks ends (the writer's watch: when the writer does), the group
            # cancels the rest and the daemon exits non-zero: never half alive.
            async with asyncio.TaskGroup() as tg:
                pool_task = tg.create_task(pool.run(), name="dispatcher")
                side_tasks = [
                    tg.create_task(journal.watch(), name="journal-writer-watch"),
                    tg.create_task(self._retention(journal), name="retention"),
                    tg.create_task(self._heartbeat(ctx), name="heartbeat"),
                    tg.create_task(throughput.run(), name="throughput"),
                    tg.create_task(self._reloads(running), name="reload"),
                    tg.create_task(self._keep_status(self.status_now), name="sd-status"),
                    tg.create_task(alerter.run(), name="alerts"),
                    tg.create_task(self._watch_clock(journal, pool), name="clock"),
                ]
                listening: list[_Listener] = []
                try:
                    cancelled = await self._serve(cfg, ctx, receiver, pool, pool_task, listening)
                    await alerter.flush()
                finally:
                    # Reached with listeners open only when a task died and the group cancelled
                    # us: close the ports (receiver first) before the journal closes.
                    for runner in reversed(listening):
                        await runner.cleanup()
                for task in side_tasks:
                    task.cancel()
            left_claimed = pool.left_claimed
        # The last line, once the journal is closed: after anything its close still says (a
        # write failure it held back, a checkpoint that failed).
        if left_claimed:
            log.info(
                "stopped (%d job(s) left claimed: %s)", left_claimed, journal.left_claimed_fate
            )
        elif journal.wal_kept is not None:
            log.info(
                "stopped (%d job(s) re-queued), not cleanly: the journal's last checkpoint failed",
                cancelled,
            )
        else:
            log.info("stopped cleanly (%d job(s) re-queued)", cancelled)
        return 0

    async def _serve(
        self,
        cfg: Config,
        ctx: AdminContext,
        receiver: Receiver,
        pool: WorkerPool,
        pool_task: asyncio.Task[None],
        listening: list[_Listener],
    ) -> int:
        """Open the listeners, serve until asked to stop, drain; returns jobs re-queued."""
        admin_runner = None
        runner_args: dict[str, Any] = {
            "handle_signals": False,
            "shutdown_timeout": cfg.server.ack_timeout_s + 1,
        }
        if cfg.admin.listen is not None:
            admin = JsonErrorAppRunner(Admin(ctx).app(), access_log=None, **runner_args, **_HANDLER)
            admin_runner = await self._listen(admin, cfg.admin.listen, "admin")
            listening.append(admin_runner)
            self.bound.admin = _address(admin_runner)
        receiver_runner = receiver.server(max_connections=self.max_connections, **_HANDLER)
        listen = cfg.server.listen
        try:
            bound = await receiver_runner.start(listen.host, listen.port, backlog=1024)
        except OSError as exc:
            raise _cannot_listen(listen, "receiver", exc) from exc
        listening.append(receiver_runner)
        self.bound.receiver = bound[0]
        self._announce(cfg)
        if self.tune_gc:
            tune_collector()
        self.started.set()
        self.notifier.send("READY=1", f"STATUS={self._status(ctx)}")

        await self.stop_event.wait()
        log.info("draining (%s): no longer accepting webhooks", self._stop_why)
        self.notifier.send("STOPPING=1", f"STATUS={self._status(ctx)}")
        self._arm_stop_watchdog()
        self.intake.draining = True
        # No new job starts from here: the receiver's close below waits up to ack_timeout_s
        # for requests in flight, and the backlog's jobs started meanwhile were then cut off
        # at the grace and run again at the next start.
        pool.stop()
        listening.remove(receiver_runner)
        await receiver_runner.cleanup()
        receiver.flush_logs()
        cancelled = await pool.drain(cfg.workers.shutdown_grace_s)
        await pool_task
        if admin_runner is not None:
            listening.remove(admin_runner)
            await admin_runner.cleanup()
        return cancelled

    async def _listen(self, runner: web.BaseRunner, listen: Listen, what: str) -> web.BaseRunner:
        await runner.setup()
        site = web.TCPSite(runner, listen.host, listen.port, backlog=1024, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise _cannot_listen(listen, what, exc) from exc
        return runner

    def _announce(self, cfg: Config) -> None:
        log.info(
            "webhookd listening on http://%s (webhooks) and %s; journal %s; config %s",
            self.bound.receiver,
            f"http://{self.bound.admin} (admin)" if self.bound.admin else "no admin",
            self.journal.location if self.journal else cfg.journal.path,
            cfg.origin,
        )
        for said in config_warnings(cfg):
            log.warning("%s", said)

    async def _force_exit(self) -> None:
        await self._force.wait()
        killed = kill_running_commands()
        log.warning(
            "second signal: exiting at once%s; running jobs are recovered by the next start"
            " (on PostgreSQL, by another node once their lease runs out)",
            f" ({killed} running command(s) killed)" if killed else "",
        )
        logging.shutdown()
        os._exit(1)

    async def _retention(self, journal: BaseJournal) -> None:
        jc = self.config.journal
        while True:
            await asyncio.sleep(jc.prune_interval_s)
            try:
                events = dedup = 0
                if journal.leads():  # else another node of the cluster prunes
                    events, dedup = await self._prune_round(journal)
                await journal.refresh_backlog()
            except JournalError as exc:  # a full disk, a failed read: the next round tries again
                # A journal removed while open refuses every write until the exit, which its
                # own lines tell: not a line a round while its contents wait to be saved.
                level = logging.DEBUG if isinstance(exc, JournalGone) else logging.WARNING
                log.log(level, "retention skipped this round: %s", exc)
                continue
            if events or dedup:
                try:  # a query on PostgreSQL: an outage now must not end the task, the daemon
                    size = f"{await journal.storage_bytes()}"
                except JournalError:
                    size = "unknown"
                log.info(
                    "retention pruned_events=%d pruned_dedup=%d size_bytes=%s", events, dedup, size
                )

    async def _prune_round(self, journal: BaseJournal) -> tuple[int, int]:
        """One retention round. A long one (a backlog of expired rows after retention was
        shortened, or a first round on an old journal) says how far it has got every
        ``PRUNE_PROGRESS_S``, and a stop that cuts it short says so: a round of 757,000
        events ran 86 s with one line at its end, and none when a stop cut it off."""
        done = [0, 0]
        said_at = self.clock.monotonic()

        def on_batch(pruned: Pruned) -> None:
            nonlocal said_at
            done[0] += pruned.events
            done[1] += pruned.dedup
            if (now := self.clock.monotonic()) - said_at >= PRUNE_PROGRESS_S:
                said_at = now
                log.info("retention pruning: %d event(s), %d dedup key(s) so far", *done)

        try:
            return await prune_expired(journal, self.config.journal, on_batch=on_batch)
        except asyncio.CancelledError:
            if done[0] or done[1]:
                log.info(
                    "retention round cut short by the stop: %d event(s), %d dedup key(s)"
                    " pruned; the rest, and the free pages, at the next round",
                    *done,
                )
            raise

    async def _watch_clock(self, journal: BaseJournal, pool: WorkerPool) -> None:
        steps = StepWatch(self.clock)
        while True:
            await asyncio.sleep(CLOCK_CHECK_S)
            if moved_s := steps.step():
                await clock_stepped(journal, moved_s)
                pool.poke()  # the jobs due, and the next one's time, are read again

    async def _heartbeat(self, ctx: AdminContext) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            log.info("%s", heartbeat_line(ctx))

    async def _keep_status(self, status: Callable[[], str]) -> None:
        await self.started.wait()
        await self.notifier.keep_status(status)

    def _status(self, ctx: AdminContext) -> str:
        """systemd's STATUS= line (``systemctl status`` shows it)."""
        if self.stop_event.is_set():
            doing = f"draining ({self._stop_why})"
        else:
            doing = f"taking webhooks on {self.bound.receiver}"
        return status_line(doing, ctx)


async def _journal_problems(journal: BaseJournal, ack_timeout_s: float) -> list[str]:
    """What the alerts read of the journal each second: ``/readyz``' reasons, its probe of a
    journal that refused writes given a second at most (a commit that stalls meanwhile holds
    it), else the reasons as last seen."""
    try:
        async with asyncio.timeout(1.0):
            return await journal_problems(journal, ack_timeout_s)
    except TimeoutError:
        return journal_problems_now(journal, ack_timeout_s)


def _cannot_listen(listen: Listen, what: str, exc: OSError) -> WebhookdError:
    """One line for a port that cannot be had: the system's words for it (aiohttp wraps them
    in a sentence of its own, address and all, which the line already says)."""
    if isinstance(exc, socket.gaierror):  # its errno is getaddrinfo's, not the system's
        reason = f"{listen.host} does not resolve ({exc.strerror})"
    else:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return WebhookdError(f"cannot listen on {listen} ({what}): {reason}")


def _address(runner: web.BaseRunner) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return host_port(addr[0], addr[1])
    return ""


def run(
    config: Config,
    loader: Callable[[], Config] | None = None,
    *,
    fixed: frozenset[str] = frozenset(),
    reload_asked: Callable[[], bool] | None = None,
) -> int:
    """Run the daemon in a fresh event loop (uvloop when installed); returns the exit status.
    ``loader`` reads the config again on SIGHUP; ``fixed``: the config's dotted keys the
    command line set, which a reload leaves as they are; ``reload_asked``: whether a SIGHUP
    came before the loop's own handler was in place (it is then done once started)."""

    async def main() -> int:
        status = 1
        daemon: Daemon | None = None
        try:
            daemon = Daemon(
                config,
                tune_gc=True,
                exit_if_stuck=True,
                notifier=Notifier.from_environ(),
                loader=loader,
                fixed=fixed,
            )
            if reload_asked is not None:
                daemon.on_wired.append(lambda d: d.request_reload() if reload_asked() else None)
            status = await daemon.run()
            return status
        finally:
            if daemon is not None and daemon.stop_watchdog is not None:
                daemon.stop_watchdog.cancel()  # stopped in time: the exit's own deadline now
            exit_within(EXIT_DEADLINE_S, status)

    keep_memory_private()
    keep_descriptors_private()
    # The event loop hands every commit to SQLite's thread and back. With CPython's default 5 ms
    # switch interval a busy loop keeps that thread waiting for the GIL, which adds directly to
    # ack latency; 1 ms lets it in sooner (measured in bench/: more throughput, lower p99).
    sys.setswitchinterval(0.001)
    try:
        import uvloop
    except ImportError:
        runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    else:
        runner = uvloop.run
    try:
        return int(runner(main()))
    except KeyboardInterrupt:
        return 130  # Ctrl-C before the signal handlers were installed
    except BaseException as exc:
        # Something raised SystemExit (or the like) in a task: that stops the event loop itself.
        log.error("fatal: the event loop stopped: %s: %s", type(exc).__name__, exc)
        kill_running_commands()  # nothing is left to stop them in order
        exit_within(EXIT_DEADLINE_S, 1)
        return 1
