"""The example configs pass ``webhookd check``, and their script and handler do what they say."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import aiohttp
import pytest
from click.testing import CliRunner
from conftest import serving
from test_config import REFERENCE_ENV

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
        body=json.dumps(doc).encode(),
    )


JOB = Job("job_example", "evt_example", "a", "t", JobState.RUNNING, 1, 3, 0.0)


async def run_example_action(name: str, source: str, doc: object) -> dict[str, object]:
    cfg = config.load(ROOT / "examples" / name)
    built = actions.build(Resources(config=cfg, http=None))  # type: ignore[arg-type]
    (action,) = built.values()
    outcome = await action.run(event(source, doc), JOB)
    await action.aclose()
    return {"kind": outcome.kind, "result": outcome.result, **outcome.detail}


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


def test_reference_config_passes_check_with_its_commented_action_examples() -> None:
    """webhookd.toml is valid as shipped and with its openai/command/python examples uncommented."""
    text = (ROOT / "webhookd.toml").read_text()
    shipped = config.loads(text)
    actions.validate(shipped)
    assert shipped.lanes["openai"].rpm == 450
    block = text.split("# >>> action examples\n")[1].split("# <<< action examples")[0]
    uncommented = "\n".join(line.removeprefix("#").removeprefix(" ") for line in block.splitlines())
    cfg = config.loads(text + uncommented)
    actions.validate(cfg)
    assert [a.type for a in cfg.sources["mailgun"].actions] == ["openai"]
    assert [a.type for a in cfg.sources["github"].actions] == ["forward", "command"]
    assert [a.type for a in cfg.sources["stripe"].actions] == ["forward", "log", "python"]
