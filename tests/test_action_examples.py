"""The example configs pass ``webhookd check``, and their script and handler do what they say."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from conftest import serving
from test_config import REFERENCE_ENV

import webhookd
from webhookd import actions, config, send
from webhookd.actions.base import Resources
from webhookd.cli import main
from webhookd.journal import Journal
from webhookd.models import Event, Job, JobState, Priority, new_event_id
from webhookd.receiver import Receiver
from webhookd.state import IntakeState

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))
ENV = {
    **REFERENCE_ENV,
    "MAILGUN_SIGNING_KEY": "key-example",
    "OPENAI_API_KEY": "sk-example",
    "DRAFTS_SIGNING_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T000/B000/example",
}


@pytest.fixture(autouse=True)
def example_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)  # the examples' relative paths are from the repository root


def test_the_examples_are_there() -> None:
    """Mailgun→OpenAI, GitHub→deploy, Shopify→forward, Stripe→Python and alerts→Slack each
    have a config."""
    names = {p.name for p in EXAMPLES}
    assert names == {
        "alerts-slack.toml",
        "mailgun-openai.toml",
        "github-deploy.toml",
        "shopify-forward.toml",
        "stripe-python.toml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_webhookd_check(path: Path) -> None:
    """``webhookd check`` accepts the example, actions and templates included."""
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


def event(source: str, doc: object) -> Event:
    return Event(
        id="evt_example",
        source=source,
        received_at=0.0,
        dedup_key="k",
        tenant="",
        priority=Priority.NORMAL,
        headers=(("Content-Type", "application/json"),),
        body=doc if isinstance(doc, bytes) else json.dumps(doc).encode(),
    )


JOB = Job("job_example", "evt_example", "a", "t", JobState.RUNNING, 1, 3, 0.0)


async def run_example_action(name: str, source: str, doc: object) -> dict[str, object]:
    cfg = config.load(ROOT / "examples" / name)
    built = actions.build(Resources(config=cfg, http=None))  # type: ignore[arg-type]
    (action,) = built.values()
    outcome = await action.run(event(source, doc), JOB)
    await action.aclose()
    return {"kind": outcome.kind, "result": outcome.result, **outcome.detail}


def test_mailgun_example_keeps_delivering_a_draft_through_an_app_restart() -> None:
    """The example posts each draft to the app with ``then``, retried under the action's own
    policy: the openai default gives up within about a minute, so an app restarting for a
    deploy turned its drafts into dead letters. Its retries span an hour at the least."""
    from webhookd.attempts import backoff_s

    cfg = config.load(ROOT / "examples" / "mailgun-openai.toml", kinds=actions.kind_defaults)
    [action] = cfg.sources["mailgun"].actions
    assert "then" in action.options
    policy = action.retry
    shortest_s = sum(
        backoff_s(policy, attempt, rng=lambda: 0.0) for attempt in range(1, policy.max_attempts)
    )
    assert shortest_s >= 3600


async def test_deploy_script_deploys_the_ref_and_commit_it_is_given() -> None:
    """The GitHub example runs deploy.sh with the pushed ref and commit from the payload."""
    main_push = {"ref": "refs/heads/main", "after": "abc123"}
    ran = await run_example_action("github-deploy.toml", "github", main_push)
    assert ran["kind"] == "done"
    assert ran["stdout"] == "deploying refs/heads/main at abc123 (event evt_example)\n"


async def test_deploy_example_gives_a_job_to_pushes_to_main_only(tmp_path: Path) -> None:
    """Signed GitHub deliveries to the example: a push to main gets the deploy job; another
    branch, a tag and the setup ping are accepted as done events with the deploy filtered."""
    cfg = config.load(ROOT / "examples" / "github-deploy.toml")
    cfg = dataclasses.replace(cfg, journal=config.JournalConfig(path=tmp_path / "j.db"))
    src = cfg.sources["github"]
    async with contextlib.AsyncExitStack() as stack:
        journal = await stack.enter_async_context(Journal(cfg.journal.path))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        address = await stack.enter_async_context(serving(Receiver(cfg, journal, IntakeState())))

        async def deliver(doc: object) -> tuple[str, list[str], list[str]]:
            body = json.dumps(doc).encode()
            request = send.build(
                src,
                url=f"http://{address}{src.path}",
                body=body,
                now=time.time(),
                delivery_id=new_event_id(),
            )
            async with http.post(request.url, data=body, headers=request.headers) as r:
                assert r.status == 202, await r.text()
                detail = await journal.get_event((await r.json())["id"])
            return detail.state, [j.action for j in detail.jobs], list(detail.filtered)

        assert await deliver({"ref": "refs/heads/main", "after": "abc"}) == (
            "queued",
            ["command"],
            [],
        )
        for other in ({"ref": "refs/heads/dev"}, {"ref": "refs/tags/v1"}, {"zen": "ping"}):
            assert await deliver(other) == ("done", [], ["command"])


async def test_stripe_handler_handles_known_types_and_ignores_others() -> None:
    """The Stripe example handler returns what it did for each event type."""
    doc = {
        "id": "evt_1",
        "object": "event",
        "type": "invoice.payment_failed",
        "data": {"object": {"id": "in_1", "customer": "cus_1"}},
    }
    ran = await run_example_action("stripe-python.toml", "stripe", doc)
    assert ran["result"] == {
        "handled": "invoice.payment_failed",
        "customer": "cus_1",
        "stripe_event": "evt_1",
    }
    ignored = await run_example_action("stripe-python.toml", "stripe", {**doc, "type": "x.y"})
    assert ignored["result"] == {"ignored": "x.y"}
    # What `webhookd send stripe` posts is a Stripe-shaped event, ignored, not dead-lettered.
    test = await run_example_action(
        "stripe-python.toml", "stripe", json.loads(send.default_body("stripe", "evt_test"))
    )
    assert (test["kind"], test["result"]) == ("done", {"ignored": "webhookd.test"})
    # What is not a Stripe event at all goes to dead at once: no retry would change it.
    for other in (b"a=1&b=2", [doc], {"type": "x.y"}):
        with pytest.raises(webhookd.Reject, match="not a Stripe event"):
            await run_example_action("stripe-python.toml", "stripe", other)


def test_reference_config_passes_check_with_its_commented_action_examples() -> None:
    """webhookd.toml is valid as shipped and with its openai/command/python examples uncommented."""
    text = (ROOT / "webhookd.toml").read_text()
    shipped = config.loads(text)
    actions.validate(shipped)
    assert shipped.lanes["openai"].rpm == 450
    cfg = config.loads(_reference_with_examples())
    actions.validate(cfg)
    assert [a.type for a in cfg.sources["mailgun"].actions] == ["openai"]
    assert [a.type for a in cfg.sources["github"].actions] == ["forward", "command"]
    assert [a.type for a in cfg.sources["stripe"].actions] == ["forward", "log", "python"]


def test_reference_config_states_each_action_kinds_defaults() -> None:
    """The defaults webhookd.toml lists by kind are the ones an action without them gets."""
    lines = (ROOT / "webhookd.toml").read_text().splitlines()
    [line] = [x for x in lines if x.startswith("#   openai ")]
    said = re.split(r"\s{2,}", line.removeprefix("#").strip())
    expected = []
    for kinds in (("openai",), ("command", "python"), ("log",)):
        d = actions.kind_defaults(kinds[0], "x")
        assert all(actions.kind_defaults(k, "x") == d for k in kinds)
        r = d.retry
        values = f"{d.timeout_s:g}; {r.max_attempts}, {r.base_s:g}, {r.factor:g}, {r.cap_s:g}"
        expected.append(f"{' and '.join(kinds)} {values}")
    assert said == expected


def _reference_with_examples() -> str:
    """webhookd.toml with its commented openai/command/python examples uncommented."""
    text = (ROOT / "webhookd.toml").read_text()
    block = text.split("# >>> action examples\n")[1].split("# <<< action examples")[0]
    uncommented = "\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines())
    return text + uncommented


def _keys_the_loader_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Every key the config loader and the action kinds ask a table for, by the table's dotted
    key made generic (``sources.*``, ``lanes.*``; an action's ``actions:*`` for the keys every
    kind takes, else by its type: ``actions:forward``, ``actions:openai.then``). Read off the
    loader's own ``Table`` calls (``has``, ``raw``, and the names given to ``only``) while it
    loads the reference with its examples, which holds a table of every kind (checked), so a
    key added to the code is seen here at once, with no list of keys to keep."""
    asked: list[tuple[str, str, bool]] = []  # (table's key, key asked, table holds "type")
    for method in ("has", "raw"):
        original = getattr(config.Table, method)

        def record(self: config.Table, name: str, *args: Any, _original: Any = original) -> Any:
            asked.append((self.key, name, "type" in self.data))
            return _original(self, name, *args)

        monkeypatch.setattr(config.Table, method, record)
    only = config.Table.only

    def record_only(
        self: config.Table, names: Iterable[str], what: str, near: Iterable[str] = ()
    ) -> None:
        names = tuple(names)
        asked.extend((self.key, name, "type" in self.data) for name in names)
        only(self, names, what, near)

    monkeypatch.setattr(config.Table, "only", record_only)
    cfg = config.loads(_reference_with_examples(), "webhookd.toml", kinds=actions.kind_defaults)
    # The user's actions only: the alerts' own forward is built, its options are no keys.
    for source in cfg.sources.values():
        for action in source.actions:
            actions.kind(action.type, action.key).validate(action)
    types = {a.key: a.type for s in cfg.sources.values() for a in s.actions}
    assert set(types.values()) == set(config.ACTION_KINDS), "the reference lacks an action kind"

    found: dict[str, set[str]] = {}
    for key, name, typed in asked:
        for action_key, kind in types.items():  # sources.x.actions[0] → actions:kind
            if key == action_key:  # the action's own table holds the keys every kind takes
                key = "actions:*" if typed else f"actions:{kind}"
            elif key.startswith(action_key + "."):
                rest = key[len(action_key) :]
                key = ("actions:*" if rest == ".retry" else f"actions:{kind}") + rest
            else:
                continue
            break
        key = re.sub(r'^sources\.("[^"]*"|[^.]+)', "sources.*", key)
        key = re.sub(r"^lanes\.[^.]+", "lanes.*", key)
        if key in ("sources", "lanes") or key.endswith(".when"):
            continue  # names the user picks (sources, lanes, when's extractors): no fixed keys
        found.setdefault(key, set()).add(name)
    return found


_HEADER = re.compile(r"^#?\s*\[\[?([^\]\s]+)\]\]?\s*$")


def _documented() -> list[tuple[str, str]]:
    """webhookd.toml cut at its table headers, live or commented out: (generic header, text)."""
    spans: list[tuple[str, str]] = [("", "")]
    for line in (ROOT / "webhookd.toml").read_text().splitlines():
        header = _HEADER.match(line)
        if header:
            name = re.sub(r'^sources\.("[^"]*"|[^.]+)', "sources.*", header.group(1))
            spans.append((re.sub(r"^lanes\.[^.]+", "lanes.*", name), ""))
        else:
            spans[-1] = (spans[-1][0], spans[-1][1] + line + "\n")
    return spans


def _where(context: str) -> tuple[str, str | None]:
    """Which spans of webhookd.toml document keys of ``context``: the generic header, and for an
    action's keys the ``type`` the span must have."""
    if context.startswith("actions:"):  # actions:forward, actions:openai.then, actions:*.retry
        kind = context.removeprefix("actions:").partition(".")[0]
        return ("sources.*.actions", None if kind == "*" else kind)
    if context in ("sources.*.verify", "sources.*.priority"):  # inline tables of a source
        return ("sources.*", None)
    if context == "alerts.retry":
        return ("alerts", None)
    return (context, None)


def test_the_reference_config_documents_every_key_the_loader_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """webhookd.toml is "every key with its default": each key the loader reads appears there
    as ``key = ...`` (live, or commented with its default) under a table of its kind, or as a
    table header of its own (``[workers.weights]``, ``[[sources.x.actions]]``)."""
    spans = _documented()
    headers = {header for header, _ in spans}
    missing = []
    for context, names in sorted(_keys_the_loader_reads(monkeypatch).items()):
        header, kind = _where(context)
        texts = [
            text
            for h, text in spans
            if h == header and (kind is None or re.search(rf'\btype = "{kind}"', text))
        ]
        for name in sorted(names):
            own = f"{header}.{name}" if header else name
            if any(h == own or h.startswith(own + ".") for h in headers):
                continue
            if not any(re.search(rf"(^|[\s{{,#]){re.escape(name)} = ", t, re.M) for t in texts):
                missing.append(f"{context}: {name}")
    assert not missing, "keys the loader accepts that webhookd.toml does not show:\n" + "\n".join(
        missing
    )
