"""systemd's notifications: the variables read (and taken out of the environment), the
datagrams sent to a real socket, the watchdog's pings, a socket that is gone, and what a daemon
in this process says over its life (its status lines, each reload, its drain)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config

from webhookd.errors import ConfigError
from webhookd.sdnotify import FIELD_CHARS, Notifier


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, as systemd's, and its NOTIFY_SOCKET."""
    name = f"webhookd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        yield sock, "@" + name


def test_systemds_variables_are_read_and_taken_out_of_the_environment() -> None:
    env = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000", "PATH": "/bin"}
    notifier = Notifier.from_environ(env)
    assert (notifier.address, notifier.watchdog_s) == ("\0sd", 30.0)
    assert env == {"PATH": "/bin"}  # a command the daemon runs cannot speak for it

    path = Notifier.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify"})
    assert (path.address, path.watchdog_s) == ("/run/systemd/notify", None)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/notify", "WATCHDOG_USEC": "1000000"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
    ],
)
def test_no_socket_it_can_use_means_no_notifications_and_no_watchdog(env: dict[str, str]) -> None:
    notifier = Notifier.from_environ(env)
    assert (notifier.address, notifier.watchdog_s) == (None, None)
    notifier.send("READY=1")  # does nothing, raises nothing


@pytest.mark.parametrize(("usec", "pid"), [("0", ""), ("soon", ""), ("-5", ""), ("1000000", "1")])
def test_a_watchdog_that_is_off_or_another_processs_is_not_pinged(usec: str, pid: str) -> None:
    env = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": usec, "WATCHDOG_PID": pid}
    assert pid != str(os.getpid())
    assert Notifier.from_environ(env).watchdog_s is None
    mine = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(mine).watchdog_s == 1.0


async def test_each_notification_is_one_datagram_of_lines(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    Notifier.from_environ({"NOTIFY_SOCKET": address}).send("READY=1", "STATUS=taking webhooks")
    said = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 5)
    assert said == b"READY=1\nSTATUS=taking webhooks"


async def test_a_fields_line_breaks_cannot_make_a_field_of_their_own_and_a_long_one_is_cut(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    notifier.send("STATUS=journal: disk I/O error\nREADY=1\r\nMAINPID=1")
    assert await next_said(sock) == "STATUS=journal: disk I/O error READY=1 MAINPID=1"
    notifier.send("STATUS=" + "x" * 5000, "READY=1")
    status, ready = (await next_said(sock)).split("\n")
    assert (len(status), ready) == (FIELD_CHARS, "READY=1")


async def test_the_watchdog_pings_from_the_loop_while_inside_and_stops_after(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "20000"})
    loop = asyncio.get_running_loop()
    async with notifier.watchdog():
        pings = [await asyncio.wait_for(loop.sock_recv(sock, 4096), 5) for _ in range(3)]
    assert pings == [b"WATCHDOG=1"] * 3
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "sd-watchdog"]


async def test_a_socket_that_is_gone_is_one_warning_however_often_it_is_tried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": f"@webhookd-gone-{secrets.token_hex(8)}"})
    with caplog.at_level(logging.WARNING, logger="webhookd"):
        for _ in range(3):
            notifier.send("WATCHDOG=1")
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("cannot notify systemd (NOTIFY_SOCKET): ")


async def next_said(sock: socket.socket, starting: str = "") -> str:
    """The next datagram that starts with ``starting`` (those before it skipped)."""
    loop = asyncio.get_running_loop()
    while not (said := (await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).decode()).startswith(
        starting
    ):
        pass
    return said


async def test_a_reload_is_said_with_systemds_monotonic_stamp(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier.from_environ({"NOTIFY_SOCKET": address}).reloading()
    reloading, status, stamp = (await next_said(sock)).split("\n")
    assert (reloading, status) == ("RELOADING=1", "STATUS=reloading the config")
    key, _, usec = stamp.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def test_status_lines_come_every_status_s_and_not_at_all_without_a_socket(
    listener: tuple[socket.socket, str],
) -> None:
    sock, address = listener
    counted = itertools.count()
    notifier = Notifier("\0" + address[1:], status_s=0.01)
    keeping = asyncio.create_task(notifier.keep_status(lambda: f"line {next(counted)}"))
    assert [await next_said(sock) for _ in range(2)] == ["STATUS=line 0", "STATUS=line 1"]
    keeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await keeping
    # No socket: the call returns at once rather than wake up every status_s for nothing.
    await asyncio.wait_for(Notifier(None, status_s=0.01).keep_status(lambda: "unused"), 1)


async def test_a_daemon_says_how_it_is_doing_and_brackets_each_reload_applied_or_refused(
    tmp_path: Path, listener: tuple[socket.socket, str], run_daemon: Any
) -> None:
    """``READY=1`` with a status line once listening; the line again every ``status_s``, with
    what is wrong beside the backlog (paused sources, a refused reload); ``RELOADING=1`` and
    then ``READY=1`` around each reload; ``STOPPING=1`` as the drain begins."""
    sock, address = listener
    source = "".join(f"[sources.shop{n}]\n" for n in range(7))
    loads = iter([make_config(tmp_path, source), ConfigError("sources.shop0.verify", "bad")])

    def loader() -> Any:
        cfg = next(loads)
        if isinstance(cfg, ConfigError):
            raise cfg
        return cfg

    notifier = Notifier("\0" + address[1:], status_s=0.02)
    running = await run_daemon(make_config(tmp_path, source), notifier=notifier, loader=loader)
    ready = await next_said(sock)
    taking = f"taking webhooks on {running.daemon.bound.receiver}"
    concurrency = running.daemon.config.workers.concurrency
    assert ready == f"READY=1\nSTATUS={taking}; backlog 0, busy 0/{concurrency}, 0.0 accepted/s"

    for n in range(6):
        pause = f"{running.admin_url}/sources/shop{n}/pause"
        async with running.http.post(pause, headers={"X-Webhookd": "1"}) as r:
            assert r.status == 200
    paused = "paused: shop0, shop1, shop2, shop3, shop4 and 1 more"  # named up to five
    expected = f"STATUS={taking}; backlog 0, busy 0/{concurrency}, 0.0 accepted/s; {paused}"
    while await next_said(sock, "STATUS=") != expected:
        pass  # a line from before the last pause

    for outcome in ("applied", "refused"):
        running.daemon.reloaded.clear()
        running.daemon.request_reload()
        assert (await next_said(sock, "RELOADING=1")).startswith(
            "RELOADING=1\nSTATUS=reloading the config\nMONOTONIC_USEC="
        ), outcome
        await running.daemon.reloaded.wait()
        assert (await next_said(sock, "READY=1")).startswith(f"READY=1\nSTATUS={taking}; ")
    assert (await next_said(sock, "STATUS=")).endswith(
        f"; {paused}; config reload refused (see the log)"
    )

    running.daemon.request_stop("SIGTERM")
    assert (await next_said(sock, "STOPPING=1")).startswith(
        "STOPPING=1\nSTATUS=draining (SIGTERM); backlog 0, busy 0/"
    )
    assert await running.task == 0
