"""The arq peer: one job that does nothing, and a worker tuned for throughput (poll every 5 ms,
100 jobs at once, results not kept or logged).

Worker: ``arq arq_tasks.WorkerSettings`` (with this directory on ``PYTHONPATH``).
"""

import os
from typing import Any

from arq.connections import RedisSettings

REDIS = RedisSettings.from_dsn(os.environ["REDIS_URL"])


async def noop(ctx: dict[str, Any], body: str) -> None:
    return None


class WorkerSettings:
    functions = [noop]  # noqa: RUF012 (arq reads these as class attributes)
    redis_settings = REDIS
    poll_delay = 0.005
    max_jobs = 100
    keep_result = 0
    log_results = False
