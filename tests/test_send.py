"""``webhookd send``: request building, the daemon's address, exit codes, and the real command."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from click.testing import CliRunner
from conftest import Target

from webhookd import config as config_mod
from webhookd import send
from webhookd.cli import main
from webhookd.errors import ConfigError
from webhookd.schemes import default_dedup, verify

NOW = 1_750_000_000.0


def cfg_text(listen: str = "127.0.0.1:0", secret: str = "gh-secret", extra: str = "") -> str:
    return f"""
[server]
listen = "{listen}"
[admin]
listen = "127.0.0.1:0"
[sources.gh]
verify = {{ scheme = "github", secret = "{secret}" }}
[[sources.gh.actions]]
type = "log"
[sources.tw]
path = "/in/twilio"
verify = {{ scheme = "twilio", secret = "tw", url = "https://example.com/in/twilio" }}
[[sources.tw.actions]]
type = "log"
{extra}
"""


def test_default_body_carries_the_delivery_id() -> None:
    """The default payload is JSON (a form for Twilio), deterministic, with the id inside."""
    doc = json.loads(send.default_body("slack", "d1"))
    assert doc["id"] == doc["event_id"] == "d1"
    stripe = json.loads(send.default_body("stripe", "evt_1"))  # an event as Stripe shapes one
    assert (stripe["id"], stripe["object"], stripe["type"]) == ("evt_1", "event", "webhookd.test")
    assert send.default_body("slack", "d1") == send.default_body("slack", "d1")
    assert dict(parse_qsl(send.default_body("twilio", "SM1").decode()))["MessageSid"] == "SM1"


@pytest.mark.parametrize(
    ("listen", "name", "url"),
    [
        ("0.0.0.0:8080", "gh", "http://127.0.0.1:8080/hooks/gh"),
        ("[::]:9000", "tw", "http://[::1]:9000/in/twilio"),
        ("10.0.0.5:80", "anything", "http://10.0.0.5:80/hooks/anything"),
    ],
)
def test_source_url_from_listen(listen: str, name: str, url: str) -> None:
    """The default URL is the daemon's listen address (wildcards → loopback) plus the path."""
    cfg = config_mod.loads(cfg_text(listen, extra='[sources."*"]\n'), "t")
    assert send.source_url(cfg, name) == url


def test_source_url_needs_a_port_and_a_source() -> None:
    """Port 0 and an unknown source (without a catch-all) are config errors naming the key."""
    cfg = config_mod.loads(cfg_text(), "t")
    with pytest.raises(ConfigError, match=r"server\.listen"):
        send.source_url(cfg, "gh")
    with pytest.raises(ConfigError, match=r"^no source 'nope' in t \(configured: gh, tw\)$"):
        send.resolve(cfg, "nope")


def test_twilio_json_gets_body_hash_in_url() -> None:
    """A JSON body for Twilio is posted with bodySHA256 in the query, and it verifies."""
    src = config_mod.loads(cfg_text(), "t").sources["tw"]
    body = b'{"CallSid": "CA1"}'
    d = send.build(src, url="http://127.0.0.1:1/in/twilio?x=1", body=body, now=NOW, delivery_id="i")
    query = dict(parse_qsl(urlsplit(d.url).query))
    assert query == {"x": "1", "bodySHA256": hashlib.sha256(body).hexdigest()}
    assert src.verify is not None
    assert verify(src.verify, headers=d.headers, body=d.body, url=d.url, now=NOW).scheme == "twilio"
    assert default_dedup("twilio", d.headers, d.body) == "i"


def test_unsigned_source_gets_plain_request() -> None:
    """A source without verify gets the body as is, with its content type guessed."""
    src = config_mod.SourceConfig(name="plain", path="/hooks/plain")
    d = send.build(src, url="http://h/hooks/plain", body=b"\x00raw", now=NOW, delivery_id="i")
    assert (d.headers, d.body) == ({"Content-Type": "application/octet-stream"}, b"\x00raw")
    d = send.build(src, url="http://h/hooks/plain", body=None, now=NOW, delivery_id="i")
    assert d.headers["Content-Type"] == "application/json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["nope"], 2, "no source 'nope'"),
        (["gh"], 2, "server.listen: has port 0"),
        (["gh", "--url", "http://127.0.0.1:{port}/hooks/gh"], 1, "cannot reach"),
        (["gh", "--url", "not a url"], 1, "could not post"),
        (["gh", "-H", "X-GitHub-Event push"], 2, "--header 'X-GitHub-Event push': write it"),
        (["gh", "-H", "Bad Name: x"], 2, "write it 'Name: value'"),
    ],
)
def test_cli_errors_and_exit_codes(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    """Usage and config errors exit 2; a daemon that cannot be reached exits 1."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    args = [a.replace("{port}", str(_free_port())) for a in args]
    result = CliRunner().invoke(main, ["send", *args, "--config", str(path)])
    assert result.exit_code == code, result.output
    assert message in result.output


def test_send_names_the_dotted_key_of_a_malformed_whsec_secret(tmp_path: Path) -> None:
    """`send` to a source whose whsec_ secret is not base64 exits 2 naming the config key."""
    path = tmp_path / "webhookd.toml"
    bad = '[sources.sw]\nverify = { scheme = "standard", secret = "whsec_!!!" }\n'
    path.write_text(cfg_text(extra=bad))
    url = f"http://127.0.0.1:{_free_port()}/hooks/sw"
    result = CliRunner().invoke(main, ["send", "sw", "--url", url, "--config", str(path)])
    assert (result.exit_code, result.output) == (
        2,
        "webhookd: error: sources.sw.verify.secret: is not valid whsec_ base64\n",
    )


def test_send_needs_only_its_own_sources_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another source's unset variable (or the admin token's) does not stop a test of this
    one; this one's unset variable is named."""
    monkeypatch.delenv("SEND_TEST_UNSET", raising=False)
    path = tmp_path / "webhookd.toml"
    others = (
        '[sources.shop]\nverify = { scheme = "shopify", secret = "env:SEND_TEST_UNSET" }\n'
        '[sources.gh2]\nverify = { scheme = "github", secret = "env:SEND_TEST_UNSET" }\n'
    )
    path.write_text(cfg_text(extra=others))
    url = f"http://127.0.0.1:{_free_port()}/hooks/gh"  # nothing listens: the post fails (exit 1)
    result = CliRunner().invoke(main, ["send", "gh", "--url", url, "--config", str(path)])
    assert (result.exit_code, "cannot reach" in result.output) == (1, True), result.output
    result = CliRunner().invoke(main, ["send", "gh2", "--url", url, "--config", str(path)])
    assert result.exit_code == 2
    assert "sources.gh2.verify.secret" in result.output and "SEND_TEST_UNSET" in result.output


@pytest.mark.parametrize("name", ["a b", ".x", "a%00", "*"])
def test_send_refuses_a_name_no_source_can_have(tmp_path: Path, name: str) -> None:
    """A name outside [A-Za-z0-9._-]{1,64} is exit 2 naming it, even beside a catch-all."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text(listen=f"127.0.0.1:{_free_port()}", extra='[sources."*"]\n'))
    result = CliRunner().invoke(main, ["send", name, "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output == (
        f"webhookd: error: no source {name!r}: a source's name is 1 to 64 characters from "
        "[A-Za-z0-9._-], not starting with '.'\n"
    )


async def _webhookd(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WEBHOOKD_CONFIG"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "webhookd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_send_command_against_running_daemon(
    tmp_path: Path, target: Target, run_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m webhookd send`: 0 and 202 (verdict in `show`), 0 and duplicate, 1 on a 401
    with a note naming the variable its secret came from (never its value)."""
    forward = f'[[sources.gh.actions]]\ntype = "forward"\nurl = "{target.url}/gh"\n'
    good = tmp_path / "good.toml"
    good.write_text(cfg_text(extra=forward) + f'[journal]\npath = "{tmp_path / "w.db"}"\n')
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(cfg_text(secret="env:SEND_TEST_STALE_SECRET"))
    monkeypatch.setenv("SEND_TEST_STALE_SECRET", "a-stale-secret")
    r = await run_daemon(config_mod.load(good))
    url = f"{r.url}/hooks/gh"
    payload = tmp_path / "push.json"
    payload.write_bytes(b'{"ref": "refs/heads/main"}')

    sent = ("send", "gh", "--config", str(good), "--url", url, "--id", "d1")
    code, out, err = await _webhookd(*sent)
    assert (code, err) == (0, "")
    status, answer = out.splitlines()
    assert status == "202 Accepted"
    first = json.loads(answer)
    assert first["duplicate"] is False
    await target.wait_for(lambda t: len(t.seen) == 1)
    assert target.seen[0].headers["webhook-id"] == first["id"]
    code, out, _ = await _webhookd("show", first["id"], "--json", "--config", str(good))
    verified = json.loads(out)["verified"]
    assert (code, verified["scheme"], verified["secret_index"]) == (0, "github", 0)

    code, out, _ = await _webhookd(*sent)
    assert code == 0
    assert json.loads(out.splitlines()[1]) == {"id": first["id"], "duplicate": True}

    code, out, err = await _webhookd(
        "send", "gh", "--config", str(wrong), "--url", url, "--file", str(payload)
    )
    assert code == 1
    assert out.splitlines() == ["401 Unauthorized", '{"error": "signature mismatch"}']
    assert err == (
        "webhookd: note: the secret in SEND_TEST_STALE_SECRET (sources.gh.verify.secret) in this"
        " shell must be the one the daemon was started with (a reload does not read env:"
        " values again)\n"
    )
    assert r.daemon.journal is not None
    assert len(await r.daemon.journal.list_events(source="gh")) == 1


def test_the_401_note_says_a_reload_reads_a_file_secret_again_and_not_an_env_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``env:`` secret is the daemon's environment's as it started (a reload keeps it); a
    ``file:`` one and one written in the file are read again by a reload."""
    monkeypatch.setenv("SEND_NOTE_SECRET", "gh-secret-of-the-shell")
    key = tmp_path / "gh"
    key.write_text("gh-secret-in-a-file\n", encoding="utf-8")
    notes = []
    for written in ("env:SEND_NOTE_SECRET", f"file:{key}", "gh-secret-written-out"):
        cfg = config_mod.loads(cfg_text(secret=written), "webhookd.toml")
        notes.append(send.refused_note(cfg, cfg.sources["gh"]))
    assert notes == [
        "the secret in SEND_NOTE_SECRET (sources.gh.verify.secret) in this shell must be the one"
        " the daemon was started with (a reload does not read env: values again)",
        f"the secret in {key} (sources.gh.verify.secret) must be the one the daemon read when it"
        " started or last reloaded",
        "sources.gh.verify.secret in webhookd.toml must be the one the daemon read when it"
        " started or last reloaded",
    ]


def test_extra_headers_go_beside_the_providers_and_replace_one_of_the_same_name() -> None:
    """``send -H``: a header the provider does not send (GitHub's event name, for a ``when``
    filter) goes with the signed ones; one of the same name, in any case, is replaced."""
    src = config_mod.loads(cfg_text(), "t").sources["gh"]
    plain = send.build(src, url="http://x/hooks/gh", body=b"{}", now=0.0, delivery_id="d1")
    extra = [send.parse_header("X-GitHub-Event: push"), ("x-github-delivery", "d2")]
    sent = send.build(
        src, url="http://x/hooks/gh", body=b"{}", now=0.0, delivery_id="d1", extra_headers=extra
    )
    assert sent.headers["X-GitHub-Event"] == "push" and sent.headers["x-github-delivery"] == "d2"
    assert "X-GitHub-Delivery" not in sent.headers
    assert sent.headers["X-Hub-Signature-256"] == plain.headers["X-Hub-Signature-256"]
    with pytest.raises(ValueError, match="line break"):
        send.parse_header("X-A: b\r\nX-Injected: c")


# A path a provider can be given that a URL cannot hold as it is: a space, non-ASCII.
ODD_PATH = """
[sources.inbox]
path = "/hooks/in box/ü"
[[sources.inbox.actions]]
type = "log"
"""


def test_source_url_percent_encodes_the_path() -> None:
    """The path is percent-encoded as UTF-8: the receiver decodes it back to the source's path."""
    cfg = config_mod.loads(cfg_text("127.0.0.1:8080", extra=ODD_PATH), "t")
    assert send.source_url(cfg, "inbox") == "http://127.0.0.1:8080/hooks/in%20box/%C3%BC"


def test_the_alerts_source_is_no_source_to_send_to_and_the_error_says_why() -> None:
    """The catch-all takes any name a source could have but the alerts' own; the error says so."""
    cfg = config_mod.load(None)  # the embedded default: a catch-all and nothing else
    with pytest.raises(ConfigError) as caught:
        send.resolve(cfg, "webhookd")
    assert str(caught.value) == (
        "no source 'webhookd' in embedded default (configured: none); the catch-all \"*\""
        ' never takes "webhookd" (the alerts\')'
    )
    assert send.resolve(cfg, "a-b.c_9").name == "*"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hooks/a b",  # http.client refuses the space: InvalidURL
        "http://127.0.0.1:{port}/hooks/é",  # and the non-ASCII: UnicodeEncodeError
        "http://[::1/hooks/x",  # urllib cannot parse the host
    ],
)
def test_a_url_that_cannot_be_posted_to_is_one_line_and_exit_1(tmp_path: Path, url: str) -> None:
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    url = url.replace("{port}", str(_free_port()))
    result = CliRunner().invoke(main, ["send", "gh", "--url", url, "--config", str(path)])
    assert result.exit_code == 1, result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"webhookd: error: could not post to {url}: "), line
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Nothing listens there: the URL is shown as the error's, its password masked.
        ("http://u:Zq9Qx8@127.0.0.1:{port}/hooks/gh", "cannot reach http://u:***@127.0.0.1:{port}"),
        ("http://u:Zq9%40Qx8@127.0.0.1:{port}/hooks/gh", "cannot reach http://u:***@127.0.0.1"),
        # A space is no harm in a password sent as Basic auth.
        ("http://u:Zq9 Qx8@127.0.0.1:{port}/hooks/gh", "cannot reach http://u:***@127.0.0.1"),
        # http.client refuses the space in the path.
        ("http://u:Zq9Qx8@127.0.0.1:{port}/hooks/g h", "could not post to http://u:***@127.0.0.1"),
        # A bare / ends the host early: "Zq9" reads as a port, and is quoted as one.
        ("http://u:Zq9/Qx8@127.0.0.1:{port}/hooks/gh", "could not post to http://u:***@127.0.0.1"),
        ("u:Zq9Qx8@127.0.0.1:{port}/hooks/gh", "cannot reach u:***@127.0.0.1"),
    ],
)
def test_a_password_in_the_url_is_never_printed(tmp_path: Path, url: str, shown: str) -> None:
    """A --url with a user and password that cannot be posted to: the one error line shows
    the URL with its password as ***, and no part of the password anywhere."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    port = str(_free_port())
    url, shown = url.replace("{port}", port), shown.replace("{port}", port)
    result = CliRunner().invoke(main, ["send", "gh", "--url", url, "--config", str(path)])
    assert result.exit_code == 1, result.output
    [line] = result.output.splitlines()
    assert line.startswith(f"webhookd: error: {shown}"), line
    assert "Zq9" not in line and "Qx8" not in line, line


async def test_a_user_and_password_in_the_url_go_as_basic_auth(
    tmp_path: Path, target: Target
) -> None:
    """`send --url https://user:pw@host/...` posts as a provider does to such a URL (a proxy
    in front of the daemon asking for Basic auth): the user part goes as the Authorization
    header, percent-decoded, not in the request line, and the signature is untouched."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    url = target.url.replace("http://", "http://hooks:pa%40ss word@") + "/hooks/gh"
    code, out, err = await _webhookd("send", "gh", "--url", url, "--config", str(path))
    assert (code, out.splitlines()[0], err) == (0, "200 OK", "")
    [seen] = target.seen
    basic = base64.b64encode(b"hooks:pa@ss word").decode("ascii")
    assert (seen.path, seen.headers["Authorization"]) == ("/hooks/gh", f"Basic {basic}")
    src = config_mod.loads(cfg_text(), "t").sources["gh"]
    assert src.verify is not None
    checked = verify(src.verify, headers=seen.headers, body=seen.body, url=url, now=time.time())
    assert checked.scheme == "github"

    # An Authorization header of the sender's own wins over the URL's.
    target.seen.clear()
    own = ("send", "gh", "--url", url, "-H", "Authorization: Bearer t1", "--config", str(path))
    code, _, _ = await _webhookd(*own)
    assert code == 0 and target.seen[0].headers["Authorization"] == "Bearer t1"


async def test_a_header_value_that_is_not_ascii_goes_as_utf_8(
    tmp_path: Path, target: Target
) -> None:
    """`send -H 'X-Shop-Name: Café ✓'` posts the value as UTF-8, as a provider would: not as
    Latin-1 bytes the daemon cannot pass on, nor a failed post for a character past Latin-1."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    url = target.url + "/hooks/gh"
    args = ("send", "gh", "--url", url, "-H", "X-Shop-Name: Café ✓", "--config", str(path))
    code, out, err = await _webhookd(*args)
    assert (code, out.splitlines()[0], err) == (0, "200 OK", "")
    [seen] = target.seen
    assert seen.headers["X-Shop-Name"] == "Café ✓"


async def test_a_redirect_is_the_answer_and_what_a_server_answers_is_printed_escaped(
    tmp_path: Path, target: Target
) -> None:
    """A redirect is not followed: urllib sent the request on, its credentials with it (the
    token scheme's secret, a --url's Basic auth), and printed the answer of a GET there as a
    delivery. The answer's reason and body are printed with their controls escaped, so none
    reaches the terminal as a sequence it obeys."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    target.default_status = 302
    target.headers = {"Location": f"{target.url}/landed"}
    target.body = b'{"error": "\x1b]0;HACKED\x07\x1b[2J all good"}'
    url = target.url.replace("http://", "http://hooks:pw-secret@") + "/hooks/gh"
    code, out, err = await _webhookd("send", "gh", "--url", url, "--config", str(path))
    assert [seen.path for seen in target.seen] == ["/hooks/gh"]  # nothing sent on
    assert (code, err) == (1, "")
    assert out.splitlines() == [
        "302 Found",
        f"redirect to {target.url}/landed not followed",
        '{"error": "\\x1b]0;HACKED\\x07\\x1b[2J all good"}',
    ]


def test_a_url_without_a_password_is_shown_as_it_is() -> None:
    """Only a password is masked: an @ in the path beside a port, or a user alone, stays."""
    for url in ("http://127.0.0.1:8080/hooks/a@b", "http://u@h/x", "https://h/x?to=a@b"):
        assert send.shown_url(url) == url


@pytest.mark.slow
async def test_send_to_a_source_with_a_space_and_non_ascii_in_its_path(
    tmp_path: Path, run_daemon: Any
) -> None:
    """`python -m webhookd send inbox` reaches a source whose path holds a space and a
    non-ASCII letter: 202 and an event of that source, through a real daemon and the real
    command."""
    path = tmp_path / "odd.toml"
    text = cfg_text(extra=ODD_PATH) + f'[journal]\npath = "{tmp_path / "w.db"}"\n'
    path.write_text(text, encoding="utf-8")
    r = await run_daemon(config_mod.load(path))
    path.write_text(text.replace("127.0.0.1:0", r.daemon.bound.receiver, 1), encoding="utf-8")
    code, out, err = await _webhookd("send", "inbox", "--config", str(path))
    assert (code, err) == (0, ""), out
    assert out.splitlines()[0] == "202 Accepted", out
    assert r.daemon.journal is not None
    assert len(await r.daemon.journal.list_events(source="inbox")) == 1


@pytest.mark.parametrize(("name", "meant"), [("ghh", "gh"), ("GH", "gh"), ("tiw", "tw")])
def test_a_misspelt_source_is_exit_2_not_the_catch_all(
    tmp_path: Path, name: str, meant: str
) -> None:
    """A name close to a configured source is a slip: exit 2 naming the source it most likely
    meant, not a delivery that the catch-all takes unsigned."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text(listen=f"127.0.0.1:{_free_port()}", extra='[sources."*"]\n'))
    result = CliRunner().invoke(main, ["send", name, "--config", str(path)])
    assert (result.exit_code, result.output) == (
        2,
        f"webhookd: error: no source {name!r} in {path} (configured: gh, tw)"
        f" (did you mean {meant}?)\n",
    )


@pytest.mark.parametrize("name", ["webhookd", "WebhookD"])
def test_the_alerts_name_in_any_case_is_exit_2_not_the_catch_all(tmp_path: Path, name: str) -> None:
    """The receiver answers 404 for the alerts' reserved name in any case, catch-all or not:
    send says so instead of sending."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text(listen=f"127.0.0.1:{_free_port()}", extra='[sources."*"]\n'))
    result = CliRunner().invoke(main, ["send", name, "--config", str(path)])
    assert (result.exit_code, result.output) == (
        2,
        f"webhookd: error: no source {name!r} in {path} (configured: gh, tw);"
        ' the catch-all "*" never takes "webhookd" (the alerts\')\n',
    )


def test_a_name_for_the_catch_all_is_sent_with_a_note_that_it_goes_unsigned(
    tmp_path: Path,
) -> None:
    """A name far from every source goes to the catch-all, and stderr says so: unsigned."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text(extra='[sources."*"]\n'))
    url = f"http://127.0.0.1:{_free_port()}/hooks/billing"  # nothing listens: exit 1
    result = CliRunner().invoke(main, ["send", "billing", "--url", url, "--config", str(path)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == (
        f"webhookd: note: no source 'billing' in {path}: it goes to the catch-all \"*\", unsigned"
    )


def test_a_daemon_not_running_is_one_plain_line_naming_where_its_address_comes_from(
    tmp_path: Path,
) -> None:
    """Nothing listening: the reason without urllib's wrapping, and where the address was
    taken from (server.listen in the config, or --url)."""
    port = _free_port()
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text(listen=f"127.0.0.1:{port}"))
    result = CliRunner().invoke(main, ["send", "gh", "--config", str(path)])
    assert (result.exit_code, result.output) == (
        1,
        f"webhookd: error: cannot reach http://127.0.0.1:{port}/hooks/gh: Connection refused:"
        f" is the daemon running? (server.listen in {path})\n",
    )
    url = f"http://127.0.0.1:{port}/elsewhere"
    result = CliRunner().invoke(main, ["send", "gh", "--url", url, "--config", str(path)])
    assert (result.exit_code, result.output) == (
        1,
        f"webhookd: error: cannot reach {url}: Connection refused: is the daemon running?"
        " (--url)\n",
    )


def test_a_meta_source_without_its_app_secret_names_the_full_key(tmp_path: Path) -> None:
    """A Meta source set up for the handshake alone (verify_token, no secret) cannot be signed
    for: exit 2 naming sources.NAME.verify.secret, as every other config error names its key."""
    path = tmp_path / "webhookd.toml"
    meta = '[sources.fb]\nverify = { scheme = "meta", verify_token = "tok-1234" }\n'
    path.write_text(cfg_text(extra=meta))
    url = f"http://127.0.0.1:{_free_port()}/hooks/fb"
    result = CliRunner().invoke(main, ["send", "fb", "--url", url, "--config", str(path)])
    assert (result.exit_code, result.output) == (
        2,
        "webhookd: error: sources.fb.verify.secret: is required to sign for scheme 'meta'\n",
    )


def test_send_help_lists_its_exit_codes_2_included() -> None:
    """`send --help` says what each exit code means, as `check --help` says it exits 2."""
    result = CliRunner().invoke(main, ["send", "--help"])
    assert result.exit_code == 0
    assert (
        "Exits 0 on a 2xx answer, 1 on any other answer or a network failure, 2 on a usage or"
        " config error (naming the option or key: an unknown source, a secret not set)."
    ) in " ".join(result.output.split())


SLACK = '[sources.sl]\nverify = { scheme = "slack", secret = "sl-secret" }\n'


@pytest.mark.parametrize(
    ("source", "header", "replaced", "reason"),
    [
        ("gh", "X-Hub-Signature-256: sha256=00", "X-Hub-Signature-256", "signature mismatch"),
        # Beside one that does not break it (send sets it too): only the one that does.
        (
            "gh",
            "X-GitHub-Event: push' -H 'X-Hub-Signature-256: sha256=00",
            "X-Hub-Signature-256",
            "signature mismatch",
        ),
        ("sl", "x-slack-request-timestamp: 1", "x-slack-request-timestamp", "signature mismatch"),
        ("tw", "Content-Type: text/plain", "Content-Type", "unsigned body"),
    ],
)
def test_a_header_that_breaks_the_signature_is_warned_of(
    tmp_path: Path, source: str, header: str, replaced: str, reason: str
) -> None:
    """-H replacing the signature, its timestamp or what else the scheme checks: a warning
    that the request does not verify (and the post goes on, as asked)."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text(extra=SLACK))
    url = f"http://127.0.0.1:{_free_port()}/hooks/{source}"  # nothing listens: exit 1
    headers = [arg for h in header.split("' -H '") for arg in ("-H", h)]
    result = CliRunner().invoke(
        main, ["send", source, *headers, "--url", url, "--config", str(path)]
    )
    assert result.exit_code == 1, result.output
    scheme = {"gh": "github", "sl": "slack", "tw": "twilio"}[source]
    assert result.stderr.splitlines()[0] == (
        f"webhookd: warning: --header {replaced}: replaces what {scheme} verifies: the request"
        f" does not verify with sources.{source}.verify's secret ({reason}), so the daemon will"
        " likely answer 401"
    )


def test_a_header_the_signature_does_not_cover_is_sent_without_a_warning(tmp_path: Path) -> None:
    """-H X-GitHub-Event or a delivery id of one's own: the request still verifies, so stderr
    says only that the post failed."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    url = f"http://127.0.0.1:{_free_port()}/hooks/gh"
    args = ["-H", "X-GitHub-Event: push", "-H", "X-GitHub-Delivery: mine", "--url", url]
    result = CliRunner().invoke(main, ["send", "gh", *args, "--config", str(path)])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"webhookd: error: cannot reach {url}: ")


STRIPE = '[sources.pay]\nverify = { scheme = "stripe", secret = "whsec_pay" }\n'


@pytest.mark.parametrize(
    ("source", "body", "note"),
    [
        (
            "pay",
            b'{"id": "evt_in_file", "object": "event"}',
            "stripe reads the delivery id from the body's \"id\", which is 'evt_in_file' in this"
            " --file",
        ),
        (
            "sl",
            b'{"type": "event_callback"}',
            'slack reads the delivery id from the body\'s "event_id", which this --file has'
            " not: its hash is used",
        ),
    ],
)
def test_id_beside_a_file_says_where_the_delivery_id_is_read_instead(
    tmp_path: Path, source: str, body: bytes, note: str
) -> None:
    """Stripe and Slack take the delivery id from the body, which --file sends as it is: a
    note says --id is not what the daemon reads."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text(extra=STRIPE + SLACK))
    payload = tmp_path / "event.json"
    payload.write_bytes(body)
    url = f"http://127.0.0.1:{_free_port()}/hooks/{source}"  # nothing listens: exit 1
    args = ["--file", str(payload), "--id", "mine", "--url", url, "--config", str(path)]
    result = CliRunner().invoke(main, ["send", source, *args])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"webhookd: note: --id is not sent: {note}"


@pytest.mark.parametrize(
    ("dedup", "note"),
    [
        (
            '"json:id"',
            "webhookd: note: --id is not the delivery id the daemon reads:"
            " sources.gh.dedup reads it from json:id",
        ),
        ('"header:X-GitHub-Delivery"', None),
    ],
)
def test_id_beside_a_file_says_so_when_the_sources_own_dedup_reads_elsewhere(
    tmp_path: Path, dedup: str, note: str | None
) -> None:
    """A source's own ``dedup`` rule decides what the delivery id is: --id is said not to be it
    unless the rule reads the very header --id is sent in."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text().replace("[sources.gh]", f"[sources.gh]\ndedup = {dedup}", 1))
    payload = tmp_path / "push.json"
    payload.write_bytes(b'{"id": 7, "ref": "refs/heads/main"}')
    url = f"http://127.0.0.1:{_free_port()}/hooks/gh"
    args = ["--file", str(payload), "--id", "mine", "--url", url, "--config", str(path)]
    result = CliRunner().invoke(main, ["send", "gh", *args])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert (lines[0] if len(lines) == 2 else None) == note
    assert lines[-1].startswith(f"webhookd: error: cannot reach {url}: ")


def test_id_beside_a_file_for_a_header_scheme_goes_without_a_note(tmp_path: Path) -> None:
    """GitHub's delivery id is a header: --id is sent with any --file, and nothing is said."""
    path = tmp_path / "webhookd.toml"
    path.write_text(cfg_text())
    payload = tmp_path / "push.json"
    payload.write_bytes(b'{"ref": "refs/heads/main"}')
    url = f"http://127.0.0.1:{_free_port()}/hooks/gh"
    args = ["--file", str(payload), "--id", "mine", "--url", url, "--config", str(path)]
    result = CliRunner().invoke(main, ["send", "gh", *args])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"webhookd: error: cannot reach {url}: ")


def test_github_and_shopify_test_deliveries_name_their_event_as_the_providers_do() -> None:
    """GitHub's test is a ping (its first delivery to a new hook is one), Shopify's an order
    created in an example shop; -H replaces either, and both still verify."""
    shop = '[sources.shop]\nverify = { scheme = "shopify", secret = "sh-secret" }\n'
    cfg = config_mod.loads(cfg_text(extra=shop), "t")
    gh = send.build(cfg.sources["gh"], url="http://x/hooks/gh", body=None, now=NOW, delivery_id="d")
    assert gh.headers["X-GitHub-Event"] == "ping"
    src = cfg.sources["shop"]
    sent = send.build(src, url="http://x/hooks/shop", body=None, now=NOW, delivery_id="d")
    topic = (sent.headers["X-Shopify-Topic"], sent.headers["X-Shopify-Shop-Domain"])
    assert topic == ("orders/create", "example.myshopify.com")
    # Shopify's libraries refuse a delivery that does not say its API version.
    assert re.fullmatch(r"\d{4}-\d{2}", sent.headers["X-Shopify-API-Version"])
    assert src.verify is not None
    assert verify(src.verify, headers=sent.headers, body=sent.body, url=sent.url, now=NOW)
    pushed = send.build(
        cfg.sources["gh"],
        url="http://x/hooks/gh",
        body=None,
        now=NOW,
        delivery_id="d",
        extra_headers=[send.parse_header("X-GitHub-Event: push")],
    )
    assert pushed.headers["X-GitHub-Event"] == "push"
