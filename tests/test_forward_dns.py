"""The forwards' host name lookups run on threads of webhookd's own: targets whose DNS hangs
hold up neither the other forwards nor the daemon's stop."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from conftest import Target, make_config

from webhookd.actions.base import Outcome
from webhookd.actions.client import Resolver
from webhookd.journal import Claimed, Finished

SLOW = ".slow.invalid"


class HangingDns:
    """A ``getaddrinfo`` that holds each lookup of a name ending ``.slow.invalid`` until
    ``release`` is set (then fails it), telling the test's loop of each one held; other names
    are looked up for real."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.release = threading.Event()
        self.held: list[tuple[str, str]] = []  # (host, thread name)
        self.changed = asyncio.Event()

    def __call__(
        self, host: str, port: int, family: int, type: int, proto: int, flags: int
    ) -> list[tuple[Any, Any, int, str, Any]]:
        if not host.endswith(SLOW):
            return socket.getaddrinfo(host, port, family, type, proto, flags)
        self.loop.call_soon_threadsafe(self._hold, host, threading.current_thread().name)
        self.release.wait()
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def _hold(self, host: str, thread: str) -> None:
        self.held.append((host, thread))
        self.changed.set()

    async def wait_for(self, n: int, timeout_s: float = 10) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.held) < n:
                self.changed.clear()
                await self.changed.wait()


def forwards(source: str, *urls: str) -> str:
    actions = "".join(
        f'[[sources.{source}.actions]]\ntype = "forward"\nname = "to-{i}"\nurl = "{url}"\n'
        for i, url in enumerate(urls)
    )
    return f"[sources.{source}]\n{actions}"


async def test_targets_stuck_in_dns_hold_up_no_other_forward(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """With two targets' lookups hanging, a forward to 127.0.0.1 and one to a name that
    resolves are delivered at once (on uvloop such lookups held every connect, to an IP
    literal too, until they returned), and the daemon stops without waiting for them."""
    dns = HangingDns(asyncio.get_running_loop())
    port = target.url.rsplit(":", 1)[1]
    cfg = make_config(
        tmp_path,
        forwards("slow", f"http://a{SLOW}:{port}/a", f"http://b{SLOW}:{port}/b")
        + forwards("fast", f"{target.url}/literal", f"http://localhost:{port}/name"),
        workers="shutdown_grace_s = 0",  # the stuck forwards are cut off at the stop
    )
    try:
        running = await run_daemon(cfg, lookup=dns)
        pool = running.daemon.pool
        done: asyncio.Queue[str] = asyncio.Queue()

        def finished(claimed: Claimed, outcome: Outcome, f: Finished) -> None:
            done.put_nowait(f"{claimed.event.source}/{claimed.job.action}: {f.outcome}")

        pool.on_finish.append(finished)
        assert (await running.post("/hooks/slow"))[0] == 202
        await dns.wait_for(2)
        assert (await running.post("/hooks/fast"))[0] == 202
        async with asyncio.timeout(10):
            results = {await done.get(), await done.get()}
        assert results == {"fast/to-0: done", "fast/to-1: done"}
        assert sorted(s.path for s in target.seen) == ["/literal", "/name"]
        assert sorted(host for host, _ in dns.held) == [f"a{SLOW}", f"b{SLOW}"]
        assert all(thread.startswith("webhookd-dns") for _, thread in dns.held), dns.held
        async with asyncio.timeout(10):
            assert await running.stop() == 0
        assert len(dns.held) == 2
    finally:
        dns.release.set()


async def test_a_link_local_address_found_keeps_its_interface() -> None:
    """An IPv6 link-local address goes on with its scope (``fe80::1%eth0``): without it the
    connect cannot tell which interface the address is on."""
    index, interface = socket.if_nameindex()[0]
    found = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fe80::1", 8080, 0, index)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 8080, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 8080)),
    ]
    resolver = Resolver(lambda *_: found)
    try:
        addresses = await resolver.resolve("target.example", 8080, socket.AF_UNSPEC)
    finally:
        await resolver.close()
    assert [(a["hostname"], a["host"], a["port"], a["family"]) for a in addresses] == [
        ("target.example", f"fe80::1%{interface}", 8080, socket.AF_INET6),
        ("target.example", "2001:db8::1", 8080, socket.AF_INET6),
        ("target.example", "192.0.2.1", 8080, socket.AF_INET),
    ]


STUCK_LOOKUP = """
import asyncio, sys, threading
import aiohttp
from webhookd.actions.client import open_session

stuck = threading.Event()

def lookup(*_args):
    stuck.set()
    threading.Event().wait()  # a lookup stuck in DNS for good

async def main():
    async with open_session(4, lookup=lookup) as session:
        with_timeout = aiohttp.ClientTimeout(total=30)
        asking = asyncio.ensure_future(session.get("http://stuck.invalid/", timeout=with_timeout))
        await asyncio.get_running_loop().run_in_executor(None, stuck.wait)
        asking.cancel()
    print("closed", flush=True)

asyncio.run(main())
"""


def test_a_lookup_stuck_in_dns_does_not_hold_up_the_exit(tmp_path: Path) -> None:
    """The lookup threads are daemons: a process whose last lookup never returns still exits
    once it is done (a ``ThreadPoolExecutor``'s threads are joined at exit, for ever here)."""
    done = subprocess.run(
        [sys.executable, "-c", STUCK_LOOKUP], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "closed\n"
