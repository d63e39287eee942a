"""Property tests at the receiver: hostile requests against a running daemon with signed sources.

Arbitrary methods, paths, queries, header sets, content types and bodies only ever get a 2xx or
a 4xx (or a documented 503 with ``Retry-After``), never a 500; a request that fails
verification is counted and leaves no row in the journal. One daemon serves every example.
"""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from conftest import Running, Target, make_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from yarl import URL

from webhookd import send

STANDARD_SECRET = "whsec_" + base64.b64encode(b"fuzz-standard-key-012345").decode()
SOURCES = {
    "github": '{ scheme = "github", secret = "gh" }',
    "stripe": '{ scheme = "stripe", secret = "whsec_st" }',
    "shopify": '{ scheme = "shopify", secret = "sh" }',
    "mailgun": '{ scheme = "mailgun", secret = "mg" }',
    "slack": '{ scheme = "slack", secret = "sl" }',
    "standard": f'{{ scheme = "standard", secret = "{STANDARD_SECRET}" }}',
    "meta": '{ scheme = "meta", secret = "mt", verify_token = "vt-not-in-the-strategies" }',
    "twilio": '{ scheme = "twilio", secret = "tw", url = "https://example.com/hooks/twilio" }',
    "hmac": (
        '{ scheme = "hmac", secret = "hm", header = "X-Sig", timestamp_header = "X-Ts",'
        ' signed = "{timestamp}.{body}" }'
    ),
    "token": '{ scheme = "token", secret = "tk", header = "X-Token", prefix = "Bearer " }',
}
# Extractors run only after verification; the mutated-request test reaches them.
EXTRACTORS = {
    "github": 'tenant = "json:repository.owner.login"\npriority = { by = "header:X-Prio", '
    'high = ["1"] }',
    "stripe": 'dedup = "json:data.object.id"',
    "twilio": 'tenant = "form:AccountSid"',
    "token": 'dedup = "header:X-Delivery"',
}
MAX_BODY = 4096
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
async def daemon(tmp_path: Path, target: Target, run_daemon: Any) -> Running:
    parts = [
        f"[sources.{name}]\nverify = {table}\n{EXTRACTORS.get(name, '')}\n"
        f'[[sources.{name}.actions]]\ntype = "forward"\nurl = "{target.url}/{name}"\n'
        for name, table in SOURCES.items()
    ]
    cfg = make_config(tmp_path, "\n".join(parts), server=f"max_body_bytes = {MAX_BODY}")
    running: Running = await run_daemon(cfg)
    return running


KNOWN_HEADERS = [
    "Content-Type",
    "X-Hub-Signature-256",
    "X-Hub-Signature",
    "X-GitHub-Delivery",
    "Stripe-Signature",
    "X-Shopify-Hmac-Sha256",
    "X-Shopify-Webhook-Id",
    "X-Slack-Signature",
    "X-Slack-Request-Timestamp",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "svix-id",
    "svix-timestamp",
    "svix-signature",
    "X-Twilio-Signature",
    "I-Twilio-Idempotency-Token",
    "X-Sig",
    "X-Ts",
    "X-Token",
    "X-Delivery",
    "X-Prio",
]
CONTENT_TYPES = [
    "application/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=zz",
    "multipart/form-data",
    "text/plain; charset=utf-8",
    "application/octet-stream",
]
header_names = st.sampled_from(KNOWN_HEADERS) | st.from_regex(
    r"X-[A-Za-z0-9-]{1,12}", fullmatch=True
)
header_values = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
    | st.sampled_from(CONTENT_TYPES)
    | st.from_regex(
        r"t=[0-9]{1,11}(,v1=[0-9a-f]{0,64})*|sha(1|256)=[0-9a-f]{0,64}|v0=[0-9a-f]{0,64}"
        r"|(v1,[A-Za-z0-9+/=]{0,44} ?)+|[0-9]{1,12}|Bearer [a-z]{0,4}",
        fullmatch=True,
    )
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.lists(
        st.tuples(
            st.sampled_from(["timestamp", "token", "signature", "type", "x"]) | st.text(max_size=8),
            st.text(max_size=20),
        ),
        max_size=6,
    ).map(lambda p: urlencode(p).encode()),
    st.just(b'{"type": "url_verification", "challenge": "c"}'),
    st.integers(MAX_BODY - 2, MAX_BODY + 2).map(lambda n: b"x" * n),
)
SOURCE_PATHS = [f"/hooks/{n}" for n in SOURCES]
paths = st.sampled_from(["source"] * 3 + ["hooks", "any"]).flatmap(  # mostly the sources
    lambda kind: (
        st.sampled_from(SOURCE_PATHS)
        if kind == "source"
        else st.text(max_size=20).map(lambda t: "/hooks/" + quote(t, safe=""))
        if kind == "hooks"
        else st.text(max_size=30).map(lambda t: "/" + quote(t, safe="/"))
    )
)
queries = st.dictionaries(
    st.sampled_from(["hub.mode", "hub.verify_token", "hub.challenge", "bodySHA256"])
    | st.text(max_size=6),
    st.sampled_from(["subscribe", ""]) | st.text(max_size=12),
    max_size=4,
)
# Mostly POST, to reach verification; the HTTP parser itself answers 400 to unknown methods.
methods = st.sampled_from(
    ["POST"] * 6 + ["GET"] * 2 + ["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND", "BREW"]
)


async def _send(
    r: Running, method: str, path: str, query: dict[str, str], headers: Any, body: bytes
) -> int:
    url = URL(r.url + path + ("?" + urlencode(query) if query else ""), encoded=True)
    async with r.http.request(method, url, headers=headers, data=body) as resp:
        await resp.read()
        status = resp.status
        assert status < 500 or (status == 503 and "Retry-After" in resp.headers), status
        event(f"status {status}")  # the spread shows with --hypothesis-show-statistics
    assert not r.task.done(), "the daemon stopped"
    return status


async def _rows(r: Running) -> int:
    assert r.daemon.journal is not None
    counts = await r.daemon.journal.counts()
    return counts.events


@pytest.mark.slow
@FUZZ
@given(
    method=methods,
    path=paths,
    query=queries,
    headers=st.dictionaries(header_names, header_values, max_size=8),
    body=bodies,
)
async def test_garbage_never_crashes_or_journals(
    daemon: Running,
    method: str,
    path: str,
    query: dict[str, str],
    headers: dict[str, str],
    body: bytes,
) -> None:
    """Anything thrown at signed sources gets 2xx/4xx (or 503 + Retry-After) and stores nothing."""
    before = daemon.daemon.intake.verify_failures
    status = await _send(daemon, method, path, query, headers, body)
    assert await _rows(daemon) == 0
    counted = daemon.daemon.intake.verify_failures - before
    assert counted == (1 if status == 401 else 0)


_ids = itertools.count()
mutations = st.fixed_dictionaries(
    {
        "drop": st.sets(st.sampled_from(KNOWN_HEADERS), max_size=2),
        "replace": st.dictionaries(st.sampled_from(KNOWN_HEADERS), header_values, max_size=2),
        "body_edit": st.none() | st.binary(min_size=1, max_size=12),
        "query": st.none() | queries,
    }
)


@pytest.mark.slow
@FUZZ
@given(name=st.sampled_from(list(SOURCES)), body=st.none() | bodies, mutation=mutations)
async def test_mutated_signed_requests(
    daemon: Running, name: str, body: bytes | None, mutation: dict[str, Any]
) -> None:
    """A signed request, mutated or not: accepted with a verdict, or 401 and no new row."""
    src = daemon.daemon.config.sources[name]
    try:
        d = send.build(
            src,
            url=daemon.url + src.path,
            body=body,
            now=daemon.daemon.clock.time(),
            delivery_id=f"fuzz-{next(_ids)}",
        )
    except ValueError:  # a body the scheme cannot carry (Mailgun: neither JSON object nor form)
        return
    headers = {k: v for k, v in d.headers.items() if k not in mutation["drop"]}
    headers.update(mutation["replace"])
    sent = d.body
    if mutation["body_edit"] is not None:
        sent = mutation["body_edit"] + d.body[len(mutation["body_edit"]) :]
    path_query = d.url[len(daemon.url) :]
    path, _, query_text = path_query.partition("?")
    query = mutation["query"] if mutation["query"] is not None else None
    url_tail = path + (("?" + query_text) if query is None and query_text else "")
    before = await _rows(daemon)
    status = await _send(daemon, "POST", url_tail, query or {}, headers, sent)
    after = await _rows(daemon)
    # 200 is a duplicate or Slack's url_verification answer: neither adds a row.
    assert after - before == (1 if status == 202 else 0)
    assert status in (200, 202, 400, 401, 413, 503), status
    unchanged = not (mutation["drop"] or mutation["replace"] or mutation["query"] is not None)
    if unchanged and mutation["body_edit"] is None and len(d.body) <= MAX_BODY:
        assert status in (200, 202)
