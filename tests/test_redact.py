"""How request headers are stored: credentials masked whatever their case, the rest as sent."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request
from click.testing import CliRunner

from webhookd import actions
from webhookd import config as config_mod
from webhookd.cli import main
from webhookd.redact import (
    MASK,
    SECRET_HEADERS,
    WRITTEN_OUT,
    Masker,
    redact_headers,
    redact_request_headers,
    secret_parts,
    secret_values,
    shown_query,
    written_out,
)

CASES = [
    [("Content-Type", "application/json"), ("X-Request-Id", "a1")],
    [("authorization", "Bearer t"), ("Content-Type", "application/json")],
    [("COOKIE", "s=1"), ("X-Api-Key", "k"), ("Cookie", "s=2"), ("Accept", "*/*")],
    [("X-Gitlab-Token", "t"), ("X-Gitlab-Token", "u")],
]


@pytest.mark.parametrize("sent", CASES)
def test_request_headers_are_stored_as_the_generic_rule_stores_them(
    sent: list[tuple[str, str]],
) -> None:
    """The request fast path (ask the case-insensitive headers for each secret name) stores
    exactly what masking every header by its lower-cased name stores, order and repeats kept."""
    headers = make_mocked_request("POST", "/hooks/x", headers=sent).headers
    stored = redact_request_headers(headers, SECRET_HEADERS)
    assert stored == redact_headers(sent, SECRET_HEADERS)
    assert [name for name, _ in stored] == [name for name, _ in sent]
    secret = [v for (k, _), (_, v) in zip(sent, stored, strict=True) if k.lower() in SECRET_HEADERS]
    assert secret == [MASK] * len(secret)


_WRITTEN = """
[admin]
token = "admin-token-inline"
[journal]
url = "postgresql://webhookd:pg-password@db.internal/webhookd"
[sources.shop]
verify = { scheme = "github", secrets = ["old-inline-secret", "env:WRITTEN_TEST_NEW"] }
[[sources.shop.actions]]
type = "openai"
model = "m"
prompt = "p"
max_tokens = 10
api_key = "sk-inline-key"
then = { forward = "http://127.0.0.1:9/then", secret = "whsec_aW5saW5lLXRoZW4tc2VjcmV0" }
[[sources.shop.actions]]
type = "forward"
url = "http://127.0.0.1:9/plain"
[sources.shop.actions.headers]
Authorization = "Bearer inline-header-777"
X-Idempotency-Key = "orders-v2-2024"
X-Routing-Key = "orders.created"
X-Author = "integration-team"
[[sources.shop.actions]]
type = "forward"
name = "userinfo"
url = "http://u:inline-url-pw@127.0.0.1:9/in"
[[sources.shop.actions]]
type = "command"
argv = ["/bin/true"]
[sources.shop.actions.env]
DEPLOY_TOKEN = "inline-env-555"
AWS_SECRET_ACCESS_KEY = "inline-aws-secret"
SORT_KEY = "received_at"
REGION = "eu-west-1-long"
GIT_AUTHOR_NAME = "Deploy Bot"
OAUTH_REDIRECT_URL = "https://example.com/callback"
[[sources.shop.actions]]
type = "forward"
name = "keyed"
url = "https://relay.example.com/in?api_key=inline-query-key&x=1"
[[sources.shop.actions]]
type = "forward"
name = "slack"
url = "https://hooks.slack.com/services/T0ABC1234/B0DEF5678/inlinePathToken1234abcd"
[sources.mail]
verify = { scheme = "github", secret = "env:WRITTEN_TEST_NEW" }
[alerts]
url = "https://hooks.example.com/services/T1/B2/inline-alert-url-token"
"""


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        ("", ""),
        ("store=eu&event=created", "store=eu&event=created"),
        ("store=eu&token=t0k&sig=abc&note=a%20b", "store=eu&token=***&sig=***&note=a%20b"),
        (
            "X-Hub-Signature=s&api_key=k&access%5Ftoken=z&Password=p",
            "X-Hub-Signature=***&api_key=***&access%5Ftoken=***&Password=***",
        ),
        ("key=k&&flag&secret=&code=1", "key=***&&flag&secret=***&code=***"),
        (
            "pwd=p&jwt=j&passwd=q&session=s&sid=i&side=l",
            "pwd=***&jwt=***&passwd=***&session=***&sid=***&side=l",
        ),
        ("a=1;token=t0k;b=2&sig=s;c", "a=1;token=***;b=2&sig=***;c"),
        ("note=x;y&key=k;", "note=x;y&key=***;"),
    ],
)
def test_a_query_is_shown_with_the_values_of_its_credential_parameters_masked(
    query: str, shown: str
) -> None:
    """A parameter named as a credential (what masks a header, ``_`` read as ``-``, or a
    credential query name: ``key``, ``sig``, ``code``) is shown as ``name=***``, whatever the
    case or the percent-encoding of its name, after a ``&`` or a ``;``; every other byte of the
    query as received."""
    assert shown_query(query) == shown


def test_secrets_written_in_the_config_file_are_named_by_key_never_by_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A signing secret, the admin token, the alerts' URL, an option that holds only a secret,
    a URL with a password, a key or a token, and a header or a command's variable named as a
    credential, written in the file itself, are named (check warns of each, as the daemon does
    as it starts) and masked; what comes from env: or file:, a URL without any of those, and
    values under other names or too short to be a credential, are not."""
    monkeypatch.setenv("WRITTEN_TEST_NEW", "from-the-environment")
    cfg = config_mod.loads(_WRITTEN, "t", kinds=actions.kind_defaults)
    assert written_out(cfg) == [
        "admin.token",
        "journal.url",
        "sources.shop.verify.secrets[0]",
        "alerts.url",
        "sources.shop.actions[0].api_key",
        "sources.shop.actions[0].then.secret",
        "sources.shop.actions[1].headers.Authorization",
        "sources.shop.actions[2].url",
        "sources.shop.actions[3].env.DEPLOY_TOKEN",
        "sources.shop.actions[3].env.AWS_SECRET_ACCESS_KEY",
        "sources.shop.actions[4].url",
        "sources.shop.actions[5].url",
    ]
    masked = Masker(secret_values(cfg)).text(
        "inline-query-key inlinePathToken1234abcd sk-inline-key whsec_aW5saW5lLXRoZW4tc2VjcmV0"
        " inline-header-777 inline-url-pw inline-env-555 inline-aws-secret received_at"
        " eu-west-1-long Deploy Bot https://example.com/callback orders-v2-2024 orders.created"
        " integration-team"
    )
    assert masked == (
        "*** *** *** *** *** *** *** *** received_at eu-west-1-long Deploy Bot https://example.com/callback"
        " orders-v2-2024 orders.created integration-team"
    )
    path = tmp_path / "webhookd.toml"
    path.write_text(_WRITTEN)
    result = CliRunner().invoke(main, ["check", "--no-journal", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if WRITTEN_OUT in line] == [
        f"webhookd: warning: {key} is {WRITTEN_OUT}" for key in written_out(cfg)
    ]
    for value in ("admin-token-inline", "pg-password", "old-inline-secret", "sk-inline-key"):
        assert value not in result.output
    assert "inline-" not in result.output


def test_a_credential_a_command_inherits_from_the_environment_is_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``inherit_env``'s names and globs, matched against the environment as the masker is
    made: what is named as a credential (as a command's ``env`` names are read) is masked,
    other names, short values and variables no command inherits are not."""
    for name, value in {
        "AWS_SECRET_ACCESS_KEY": "awssecretzzzz",
        "AWS_SESSION_TOKEN": "awssessiontok1",
        "AWS_REGION": "eu-west-1-long",
        "AWS_SECRET_WORD": "short",
        "SHOP_DB_PASSWORD": "not-inherited-pw",
    }.items():
        monkeypatch.setenv(name, value)
    text = (
        '[sources.gh]\n[[sources.gh.actions]]\ntype = "command"\nargv = ["x"]\n'
        'inherit_env = ["AWS_*"]\n'
    )
    cfg = config_mod.loads(text, "t", kinds=actions.kind_defaults)
    masked = Masker(secret_values(cfg)).text(
        "awssecretzzzz awssessiontok1 eu-west-1-long short not-inherited-pw"
    )
    assert masked == "*** *** eu-west-1-long short not-inherited-pw"


@pytest.mark.parametrize(
    ("secret", "quoted", "shown"),
    [
        # A target answering 401 quotes the token of a configured Authorization header.
        ("Bearer tgttoken7c41", "invalid token tgttoken7c41", "invalid token ***"),
        # aiohttp sends a URL's user and password as Basic credentials; a target echoes them.
        (
            "http://user:pwSECRET9@127.0.0.1:9/in",
            "'Authorization': 'Basic dXNlcjpwd1NFQ1JFVDk='",
            "'Authorization': 'Basic ***'",
        ),
        ("http://user:pwSECRET9@127.0.0.1:9/in", "password pwSECRET9", "password ***"),
        # A webhook URL's token in its path, or a query's token=, echoed without the rest.
        (
            "https://hooks.slack.com/services/T0001/B0002/aB3dE5fG7hJ9kL1mN2pQ4rS6",
            "no route for /services/T0001/B0002/aB3dE5fG7hJ9kL1mN2pQ4rS6",
            "no route for /services/T0001/B0002/***",
        ),
        ("http://127.0.0.1:9/hook?token=qtok&x=1", "/hook?token=qtok&x=1", "/hook?token=***&x=1"),
        # Tokens with joiners: a UUID, a key's prefix and its random part.
        (
            "https://in.example.com/hooks/5f3c2a1e-9b8d-4c7e-a6f5-0123456789ab",
            "unknown hook 5f3c2a1e-9b8d-4c7e-a6f5-0123456789ab",
            "unknown hook ***",
        ),
        (
            "https://in.example.com/k/sk-proj-AbC9dEfGh1jKlMn0pQrStUv/in",
            "key sk-proj-AbC9dEfGh1jKlMn0pQrStUv refused",
            "key *** refused",
        ),
    ],
)
def test_a_secret_is_masked_where_a_target_quotes_part_of_it(
    secret: str, quoted: str, shown: str
) -> None:
    """Masking the configured value whole missed the parts a target or program quotes on
    their own: a header's token, a URL's password or its Basic form, a path's token."""
    assert Masker([secret]).text(quoted) == shown


def test_the_parts_of_a_secret_spare_ordinary_words() -> None:
    """A path's words, an id, a database's name, a plain-word development password, the
    values of query parameters not named as credentials, and the second word of a secret with
    a space, are not masked on their own: they appear everywhere else too, and a part is
    masked in what is journaled for good."""
    masker = Masker(
        [
            "https://hooks.example.com/services/order-processing/webhook-receiver",
            "https://hooks.slack.com/services/T0ABC1234/B0DEF5678/XXXXXXXXXXXXXXXXXXXXXXXX",
            "https://collect.example.com/in?api_key=k3y9abcd1234&signed=true&design=modern",
            "https://outlook.office.com/webhookb2/in?region=eu-west-1",
            "http://127.0.0.1:9/status/503/payment-status-v2/orders-create-2024",
            "postgresql://postgres:postgres@localhost/webhookd",
            "correct horse",
        ]
    )
    text = (
        "journal /var/lib/webhookd/webhookd.db, postgresql, role postgres, order-processing,"
        " webhook-receiver, team T0ABC1234, signed=true, modern, eu-west-1, webhookb2, horse,"
        " payment-status-v2, orders-create-2024"
    )
    assert masker.text(text) == text
    assert masker.text("api_key=k3y9abcd1234") == "api_key=***"
    assert secret_parts("Bearer short") == set()  # a token part under 8 characters
    doc = {"received_at": 1.5, "note": "k3y9abcd1234"}  # a document's own keys are kept
    assert masker.deep(doc) == {"received_at": 1.5, "note": "***"}


_REPEATED = "ab" + ("tok-0123456789abcdef" + "\n") * 2 + "end"


@pytest.mark.parametrize("start", range(len(_REPEATED) + 1))
def test_text_after_a_cut_shows_no_part_of_a_secret_the_cut_fell_inside(start: int) -> None:
    """``Masker.after``: the text past a cut, masked as if the whole text were masked then cut.
    Wherever the cut falls in a run of repeated secrets (a verbose program's output), what is
    left shows none of their characters, only *** and every character that was no secret's."""
    secret = "tok-0123456789abcdef"
    text = _REPEATED
    in_secret = set()
    for at in (i for i in range(len(text)) if text.startswith(secret, i)):
        in_secret |= set(range(at, at + len(secret)))
    plain = "".join(c for i, c in enumerate(text) if i >= start and i not in in_secret)
    shown = Masker([secret]).after(text, start)
    assert shown.replace(MASK, "") == plain
    if start not in in_secret or start - 1 not in in_secret:  # no secret cut in two
        assert shown == Masker([secret]).text(text[start:])


@pytest.mark.parametrize("end", range(len(_REPEATED) + 1))
def test_text_before_a_cut_shows_no_part_of_a_secret_the_cut_fell_inside(end: int) -> None:
    """``Masker.before``: the text up to a cut, masked as if the whole text were masked then
    cut (a target's answer kept to its first 1 KB)."""
    secret = "tok-0123456789abcdef"
    text = _REPEATED
    in_secret = set()
    for at in (i for i in range(len(text)) if text.startswith(secret, i)):
        in_secret |= set(range(at, at + len(secret)))
    plain = "".join(c for i, c in enumerate(text) if i < end and i not in in_secret)
    shown = Masker([secret]).before(text, end)
    assert shown.replace(MASK, "") == plain
    if end not in in_secret or end - 1 not in in_secret:  # no secret cut in two
        assert shown == Masker([secret]).text(text[:end])
