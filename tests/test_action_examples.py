"""The example configs pass ``webhookd check``, and their script and handler do what they say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_config import REFERENCE_ENV

from webhookd import actions, config
from webhookd.actions.base import Resources
from webhookd.cli import main
from webhookd.models import Event, Job, JobState, Priority

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


async def test_deploy_script_deploys_main_and_skips_other_branches() -> None:
    """The GitHub example runs deploy.sh with the ref and commit; other branches are skipped."""
    main_push = {"ref": "refs/heads/main", "after": "abc123"}
    ran = await run_example_action("github-deploy.toml", "github", main_push)
    assert ran["kind"] == "done"
    assert ran["stdout"] == "deploying abc123 (event evt_example)\n"
    other = await run_example_action("github-deploy.toml", "github", {"ref": "refs/heads/x"})
    assert other["kind"] == "done" and str(other["stdout"]).startswith("skipping refs/heads/x")


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
