"""The ``log`` action: write one line per event to the log. The development default."""

from __future__ import annotations

import logging

from webhookd.actions.base import Outcome, Resources, check_options
from webhookd.config import ActionConfig
from webhookd.errors import ConfigError
from webhookd.models import Event, Job

log = logging.getLogger("webhookd.actions.log")

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_PREVIEW_BYTES = 200


def validate(config: ActionConfig) -> None:
    check_options(config, ("level", "body"))
    level = config.options.get("level", "info")
    if level not in _LEVELS:
        raise ConfigError(f"{config.key}.level", f"must be one of {', '.join(_LEVELS)}")
    if not isinstance(config.options.get("body", True), bool):
        raise ConfigError(f"{config.key}.body", "must be true or false")


class LogAction:
    def __init__(self, config: ActionConfig) -> None:
        self.config = config
        self.level = _LEVELS[config.options.get("level", "info")]
        self.show_body = bool(config.options.get("body", True))

    async def run(self, event: Event, job: Job) -> Outcome:
        if log.isEnabledFor(self.level):
            preview = ""
            if self.show_body:
                text = event.body[:_PREVIEW_BYTES].decode("utf-8", "replace")
                more = "…" if len(event.body) > _PREVIEW_BYTES else ""
                preview = f" body={text!r}{more}"
            log.log(
                self.level,
                "event %s source=%s bytes=%d content_type=%s%s",
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
    validate(config)
    return LogAction(config)
