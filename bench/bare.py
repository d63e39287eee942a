"""The baseline: a bare aiohttp+uvloop server that reads each body and answers 200, storing nothing.

Run as ``python -m bench.bare --port N``. ``GET /readyz`` answers 200 so the harness waits for it
the same way it waits for webhookd. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop
from aiohttp import web


async def _accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=200)


async def _ready(request: web.Request) -> web.Response:
    return web.Response(status=200, text="ready")


def make_app() -> web.Application:
    """Build the baseline app: ``POST /hooks/{source}`` → 200, ``GET /readyz`` → 200."""
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/hooks/{source}", _accept)
    app.router.add_get("/readyz", _ready)
    return app


async def serve(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # No access log: webhookd runs at log level "warning" here, so neither side logs per request.
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
