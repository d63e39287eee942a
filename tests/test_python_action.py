"""The ``python`` action: handlers resolved at config load, sync or async, steering outcomes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import actionkit
import pytest
from actionkit import action_kit
from conftest import make_config, new_event
from procs import poll

import webhookd
from webhookd import actions
from webhookd.actions.python import MOST_RESULT_CHARS, PythonAction, resolve_handler
from webhookd.config import loads
from webhookd.errors import ConfigError
from webhookd.journal.schema import dump
from webhookd.models import Job, JobState

SEEN_THREADS: list[str] = []


def record_thread(event: webhookd.Event) -> str:
    SEEN_THREADS.append(threading.current_thread().name)
    return event.header("Content-Type") or ""


async def run_handler(
    tmp_path: Path,
    handler: str,
    body: Any = b"{}",
    content_type: str = "application/json",
) -> tuple[Job, float]:
    config = f'[sources.s]\n[[sources.s.actions]]\ntype = "python"\nhandler = "{handler}"\n'
    async with action_kit(tmp_path, config) as kit:
        event_id = await kit.send("s", body, content_type)
        await kit.run()
        return await kit.job(event_id), kit.clock.time()


async def test_async_handler_gets_the_event_and_its_return_is_the_result(tmp_path: Path) -> None:
    """An async handler is awaited with the event; what it returns is the job's result."""
    job, _ = await run_handler(tmp_path, "actionkit:echo", {"type": "invoice.paid"})
    assert job.state == JobState.DONE
    assert job.result == {"id": job.event_id, "source": "s", "body": {"type": "invoice.paid"}}


async def test_sync_handler_runs_in_a_thread_with_form_and_tenant(tmp_path: Path) -> None:
    """A plain function runs off the event loop and can read the form and the tenant."""
    job, _ = await run_handler(
        tmp_path, "actionkit:sync_echo", b"a=1&b=two", "application/x-www-form-urlencoded"
    )
    assert job.result == {"thread": True, "form": {"a": "1", "b": "two"}, "tenant": "t"}
    SEEN_THREADS.clear()
    job, _ = await run_handler(tmp_path / "2", "test_python_action:record_thread")
    assert job.result == "application/json"
    assert SEEN_THREADS and SEEN_THREADS[0] != threading.main_thread().name


async def count_fields(event: webhookd.Event) -> int:
    return len(event.form())


async def test_a_handlers_form_reads_as_many_fields_as_the_receiver_does(tmp_path: Path) -> None:
    """``event.form()`` reads at most 1,000 fields or parts, as the receiver does: a form of
    more raises ``forms.TooManyFields`` (a ``ValueError``), and the attempt fails saying so,
    where it was read whole (320 ms for a megabyte of tiny parts, on the event loop in an
    async handler)."""
    at_limit = b"&".join(b"f%d=1" % n for n in range(1_000))
    urlencoded = "application/x-www-form-urlencoded"
    job, _ = await run_handler(tmp_path, "test_python_action:count_fields", at_limit, urlencoded)
    assert (job.state, job.result) == (JobState.DONE, 1_000)
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'
    over = [
        (at_limit + b"&f=1", urlencoded),
        (part * 1_001 + b"--b--\r\n", "multipart/form-data; boundary=b"),
    ]
    for n, (body, content_type) in enumerate(over):
        job, _ = await run_handler(
            tmp_path / str(n), "test_python_action:count_fields", body, content_type
        )
        assert (job.history[0].outcome, job.history[0].error) == (
            "retry",
            "TooManyFields: the form has more than 1,000 fields",
        )


BLOCKED, ALL_BLOCKING = threading.Event(), threading.Event()
BLOCKING: list[str] = []
BLOCKING_HANDLERS = 12  # more than the default executor's threads on a small machine


def block(event: webhookd.Event) -> None:
    BLOCKING.append(event.id)
    if len(BLOCKING) == BLOCKING_HANDLERS:
        ALL_BLOCKING.set()
    BLOCKED.wait(30.0)


async def test_blocking_sync_handlers_do_not_hold_up_the_loops_default_executor(
    tmp_path: Path,
) -> None:
    """Sync handlers stuck in slow calls leave the event loop's default executor (DNS lookups,
    other ``to_thread`` work) free: they run on the action's own threads."""
    handlers = BLOCKING_HANDLERS
    config = '[sources.s]\n[[sources.s.actions]]\ntype = "python"\n'
    config += 'handler = "test_python_action:block"\n'

    BLOCKED.clear()
    ALL_BLOCKING.clear()
    BLOCKING.clear()
    async with action_kit(tmp_path, config, concurrency=handlers) as kit:
        for _ in range(handlers):
            await kit.send("s", b"{}", "application/json")
        running = asyncio.create_task(kit.run())
        loop = asyncio.get_running_loop()
        try:
            with ThreadPoolExecutor(1) as waiter:  # each call parks a thread: wait for all
                assert await loop.run_in_executor(waiter, ALL_BLOCKING.wait, 30.0)
            assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 10.0) == 42
        finally:
            BLOCKED.set()
        await running
    assert len(BLOCKING) == handlers


ENTERED, LET_GO = threading.Event(), threading.Event()
CALLED: list[str] = []


def job_of(event: webhookd.Event) -> Job:
    """A job of ``event`` for the held action, as the pool hands one to ``run``."""
    return Job(f"job_{event.id[4:]}", event.id, "python", "python", JobState.RUNNING, 1, 3, 0.0)


def held_until_let_go(event: webhookd.Event) -> str:
    CALLED.append(event.id)
    ENTERED.set()
    LET_GO.wait(30.0)
    return event.id


def held_action(
    extra: str = "", concurrency: int = 1, handler: str = "held_until_let_go"
) -> PythonAction:
    """A python action of ``concurrency`` threads whose handler is held until let go."""
    config = f'[sources.s]\n[[sources.s.actions]]\ntype = "python"\nconcurrency = {concurrency}\n'
    config += f'handler = "test_python_action:{handler}"\n' + extra
    (action_config,) = loads(config).sources["s"].actions
    ENTERED.clear()
    LET_GO.clear()
    CALLED.clear()
    return PythonAction(action_config)


async def test_a_call_whose_attempt_ended_while_it_waited_for_a_thread_never_runs() -> None:
    """With every thread held by a handler that overran (abandoned, still running), the next
    attempt's call waits for a thread; cut off there by its timeout, it is recorded as timed
    out and retried, so the thread that frees up later must not run it too."""
    action = held_action()
    events = [new_event("s", 0.0) for _ in range(3)]
    loop = asyncio.get_running_loop()
    try:
        first = asyncio.create_task(action.run(events[0], job_of(events[0])))
        assert await loop.run_in_executor(None, ENTERED.wait, 30.0)
        with pytest.raises(TimeoutError):  # cut off once its call is queued behind the first
            async with asyncio.timeout(0):
                await action.run(events[1], job_of(events[1]))
    finally:
        LET_GO.set()
    assert (await first).result == events[0].id
    assert (await action.run(events[2], job_of(events[2]))).result == events[2].id
    await action.aclose()
    assert [events[0].id, events[2].id] == CALLED


async def _overrun(action: Any, event: webhookd.Event) -> None:
    """Run ``event`` on ``action`` until its handler is entered, then cut its attempt off as
    its timeout does: the handler's thread runs on, abandoned."""
    overrun = asyncio.create_task(action.run(event, job_of(event)))
    assert await asyncio.get_running_loop().run_in_executor(None, ENTERED.wait, 30.0)
    overrun.cancel()
    with pytest.raises(asyncio.CancelledError):
        await overrun


async def test_a_call_behind_an_overrun_handler_waits_without_an_attempt() -> None:
    """With concurrency = 1 and the one thread held by a handler that overran timeout_s (and
    cannot be stopped), the next job's call would wait for that thread until its own timeout:
    it would burn its attempts without running and go dead. It waits instead, no attempt
    used, saying why, and the handler is not called meanwhile."""
    action = held_action("timeout_s = 5\n")
    events = [new_event("s", 0.0) for _ in range(2)]
    try:
        await _overrun(action, events[0])
        outcome = await action.run(events[1], job_of(events[1]))
    finally:
        LET_GO.set()
    assert (outcome.kind, outcome.error) == (
        "wait",
        "all 1 handler thread(s) still run calls that overran timeout_s",
    )
    assert outcome.after_s == 5
    await action.aclose()
    assert [events[0].id] == CALLED


async def test_the_wait_behind_an_overrun_handler_counts_the_threads_it_holds() -> None:
    """With concurrency = 2, one call that overran timeout_s and one running within it, the
    next job waits; its reason said "all 1 handler thread(s) still run calls that overran
    timeout_s", as if one thread were all there is and the overrun held it."""
    action = held_action("timeout_s = 5\n", concurrency=2)
    events = [new_event("s", 0.0) for _ in range(3)]
    loop = asyncio.get_running_loop()
    try:
        await _overrun(action, events[0])
        ENTERED.clear()
        running = asyncio.create_task(action.run(events[1], job_of(events[1])))
        assert await loop.run_in_executor(None, ENTERED.wait, 30.0)
        outcome = await action.run(events[2], job_of(events[2]))
    finally:
        LET_GO.set()
    assert (outcome.kind, outcome.error) == (
        "wait",
        "all 2 handler threads are busy, 1 of them still running a call that overran timeout_s",
    )
    assert (await running).result == events[1].id
    await action.aclose()
    assert [events[0].id, events[1].id] == CALLED


async def test_an_attempt_the_drain_cut_off_says_its_handler_may_have_done_its_work(
    tmp_path: Path,
) -> None:
    """A drain cuts off a sync handler's attempt past the grace; its error said "its target
    may have had the request", a forward's words: a handler has no target, it does work."""
    config = (
        '[sources.s]\n[[sources.s.actions]]\ntype = "python"\n'
        'handler = "test_python_action:held_until_let_go"\n'
    )
    ENTERED.clear()
    LET_GO.clear()
    loop = asyncio.get_running_loop()
    async with action_kit(tmp_path, config) as kit:
        event_id = await kit.send("s")
        running = asyncio.create_task(kit.run())
        try:
            assert await loop.run_in_executor(None, ENTERED.wait, 30.0)
            assert await kit.pool.drain(0) == 1
            await running
        finally:
            LET_GO.set()
        job = await kit.job(event_id)
    assert (job.state, [a.outcome for a in job.history]) == (JobState.QUEUED, ["interrupted"])
    assert job.history[0].error == (
        "cut off by the drain after workers.shutdown_grace_s (0 s), its handler may have done its"
        " work; not counted: the job runs again as this attempt"
    )


async def test_retry_with_after_s_is_a_lower_bound_on_the_next_attempt(tmp_path: Path) -> None:
    """webhookd.Retry(after_s=120) queues the job no sooner than 120 s later."""
    job, now = await run_handler(tmp_path, "actionkit:please_retry")
    assert (job.state, job.history[0].outcome) == (JobState.QUEUED, "retry")
    assert job.history[0].error == "upstream busy"
    assert job.run_at >= now + 120


async def test_reject_sends_the_job_to_dead_with_its_reason(tmp_path: Path) -> None:
    """webhookd.Reject(reason) is permanent: the job is dead with that reason."""
    job, _ = await run_handler(tmp_path, "actionkit:reject")
    assert (job.state, job.last_error) == (JobState.DEAD, "unknown customer")


async def test_other_exceptions_are_retried_with_message_and_traceback(tmp_path: Path) -> None:
    """An unexpected exception is retried; the attempt keeps its message and traceback tail."""
    job, _ = await run_handler(tmp_path, "actionkit:flaky")
    attempt = job.history[0]
    assert (attempt.outcome, attempt.error) == ("retry", "RuntimeError: database is locked")
    assert attempt.detail is not None and "in flaky" in attempt.detail["traceback"]


API_KEY = "sk-live-Q7vR2mX9pL4tW8nB3kH6jD1fG5sA0zYc"  # 40 characters


def quote_the_key(event: webhookd.Event) -> None:
    """What an API's client raises: its answer quoting the key, then a long explanation."""
    key = os.environ["WEBHOOKD_TEST_API_KEY"]
    raise RuntimeError(f"Incorrect API key provided: {key} {'x' * 1978}")


async def test_a_secret_the_traceback_tails_cut_falls_inside_is_masked_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The traceback kept is its last 2,000 characters, masked before the cut: a configured
    secret the cut falls inside shows as ***, not as its last 20 characters (masked after
    the cut, they would be no secret the masker knows)."""
    monkeypatch.setenv("WEBHOOKD_TEST_API_KEY", API_KEY)
    config = """
[sources.s]
[[sources.s.actions]]
type = "python"
handler = "test_python_action:quote_the_key"

[sources.crm]
[[sources.crm.actions]]
type = "forward"
url = "http://127.0.0.1:9/crm"
headers = { Authorization = "env:WEBHOOKD_TEST_API_KEY" }
"""
    async with action_kit(tmp_path, config) as kit:
        event_id = await kit.send("s")
        await kit.run()
        [attempt] = (await kit.job(event_id)).history
    assert attempt.error is not None and attempt.detail is not None
    assert attempt.error.startswith("RuntimeError: Incorrect API key provided: *** xxx")
    assert attempt.detail["traceback"] == "*** " + "x" * 1978 + "\n"


async def test_values_json_cannot_hold_are_stored_as_text(tmp_path: Path) -> None:
    """A result JSON cannot represent is kept as its str() rather than failing a finished job."""
    job, _ = await run_handler(tmp_path, "actionkit:odd_result")
    assert job.state == JobState.DONE
    assert job.result["set"] == "{1}"


LONG_INT = "<int of 5,001 digits, past the 4,300 Python reads by default>"


@pytest.mark.parametrize(
    ("kind", "result"),
    [
        ("keys", "{(1, 2): 'b'}"),
        ("nan", "{'x': nan}"),
        ("huge", LONG_INT),
        ("lifted", {"n": LONG_INT, "m": [LONG_INT.replace("5,001", "4,301"), 10**4300 - 1]}),
        ("deep", "[[[[[[[...]]]]]]]"),
        ("detached", {"order": "<Detached whose str() raised RuntimeError>", "id": 7}),
    ],
)
async def test_a_result_json_cannot_be_made_of_is_its_text_and_the_handler_runs_once(
    tmp_path: Path, kind: str, result: Any
) -> None:
    """A result with keys JSON cannot have, or a NaN (which would make the admin API's answer
    invalid JSON), is kept whole as its str(); an int past the 4,300 digits Python reads as a
    short form saying its size, also when a handler has lifted that limit for the whole
    process (the journal held its digits then, and the restarted daemon could not read it);
    nesting past the recursion limit, as a short form of it; a value whose str() raises (an
    ORM object read after its session closed), as a note naming its type. The job is done,
    not retried, so the handler that did its work is not run again; a huge int once left its
    job running, its outcome failing every write, and ran it again at each start, and a str()
    that raised failed the attempt, which its retry did again."""
    actionkit.unjsonable_runs.clear()
    limit = sys.get_int_max_str_digits()
    try:
        job, _ = await run_handler(tmp_path, "actionkit:unjsonable_result", {"kind": kind})
    finally:
        sys.set_int_max_str_digits(limit)
    assert (job.state, job.attempts) == (JobState.DONE, 1)
    if isinstance(result, str):
        assert job.result.startswith(result)
    else:
        assert job.result == result
    assert actionkit.unjsonable_runs == [job.event_id]


async def test_an_error_whose_str_raises_is_retried_with_its_own_name_and_traceback(
    tmp_path: Path,
) -> None:
    """A handler's error whose str() raises was recorded as that RuntimeError, with no
    traceback of the handler's: it is its own type's, its traceback kept."""
    job, _ = await run_handler(tmp_path, "actionkit:raises_detached")
    attempt = job.history[0]
    assert (attempt.outcome, attempt.error) == (
        "retry",
        "DetachedError: <DetachedError whose str() raised RuntimeError>",
    )
    assert attempt.detail is not None
    assert "in raises_detached\n    raise DetachedError()" in attempt.detail["traceback"]


@pytest.mark.parametrize("kind", ["text", "structure"])
async def test_a_huge_result_is_kept_as_its_start_saying_its_size(
    tmp_path: Path, kind: str
) -> None:
    """A handler returning megabytes would grow the journal, and every read of its event, by as
    much: past MOST_RESULT_CHARS of JSON the start is kept as text with the size it had; the
    job is done all the same."""
    job, _ = await run_handler(tmp_path, "actionkit:huge_result", {"kind": kind})
    assert (job.state, job.attempts) == (JobState.DONE, 1)
    head, _, said = job.result.rpartition(" … (cut: ")
    assert len(head) == MOST_RESULT_CHARS
    value = actionkit.huge(kind)
    size = len(value) if isinstance(value, str) else len(json.dumps(value))
    assert said == f"{size:,} characters in all)"


def test_an_outcome_json_cannot_hold_is_written_as_a_note_never_an_error() -> None:
    """The journal writes outcomes in batches: one it could not write would fail every batch
    it joined and hold up every other job's outcome."""
    assert dump({"n": 1}) == '{"n":1}'
    assert dump(10**5000) == (
        '"<int that cannot be written as JSON: Exceeds the limit (4300 digits) for integer'
        ' string conversion; use sys.set_int_max_str_digits() to increase the limit>"'
    )


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        ("actionkit", "must look like"),
        ("no_such_module_here:handle", "cannot import 'no_such_module_here'"),
        ("actionkit:no_such_function", "has no 'no_such_function'"),
        ("actionkit:SEEN", "has no"),
        ("test_python_action:SEEN_THREADS", "is not callable"),
    ],
)
def test_unresolvable_handler_is_a_config_error_naming_handler(handler: str, message: str) -> None:
    """A handler that cannot be imported is found at config load, naming ….handler."""
    text = f'[sources.s]\n[[sources.s.actions]]\ntype = "python"\nhandler = "{handler}"\n'
    with pytest.raises(ConfigError, match=message) as err:
        actions.validate(loads(text))
    assert err.value.key == "sources.s.actions[0].handler"


@pytest.mark.parametrize(
    ("code", "says"),
    [
        ("import sys\nsys.exit('NEEDED_VAR is not set')", "SystemExit: NEEDED_VAR is not set"),
        ("import sys\nsys.exit(0)", "SystemExit: 0"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
    ],
    ids=["exit-message", "exit-0", "keyboard-interrupt"],
)
def test_a_handler_module_that_exits_while_importing_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, says: str
) -> None:
    """A module that calls sys.exit() at import (a variable missing, arguments parsed at module
    level) is a config error naming ….handler: at a reload it would otherwise end the daemon,
    and ``check`` would exit 0 or 1 without a word about the key."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"exits_on_import_{abs(hash(code))}"
    (tmp_path / f"{name}.py").write_text(code + "\ndef handle(event):\n    return 1\n")
    text = (
        '[sources.s]\n[[sources.s.actions]]\ntype = "python"\n'
        f'handler = "{name}:handle"\npath = "{tmp_path}"\n'
    )
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(text))
    assert err.value.key == "sources.s.actions[0].handler"
    assert f"importing {name!r} failed: {says}" in str(err.value)


@pytest.mark.parametrize(
    ("code", "line", "says"),
    [
        (
            "import os\n\nSETTINGS = undefined_name\n",
            3,
            "NameError: name 'undefined_name' is not defined",
        ),
        (
            "import json\n\nCFG = json.load(open('/nonexistent/cfg.json'))\n",
            3,
            "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/cfg.json'",
        ),
        (
            "import os\nimport webhookd_no_such_dependency\n",
            2,
            "ModuleNotFoundError: No module named 'webhookd_no_such_dependency'",
        ),
    ],
    ids=["name-error", "open-fails", "dependency-missing"],
)
def test_a_handler_module_that_fails_while_importing_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, line: int, says: str
) -> None:
    """A module that raises while importing is named with the file and line that raised: a
    NameError in a long module said no line, and a dependency not installed was said as
    "cannot import 'hooks': No module named 'requests'", as if the module itself were not
    found."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"fails_on_import_{abs(hash(code))}"
    (tmp_path / f"{name}.py").write_text(code + "\ndef handle(event):\n    return 1\n")
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(python_action(f"{name}:handle", tmp_path)))
    assert err.value.key == "sources.s.actions[0].handler"
    assert err.value.message == (
        f"importing {name!r} failed: {says} ({tmp_path / name}.py, line {line})"
    )


def test_a_handler_written_as_a_file_or_under_a_path_that_is_no_folder_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler written as its file (``hooks.py:handle``, ``app/hooks.py:handle``) or under a
    ``path`` that is no folder was "cannot import 'hooks.py': __path__ attribute not found on
    'hooks'..." or a plain "No module named": each now says what to write instead."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "hooks_as_file.py").write_text("def handle(event):\n    return 1\n")
    dotted = 'write "package.module:function", the module by its dotted name, not by its file'

    def said(handler: str, path: Path) -> str:
        with pytest.raises(ConfigError) as err:
            actions.validate(loads(python_action(handler, path)))
        assert err.value.key == "sources.s.actions[0].handler"
        return err.value.message

    assert said("hooks_as_file.py:handle", tmp_path).startswith("cannot import 'hooks_as_file.py'")
    assert dotted in said("hooks_as_file.py:handle", tmp_path)
    assert said("app/hooks_as_file.py:handle", tmp_path).startswith(
        f"'app/hooks_as_file.py:handle': {dotted}"
    )
    assert said("hooks_not_there:handle", tmp_path / "hooks") == (
        "cannot import 'hooks_not_there': No module named 'hooks_not_there'"
        f" (path: {tmp_path / 'hooks'} is not a directory)"
    )


@pytest.mark.parametrize("kind", ["def", "async def"])
def test_a_generator_function_as_a_handler_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A handler with a yield in it runs none of its body when called: every job was done,
    its result "<generator object ...>", and nothing was done."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"yields_{kind.replace(' ', '_')}"
    (tmp_path / f"{name}.py").write_text(f"{kind} handle(event):\n    yield event.id\n")
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(python_action(f"{name}:handle", tmp_path)))
    assert err.value.key == "sources.s.actions[0].handler"
    assert err.value.message == (
        f"'{name}:handle' is a generator function (it has a yield): a call runs none of its"
        " body; return the result instead"
    )


def test_path_option_makes_a_project_directory_importable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``path`` adds a directory to the import path, so a project's own module resolves."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "hooks_for_path_test.py").write_text("def handle(event):\n    return 'mine'\n")
    text = (
        '[sources.s]\n[[sources.s.actions]]\ntype = "python"\n'
        f'handler = "hooks_for_path_test:handle"\npath = "{tmp_path}"\n'
    )
    (action,) = loads(text).sources["s"].actions
    assert resolve_handler(action)(None) == "mine"  # type: ignore[arg-type]


def python_action(handler: str, path: Path, source: str = "s") -> str:
    return (
        f'[sources.{source}]\n[[sources.{source}.actions]]\ntype = "python"\n'
        f'handler = "{handler}"\npath = "{path}"\n'
    )


def test_a_module_another_of_that_name_was_imported_before_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python keeps one module per name: two actions whose ``path`` folders each hold a
    ``hooks_clash.py`` ran the first one's code for both, and ``check`` said ok; a module named
    as a standard library one (``queue``) was that one. Both are config errors now."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "hooks_clash", raising=False)
    for folder, says in (("one", "one"), ("two", "two")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "hooks_clash.py").write_text(
            f"def handle(event):\n    return {says!r}\n"
        )
    text = python_action("hooks_clash:handle", tmp_path / "one", "one") + python_action(
        "hooks_clash:handle", tmp_path / "two", "two"
    )
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(text))
    assert str(err.value) == (
        f"sources.two.actions[0].handler: module 'hooks_clash' is already"
        f" {tmp_path / 'one' / 'hooks_clash.py'}, not the one in {tmp_path / 'two'} (Python keeps"
        " one module per name: give this one a name of its own)"
    )
    (tmp_path / "std").mkdir()
    (tmp_path / "std" / "queue.py").write_text("def handle(event):\n    return 1\n")
    with pytest.raises(ConfigError, match=r"module 'queue' is already .*queue\.py, not the one"):
        actions.validate(loads(python_action("queue:handle", tmp_path / "std")))
    # The folder is searched after the import path: a module of that name found before it (an
    # installed package's, one on PYTHONPATH) is the one imported, not yet imported or not.
    monkeypatch.delitem(sys.modules, "hooks_earlier", raising=False)
    for folder in ("earlier", "mine"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "hooks_earlier.py").write_text("def handle(event):\n    return 1\n")
    sys.path.insert(0, str(tmp_path / "earlier"))
    with pytest.raises(ConfigError, match=r"module 'hooks_earlier' is already .*earlier"):
        actions.validate(loads(python_action("hooks_earlier:handle", tmp_path / "mine")))


def test_a_handler_added_to_a_module_imported_before_says_a_restart_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload imports nothing again: a function added to a module already imported is not
    there until a restart, and the error says so."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "hooks_edited", raising=False)
    (tmp_path / "hooks_edited.py").write_text("def handle(event):\n    return 1\n")
    actions.validate(loads(python_action("hooks_edited:handle", tmp_path)))
    (tmp_path / "hooks_edited.py").write_text(
        "def handle(event):\n    return 1\ndef new(event):\n    return 2\n"
    )
    with pytest.raises(ConfigError) as err:
        actions.validate(loads(python_action("hooks_edited:new", tmp_path)))
    assert str(err.value) == (
        "sources.s.actions[0].handler: module 'hooks_edited' has no 'new' (as imported before:"
        " a changed file takes a restart)"
    )


@pytest.mark.parametrize(
    "open_to_all",
    [
        "directory",
        "module",
        "package",
        "submodule",
        "subpackage",
        "bytecode cache",
        "parent not sticky",
        "sticky parent, another owner",
    ],
)
def test_a_handler_other_users_may_change_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_to_all: str
) -> None:
    """A ``path`` folder, or any module, package or bytecode cache on the way to the handler,
    that every user may write (``/tmp`` as the current directory, a ``chmod 777`` folder), or
    that sits in a folder every user may write and so could be swapped for another (unless
    that folder is sticky and it is ours), is refused before the module runs."""
    if open_to_all == "sticky parent, another owner" and os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = "open_hooks_" + open_to_all.replace(" ", "_").replace(",", "")
    ran = tmp_path / "ran"
    code = f"open({str(ran)!r}, 'w').close()\ndef handle(event):\n    return 1\n"
    base = tmp_path / "base"
    base.mkdir()
    handler = f"{name}:handle"
    if open_to_all in ("package", "submodule", "subpackage"):
        (base / name / "sub").mkdir(parents=True)
        (base / name / "__init__.py").write_text("")
        (base / name / "sub" / "__init__.py").write_text("")
        (base / name / "sub" / "leaf.py").write_text(code)
        handler = f"{name}.sub.leaf:handle"
    else:
        (base / f"{name}.py").write_text(code)
    opened = {
        "directory": base,
        "module": base / f"{name}.py",
        "package": base / name,
        "submodule": base / name / "sub" / "leaf.py",
        "subpackage": base / name / "sub",
        "bytecode cache": base / "__pycache__",
        "parent not sticky": tmp_path,
        "sticky parent, another owner": tmp_path,
    }[open_to_all]
    if open_to_all == "bytecode cache":
        opened.mkdir()
    opened.chmod(opened.stat().st_mode | 0o002)
    if open_to_all == "sticky parent, another owner":
        opened.chmod(opened.stat().st_mode | stat.S_ISVTX)
        os.chown(base, 65534, 65534)  # nobody
    text = (
        '[sources.s]\n[[sources.s.actions]]\ntype = "python"\n'
        f'handler = "{handler}"\npath = "{base}"\n'
    )
    try:
        with pytest.raises(ConfigError) as err:
            actions.validate(loads(text))
    finally:
        opened.chmod(0o755)
    says = "owned by another user" if "another owner" in open_to_all else "writable by every user"
    assert says in str(err.value) and str(opened) in str(err.value)
    on_path = open_to_all in ("directory", "parent not sticky", "sticky parent, another owner")
    assert err.value.key == f"sources.s.actions[0].{'path' if on_path else 'handler'}"
    assert not ran.exists()


RETURNED = threading.Event()


async def test_a_retry_waits_for_its_call_that_ran_on_and_takes_what_it_returned() -> None:
    """A sync handler past timeout_s runs on in its thread. Its job's retry called the handler
    again beside it: the work done twice. It now waits, no attempt used, and once the call has
    returned takes what it returned as its result: the handler is called once."""
    action = held_action("timeout_s = 5\n", concurrency=2)
    RETURNED.clear()
    action._threads._overran = lambda _event, _ran_s: RETURNED.set()  # after the call's end
    event = new_event("s", 0.0)
    try:
        await _overrun(action, event)
        waiting = await action.run(event, job_of(event))
    finally:
        LET_GO.set()
    assert (waiting.kind, waiting.after_s) == ("wait", 5)
    assert waiting.error == (
        "its previous call, cut off at timeout_s (5s), still runs in its thread: this attempt"
        " takes what it returns"
    )
    assert await asyncio.get_running_loop().run_in_executor(None, RETURNED.wait, 30.0)
    done = await action.run(event, job_of(event))
    assert (done.kind, done.result, done.detail) == ("done", event.id, {"ran_on": True})
    assert [event.id] == CALLED
    again = await action.run(event, job_of(event))  # taken once: a replay calls the handler
    assert (again.kind, again.result) == ("done", event.id)
    await action.aclose()
    assert [event.id, event.id] == CALLED


def raises_once_let_go(event: webhookd.Event) -> str:
    CALLED.append(event.id)
    if len(CALLED) == 1:
        ENTERED.set()
        LET_GO.wait(30.0)
        raise RuntimeError("the ledger refused it")
    return event.id


async def test_a_call_that_ran_on_and_raised_is_called_again_by_the_retry() -> None:
    """What a call cut off at timeout_s raised was its attempt's failure, recorded at the cut:
    the retry calls the handler again."""
    action = held_action(handler="raises_once_let_go")
    RETURNED.clear()
    action._threads._overran = lambda _event, _ran_s: RETURNED.set()
    event = new_event("s", 0.0)
    try:
        await _overrun(action, event)
    finally:
        LET_GO.set()
    assert await asyncio.get_running_loop().run_in_executor(None, RETURNED.wait, 30.0)
    done = await action.run(event, job_of(event))
    assert (done.kind, done.result, done.detail) == ("done", event.id, {})
    await action.aclose()
    assert [event.id, event.id] == CALLED


ORDER_SEEN: list[tuple[int, str]] = []
FIRST_IN, FIRST_LET_GO = threading.Event(), threading.Event()


def ordered_ledger(event: webhookd.Event) -> int:
    """The first call of webhook 0 runs on past timeout_s until let go; every call says when it
    starts and ends."""
    n = int(event.json()["n"])
    ORDER_SEEN.append((n, "start"))
    if n == 0 and not FIRST_IN.is_set():
        FIRST_IN.set()
        FIRST_LET_GO.wait(30.0)
    ORDER_SEEN.append((n, "end"))
    return n


async def test_an_ordered_key_waits_for_a_call_that_ran_past_timeout_s(
    tmp_path: Path, run_daemon: Any
) -> None:
    """ordered_by with a sync handler: webhook 0's call runs past timeout_s. Its retry ran the
    handler again, ended first and released the key, so webhook 1 was handled while webhook 0's
    first call still ran (a trial saw 20 of a day's handled out of order). Now the retry waits
    for that call and takes its answer, and webhook 1 starts after it ended."""
    ORDER_SEEN.clear()
    FIRST_IN.clear()
    FIRST_LET_GO.clear()
    cfg = make_config(
        tmp_path,
        """
[sources.s]
[[sources.s.actions]]
type = "python"
handler = "test_python_action:ordered_ledger"
ordered_by = "json:k"
timeout_s = 0.2
retry = { max_attempts = 3, base_s = 0.05, factor = 1, cap_s = 0.05 }
""",
        workers="concurrency = 4",
    )
    running = await run_daemon(cfg)
    loop = asyncio.get_running_loop()
    ids = []
    try:
        for n in range(2):
            status, doc = await running.post("/hooks/s", json.dumps({"k": "cus_1", "n": n}))
            assert status == 202, doc
            ids.append(doc["id"])
        assert await loop.run_in_executor(None, FIRST_IN.wait, 30.0)

        async def retry_waits() -> bool:  # a wait is not an attempt: its reason is the job's
            async with running.http.get(f"{running.admin_url}/events/{ids[0]}") as r:
                job = (await r.json())["jobs"][0]
            return str(job["last_error"]).startswith("its previous call, cut off at timeout_s")

        await poll(retry_waits, timeout_s=20)
        assert (1, "start") not in ORDER_SEEN
    finally:
        FIRST_LET_GO.set()

    async def all_done() -> bool:
        async with running.http.get(f"{running.admin_url}/events/{ids[1]}") as r:
            return bool((await r.json())["state"] == "done")

    await poll(all_done, timeout_s=20)
    assert ORDER_SEEN == [(0, "start"), (0, "end"), (1, "start"), (1, "end")]
    async with running.http.get(f"{running.admin_url}/events/{ids[0]}") as r:
        job = (await r.json())["jobs"][0]
    assert (job["state"], job["result"]) == ("done", 0)
