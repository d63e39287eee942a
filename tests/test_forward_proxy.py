"""The ``proxy`` option (a forward's, an ``openai`` action's and its ``then``'s, the alerts')
against a real HTTP proxy on 127.0.0.1 (``egress_proxy``): plain http targets by absolute-form
requests, https ones through a CONNECT tunnel, Basic credentials from the proxy URL, refusals
retried and named without the password, bad values refused at load."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import make_config
from egress_proxy import EgressProxy
from openai_standin import StandIn
from ops_support import event_state
from test_forward import make_event, make_job
from test_forward_tls import Pki, config_for, files, forward_once, openai_job

from webhookd.actions import forward
from webhookd.actions.base import Resources
from webhookd.actions.targets import read_proxy
from webhookd.clock import ManualClock
from webhookd.config import Table
from webhookd.errors import ConfigError
from webhookd.models import JobState
from webhookd.redact import Masker, secret_values, written_out

PASSWORD = "s3cret proxy pw"  # a space in it: written %20 in the URL
CREDENTIALS = ("egress", PASSWORD)
BASIC = "Basic " + base64.b64encode(b"egress:" + PASSWORD.encode()).decode()


def proxy_url(proxy: EgressProxy, password: str = PASSWORD) -> str:
    return proxy.url.replace("http://", f"http://egress:{password.replace(' ', '%20')}@")


@dataclass
class Target:
    url: str
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
async def target() -> AsyncIterator[Callable[[ssl.SSLContext | None], Awaitable[Target]]]:
    """``await target(context)``: a server on 127.0.0.1 (https with ``context``) that answers
    200 and keeps each request's path, headers and body."""
    runners: list[web.AppRunner] = []

    async def start(context: ssl.SSLContext | None) -> Target:
        found = Target("")

        async def handle(request: web.Request) -> web.Response:
            found.seen.append((request.path, dict(request.headers), await request.read()))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        scheme = "https" if context is not None else "http"
        found.url = f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/in"
        return found

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def proxy() -> AsyncIterator[EgressProxy]:
    p = await EgressProxy(credentials=CREDENTIALS).start()
    yield p
    await p.aclose()


def server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server.configure_cert(context)
    return context


async def test_a_plain_http_forward_goes_through_the_proxy_with_its_credentials(
    tmp_path: Path, proxy: EgressProxy, target: Any
) -> None:
    t = await target(None)
    outcome = await forward_once(tmp_path, f'url = "{t.url}"\nproxy = "{proxy_url(proxy)}"')
    assert (outcome.kind, outcome.result) == ("done", {"status": 200})
    [asked] = proxy.asked
    assert (asked.method, asked.target) == ("POST", t.url)  # absolute form: the proxy's to send
    assert asked.authorization == BASIC
    [(path, headers, body)] = t.seen
    assert (path, body) == ("/in", make_event().body)
    assert "Proxy-Authorization" not in headers  # the proxy's own, not passed on


async def test_an_https_forward_is_tunnelled_with_connect_and_its_tls_is_end_to_end(
    tmp_path: Path, proxy: EgressProxy, target: Any
) -> None:
    pki = Pki(tmp_path / "pki")
    t = await target(server_context(pki))
    options = f'url = "{t.url}"\nproxy = "{proxy_url(proxy)}"\ntls = {files(pki, ca_file="ca.pem")}'
    outcome = await forward_once(tmp_path, options)
    assert outcome.kind == "done", outcome.error
    [asked] = proxy.asked
    assert (asked.method, asked.target) == ("CONNECT", t.url.split("/")[2])
    assert asked.authorization == BASIC
    assert [(path, body) for path, _h, body in t.seen] == [("/in", make_event().body)]


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_refusing_the_credentials_is_retried_and_named_without_them(
    tmp_path: Path, proxy: EgressProxy, target: Any, scheme: str
) -> None:
    pki = Pki(tmp_path / "pki")
    t = await target(server_context(pki) if scheme == "https" else None)
    options = f'url = "{t.url}"\nproxy = "{proxy_url(proxy, "wrong password")}"'
    if scheme == "https":
        options += f"\ntls = {files(pki, ca_file='ca.pem')}"
    outcome = await forward_once(tmp_path, options)
    assert outcome.kind == "retry"
    error = outcome.error or ""
    assert f"the proxy {proxy.url} answered 407" in error
    assert error.endswith(": check its user and password")
    assert "wrong" not in error and "egress" not in error
    assert t.seen == []


async def test_a_proxy_that_is_not_there_is_a_connection_failure_naming_it(
    tmp_path: Path, target: Any
) -> None:
    t = await target(None)
    gone = await EgressProxy().start()
    await gone.aclose()  # its port, with nothing listening on it now
    outcome = await forward_once(tmp_path, f'url = "{t.url}"\nproxy = "{gone.url}"')
    assert outcome.kind == "retry"
    port = gone.url.rsplit(":", 1)[1]
    assert outcome.error == (
        f"connection failed: cannot connect to the proxy 127.0.0.1:{port}: Connection refused"
    )


KEY = "sources.shop.actions[0].proxy"
LIKE = "like http://proxy.internal:3128"


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (
            "https://proxy.internal:3128",
            f"{KEY}: an https:// proxy is not supported: give its http:// address, {LIKE} (an"
            " https target's traffic is tunnelled through it, still TLS from end to end)",
        ),
        ("socks5://proxy.internal:1080", f"{KEY}: must be an http:// URL of a proxy, {LIKE}"),
        ("proxy.internal:3128", f"{KEY}: must be an http:// URL of a proxy, {LIKE}"),
        ("http://:3128", f"{KEY}: must be an http:// URL of a proxy, {LIKE}"),
        (
            "http://u:pw@proxy.internal:99999",
            f"{KEY}: has a port that is not a number from 1 to 65535 (in a password, write / as"
            " %2F)",
        ),
        (
            "http://u:pa/ss@proxy.internal:3128",
            f"{KEY}: has a port that is not a number from 1 to 65535 (in a password, write / as"
            " %2F)",
        ),
        ("http://proxy.internal", f"{KEY}: names no port: give the proxy's, {LIKE}"),
        (
            "http://pro xy:3128",
            f"{KEY}: has a host name with a space or a character no host name has",
        ),
        (
            "http://proxy.internal:3128/squid",
            f"{KEY}: names a host and a port only (and a user and password), {LIKE}",
        ),
        (
            "http://a%3Ab:pw@proxy.internal:3128",
            f"{KEY}: has a user name with a : in it, which Basic credentials cannot carry",
        ),
        (
            "http://{{ host }}:3128",
            f"{KEY}: is sent as written: {{{{ }}}} lookups are read only in a command's argv and"
            " an openai action's prompt and system",
        ),
    ],
    ids=[
        "https",
        "socks",
        "no-scheme",
        "no-host",
        "bad-port",
        "slash-in-password",
        "no-port",
        "space",
        "path",
        "colon-user",
        "template",
    ],
)
def test_a_proxy_value_that_cannot_be_used_is_a_config_error_that_never_quotes_it(
    tmp_path: Path, value: str, error: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        config_for(tmp_path, f'url = "http://billing.internal/in"\nproxy = "{value}"')
    assert str(raised.value) == error


def test_a_proxy_with_a_password_is_masked_and_one_written_out_is_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its password (and the Basic credentials made of it) is masked wherever the daemon shows
    text; written in the file rather than read from env:, ``check`` names the key."""
    inline = "http://egress:Zq8vN2pLx4Rt@proxy.internal:3128"
    said = "proxy refused egress:Zq8vN2pLx4Rt, ZWdyZXNzOlpxOHZOMnBMeDRSdA=="  # and as Basic
    cfg = config_for(tmp_path / "a", f'url = "http://billing.internal/in"\nproxy = "{inline}"')
    assert Masker(secret_values(cfg)).text(said) == "proxy refused egress:***, ***"
    assert written_out(cfg) == [KEY]

    monkeypatch.setenv("EGRESS_PROXY", inline)
    env = 'url = "http://billing.internal/in"\nproxy = "env:EGRESS_PROXY"'
    cfg = config_for(tmp_path / "b", env)
    assert Masker(secret_values(cfg)).text(said) == "proxy refused egress:***, ***"
    assert written_out(cfg) == []
    [action] = cfg.sources["shop"].actions
    read = read_proxy(Table(dict(action.options), action.key))
    assert read is not None and read.url == "http://proxy.internal:3128"
    assert "Zq8vN2pLx4Rt" not in repr(read)


async def test_a_daemon_forwards_through_the_proxy(
    tmp_path: Path, proxy: EgressProxy, target: Any, run_daemon: Any
) -> None:
    t = await target(None)
    cfg = config_for(tmp_path, f'url = "{t.url}"\nproxy = "{proxy_url(proxy)}"')
    running = await run_daemon(cfg)
    status, doc = await running.post("/hooks/shop", b'{"order": 42}')
    assert status == 202
    await event_state(running.http, running.admin_url, doc["id"], "done")
    assert [a.method for a in proxy.asked] == ["POST"]
    assert [body for _p, _h, body in t.seen] == [b'{"order": 42}']


async def test_an_openai_action_asks_and_sends_its_answer_on_through_the_proxy(
    tmp_path: Path, proxy: EgressProxy, target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``proxy`` on the action is for its own calls (the openai package's client), and
    ``then.proxy`` for the answer's post; each goes with the credentials."""
    monkeypatch.setenv("OPENAI_TLS_TEST_KEY", "sk-standin")
    clock = ManualClock()
    t = await target(None)
    standin = await StandIn(clock=clock).start()
    url = proxy_url(proxy)
    extra = f'proxy = "{url}"\nthen = {{ forward = "{t.url}", proxy = "{url}" }}'
    try:
        job = await openai_job(tmp_path, standin, clock, extra)
    finally:
        await standin.aclose()
    assert job.state == JobState.DONE, job.last_error
    assert [(a.method, a.target) for a in proxy.asked] == [
        ("POST", f"{standin.base_url}/chat/completions"),
        ("POST", t.url),
    ]
    assert {a.authorization for a in proxy.asked} == {BASIC}
    [(_path, _headers, body)] = t.seen
    assert b"Draft: Reply to Refund" in body


async def test_the_alerts_forward_takes_a_proxy_and_tls(
    tmp_path: Path, proxy: EgressProxy, target: Any
) -> None:
    """``[alerts]`` passes ``proxy`` and ``tls`` to its forward: a chat service reached only
    through an egress proxy, or a relay of your own behind a private CA."""
    pki = Pki(tmp_path / "pki")
    t = await target(server_context(pki))
    cfg = make_config(
        tmp_path,
        f'[alerts]\nurl = "{t.url}"\nproxy = "{proxy_url(proxy)}"\n'
        f"tls = {files(pki, ca_file='ca.pem')}",
    )
    assert cfg.alerts is not None
    [action_cfg] = cfg.alerts.source.actions
    async with aiohttp.ClientSession() as http:
        action = forward.create(action_cfg, Resources(config=cfg, http=http))
        event = make_event()
        outcome = await action.run(event, make_job(event))
    assert outcome.kind == "done", outcome.error
    assert [a.method for a in proxy.asked] == ["CONNECT"]

    with pytest.raises(ConfigError) as raised:
        make_config(tmp_path, '[alerts]\nurl = "https://hooks.example/x"\nproxy = "ftp://p:21"')
    assert str(raised.value) == f"alerts.proxy: must be an http:// URL of a proxy, {LIKE}"
