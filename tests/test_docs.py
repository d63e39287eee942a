"""The documents cite tests as their proof (``tests/test_x.py::test_y``, or ``::test_z`` after
one in the same table cell): every cited test must exist, or a guarantee is backed by nothing."""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from pathlib import Path

import click

from webhookd.actions.command import TAIL_BYTES
from webhookd.alerts import _dead_text, _DeadSince
from webhookd.attempts import backoff_s
from webhookd.cli import main
from webhookd.config import ACTION_KINDS
from webhookd.config.sections import RetryPolicy
from webhookd.journal.records import EventDetail
from webhookd.models import Attempt, Event, Job, JobState, Priority

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITED = re.compile(r"(?:(test_\w+)\.py)?::(test_\w+)")


def _defined() -> dict[str, set[str]]:
    return {
        path.stem: set(re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.M))
        for path in (ROOT / "tests").glob("test_*.py")
    }


def test_every_test_the_documents_cite_exists() -> None:
    defined = _defined()
    missing = []
    for doc in DOCS:
        module = None
        for line in doc.read_text().splitlines():
            for found in CITED.finditer(line):
                module = found.group(1) or module  # "::name" belongs to the last module named
                if module is None or found.group(2) not in defined.get(module, set()):
                    missing.append(f"{doc.name}: {module}.py::{found.group(2)}")
    assert not missing, "\n".join(missing)
    assert sum(len(names) for names in defined.values()) > 300  # the tests were found at all


def _sections(doc: str) -> dict[str, str]:
    """A document's ``## `` sections by title; ``## pause, resume`` is both's."""
    found = {}
    for part in re.split(r"^## ", doc, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        for name in title.split(", "):
            found[name.strip()] = body
    return found


def test_every_option_of_every_verb_is_in_its_section_of_cli_md() -> None:
    """docs/cli.md had no word of `stats --json` nor `serve --log-format`, and none of how a
    verb finds its config: every verb's options are in its section (--config, which every verb
    takes, in the note at the top, with WEBHOOKD_CONFIG)."""
    doc = (ROOT / "docs" / "cli.md").read_text()
    top, sections = doc.split("\n## ", 1)[0], _sections(doc)
    assert "`--config FILE`" in top and "`WEBHOOKD_CONFIG`" in top
    missing = []
    for name, command in main.commands.items():
        body = sections.get(name)
        if body is None:
            missing.append(f"## {name}")
            continue
        for param in command.params:
            opts = [o for o in param.opts if o != "--config"]
            if isinstance(param, click.Option) and opts and not any(o in body for o in opts):
                missing.append(f"{name} {opts[0]}")
    assert not missing, "\n".join(missing)


def test_every_option_of_every_verb_is_in_its_synopsis_in_cli_md() -> None:
    """docs/cli.md's synopsis of `check` had no `--no-journal`, though the text under it named
    it: the usage block that opens each verb's section names every option the verb takes."""
    sections = _sections((ROOT / "docs" / "cli.md").read_text())
    missing = []
    for name, command in main.commands.items():
        usage = re.search(r"```\n(.*?)```", sections[name], re.S)
        synopsis = usage.group(1) if usage else ""
        for param in command.params:
            opts = [o for o in param.opts if o != "--config"]
            if isinstance(param, click.Option) and opts and not any(o in synopsis for o in opts):
                missing.append(f"{name} {opts[0]}")
    assert not missing, "\n".join(missing)


def test_every_option_of_every_action_kind_is_in_its_section_of_actions_md() -> None:
    """docs/actions.md had no word of openai's `temperature`, `lane` and `max_lane_wait_s`, nor
    of command's `cwd` (it said the working directory was the daemon's): each kind's options,
    as its module takes them, are in its section."""
    sections = _sections((ROOT / "docs" / "actions.md").read_text())
    missing = []
    for kind in ACTION_KINDS:
        module = importlib.import_module(f"webhookd.actions.{kind}")
        if kind == "openai":  # its settings have a module of their own
            module = importlib.import_module("webhookd.actions.openai_config")
            names = (*module.OPTIONS, *module.THEN_OPTIONS)
        else:
            names = module._OPTIONS
        # `name` or `name = ...`, as the section writes an option with its value
        missing += [f"{kind} {n}" for n in names if not re.search(rf"`{n}(`| =)", sections[kind])]
    assert not missing, "\n".join(missing)


def test_the_command_section_says_what_is_kept_of_the_output_and_what_the_exit_ends() -> None:
    """docs/actions.md had no word of what a command's attempt keeps of its output, nor that a
    process it left in the background of its group is killed as it exits (a `notify.sh &` in
    a deploy script never ran, and nothing said why)."""
    section = _sections((ROOT / "docs" / "actions.md").read_text())["command"]
    text = " ".join(section.split())
    assert f"the last {TAIL_BYTES // 1024} KB of its stdout and of its stderr" in text
    assert "When the program exits, what it left running in its group" in text


def test_the_alert_the_alerts_example_quotes_is_the_one_the_daemon_sends() -> None:
    """examples/alerts-slack.toml quoted a dead alert's text without its last error and the
    `webhookd replay --dead` the daemon ends it with: its body, made from the same dead jobs
    by the code that makes it, is what the example shows."""
    lines = (ROOT / "examples" / "alerts-slack.toml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('#   {"text": '))
    end = next(i for i in range(start, len(lines)) if lines[i].endswith("}"))
    quoted = json.loads(" ".join(line[1:].strip() for line in lines[start : end + 1]))
    events = quoted["events"]
    dead = _DeadSince(len(events), events, 0, Counter(stripe=len(events)))
    dead.last_error = "stripe/forward: http://127.0.0.1:3000/internal/stripe answered 400"
    assert quoted == {"text": _dead_text(dead), "kind": "dead", "count": 3, "events": events}


def test_json_for_scripts_names_every_field_of_an_event_its_jobs_and_their_attempts() -> None:
    """docs/cli.md's contract for `show --json` and `GET /events/<id>` had no word of an
    event's `content_type` nor of an attempt's `detail`: every field of that one document is
    named in its list."""
    attempt = Attempt(1, 1.0, 2.0, "done", None, {"exit_code": 0})
    job = Job("job_1", "evt_1", "log", "log", JobState.DONE, 1, 3, 1.0, history=(attempt,))
    event = Event("evt_1", "shop", 1.0, "shop:1", "", Priority.NORMAL, (), b"{}")
    doc = EventDetail(event, "done", (job,)).as_dict()
    section = _sections((ROOT / "docs" / "cli.md").read_text())["show"]
    listed = section.split("### JSON for scripts", 1)[1].split("- Times are", 1)[0]
    fields = [*doc, *doc["jobs"][0], *doc["jobs"][0]["errors"][0]]
    missing = [name for name in fields if f"`{name}`" not in listed]
    assert not missing, "\n".join(missing)


def _retried_for(policy: RetryPolicy) -> str:
    """The waits of a policy's attempts added up, with the jitter at its least and its most."""
    waits = range(1, policy.max_attempts)
    least = sum(backoff_s(policy, n, lambda: 0.0) for n in waits)
    most = sum(backoff_s(policy, n, lambda: 1.0) for n in waits)

    def span(s: float) -> str:
        if s < 120:
            return f"{s:g} s"
        hours, minutes = divmod(round(s / 60), 60)
        return f"{hours} h {minutes} min" if hours else f"{minutes} min"

    if least < 120 and most < 120:
        return f"{least:g} to {most:g} s"
    return f"{span(least)} to {span(most)}"


def test_the_retry_spans_the_documents_state_are_the_defaults_with_their_jitter() -> None:
    """The README said a forward's retries last ~12 h and docs/actions.md an openai's about a
    minute, where the jitter spreads them over 7.5-15 h and 31-62 s: each kind's row in the
    README's table of defaults, and each sentence quoting a default's span, has it exactly."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| type | `timeout_s` | `retry` |", 1)[1].split("\n\n", 1)[0]
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| `")}
    for kind in ACTION_KINDS:
        policy = importlib.import_module(f"webhookd.actions.{kind}").DEFAULTS.retry
        row = next(line for cell, line in rows.items() if f"`{kind}`" in cell)
        assert row.endswith(f" | {_retried_for(policy)} |"), row
    forward = importlib.import_module("webhookd.actions.forward").DEFAULTS.retry
    said = f"({forward.max_attempts} attempts over {_retried_for(forward)})"
    assert said in readme
    openai = importlib.import_module("webhookd.actions.openai").DEFAULTS.retry
    actions = " ".join((ROOT / "docs" / "actions.md").read_text().split())
    assert f"({openai.max_attempts} attempts, {_retried_for(openai)} in all," in actions
    toml = (ROOT / "webhookd.toml").read_text()
    assert f"the default gives up\n# # after {_retried_for(openai)}," in toml
