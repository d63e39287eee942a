"""The forward action against a real loopback target: what it sends, what it records, signing."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner
from conftest import Target, make_config
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from webhookd import actions
from webhookd.actions import forward
from webhookd.actions.base import Outcome, Resources
from webhookd.actions.client import open_session
from webhookd.cli import main
from webhookd.errors import ConfigError
from webhookd.models import Event, Job, JobState, Priority, new_event_id, new_job_id
from webhookd.schemes.standard import sign_standard

JSON_BODY = b'{"order": 42, "note": "caf\xc3\xa9"}'


def make_event(
    body: bytes = JSON_BODY, content_type: str = "application/json", query: str = ""
) -> Event:
    return Event(
        id=new_event_id(),
        source="shop",
        received_at=1_700_000_000.0,
        dedup_key="shop:x",
        tenant="",
        priority=Priority.NORMAL,
        headers=(("Content-Type", content_type), ("X-Provider-Only", "not forwarded")),
        body=body,
        query=query,
    )


def make_job(event: Event) -> Job:
    return Job(
        id=new_job_id(),
        event_id=event.id,
        action="forward",
        type="forward",
        state=JobState.RUNNING,
        attempts=1,
        max_attempts=10,
        run_at=event.received_at,
    )


Forward = Callable[..., Awaitable[Outcome]]


@pytest.fixture
async def send(tmp_path: Path) -> AsyncIterator[Callable[[str], Forward]]:
    """``send(options)(event)``: build a forward action from TOML options and run it once."""
    async with aiohttp.ClientSession() as http:

        def with_options(options: str) -> Forward:
            cfg = make_config(
                tmp_path, f'[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\n{options}'
            )
            [action_cfg] = cfg.sources["shop"].actions
            action = forward.create(action_cfg, Resources(config=cfg, http=http))

            async def run(event: Event | None = None) -> Outcome:
                event = event or make_event()
                return await action.run(event, make_job(event))

            return run

        yield with_options


def new_whsec() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", JSON_BODY),
        ("application/x-www-form-urlencoded", b"a=1&b=%20x&b=2"),
        ("application/octet-stream", bytes(range(256))),
    ],
    ids=["json", "form", "binary"],
)
async def test_body_and_content_type_pass_through_with_the_event_id(
    target: Target, send: Callable[[str], Forward], content_type: str, body: bytes
) -> None:
    """The target gets the exact bytes and content type, and the event id as both
    `webhook-id` and `Idempotency-Key`; the provider's own headers are not copied."""
    event = make_event(body, content_type)
    outcome = await send(f'url = "{target.url}/in"')(event)
    assert outcome.kind == "done" and outcome.result == {"status": 200}
    [seen] = target.seen
    assert (seen.method, seen.path, seen.body) == ("POST", "/in", body)
    assert seen.headers["Content-Type"] == content_type
    assert seen.headers["webhook-id"] == seen.headers["Idempotency-Key"] == event.id
    assert "X-Provider-Only" not in seen.headers
    assert "webhook-signature" not in seen.headers


async def test_the_headers_that_say_what_the_webhook_is_go_along(
    target: Target, send: Callable[[str], Forward]
) -> None:
    """A GitHub or Shopify service learns the event's kind from its headers: those are passed
    on by default, in the case they came in; `pass_headers` names others (or none), and a
    configured header of the same name wins."""
    event = make_event()
    event = Event(
        **{
            **{f: getattr(event, f) for f in Event.__dataclass_fields__},
            "headers": (
                ("Content-Type", "application/json"),
                ("X-GitHub-Event", "pull_request"),
                ("x-shopify-topic", "orders/create"),
                ("Shopify-Webhook-Id", "w-1"),  # an event subscription's, without X-
                ("X-Provider-Only", "kept back"),
                ("X-Token", "***"),
                ("X-Odd", "caf\udce9"),  # a latin-1 byte the parser could not decode
            ),
        }
    )
    assert (await send(f'url = "{target.url}/a"')(event)).kind == "done"
    assert (await send(f'url = "{target.url}/b"\npass_headers = []')(event)).kind == "done"
    run = send(
        f'url = "{target.url}/c"\npass_headers = ["X-Provider-Only", "X-Token", "X-Odd",'
        ' "X-GitHub-Event"]\nheaders = { X-GitHub-Event = "ping" }'
    )
    assert (await run(event)).kind == "done"
    a, b, c = target.seen
    assert (
        a.headers["X-GitHub-Event"],
        a.headers["x-shopify-topic"],
        a.headers["Shopify-Webhook-Id"],
    ) == ("pull_request", "orders/create", "w-1")
    assert "X-Provider-Only" not in a.headers
    assert not {"X-GitHub-Event", "x-shopify-topic"} & set(b.headers)
    assert (c.headers["X-Provider-Only"], c.headers["X-GitHub-Event"]) == ("kept back", "ping")
    assert not {"X-Token", "X-Odd", "x-shopify-topic"} & set(c.headers)


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ('pass_headers = "X-GitHub-Event"', "pass_headers", "must be an array"),
        ('pass_headers = ["X GitHub"]', "pass_headers[0]", "is not a header name"),
        ('pass_headers = ["a", "Content-Length"]', "pass_headers[1]", "forward's own to set"),
        ('pass_headers = ["webhook-signature"]', "pass_headers[0]", "forward's own to set"),
        ('pass_headers = ["Authorization"]', "pass_headers[0]", "is a credential"),
    ],
)
def test_pass_headers_that_cannot_be_passed_are_config_errors(
    tmp_path: Path, line: str, key: str, says: str
) -> None:
    text = (
        '[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\n'
        f'url = "http://127.0.0.1:9/x"\n{line}\n'
    )
    with pytest.raises(ConfigError, match=says) as err:
        actions.validate(make_config(tmp_path, text))
    assert err.value.key == f"sources.shop.actions[0].{key}"


@pytest.mark.parametrize(
    ("path", "received"),
    [
        ("/in", "store=eu&note=a%20b+c"),
        ("/in?from=webhookd", "from=webhookd&store=eu&note=a%20b+c"),
        ("/in?", "store=eu&note=a%20b+c"),
        ("/in?from=webhookd#top", "from=webhookd&store=eu&note=a%20b+c"),
    ],
)
async def test_pass_query_adds_the_webhooks_query_after_the_targets_own(
    target: Target, send: Callable[[str], Forward], path: str, received: str
) -> None:
    """With ``pass_query = true`` the target gets the webhook URL's query as it came in, after
    the configured URL's own (joined with ``&``); without it, only the configured URL's."""
    event = make_event(query="store=eu&note=a%20b+c")
    passing = send(f'url = "{target.url}{path}"\npass_query = true')
    assert (await passing(event)).kind == "done"
    assert (await send(f'url = "{target.url}/plain"')(event)).kind == "done"
    assert (await passing(make_event())).kind == "done"
    passed, plain, without = target.seen
    assert (passed.path, passed.query) == ("/in", received)
    assert (plain.path, plain.query) == ("/plain", "")
    assert without.query == path.partition("?")[2].partition("#")[0]


async def test_a_failed_forward_with_a_query_names_the_configured_url(
    target: Target, send: Callable[[str], Forward]
) -> None:
    """The error names the target as configured, not with the webhook's query added: a
    sender's ``?token=`` stays out of the journaled error, and one target's failures read as
    one cause in ``stats`` whatever each event's query."""
    target.default_status = 404
    outcome = await send(f'url = "{target.url}/in"\npass_query = true')(
        make_event(query="token=from-the-sender")
    )
    assert (outcome.kind, outcome.error) == ("dead", f"{target.url}/in answered 404")
    assert target.seen[0].query == "token=from-the-sender"


async def test_pass_query_sends_the_querys_bytes_as_they_came(
    target: Target, send: Callable[[str], Forward]
) -> None:
    """``%41`` stays ``%41`` and ``%2F`` stays ``%2F``: a target checking a signature over its
    query gets the bytes the sender signed (the client re-encoded a URL given as text)."""
    sent = "a=%41&g=%7E&h=%2F&%74oken=x&s=a+b"
    forward = send(f'url = "{target.url}/in?v=2"\npass_query = true')
    assert (await forward(make_event(query=sent))).kind == "done"
    assert target.seen[0].query == f"v=2&{sent}"


async def test_a_client_error_quoting_the_url_names_the_configured_one(
    send: Callable[[str], Forward],
) -> None:
    """A target answering what the client cannot parse: the client's error quotes the URL it
    sent to, with the webhook's query; the journaled error names the configured URL."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/in"
        outcome = await send(f'url = "{url}"\npass_query = true')(
            make_event(query="store=eu&token=from-the-sender")
        )
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.error is not None
    assert "from-the-sender" not in outcome.error and url in outcome.error, outcome.error


def test_a_pass_query_that_is_not_a_boolean_is_a_config_error_exit_2(tmp_path: Path) -> None:
    """``pass_query = "yes"`` is refused as other options are: one line naming the key, exit 2."""
    config = tmp_path / "webhookd.toml"
    config.write_text(
        '[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\n'
        'url = "http://127.0.0.1:9/x"\npass_query = "yes"\n'
    )
    result = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "webhookd: error: sources.shop.actions[0].pass_query: must be true or false, not a string"
    ]


def test_check_warns_of_a_fixed_idempotency_key(tmp_path: Path) -> None:
    """A ``headers`` Idempotency-Key (or webhook-id) is one value for every event: a service
    that drops repeats by it keeps the first delivery only. Said (exit 0), for a ``then`` too;
    a forward with neither is not warned of."""
    config = tmp_path / "webhookd.toml"
    config.write_text(
        '[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\nname = "ledger"\n'
        'url = "http://127.0.0.1:9/x"\n'
        '[[sources.shop.actions]]\ntype = "forward"\nname = "mailer"\n'
        'url = "http://127.0.0.1:9/x"\nheaders = { Idempotency-Key = "mailer" }\n'
        '[[sources.shop.actions]]\ntype = "openai"\nname = "ai"\napi_key = "sk-test"\n'
        'model = "m"\nprompt = "hi"\nmax_tokens = 100\n'
        'then = { forward = "http://127.0.0.1:9/y", headers = { webhook-id = "ai" } }\n'
    )
    result = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if "one value for every event" in line]
    assert [line.split(": one value")[0] for line in warned] == [
        "webhookd: warning: sources.shop.actions[1].headers.Idempotency-Key",
        "webhookd: warning: sources.shop.actions[2].then.headers.webhook-id",
    ], result.output


async def test_custom_headers_and_method_are_used(
    target: Target, send: Callable[[str], Forward]
) -> None:
    """`method` and `headers` from the config shape the request."""
    run = send(f'url = "{target.url}/put"\nmethod = "PUT"\nheaders = {{ X-Env = "test" }}')
    assert (await run()).kind == "done"
    [seen] = target.seen
    assert (seen.method, seen.headers["X-Env"], seen.body) == ("PUT", "test", JSON_BODY)


async def test_a_header_or_url_written_env_is_that_secret(
    target: Target, send: Callable[[str], Forward], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A downstream credential stays out of the config: ``"env:NAME"`` is read, not sent."""
    monkeypatch.setenv("FWD_URL", f"{target.url}/secret-path")
    monkeypatch.setenv("FWD_TOKEN", "Bearer downstream-token")
    run = send('url = "env:FWD_URL"\nheaders = { Authorization = "env:FWD_TOKEN", X-Env = "t" }')
    assert (await run()).kind == "done"
    [seen] = target.seen
    assert seen.path == "/secret-path"
    assert (seen.headers["Authorization"], seen.headers["X-Env"]) == (
        "Bearer downstream-token",
        "t",
    )


async def test_a_header_naming_a_variable_that_is_not_set_is_a_config_error(
    target: Target, send: Callable[[str], Forward], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FWD_UNSET", raising=False)
    with pytest.raises(ConfigError) as err:
        send(f'url = "{target.url}/x"\nheaders = {{ Authorization = "env:FWD_UNSET" }}')
    assert err.value.key == "sources.shop.actions[0].headers.Authorization"
    assert "FWD_UNSET" in str(err.value)


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ('{ Authorization = "env:FWD_TOKEN" }', "Authorization"),  # ends in a newline
        ('{ X-Tag = "a\\u0000b" }', "X-Tag"),
        ('{ X-Tag = "a\\r\\nX-Injected: 1" }', "X-Tag"),
        ('{ "X Tag" = "a" }', "X Tag"),
        ('{ "X-Tag:" = "a" }', "X-Tag:"),
    ],
)
def test_a_header_no_request_can_carry_is_a_config_error_not_a_failing_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, headers: str, key: str
) -> None:
    """A header name or value HTTP cannot carry (a secret from the environment ending in a
    newline, say) is refused at the start, naming its key and not showing the value: sent, it
    failed every attempt until the job went dead."""
    monkeypatch.setenv("FWD_TOKEN", "Bearer downstream-token\n")
    text = (
        '[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\n'
        f'url = "http://127.0.0.1:9/x"\nheaders = {headers}\n'
    )
    with pytest.raises(ConfigError) as err:
        actions.validate(make_config(tmp_path, text))
    assert err.value.key == f"sources.shop.actions[0].headers.{key}"
    assert "downstream-token" not in str(err.value)


@pytest.mark.parametrize(
    ("action", "key"),
    [
        ('type = "forward"\nurl = "env:FWD_URL"\nheaders = { authorization = "Bearer t" }', ""),
        (
            'type = "openai"\napi_key = "env:FWD_TOKEN"\nmodel = "m"\nmax_tokens = 10\n'
            'prompt = "p"\nthen = { forward = "env:FWD_URL", headers = { authorization = "t" } }',
            "then.",
        ),
    ],
    ids=["forward", "openai-then"],
)
def test_an_authorization_header_beside_a_user_and_password_in_the_url_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, key: str
) -> None:
    """A URL with a user and password sends them as Basic credentials, and the client refuses
    an ``Authorization`` header besides: it passed ``check``, then failed every attempt. Now
    ``check`` is exit 2 naming the header's key, never showing the password."""
    monkeypatch.setenv("FWD_URL", "http://hooks:SUPERSECRET@127.0.0.1:9/in")
    monkeypatch.setenv("FWD_TOKEN", "sk-test")
    config = tmp_path / "webhookd.toml"
    config.write_text(f"[sources.shop]\n[[sources.shop.actions]]\n{action}\n")
    result = CliRunner().invoke(main, ["check", "--config", str(config)])
    assert (result.exit_code, result.output.splitlines()) == (
        2,
        [
            f"webhookd: error: sources.shop.actions[0].{key}headers.authorization: cannot be sent"
            " with the user and password in the URL, which already go as Basic credentials:"
            " give one or the other"
        ],
    )
    monkeypatch.setenv("FWD_URL", "http://127.0.0.1:9/in")  # the header alone is fine
    assert CliRunner().invoke(main, ["check", "--config", str(config)]).exit_code == 0


@pytest.mark.parametrize("url", ["htps://hooks.example.com/T0/SUPERSECRET", "http://[SUPERSECRET"])
def test_a_secret_url_that_is_not_one_is_refused_without_showing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A forward's URL read from env: may hold a token: its error names the key, never the
    value (a config error is printed, and logged by a refused reload)."""
    monkeypatch.setenv("FWD_URL", url)
    text = '[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\nurl = "env:FWD_URL"\n'
    with pytest.raises(ConfigError) as err:
        actions.validate(make_config(tmp_path, text))
    assert err.value.key == "sources.shop.actions[0].url"
    assert "is not an http(s) URL" in str(err.value)
    assert "SUPERSECRET" not in str(err.value)


async def test_the_daemon_keeps_no_cookies_from_one_delivery_to_the_next(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """A target's Set-Cookie is not sent back with later deliveries (another event, tenant or
    source may be next): the daemon's HTTP client keeps no cookies."""
    target.headers = {"Set-Cookie": "session=from-target; Path=/"}
    url = target.url.replace("127.0.0.1", "localhost")  # cookies are not kept for IP addresses
    cfg = make_config(
        tmp_path, f'[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\nurl = "{url}/in"\n'
    )
    running = await run_daemon(cfg)
    pool = running.daemon.pool
    assert pool is not None
    finished: asyncio.Queue[None] = asyncio.Queue()
    pool.on_finish.append(lambda *_: finished.put_nowait(None))
    for n in range(2):  # one after the other: the first's answer is in before the second goes
        status, _ = await running.post("/hooks/shop", b'{"n": %d}' % n)
        assert status == 202
        await asyncio.wait_for(finished.get(), 10.0)
    assert [s.headers.get("Cookie") for s in target.seen] == [None, None]
    assert pool.outcomes["done"] == 2


def forward_source(url: str, method: str = "POST") -> str:
    return (
        f'[sources.shop]\n[[sources.shop.actions]]\ntype = "forward"\nurl = "{url}"\n'
        f'method = "{method}"\n'
    )


class IdleCloser:
    """A raw target on 127.0.0.1 that closes each connection, unanswered, at its request
    number ``closes_at`` (its keep-alive timeout running out just as the request came),
    having answered 200 to those before; with ``begun``, after the first line of its answer
    (it had the request, and was answering)."""

    def __init__(self, closes_at: int, begun: bool = False) -> None:
        self.closes_at = closes_at
        self.begun = begun
        self.requests: list[int] = []  # each request's connection, numbered from 0
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection, self.connections = self.connections, self.connections + 1
        try:
            for n in range(1, self.closes_at + 1):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)  # all read: closed on it unread, a reset
                self.requests.append(connection)
                if n == self.closes_at:
                    if self.begun:
                        writer.write(b"HTTP/1.1 200 OK\r\n")
                        await writer.drain()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except asyncio.IncompleteReadError:
            return  # the client closed it
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def deliver_one_by_one(running: Any, n: int) -> list[tuple[int, str]]:
    """Post ``n`` webhooks to ``/hooks/shop``, each once the one before is finished; the
    (attempt, outcome) each attempt finished with."""
    pool = running.daemon.pool
    finished: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    pool.on_finish.append(lambda _, __, f: finished.put_nowait((f.attempt, f.outcome)))
    outcomes = []
    for i in range(n):
        assert (await running.post("/hooks/shop", b'{"n": %d}' % i))[0] == 202
        outcomes.append(await asyncio.wait_for(finished.get(), 10.0))
    return outcomes


async def test_a_reused_connection_the_target_closed_is_sent_again_at_once(
    tmp_path: Path, run_daemon: Any
) -> None:
    """A target closing an idle keep-alive connection as the next request goes out on it
    cost that webhook a failed attempt and a 10 s backoff: the request is sent again at once
    on a new connection (it carries an Idempotency-Key), and both webhooks are done at their
    first attempt."""
    target = IdleCloser(closes_at=2)
    async with target as url:
        cfg = make_config(tmp_path, forward_source(f"{url}/in"))
        outcomes = await deliver_one_by_one(await run_daemon(cfg), 2)
    assert outcomes == [(1, "done"), (1, "done")]
    assert target.requests == [0, 0, 1]  # the second on the first connection, then a new one


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_new_connection_closed_unanswered_is_not_sent_again(
    tmp_path: Path, run_daemon: Any, method: str
) -> None:
    """Only a reused connection is sent on again: a target closing a new one before it answers
    has had the request, and the attempt fails (retried later, with its backoff). A PUT too,
    which aiohttp's client sent again itself, on a new connection as on a reused one."""
    target = IdleCloser(closes_at=1)
    async with target as url:
        cfg = make_config(tmp_path, forward_source(f"{url}/in", method))
        outcomes = await deliver_one_by_one(await run_daemon(cfg), 1)
    assert outcomes == [(1, "retry")]
    assert target.requests == [0]


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_connection_closed_once_the_answer_began_is_not_sent_again(
    tmp_path: Path, run_daemon: Any, method: str
) -> None:
    """A reused connection closed after the first line of the answer: the target had the
    request and was answering, so it is no keep-alive race; sent again at once, the target
    got it twice."""
    target = IdleCloser(closes_at=2, begun=True)
    async with target as url:
        cfg = make_config(tmp_path, forward_source(f"{url}/in", method))
        outcomes = await deliver_one_by_one(await run_daemon(cfg), 2)
    assert outcomes == [(1, "done"), (1, "retry")]
    assert target.requests == [0, 0]


@pytest.mark.parametrize(("status", "kind"), [(200, "done"), (500, "retry"), (404, "dead")])
async def test_attempt_detail_records_status_duration_and_response_head(
    target: Target, send: Callable[[str], Forward], status: int, kind: str
) -> None:
    """Every answered attempt keeps the status, the duration and the first 1 KB of the reply."""
    target.default_status = status
    target.body = b"0123456789" * 300
    outcome = await send(f'url = "{target.url}/x"')()
    assert outcome.kind == kind
    assert outcome.detail["status"] == status
    assert 0 <= outcome.detail["duration_s"] < 30
    assert outcome.detail["response"] == ("0123456789" * 300)[:1024]


@pytest.mark.parametrize("status", [200, 401])
async def test_a_secret_the_response_heads_cut_falls_inside_is_masked_whole(
    target: Target,
    send: Callable[[str], Forward],
    monkeypatch: pytest.MonkeyPatch,
    status: int,
) -> None:
    """The answer's first 1 KB is masked before it is cut: a target quoting the token it was
    sent across byte 1,024 (a 401 page) leaves ***, not the token's first 11 characters
    (masked after the cut, they would be no secret the masker knows)."""
    token = "sk-live-Q7vR2mX9pL4tW8nB3kH6jD1fG5sA0zYc"
    monkeypatch.setenv("WEBHOOKD_TEST_TOKEN", token)
    target.default_status = status
    target.body = b"x" * 1000 + b" invalid key " + token.encode()  # the token from byte 1,013
    options = f'url = "{target.url}/x"\nheaders = {{ X-Api-Key = "env:WEBHOOKD_TEST_TOKEN" }}'
    outcome = await send(options)()
    assert outcome.detail["status"] == status
    assert outcome.detail["response"] == "x" * 1000 + " invalid key ***"


async def test_an_answer_whose_body_never_comes_is_decided_by_its_status(
    send: Callable[[str], Forward],
) -> None:
    """A target that sends ``200`` and its headers, then stalls its body, has the webhook: it is
    done, not timed out and delivered again; the detail says the body had not come."""
    stalled = asyncio.Event()

    async def headers_only(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Length": "100"})
        await response.prepare(request)
        await stalled.wait()
        return response

    app = web.Application()
    app.router.add_post("/x", headers_only)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        outcome = await send(f'url = "http://127.0.0.1:{port}/x"')()
    finally:
        stalled.set()
        await runner.cleanup()
    assert outcome.kind == "done"
    assert outcome.detail["status"] == 200
    assert outcome.detail["response"] == (
        "(no body yet with the head: a 2xx is not kept waiting for one)"
    )


@pytest.mark.parametrize(
    ("coding", "status", "kind"),
    [("br", 200, "done"), ("zstd", 204, "done"), ("gzip", 503, "retry")],
)
async def test_a_body_the_client_cannot_decode_leaves_the_status_to_decide(
    target: Target, send: Callable[[str], Forward], coding: str, status: int, kind: str
) -> None:
    """A 2xx in a Content-Encoding the client cannot decode (br without Brotli, or not what it
    says) failed as the client's own 400, and the target had the webhook again at each retry:
    it is done at once, the detail saying the body is not shown. A 503 is retried as a 503.
    Bodies are asked for plain."""
    target.default_status = status
    target.headers = {"Content-Encoding": coding}
    target.body = b"\x8b\x08 neither br, zstd nor gzip"
    outcome = await send(f'url = "{target.url}/x"')()
    assert (outcome.kind, outcome.detail["status"]) == (kind, status)
    assert outcome.error == (None if kind == "done" else f"{target.url}/x answered {status}")
    shown = "" if status == 204 else f"(a body in Content-Encoding {coding}, not shown)"
    assert outcome.detail["response"] == shown
    [seen] = target.seen
    assert seen.headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize(("status", "kind"), [(200, "done"), (503, "retry")])
async def test_a_body_that_breaks_off_leaves_the_status_to_decide(
    send: Callable[[str], Forward], status: int, kind: str
) -> None:
    """A target that sends its status and headers and then closes the connection before its
    body has answered: a 200 is done (not sent again), a 503 retried as a 503, not as a
    connection failure; the detail says why the body is not there."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(len(JSON_BODY))  # read: closed with it unread, a reset
        writer.write(b"HTTP/1.1 %d Whatever\r\nContent-Length: 100\r\n\r\n" % status)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        outcome = await send(f'url = "http://127.0.0.1:{port}/x"')()
    finally:
        server.close()
        await server.wait_closed()
    assert (outcome.kind, outcome.detail["status"]) == (kind, status)
    if kind == "retry":
        assert outcome.error == f"http://127.0.0.1:{port}/x answered 503"
        said = ("(the body could not be read: ClientPayloadError",)
    else:  # a 2xx's body is not waited for: what had come with the head, or that none had
        said = ("(the body could not be read: ClientPayloadError", "(no body yet with the head")
    assert outcome.detail["response"].startswith(said)


@pytest.mark.parametrize(
    ("answer_head", "said"),
    [
        (
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
            "answered what is not HTTP the client can read: Got more than 8190 bytes",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Cut", "closed the connection within"),
    ],
)
async def test_an_answer_the_client_cannot_read_says_so(
    send: Callable[[str], Forward], answer_head: bytes, said: str
) -> None:
    """A head past the client's limits, or cut short: retried, and the error says what the
    target did, not "connection failed: ClientResponseError: 400" (no status it sent) nor the
    parser's record of a part-read head."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(len(JSON_BODY))
        writer.write(answer_head)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/in"
        outcome = await send(f'url = "{url}"')()
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.kind == "retry"
    assert outcome.error is not None and outcome.error.startswith(url), outcome.error
    assert said in outcome.error and "RawResponseMessage" not in outcome.error, outcome.error
    assert len(outcome.error) < 400, outcome.error


@pytest.mark.parametrize(
    ("header_bytes", "kind"), [(9_000, "done"), (60_000, "done"), (70_000, "retry")]
)
async def test_the_daemons_client_reads_a_2xx_with_a_header_line_as_long_as_http_client_does(
    tmp_path: Path, header_bytes: int, kind: str
) -> None:
    """A 2xx whose head has a header of 9 KB (a session cookie, a content policy) is done,
    not sent again at every attempt: lines up to 64 KiB are read, as Python's http.client does."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(len(JSON_BODY))
        cookie = b"Set-Cookie: s=" + b"a" * header_bytes + b"\r\n"
        writer.write(b"HTTP/1.1 200 OK\r\n" + cookie + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = make_config(
        tmp_path,
        "[sources.shop]\n[[sources.shop.actions]]\n"
        f'type = "forward"\nurl = "http://127.0.0.1:{port}/in"',
    )
    try:
        async with open_session(4) as http:
            [action_cfg] = cfg.sources["shop"].actions
            action = forward.create(action_cfg, Resources(config=cfg, http=http))
            event = make_event()
            outcome = await action.run(event, make_job(event))
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.kind == kind, outcome.error
    if kind == "retry":
        assert outcome.error is not None and "Got more than 65536 bytes" in outcome.error


async def test_connection_refused_is_retried(send: Callable[[str], Forward]) -> None:
    """A target that refuses the connection is a retryable failure, not a dead job."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        port = closed.getsockname()[1]
        outcome = await send(f'url = "http://127.0.0.1:{port}/x"')()
    assert outcome.kind == "retry"
    refused = os.strerror(errno.ECONNREFUSED)
    assert outcome.error == f"connection failed: cannot connect to 127.0.0.1:{port}: {refused}"
    assert "duration_s" in outcome.detail


async def test_signature_verifies_with_the_standard_webhooks_library(
    target: Target, send: Callable[[str], Forward]
) -> None:
    """With a `whsec_` secret, the official Standard Webhooks library accepts the delivery."""
    secret = new_whsec()
    event = make_event()
    assert (await send(f'url = "{target.url}/s"\nsecret = "{secret}"')(event)).kind == "done"
    [seen] = target.seen
    assert seen.headers["webhook-id"] == event.id
    assert Webhook(secret).verify(seen.body, seen.headers) == {"order": 42, "note": "café"}


def readme_verifier() -> Callable[..., bool]:
    """The ``verify`` function README.md gives for checking a forward's signature by hand."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    after = readme.split("**Checking a forward's signature**", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(code, scope)
    verify: Callable[..., bool] = scope["verify"]
    return verify


async def test_the_readmes_verifier_accepts_a_forward_and_refuses_a_forgery(
    target: Target, send: Callable[[str], Forward]
) -> None:
    """The by-hand check README.md shows accepts a delivery signed during a rotation with
    either secret, and refuses another secret, a changed body and an old timestamp."""
    verify = readme_verifier()
    old, new, other = new_whsec(), new_whsec(), new_whsec()
    assert (await send(f'url = "{target.url}/s"\nsecrets = ["{old}", "{new}"]')()).kind == "done"
    [seen] = target.seen
    assert verify(old, seen.headers, seen.body) and verify(new, seen.headers, seen.body)
    assert not verify(other, seen.headers, seen.body)
    assert not verify(new, seen.headers, seen.body + b" ")
    # Signed right but long ago: refused for its timestamp alone.
    msg_id = seen.headers["webhook-id"]
    for age_s, fresh in ((200, True), (301, False)):
        ts = int(time.time()) - age_s
        signed = sign_standard([new], msg_id=msg_id, timestamp=ts, body=seen.body)
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signed}
        assert verify(new, headers, seen.body) is fresh


async def test_a_webhook_id_replaced_in_any_case_is_the_one_signed(
    target: Target, send: Callable[[str], Forward]
) -> None:
    """``headers`` may replace webhookd's own ``webhook-id`` (names in any case are one): the
    request then carries that one alone and the signature covers it. The signature headers
    themselves are the signing's: naming one is a config error (``test_config``)."""
    secret = new_whsec()
    headers = '{ "WEBHOOK-ID" = "msg_custom", "X-A" = "1" }'
    outcome = await send(f'url = "{target.url}/s"\nsecret = "{secret}"\nheaders = {headers}')()
    assert outcome.kind == "done"
    [seen] = target.seen
    sent = [(k.lower(), v) for k, v in seen.headers.items()]  # each header as it came
    assert [v for k, v in sent if k == "webhook-id"] == ["msg_custom"]
    assert len([v for k, v in sent if k == "webhook-signature"]) == 1
    assert Webhook(secret).verify(seen.body, dict(sent)) == {"order": 42, "note": "café"}


async def test_rotated_secrets_each_sign_the_delivery(
    target: Target, send: Callable[[str], Forward]
) -> None:
    """With `secrets = [old, new]`, a receiver holding either one accepts the delivery."""
    old, new, other = new_whsec(), new_whsec(), new_whsec()
    assert (await send(f'url = "{target.url}/s"\nsecrets = ["{old}", "{new}"]')()).kind == "done"
    [seen] = target.seen
    for secret in (old, new):
        assert Webhook(secret).verify(seen.body, seen.headers)["order"] == 42
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(seen.body, seen.headers)


async def test_a_2xx_whose_body_comes_late_is_done_within_timeout_s(tmp_path: Path) -> None:
    """A target that sends ``200`` and its headers at once but its body later: the forward
    waited up to 2 s for the body's start, the attempt's timeout_s (1 s) ended first, and the
    200 was recorded as timed out and sent again, ten times. A 2xx's body is not waited for."""
    from actionkit import action_kit

    body_sent = asyncio.Event()
    requests = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
        await writer.drain()
        await body_sent.wait()  # the body, once the test is over
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    extra = f"""
[sources.s]
[[sources.s.actions]]
type = "forward"
url = "http://127.0.0.1:{port}/in"
timeout_s = 1
"""
    try:
        async with action_kit(tmp_path, extra) as kit:
            event_id = await kit.send("s", {"a": 1})
            await kit.run()
            job = await kit.job(event_id)
    finally:
        body_sent.set()
        server.close()
        await server.wait_closed()
    assert (job.state, requests) == (JobState.DONE, 1)
    assert job.history[-1].detail["response"] == (
        "(no body yet with the head: a 2xx is not kept waiting for one)"
    )
