"""Config: the embedded default, the reference file, dotted-key errors, secrets from the env."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from webhookd import actions, app
from webhookd.cli import main
from webhookd.config import (
    ACTION_KINDS,
    CATCH_ALL,
    DEFAULT_MAX_COOLDOWN_S,
    EMBEDDED_DEFAULT,
    ActionDefaults,
    AdminConfig,
    Extractor,
    JournalConfig,
    LaneConfig,
    Listen,
    LogConfig,
    RetryPolicy,
    Secret,
    ServerConfig,
    WorkersConfig,
    cluster_digest,
    cluster_names,
    credentials_unclear,
    leaves,
    load,
    loads,
    names_take,
    parse_listen,
    plan_reload,
)
from webhookd.errors import ConfigError
from webhookd.models import Priority
from webhookd.redact import secret_values
from webhookd.schemes import SCHEMES

REPO = Path(__file__).resolve().parent.parent

REFERENCE_ENV = {
    "SHOPIFY_SECRET": "shpss_example",
    "FORWARD_SIGNING_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "STRIPE_SECRET": "whsec_stripe_new",
    "STRIPE_SECRET_OLD": "whsec_stripe_old",
    "GITHUB_WEBHOOK_SECRET": "gh-secret",
    "PARTNER_SECRET": "partner-secret",
    "ALERT_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/reference",
}


def test_embedded_default_is_the_documented_development_setup() -> None:
    cfg = load(None)
    assert cfg.server.listen == Listen("127.0.0.1", 8080)
    assert cfg.admin.listen == Listen("127.0.0.1", 8081)
    assert cfg.journal.path == Path("./webhookd.db")
    catch_all = cfg.source_for("anything-at-all")
    assert catch_all is not None and catch_all.verify is None
    assert [a.type for a in catch_all.actions] == ["log"]
    assert cfg.origin == "embedded default" and "catch-all" in EMBEDDED_DEFAULT


def test_reference_config_in_the_repository_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in REFERENCE_ENV.items():
        monkeypatch.setenv(name, value)
    cfg = load(REPO / "webhookd.toml")
    assert set(cfg.sources) == {"shopify", "stripe", "github", "generic"}
    shopify = cfg.sources["shopify"]
    assert shopify.verify is not None and shopify.verify.scheme == "shopify"
    assert shopify.tenant == Extractor("header", "X-Shopify-Shop-Domain")
    assert shopify.priority.default is Priority.NORMAL
    stripe = cfg.sources["stripe"]
    assert stripe.verify is not None and len(stripe.verify.secrets) == 2
    assert [a.name for a in stripe.actions] == ["forward", "log"]
    assert [c.extractor for c in stripe.actions[1].when] == [Extractor("json", "type")]
    assert cfg.source_for("generic") is cfg.sources["generic"]
    assert cfg.sources["generic"].path == "/hooks/partner"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nlisten = 8080", "server.listen"),
        ('[server]\nlisten = ":8080"', "server.listen"),  # every interface is written out
        # Settings that say two things, or that nothing reads as written.
        (
            '[sources.a]\npriority = { by = "json:x", high = ["a"], low = ["b", "a"] }',
            "sources.a.priority.low",
        ),
        (
            '[[sources.a.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/"\n'
            'headers = { "X-Tok" = "first", "x-tok" = "second" }',
            "sources.a.actions[0].headers.x-tok",
        ),
        ('[sources."*"]\npath = "/x"', "sources.*.path"),
        ('[journal]\npath = "env:DBPATH"', "journal.path"),
        (
            '[sources.a]\nverify = { scheme = "hmac", secret = "k", header = "X Sig" }',
            "sources.a.verify.header",
        ),
        (
            '[sources.a]\nverify = { scheme = "hmac", secret = "k", header = "X-Sig",'
            ' timestamp_header = "env:TS" }',
            "sources.a.verify.timestamp_header",
        ),
        ('[server]\nlisten = "[::1:8080"', "server.listen"),
        ('[admin]\nlisten = "::1]:8081"', "admin.listen"),
        ('[server]\nlisten = "127.0.0.1:99999"', "server.listen"),
        ("[server]\nmax_body_bytes = -1", "server.max_body_bytes"),
        ('[server]\ntrusted_proxies = "127.0.0.1"', "server.trusted_proxies"),
        ('[server]\ntrusted_proxies = ["10.0.0.0/33"]', "server.trusted_proxies"),
        ('[server]\ntrusted_proxies = ["nginx"]', "server.trusted_proxies"),
        ("[sources.a]\nallow_from = []", "sources.a.allow_from"),
        ("[sources.a]\nmax_body_bytes = 0", "sources.a.max_body_bytes"),
        ("[sources.a]\nmax_body_bytes = 100_000_000", "sources.a.max_body_bytes"),
        ('[sources.a]\nallow_from = ["github.com"]', "sources.a.allow_from"),
        ("[server]\nspeed = 3", "server.speed"),
        ("colour = 1", "colour"),
        ("[workers]\nconcurrency = 0", "workers.concurrency"),
        ("[workers]\nconcurrency = 2.5", "workers.concurrency"),
        ('[log]\nlevel = "loud"', "log.level"),
        ('[log]\njobs = "some"', "log.jobs"),
        (
            '[sources.a]\nack_status = 500\n[[sources.a.actions]]\ntype = "log"',
            "sources.a.ack_status",
        ),
        ('[sources.a]\ndedup = "cookie:x"', "sources.a.dedup"),
        ('[sources.a]\ntenant = "json:account..id"', "sources.a.tenant"),
        ('[sources.a]\nverify = { scheme = "nope", secret = "x" }', "sources.a.verify.scheme"),
        (
            '[sources.a]\nverify = { scheme = "github", secret = "x", extra = 1 }',
            "sources.a.verify.extra",
        ),
        ('[[sources.a.actions]]\ntype = "teleport"', "sources.a.actions[0].type"),
        ('[[sources.a.actions]]\ntype = "forward"', "sources.a.actions[0].url"),
        (
            '[[sources.a.actions]]\ntype = "log"\nretry = { max_attempts = 0 }',
            "sources.a.actions[0].retry.max_attempts",
        ),
        (
            '[[sources.a.actions]]\ntype = "log"\n'
            '[[sources.a.actions]]\ntype = "log"\nname = "log-1"',
            "sources.a.actions[1].name",
        ),
        ('[sources.a]\npath = "/x"\n[sources.b]\npath = "/x"', "sources.b.path"),
        ('[sources.a]\npriority = "urgent"', "sources.a.priority"),
        ("[server]\nack_timeout_s = nan", "server.ack_timeout_s"),
        ("[server]\nack_timeout_s = inf", "server.ack_timeout_s"),
        ("[journal]\nkeep_done_h = -nan", "journal.keep_done_h"),
        ("[workers]\nshutdown_grace_s = inf", "workers.shutdown_grace_s"),
        # Past what a deadline can be (1e300 s crashed the stop's watchdog), or a busy loop.
        ("[workers]\nshutdown_grace_s = 1e300", "workers.shutdown_grace_s"),
        ("[journal]\nkeep_dedup_d = 1e9", "journal.keep_dedup_d"),
        (
            '[[sources.a.actions]]\ntype = "log"\nretry = { base_s = 1e12 }',
            "sources.a.actions[0].retry.base_s",
        ),
        ("[workers]\nsweep_interval_s = 1e-9", "workers.sweep_interval_s"),
        ("[journal]\nprune_interval_s = 1e-9", "journal.prune_interval_s"),
        ("[lanes.ai]\nrpm = 60\nburst_s = nan", "lanes.ai.burst_s"),
        ("[sources.a]\nintake_per_s = inf", "sources.a.intake_per_s"),
        ('[[sources.a.actions]]\ntype = "log"\ntimeout_s = nan', "sources.a.actions[0].timeout_s"),
        (
            '[[sources.a.actions]]\ntype = "log"\nretry = { cap_s = inf }',
            "sources.a.actions[0].retry.cap_s",
        ),
        (
            '[[sources.a.actions]]\ntype = "openai"\napi_key = "k"\nmodel = "m"\n'
            'prompt = "p"\nmax_tokens = 10\ntemperature = nan',
            "sources.a.actions[0].temperature",
        ),
        ('[journal]\npath = ""', "journal.path"),  # read as ".", the working directory
        ('[journal]\npath = "/"', "journal.path"),  # a folder, not the journal's file
        (
            '[[sources.a.actions]]\ntype = "log"\nretry = { max_attempts = 99999999999999999999 }',
            "sources.a.actions[0].retry.max_attempts",
        ),
        ('[server]\nlisten = "127.0.0.1:\u00b2"', "server.listen"),  # a digit, not an ASCII one
        ('[journal]\nurl = "postgresql://db:\u00b2/x"', "journal.url"),
        ('[[sources.a.actions]]\ntype = "log"\nlane = ["x"]', "sources.a.actions[0].lane"),
        (
            '[sources.a]\nverify = { scheme = "github", secret = "file:/tmp/a\\u0000b" }',
            "sources.a.verify.secret",
        ),
        (f'[journal]\npath = "/tmp/{"x" * 300}/j.db"', "journal.path"),
        ("[sources.a]\nack_status = 204", "sources.a.ack_status"),
        ("[sources.a]\nack_status = 205", "sources.a.ack_status"),
        ("[sources.a]\nintake_per_s = 1e-320", "sources.a.intake_per_s"),
        (
            '[sources.a]\nverify = { scheme = "github", secret = "x", tolerance_s = 5 }',
            "sources.a.verify.tolerance_s",
        ),
        (
            '[sources.a]\nverify = { scheme = "stripe", secret = "x", header = "X-Sig" }',
            "sources.a.verify.header",
        ),
        (
            '[sources.a]\nverify = { scheme = "twilio", secret = "x",'
            ' url = "hooks.example.com/hooks/a" }',
            "sources.a.verify.url",
        ),
        (
            '[sources.a]\nverify = { scheme = "hmac", secret = "x", header = "X-Sig",'
            ' signed = "{timestamp}.{body}", timestamp_header = "" }',
            "sources.a.verify.timestamp_header",
        ),
        (
            '[sources.a]\nverify = { scheme = "hmac", secret = "x", header = "X-Sig",'
            " tolerance_s = 60 }",
            "sources.a.verify.tolerance_s",
        ),
        ('[admin]\ntoken = "tok\\n"', "admin.token"),
        ('[admin]\ntoken = "a-token-with-a-space "', "admin.token"),
        ('[admin]\ntoken = "   "', "admin.token"),
        ('[admin]\ntoken = ""', "admin.token"),
        # A browser sends a header's characters a byte each: the dashboard could never log in.
        ('[admin]\ntoken = "pässwort-0123456789abcdef"', "admin.token"),
        ('[admin]\ntoken = "token-€-0123456789abcdef"', "admin.token"),
        ('[admin]\ntoken = "token\\t0123456789abcdef"', "admin.token"),
        (
            '[[sources.a.actions]]\ntype = "command"\nargv = ["", "x"]',
            "sources.a.actions[0].argv[0]",
        ),
        ("[journal]\nkeep_done_h = 72\nkeep_dead_d = 1", "journal.keep_dead_d"),
        (  # mailgun's default tolerance (9 h) outlives the delivery ids kept
            "[journal]\nkeep_dedup_d = 0.25\n"
            '[sources.a]\nverify = { scheme = "mailgun", secret = "x" }',
            "sources.a.verify.tolerance_s",
        ),
        (  # only argv, prompt and system are templates: this would be sent as written
            '[[sources.a.actions]]\ntype = "forward"\nurl = "http://127.0.0.1/{{ order.id }}"',
            "sources.a.actions[0].url",
        ),
        (
            '[[sources.a.actions]]\ntype = "forward"\nurl = "http://127.0.0.1/"\n'
            'headers = { X-Order = "{{ order.id }}" }',
            "sources.a.actions[0].headers.X-Order",
        ),
        (
            '[[sources.a.actions]]\ntype = "forward"\nurl = "http://127.0.0.1/"\n'
            'headers = { Webhook-Signature = "v1,forged" }',
            "sources.a.actions[0].headers.Webhook-Signature",
        ),
        ('[sources.a]\npath = "/hooks/a?token=1"', "sources.a.path"),
        # All that guards an admin API others can reach: not a token one can guess.
        ('[admin]\nlisten = "0.0.0.0:8081"\ntoken = "short-token-15c"', "admin.token"),
        ('[sources.a]\npath = "/hooks/a#frag"', "sources.a.path"),
    ],
)
def test_bad_values_name_their_dotted_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        actions.validate(loads(text))  # what `webhookd check` and `serve` run
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert "\n" not in str(info.value)


ASKING = 'type = "openai"\nprompt = "hi"\nmax_tokens = 5\napi_key = "sk-x"\n'


@pytest.mark.parametrize(
    ("action", "key"),
    [
        (
            'type = "forward"\nurl = "http://127.0.0.1/"\nheaders = { X-Ref = "{{ ref }}" }',
            "headers.X-Ref",
        ),
        (
            'type = "command"\nargv = ["/bin/true", "{{ ref }}"]\nenv = { REF = "{{ ref }}" }',
            "env.REF",
        ),
        ('type = "command"\nargv = ["/bin/true"]\ncwd = "/srv/{{ repository.name }}"', "cwd"),
        (ASKING + 'model = "{{ model }}"', "model"),
        (
            ASKING + 'model = "gpt-4o-mini"\nbase_url = "http://127.0.0.1/{{ tenant }}/v1"',
            "base_url",
        ),
    ],
    ids=["forward-headers", "command-env", "command-cwd", "openai-model", "openai-base_url"],
)
def test_a_lookup_where_no_template_is_read_is_refused_by_name(action: str, key: str) -> None:
    """A ``{{ }}`` in an option used as written (only a command's argv and an openai prompt and
    system are templates) is refused, naming the option: a command's env and cwd and an openai
    model took it silently, so the program got the text ``{{ ref }}`` and the API was asked for
    a model named ``{{ model }}``."""
    with pytest.raises(ConfigError) as info:
        actions.validate(loads(f"[sources.s]\n[[sources.s.actions]]\n{action}\n"))
    assert str(info.value) == (
        f"sources.s.actions[0].{key}: is sent as written: {{{{ }}}} lookups are read only in a"
        " command's argv and an openai action's prompt and system"
    )


@pytest.mark.parametrize(
    ("written", "says"),
    [
        ("env:", '"env:" names no variable: write "env:NAME"'),
        ("file:", '"file:" names no file: write "file:PATH"'),
    ],
)
def test_a_secret_reference_naming_nothing_says_so(written: str, says: str) -> None:
    """``env:`` alone said "environment variable  is not set", with a blank where the name
    goes."""
    with pytest.raises(ConfigError) as info:
        loads(f'[sources.a]\nverify = {{ scheme = "github", secret = "{written}" }}')
    assert str(info.value) == f"sources.a.verify.secret: {says}"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('[sever]\nlisten = "127.0.0.1:1"', "sever: unknown key (did you mean server?)"),
        ('[server]\nlistn = "x"', "server.listn: unknown key (did you mean listen?)"),
        ("[journal]\nkeep_dead = 1", "journal.keep_dead: unknown key (did you mean keep_dead_d?)"),
        (
            '[sources.a]\nverify = { scheme = "github", secert = "x" }',
            "sources.a.verify.secert: unknown key (did you mean secret?)",
        ),
        ("[sources.a]\nbogus = 1", "sources.a.bogus: unknown key"),  # nothing close: no guess
        # A short key one letter off (difflib's ratio alone is too low), and a lane whose only
        # key is misspelt is told the key, not that it has neither rpm nor tpm.
        ("[lanes.small]\nrpn = 5", "lanes.small.rpn: unknown key (did you mean rpm?)"),
        # Names other tools use for a key spelt another way here.
        ('[log]\nlvl = "info"', "log.lvl: unknown key (did you mean level?)"),
        (
            "[workers.weights]\nmedium = 2",
            "workers.weights.medium: unknown key (did you mean normal?)",
        ),
        (
            '[[sources.a.actions]]\ntype = "log"\nretry = { max_retries = 3 }',
            "sources.a.actions[0].retry.max_retries: unknown key (did you mean max_attempts?)",
        ),
        ("[lanes.small]\nrmp = 5", "lanes.small.rmp: unknown key (did you mean rpm?)"),
        ("[lanes.small]\nrpm = 5\nzz = 1", "lanes.small.zz: unknown key"),
        # A required key misspelt is missed before the misspelling is read: it is offered.
        (
            '[[sources.a.actions]]\ntpe = "log"',
            'sources.a.actions[0].type: is required (is "tpe" a misspelling of it?)',
        ),
    ],
)
def test_a_misspelt_key_is_told_the_key_it_most_likely_meant(text: str, said: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert str(info.value) == said


@pytest.mark.parametrize(
    ("action", "said"),
    [
        ('type = "log"\nretyr = 3', "retyr: unknown key for a log action (did you mean retry?)"),
        (
            'type = "log"\nmax_attempts = 3',  # it lives in the retry table
            "max_attempts: unknown key for a log action (did you mean retry?)",
        ),
        (
            'type = "forward"\nurl = "http://127.0.0.1:9/"\ntimout_s = 3',
            "timout_s: unknown key for a forward action (did you mean timeout_s?)",
        ),
        (
            'type = "forward"\nurll = "http://127.0.0.1:9/"',
            "urll: unknown key for a forward action (did you mean url?)",
        ),
        ('type = "log"\nbogus = 1', "bogus: unknown key for a log action"),
    ],
)
def test_a_misspelt_action_key_is_told_the_option_or_shared_key_it_most_likely_meant(
    action: str, said: str
) -> None:
    """An action's own options are read apart from the keys every action takes (``retry``,
    ``timeout_s``…); a misspelling of either is told which it most likely meant."""
    cfg = loads(f"[sources.a]\n[[sources.a.actions]]\n{action}\n")
    with pytest.raises(ConfigError) as info:
        actions.validate(cfg)
    assert str(info.value) == f"sources.a.actions[0].{said}"


def test_invalid_toml_is_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        loads("[server\nlisten=", "x.toml")
    assert "\n" not in str(info.value)


def test_toml_nested_too_deep_is_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="nested too deep") as info:
        loads("x = " + "[" * 5000 + "]" * 5000, "x.toml")
    assert "\n" not in str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.toml")


def test_env_secrets_are_resolved_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GH_SECRET", "s3cr3t-value")
    cfg = loads('[sources.gh]\nverify = { scheme = "github", secret = "env:GH_SECRET" }')
    verify = cfg.sources["gh"].verify
    assert verify is not None
    [secret] = verify.secrets
    assert isinstance(secret, Secret) and secret.reveal() == "s3cr3t-value"
    assert "s3cr3t" not in repr(cfg) and "s3cr3t" not in str(secret)


def test_missing_env_secret_names_key_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE") as info:
        loads('[sources.gh]\nverify = { scheme = "github", secret = "env:NOT_SET_ANYWHERE" }')
    assert info.value.key == "sources.gh.verify.secret"


def test_empty_env_secret_says_empty_and_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable that is set but empty is reported as empty, not as unset, naming the key."""
    monkeypatch.setenv("EMPTY_FOR_TEST", "")
    for text, key in (
        ('[sources.gh]\nverify = { scheme = "github", secret = "env:EMPTY_FOR_TEST" }', "verify"),
        (
            '[[sources.gh.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/"\n'
            'secret = "env:EMPTY_FOR_TEST"',
            "actions[0]",
        ),
    ):
        with pytest.raises(ConfigError) as info:
            actions.validate(loads(text))
        assert str(info.value) == (
            f"sources.gh.{key}.secret: environment variable EMPTY_FOR_TEST is empty"
        )


def test_file_secrets_are_read_without_their_newline_and_masked(tmp_path: Path) -> None:
    """``file:PATH`` (a Docker secret, a systemd credential): the file's text less its trailing
    newline, for a scheme's secret and an action's alike, and masked wherever secrets are."""
    verify_file, forward_file = tmp_path / "gh", tmp_path / "fw"
    verify_file.write_text("gh-file-secret-1234\n", encoding="utf-8")
    forward_file.write_text("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\r\n", encoding="utf-8")
    cfg = loads(
        f'[sources.gh]\nverify = {{ scheme = "github", secret = "file:{verify_file}" }}\n'
        f'[[sources.gh.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/"\n'
        f'secret = "file:{forward_file}"\n'
    )
    actions.validate(cfg)
    verify = cfg.sources["gh"].verify
    assert verify is not None
    [secret] = verify.secrets
    assert secret.reveal() == "gh-file-secret-1234" and "gh-file" not in repr(cfg)
    assert secret_values(cfg) == {"gh-file-secret-1234", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}


def test_an_unreadable_or_empty_file_secret_names_the_key_and_the_file(tmp_path: Path) -> None:
    """As for an unset variable: refused where secrets are needed, left missing for verbs that
    only read the journal."""
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    # A pipe with no writer (reading it would wait for good, in a reload too), a device that
    # never ends, a file no secret is as large as: refused, not read.
    fifo, big = tmp_path / "fifo", tmp_path / "big"
    os.mkfifo(fifo)
    big.write_bytes(b"k" * (64 * 1024 + 1))
    for path, why in (
        (tmp_path / "nope", "cannot be read: No such file or directory"),
        (empty, "is empty"),
        (fifo, "cannot be read: not a regular file (a pipe or a device)"),
        (Path("/dev/zero"), "cannot be read: not a regular file (a pipe or a device)"),
        (big, "cannot be read: larger than 64 KiB"),
    ):
        text = f'[sources.gh]\nverify = {{ scheme = "github", secret = "file:{path}" }}'
        with pytest.raises(ConfigError) as info:
            loads(text)
        assert str(info.value) == f"sources.gh.verify.secret: file {path} {why}"
        verify = loads(text, secrets=False).sources["gh"].verify
        assert verify is not None and verify.secrets[0].missing
    with pytest.raises(ConfigError) as info:  # nor is a config file
        load(fifo)
    assert str(info.value) == f"cannot read {fifo}: not a regular file (a pipe or a device)"
    # A secret pasted after file: (base64 holds + / =) is not named: it showed whole in the
    # log, /stats and check.
    for pasted in ("Kq3v9+XyZ0aB7cD1eF2gH3iJ4kL5mN6o=", "Kq3v/9+XyZ0aB7cD1eF2gH3iJ4kL5mN6o="):
        with pytest.raises(ConfigError) as info:
            loads(f'[sources.gh]\nverify = {{ scheme = "github", secret = "file:{pasted}" }}')
        assert pasted not in str(info.value)
        assert str(info.value).startswith("sources.gh.verify.secret: file: (not shown: it does")


def test_a_base64_secret_pasted_after_file_is_not_shown_in_the_error(tmp_path: Path) -> None:
    """One that begins with / (base64 does, one time in 64: ``openssl rand -base64 32``) is not
    named as a path unless it or its folder, other than /, is there; a typo in the name of a
    file in a folder that is there is named (as above)."""
    for pasted in ("/u9Qk1+8yQm3ZpX0rT7vLw2cA5nHdE4sFgJ6hKbN0aU=", f"{tmp_path}/nope/secret"):
        with pytest.raises(ConfigError) as info:
            loads(f'[sources.gh]\nverify = {{ scheme = "github", secret = "file:{pasted}" }}')
        assert str(info.value) == (
            "sources.gh.verify.secret: file: (not shown: neither it nor its folder, other than /,"
            " is there; it may be the secret itself) cannot be read: No such file or directory"
        )


def test_a_secret_read_with_a_line_break_in_it_is_refused_naming_the_key_not_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new secret put under the old one in its file (``cat old new > f``), or a variable
    with a line break in it: ``check`` and a load refuse it, naming the key and the lines it
    holds, never the value (it was taken as one secret, and every webhook got 401). A
    command's environment takes several lines: a PEM key, say."""
    two = tmp_path / "two"
    two.write_text("old-secret-0123456789\nnew-secret-0123456789\n", encoding="utf-8")
    monkeypatch.setenv("TWO_LINES", "old-secret-0123456789\r\nnew-secret-0123456789")
    monkeypatch.setenv("ENDS_IN_NEWLINE", "old-secret-0123456789\n")
    path = tmp_path / "webhookd.toml"
    for written, why in (
        (
            f"file:{two}",
            f"file {two} holds 2 lines: one secret per file (secrets = [...] takes two, each"
            " from its own file)",
        ),
        (
            "env:TWO_LINES",
            "environment variable TWO_LINES holds 2 lines: one secret per variable (secrets ="
            " [...] takes two, each from its own variable)",
        ),
        (
            "env:ENDS_IN_NEWLINE",
            "environment variable ENDS_IN_NEWLINE ends in a line break, which no secret does",
        ),
    ):
        for text, key in (
            (
                f'[sources.gh]\nverify = {{ scheme = "github", secret = "{written}" }}',
                "sources.gh.verify.secret",
            ),
            (
                '[[sources.gh.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/"\n'
                f'secret = "{written}"',
                "sources.gh.actions[0].secret",
            ),
        ):
            path.write_text(text, encoding="utf-8")
            result = CliRunner().invoke(main, ["check", "--config", str(path)])
            assert result.exit_code == 2, result.output
            assert result.stderr == f"webhookd: error: {key}: {why}\n"
            with pytest.raises(ConfigError) as info:
                actions.validate(loads(text))
            assert str(info.value) == f"{key}: {why}"
            assert "secret-0123456789" not in str(info.value) + result.output

    pem = tmp_path / "deploy.pem"
    pem.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n-----END PRIVATE KEY-----\n")
    text = (
        '[[sources.ci.actions]]\ntype = "command"\nargv = ["/bin/true"]\n'
        f'env = {{ DEPLOY_KEY = "file:{pem}" }}\n'
    )
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    cfg = loads(text)
    actions.validate(cfg)
    assert pem.read_text().rstrip("\n") in secret_values(cfg)  # read whole, and masked


def test_check_warns_of_a_secret_with_a_space_or_tab_at_either_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stray space pasted with a secret: every signature fails, yet the value is taken. So
    ``check`` warns (it may be meant), naming the key, never the value."""
    padded = tmp_path / "padded"
    padded.write_text("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\t\n", encoding="utf-8")
    monkeypatch.setenv("SPACED_SECRET", " gh-secret-0123456789abcdef0123456789")
    monkeypatch.setenv("FINE_SECRET", "gh-secret-0123456789abcdef0123456789")
    path = tmp_path / "webhookd.toml"
    path.write_text(
        '[sources.gh]\nverify = { scheme = "github", secret = "env:SPACED_SECRET" }\n'
        '[[sources.gh.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/"\n'
        f'secret = "file:{padded}"\n'
        '[sources.ok]\nverify = { scheme = "github", secret = "env:FINE_SECRET" }\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    tail = (
        " starts or ends with a space or tab (a stray one from a copy and paste?): what it"
        " signs or checks will not match the other side; remove it unless it is meant"
    )
    assert result.stderr.splitlines() == [
        f"webhookd: warning: sources.gh.verify.secret{tail}",
        f"webhookd: warning: sources.gh.actions[0].secret{tail}",
    ]
    assert "0123456789" not in result.output and "MfKQ9r8" not in result.output


GOOD_WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NOT_A_NAME = "env: must name an environment variable; this one does not look like a name"
FORWARD = '[[sources.x.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/"\n'
OPENAI = (
    '[[sources.x.actions]]\ntype = "openai"\napi_key = "k"\nmodel = "m"\nprompt = "p"\n'
    'max_tokens = 10\nthen = { forward = "http://127.0.0.1:9/", '
)


@pytest.mark.parametrize("bad", ["whsec_!!!", "whsec_", "whsec_=", "whsec_c2VjcmV0?"])
@pytest.mark.parametrize(
    ("text", "key"),
    [
        (FORWARD + 'secret = "{bad}"', "sources.x.actions[0].secret"),
        (FORWARD + f'secrets = ["{GOOD_WHSEC}", "{{bad}}"]', "sources.x.actions[0].secrets[1]"),
        (
            '[sources.x]\nverify = { scheme = "standard", secret = "{bad}" }',
            "sources.x.verify.secret",
        ),
        (
            '[sources.x]\nverify = { scheme = "standard", secrets = ["{bad}", "plain-secret"] }',
            "sources.x.verify.secrets[0]",
        ),
        (OPENAI + 'secret = "{bad}" }', "sources.x.actions[0].then.secret"),
        (
            OPENAI + f'secrets = ["{GOOD_WHSEC}", "{{bad}}"] }}',
            "sources.x.actions[0].then.secrets[1]",
        ),
    ],
)
@pytest.mark.parametrize("via_env", [False, True])
def test_malformed_whsec_secrets_are_refused_at_load_naming_the_key(
    text: str, key: str, bad: str, via_env: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whsec_ secret that is not base64 (or holds no key), inline or from env:, is refused."""
    if via_env:
        monkeypatch.setenv("WHSEC_FOR_TEST", bad)
    text = text.replace("{bad}", "env:WHSEC_FOR_TEST" if via_env else bad)
    with pytest.raises(ConfigError) as info:
        actions.validate(loads(text))  # what `webhookd check` and `serve` run
    assert str(info.value) == f"{key}: is not valid whsec_ base64"  # the value is never shown


def test_well_formed_standard_secrets_still_load() -> None:
    """whsec_ base64 (padded or not), and for verify a plain secret, are accepted as before."""
    padded = "whsec_" + "c2VjcmV0"  # b"secret"
    text = (
        f'[sources.x]\nverify = {{ scheme = "standard", secrets = ["{padded}", "raw text"] }}\n'
        + FORWARD
        + f'secrets = ["{GOOD_WHSEC}", "whsec_c2VjcmV0Cg=="]'
    )
    cfg = loads(text)
    actions.validate(cfg)
    assert cfg.sources["x"].verify is not None and len(cfg.sources["x"].verify.secrets) == 2


@pytest.mark.parametrize(
    "name",
    ["a b", ".x", "..", "a%00", "", "a/b", "a;b", "\x1b[31m", "\x00", "café", "n" * 65, "webhookd"],
)
@pytest.mark.parametrize("path", ["", 'path = "/in/elsewhere"\n'])
def test_source_names_follow_the_catch_alls_rule(name: str, path: str) -> None:
    """A configured name outside the catch-all's [A-Za-z0-9._-]{1,64} (no leading '.'), or
    the reserved webhookd, is refused naming the source, with or without its own path."""
    quoted = json.dumps(name)  # a TOML basic string too
    with pytest.raises(ConfigError) as info:
        loads(f'[sources.{quoted}]\n{path}[[sources.{quoted}.actions]]\ntype = "log"')
    bare = name.isascii() and name.isalnum()
    assert info.value.key == f"sources.{name if bare else quoted}"
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    assert "reserved" in info.value.message or "[A-Za-z0-9._-]" in info.value.message


@pytest.mark.parametrize("name", ["a", "Shop-1.eu_" + "n" * 54, "_x", "-x", "x.", "a..b", "0"])
def test_source_names_the_catch_all_would_take_are_accepted(name: str) -> None:
    """Every name the catch-all takes can be configured, and gets /hooks/<name>."""
    cfg = loads(f'[sources."{name}"]\n[[sources."{name}".actions]]\ntype = "log"')
    assert cfg.sources[name].path == f"/hooks/{name}"


# server.listen, admin.listen, and whether the two cannot both be bound.
LISTEN_PAIRS = [
    ("127.0.0.1:8090", "127.0.0.1:8090", True),
    ("0.0.0.0:8090", "127.0.0.1:8090", True),
    ("127.0.0.1:8090", "0.0.0.0:8090", True),
    ("[::]:8090", "[::1]:8090", True),
    ("localhost:8090", "127.0.0.1:8090", True),
    ("[::1]:8090", "localhost:8090", True),
    ("hooks.internal:8090", "0.0.0.0:8090", True),
    ("HOOKS.internal:8090", "hooks.internal:8090", True),
    ("127.0.0.1:0", "127.0.0.1:0", False),
    ("0.0.0.0:0", "0.0.0.0:0", False),
    ("0.0.0.0:8090", "[::1]:8090", False),
    ("[::]:8090", "127.0.0.1:8090", False),
    ("127.0.0.1:8090", "127.0.0.2:8090", False),
    ("127.0.0.1:8090", "127.0.0.1:8091", False),
    ("hooks.internal:8090", "127.0.0.1:8090", False),
]


@pytest.mark.parametrize(("server", "admin", "conflict"), LISTEN_PAIRS)
def test_admin_listen_may_not_share_server_listens_port(
    server: str, admin: str, conflict: bool
) -> None:
    """admin.listen where server.listen binds too (port 0 aside) is refused naming admin.listen."""
    text = f'[server]\nlisten = "{server}"\n[admin]\nlisten = "{admin}"\ntoken = "{"t" * 16}"'
    if not conflict:
        assert loads(text).admin.listen is not None
        return
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert info.value.key == "admin.listen"
    assert info.value.message.endswith("give each its own port") and "\n" not in str(info.value)


def _same_port_of_this_host(pair: tuple[str, str, bool]) -> bool:
    server, admin, _ = pair
    hosts = server + admin
    return "hooks." not in hosts and server.rpartition(":")[2] == admin.rpartition(":")[2]


@pytest.mark.parametrize(
    ("server", "admin", "conflict"), [p for p in LISTEN_PAIRS if _same_port_of_this_host(p)]
)
async def test_listen_overlap_is_what_binding_both_refuses(
    server: str, admin: str, conflict: bool
) -> None:
    """Listen.overlaps predicts which pairs of addresses the daemon's loop cannot both bind
    (``localhost`` counts as 127.0.0.1 and ::1, so where it names one of them only, a refusal
    may be a pair that would bind: never the other way)."""
    first, second = parse_listen(server, "s"), parse_listen(admin, "a")
    if first.host == "localhost":  # bound first, it would get a free port per address
        first, second = second, first
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    try:
        try:
            servers.append(await loop.create_server(asyncio.Protocol, first.host, 0))
        except OSError as exc:
            pytest.skip(f"cannot bind {first.host} on this host: {exc}")
        port = first.port and servers[0].sockets[0].getsockname()[1]  # 0 stays 0
        try:
            servers.append(await loop.create_server(asyncio.Protocol, second.host, port))
            refused = False
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                pytest.skip(f"cannot bind {second.host} on this host: {exc}")
            refused = True
    finally:
        for srv in servers:
            srv.close()
    assert first.overlaps(second) is conflict
    if "localhost" in server + admin:
        assert conflict or not refused
    else:
        assert refused is conflict


# Mistakes that `webhookd check` once let through, to show only at run time (every forward
# attempt failing, every webhook a 401, serve failing to bind): each is one line naming its
# dotted key, from `check` and `serve` alike. (file text, the error line)
CAUGHT_BY_CHECK = [
    (
        '[sources."a b"]\n[[sources."a b".actions]]\ntype = "log"',
        'sources."a b": a source name must be 1 to 64 characters from [A-Za-z0-9._-], '
        "not starting with '.'",
    ),
    (  # server.listen's default port
        '[admin]\nlisten = "127.0.0.1:8080"',
        "admin.listen: 127.0.0.1:8080 is also used by server.listen (127.0.0.1:8080): "
        "give each its own port",
    ),
    (FORWARD + 'secret = "whsec_!!!"', "sources.x.actions[0].secret: is not valid whsec_ base64"),
    (
        FORWARD + 'secret = "env:BAD_WHSEC_FOR_TEST"',
        "sources.x.actions[0].secret: is not valid whsec_ base64",
    ),
    (
        '[sources.x]\nverify = { scheme = "standard", secrets = ["env:BAD_WHSEC_FOR_TEST"] }',
        "sources.x.verify.secrets[0]: is not valid whsec_ base64",
    ),
    (
        OPENAI + 'secret = "whsec_" }',
        "sources.x.actions[0].then.secret: is not valid whsec_ base64",
    ),
    (
        '[sources.gh]\nverify = { scheme = "github", secret = "env:EMPTY_FOR_TEST" }',
        "sources.gh.verify.secret: environment variable EMPTY_FOR_TEST is empty",
    ),
    (
        '[sources.gh]\nverify = { scheme = "github", secret = "ENV:GH_SECRET" }',
        'sources.gh.verify.secret: reads no variable: write "env:NAME" in lower case (as'
        " written, it would be the secret itself)",
    ),
    (
        '[admin]\ntoken = "File:/run/secrets/token"',
        'admin.token: reads no file: write "file:PATH" in lower case (as written, it would be'
        " the secret itself)",
    ),
    # A secret pasted after env: or file: is not named as a variable or a file: it was shown
    # whole in the log, /stats, the dashboard and here.
    *(
        (text, f"{key}: {what} (not shown: it may be the secret itself)")
        for text, key, what in (
            (
                f'[sources.gh]\nverify = {{ scheme = "github", secret = "env:{GOOD_WHSEC}" }}',
                "sources.gh.verify.secret",
                NOT_A_NAME,
            ),
            (
                FORWARD + 'headers = { Authorization = "env:Bearer sk-proj-Ab12Cd34Ef56" }',
                "sources.x.actions[0].headers.Authorization",
                NOT_A_NAME,
            ),
            (
                '[admin]\ntoken = "env:3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a"',
                "admin.token",
                NOT_A_NAME,
            ),
            (
                '[admin]\ntoken = "env:a3f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5"',
                "admin.token",
                NOT_A_NAME,
            ),
            (
                f'[sources.gh]\nverify = {{ scheme = "github", secret = "file:{GOOD_WHSEC}" }}',
                "sources.gh.verify.secret",
                "file: must name a file; this one does not look like a path",
            ),
        )
    ),
]


@pytest.mark.parametrize(("text", "line"), CAUGHT_BY_CHECK)
@pytest.mark.parametrize("verb", ["check", "serve"])
def test_check_and_serve_refuse_a_bad_config_in_one_line_naming_the_key(
    verb: str, text: str, line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`webhookd check` and `webhookd serve` exit 2 with one line naming the key, before serving."""
    monkeypatch.setenv("EMPTY_FOR_TEST", "")
    monkeypatch.setenv("BAD_WHSEC_FOR_TEST", "whsec_!!!")
    monkeypatch.delenv("WEBHOOKD_CONFIG", raising=False)
    monkeypatch.setattr(app, "run", lambda cfg: 99)  # a config that passed would "serve": 99
    path = tmp_path / "webhookd.toml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, [verb, "--config", str(path)])
    assert (result.exit_code, result.output) == (2, f"webhookd: error: {line}\n")


@pytest.mark.parametrize("verb", ["check", "serve", "events"])
@pytest.mark.parametrize(
    ("args", "env", "line"),
    [
        (["--config", ""], None, "--config: is empty: name a config file"),
        ([], "", "WEBHOOKD_CONFIG: is set but empty: name a config file"),
    ],
    ids=["flag", "variable"],
)
def test_an_empty_config_path_is_an_error_not_the_open_default(
    verb: str, args: list[str], env: str | None, line: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--config "$CFG"`` with CFG unset must not fall back to the embedded default, whose
    catch-all takes any unsigned webhook."""
    monkeypatch.setattr(app, "run", lambda cfg: 99)
    if env is None:
        monkeypatch.delenv("WEBHOOKD_CONFIG", raising=False)
    else:
        monkeypatch.setenv("WEBHOOKD_CONFIG", env)
    result = CliRunner().invoke(main, [verb, *args])
    assert (result.exit_code, result.output) == (2, f"webhookd: error: {line}\n")


def test_a_sighup_before_the_loops_handler_is_noted_and_done_once_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``systemctl start`` then ``reload`` at once: SIGHUP's default would end the daemon while
    it starts (and systemd takes that for a clean exit). serve notes it instead, and the
    daemon reloads once its loop runs."""
    asked: list[bool] = []

    def run(cfg: Any, loader: Any, *, fixed: Any, reload_asked: Any) -> int:
        assert not reload_asked()
        os.kill(os.getpid(), signal.SIGHUP)  # before any event loop exists
        asked.append(reload_asked())
        return 0

    monkeypatch.setattr(app, "run", run)
    monkeypatch.delenv("WEBHOOKD_CONFIG", raising=False)
    path = tmp_path / "webhookd.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:0"\n', encoding="utf-8")
    previous = signal.getsignal(signal.SIGHUP)
    try:
        result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (result.exit_code, asked) == (0, [True]), result.output


def test_check_names_every_secret_it_cannot_have_not_only_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three variables unset (admin.token, a signing secret, a forward's header) and a file not
    there: check says each on its own line, naming the key, and exits 2 as for one."""
    for name in ("CHECK_TOKEN_UNSET", "CHECK_GH_UNSET", "CHECK_FWD_UNSET"):
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "no-such-secret"
    path = tmp_path / "webhookd.toml"
    path.write_text(
        '[admin]\ntoken = "env:CHECK_TOKEN_UNSET"\n'
        '[sources.gh]\nverify = { scheme = "github", secret = "env:CHECK_GH_UNSET" }\n'
        '[[sources.gh.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/x"\n'
        'headers = { Authorization = "env:CHECK_FWD_UNSET" }\n'
        f'[sources.shop]\nverify = {{ scheme = "shopify", secret = "file:{missing}" }}\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert (result.exit_code, result.stdout, result.stderr.splitlines()) == (
        2,
        "",
        [
            "webhookd: error: admin.token: environment variable CHECK_TOKEN_UNSET is not set",
            "webhookd: error: sources.gh.verify.secret: environment variable CHECK_GH_UNSET"
            " is not set",
            f"webhookd: error: sources.shop.verify.secret: file {missing} cannot be read:"
            " No such file or directory",
            "webhookd: error: sources.gh.actions[0].headers.Authorization: environment variable"
            " CHECK_FWD_UNSET is not set",
        ],
    )


def test_check_names_a_misspelt_option_not_the_unset_default_it_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ai_key`` for ``api_key`` left the default ``env:OPENAI_API_KEY`` in place: check named
    that variable unset, and the typo only once it was set."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    path = tmp_path / "webhookd.toml"
    path.write_text(
        '[[sources.o.actions]]\ntype = "openai"\nmodel = "m"\nprompt = "p"\n'
        'ai_key = "env:CHECK_KEY_UNSET"\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert (result.exit_code, result.stderr) == (
        2,
        "webhookd: error: sources.o.actions[0].ai_key: unknown key for an openai action"
        " (did you mean api_key?)\n",
    )


@pytest.mark.parametrize(
    ("text", "warning"),
    [
        (
            '[sources."*"]\n',
            'sources: none configured but the catch-all "*": every webhook goes to it, unsigned',
        ),
        (
            "[server]\nmax_backlog = 100\n",
            "sources: none configured: every webhook is answered 404",
        ),
    ],
    ids=["catch-all", "none"],
)
def test_check_warns_of_a_config_without_a_source_of_its_own(
    tmp_path: Path, text: str, warning: str
) -> None:
    """No source but perhaps the catch-all: valid (exit 0), with a warning of where webhooks go."""
    path = tmp_path / "webhookd.toml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ok: {path}: ")
    assert result.stderr == f"webhookd: warning: {warning}\n"


@pytest.mark.parametrize("days", [0, 1])
def test_check_warns_of_a_dedup_window_shorter_than_the_providers_retries(
    tmp_path: Path, days: int
) -> None:
    """keep_dedup_d = 0 was taken without a word and turned dedup off: a delivery sent twice
    0.3 s apart was two events. Below Stripe's 3 days of retries, check says what it costs."""
    path = tmp_path / "webhookd.toml"
    path.write_text(f"[journal]\nkeep_dedup_d = {days}\n[sources.shop]\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"webhookd: warning: journal.keep_dedup_d is {days} d: a provider's retry of a delivery"
        " taken longer ago than that is a new event, its jobs run again (Stripe retries for 3"
        " days)\n"
    )


def test_check_warns_of_a_stripe_secret_that_is_no_signing_secret_without_showing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stripe's signing secrets start whsec_: an API key pasted instead (sk_, rk_, pk_) is
    warned of by its prefix alone, any other value without whsec_ more mildly; exit 0."""
    values = {
        "A": "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "B": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZI",
        "C": "plain-secret-of-32-characters-xy",
    }
    for name, value in values.items():
        monkeypatch.setenv(f"CHECK_STRIPE_{name}", value)
    path = tmp_path / "webhookd.toml"
    path.write_text(
        '[sources.pay]\nverify = { scheme = "stripe", secrets'
        ' = ["env:CHECK_STRIPE_A", "env:CHECK_STRIPE_B", "env:CHECK_STRIPE_C"] }\n',
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "webhookd: warning: sources.pay.verify.secrets[0] (env:CHECK_STRIPE_A): starts with sk_:"
        " it looks like an API key, not the endpoint's signing secret (whsec_...): Stripe's"
        " webhooks will not verify",
        "webhookd: warning: sources.pay.verify.secrets[2] (env:CHECK_STRIPE_C): does not start"
        " with whsec_ as an endpoint's signing secret does: Stripe's webhooks may not verify",
    ]
    assert not any(value in result.output for value in values.values())


def test_actions_get_per_kind_retry_defaults_and_unique_names() -> None:
    cfg = loads(
        '[[sources.a.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:1/x"\n'
        '[[sources.a.actions]]\ntype = "log"\n[[sources.a.actions]]\ntype = "log"',
        kinds=actions.kind_defaults,
    )
    forward, log1, log2 = cfg.sources["a"].actions
    assert (forward.retry.max_attempts, forward.retry.base_s, forward.retry.factor) == (10, 10, 3)
    assert forward.timeout_s == 30
    assert [log1.name, log2.name] == ["log-2", "log-3"]
    assert cfg.sources["a"].action("log-3") is log2


def test_unnamed_source_lookup_falls_back_to_catch_all_only_when_present() -> None:
    cfg = loads('[[sources.a.actions]]\ntype = "log"')
    assert cfg.source_for("a") is cfg.sources["a"]
    assert cfg.source_for("b") is None


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", '"1h"'])
def test_lane_max_cooldown_must_be_finite_and_positive(value: str) -> None:
    """A lane's max_cooldown_s of nan, inf, 0 or text is refused with its dotted key."""
    with pytest.raises(ConfigError) as info:
        loads(f"[lanes.llm]\nrpm = 60\nmax_cooldown_s = {value}")
    assert info.value.key == "lanes.llm.max_cooldown_s"
    assert info.value.message.startswith(
        ("must be a finite number", "must be greater than 0", "must be a number, not a string")
    )


def test_lane_max_cooldown_defaults_to_an_hour() -> None:
    """Without max_cooldown_s a lane's 429 cool-down is capped at one hour."""
    lanes = loads("[lanes.a]\nrpm = 60\n[lanes.b]\nrpm = 60\nmax_cooldown_s = 90").lanes
    assert (lanes["a"].max_cooldown_s, lanes["b"].max_cooldown_s) == (3600.0, 90.0)


@pytest.mark.parametrize(
    ("verify", "key"),
    [
        ('scheme = "stripe", secret = "x", allow_sha1 = true', "allow_sha1"),
        ('scheme = "hmac", secret = "x", header = "X-S", allow_sha1 = false', "allow_sha1"),
        ('scheme = "github", secret = "x", allow_sha1 = "yes"', "allow_sha1"),
        ('scheme = "stripe", secret = "x", dedup_body = false', "dedup_body"),
        (
            'scheme = "hmac", secret = "x", header = "X-S", timestamp_header = "X-T",'
            ' signed = "{timestamp}.{body}", dedup_body = false',
            "dedup_body",
        ),
        ('scheme = "hmac", secret = "x", header = "X-S", signed = "{timestamp}"', "signed"),
        ('scheme = "hmac", secret = "x", header = "X-S", signed = "v1:static"', "signed"),
        (
            'scheme = "hmac", secret = "x", header = "X-S", timestamp_header = "X-T"',
            "timestamp_header",
        ),
        (
            'scheme = "hmac", secret = "x", header = "X-S", timestamp_header = "X-T",'
            ' signed = "v1:{body}"',
            "signed",
        ),
        (
            'scheme = "hmac", secret = "x", header = "X-S", signed = "{timestamp}.{body}"',
            "timestamp_header",
        ),
    ],
)
def test_verify_options_that_would_weaken_verification_are_config_errors(
    verify: str, key: str
) -> None:
    """An unsigned timestamp or body, or an option the scheme lacks, is refused naming the key."""
    with pytest.raises(ConfigError) as info:
        loads(f"[sources.a]\nverify = {{ {verify} }}")
    assert info.value.key == f"sources.a.verify.{key}"
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("verify", "allow_sha1"),
    [
        ('scheme = "github", secret = "x"', False),
        ('scheme = "meta", secret = "x", allow_sha1 = true', True),
    ],
)
def test_verify_allow_sha1_option(verify: str, allow_sha1: bool) -> None:
    """allow_sha1 defaults to off and can be turned on for github and meta."""
    v = loads(f"[sources.a]\nverify = {{ {verify} }}").sources["a"].verify
    assert v is not None and v.allow_sha1 is allow_sha1


@pytest.mark.parametrize(
    "signed",
    ['signed = "v1:{body}"', 'timestamp_header = "X-T", signed = "{timestamp}.{body}"'],
)
def test_hmac_templates_that_sign_what_they_read_are_accepted(signed: str) -> None:
    """An hmac template that signs the body, and the timestamp when one is read, is valid."""
    v = loads(
        f'[sources.a]\nverify = {{ scheme = "hmac", secret = "x", header = "X-S", {signed} }}'
    )
    assert v.sources["a"].verify is not None


@pytest.mark.parametrize(
    ("verify", "dedup_body"),
    [
        ('scheme = "github", secret = "x"', True),
        ('scheme = "shopify", secret = "x", dedup_body = false', False),
        ('scheme = "hmac", secret = "x", header = "X-S", dedup_body = false', False),
    ],
)
def test_verify_dedup_body_option(verify: str, dedup_body: bool) -> None:
    """dedup_body defaults to on and can be turned off where no timestamp is signed."""
    v = loads(f"[sources.a]\nverify = {{ {verify} }}").sources["a"].verify
    assert v is not None and v.dedup_body is dedup_body and SCHEMES[v.scheme].untimed(v)


def test_an_empty_config_and_the_reference_file_hold_the_dataclass_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What webhookd.toml documents as each key's default is what a config without it gets."""
    for name, value in REFERENCE_ENV.items():
        monkeypatch.setenv(name, value)
    empty = loads("")
    reference = load(REPO / "webhookd.toml")
    assert (empty.server, empty.admin, empty.journal) == (
        ServerConfig(),
        AdminConfig(),
        JournalConfig(),
    )
    assert (empty.workers, empty.log) == (WorkersConfig(), LogConfig())
    # The reference shows the default listen address (loopback), as every other default.
    assert reference.server == ServerConfig()
    assert (reference.admin, reference.journal) == (AdminConfig(), JournalConfig())
    assert (reference.workers, reference.log) == (WorkersConfig(), LogConfig())
    lane = reference.lanes["openai"]
    assert (lane.burst_s, lane.max_cooldown_s) == (LaneConfig("x").burst_s, DEFAULT_MAX_COOLDOWN_S)
    assert empty.alerts is None and reference.alerts is not None
    alerts = reference.alerts
    assert (alerts.on_dead, alerts.backlog_age_s, alerts.min_interval_s) == (True, None, 300.0)
    with_kinds = load(REPO / "webhookd.toml", kinds=actions.kind_defaults).alerts
    assert with_kinds is not None
    [alert_action] = with_kinds.source.actions
    assert (alert_action.timeout_s, alert_action.retry) == (
        30.0,
        RetryPolicy(max_attempts=10, base_s=10.0, factor=3.0, cap_s=21600.0),
    )


# Each kind's documented (timeout_s, max_attempts, base_s, factor, cap_s); the timeouts give an
# LLM call and a program minutes.
KIND_DEFAULTS = {
    "forward": (30.0, 10, 10.0, 3.0, 6 * 3600.0),
    "openai": (120.0, 6, 2.0, 2.0, 60.0),
    "command": (300.0, 3, 1.0, 4.0, 300.0),
    "python": (300.0, 3, 1.0, 4.0, 300.0),
    "log": (30.0, 3, 1.0, 4.0, 300.0),
}


def test_the_readme_gives_each_kinds_defaults_as_the_code_has_them() -> None:
    """The README's table of timeout_s and retry per type is the kinds' own DEFAULTS."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    # The table's last column (its retries' span in all) is test_docs.py's to check.
    rows = re.findall(r"^\| (`\w+`(?:, `\w+`)*) \| (\d+) \| `(\{[^`]+\})` \|", readme, re.M)
    documented = {}
    for kinds, timeout_s, retry in rows:
        policy = loads(f'[[sources.a.actions]]\ntype = "log"\nretry = {retry}').sources["a"]
        for kind in re.findall(r"`(\w+)`", kinds):
            documented[kind] = ActionDefaults(float(timeout_s), policy.actions[0].retry)
    assert documented == {kind: actions.kind(kind, "type").DEFAULTS for kind in ACTION_KINDS}


@pytest.mark.parametrize("kind", ACTION_KINDS)
def test_each_action_kind_owns_its_timeout_and_retry_defaults(kind: str) -> None:
    """An action that leaves out timeout_s and retry gets its kind's, declared by the kind."""
    timeout_s, attempts, base_s, factor, cap_s = KIND_DEFAULTS[kind]
    declared = ActionDefaults(timeout_s, RetryPolicy(attempts, base_s, factor, cap_s))
    assert declared == actions.kind(kind, "type").DEFAULTS
    cfg = loads(f'[[sources.a.actions]]\ntype = "{kind}"', kinds=actions.kind_defaults)
    (action,) = cfg.sources["a"].actions
    assert (action.timeout_s, action.retry) == (declared.timeout_s, declared.retry)
    written = "timeout_s = 7\nretry = { max_attempts = 2 }"
    cfg = loads(f'[[sources.a.actions]]\ntype = "{kind}"\n{written}', kinds=actions.kind_defaults)
    (given,) = cfg.sources["a"].actions
    assert (given.timeout_s, given.retry) == (
        7.0,
        dataclasses.replace(declared.retry, max_attempts=2),
    )


@pytest.mark.parametrize(
    ("kind", "line", "key", "message"),
    [
        ("log", "colour = 1", "colour", "unknown key for a log action"),
        ("log", 'body = "yes"', "body", "must be true or false, not a string"),
        ("log", 'level = "loud"', "level", "must be one of debug, info, warning"),
        ("forward", "method = 1", "method", "must be a string, not an integer"),
        ("forward", 'method = "GET"', "method", "must be one of POST, PUT, PATCH"),
        ("forward", "url = 12345", "url", "must be a string, not an integer"),
        ("forward", 'url = ["env:X"]', "url", "must be a string, not an array"),
        ("forward", 'url = ["env:UNSET_IN_ANY_TEST"]', "url", "must be a string, not an array"),
        (
            "forward",
            'url = "http://:80/x"',
            "url",
            "'http:///… (the rest not shown)' is not an http(s) URL",
        ),
        (
            "forward",
            'url = "htps://hooks.slack.com/services/T0/B0/Secret123token"',
            "url",
            "'htps://hooks.slack.com/… (the rest not shown)' is not an http(s) URL",
        ),
        ("openai", "model = 123", "model", "must be a string, not an integer"),
        (
            "openai",
            'model = "env:MODEL"',
            "model",
            "is a model name, written as it is (env: and file: are for secrets)",
        ),
        ("openai", "base_url = 1", "base_url", "must be a string, not an integer"),
        ("openai", "then = { forward = 1 }", "then.forward", "must be a string, not an integer"),
        ("openai", "max_tokens = 2.5", "max_tokens", "must be an integer, not a float"),
        ("openai", "tools = []", "tools", "unknown key for an openai action"),
        ("openai", "max_tokens = 0", "max_tokens", "must be at least 1"),
        ("openai", "temperature = inf", "temperature", "must be a finite number, not inf"),
        ("openai", 'max_lane_wait_s = "5"', "max_lane_wait_s", "must be a number, not a string"),
        ("command", "shell = true", "shell", "unknown key for a command action"),
        (
            "python",
            'handler = "m:f"\nretries = 1',
            "retries",
            "unknown key for a python action (did you mean retry?)",
        ),
    ],
)
def test_action_options_are_read_like_the_rest_of_the_config(
    kind: str, line: str, key: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An action's bad option gets the message any config key would, naming its dotted key."""
    monkeypatch.setenv("OPENAI_KEY_FOR_TEST", "sk-test")
    required = {
        "forward": 'url = "http://127.0.0.1:1/x"',
        "openai": 'api_key = "env:OPENAI_KEY_FOR_TEST"\nmodel = "m"\nprompt = "p"',
        "command": 'argv = ["true"]',
    }.get(kind, "")
    if kind == "openai" and "max_tokens" not in line:
        required += "\nmax_tokens = 10"
    # A required option the case gives itself (a url of the wrong type) is not written twice.
    required = "\n".join(r for r in required.splitlines() if not r.startswith(f"{key} = "))
    text = f'[[sources.a.actions]]\ntype = "{kind}"\n{required}\n{line}\n'
    with pytest.raises(ConfigError) as info:
        actions.validate(loads(text))
    assert str(info.value) == f"sources.a.actions[0].{key}: {message}"


def test_journal_url_opens_postgresql_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``journal.url`` takes an ``env:`` PostgreSQL URL that never shows itself; lease_s is 30 s
    unless set, and the SQLite path stays the default without a URL."""
    monkeypatch.setenv("WEBHOOKD_JOURNAL_URL", "postgresql://wh:pa55word@db:5432/webhookd")
    cfg = loads('[journal]\nurl = "env:WEBHOOKD_JOURNAL_URL"')
    assert cfg.journal.url is not None
    assert cfg.journal.url.reveal().endswith("@db:5432/webhookd")
    assert cfg.journal.lease_s == 30.0 and "pa55word" not in repr(cfg)
    assert load(None).journal.url is None
    assert loads("[journal]\nlease_s = 5").journal.lease_s == 5.0


@pytest.mark.parametrize(
    ("journal", "key", "message"),
    [
        ('path = "x.db"\nurl = "postgresql://db/wh"', "journal.url", "journal.path"),
        ('url = "mysql://db/wh"', "journal.url", "postgresql://"),
        ("lease_s = 0", "journal.lease_s", "greater than 0"),
        ('listen_url = "postgresql://db/wh"', "journal.listen_url", "needs journal.url"),
        (
            'url = "postgresql://pool/wh"\nlisten_url = "db:5432"',
            "journal.listen_url",
            "postgresql://",
        ),
        ('url = "postgresql://wh:Zq9@db:notaport/wh"', "journal.url", "not a number from 1 to"),
        ('url = "postgresql://wh:Zq9@db:99999/wh"', "journal.url", "not a number from 1 to"),
        ('url = "postgresql://a:5432,b:x/wh"', "journal.url", "not a number from 1 to"),
        (
            'url = "postgresql://wh:Zq9@db:5432/wh"\nlisten_url = "postgresql://db:0/wh"',
            "journal.listen_url",
            "not a number from 1 to",
        ),
        ('url = "postgresql://wh:Zq9@x@db/wh"', "journal.url", "@ as %40"),
        ('url = "postgresql://wh:Zq9@[bad/wh"', "journal.url", "a \\[ with no \\]"),
        # With a / in it, what looks like a port is part of the password: never shown.
        ('url = "postgresql://wh:Zq9/Zq8:Zq7@db/wh"', "journal.url", "write / as %2F"),
    ],
)
def test_bad_journal_backend_keys_name_the_key(journal: str, key: str, message: str) -> None:
    """``path`` with ``url``, a URL that is not PostgreSQL or whose port is not a port or whose
    password holds a bare @, a zero lease, a LISTEN URL without a journal URL or not
    PostgreSQL's: errors naming the key, never showing the URL."""
    with pytest.raises(ConfigError, match=message) as info:
        loads(f"[journal]\n{journal}")
    assert info.value.key == key
    assert "Zq" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://wh:p%40ss@db:5432/wh",
        "postgresql://wh@a:5432,b:5433/wh",
        "postgresql://[::1]:5432/wh",
        "postgresql://[::1]/wh",
        "postgresql:///wh?host=/var/run/postgresql",
        "postgres://wh:pa:ss@db/wh",
    ],
)
def test_journal_urls_as_libpq_writes_them_are_taken(url: str) -> None:
    """Escaped passwords, several hosts with their ports, IPv6, a Unix socket's folder."""
    assert loads(f'[journal]\nurl = "{url}"').journal.url is not None


# Passwords whose bare @, /, ? or # a parser would take for the end of the host or the path:
# the rest of the password would be shown as the host, the database or an option.
_SPLIT_PASSWORDS = ["Abc@Sec/ret99", "Abc@Sec?ret99", "Abc#Secret99", "Abc/ret99"]


@pytest.mark.parametrize("password", _SPLIT_PASSWORDS)
@pytest.mark.parametrize("written", ["inline", "env"])
def test_a_journal_url_whose_password_would_be_split_is_refused_unshown(
    password: str, written: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password with a bare @ beside a /, ? or #, or a / alone, cannot be told from the host
    and path after it: a config error naming journal.url that says how to write it, with no
    part of the password, whether the URL is in the file or in its env: variable."""
    url = f"postgresql://wh:{password}@127.0.0.1:19310/whtrial"
    monkeypatch.setenv("WEBHOOKD_JOURNAL_URL", url)
    value = url if written == "inline" else "env:WEBHOOKD_JOURNAL_URL"
    with pytest.raises(ConfigError) as info:
        loads(f'[journal]\nurl = "{value}"')
    said = str(info.value)
    assert info.value.key == "journal.url" and said.startswith("journal.url: ")
    assert "write / as %2F, ? as %3F, @ as %40 and # as %23" in said and "\n" not in said
    assert not any(part in said for part in ("Abc", "Sec", "ret99", "Secret99"))


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://wh:Zq9@db/wh#frag",
        "postgresql:///wh?host=/run/postgresql&user=Zq9@x",
        "postgresql://wh@db/Zq9@x",
    ],
)
def test_a_journal_url_with_a_fragment_or_an_at_past_the_host_is_refused(url: str) -> None:
    """libpq URLs have no fragment, and an @ past the host may be a password's: refused."""
    with pytest.raises(ConfigError, match="@ as %40") as info:
        loads(f'[journal]\nurl = "{url}"')
    assert info.value.key == "journal.url" and "Zq9" not in str(info.value)


def test_a_journal_url_whose_password_is_percent_encoded_is_taken() -> None:
    """The same passwords escaped as libpq reads them: taken as written."""
    url = "postgresql://wh:Abc%40Sec%2Fret99%3Fx%23y@127.0.0.1:19310/whtrial"
    journal_url = loads(f'[journal]\nurl = "{url}"').journal.url
    assert journal_url is not None and journal_url.reveal() == url
    assert not credentials_unclear(url)


_FORWARD = '[[sources.a.actions]]\ntype = "forward"\nurl = "{}"\n'
_THEN = (
    '[[sources.a.actions]]\ntype = "openai"\napi_key = "sk-test"\nmodel = "m"\nprompt = "p"\n'
    'max_tokens = 10\nthen = {{ forward = "{}" }}\n'
)


@pytest.mark.parametrize(
    ("text", "url", "key"),
    [
        (_FORWARD, "http://127.0.0.1:99999/x", "sources.a.actions[0].url"),
        (_FORWARD, "http://127.0.0.1:0/x", "sources.a.actions[0].url"),
        (_FORWARD, "https://[::1]:65536/x", "sources.a.actions[0].url"),
        (_FORWARD, "http://hooks:Zq9/pw@example.com/x", "sources.a.actions[0].url"),
        (_FORWARD, "env:FWD_URL", "sources.a.actions[0].url"),
        (_THEN, "http://127.0.0.1:99999/x", "sources.a.actions[0].then.forward"),
        ('[alerts]\nurl = "{}"\n', "http://127.0.0.1:99999/x", "alerts.url"),
    ],
    ids=["above", "zero", "ipv6", "slash-in-password", "env", "then-forward", "alerts"],
)
def test_a_delivery_url_whose_port_is_not_a_port_is_refused_naming_the_key(
    text: str, url: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward, then.forward or [alerts] URL with a port out of 1-65535 (or a bare / in its
    password, which ends the host early) is a config error, not an InvalidUrlClientError at
    every attempt; an env: URL is checked as read, and never shown."""
    monkeypatch.setenv("FWD_URL", "http://u:Zq9secret@127.0.0.1:70000/x")
    with pytest.raises(ConfigError) as info:
        actions.validate(loads(text.format(url), kinds=actions.kind_defaults))
    assert info.value.key == key
    assert "has a port that is not a number from 1 to 65535" in str(info.value)
    assert "Zq9" not in str(info.value)
    # The hint on a / in a password, only where the URL has one.
    assert ("write / as %2F" in str(info.value)) == ("@" in url or url.startswith("env:"))


@pytest.mark.parametrize(
    ("text", "url", "key"),
    [
        (_FORWARD, "http://exa mple.com/x", "sources.a.actions[0].url"),
        (_FORWARD, "https://billing.internal>/x", "sources.a.actions[0].url"),
        (_THEN, "http://exa mple.com/x", "sources.a.actions[0].then.forward"),
        ('[alerts]\nurl = "{}"\n', "https://hooks .slack.com/x", "alerts.url"),
    ],
    ids=["space", "angle-bracket", "then-forward", "alerts"],
)
def test_a_delivery_url_with_a_host_no_host_could_have_is_refused_naming_the_key(
    text: str, url: str, key: str
) -> None:
    """A space or a character no host name holds: every attempt would fail at the name
    lookup, so check says so at once."""
    with pytest.raises(ConfigError) as info:
        actions.validate(loads(text.format(url), kinds=actions.kind_defaults))
    assert str(info.value) == f"{key}: has a host name with a space or a character no host name has"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/x", "https://h:65535/x", "http://[::1]:8080/", "http://h/x"]
)
def test_delivery_urls_with_a_port_in_range_or_none_are_taken(url: str) -> None:
    """The port check takes 1 to 65535, an IPv6 address's, and none (the scheme's own)."""
    actions.validate(loads(_FORWARD.format(url)))


RELOAD_BASE = """
[server]
listen = "127.0.0.1:8080"
[lanes.llm]
rpm = 60
[sources.a]
[[sources.a.actions]]
type = "log"
[sources.b]
[[sources.b.actions]]
type = "log"
"""


def test_plan_reload_takes_sources_and_new_lanes_and_names_what_waits_for_a_restart() -> None:
    old = loads(RELOAD_BASE, "old.toml", kinds=actions.kind_defaults)
    same = plan_reload(old, loads(RELOAD_BASE, "old.toml", kinds=actions.kind_defaults))
    assert (same.config, same.summary(), same.kept) == (old, "no source changed", ())

    text = (
        RELOAD_BASE.replace("8080", "9090")
        .replace("rpm = 60", "rpm = 6000")
        .replace('[sources.a]\n[[sources.a.actions]]\ntype = "log"', "")
        .replace('type = "log"', 'type = "log"\ntimeout_s = 5')
        + '[lanes.new]\ntpm = 1000\n[sources.c]\n[[sources.c.actions]]\ntype = "log"\n'
        + '[workers]\nconcurrency = 4\n[alerts]\nurl = "http://127.0.0.1:9/x"\n'
    )
    new = loads(text, "new.toml", kinds=actions.kind_defaults)
    plan = plan_reload(old, new)
    assert (plan.added, plan.removed, plan.changed) == (("c",), ("a",), ("b",))
    assert plan.summary() == "added c; removed a; changed b; added lanes new; added [alerts]"
    assert plan.kept == ("server.listen", "workers.concurrency", "lanes.llm")
    cfg = plan.config
    assert cfg.sources == new.sources and cfg.origin == "new.toml"
    assert (cfg.server, cfg.workers) == (old.server, old.workers)
    assert cfg.alerts == new.alerts and cfg.alerts is not None
    back = plan_reload(cfg, old)
    assert (back.config.alerts, back.summary()) == (
        None,
        "added a; removed c; changed b; removed lanes new; removed [alerts]",
    )
    quieter = dataclasses.replace(new, alerts=dataclasses.replace(cfg.alerts, min_interval_s=60))
    assert plan_reload(new, quieter).summary() == "changed [alerts]"
    assert cfg.lanes["llm"] == old.lanes["llm"]  # kept with its buckets: a restart changes it
    assert cfg.lanes["new"] == new.lanes["new"]
    many = RELOAD_BASE + "".join(f"[sources.s{n:02d}]\n" for n in range(15))
    assert plan_reload(old, loads(many)).summary() == (
        "added s00, s01, s02, s03, s04, s05, s06, s07, s08, s09 and 5 more"
    )


def test_the_catch_all_stands_only_for_names_it_would_take() -> None:
    """So ``pause``, the admin API's pause and replay-dead refuse a name no webhook can have."""
    cfg = load(None)  # the embedded default: a catch-all
    assert cfg.source_for("shop") is cfg.sources[CATCH_ALL]
    assert cfg.source_for("../x") is None and cfg.source_for("") is None


def test_plan_reload_takes_the_log_settings_but_those_the_command_line_set() -> None:
    old = loads(RELOAD_BASE, "old.toml", kinds=actions.kind_defaults)
    new = loads(RELOAD_BASE + '[log]\nlevel = "debug"\nformat = "json"\n', "new.toml")
    plan = plan_reload(old, new)
    assert (plan.config.log.level, plan.config.log.format, plan.kept) == ("debug", "json", ())
    level = plan_reload(old, new, fixed={"log.level"})
    assert (level.config.log.level, level.config.log.format) == ("info", "json")
    assert level.kept == ("log.level",)
    both = plan_reload(old, new, fixed={"log.level", "log.format"})
    assert (both.config.log, both.kept) == (old.log, ("log.level", "log.format"))


def test_a_short_admin_token_is_taken_on_loopback_and_a_long_one_anywhere() -> None:
    """The length rule is for an admin API others can reach."""
    assert loads('[admin]\ntoken = "short"').admin.token is not None
    text = '[admin]\nlisten = "0.0.0.0:8081"\ntoken = "a-token-of-16-ch"'
    assert loads(text).admin.listen is not None


def test_check_warns_of_unsigned_sources_on_a_public_listener_and_of_short_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source that takes unsigned webhooks on an address others can reach, and a signing
    secret short enough to guess, are warned of by name and length only; on loopback an
    unsigned source is the development setup and is not."""
    monkeypatch.setenv("CHECK_SHORT_SECRET", "hunter2")
    body = (
        '[sources.deploy]\n[[sources.deploy.actions]]\ntype = "log"\n'
        '[sources.gh]\nverify = { scheme = "github", secret = "env:CHECK_SHORT_SECRET" }\n'
    )
    path = tmp_path / "webhookd.toml"
    for listen, unsigned in (("0.0.0.0:8080", True), ("127.0.0.1:8080", False)):
        path.write_text(f'[server]\nlisten = "{listen}"\n' + body, encoding="utf-8")
        result = CliRunner().invoke(main, ["check", "--config", str(path)])
        assert result.exit_code == 0, result.output
        said = [
            "webhookd: warning: source(s) deploy take unsigned webhooks on 0.0.0.0:8080: anyone"
            " who can reach it can post to them (set their verify, or let only a proxy that"
            " checks the senders reach this address)"
        ] * unsigned
        said.append(
            "webhookd: warning: sources.gh.verify.secret has 7 characters: short enough to"
            " guess; use 32 random characters or more (openssl rand -hex 32)"
        )
        assert result.stderr.splitlines() == said
        assert "hunter2" not in result.output


def test_check_warns_of_allow_from_on_loopback_with_no_trusted_proxy(tmp_path: Path) -> None:
    """On loopback the daemon sits behind a proxy: without the proxy in trusted_proxies every
    sender is the proxy's address, and an allow_from source refuses them all (or, listing the
    local machine too, takes them all). One that lists only the local machine (development, a
    sender on the same box) is not warned of."""
    body = '[sources.ci]\nallow_from = ["192.0.2.0/24"]\n'
    path = tmp_path / "webhookd.toml"
    for server, warned in (
        ('listen = "127.0.0.1:8080"', True),
        ('listen = "127.0.0.1:8080"\ntrusted_proxies = ["127.0.0.1"]', False),
        ('listen = "0.0.0.0:8080"', False),
    ):
        path.write_text(f"[server]\n{server}\n" + body, encoding="utf-8")
        result = CliRunner().invoke(main, ["check", "--config", str(path)])
        assert result.exit_code == 0, result.output
        said = [line for line in result.stderr.splitlines() if "allow_from" in line]
        warning = (
            "webhookd: warning: source(s) ci take webhooks only from their allow_from, and"
            " 127.0.0.1:8080 is loopback, so behind a proxy every sender is the proxy's"
            " address, which allow_from judges instead: list the proxy in"
            " server.trusted_proxies"
        )
        assert said == [warning] * warned
    # Loopback alone is development; loopback beside others lets every sender through a proxy.
    for allowed, warned in (
        ('["127.0.0.0/8"]', False),
        ('["::1", "127.0.0.2"]', False),
        ('["127.0.0.1", "203.0.113.0/24"]', True),
    ):
        path.write_text(f"[sources.ci]\nallow_from = {allowed}\n", encoding="utf-8")
        result = CliRunner().invoke(main, ["check", "--config", str(path)])
        assert ("allow_from" in result.stderr) == warned, (allowed, result.stderr)


def test_check_names_a_url_of_the_wrong_type_before_the_secrets_it_would_read(
    tmp_path: Path,
) -> None:
    """``url = ["env:X"]`` with X unset: check's look for unreadable secrets took the array for
    a list of secrets and said X was not set; it is the wrong type, and check says so."""
    path = tmp_path / "webhookd.toml"
    path.write_text('[[sources.a.actions]]\ntype = "forward"\nurl = ["env:UNSET_IN_ANY_TEST"]\n')
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert (result.exit_code, result.stderr) == (
        2,
        "webhookd: error: sources.a.actions[0].url: must be a string, not an array\n",
    )


def test_walking_a_config_for_its_secrets_leaves_no_cycle_for_the_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload walks the config for its secrets several times. The walk was a generator
    calling itself through its closure: a cycle holding its set of every object seen, freed
    only by a collection, which the daemon runs seldom (80 MB to 763 MB over 200 reloads of
    300 sources). Walked now, it leaves nothing for the collector to find."""
    monkeypatch.setenv("WALK_SECRET", "s" * 40)
    text = "".join(
        f'[sources.s{n}]\nverify = {{ scheme = "github", secret = "env:WALK_SECRET" }}\n'
        for n in range(20)
    )
    cfg = loads(text)
    gc.collect()
    gc.disable()
    try:
        assert len(secret_values(cfg)) == 1 and len(list(leaves(cfg))) > 20
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_actions_named_by_their_place_are_warned_of() -> None:
    """Two unnamed actions of one type are named by their place (forward-1, forward-2): adding,
    removing or moving one renames the others, whose queued jobs then go dead. ``check`` and
    a start say so; one unnamed action of its type (named by its type alone) is not."""
    cfg = loads(
        "[sources.a]\n"
        '[[sources.a.actions]]\ntype = "log"\n'
        '[[sources.a.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/x"\n'
        '[[sources.a.actions]]\ntype = "forward"\nurl = "http://127.0.0.1:9/y"\n'
        '[[sources.a.actions]]\ntype = "forward"\nname = "z"\nurl = "http://127.0.0.1:9/z"\n',
        "t",
    )
    [said] = actions.warnings(cfg)
    assert said.startswith(
        "sources.a.actions: forward-2, forward-3 have no name and are named by place"
    )


def test_a_reload_names_the_action_that_was_renamed_by_its_options() -> None:
    """The refusal names the new file's action with the renamed one's options, not the first
    of its type: naming the action added before it would send the queued jobs (body and
    signature) to the new one's target. Changed as well, it names the source's actions."""
    old = loads(
        '[sources.a]\n[[sources.a.actions]]\ntype = "log"\n'
        '[[sources.a.actions]]\ntype = "forward"\nurl = "http://old.example/"\n',
        "t",
    )
    new = loads(
        '[sources.a]\n[[sources.a.actions]]\ntype = "forward"\nurl = "http://new.example/"\n'
        '[[sources.a.actions]]\ntype = "log"\n'
        '[[sources.a.actions]]\ntype = "forward"\nurl = "http://old.example/"\n',
        "t",
    )
    assert plan_reload(old, new).renamed == (
        ("sources.a.actions[2]", "forward", "forward", "forward-3"),
    )
    changed = loads(new_text("http://other.example/"), "t")
    assert plan_reload(old, changed).renamed == (
        ("sources.a.actions", "forward", "forward", "forward-1, forward-3"),
    )


def new_text(url: str) -> str:
    return (
        '[sources.a]\n[[sources.a.actions]]\ntype = "forward"\nurl = "http://new.example/"\n'
        '[[sources.a.actions]]\ntype = "log"\n'
        f'[[sources.a.actions]]\ntype = "forward"\nurl = "{url}"\n'
    )


# One source as every node of a cluster would run it: the keys ``cluster_digest`` compares.
CLUSTER_SOURCE = """\
[sources.shop]
verify = { scheme = "github", secret = "env:SHOP_SECRET" }
dedup = "header:X-Delivery"
[[sources.shop.actions]]
name = "deliver"
type = "forward"
url = "http://127.0.0.1:9/orders"
when = { "header:X-Kind" = ["order"] }
[[sources.shop.actions]]
type = "log"
[sources.mail]
[[sources.mail.actions]]
type = "log"
"""


def _digest(text: str) -> str:
    return cluster_digest(loads(text, "node.toml", kinds=actions.kind_defaults))


@pytest.mark.parametrize(
    ("was", "now"),
    [
        ('dedup = "header:X-Delivery"', 'dedup = "json:id"'),
        ('dedup = "header:X-Delivery"\n', ""),
        # A node left unsigned: it takes any webhook the others refuse.
        ('verify = { scheme = "github", secret = "env:SHOP_SECRET" }\n', ""),
        ('scheme = "github"', 'scheme = "hmac", header = "X-Sig"'),
        ('secret = "env:SHOP_SECRET"', 'secret = "env:OTHER_SECRET"'),
        ('secret = "env:SHOP_SECRET"', 'secrets = ["env:OTHER_SECRET", "env:SHOP_SECRET"]'),
        ('secret = "env:SHOP_SECRET" }', 'secret = "env:SHOP_SECRET", dedup_body = false }'),
        ("[sources.shop]\n", '[sources.shop]\ntenant = "header:X-Shop"\n'),
        ("[sources.shop]\n", '[sources.shop]\npriority = { by = "json:tier", high = ["gold"] }\n'),
        ("[sources.shop]\n", '[sources.shop]\npath = "/in/shop"\n'),
        ("[sources.shop]\n", "[sources.shop]\nmax_body_bytes = 4096\n"),
        ("[sources.shop]\n", "[sources.shop]\nack_status = 200\n"),
        ("[sources.shop]\n", '[sources.shop]\nallow_from = ["10.0.0.0/8"]\n'),
        ("[sources.shop]\n", "[sources.shop]\ntenant_concurrency = 2\n"),
        ('["order"]', '["order", "refund"]'),
        ('when = { "header:X-Kind" = ["order"] }\n', ""),
        ('when = { "header:X-Kind" = ["order"] }', 'ordered_by = "json:order_id"'),
    ],
)
def test_cluster_digest_tells_apart_each_source_key_that_changes_what_a_node_does(
    was: str, now: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose dedup rule differed was not flagged (the same delivery posted to two nodes
    became two events, each forwarded), nor one left without ``verify``: the digest held only
    the sources' names, caps and actions."""
    monkeypatch.setenv("SHOP_SECRET", "gh-secret")
    monkeypatch.setenv("OTHER_SECRET", "gh-secret")
    assert was in CLUSTER_SOURCE
    assert _digest(CLUSTER_SOURCE) != _digest(CLUSTER_SOURCE.replace(was, now, 1))


def test_cluster_digest_is_the_same_for_one_config_written_otherwise_or_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes compare digests made in other processes: the order keys, sources and set members
    are written in, the hash seed, a secret's value and each node's own keys (``[server]``,
    ``intake_per_s``) change nothing, and neither does a reload of the same file."""
    monkeypatch.setenv("SHOP_SECRET", "gh-secret")
    text = CLUSTER_SOURCE.replace(
        "[sources.shop]\n",
        '[sources.shop]\npriority = { by = "json:tier", high = ["gold", "silver", "bronze"] }\n'
        'allow_from = ["10.0.0.0/8", "192.168.0.0/16"]\n',
    ).replace(
        'when = { "header:X-Kind" = ["order"] }',
        'when = { "header:X-Kind" = ["order", "refund"], "json:live" = ["yes"] }',
    )
    mail = '[sources.mail]\n[[sources.mail.actions]]\ntype = "log"\n'
    reordered = (
        mail
        + text.replace(mail, "")
        .replace(
            'verify = { scheme = "github", secret = "env:SHOP_SECRET" }',
            'verify = { secret = "env:SHOP_SECRET", scheme = "github" }',
        )
        .replace('name = "deliver"\ntype = "forward"', 'type = "forward"\nname = "deliver"')
        .replace('"gold", "silver", "bronze"', '"bronze", "gold", "silver"')
        .replace('"10.0.0.0/8", "192.168.0.0/16"', '"192.168.0.0/16", "10.0.0.0/8"')
        .replace(
            '"header:X-Kind" = ["order", "refund"], "json:live" = ["yes"]',
            '"json:live" = ["yes"], "header:X-Kind" = ["refund", "order"]',
        )
        + '[server]\nlisten = "127.0.0.1:9090"\n'
    ).replace("[sources.shop]\n", "[sources.shop]\nintake_per_s = 50\n")
    digest = _digest(text)
    assert _digest(reordered) == digest
    monkeypatch.setenv("SHOP_SECRET", "rotated-on-this-node-first")
    assert _digest(text) == digest

    cfg = loads(text, "node.toml", kinds=actions.kind_defaults)
    reloaded = plan_reload(cfg, loads(text, "node.toml", kinds=actions.kind_defaults)).config
    assert cluster_digest(reloaded) == digest

    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    script = (
        "import sys; from webhookd import actions, config;"
        " print(config.cluster_digest(config.load(sys.argv[1], kinds=actions.kind_defaults)))"
    )
    for seed in ("1", "2", "3"):
        out = subprocess.run(
            [sys.executable, "-c", script, str(path)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == digest, seed


@pytest.mark.parametrize(
    "catch_all", ["", '[sources."*"]\n[[sources."*".actions]]\nname = "any"\ntype = "log"\n']
)
def test_cluster_names_take_a_job_where_the_config_runs_it(
    catch_all: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What another node reads of this one's names (to leave it a job it lacks) takes a job
    exactly where this config runs it: a source's own actions, the catch-all's for a name it
    takes and no source has (never the alerts' own, nor ``../x``), nothing of a name neither
    has."""
    monkeypatch.setenv("SHOP_SECRET", "gh-secret")
    cfg = loads(CLUSTER_SOURCE + catch_all, "node.toml", kinds=actions.kind_defaults)
    names = json.loads(cluster_names(cfg))
    for source in ("shop", "mail", "orders", "webhookd", "../x"):
        for action in ("deliver", "log", "any", "forward"):
            found = cfg.source_for(source)
            runs = found is not None and found.action(action) is not None
            assert names_take(names, source, action) == runs, (source, action)
    assert names_take(names, "orders", "any") == bool(catch_all)
