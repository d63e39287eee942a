"""The peers' receiver: FastAPI on uvicorn (uvloop, httptools), one POST route that queues a job.

Run by `bench.peers` from a scratch virtualenv, never imported by the bench itself. ``MODE``
picks the queue: ``celery`` (``noop.delay(body)``) or ``arq`` (``enqueue_job("noop", body)``);
``REDIS_URL`` says where Redis is. Like webhookd, the answer is a 202 with the job's id.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

MODE = os.environ["MODE"]
state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if MODE == "arq":
        from arq import create_pool
        from arq_tasks import REDIS

        state["arq"] = await create_pool(REDIS)
    yield
    if "arq" in state:
        await state["arq"].aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/readyz")
async def readyz() -> Response:
    return Response(status_code=200)


if MODE == "celery":
    from celery_app import noop

    @app.post("/hooks/bench")
    async def hook_celery(request: Request) -> Response:
        body = await request.body()
        # The usual FastAPI + Celery handler: .delay() is a blocking Redis round trip inside
        # the event loop (there is no asyncio API for it).
        result = noop.delay(body.decode())
        return JSONResponse({"id": result.id}, status_code=202)

elif MODE == "arq":

    @app.post("/hooks/bench")
    async def hook_arq(request: Request) -> Response:
        body = await request.body()
        job = await state["arq"].enqueue_job("noop", body.decode())
        return JSONResponse({"id": job.job_id if job is not None else ""}, status_code=202)

else:
    raise SystemExit(f"MODE must be celery or arq, not {MODE!r}")
