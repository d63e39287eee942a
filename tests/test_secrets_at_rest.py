"""Secrets at rest and on show, in a real ``webhookd serve``: an owner-only journal, credential
headers never stored, and configured secrets masked in the events API and ``webhookd show``."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from procs import Procs, poll, write_config

pytestmark = [pytest.mark.slow, pytest.mark.subprocess, pytest.mark.timeout(60)]

SECRET = "tok-secret-9876-shared"
CREDENTIAL = "bearer-credential-5555"
HANDLERS = """\
import os


def echo(event):
    names = ("X-Shared-Token", "Authorization", "Cookie", "X-Hub-Signature-256")
    return {name: event.header(name) for name in names}


def fail(event):
    raise RuntimeError("upstream refused key " + os.environ["WEBHOOKD_TEST_SHARED_TOKEN"])


def leak(event):
    return {"note": "used key " + os.environ["WEBHOOKD_TEST_SHARED_TOKEN"]}
"""


def config(tmp_path: Path) -> Path:
    (tmp_path / "leaky.py").write_text(HANDLERS, encoding="utf-8")
    body = f"""
[sources.tok]
[sources.tok.verify]
scheme = "token"
header = "X-Shared-Token"
secret = "env:WEBHOOKD_TEST_SHARED_TOKEN"
[[sources.tok.actions]]
type = "python"
name = "echo"
handler = "leaky:echo"
path = "{tmp_path}"
[[sources.tok.actions]]
type = "python"
name = "fail"
handler = "leaky:fail"
path = "{tmp_path}"
retry = {{ max_attempts = 1 }}
[[sources.tok.actions]]
type = "python"
name = "leak"
handler = "leaky:leak"
path = "{tmp_path}"
"""
    return write_config(tmp_path / "c.toml", tmp_path / "j.db", body)


async def test_journal_is_private_credentials_are_not_stored_and_secrets_are_masked(
    tmp_path: Path, procs: Procs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a permissive umask the journal files are 0600; the token scheme's header, the
    Authorization and Cookie headers are stored (and handed to actions) as ***, a signature
    header as sent; an error quoting a secret is journaled, and shown, as ***."""
    monkeypatch.setenv("WEBHOOKD_TEST_SHARED_TOKEN", SECRET)
    path = config(tmp_path)
    old_umask = os.umask(0o022)
    try:
        daemon = await procs.serve(path)
    finally:
        os.umask(old_umask)
    journal = tmp_path / "j.db"
    headers = {
        "X-Shared-Token": SECRET,
        "Authorization": f"Bearer {CREDENTIAL}",
        "Cookie": f"session={CREDENTIAL}",
        "X-Hub-Signature-256": "sha256=abc123",
        "Content-Type": "application/json",
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(daemon.url + "/hooks/tok", data=b"{}", headers=headers) as r:
            assert r.status == 202, await r.text()
            event_id = (await r.json())["id"]
        doc: dict[str, Any] = {}
        text = ""

        async def settled() -> bool:
            nonlocal doc, text
            async with http.get(f"{daemon.admin_url}/events/{event_id}") as r:
                text = await r.text()
            doc = json.loads(text)
            return all(j["state"] in ("done", "dead") for j in doc["jobs"])

        await poll(settled, timeout_s=20)

    for name in (journal, Path(f"{journal}-wal"), Path(f"{journal}-shm")):
        assert stat.S_IMODE(name.stat().st_mode) == 0o600, name

    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db, db:
        [(stored,)] = db.execute("SELECT headers FROM events").fetchall()
        outcomes = db.execute("SELECT last_error FROM jobs").fetchall()
        outcomes += db.execute("SELECT * FROM attempts").fetchall()
        results = db.execute("SELECT result FROM jobs").fetchall()
    assert SECRET not in stored and CREDENTIAL not in stored
    # An error quoting a secret is masked before it is journaled: the journal, its backups
    # and a `show` where the variable is not set never hold it.
    assert "upstream refused key ***" in repr(outcomes) and SECRET not in repr(outcomes)
    # So is a handler's return value quoting one.
    assert "used key ***" in repr(results) and SECRET not in repr(results)
    kept = {k.lower(): v for k, v in json.loads(stored)}
    assert kept["x-shared-token"] == kept["authorization"] == kept["cookie"] == "***"
    assert kept["x-hub-signature-256"] == "sha256=abc123"

    jobs = {j["action"]: j for j in doc["jobs"]}
    assert jobs["echo"]["result"] == {
        "X-Shared-Token": "***",
        "Authorization": "***",
        "Cookie": "***",
        "X-Hub-Signature-256": "sha256=abc123",
    }
    assert jobs["fail"]["state"] == "dead"
    assert jobs["leak"]["result"] == {"note": "used key ***"}
    assert SECRET not in text and "upstream refused key ***" in jobs["fail"]["last_error"]

    for args in (["show", event_id], ["show", event_id, "--json"]):
        out = await procs.cli(*args, "--config", str(path))
        assert out.returncode == 0, out.stderr
        assert SECRET not in out.stdout and "upstream refused key ***" in out.stdout
    assert SECRET not in daemon.log
