"""Jobs whose source or action this node lacks, left to the live nodes that have them: a config
changed node by node (a PostgreSQL cluster) runs each job on a node that has what it needs,
and a job goes dead for lacking it only once no live node has it, nor one that stopped less
than its lease ago (a restart)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

from webhookd.clock import Clock
from webhookd.config.reloads import names_take
from webhookd.errors import JournalUnavailable
from webhookd.journal.base import BaseJournal
from webhookd.journal.records import Peer

log = logging.getLogger("webhookd.workers")

# A job whose source or action this node lacks (a config changed node by node) is left to the
# live nodes that have it, and its jobs kept out of this node's claims: whether some live node
# still has it is read again this often (one read of ``nodes``), and a key none has any more
# is claimed again here, to go dead. A node lost is seen stale only after its lease anyway.
ELSEWHERE_RECHECK_S = 5.0
# Its warning, said again at most this often per source and action.
ELSEWHERE_RETELL_S = 300.0


class LeftElsewhere:
    """The (source, action) keys whose jobs this node leaves to others, and when each is looked
    at again (``keys``: the worker pool keeps them out of its claims)."""

    def __init__(self, journal: BaseJournal, clock: Clock) -> None:
        self.journal, self.clock = journal, clock
        self.keys: dict[tuple[str, str], float] = {}
        self._told: dict[tuple[str, str], float] = {}  # when each was last said

    async def left_to(self, key: tuple[str, str], missing: str) -> str | None:
        """Why a job of ``key`` (source, action), which this node lacks (``missing`` says
        which), is given back to the nodes that have it, if any does (read now: a node that
        just added it said so before it took its webhooks, ``publish_names``; one that stopped
        cleanly counts for its lease, so a restart's jobs wait for it); None when none has it.
        The key is then kept in ``keys`` while one still has it, and the others of its jobs
        claimed meanwhile are given back without asking again. A journal that cannot say is
        taken for a yes, and asked again at the next look."""
        if key in self.keys:  # a node had it at the last look (``recheck``)
            return f"left to the nodes that have it: {missing} is not configured here"
        try:
            runners = _runners(await self.journal.peer_names(), *key)
        except JournalUnavailable:
            runners = [Peer("the nodes that have it (the journal did not say which)", "")]
        if not runners:
            return None
        live = [p.name for p in runners if p.stopped_left_s is None]
        if live:
            who = ", ".join(live)
            said = f"its jobs are left to {who}, which run(s) it (a config changed node by node?)"
            why = f"left to {who}: {missing} is not configured here"
        else:
            # Only nodes that stopped cleanly (a restart, a deploy): their jobs wait for the
            # rest of their lease, for them or another node that has it, then go dead here.
            left_s = max(p.stopped_left_s or 0.0 for p in runners)
            who = ", ".join(p.name for p in runners)
            said = (
                f"its jobs wait for {who}, which ran it and stopped (a restart?): they go dead"
                f" if no node that has it is back within {left_s:.0f} s (its journal.lease_s)"
            )
            why = f"waiting {left_s:.0f} s for {who}, stopped: {missing} is not configured here"
        now = self.clock.monotonic()
        if now - self._told.get(key, -math.inf) >= ELSEWHERE_RETELL_S:
            self._told = {k: t for k, t in self._told.items() if now - t < ELSEWHERE_RETELL_S}
            self._told[key] = now
            log.warning("%s is not configured on this node: %s", missing, said)
        self.keys[key] = now + _recheck_s(runners)
        return why

    async def recheck(self) -> None:
        """Of the keys left to other nodes, look again at those due a look (one read of the
        nodes): still left while a node has them (a stopped one for the rest of its lease),
        else claimed here again, to go dead."""
        now = self.clock.monotonic()
        due = [key for key, at in self.keys.items() if at <= now]
        if not due:
            return
        peers = await self.journal.peer_names()
        for key in due:
            if runners := _runners(peers, *key):
                self.keys[key] = now + _recheck_s(runners)
            else:
                del self.keys[key]


def _recheck_s(runners: Sequence[Peer]) -> float:
    """When to look again at a key ``runners`` have: every ``ELSEWHERE_RECHECK_S``, or as the
    lease of the last of them that stopped ends, if sooner and none runs."""
    if any(p.stopped_left_s is None for p in runners):
        return ELSEWHERE_RECHECK_S
    return min(ELSEWHERE_RECHECK_S, max(p.stopped_left_s or 0.0 for p in runners))


def _runners(peers: Sequence[Peer], source: str, action: str) -> list[Peer]:
    """Of ``peers`` (``BaseJournal.peer_names``), those that run ``action`` of jobs journaled
    under ``source``."""
    found = []
    for peer in peers:
        try:
            runs = json.loads(peer.runs)
        except ValueError:
            continue  # not written by a webhookd: it says nothing of what it runs
        if isinstance(runs, dict) and names_take(runs, source, action):
            found.append(peer)
    return found
