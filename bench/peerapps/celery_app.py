"""The Celery peer: a Redis broker, no result backend, one task that does nothing.

Worker: ``celery -A celery_app worker --pool=solo`` (with this directory on ``PYTHONPATH``).
"""

import os

from celery import Celery

app = Celery("bench", broker=os.environ["REDIS_URL"])
app.conf.update(
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="noop")
def noop(body: str) -> None:
    return None
