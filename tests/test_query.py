"""A webhook URL's query, end to end: kept with its event, handed to each kind of action,
and shown (credential parameters masked) by the events API and ``webhookd show``.

An in-process daemon on a real SQLite file takes a real HTTP request; its worker pool runs a
forward to a loopback target, a command and a python handler, and the test waits on the
pool's ``on_finish`` hook, never on a timer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from actionkit import toml_list
from conftest import Running, Target
from ops_support import Outcomes, cli, write_config

SENT = "store=eu&token=s3cr3t-from-the-sender&note=a%20b+c"
SHOWN = "store=eu&token=***&note=a%20b+c"
# Prints what the program was given: its arguments and the query's variable.
PROGRAM = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['WEBHOOKD_QUERY']]))"


async def test_a_webhooks_query_reaches_every_action_and_is_shown_masked(
    tmp_path: Path, target: Target, run_daemon: Any
) -> None:
    """Posted to ``/hooks/shop?store=eu&token=…``: the forward (``pass_query``) reaches
    ``/orders?store=eu&token=…``, the command gets the whole query as ``WEBHOOKD_QUERY``, the
    handler reads ``event.query``, all as sent; the
    events API and ``show`` (text and JSON) give the query with the token's value masked."""
    argv = [sys.executable, "-c", PROGRAM, "--store"]
    config, cfg = write_config(
        tmp_path,
        f"""
[sources.shop]
[[sources.shop.actions]]
type = "forward"
url = "{target.url}/orders"
pass_query = true
[[sources.shop.actions]]
type = "command"
argv = {toml_list(argv)}
[[sources.shop.actions]]
type = "python"
handler = "actionkit:echo_query"
""",
    )
    running: Running = await run_daemon(cfg)
    outcomes = Outcomes(running)
    status, answer = await running.post(f"/hooks/shop?{SENT}", b'{"order": 1}')
    assert status == 202, answer
    event_id = answer["id"]
    await outcomes.wait_finished(event_id, 3)

    async with running.http.get(f"{running.admin_url}/events/{event_id}") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["state"] == "done", doc
    assert doc["query"] == SHOWN
    assert [(s.path, s.query) for s in target.seen] == [("/orders", SENT)]
    jobs = {job["type"]: job for job in doc["jobs"]}
    stdout = jobs["command"]["errors"][0]["detail"]["stdout"]
    assert json.loads(stdout) == [["--store"], SENT]
    assert jobs["python"]["result"] == {"query": SENT}

    shown = await cli("show", event_id, "--config", str(config))
    assert shown.exit_code == 0, shown.output
    assert f"\nquery    {SHOWN}\n" in shown.output
    as_json = await cli("show", event_id, "--json", "--config", str(config))
    assert json.loads(as_json.output)["query"] == SHOWN


async def test_an_event_without_a_query_shows_none_and_its_command_gets_it_empty(
    tmp_path: Path, run_daemon: Any
) -> None:
    """No query: the API's ``query`` is ``""``, ``show`` prints no query line, and the
    command's ``WEBHOOKD_QUERY`` is set, empty, as the other event variables always are."""
    argv = [sys.executable, "-c", PROGRAM, "x"]
    config, cfg = write_config(
        tmp_path,
        f'[sources.shop]\n[[sources.shop.actions]]\ntype = "command"\nargv = {toml_list(argv)}\n',
    )
    running: Running = await run_daemon(cfg)
    outcomes = Outcomes(running)
    status, answer = await running.post("/hooks/shop", b'{"order": 2}')
    assert status == 202, answer
    await outcomes.wait_finished(answer["id"], 1)
    async with running.http.get(f"{running.admin_url}/events/{answer['id']}") as r:
        doc = await r.json()
    assert doc["query"] == ""
    assert json.loads(doc["jobs"][0]["errors"][0]["detail"]["stdout"]) == [["x"], ""]
    shown = await cli("show", answer["id"], "--config", str(config))
    assert shown.exit_code == 0 and "\nquery " not in shown.output
