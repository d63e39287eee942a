"""The dashboard in a real headless Chromium, driven over the DevTools protocol (CDP)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster import node_config, stop
from conftest import Target, make_config
from openai_standin import StandIn
from ops_support import DOWN_ACTION, TOKEN_ENV, accepted, event_state, forward_source, ingest
from procs import Procs, poll, write_config

from webhookd.errors import ConfigError
from webhookd.journal import Journal
from webhookd.journal.records import Finished
from webhookd.models import JobState
from webhookd.redact import printable
from webhookd.send import build as signed_request

CHROMIUM = shutil.which("chromium")
_DEVTOOLS = re.compile(r"DevTools listening on (ws://\S+)")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)


class Page:
    """One browser tab, reached through a CDP session on the browser's websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: str) -> None:
        self.ws = ws
        self.session = session

    async def evaluate(self, expression: str, timeout_s: float = 30) -> Any:
        """Evaluate JS in the page (awaiting a promise); returns its value or raises its error."""
        result = await send(
            self.ws,
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            session=self.session,
            timeout_s=timeout_s,
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page error: {json.dumps(result['exceptionDetails'])[:1000]}")
        return result["result"].get("value")

    async def wait_for(self, js_condition: str, timeout_s: float = 20) -> Any:
        """Until ``js_condition`` is truthy in the page, re-checked on every DOM change."""
        return await self.evaluate(
            f"""new Promise((resolve, reject) => {{
                const check = () => {{
                    try {{ return ({js_condition}); }} catch (e) {{ return null; }} }};
                const first = check();
                if (first) return resolve(first);
                const timer = setTimeout(() => {{ observer.disconnect();
                    reject(new Error("timed out waiting for: " + {json.dumps(js_condition)})); }},
                    {int(timeout_s * 1000)});
                const observer = new MutationObserver(() => {{
                    const value = check();
                    if (value) {{ observer.disconnect(); clearTimeout(timer); resolve(value); }}
                }});
                observer.observe(document, {{subtree: true, childList: true, attributes: true,
                                              characterData: true}});
            }})""",
            timeout_s=timeout_s + 5,
        )

    async def click(self, selector: str) -> None:
        """A real mouse click (pressed and released) at the middle of the element."""
        box = await self.evaluate(
            f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
                e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
                return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()"""
        )
        for kind in ("mousePressed", "mouseReleased"):
            await send(
                self.ws,
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
                session=self.session,
            )

    async def click_for_status(self, selector: str, said: str) -> str:
        """Click a button that acts (``act`` in the page), then the status line it writes,
        once it starts with ``said``."""
        await self.click(selector)
        status: str = await self.wait_for(
            f"document.querySelector('#status')?.textContent.startsWith('{said}')"
            " && document.querySelector('#status').textContent"
        )
        return status

    async def type_text(self, selector: str, text: str) -> None:
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        await send(self.ws, "Input.insertText", {"text": text}, session=self.session)


_ids = itertools.count(1)


async def send(
    ws: aiohttp.ClientWebSocketResponse,
    method: str,
    params: dict[str, Any] | None = None,
    *,
    session: str | None = None,
    timeout_s: float = 30,
) -> dict[str, Any]:
    """Send one CDP command and read until its answer (events in between are skipped)."""
    msg_id = next(_ids)
    msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
    if session:
        msg["sessionId"] = session
    await ws.send_str(json.dumps(msg))
    doc = await read_until(ws, lambda d: d.get("id") == msg_id, method, timeout_s)
    if "error" in doc:
        raise AssertionError(f"{method}: {doc['error']}")
    result: dict[str, Any] = doc.get("result", {})
    return result


async def until_event(
    ws: aiohttp.ClientWebSocketResponse, method: str, session: str, timeout_s: float = 30
) -> dict[str, Any]:
    """Read the websocket until the CDP event ``method`` arrives for ``session``."""

    def wanted(doc: dict[str, Any]) -> bool:
        return doc.get("method") == method and doc.get("sessionId") == session

    params: dict[str, Any] = (await read_until(ws, wanted, method, timeout_s)).get("params", {})
    return params


async def read_until(
    ws: aiohttp.ClientWebSocketResponse,
    wanted: Callable[[dict[str, Any]], bool],
    what: str,
    timeout_s: float,
) -> dict[str, Any]:
    """The first CDP message ``wanted`` accepts; the ones before it are skipped."""
    async with asyncio.timeout(timeout_s):
        while True:
            frame = await ws.receive()
            if frame.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"browser websocket closed waiting for {what}: {frame!r}")
            doc: dict[str, Any] = json.loads(frame.data)
            if wanted(doc):
                return doc


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[str]:
    """A headless Chromium; yields its DevTools websocket URL."""
    if CHROMIUM is None:
        reason = "chromium is not installed (Debian package 'chromium'; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: the browser test must run in CI")
        pytest.skip(reason)
    profile = tmp_path / "chromium-profile"
    # Its singleton socket's folder goes to TMPDIR, and a browser that is killed leaves it
    # there: in a folder of ours, removed after, not one more in /tmp at every test (and a
    # short path: a Unix socket's has at most 107 bytes, which tmp_path's can pass).
    scratch = Path(tempfile.mkdtemp(prefix="chromium-"))
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
        env={**os.environ, "TMPDIR": str(scratch)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: we end the helpers it starts too
    )
    assert proc.stderr is not None
    said: list[str] = []
    url = ""
    drain: asyncio.Task[None] | None = None
    try:
        async with asyncio.timeout(60):
            while line := (await proc.stderr.readline()).decode("utf-8", "replace"):
                said.append(line)
                m = _DEVTOOLS.search(line)
                if m:
                    url = m.group(1)
                    break
        if not url:
            raise AssertionError("chromium exited before DevTools listened:\n" + "".join(said))

        async def read_rest() -> None:  # a full stderr pipe would stall the browser
            assert proc.stderr is not None
            while await proc.stderr.readline():
                pass

        drain = asyncio.create_task(read_rest())
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if drain is not None:
            await drain
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.asynccontextmanager
async def open_page(browser_url: str, url: str) -> AsyncIterator[Page]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(browser_url, max_msg_size=0) as ws,
    ):
        target = await send(ws, "Target.createTarget", {"url": "about:blank"})
        attached = await send(
            ws, "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(ws, attached["sessionId"])
        await send(ws, "Page.enable", session=page.session)
        await send(ws, "Page.navigate", {"url": url}, session=page.session)
        await until_event(ws, "Page.loadEventFired", page.session)
        yield page
        await send(ws, "Target.closeTarget", {"targetId": target["targetId"]})


@pytest.mark.parametrize("token", [True, False], ids=["token", "no-token"])
async def test_dashboard_shows_a_dead_event_and_its_replay_button_delivers_it(
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
    browser: str,
    monkeypatch: pytest.MonkeyPatch,
    token: bool,
) -> None:
    """The page (asking for the token when one is set) lists the dead event, and Replay
    delivers it: without a token too, where the admin refuses cross-site writes."""
    monkeypatch.setenv(TOKEN_ENV, "dash-token-1234")
    cfg = make_config(
        tmp_path,
        forward_source("shop", target.url + "/in"),
        admin=f'token = "env:{TOKEN_ENV}"' if token else "",
    )
    target.statuses = [500]  # the first delivery fails; one attempt only: dead
    running = await run_daemon(cfg)
    auth = {"Authorization": "Bearer dash-token-1234"} if token else {}
    event_id = await accepted(running, "shop", '{"order": 42}')
    await event_state(running.http, running.admin_url, event_id, "dead", headers=auth)

    async with open_page(browser, running.admin_url + "/") as page:
        if token:
            # No token yet: the API answers 401 and the page asks for one, saying what the
            # API said; it does not claim there are no dead letters.
            await page.wait_for("document.querySelector('#auth.show')")
            said = await page.wait_for("document.querySelector('#stale').textContent")
            assert said == "missing or wrong bearer token"
            assert await page.evaluate("document.querySelector('#dead-empty').hidden")
            assert await page.evaluate("document.querySelector('#meta').textContent") == (
                "token needed"  # it answered: not "connecting…"
            )
            await page.type_text("#token", "dash-token-1234")
            await page.click("#auth button")
        row = f"#dead tr[data-event-id='{event_id}']"
        text = await page.wait_for(f'document.querySelector("{row}")?.textContent')
        assert "shop" in text
        # The event's detail shows its failed attempt and error.
        await page.click(f"#dead a.event[data-id='{event_id}']")
        detail = await page.wait_for(
            "document.querySelector('#detail .job')?.closest('#detail').textContent"
        )
        assert "answered 500" in detail and "dead" in detail

        await page.click(f"#dead button.replay[data-id='{event_id}']")
        await target.wait_for(lambda t: len(t.seen) >= 2, timeout_s=20)
        status = await page.wait_for("document.querySelector('#status')?.textContent")
        assert f"replayed {event_id}" in status
        # Once delivered, the dead-letter list empties.
        await page.wait_for(f'!document.querySelector("{row}")')

    assert target.seen[1].body == b'{"order": 42}'
    doc = await event_state(running.http, running.admin_url, event_id, "done", headers=auth)
    assert doc["jobs"][0]["result"] == {"status": 200}


# Every character admin.token may hold (printable ASCII; a space only inside): what config
# takes, the page must be able to send as the daemon compares it.
WIDEST_TOKEN = "".join(map(chr, range(0x21, 0x50))) + " " + "".join(map(chr, range(0x50, 0x7F)))


async def test_dashboard_logs_in_with_any_token_the_config_takes(
    tmp_path: Path, run_daemon: Any, browser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token of every printable ASCII character, quotes, backslash and an inner space
    included, is taken by config and typed into the page, which then loads: a browser sends a
    header's characters a byte each, as the daemon compares them. A character past ASCII, which
    it would send otherwise (or not at all), is a config error (test_config)."""
    monkeypatch.setenv(TOKEN_ENV, WIDEST_TOKEN)
    running = await run_daemon(make_config(tmp_path, admin=f'token = "env:{TOKEN_ENV}"'))
    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for("document.querySelector('#auth.show')")
        await page.type_text("#token", WIDEST_TOKEN)
        await page.click("#auth button")
        assert await page.wait_for("document.body.dataset.loaded === '1'")
        assert await page.evaluate("document.querySelector('#auth.show')") is None


async def test_dashboard_refuses_a_token_no_config_takes_and_asks_again(
    tmp_path: Path, run_daemon: Any, browser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token typed with a character past ASCII (a typographic apostrophe pasted for a dash),
    which a browser cannot send in a header, is refused by the page, saying which character,
    and the form stays; one kept in the tab from before is dropped, so a reload asks for the
    token (the daemon's 401), not "daemon unreachable" at every refresh, and the right one then
    loads the page."""
    monkeypatch.setenv(TOKEN_ENV, "dash-token-1234")
    running = await run_daemon(make_config(tmp_path, admin=f'token = "env:{TOKEN_ENV}"'))
    stored = "sessionStorage.getItem('webhookd-token')"
    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for("document.querySelector('#auth.show')")
        await page.type_text("#token", "dash\u2019token-1234")
        await page.click("#auth button")
        said = await page.wait_for("document.querySelector('#status.err')?.textContent")
        assert said == "a token is printable ASCII: this one has \u2019 (U+2019)"
        assert await page.evaluate(f"[!!document.querySelector('#auth.show'), {stored}]") == [
            True,
            None,
        ]

        await page.evaluate("sessionStorage.setItem('webhookd-token', 'dash\u200btoken-1234')")
        await send(page.ws, "Page.reload", {}, session=page.session)
        await until_event(page.ws, "Page.loadEventFired", page.session)
        said = await page.wait_for(
            "document.querySelector('#auth.show') && document.querySelector('#stale').textContent"
        )
        assert said == "missing or wrong bearer token"
        assert await page.evaluate(stored) is None
        await page.type_text("#token", "dash-token-1234")
        await page.click("#auth button")
        assert await page.wait_for("document.body.dataset.loaded === '1'")


async def test_dashboard_does_not_ask_again_for_a_token_it_has_replaced(
    tmp_path: Path, run_daemon: Any, browser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh sent with the token before (a wrong one) whose 401s land just after the right
    token is submitted does not bring the token form back: the 401 is the old token's, and the
    page loads with the new one. The form came back, asking for a token it had."""
    monkeypatch.setenv(TOKEN_ENV, "dash-token-1234")
    running = await run_daemon(make_config(tmp_path, admin=f'token = "env:{TOKEN_ENV}"'))
    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for("document.querySelector('#auth.show')")
        await page.type_text("#token", "old-token-0000")
        await page.click("#auth button")
        await page.wait_for(
            "document.querySelector('#auth.show') && !document.querySelector('#stale').hidden"
        )
        # The old token's answers are held, read, until the new token is submitted.
        await page.evaluate(
            """(() => { const real = window.fetch;
            let letGo, held;
            window.letGo = new Promise((r) => { letGo = r; });
            window.held = new Promise((r) => { held = r; });
            window.release = letGo;
            window.fetch = async (path, options) => {
                const r = await real(path, options);
                if (options?.headers?.Authorization !== "Bearer old-token-0000") return r;
                const text = await r.text();
                held();
                await window.letGo;
                return new Response(text, {status: r.status, statusText: r.statusText});
            }; })()"""
        )
        await page.evaluate("window.held")  # a poll's refresh waits on the old token's 401s
        await page.evaluate("document.querySelector('#token').value = ''")
        await page.type_text("#token", "dash-token-1234")
        await page.click("#auth button")
        await page.wait_for("!document.querySelector('#auth.show')")
        await page.evaluate("window.release()")
        assert await page.wait_for("document.body.dataset.loaded === '1'")
        shown = await page.evaluate(
            "[!!document.querySelector('#auth.show'), document.querySelector('#stale').hidden]"
        )
    assert shown == [False, True]


async def test_dashboard_dead_letters_replay_runs_the_dead_job_alone(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """An event delivered to one target and dead at another: its Replay in the Dead letters
    list runs the dead job again, and the target that had the webhook does not get it twice."""
    cfg = make_config(tmp_path, forward_source("shop", target.url + "/in") + DOWN_ACTION)
    running = await run_daemon(cfg)
    event_id = await accepted(running, "shop", '{"order": 5}')
    await event_state(running.http, running.admin_url, event_id, "dead")
    assert len(target.seen) == 1

    async with open_page(browser, running.admin_url + "/") as page:
        button = f"#dead button.replay[data-id='{event_id}']"
        await page.wait_for(f'document.body.dataset.loaded && document.querySelector("{button}")')
        status = await page.click_for_status(button, "replayed")
        assert status == f"replayed {event_id}: 1 dead job(s) re-queued"

    async def down_ran_twice() -> bool:
        doc = await event_state(running.http, running.admin_url, event_id, "dead")
        return any(j["action"] == "down" and len(j["errors"]) == 2 for j in doc["jobs"])

    await poll(down_ran_twice, timeout_s=15)
    doc = await event_state(running.http, running.admin_url, event_id, "dead")
    assert [(j["action"], j["state"], j["attempts"]) for j in doc["jobs"]] == [
        ("deliver", "done", 1),
        ("down", "dead", 1),
    ]
    assert len(target.seen) == 1


async def test_dashboard_dismisses_a_dead_letter_handled_another_way(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """Dismiss on a dead letter (``cancel --dead``): its dead job becomes cancelled with its
    attempt and error kept, the letter leaves the list, nothing is sent again, and the done
    job beside it stays done. The event's page says dismissed, and its Replay dismissed runs
    that job alone again."""
    cfg = make_config(tmp_path, forward_source("shop", target.url + "/in") + DOWN_ACTION)
    running = await run_daemon(cfg)
    event_id = await accepted(running, "shop", '{"order": 6}')
    await event_state(running.http, running.admin_url, event_id, "dead")

    async with open_page(browser, running.admin_url + "/") as page:
        button = f"#dead button.dismiss[data-id='{event_id}']"
        await page.wait_for(f'document.body.dataset.loaded && document.querySelector("{button}")')
        status = await page.click_for_status(button, "dismissed")
        assert status.startswith(f"dismissed {event_id}: 1 dead job(s) cancelled")
        await page.wait_for(f"!document.querySelector(\"#dead tr[data-event-id='{event_id}']\")")

    doc = await event_state(running.http, running.admin_url, event_id, "done")
    assert [(j["action"], j["state"], j["attempts"]) for j in doc["jobs"]] == [
        ("deliver", "done", 1),
        ("down", "cancelled", 1),
    ]
    assert doc["jobs"][1]["errors"] and len(target.seen) == 1

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        button = f"#detail button.undismiss[data-id='{event_id}']"
        # Loaded first: the lists above the event's box would move the button under the click.
        await page.wait_for(f'document.body.dataset.loaded && document.querySelector("{button}")')
        assert "· dismissed " in await page.evaluate(
            "document.querySelector('#detail').textContent"
        )
        status = await page.click_for_status(button, "replayed")
        assert status == f"replayed {event_id}: 1 dismissed job(s) re-queued"
    doc = await event_state(running.http, running.admin_url, event_id, "dead")
    assert [len(j["errors"]) for j in doc["jobs"]] == [1, 2] and len(target.seen) == 1


async def test_dashboard_replays_one_job_of_an_event_alone(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """An event with a delivered job and a dead one: the delivered job's Replay this job on the
    event's page (``replay <id> --action deliver``) delivers it again, and the dead one is not
    run again."""
    cfg = make_config(tmp_path, forward_source("shop", target.url + "/in") + DOWN_ACTION)
    running = await run_daemon(cfg)
    event_id = await accepted(running, "shop", '{"order": 7}')
    await event_state(running.http, running.admin_url, event_id, "dead")
    assert len(target.seen) == 1

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        button = "#detail button.replay-job[data-action='deliver']"
        await page.wait_for(f'document.body.dataset.loaded && document.querySelector("{button}")')
        assert (
            await page.evaluate("document.querySelectorAll('#detail button.replay-job').length")
            == 2
        )
        status = await page.click_for_status(button, "replayed")
        assert status == f"replayed {event_id}: the job of deliver re-queued"

    async def delivered_twice() -> bool:  # the second attempt recorded, not only sent
        doc = await event_state(running.http, running.admin_url, event_id, "dead")
        return [(j["action"], j["state"], len(j["errors"])) for j in doc["jobs"]] == [
            ("deliver", "done", 2),
            ("down", "dead", 1),
        ]

    await poll(delivered_twice, timeout_s=15)
    assert len(target.seen) == 2


async def set_width(page: Page, width: int) -> None:
    """The window's width in CSS pixels, as a phone's (390) or a laptop's (1280)."""
    await send(
        page.ws,
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 844, "deviceScaleFactor": 1, "mobile": False},
        session=page.session,
    )


# What sticks out past the window's right edge, if anything: the page is as wide as the window.
OVERFLOW = """(() => {
    const wide = document.documentElement.scrollWidth - window.innerWidth;
    if (wide <= 0) return "";
    const out = [...document.querySelectorAll("body *")].filter((e) =>
        e.getBoundingClientRect().right > window.innerWidth + 1 && !e.closest(".scroll"));
    return `${wide}px too wide: ` + out.slice(0, 5).map((e) =>
        e.tagName + (e.id ? "#" + e.id : "") + "." + e.className).join(", ");
})()"""


async def test_dashboard_fits_a_phone_and_a_laptop_whatever_a_sender_sent(
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
    browser: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At 390 px (a phone) and 1280 px the page is no wider than the window, the token form's
    Use button is on screen before login, and neither a 300-character tenant, a 64-character
    source name nor a 3000-character answer from a target widens it: long words wrap, and a
    table too wide for its box scrolls inside it."""
    monkeypatch.setenv(TOKEN_ENV, "dash-token-1234")
    name = "s" * 64
    cfg = make_config(
        tmp_path,
        forward_source(name, target.url + "/in", tenant="json:tenant"),
        admin=f'token = "env:{TOKEN_ENV}"',
    )
    running = await run_daemon(cfg)
    auth = {"Authorization": "Bearer dash-token-1234"}
    target.statuses, target.body = [500], b"e" * 3000
    event_id = await accepted(running, name, json.dumps({"tenant": "t" * 300}))
    await event_state(running.http, running.admin_url, event_id, "dead", headers=auth)

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        for width in (390, 1280):
            await set_width(page, width)
            await page.wait_for("document.querySelector('#auth.show')")
            assert await page.evaluate(OVERFLOW) == "", width
            right = await page.evaluate(
                "document.querySelector('#auth button').getBoundingClientRect().right"
            )
            assert right <= width
        await page.type_text("#token", "dash-token-1234")
        await page.click("#auth button")
        await page.wait_for(
            "document.body.dataset.loaded === '1'"
            " && document.querySelector('#detail ol.timeline li.outcome-dead')"
        )
        for width in (390, 1280):
            await set_width(page, width)
            await page.evaluate("new Promise((r) => requestAnimationFrame(r))")
            assert await page.evaluate(OVERFLOW) == "", width
            # Each table fits its box, its last column (Replay, Pause, a state) in view.
            scrolled = await page.evaluate(
                "[...document.querySelectorAll('.scroll')].filter((box) =>"
                " box.scrollWidth > box.clientWidth).map((box) => box.firstChild.id)"
            )
            assert scrolled == [], width
        last = await page.evaluate(
            "(() => { const th = document.querySelector('#nodes th:last-child');"
            " return th.getBoundingClientRect().right"
            " <= th.closest('section').getBoundingClientRect().right; })()"
        )
        assert last, "the Nodes table's last column is cut off at 1280 px"


async def test_dashboard_shows_a_senders_bidi_and_control_characters_escaped(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """A tenant that starts with a right-to-left override (``gnp.exe`` reads as ``exe.png``)
    and holds other characters a terminal or a reader would obey is shown as ``show`` prints
    it, each escaped, and isolated: the events table, the event's line and its body."""
    cfg = make_config(tmp_path, forward_source("shop", target.url + "/in", tenant="json:tenant"))
    running = await run_daemon(cfg)
    tenant = "\u202egnp.exe\x1b[2J\u00a0\u2066\u2028x"
    # Sent raw in the body (JSON escapes only the ESC), which the page shows as it came.
    body = json.dumps({"tenant": tenant}, ensure_ascii=False)
    event_id = await accepted(running, "shop", body)
    await event_state(running.http, running.admin_url, event_id, "done")

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        cell = f"document.querySelector(\"#events tr[data-event-id='{event_id}'] td:nth-child(3)\")"
        shown = await page.wait_for(f"{cell}?.querySelector('bdi')?.textContent")
        assert shown == printable(tenant) == "\\u202egnp.exe\\x1b[2J\\xa0\\u2066\\u2028x"
        line = await page.wait_for("document.querySelector('#detail p.summary')?.textContent")
        assert f" · tenant {printable(tenant)} · priority " in line
        assert await page.evaluate("document.querySelectorAll('#detail p.summary bdi').length") >= 2
        shown = await page.wait_for("document.querySelector('#detail pre.body')?.textContent")
        assert '"tenant": "\\u202egnp.exe\\u001b[2J\\xa0\\u2066\\u2028x"' in shown
        text = await page.evaluate("document.body.innerText")
        assert not any(c in text for c in "\u202e\x1b\u2066\u2028")


async def test_dashboard_event_page_shows_the_dedup_key_a_replay_and_short_attempts_in_ms(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """An event's page shows its dedup key and, as ``show`` does, a "replayed" mark where a
    replay started the attempts over, an attempt a drain cut off as "(not counted)" (not as its
    raw detail), and an attempt of a few milliseconds in ms, not as 0.00s."""
    running = await run_daemon(make_config(tmp_path, forward_source("shop", target.url + "/in")))
    target.statuses = [500]
    event_id = await accepted(running, "shop", '{"order": 11}')
    await event_state(running.http, running.admin_url, event_id, "dead")
    replay = f"{running.admin_url}/events/{event_id}/replay"
    async with running.http.post(replay, headers={"X-Webhookd": "1"}) as r:
        assert r.status == 202
    doc = await event_state(running.http, running.admin_url, event_id, "done")

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        steps = (
            "[...document.querySelectorAll('#detail ol.timeline li')]"
            ".map((li) => [li.className, li.textContent])"
        )
        await page.wait_for(f"{steps}.length === 3")
        dedup = await page.evaluate("document.querySelector('#detail p.dedup').textContent")
        assert dedup == f"dedup key {doc['dedup_key']}"
        (dead, dead_text), (mark, mark_text), (done, done_text) = await page.evaluate(steps)
        assert (dead, mark, done) == ("outcome-dead", "replayed", "outcome-done")
        assert (
            dead_text.startswith("#1 ") and done_text.startswith("#1 ") and mark_text == "replayed"
        )
        assert re.search(r" · \d+(\.\d)? ms · done", done_text), done_text
        assert re.match(r"#1 \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC · ", dead_text), dead_text
        assert "0.00s" not in done_text

        # An attempt a drain cut off ahead of the first: its number is the next one's, no
        # replay between them, and its detail is not shown as JSON.
        await page.evaluate(
            """(() => { const real = window.fetch;
            window.fetch = async (path, options) => {
                const r = await real(path, options);
                if (!String(path).startsWith("/events/evt_")) return r;
                const doc = await r.json(), errors = doc.jobs[0].errors;
                errors.unshift({...errors[0], outcome: "retry", error: "cut off by a drain",
                                detail: {counted: false}});
                return new Response(JSON.stringify(doc), {status: 200});
            }; })()"""
        )
        await page.wait_for(f"{steps}.length === 4")
        classes = await page.evaluate(f"{steps}.map(([c]) => c)")
        assert classes == ["outcome-retry", "outcome-dead", "replayed", "outcome-done"]
        cut = (await page.evaluate(steps))[0][1]
        assert cut.startswith("#1 (not counted) ") and "counted" not in cut[17:], cut


async def test_dashboard_event_page_shows_the_query_with_a_token_masked_and_no_line_without(
    tmp_path: Path, run_daemon: Any, browser: str
) -> None:
    """An event received with a query shows it next to its summary, as sent but for the value
    of a parameter named as a credential (the token is nowhere in the page), isolated as other
    text the sender chose; an event without one has no query line."""
    running = await run_daemon(make_config(tmp_path, '[[sources.shop.actions]]\ntype = "log"'))
    status, doc = await running.post("/hooks/shop?store=eu&token=t0k-of-the-sender", "{}")
    assert status == 202, doc
    status, plain = await running.post("/hooks/shop", "{}")
    assert status == 202, plain

    async with open_page(browser, f"{running.admin_url}/#/events/{doc['id']}") as page:
        line = await page.wait_for("document.querySelector('#detail p.query')?.textContent")
        assert line == "query store=eu&token=***"
        assert await page.evaluate("document.querySelectorAll('#detail p.query bdi').length") == 1
        summary = "document.querySelector('#detail p.summary').nextElementSibling.className"
        assert await page.evaluate(summary) == "query"
        assert "t0k-of-the-sender" not in await page.evaluate("document.body.innerHTML")
        await page.evaluate(f"location.hash = '#/events/{plain['id']}'")
        key = "shop:sha256:" + hashlib.sha256(b"{}").hexdigest()
        await page.wait_for(
            f"document.querySelector('#detail p.dedup')?.textContent === 'dedup key {key}'"
        )
        assert await page.evaluate("document.querySelector('#detail p.query')") is None


async def test_dashboard_cancels_a_job_waiting_for_its_retry(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """An event whose job waits for its retry shows Cancel on its page, and the button
    cancels the job: the page says so and the event is cancelled."""
    source = forward_source("shop", target.url + "/in", max_attempts=3, base_s=3600)
    running = await run_daemon(make_config(tmp_path, source))
    target.statuses = [503]  # the first delivery fails; the retry is an hour away
    event_id = await accepted(running, "shop", '{"order": 7}')
    await target.wait_for(lambda t: len(t.seen) >= 1, timeout_s=20)
    await event_state(running.http, running.admin_url, event_id, "queued")

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        # Once the first refresh has drawn what sits above it, the button stays put: a real
        # click lands where the button was measured.
        await page.wait_for(
            "document.body.dataset.loaded === '1' &&"
            f" document.querySelector(\"#detail button.cancel[data-id='{event_id}']\")"
        )
        status = await page.click_for_status(
            f"#detail button.cancel[data-id='{event_id}']", "cancelled"
        )
        assert status == f"cancelled {event_id}: 1 queued job(s) cancelled"
        # Nothing is queued any more: the page stops offering it, and says when it was.
        await page.wait_for("!document.querySelector('#detail button.cancel')")
        line = await page.wait_for(
            "[...document.querySelectorAll('#detail .job .muted')]"
            ".map((e) => e.textContent).find((t) => t.includes('· cancelled '))"
        )

    doc = await event_state(running.http, running.admin_url, event_id, "cancelled")
    assert doc["jobs"][0]["attempts"] == 1 and len(target.seen) == 1
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(doc["jobs"][0]["finished_at"]))
    assert line.endswith(f" · cancelled {stamp} UTC")


async def test_dashboard_says_why_a_queued_job_waits_when_no_attempt_says_it(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """A job a lane's 429 put back (no attempt used) shows what it waits for beside its next
    run, as ``webhookd show`` says it."""
    config = make_config(tmp_path, forward_source("shop", target.url + "/in"))
    async with Journal(tmp_path / "webhookd.db", serving=True) as journal:
        (job_id,) = await ingest(journal, "shop", 1)
        await journal.claim([job_id], "boot")
        now = journal.clock.time()
        wait = Finished(job_id, 1, JobState.QUEUED, now, now, "wait", now + 3600, "429 slow down")
        await journal.finish([wait])
        (summary,) = await journal.list_events(limit=1)
    running = await run_daemon(config)
    async with open_page(browser, f"{running.admin_url}/#/events/{summary.id}") as page:
        line = await page.wait_for(
            "[...document.querySelectorAll('#detail .job .muted')]"
            ".map((e) => e.textContent).find((t) => t.includes('next run'))"
        )
    assert line.endswith(" (waits: 429 slow down)"), line
    assert not target.seen


async def test_dashboard_cancels_a_running_job_after_its_attempt(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """Cancel on the page of an event whose delivery is in flight: the job shows cancel
    pending, the button goes, and once the attempt fails the job is cancelled, not retried."""
    source = forward_source("shop", target.url + "/in", max_attempts=3, base_s=0.01)
    running = await run_daemon(make_config(tmp_path, source))
    target.hold = asyncio.Event()
    target.statuses = [503]
    event_id = await accepted(running, "shop", '{"order": 9}')
    await target.wait_for(lambda t: t.running == 1)

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        button = f"#detail button.cancel[data-id='{event_id}']"
        await page.wait_for(f'document.body.dataset.loaded && document.querySelector("{button}")')
        status = await page.click_for_status(button, "cancelled")
        assert status.endswith("1 running job(s) cancelled once their attempt ends, with no retry")
        job = await page.wait_for(
            "document.querySelector('#detail .job')?.textContent.includes('cancel pending')"
            f' && !document.querySelector("{button}")'
            " && document.querySelector('#detail .job').textContent"
        )
        assert "running" in job
        target.hold.set()
        await page.wait_for("document.querySelector('#detail .job .state-cancelled')")

    doc = await event_state(running.http, running.admin_url, event_id, "cancelled")
    assert len(target.seen) == 1 and doc["jobs"][0]["attempts"] == 1


async def test_dashboard_finds_an_event_by_its_delivery_key(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """The Find box takes a dedup key (source:delivery id) to its event's page, and says so
    when no event has the key."""
    running = await run_daemon(make_config(tmp_path, forward_source("shop", target.url + "/in")))
    body = '{"order": 8}'
    event_id = await accepted(running, "shop", body)
    key = "shop:sha256:" + hashlib.sha256(body.encode()).hexdigest()

    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for("document.body.dataset.loaded")  # the charts above are drawn
        await page.type_text("#find-key", key)
        await page.click("#find button")
        shown = await page.wait_for(
            f"document.querySelector('#detail-id')?.textContent === '{event_id}'"
            " && document.querySelector('#detail p')?.textContent"
        )
        assert shown.startswith("shop · received")
        await page.evaluate("document.querySelector('#find-key').value = ''")
        await page.type_text("#find-key", "shop:nope")
        await page.click("#find button")
        status = await page.wait_for("document.querySelector('#status.err')?.textContent")
        assert status.startswith("shop:nope: no event has this dedup key")
        # A Find that works clears the error of the one before.
        await page.evaluate("document.querySelector('#find-key').value = ''")
        await page.type_text("#find-key", key)
        await page.click("#find button")
        await page.wait_for("document.querySelector('#status').textContent === ''")


async def test_dashboard_pauses_and_resumes_a_source(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """The By source table's Pause holds the source's jobs (a webhook sent then stays
    queued); Resume, in its place once paused, runs them."""
    running = await run_daemon(make_config(tmp_path, forward_source("shop", target.url + "/in")))
    first = await accepted(running, "shop", '{"order": 1}')
    await event_state(running.http, running.admin_url, first, "done")

    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for(
            "document.body.dataset.loaded === '1' &&"
            " document.querySelector(\"#sources button.pause[data-source='shop']\")"
        )
        status = await page.click_for_status("#sources button.pause[data-source='shop']", "paused")
        assert (
            status
            == "paused shop: its jobs wait until it is resumed; its webhooks are still accepted"
        )
        await page.wait_for(
            "document.querySelector(\"#sources button.resume[data-source='shop']\")"
        )
        row = await page.evaluate(
            "document.querySelector(\"#sources tr[data-source='shop'] td\").textContent"
        )
        assert row == "shop (paused)"

        held = await accepted(running, "shop", '{"order": 2}')
        doc = await event_state(running.http, running.admin_url, held, "queued")
        assert doc["jobs"][0]["attempts"] == 0

        status = await page.click_for_status(
            "#sources button.resume[data-source='shop']", "resumed"
        )
        assert status == "resumed shop: its jobs run again"
    await event_state(running.http, running.admin_url, held, "done")
    assert len(target.seen) == 2


async def test_dashboard_offers_no_pause_of_the_alerts_own_source_only_its_resume(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """The alerts' own source, listed once it has jobs, has no Pause button (the API refuses
    it: held alerts tell no one), its Replay of dead alerts first in its cell; one an earlier
    webhookd paused has a Resume button."""
    cfg = make_config(
        tmp_path,
        forward_source("shop", target.url + "/in") + f'[alerts]\nurl = "{target.url}/alerts"\n',
    )
    running = await run_daemon(cfg)
    # The first delivery is refused: dead, and an alert is sent, refused too: a dead alert.
    target.statuses = [400, 400]
    await accepted(running, "shop", '{"order": 1}')
    await target.wait_for(lambda t: any(s.path == "/alerts" for s in t.seen))

    async with open_page(browser, running.admin_url + "/") as page:
        row = "#sources tr[data-source='webhookd']"
        await page.wait_for(
            "document.body.dataset.loaded === '1' &&"
            f' document.querySelector("{row} button.replay-dead") &&'
            " document.querySelector(\"#sources button.pause[data-source='shop']\")"
        )
        assert await page.evaluate(f'document.querySelectorAll("{row} button").length') == 1
        # Without a Pause button before it, no space before it either.
        cell = f'document.querySelector("{row} button.replay-dead").parentElement.textContent'
        assert await page.evaluate(cell) == "Replay 1 dead"
        assert running.daemon.journal is not None
        await running.daemon.journal.pause("webhookd")  # as an earlier webhookd could
        await page.wait_for(
            "document.querySelector(\"#sources button.resume[data-source='webhookd']\")"
        )


async def test_dashboard_event_page_keeps_every_character_of_a_body_and_says_what_holds_a_job(
    tmp_path: Path, run_daemon: Any, browser: str
) -> None:
    """A JSON body is indented, not re-encoded: an order id past 2^53, ``10.10``, ``1.0`` and a
    repeated key read as sent (a parse and stringify gave 820982911946154500, 10.1, 1 and one
    key); a handler's result keeps such an id too. A queued job of a paused source says so,
    as ``show`` does; a list cut at 50 says it is."""
    project = tmp_path / "project"
    project.mkdir()
    module = f"order_hooks_{os.urandom(4).hex()}"  # the daemon runs in this process: one a run
    (project / f"{module}.py").write_text(
        "def handle(event):\n    return {'order': 820982911946154508}\n"
    )
    running = await run_daemon(
        make_config(
            tmp_path,
            f"""
[sources.shop]
[[sources.shop.actions]]
name = "keep"
type = "python"
handler = "{module}:handle"
path = "{project}"

[sources.held]
[[sources.held.actions]]
type = "log"
""",
        )
    )
    async with running.http.post(
        running.admin_url + "/sources/held/pause", headers={"X-Webhookd": "1"}
    ) as r:
        assert r.status == 200
    body = (
        '{"id":820982911946154508, "amount":10.10,"dup":1,"dup":2,"f":1.0,"e":{ },"l":[],'
        '"s":"a,{\\"b"}'
    )
    event_id = await accepted(running, "shop", body)
    await event_state(running.http, running.admin_url, event_id, "done")
    held = [await accepted(running, "held", f'{{"n": {n}}}') for n in range(51)]

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        shown = await page.wait_for("document.querySelector('#detail pre.body')?.textContent")
        assert shown == (
            '{\n  "id": 820982911946154508,\n  "amount": 10.10,\n  "dup": 1,\n  "dup": 2,\n'
            '  "f": 1.0,\n  "e": {},\n  "l": [],\n  "s": "a,{\\"b"\n}'
        )
        result = await page.wait_for("document.querySelector('#detail pre.result')?.textContent")
        assert result == '{\n  "order": 820982911946154508\n}'

        await page.evaluate(f"location.hash = '#/events/{held[-1]}'")
        line = await page.wait_for(
            "document.querySelector('#detail .job')?.textContent.includes('is paused') &&"
            " document.querySelector('#detail .job').textContent"
        )
        assert " · held: held is paused" in line
        await page.wait_for("!document.querySelector('#events-more').hidden")
        assert await page.evaluate("document.querySelector('#dead-more').hidden")


async def test_dashboard_shows_a_deeply_nested_body_and_result_as_they_came(
    tmp_path: Path, run_daemon: Any, browser: str
) -> None:
    """A body of 5000 nested arrays (10 KB) and a result 500 deep are shown as they came, not
    indented: each line indented by its depth, the body alone would be 50 million characters,
    seconds of a frozen tab (16 KB: 30 s) for the operator who opens the event."""
    project = tmp_path / "project"
    project.mkdir()
    module = f"deep_hooks_{os.urandom(4).hex()}"  # the daemon runs in this process: one a run
    (project / f"{module}.py").write_text(
        "def handle(event):\n"
        "    deep = []\n"
        "    for _ in range(500):\n"
        "        deep = [deep]\n"
        "    return {'deep': deep}\n"
    )
    source = f"""
[[sources.shop.actions]]
type = "python"
handler = "{module}:handle"
path = "{project}"
"""
    running = await run_daemon(make_config(tmp_path, source))
    body = "[" * 5000 + "]" * 5000
    event_id = await accepted(running, "shop", body)
    await event_state(running.http, running.admin_url, event_id, "done")

    async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
        result = await page.wait_for("document.querySelector('#detail pre.result')?.textContent")
        shown = await page.evaluate("document.querySelector('#detail pre.body').textContent")
    assert shown == body
    assert result == '{"deep":' + "[" * 501 + "]" * 501 + "}"


async def test_dashboard_shows_a_models_refusal_where_its_reply_would_be(
    tmp_path: Path, run_daemon: Any, browser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that declines answers no text, only its refusal: the event page shows the
    refusal in the reply's place, not an empty reply with the refusal folded away."""
    monkeypatch.setenv("WEBHOOKD_TEST_OPENAI_KEY", "sk-standin")
    standin = await StandIn(refusal="I can't help with that.").start()
    try:
        source = f"""
[[sources.mail.actions]]
type = "openai"
api_key = "env:WEBHOOKD_TEST_OPENAI_KEY"
base_url = "{standin.base_url}"
model = "gpt-4o-mini"
prompt = "Reply to {{{{ subject }}}}"
max_tokens = 50
"""
        running = await run_daemon(make_config(tmp_path, source))
        event_id = await accepted(running, "mail", '{"subject": "a refund"}')
        await event_state(running.http, running.admin_url, event_id, "done")
        async with open_page(browser, f"{running.admin_url}/#/events/{event_id}") as page:
            shown = await page.wait_for("document.querySelector('#detail pre.result')?.textContent")
    finally:
        await standin.aclose()
    assert shown == "refused: I can't help with that."


async def test_dashboard_says_a_list_has_more_only_past_its_50(
    tmp_path: Path, run_daemon: Any, browser: str
) -> None:
    """Exactly 50 dead letters are listed with no word of more, and 51 events as their newest
    50 with the note that ``webhookd events`` lists more: the page asked for 50, could not tell
    50 from more, and said "lists more" under exactly 50."""
    config = make_config(tmp_path, '[[sources.shop.actions]]\ntype = "log"')
    async with Journal(tmp_path / "webhookd.db", serving=True) as journal:
        job_ids = await ingest(journal, "shop", 51)
        await journal.claim(job_ids, "boot")
        now = journal.clock.time()
        done = Finished(job_ids[0], 1, JobState.DONE, now, now, "done")
        dead = [Finished(j, 1, JobState.DEAD, now, now, "dead", error="no") for j in job_ids[1:]]
        await journal.finish([done, *dead])
    running = await run_daemon(config)
    async with open_page(browser, running.admin_url + "/") as page:
        shown = await page.wait_for(
            "document.body.dataset.loaded === '1' && ['#dead', '#events'].map((list) =>"
            " [document.querySelectorAll(list + ' tbody tr').length,"
            " !document.querySelector(list + '-more').hidden])"
        )
    assert shown == [[50, False], [50, True]]


async def test_dashboard_shows_the_catch_alls_other_names_as_one_row_with_no_buttons(
    tmp_path: Path, run_daemon: Any, browser: str
) -> None:
    """Past the 50 names a catch-all took that /stats lists, the rest come summed under
    ``*``: the By source table shows them as one row with nothing to pause or replay (no
    source is called ``*``), and the chart's source picker does not offer it."""
    catch_all = '[sources."*"]\n[[sources."*".actions]]\ntype = "log"\n'
    running = await run_daemon(make_config(tmp_path, catch_all))
    for n in range(51):
        await accepted(running, f"n{n:02}", f'{{"n": {n}}}')
    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for("document.querySelector(\"#sources tr[data-source='*']\")")
        row = await page.evaluate(
            "[...document.querySelectorAll(\"#sources tr[data-source='*'] td\")]"
            ".map((td) => td.textContent + td.querySelectorAll('button').length)"
        )
        assert row[0] == "* (other names)0" and row[-1] == "0"
        options = await page.evaluate(
            "[...document.querySelector('#series-source').options].map((o) => o.value)"
        )
        assert "*" not in options and "n00" in options


async def test_dashboard_replays_a_sources_dead_letters(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """A source with dead jobs has a Replay button in the By source table, which runs them
    again."""
    running = await run_daemon(make_config(tmp_path, forward_source("shop", target.url + "/in")))
    target.statuses = [500]  # one attempt: dead at once
    event_id = await accepted(running, "shop", '{"order": 3}')
    await event_state(running.http, running.admin_url, event_id, "dead")

    async with open_page(browser, running.admin_url + "/") as page:
        label = await page.wait_for(
            "document.body.dataset.loaded === '1' &&"
            " document.querySelector(\"#sources button.replay-dead[data-source='shop']\")"
            "?.textContent"
        )
        assert label == "Replay 1 dead"
        button = "#sources button.replay-dead[data-source='shop']"
        await page.click(button)  # the first click arms it: nothing is posted
        armed = await page.wait_for(
            f"document.querySelector({json.dumps(button)})?.textContent.startsWith('Click again')"
            f" && [document.querySelector({json.dumps(button)}).textContent,"
            f" document.querySelector({json.dumps(button)}).disabled]"
        )
        assert armed == ["Click again to replay 1 dead", False]
        status = await page.click_for_status(button, "replayed")
        assert status == "replayed the dead letters of shop: 1 job(s) of 1 event(s) re-queued"
    await event_state(running.http, running.admin_url, event_id, "done")
    assert len(target.seen) == 2


async def test_dashboard_offers_nothing_to_do_with_a_source_a_reload_took_out(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """A source a reload removed is still listed by source with its jobs, marked as not in the
    config, without the Pause and Replay buttons its admin routes would answer 404 to."""
    kept = forward_source("keep", target.url + "/keep")
    running = await run_daemon(
        make_config(tmp_path, forward_source("shop", target.url + "/in") + kept),
        loader=lambda: make_config(tmp_path, kept),
    )
    target.statuses = [500]  # one attempt: dead at once
    event_id = await accepted(running, "shop", '{"order": 3}')
    await event_state(running.http, running.admin_url, event_id, "dead")
    running.daemon.request_reload()
    await running.daemon.reloaded.wait()
    async with running.http.get(running.admin_url + "/stats") as r:
        stats = await r.json()
    assert (stats["sources"]["shop"]["dead"], stats["removed"]) == (1, ["shop"])

    async with open_page(browser, running.admin_url + "/") as page:
        row = await page.wait_for(
            "document.body.dataset.loaded === '1' &&"
            " document.querySelector(\"#sources tr[data-source='shop']\")"
            "?.textContent.includes('not in the config') &&"
            " [document.querySelector(\"#sources tr[data-source='shop']\").textContent,"
            " document.querySelectorAll(\"#sources tr[data-source='shop'] button\").length,"
            " document.querySelectorAll(\"#sources tr[data-source='keep'] button\").length]"
        )
    assert row == ["shop (not in the config)0001", 0, 1]


async def test_dashboard_marks_its_data_stale_while_the_daemon_is_unreachable(
    tmp_path: Path, run_daemon: Any, browser: str
) -> None:
    """A daemon restarted (or a network gone) fails a refresh: the page says the daemon is
    unreachable and how old the data it still shows is, dimmed, until a refresh works again."""
    running = await run_daemon(make_config(tmp_path))
    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for("document.body.dataset.loaded === '1'")
        await page.evaluate(
            "window.realFetch = window.fetch;"
            " window.fetch = () => Promise.reject(new TypeError('Failed to fetch'))"
        )
        said = await page.wait_for(
            "document.body.classList.contains('stale')"
            " && !document.querySelector('#stale').hidden"
            " && document.querySelector('#stale').textContent"
        )
        assert re.fullmatch(r"daemon unreachable · last updated \d+s ago", said), said
        assert await page.evaluate("document.querySelector('#status').textContent") == ""
        await page.evaluate("window.fetch = window.realFetch")
        await page.wait_for(
            "document.querySelector('#stale').hidden && !document.body.classList.contains('stale')"
        )


@pytest.mark.subprocess
async def test_dashboard_marks_its_data_stale_while_the_daemon_does_not_answer(
    tmp_path: Path, procs: Procs, browser: str
) -> None:
    """A daemon that stops answering with its connections open (stopped, a stalled tunnel)
    fails a refresh within seconds: the page says so and how old its data is, dimmed. Polls
    meanwhile send nothing (one refresh waits at a time: the rest would all reach the daemon
    once it answers), and once it answers the page is current again."""
    daemon = await procs.serve(write_config(tmp_path / "c.toml", tmp_path / "j.db"))
    async with open_page(browser, daemon.admin_url + "/") as page:
        await page.wait_for("document.body.dataset.loaded === '1'")
        # The most requests the page has waited on at once, each still sent by the browser.
        await page.evaluate(
            """(() => { const real = window.fetch; let now = 0; window.most = 0;
            window.fetch = (...args) => { window.most = Math.max(window.most, ++now);
                return real(...args).finally(() => now--); }; })()"""
        )
        daemon.signal(signal.SIGSTOP)
        try:
            said = await page.wait_for(
                "document.body.classList.contains('stale')"
                " && !document.querySelector('#stale').hidden"
                " && document.querySelector('#stale').textContent",
                timeout_s=30,
            )
            most = await page.evaluate("window.most")
        finally:
            daemon.signal(signal.SIGCONT)
        await page.wait_for(
            "document.querySelector('#stale').hidden && !document.body.classList.contains('stale')"
        )
    assert re.fullmatch(r"no answer from the daemon in 5 s · last updated \d+s ago", said), said
    # One refresh: /stats, the two lists and the charts' series.
    assert most <= 4, f"{most} requests waited on at once"


async def test_dashboard_keeps_an_actions_failure_in_view_when_the_refresh_fails_too(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """A Pause that cannot reach the daemon says so, and the refresh that follows, failing for
    the same reason, does not write over it."""
    running = await run_daemon(make_config(tmp_path, forward_source("shop", target.url + "/in")))
    await event_state(running.http, running.admin_url, await accepted(running, "shop"), "done")
    async with open_page(browser, running.admin_url + "/") as page:
        button = "#sources button.pause[data-source='shop']"
        await page.wait_for(
            f'document.body.dataset.loaded === "1" && document.querySelector("{button}")'
        )
        await page.evaluate(
            """window.fetches = 0; window.fetch = () => {
                window.fetches++; return Promise.reject(new TypeError('Failed to fetch')); }"""
        )
        status = await page.click_for_status(button, "pause of shop failed")
        assert status == "pause of shop failed: daemon unreachable"
        await page.wait_for("!document.querySelector('#stale').hidden")
        # A poll's refresh too (its three reads at once), failed in full: a task queued after
        # its reads' rejections runs once the refresh has said its failure.
        sent = await page.evaluate("window.fetches")
        await page.wait_for(f"window.fetches >= {sent + 3}")
        assert status == await page.evaluate(
            """new Promise((r) => setTimeout(r, 0))
            .then(() => document.querySelector('#status.err')?.textContent)"""
        )


async def test_dashboard_page_is_served_without_the_token_but_the_api_is_not(
    tmp_path: Path, run_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET / returns the self-contained page; its data endpoints still answer 401 unauthorised."""
    monkeypatch.setenv(TOKEN_ENV, "dash-token-1234")
    cfg = make_config(tmp_path, admin=f'token = "env:{TOKEN_ENV}"')
    running = await run_daemon(cfg)
    async with running.http.get(running.admin_url + "/") as r:
        assert r.status == 200
        assert r.content_type == "text/html"
        page = await r.text()
    assert "<script>" in page and "dash-token-1234" not in page
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)  # nothing loaded from outside
    # Only the page's own script may run: named by its hash, no inline code besides.
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = dict(d.strip().split(" ", 1) for d in r.headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == f"'sha256-{digest}'" and policy["default-src"] == "'none'"
    assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    async with running.http.get(running.admin_url + "/stats") as r:
        assert r.status == 401


async def test_dashboard_runs_its_own_script_and_no_markup_injected_into_it(
    tmp_path: Path, run_daemon: Any, browser: str
) -> None:
    """The page works under its Content-Security-Policy, and a script that reached its DOM as
    markup (an inline event handler) would not run: the page builds its DOM from text nodes,
    and the policy is there should that ever change."""
    running = await run_daemon(make_config(tmp_path))
    async with open_page(browser, running.admin_url + "/") as page:
        # #meta is filled in by the page's own script from /stats.
        await page.wait_for("document.querySelector('#meta')?.textContent.startsWith('boot ')")
        meta = await page.evaluate("document.querySelector('#meta').textContent")
        assert re.search(r" · journal \d+\.\d MB \+ WAL \d+\.\d MB", meta), meta
        # A handler set as markup runs before one added by script, in the same dispatch.
        ran = await page.evaluate(
            """new Promise(resolve => {
                const img = document.createElement("img");
                img.setAttribute("onerror", "window.injected = true");
                img.addEventListener("error", () => resolve(window.injected ? "ran" : "blocked"));
                img.src = "data:,";
                document.body.append(img);
            })"""
        )
    assert ran == "blocked"


async def test_dashboard_charts_the_last_hour_and_shows_an_event_page_with_secrets_masked(
    tmp_path: Path,
    target: Target,
    run_daemon: Any,
    browser: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After traffic the charts have points (all sources, then one picked), and they follow new
    traffic; an event's page shows its JSON body pretty-printed, its headers with the
    signature masked (the real value is nowhere in the page) and its attempts as a timeline."""
    monkeypatch.setenv("GH_TEST_SECRET", "gh-test-secret-1")
    github = '{ scheme = "github", secret = "env:GH_TEST_SECRET" }'
    cfg = make_config(
        tmp_path,
        forward_source("gh", target.url + "/gh", verify=github)
        + forward_source("mail", target.url + "/mail"),
    )
    running = await run_daemon(cfg)
    signed = []
    for n in (1, 2):
        made = signed_request(
            cfg.sources["gh"],
            url=running.url + "/hooks/gh",
            body=json.dumps({"ref": "refs/heads/main", "n": n}).encode(),
            now=0,
            delivery_id=f"d-{n}",
        )
        status, doc = await running.post("/hooks/gh", made.body, headers=made.headers)
        assert status == 202, doc
        await event_state(running.http, running.admin_url, doc["id"], "done")
        signed.append((doc["id"], made.headers["X-Hub-Signature-256"]))
    target.statuses = [500]
    dead_id = await accepted(running, "mail", '{"n": 3}')
    await event_state(running.http, running.admin_url, dead_id, "dead")

    def total(series: str) -> str:
        return (
            f"document.querySelector('#chart-rates polyline[data-series={series}]')?.dataset.total"
        )

    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for(f"{total('accepted')} === '3'")
        assert await page.evaluate(total("finished")) == "2"
        assert await page.evaluate(total("dead")) == "1"
        dots = "document.querySelectorAll('#chart-rates circle[data-series=dead]').length"
        assert await page.evaluate(dots) == 1
        assert await page.evaluate("!!document.querySelector('#chart-backlog polyline')")
        # The axis says its times are UTC, as every time on the page does.
        end = await page.evaluate(
            "document.querySelector('#chart-rates text.axis-end').textContent"
        )
        assert re.fullmatch(r"\d\d:\d\d UTC", end), end

        # One source picked: its series only.
        await page.wait_for("document.querySelector('#series-source option[value=mail]')")
        await page.evaluate(
            "(() => { const s = document.querySelector('#series-source'); s.value = 'mail';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        await page.wait_for(f"{total('accepted')} === '1' && {total('finished')} === '0'")
        await page.evaluate(
            "(() => { const s = document.querySelector('#series-source'); s.value = '';"
            " s.dispatchEvent(new Event('change')); })()"
        )
        await page.wait_for(f"{total('accepted')} === '3'")

        # The event page, reached from the recent events' link.
        event_id, signature = signed[0]
        await page.click(f"#events a.event[data-id='{event_id}']")
        assert await page.evaluate("location.hash") == f"#/events/{event_id}"
        body = await page.wait_for("document.querySelector('#detail pre.body')?.textContent")
        assert body == json.dumps({"ref": "refs/heads/main", "n": 1}, indent=2)
        headers = await page.evaluate(
            "Object.fromEntries([...document.querySelectorAll('#detail table.headers tr')]"
            ".map((tr) => [tr.cells[0].textContent.toLowerCase(), tr.cells[1].textContent]))"
        )
        assert headers["x-hub-signature-256"] == "***"
        assert headers["x-github-delivery"] == "d-1"
        html = await page.evaluate("document.documentElement.outerHTML")
        assert signature not in html and signature[7:] not in html
        step = await page.evaluate(
            "document.querySelector('#detail ol.timeline li[data-attempt=\"1\"]')?.textContent"
        )
        assert "#1" in step and "done" in step and '"status":200' in step

        # The dead event's page: its failed attempt on the timeline, and Replay.
        await page.evaluate(f"location.hash = '#/events/{dead_id}'")
        step = await page.wait_for(
            "document.querySelector('#detail ol.timeline li.outcome-dead')?.textContent"
        )
        assert "answered 500" in step
        assert await page.evaluate(
            f"!!document.querySelector('#detail button.replay[data-id=\"{dead_id}\"]')"
        )

        # New traffic reaches the chart without a reload: the page reads the charts' series
        # again at its first poll SERIES_MS (10 s) after the last read. Its clock is moved on
        # that far rather than waited out.
        await accepted(running, "mail", '{"n": 4}')
        await page.evaluate("(() => { const now = Date.now; Date.now = () => now() + 10000; })()")
        await page.wait_for(f"{total('accepted')} === '4'", timeout_s=30)


async def test_dashboard_labels_a_six_or_seven_digit_chart_whole(
    run_daemon: Any, tmp_path: Path, browser: str
) -> None:
    """A chart whose top is 120,000 or 1,234,567 a minute says so in full sight, as 120K and
    1.2M: written out, the label's first digit fell outside the <svg> and "120000" read
    "20000". The daemon's series is raised in the page (a real backlog of 120,000 would take
    its own journal of that many jobs)."""
    running = await run_daemon(make_config(tmp_path))
    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for("document.querySelector('#chart-backlog svg')")
        await page.evaluate(
            """(() => { const real = window.fetch;
            window.fetch = async (path, options) => {
                const r = await real(path, options);
                if (!String(path).startsWith("/stats/series")) return r;
                const doc = await r.json(), last = doc.backlog.length - 1;
                doc.backlog[last] = 120000;
                doc.accepted[last] = 1234567;
                return new Response(JSON.stringify(doc), {status: 200});
            };
            document.querySelector('#series-source').dispatchEvent(new Event('change')); })()"""
        )
        await page.wait_for(
            "document.querySelector('#chart-backlog polyline')?.dataset.total === '120000'"
        )
        labels = await page.evaluate(
            "['#chart-rates', '#chart-backlog'].map((chart) => {"
            " const top = document.querySelector(chart + ' svg text');"
            " return [top.textContent, top.getBBox().x >= 0]; })"
        )
    assert labels == [["1.2M", True], ["120K", True]]


async def test_dashboard_says_when_retention_cuts_the_charts_hour(
    run_daemon: Any, tmp_path: Path, browser: str
) -> None:
    """With finished events kept 30 minutes, the last hour's charts count only what is kept,
    and the page says so under its heading; with the default retention it says nothing."""
    running = await run_daemon(make_config(tmp_path, journal="keep_done_h = 0.5\n"))
    note = "document.querySelector('#series-cut')"
    async with open_page(browser, running.admin_url + "/") as page:
        text = await page.wait_for(f"!{note}.hidden && {note}.textContent")
    assert text == "Retention keeps 30m: the charts count what is kept."
    whole = await run_daemon(make_config(tmp_path / "whole"))
    async with open_page(browser, whole.admin_url + "/") as page:
        await page.wait_for("document.querySelector('#chart-rates svg')")
        assert await page.evaluate(f"{note}.hidden") is True


async def test_dashboard_lists_the_node_with_its_host_pid_and_the_cluster_backlog(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """The nodes table shows the process serving the page (SQLite: the only node), its host and
    pid, and the backlog the journal counts."""
    cfg = make_config(tmp_path, forward_source("shop", target.url + "/in"))
    running = await run_daemon(cfg)
    async with open_page(browser, running.admin_url + "/") as page:
        row = "document.querySelector('#nodes tbody tr')"
        text = await page.wait_for(f"{row}?.textContent")
        cells = await page.evaluate(f"[...{row}.cells].map((c) => c.textContent)")
        assert "(this)" in cells[0] and cells[0].startswith("node_")
        assert (cells[1], cells[2]) == (socket.gethostname(), str(os.getpid()))
        assert "STALE" not in text
        assert await page.evaluate("document.querySelectorAll('#nodes tbody tr').length") == 1
        backlog = "document.querySelector('#cluster-backlog').textContent"
        assert await page.wait_for(f"{backlog} === 'cluster backlog 0'")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.usefixtures("journal_env")
async def test_dashboard_marks_a_node_that_runs_another_config(
    tmp_path: Path, procs: Procs, browser: str
) -> None:
    """Two nodes on one PostgreSQL journal whose files differ in a source's ``dedup``: the page
    of one marks the other's line "config differs", as ``webhookd stats`` does (/stats'
    ``same_config`` false), and not its own. It showed the two alike."""
    source = '[sources.shop]\ndedup = "{}"\n[[sources.shop.actions]]\ntype = "log"\n'
    a = await procs.serve(node_config(tmp_path / "a.toml", source.format("header:X-Delivery")))
    b = await procs.serve(node_config(tmp_path / "b.toml", source.format("json:id")))
    rows = (
        "Object.fromEntries([...document.querySelectorAll('#nodes tbody tr')]"
        ".map((tr) => [tr.cells[2].textContent, tr.cells[0].textContent]))"
    )
    async with open_page(browser, a.admin_url + "/") as page:
        await page.wait_for(f"Object.keys({rows}).length === 2")
        nodes = await page.evaluate(rows)
    assert nodes[str(a.pid)].endswith(" (this)")
    assert nodes[str(b.pid)].endswith(" config differs"), nodes
    await stop(a, b)


async def test_dashboard_shows_an_action_the_workers_run_one_job_at_a_time(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """An action whose last attempts ended by its timeout_s runs one job at a time (/stats'
    workers.slow): the page says so beside the workers, naming it and why, with its name (free
    text in the config) as text, escaped as ``show`` prints it. The page said nothing, and its
    queued jobs beside idle workers were left unexplained in an incident."""
    name = "<b>late</b>\u202e"
    source = f"""
[sources.shop]
[[sources.shop.actions]]
type = "forward"
name = {json.dumps(name)}
url = "{target.url}/in"
timeout_s = 0.2
retry = {{ max_attempts = 1 }}
"""
    running = await run_daemon(make_config(tmp_path, source))
    target.hold = asyncio.Event()  # a downstream that takes the request and never answers
    slow = "document.querySelector('#slow')"
    async with open_page(browser, running.admin_url + "/") as page:
        await page.wait_for("document.body.dataset.loaded === '1'")
        assert await page.evaluate(f"{slow}.textContent") == ""
        # workers.slow_after_timeouts (3) attempts in a row end by their timeout.
        for n in range(3):
            await event_state(
                running.http,
                running.admin_url,
                await accepted(running, "shop", f'{{"n": {n}}}'),
                "dead",
            )
        said = await page.wait_for(f"{slow}.textContent")
        assert said == (
            f"slow: shop/{printable(name)}: one job at a time, its last attempts timed out"
            " (workers.slow_after_timeouts)"
        )
        # The name is one isolated text, no markup made of it.
        assert await page.evaluate(
            f"[[...{slow}.querySelectorAll('bdi')].map((b) => b.textContent),"
            f" {slow}.querySelector('b')]"
        ) == [[f"shop/{printable(name)}"], None]


async def test_dashboard_says_a_reload_was_refused_until_one_is_applied(
    tmp_path: Path, target: Target, run_daemon: Any, browser: str
) -> None:
    """A refused SIGHUP reload was told by the log and a gauge alone: the page now says it,
    with the reason, while the previous config runs, and stops once a reload is applied. Keys
    that wait for a restart are still shown beside a later refusal."""
    cfg = make_config(tmp_path, forward_source("shop", target.url + "/in"))
    later = make_config(
        tmp_path, forward_source("shop", target.url + "/in"), workers="concurrency = 3"
    )
    refuse = [True]

    def loader() -> Any:
        if refuse[0]:
            raise ConfigError("sources.shop.bogus", "unknown key")
        return later

    running = await run_daemon(cfg, loader=loader)
    daemon = running.daemon
    daemon.request_reload()
    await daemon.reloaded.wait()
    async with open_page(browser, running.admin_url + "/") as page:
        said = "document.querySelector('#reload').textContent"
        await page.wait_for(f"{said}.includes('sources.shop.bogus')")
        assert await page.evaluate(said) == (
            "config reload refused, still running the previous config:"
            " sources.shop.bogus: unknown key"
        )
        refuse[0] = False
        daemon.reloaded.clear()
        daemon.request_reload()
        await daemon.reloaded.wait()
        pending = "changed in the config file, applied at the next restart: workers.concurrency"
        await page.wait_for(f"{said} === {json.dumps(pending)}")
        refuse[0] = True
        daemon.reloaded.clear()
        daemon.request_reload()
        await daemon.reloaded.wait()
        refused = "config reload refused, still running the previous config: sources.shop.bogus"
        both = f"{refused}: unknown key · {pending}"
        await page.wait_for(f"{said} === {json.dumps(both)}")


async def test_dashboard_and_stats_say_the_journal_refuses_writes_until_it_takes_them_again(
    tmp_path: Path, run_daemon: Any, browser: str
) -> None:
    """While the journal cannot write (a full disk) and every webhook is answered 503, /stats'
    problems and the page say so, as /readyz does, and stop once space returns."""
    running = await run_daemon(make_config(tmp_path, '[[sources.a.actions]]\ntype = "log"'))
    journal = running.daemon.journal
    assert journal is not None
    # The disk fills: SQLite may not grow the file by another page (SQLITE_FULL, as on ENOSPC).
    [(pages,)] = await journal._call(
        lambda conn: conn.execute("PRAGMA page_count").fetchall(), transaction=False
    )
    await journal._call(
        lambda conn: conn.execute(f"PRAGMA max_page_count = {pages}").fetchall(),
        transaction=False,
    )
    big = b'{"pad": "' + b"x" * 60_000 + b'"}'
    status, _ = await running.post("/hooks/a", big, headers={"Content-Type": "application/json"})
    assert status == 503
    async with running.http.get(running.admin_url + "/stats") as r:
        assert r.status == 200
        problems = (await r.json())["problems"]
    assert problems == ["journal: database or disk is full"]
    async with open_page(browser, running.admin_url + "/") as page:
        said = "document.querySelector('#reload').textContent"
        await page.wait_for(f"{said}.includes('not ready')")
        assert await page.evaluate(said) == "not ready: journal: database or disk is full"
        await journal._call(
            lambda conn: conn.execute("PRAGMA max_page_count = 1073741823").fetchall(),
            transaction=False,
        )
        await page.wait_for(f"{said} === ''")
    async with running.http.get(running.admin_url + "/stats") as r:
        assert (await r.json())["problems"] == []
