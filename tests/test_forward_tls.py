"""A forward's ``tls`` table (and an ``openai`` action's ``then.tls``) against real HTTPS servers
on 127.0.0.1: a private CA trusted in place of the system's, a client certificate presented
(mutual TLS), and every file that cannot be used refused at load, naming its key. Certificates
are made per test by ``trustme``."""

from __future__ import annotations

import functools
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from actionkit import action_kit
from aiohttp import web
from conftest import make_config
from cryptography.hazmat.primitives import serialization  # trustme's own dependency
from openai_standin import StandIn
from ops_support import event_state
from test_forward import make_event, make_job
from test_send import _webhookd as webhookd_cli
from test_send import cfg_text

from webhookd.actions import forward
from webhookd.actions.base import Outcome, Resources
from webhookd.clock import ManualClock
from webhookd.errors import ConfigError
from webhookd.models import Job, JobState


@dataclass
class Pki:
    """A private CA, the server's certificate for 127.0.0.1 and a client's, as PEM files."""

    folder: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.folder.mkdir(exist_ok=True)
        self.server = self.ca.issue_cert("127.0.0.1")
        self.client = self.ca.issue_cert("billing-client.example")
        self.write("ca.pem", self.ca.cert_pem.bytes())
        self.write("client.pem", self.client.cert_chain_pems[0].bytes())
        self.write("client.key", self.client.private_key_pem.bytes())
        self.write("client-and-key.pem", self.client.private_key_and_cert_chain_pem.bytes())

    def write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.write_bytes(data)
        return str(path)


@dataclass
class TlsTarget:
    url: str
    peers: list[Any]  # the client certificate each request came with (None: none)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
async def tls_target(pki: Pki) -> AsyncIterator[Callable[[bool], Awaitable[TlsTarget]]]:
    """``await tls_target(mutual)``: an HTTPS server on 127.0.0.1 with the private CA's
    certificate that answers 200; ``mutual``: it asks for a client certificate of that CA."""
    runners: list[web.AppRunner] = []

    async def start(mutual: bool) -> TlsTarget:
        peers: list[Any] = []

        async def handle(request: web.Request) -> web.Response:
            await request.read()
            peers.append(
                request.transport.get_extra_info("peercert") if request.transport else None
            )
            return web.Response(text="ok")

        if mutual:
            context = mutual_context(pki)
        else:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            pki.server.configure_cert(context)
        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        return TlsTarget(f"https://127.0.0.1:{port}/in", peers)

    yield start
    for runner in runners:
        await runner.cleanup()


def action_options(url: str, tls: str | None = None) -> str:
    return f'url = "{url}"' + (f"\ntls = {tls}" if tls is not None else "")


def config_for(tmp_path: Path, options: str) -> Any:
    return make_config(
        tmp_path, f'[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\n{options}'
    )


async def forward_once(tmp_path: Path, options: str) -> Outcome:
    """Build a forward from TOML options and run it once on one event."""
    cfg = config_for(tmp_path, options)
    [action_cfg] = cfg.sources["shop"].actions
    async with aiohttp.ClientSession() as http:
        action = forward.create(action_cfg, Resources(config=cfg, http=http))
        event = make_event()
        return await action.run(event, make_job(event))


@pytest.fixture
def send(tmp_path: Path) -> Callable[[str], Awaitable[Outcome]]:
    """``await send(options)``: ``forward_once`` in this test's folder."""
    return functools.partial(forward_once, tmp_path)


def files(pki: Pki, **names: str) -> str:
    """A TOML inline table of the PKI's files: ``ca_file="ca.pem"`` → its path."""
    return (
        "{ "
        + ", ".join(f"{k} = {json.dumps(str(pki.folder / v))}" for k, v in names.items())
        + " }"
    )


async def test_a_private_cas_server_is_reached_with_its_ca_file_and_refused_without(
    pki: Pki, tls_target: Callable[[bool], Awaitable[TlsTarget]], send: Any
) -> None:
    target = await tls_target(False)
    refused = await send(action_options(target.url))
    assert refused.kind == "retry"  # the system's CAs do not know this one
    assert "certificate verify failed" in (refused.error or "")

    done = await send(action_options(target.url, files(pki, ca_file="ca.pem")))
    assert (done.kind, done.result) == ("done", {"status": 200})
    assert target.peers == [None]  # the refused one never got as far as a request


async def test_the_ca_file_replaces_the_systems_trust_rather_than_adding_to_it(
    tmp_path: Path, pki: Pki, tls_target: Callable[[bool], Awaitable[TlsTarget]], send: Any
) -> None:
    """A ca_file of another CA: the server's own CA is not trusted any more, whatever the
    system's store holds."""
    target = await tls_target(False)
    other = Pki(tmp_path / "other")
    outcome = await send(action_options(target.url, files(other, ca_file="ca.pem")))
    assert outcome.kind == "retry" and "certificate verify failed" in (outcome.error or "")


@pytest.mark.parametrize(
    "client",
    [{"cert_file": "client.pem", "key_file": "client.key"}, {"cert_file": "client-and-key.pem"}],
)
async def test_a_client_certificate_is_presented_to_a_server_that_asks_for_one(
    pki: Pki, tls_target: Callable[[bool], Awaitable[TlsTarget]], send: Any, client: dict[str, str]
) -> None:
    target = await tls_target(True)
    outcome = await send(action_options(target.url, files(pki, ca_file="ca.pem", **client)))
    assert (outcome.kind, outcome.result) == ("done", {"status": 200})
    [peer] = target.peers
    assert peer["subjectAltName"] == (("DNS", "billing-client.example"),)

    without = await send(action_options(target.url, files(pki, ca_file="ca.pem")))
    assert without.kind == "retry"  # the server ends the handshake: retried, as any TLS failure
    assert len(target.peers) == 1


async def test_a_renewed_client_certificate_is_read_when_the_action_is_built_again(
    tmp_path: Path, pki: Pki, tls_target: Callable[[bool], Awaitable[TlsTarget]], send: Any
) -> None:
    """The files are read at each load (a reload builds the actions again): a certificate
    renewed in place is the one the next build presents."""
    target = await tls_target(True)
    options = action_options(
        target.url, files(pki, ca_file="ca.pem", cert_file="client-and-key.pem")
    )
    assert (await send(options)).kind == "done"
    stranger = trustme.CA().issue_cert("stranger.example")  # of a CA the server does not trust
    pki.write("client-and-key.pem", stranger.private_key_and_cert_chain_pem.bytes())
    assert (await send(options)).kind == "retry"
    renewed = pki.ca.issue_cert("renewed.example")
    pki.write("client-and-key.pem", renewed.private_key_and_cert_chain_pem.bytes())
    assert (await send(options)).kind == "done"
    assert [p["subjectAltName"][0][1] for p in target.peers] == [
        "billing-client.example",
        "renewed.example",
    ]


def encrypted(pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.client.private_key_pem.bytes(), password=None)
    pki.write(
        "encrypted.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"a passphrase"),
        ),
    )


KEY = "sources.shop.actions[0].tls"


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        ({"ca_file": "nowhere.pem"}, f"{KEY}.ca_file: cannot be read: No such file or directory"),
        ({"ca_file": "."}, f"{KEY}.ca_file: cannot be read: Is a directory"),
        ({"ca_file": "client.key"}, f"{KEY}.ca_file: holds no PEM CA certificate"),
        (
            {"cert_file": "client.pem", "key_file": "nowhere.key"},
            f"{KEY}.key_file: cannot be read: No such file or directory",
        ),
        ({"cert_file": "client.key"}, f"{KEY}.cert_file: holds no PEM certificate"),
        ({"cert_file": "client.pem"}, f"{KEY}.cert_file: holds no PEM private key"),
        (
            {"cert_file": "client.pem", "key_file": "other.key"},
            f"{KEY}.key_file: is not the private key of cert_file's certificate",
        ),
        (
            {"cert_file": "client.pem", "key_file": "encrypted.key"},
            f"{KEY}.key_file: holds an encrypted private key: give it unencrypted, readable by"
            " the daemon's user only",
        ),
        (
            {"key_file": "client.key"},
            f"{KEY}.key_file: needs cert_file, the certificate it goes with",
        ),
        ({}, f"{KEY}: names no file: give ca_file, cert_file, or both"),
    ],
    ids=[
        "missing-ca",
        "ca-folder",
        "ca-not-a-certificate",
        "missing-key",
        "cert-not-a-certificate",
        "cert-without-key",
        "key-of-another-certificate",
        "encrypted-key",
        "key-without-cert",
        "empty",
    ],
)
def test_tls_files_that_cannot_be_used_are_config_errors_naming_the_key(
    tmp_path: Path, pki: Pki, tls: dict[str, str], error: str
) -> None:
    encrypted(pki)
    pki.write("other.key", pki.ca.issue_cert("other.example").private_key_pem.bytes())
    options = action_options("https://billing.internal/in", files(pki, **tls))
    with pytest.raises(ConfigError) as raised:
        config_for(tmp_path, options)
    assert str(raised.value) == error


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            action_options("http://billing.internal/in", '{ ca_file = "ca.pem" }'),
            f"{KEY}: is for an https url: this url is plain http",
        ),
        (
            action_options("https://billing.internal/in", '{ cafile = "ca.pem" }'),
            f"{KEY}.cafile: unknown key in tls (did you mean ca_file?)",
        ),
        (
            action_options("https://billing.internal/in", '"ca.pem"'),
            f"{KEY}: must be a table, not a string",
        ),
    ],
    ids=["plain-http", "misspelt", "not-a-table"],
)
def test_a_tls_table_that_does_not_fit_the_url_or_is_misspelt_is_a_config_error(
    tmp_path: Path, options: str, error: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        config_for(tmp_path, options)
    assert str(raised.value) == error


async def test_a_daemon_forwards_over_mutual_tls(
    tmp_path: Path, pki: Pki, tls_target: Callable[[bool], Awaitable[TlsTarget]], run_daemon: Any
) -> None:
    target = await tls_target(True)
    options = action_options(
        target.url, files(pki, ca_file="ca.pem", cert_file="client-and-key.pem")
    )
    running = await run_daemon(config_for(tmp_path, options))
    status, doc = await running.post("/hooks/shop", b'{"order": 42}')
    assert status == 202
    await event_state(running.http, running.admin_url, doc["id"], "done")
    assert [p["subjectAltName"][0][1] for p in target.peers] == ["billing-client.example"]


def openai_source(standin: StandIn, extra: str = "") -> str:
    """A source whose one openai action asks the stand-in, plus ``extra`` options."""
    return f"""
[sources.mail]
[[sources.mail.actions]]
type = "openai"
api_key = "env:OPENAI_TLS_TEST_KEY"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
prompt = "Reply to {{{{ subject }}}}"
max_tokens = 50
{extra}
"""


async def openai_job(tmp_path: Path, standin: StandIn, clock: ManualClock, extra: str = "") -> Job:
    """One webhook through ``openai_source(standin, extra)``: its job, as the run left it."""
    async with action_kit(tmp_path, openai_source(standin, extra), clock=clock) as kit:
        event_id = await kit.send("mail", {"subject": "Refund"})
        await kit.run()
        return await kit.job(event_id)


async def test_an_openai_actions_answer_goes_on_over_mutual_tls(
    tmp_path: Path,
    pki: Pki,
    tls_target: Callable[[bool], Awaitable[TlsTarget]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_TLS_TEST_KEY", "sk-standin")
    clock = ManualClock()
    target = await tls_target(True)
    tls = files(pki, ca_file="ca.pem", cert_file="client.pem", key_file="client.key")
    standin = await StandIn(clock=clock).start()
    try:
        then = f'then = {{ forward = "{target.url}", tls = {tls} }}'
        job = await openai_job(tmp_path, standin, clock, then)
    finally:
        await standin.aclose()
    assert job.state == JobState.DONE, job.last_error
    assert [p["subjectAltName"][0][1] for p in target.peers] == ["billing-client.example"]


def mutual_context(pki: Pki) -> ssl.SSLContext:
    """A server's TLS with the private CA's certificate, asking for a client's of that CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    pki.server.configure_cert(context)
    pki.ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_an_openai_action_reaches_a_model_server_of_its_own_over_mutual_tls(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tls`` on the action itself is for its ``base_url``: a self-hosted model server behind
    a private CA that asks for a client certificate. Without it the call is retried."""
    monkeypatch.setenv("OPENAI_TLS_TEST_KEY", "sk-standin")
    clock = ManualClock()
    standin = await StandIn(clock=clock).start(mutual_context(pki))
    tls = files(pki, ca_file="ca.pem", cert_file="client-and-key.pem")
    try:
        done = await openai_job(tmp_path / "with", standin, clock, f"tls = {tls}")
        refused = await openai_job(tmp_path / "without", standin, clock)
    finally:
        await standin.aclose()
    assert done.state == JobState.DONE, done.last_error
    assert done.result["text"] == "Draft: Reply to Refund"
    assert refused.state == JobState.QUEUED and refused.attempts == 1  # retried later
    assert standin.received == 1


async def test_send_trusts_a_private_ca_given_with_cacert(
    tmp_path: Path, pki: Pki, tls_target: Callable[[bool], Awaitable[TlsTarget]]
) -> None:
    """`webhookd send --url https://...` to a proxy with a private CA's certificate: without
    --cacert one line says the certificate could not be verified and what to give; with the
    CA's file it is posted; a file with no certificate in it is a usage error naming it."""
    target = await tls_target(False)
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    base = ("send", "gh", "--url", target.url.replace("/in", "/hooks/gh"), "--config", str(path))
    code, out, err = await webhookd_cli(*base)
    assert (code, out) == (1, "")
    [line] = err.splitlines()
    assert "certificate verify failed" not in line and "unable to get local issuer" in line
    assert line.endswith("a private CA's certificate goes in --cacert"), line
    assert target.peers == []

    code, out, err = await webhookd_cli(
        *base, "--cacert", pki.write("ca.pem", pki.ca.cert_pem.bytes())
    )
    assert (code, out.splitlines()[0], err) == (0, "200 OK", "")
    assert len(target.peers) == 1

    code, out, err = await webhookd_cli(*base, "--cacert", pki.write("not.pem", b"nothing\n"))
    assert (code, out) == (2, "")
    assert err.startswith("webhookd: error: --cacert ") and "no CA certificate" in err, err
