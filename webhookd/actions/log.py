"""The ``log`` action: write one line per event to the log. The development default."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from webhookd.actions.base import Outcome, Resources, masker_of, options
from webhookd.config.sections import ActionConfig, ActionDefaults
from webhookd.models import Event, Job
from webhookd.redact import SPARE_BYTES, Masker

log = logging.getLogger("webhookd.actions.log")

DEFAULTS = ActionDefaults()
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_PREVIEW_BYTES = 200


_OPTIONS = ("level", "body")


@dataclass(frozen=True, slots=True)
class _Settings:
    level: Literal["debug", "info", "warning"] = "info"
    body: bool = True  # show the head of the body


def _settings(config: ActionConfig) -> _Settings:
    t = options(config, _OPTIONS)
    return t.read(_Settings())


def validate(config: ActionConfig) -> None:
    _settings(config)


class LogAction:
    def __init__(self, config: ActionConfig, masker: Callable[[], Masker]) -> None:
        self.config = config
        # The log masks its lines too, but a secret the preview's cut falls inside is no secret
        # it knows any more: masked here first, then cut.
        self.masker = masker
        settings = _settings(config)
        self.level = _LEVELS[settings.level]
        self.show_body = settings.body

    async def run(self, event: Event, job: Job) -> Outcome:
        if log.isEnabledFor(self.level):
            preview = ""
            if self.show_body:
                text = self.masker().head(
                    event.body[: _PREVIEW_BYTES + SPARE_BYTES], _PREVIEW_BYTES
                )
                more = "…" if len(event.body) > _PREVIEW_BYTES else ""
                preview = f" body={text!r}{more}"
            log.log(
                self.level,
                # The sender's Content-Type quoted: as text, it could add fields of its own.
                "event=%s source=%s bytes=%d content_type=%r%s",
                event.id,
                event.source,
                len(event.body),
                event.content_type,
                preview,
            )
        return Outcome.done({"logged": True})

    async def aclose(self) -> None:
        return None


def create(config: ActionConfig, resources: Resources) -> LogAction:
    return LogAction(config, masker_of(resources))
