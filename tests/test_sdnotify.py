"""systemd's notifications: the variables read (and taken out of the environment), the
datagrams sent to a real socket, the watchdog's pings, a socket that is gone."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Iterator

import pytest

from webhookd.sdnotify import Notifier


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
