"""What a pause or a resume of a source name holds, as ``webhookd pause``/``resume`` and the
admin API's ``POST /sources/<name>/pause|resume`` both say it.

Beside a catch-all every well-formed name is one it takes, so a slip of a configured source's
name (``githb``) was paused as any other, holding nothing while ``github``'s jobs ran on: the
incident tool said deliveries were held when they were not. It sees only the journal's
interface, so every journal backend is asked the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from webhookd.config.sections import ALERT_SOURCE, CATCH_ALL, Config
from webhookd.journal.base import BaseJournal

# A pause of the alerts' own source held every alert back, told to no one (their backlog is
# never alerted on, or an unreachable alert URL would feed itself), and sent them all, stale,
# at the resume: the pager went quiet exactly when something was wrong. A resume still goes,
# for one an earlier webhookd paused.
ALERTS_NOT_PAUSED = (
    f"the alerts' source {ALERT_SOURCE!r} cannot be paused: its jobs are the alerts, and held"
    " they would tell no one of anything, their own backlog included; to quiet alerts, raise"
    " [alerts] min_interval_s, or remove [alerts], and reload"
)


def refused_pause(name: str) -> str | None:
    """Why a pause of ``name`` is refused whatever the journal holds, if it is: the alerts'
    own source."""
    return ALERTS_NOT_PAUSED if name == ALERT_SOURCE else None


@dataclass(frozen=True)
class Named:
    """A name given to a pause or a resume, as the config and the journal know it."""

    name: str
    # Not a configured source (nor the alerts' own): a name the catch-all takes.
    catch_all: bool
    # The journal holds an event under exactly this name: webhooks have come under it.
    journaled: bool
    # The configured source it is a slip of, if it is one the catch-all took no webhook under.
    slip_of: str | None
    # Why the pause or resume is refused, if it is (see ``name_of``).
    refused: str | None

    def fields(self) -> dict[str, bool]:
        """What the JSON answers add to ``source``, ``paused`` and ``changed``."""
        return {"catch_all": self.catch_all, "journaled": self.journaled}

    def said(self) -> str | None:
        """What the CLI adds to its line for a name the catch-all takes: that it is no
        configured source, and, until one comes, that no webhook has come under it (a slip of
        a name the operator expected to exist shows)."""
        if not self.catch_all:
            return None
        said = f'{self.name} is no configured source but a name the catch-all "{CATCH_ALL}" takes'
        return said if self.journaled else f"{said}, and no webhook has come under it yet"


async def name_of(
    config: Config, journal: BaseJournal, name: str, *, pausing: bool, paused: bool
) -> Named:
    """``name`` as a pause (``pausing``) or a resume sees it; ``paused``: whether it is paused.

    A name the catch-all takes that ``close_source`` finds a configured source's slip (the
    did-you-mean of the other verbs) is refused, as it would be without a catch-all, unless
    the catch-all has taken webhooks under it (then it is a real name of its), or, for a
    resume, it is paused (by an earlier webhookd, or before its webhooks were pruned: its jobs
    would otherwise wait for good)."""
    taking = config.source_for(name)
    catch_all = name not in config.sources and taking is not None and taking.name == CATCH_ALL
    journaled = bool(await journal.list_events(source=name, limit=1))
    slip_of = config.close_source(name) if catch_all and not journaled else None
    refused = None
    if slip_of is not None and (pausing or not paused):
        refused = (
            f"no source {name!r} (did you mean {slip_of}?): the catch-all"
            f' "{CATCH_ALL}" would take the name, but no webhook has come under it'
        )
    return Named(name, catch_all, journaled, slip_of, refused)
