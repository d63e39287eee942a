"""webhookd's no-op ``python`` action for the peers' end-to-end run: the analogue of the
Celery and arq no-op tasks."""

from typing import Any


def run(event: Any) -> None:
    return None


async def arun(event: Any) -> None:
    return None
