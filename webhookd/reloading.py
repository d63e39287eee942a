"""A config reload (SIGHUP, ``Daemon.request_reload``): the file read again on a thread, planned
against the config running now, everything new built before anything is swapped, then taken
by each part in turn with no await between them; or refused whole, with one line saying why,
the running config kept.

Only sources (their actions with them), lanes and what the parts can take in place change at
a reload (``config.plan_reload``); the rest waits for a restart, and the line says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from webhookd import actions as action_registry
from webhookd import logs
from webhookd.actions.base import HANDLER_IMPORTS_DEFERRED, Resources
from webhookd.alerts import Alerter
from webhookd.boot import orphaned
from webhookd.config.reloads import Reload, cluster_digest, cluster_names, plan_reload, some
from webhookd.config.sections import ALERT_SOURCE, CATCH_ALL, Config, no_sources
from webhookd.errors import ConfigError, JournalError, UnsetVariable
from webhookd.limiter import Lane, build_lanes
from webhookd.metrics import Metrics
from webhookd.receiver import Receiver
from webhookd.redact import (
    WRITTEN_OUT,
    secret_values,
    spaced_secrets,
    weak_points,
    written_out,
)
from webhookd.sdnotify import Notifier
from webhookd.stats import AdminContext
from webhookd.workers import WorkerPool

log = logging.getLogger("webhookd")


@dataclass(frozen=True)
class Running:
    """The parts a reload reconfigures."""

    http: aiohttp.ClientSession
    pool: WorkerPool
    receiver: Receiver
    metrics: Metrics
    ctx: AdminContext
    alerter: Alerter


class Reloading:
    """The reload half of ``Daemon``; it needs the daemon's ``_status``."""

    config: Config
    loader: Callable[[], Config] | None
    fixed: frozenset[str]
    lanes: dict[str, Lane]
    stop_event: asyncio.Event
    started: asyncio.Event
    reloaded: asyncio.Event
    notifier: Notifier
    _reload_wanted: asyncio.Event

    def _status(self, ctx: AdminContext) -> str:
        raise NotImplementedError

    async def _reloads(self, running: Running) -> None:
        """Apply each reload asked for, one at a time; none once the drain has begun. One asked
        for during the start waits for it: its READY=1 would tell systemd the daemon was up
        before either port listened."""
        await self.started.wait()
        while True:
            await self._reload_wanted.wait()
            self._reload_wanted.clear()
            if self.stop_event.is_set():
                log.info("config reload ignored: draining")
            else:
                self.notifier.reloading()
                try:
                    refused = await self._reload(running)
                except Exception:  # a bug here must not end the daemon: it keeps what it runs
                    log.exception("config reload failed; still running the previous config")
                    refused = "the reload failed (logged with its traceback)"
                running.metrics.observe_reload(refused is None, len(running.ctx.restart_pending))
                running.ctx.reload_refused = refused
                if not self.stop_event.is_set():  # STOPPING=1 has been said: no READY=1 after
                    self.notifier.send("READY=1", f"STATUS={self._status(running.ctx)}")
            self.reloaded.set()

    async def _reload(self, running: Running) -> str | None:
        """Read the config again and take its sources (their actions with them) and any new
        lane; the rest waits for a restart (``config.plan_reload``). Everything new is built
        before anything is swapped, so a reload is applied whole or not at all. Returns
        ``None`` if it was, else why not (for ``/stats``)."""
        if self.loader is None:
            log.warning("config reload: this daemon was given no config to read again")
            return "this daemon was given no config to read again"
        loader, running_config, fixed = self.loader, self.config, self.fixed

        def read() -> tuple[Config, set[str], Reload | ConfigError, list[str]]:
            # A new python handler's module is imported as its action is made, on the loop's
            # thread (as at a start), not on this one (set in this thread's copy of the context).
            HANDLER_IMPORTS_DEFERRED.set(True)
            new = loader()
            secrets = secret_values(new)
            try:
                plan = plan_reload(running_config, new, fixed=fixed)
            except ConfigError as exc:  # refused once the file is known not to be empty
                return new, secrets, exc, []
            return (
                new,
                secrets,
                plan,
                config_warnings(plan.config) + _unguarded(running_config, plan),
            )

        try:
            # In a thread: a config of 200 sources takes ~30 ms to parse and check, which in
            # the loop would hold every ack meanwhile. Measured (sequential webhooks, a reload
            # every 0.5 s): the slowest ack 30-35 ms against 48-50 in the loop, p99 9.5 against
            # 3.3 ms, as the thread's share of the interpreter slows the acks around it. Its
            # secrets too, read once here for the log, the pool and the admin API, and its plan
            # and what it warns of (a walk of 300 sources takes ~12 ms; three of them in the
            # loop held acks 55-90 ms, and the warnings' three more ~40 ms). Planned against
            # the config running now, which only a reload changes, one at a time.
            new, secrets, planned, warnings = await asyncio.to_thread(read)
        except ConfigError as exc:
            return _refused(_reload_error(exc))
        logs.add_secrets(secrets)
        running_sources = [n for n in self.config.sources if n != CATCH_ALL]
        if running_sources and not new.sources:
            # An empty file, or one cut short before its first source (a copy under way): as
            # a reload, every source and its queued jobs would go at once.
            return _refused(
                f"{new.origin} configures no source, where {len(running_sources)} run now (an"
                " empty file, or one cut short?); a restart takes it as it is"
            )
        if isinstance(planned, ConfigError):
            # Sources that need a [server] or [journal] not yet running.
            return _refused(
                f"{planned} (the value running now: [server] and [journal] change at a restart)"
            )
        plan = planned
        log.debug(
            "config reload: %d source(s) and %d lane(s) read from %s",
            len(new.sources),
            len(new.lanes),
            new.origin,
        )
        if plan.renamed:
            key, kind, was, now = plan.renamed[0]
            which = "it" if key.endswith("]") else f"the one of {now} that is to keep them"
            return _refused(
                f"{key}: an action without a name, named {was} until now, would be {now} (an"
                f" unnamed {kind} is named by its place once its source has two), and the jobs"
                f' of {was} would go dead: give {which} name = "{was}", and each other'
                " unnamed one a name of its own"
            )
        cfg = plan.config
        journal = running.pool.journal
        gone: Sequence[str] = plan.actions_gone
        taken: list[str] = []
        # Alerts journaled and not yet sent, which [alerts] removed leaves nothing to send:
        # None while not known (there may be some).
        alerts_left: int | None = None if plan.alerts == "removed" else 0
        if gone or plan.added or alerts_left is None:
            # Named only for the jobs they leave behind: an action taken away with none queued
            # has nothing to go dead. A journaled name is looked up as the workers do (one no
            # source has is the catch-all's), so the jobs that go dead are those the new config
            # cannot run and the running one could: a source removed that the catch-all takes
            # loses none, the catch-all removed loses the jobs of every name it took, and a
            # source added in its place takes its names' jobs.
            try:
                waiting = await journal.unfinished_by_action()
            except JournalError:
                pass  # all of them named, as they may have some
            else:
                dead, before = orphaned(cfg, waiting), orphaned(self.config, waiting)
                lost = {(s, a): n for (s, a), n in dead.items() if (s, a) not in before}
                gone = [f"{s}/{a}" for s, a in lost if s != ALERT_SOURCE]
                alerts_left = sum(n for (s, _), n in lost.items() if s == ALERT_SOURCE)
                taken = [
                    f"{s}/{a}"
                    for (s, a), n in sorted(waiting.items())
                    if n and s in self.config.sources and s not in cfg.sources
                    if (s, a) not in dead
                ]
        lanes = {name: lane for name, lane in self.lanes.items() if name in cfg.lanes}
        lanes |= build_lanes(
            {name: c for name, c in cfg.lanes.items() if name not in lanes},
            store=journal if journal.shares_lanes else None,
        )
        resources = Resources(
            config=cfg,
            http=running.http,
            lanes=lanes,
            masker=lambda: running.pool.masker,
            held=lambda source: source in running.pool.paused,
        )
        try:
            actions = await action_registry.rebuild(resources, running.pool.actions)
        except ConfigError as exc:
            return _refused(_reload_error(exc))
        # Told to the other nodes before the receiver takes the new sources' webhooks: a node
        # that meets one of their jobs then finds this one has it, and leaves the job to it.
        await journal.publish_names(cluster_names(cfg))
        if self.stop_event.is_set():
            # A stop came while the new config was read and built: the drain runs on what it
            # began with, and what was built for the reload is closed unused.
            journal.config_names = cluster_names(self.config)  # for its heartbeats until then
            kept = {id(a) for a in running.pool.actions.values()}
            for action in actions.values():
                if id(action) not in kept:
                    await action.aclose()
            log.info("config reload not applied: the drain began while it was read")
            return "the drain began while the reload was read"
        # From here on nothing can fail: the parts take the new config in turn, with no await.
        self.lanes.clear()
        self.lanes.update(lanes)  # the dict the metrics, the admin API and the actions read
        old_log, self.config = self.config.log, cfg
        running.pool.reconfigure(cfg, actions, secrets)
        journal.config_digest = cluster_digest(cfg)
        running.receiver.reconfigure(cfg)
        running.metrics.configure(cfg)
        running.ctx.reconfigure(cfg, secrets)
        running.alerter.reconfigure(cfg.alerts, cfg.counted_as)
        log.info("config reloaded from %s: %s", cfg.origin, plan.summary())
        for said in warnings:
            log.warning("config reload: %s", said)
        if plan.rekeyed:
            log.warning(
                "config reload: the dedup key of %s is made otherwise now: a provider's retry of"
                " a delivery taken before this reload is a new event, its jobs run again",
                ", ".join(plan.rekeyed),
            )
        if gone:
            log.warning(
                "config reload: %s no longer configured: %s queued job(s) go dead when their"
                " turn comes (replayable once an action of that name is back; name an"
                ' action, name = "...", to keep its jobs)',
                some(gone),
                "its" if len(gone) == 1 else "their",
            )
        if alerts_left != 0:
            log.warning(
                "config reload: [alerts] removed: %s queued alert(s) go dead when their turn"
                " comes, unsent (`webhookd replay --dead --source %s` sends them once [alerts]"
                " is back)",
                "its" if alerts_left is None else alerts_left,
                ALERT_SOURCE,
            )
        if taken:
            log.warning(
                'config reload: the queued job(s) of %s go to the catch-all "%s" now, each to'
                " its action of the same name",
                some(taken),
                CATCH_ALL,
            )
        # A key the command line sets (--log-level) is not the file's at a restart either.
        flagged = [key for key in plan.kept if key in self.fixed]
        restart = tuple(key for key in plan.kept if key not in self.fixed)
        running.ctx.restart_pending = restart
        if restart:
            log.warning(
                "config reload: %s changed, kept as %s until the next restart",
                ", ".join(restart),
                "they were" if len(restart) > 1 else "it was",
            )
        if flagged:
            log.warning(
                "config reload: %s changed in the file; the command line's --%s still %s",
                ", ".join(flagged),
                ", --".join(key.replace("log.", "log-") for key in flagged),
                "set them" if len(flagged) > 1 else "sets it",
            )
        # Last: a level raised to warning would drop the summary above.
        if cfg.log.format != old_log.format:
            logs.set_format(cfg.log.format)
            log.info("log format now %s", cfg.log.format)
        if cfg.log.level != old_log.level:  # said at whichever level shows it
            said_before = log.isEnabledFor(logging.INFO)
            if said_before:
                log.info("log level now %s", cfg.log.level)
            logs.set_level(cfg.log.level)
            if not said_before:
                log.info("log level now %s", cfg.log.level)
        return None


def config_warnings(cfg: Config) -> list[str]:
    """What ``check`` warns of, which a start and each reload say too: where webhooks go
    without a source of their own, secrets written out, the actions', and the config's weak
    points."""
    said = [nowhere] if (nowhere := no_sources(cfg)) else []
    said += [f"{key} is {WRITTEN_OUT}" for key in written_out(cfg)]
    said += action_registry.warnings(cfg)
    return said + weak_points(cfg) + spaced_secrets(cfg)


def _unguarded(running: Config, plan: Reload) -> list[str]:
    """What a reload warns of each verified source it removes whose name the catch-all takes
    from then on, one line each. The catch-all never takes a configured name, so while the
    source ran only its verified requests were journaled as it; now /hooks/<name> takes any
    request, unverified (or verified by the catch-all's scheme, not the source's). Only a
    reload can tell: a start knows nothing of the sources a file had before."""
    catch_all = plan.config.sources.get(CATCH_ALL)
    if catch_all is None:
        return []
    taken_as = catch_all.verify.scheme if catch_all.verify is not None else None
    said = []
    for name in plan.removed:
        verify = running.sources[name].verify
        if verify is None or verify.scheme == taken_as:
            continue
        how = (
            f"unverified: anyone may send events as {name}"
            if taken_as is None
            else f"verified as {taken_as}, not {verify.scheme}"
        )
        said.append(
            f"{name} removed, which was verified as {verify.scheme}: its webhooks (/hooks/{name})"
            f' go to the catch-all "{CATCH_ALL}" now, {how} (configure the source again to keep'
            " them verified)"
        )
    return said


def _reload_error(exc: ConfigError) -> str:
    """What a reload refused for ``exc`` says: a variable the daemon's environment lacks may
    well be set where the operator looks (the EnvironmentFile, a shell), which only a restart
    reads."""
    if isinstance(exc, UnsetVariable):
        return (
            f"{exc} (a reload keeps the environment the daemon started with; a restart reads"
            " a new one)"
        )
    return str(exc)


def _refused(why: str) -> str:
    """A reload refused: said, and returned for ``/stats``' ``reload_refused``."""
    log.error("config reload refused, still running the previous config: %s", why)
    return why
