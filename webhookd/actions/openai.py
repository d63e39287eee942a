"""The ``openai`` action: one chat completion per event, paced by a lane, its answer kept.

The only home of the ``openai`` package. The client runs with ``max_retries=0``: webhookd owns
retries. Outcomes:

* answered: done; the result is ``{text, model, usage, finish_reason}``, and ``refusal`` when
  the model declined (its text then empty); each text is kept to 64 KiB or 16 characters per
  ``max_tokens``, whichever is more, with ``truncated: true`` when a server answered more;
* an answer over 4 MiB decompressed (``MOST_ANSWER_BYTES``; announced so, or past it as it is
  read): dead, read no further (a server that ignores ``max_tokens``, or a hostile one, answers
  as much each time); an error answer's body is cut there instead, and its status decides;
* 429 ``insufficient_quota``: the lane's circuit opens and the job waits (no attempt used);
* a 429 ``rate_limit_exceeded`` for a request bigger than the provider's whole limit per minute
  ("Request too large", or a ``Requested`` over its ``Limit``): dead at once, the lane neither
  cooled nor charged (no wait lets it through);
* any other 429 (``rate_limit_exceeded``): the lane cools down for ``Retry-After``, else the
  resets or the wait its message names (at most the lane's ``max_cooldown_s``; an hour without
  a lane) and the job waits (no attempt used);
* with several nodes on one PostgreSQL journal the lane is shared (``webhookd.limiter``): a
  cool-down or an open circuit holds on every node, and while the database is unreachable the
  lane admits nothing and the job waits;
* the lane cannot admit within ``max_lane_wait_s`` (default: 10 s, at most half of
  ``timeout_s``): the job waits, freeing its worker;
* 5xx, 408, 409, timeouts, connection errors: retried (a ``Retry-After`` is a lower bound, up to
  ``retry.cap_s``); other 4xx (400, 401, 403, 404, 422) and redirects (not followed): dead.

The lane reserves ``prompt estimate + max_tokens`` and is settled against ``usage.total_tokens``.
Reasoning models (o1, o3, o4-mini …) refuse ``max_tokens``: write ``max_completion_tokens``
instead, and that is the parameter sent.
The estimate is the prompt's characters / 4 plus 4 tokens per message: about right for English
with OpenAI's tokenizers, and only a reservation; the settle corrects it. An attempt whose call
went through a lane keeps in its detail when the call left (``lane_call_s``, seconds into the
attempt) and what the lane counts for it (``lane_tokens``: the usage, 0 after a 429, else the
reservation): the next start's lane counts the calls of the minute before it from them.

With ``then = { forward = URL }`` the answer is POSTed on, signed like ``forward``. When that
POST fails the job is retried, and the retry reuses the answer instead of asking the model
again: the failed attempt keeps the answer as the job's result, in the journal, so it survives
a restart too. The POST has what is left of the attempt's ``timeout_s``, less a little, so it
fails in time to keep the answer; an attempt that ends with no result keeps an earlier one's.
An attempt a drain cuts off (``workers.shutdown_grace_s`` run out while the POST is in flight)
keeps it too. Only a crash between the answer and the attempt's record loses it (the model is
then asked again; the downstream sees the same ``webhook-id``/``Idempotency-Key`` either way).
``webhookd replay`` of a dead job (its then-forward failed for good) delivers the kept answer
once more, without asking again: mend the target, then replay. Of a done job it starts over and
asks again; of a job waiting for its retry, it only skips the wait (the kept answer is still
used).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Mapping
from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from webhookd.actions.base import (
    MOST_RESULT_CHARS,
    Action,
    Outcome,
    Resources,
    excerpt,
    keep_detail,
    masker_of,
    rendered,
)
from webhookd.actions.delivery import connect_reason, parse_retry_after
from webhookd.actions.openai_config import LONE_SURROGATE, OPENAI_BASE_URL, Settings
from webhookd.actions.openai_limits import cooldown_s, header_int
from webhookd.config.sections import (
    DEFAULT_MAX_COOLDOWN_S,
    ActionConfig,
    ActionDefaults,
    RetryPolicy,
)
from webhookd.errors import ConfigError
from webhookd.journal.records import LaneAction
from webhookd.limiter import Lane, LaneBusy, Reservation
from webhookd.models import LANE_CALL_S, LANE_TOKENS, Event, Job
from webhookd.templates import Template, payload_of

log = logging.getLogger("webhookd.actions.openai")

# A completion can take minutes; failures are mostly brief (overload, a dropped connection).
DEFAULTS = ActionDefaults(
    timeout_s=120.0, retry=RetryPolicy(max_attempts=6, base_s=2.0, factor=2.0, cap_s=60.0)
)
_RETRYABLE_4XX = frozenset({407, 408, 409, 425})  # 407: a proxy asking for credentials
# Characters an answer's text may have per token of max_tokens, far above a real model's (about
# 4): only a server not bound by max_tokens goes past it, and its answer is cut there.
_CHARS_PER_TOKEN = 16
# What an answer may hold, decompressed: a chat completion of 128k tokens is about 0.5 MiB of
# English, 1 MiB or so of Chinese with each character escaped (\uXXXX). The client read an
# answer whole, then parsed it: a server answering 150 MB took the daemon up by 460 MB.
MOST_ANSWER_BYTES = 4 * 1024 * 1024
_QUOTA_WAIT_S = 60.0
# OpenAI's words for a 429: "Limit 6000, Used 5800, Requested 900" (wait for the window), or
# "Limit 6000, Requested 10216" with "Request too large" (no wait will do).
_LIMIT_REQUESTED = re.compile(r"Limit (\d[\d,]*),(?: Used \d[\d,]*,)? Requested (\d[\d,]*)")


def estimate_tokens(messages: list[ChatCompletionMessageParam]) -> int:
    """Prompt tokens, roughly: ASCII characters / 4 and one per other character, plus 4 per
    message for the chat framing. Characters / 4 alone counted Chinese or Japanese text 3-5
    times too low (the tokenizers give about one token a character, or more), and calls
    admitted together on such estimates took a lane past its tpm before their settles."""
    total = 0
    for m in messages:
        text = str(m.get("content") or "")
        ascii_chars = len(text.encode("ascii", "ignore")) if not text.isascii() else len(text)
        total += math.ceil(ascii_chars / 4) + (len(text) - ascii_chars) + 4
    return total


def validate(config: ActionConfig) -> None:
    Settings(config)


class OpenAIAction:
    def __init__(self, config: ActionConfig, resources: Resources) -> None:
        self.config = config
        self.settings = Settings(config)
        self.http = resources.http
        self.masker = masker_of(resources)
        self.held = resources.held
        self.told_blank: set[str] = set()  # the options said to render blank: see ``_render``
        self.lane: Lane | None = None
        if self.settings.lane is not None:
            lane = resources.lanes.get(self.settings.lane)
            if lane is None:
                raise ConfigError(f"{config.key}.lane", f"no lane named {self.settings.lane!r}")
            self.lane = lane
        self.client = openai.AsyncOpenAI(
            api_key=self.settings.api_key.reveal(),
            base_url=self.settings.base_url,
            max_retries=0,
            timeout=config.timeout_s,
            # A redirect is not followed (the SDK's default would): a 3xx re-posting the
            # prompt, payload data in it, wherever it points is dead, as a forward's is.
            http_client=openai.DefaultAsyncHttpxClient(
                event_hooks={"response": [_read_at_most]},
                follow_redirects=False,
                verify=self.settings.tls or True,
                proxy=self.settings.proxy.written if self.settings.proxy else None,
            ),
        )
        # Where the calls go, as a connection error names it: the client's own reading of the
        # base URL (OPENAI_BASE_URL without base_url), never a user or password in it.
        url = self.client.base_url
        host = f"[{url.host}]" if ":" in url.host else url.host
        self.host = f"{host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        port = f":{url.port}" if url.port else ""
        self.asks = f"{url.scheme}://{host}{port}{url.path.rstrip('/')}/chat/completions"

    @property
    def target(self) -> str:
        """Where it asks: named in a timeout's error, as a forward's URL is."""
        return self.settings.base_url or OPENAI_BASE_URL

    async def run(self, event: Event, job: Job) -> Outcome:
        started = time.monotonic()
        # The call's place in its lane (``LANE_CALL_S``, ``LANE_TOKENS``), set by ``_ask`` once
        # the lane lets the call go: kept with the attempt however it ends, so that the next
        # process's lane counts the call (``BaseJournal.lane_calls``). Empty: no call, or no lane.
        call: dict[str, Any] = {}
        outcome = await self._run(event, job, started, call)
        if call:
            outcome = dataclasses.replace(outcome, detail={**outcome.detail, **call})
        return outcome

    async def _run(self, event: Event, job: Job, started: float, call: dict[str, Any]) -> Outcome:
        then = self.settings.then
        # A job's result before it is done can only be the answer an earlier attempt kept when
        # its then-forward failed.
        answer = job.result if then is not None and _is_answer(job.result) else None
        reused = answer is not None
        if answer is None:
            asked = await self._ask(event, job.id, started, call)
            if isinstance(asked, Outcome):
                return asked
            answer = asked
        if then is None:
            return Outcome.done(answer)
        # Within what is left of the attempt, a little before the worker's timeout_s cuts it
        # off: an attempt cut off there records no result, and the answer must be kept.
        left_s = self.config.timeout_s - (time.monotonic() - started)
        try:
            async with asyncio.timeout(max(left_s - min(1.0, self.config.timeout_s / 20), 0.0)):
                sent = await then.send(self.http, event, answer, self.masker())
        except asyncio.CancelledError as exc:
            # Cut off from outside (a drain past workers.shutdown_grace_s, the worker's
            # timeout_s): the answer goes with the cancellation, for the cut attempt's record.
            keep_detail(exc, result=answer, answer_reused=reused, **call)
            raise
        except TimeoutError:
            return Outcome.retry(
                "then.forward: no answer within the attempt's timeout_s",
                result=answer,
                answer_reused=reused,
            )
        except Exception as exc:  # a bug or an odd failure: the answer is kept all the same
            return Outcome.retry(
                f"then.forward: {type(exc).__name__}: {exc}", result=answer, answer_reused=reused
            )
        detail = {"then": dict(sent.detail), "answer_reused": reused}
        if sent.kind == "done":
            return Outcome.done(answer, **detail)
        if sent.kind == "retry":
            return Outcome.retry(
                f"then.forward: {sent.error}", after_s=sent.after_s, result=answer, **detail
            )
        return Outcome.dead(f"then.forward: {sent.error}", result=answer, **detail)

    def _messages(self, event: Event) -> list[ChatCompletionMessageParam]:
        payload = payload_of(event)
        messages: list[ChatCompletionMessageParam] = []
        if self.settings.system is not None:
            system = self._render("system", self.settings.system, event, payload)
            messages.append({"role": "system", "content": system})
        prompt = self._render("prompt", self.settings.prompt, event, payload)
        messages.append({"role": "user", "content": prompt})
        return messages

    def _render(self, option: str, template: Template, event: Event, payload: Any) -> str:
        text, misses = template.render_noting_misses(payload)
        # The model is asked, and paid for, the template's literal text alone: say so, once per
        # option rather than at every webhook shaped otherwise (not per name a catch-all took,
        # which a sender could grow without end).
        if misses and option not in self.told_blank:
            self.told_blank.add(option)
            log.warning(
                "source=%s action=%s option=%s rendered with every lookup missing (%s): the"
                " model is asked its literal text alone. The payload is the body parsed as JSON"
                " (a form's fields for a form), and {{ . }} is the whole of it. Said once for"
                " the action",
                event.source,
                self.config.name,
                option,
                ", ".join(f"{{{{ {m} }}}}" for m in misses),
            )
        # A lone surrogate from the payload would fail every attempt as UnicodeEncodeError:
        # the model is sent U+FFFD in its place, as any UTF-8 decoder would show it.
        return LONE_SURROGATE.sub("\ufffd", text)

    async def _ask(
        self, event: Event, job_id: str, started: float, call: dict[str, Any]
    ) -> dict[str, Any] | Outcome:
        s = self.settings
        messages = await rendered(event, lambda: self._messages(event))
        reservation: Reservation | None = None
        if self.lane is not None:
            try:
                reservation = await self.lane.acquire(
                    estimate_tokens(messages) + s.max_tokens,
                    max_wait_s=s.max_lane_wait_s,
                    key=job_id,  # asked back at its turn, it takes that turn
                )
            except LaneBusy as busy:
                # The lane pacing its calls, as configured: no sign of trouble (``paced``).
                return Outcome.wait(str(busy), busy.retry_after_s, lane=busy.lane, paced=True)
            if self.held(event.source):
                # Paused while it waited for the lane (up to max_lane_wait_s): the call is not
                # made, its request and tokens go back, and the job is queued, held with the rest.
                self.lane.withdraw(reservation)
                return Outcome.wait("source paused", 1.0, lane=self.lane.name, paced=True)
            # Rounded up: never before the call left, which the lane counted from then.
            call[LANE_CALL_S] = math.ceil((time.monotonic() - started) * 1000) / 1000
            call[LANE_TOKENS] = reservation.tokens
        called = time.monotonic()
        try:
            raw = await self.client.chat.completions.with_raw_response.create(
                model=s.model,
                messages=messages,
                max_tokens=s.max_tokens if s.token_limit_name == "max_tokens" else openai.omit,
                max_completion_tokens=(
                    s.max_tokens if s.token_limit_name == "max_completion_tokens" else openai.omit
                ),
                temperature=s.temperature if s.temperature is not None else openai.omit,
            )
        except openai.APIStatusError as exc:
            outcome = self._failed(exc, reservation, time.monotonic() - called)
            if exc.status_code == 429 and call:
                call[LANE_TOKENS] = 0  # refused: ``_failed`` gave the lane its tokens back
            if self.lane is not None:
                await self.lane.publish()  # a cool-down or an open circuit holds on every node
            return outcome
        except _TooLarge as exc:  # from the client's response hook, as it raised it
            return self._too_large_answer(exc, called)
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            # Some versions of the openai package wrap whatever the client raises in one.
            if isinstance(exc.__cause__, _TooLarge):
                return self._too_large_answer(exc.__cause__, called)
            return Outcome.retry(self._unreachable(exc), duration_s=_round(called))
        except asyncio.CancelledError as exc:
            if call:  # cut off (a drain, the attempt's timeout_s) with the call under way
                keep_detail(exc, **call)
            raise
        try:
            completion: ChatCompletion = raw.parse()
            if not isinstance(completion, ChatCompletion):  # the SDK gives text that is not JSON
                kind = raw.headers.get("content-type") or "no content type"
                return self._not_a_completion(f"a {raw.status_code} of {kind}", raw.text, called)
            answer = _answer(completion, max(MOST_RESULT_CHARS, s.max_tokens * _CHARS_PER_TOKEN))
            total = completion.usage.total_tokens if completion.usage is not None else None
        except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            # A 200 whose body is not a chat completion (a proxy's page, a server that is not
            # quite compatible): the SDK's parse or the reads below fail on it in their own words.
            return self._not_a_completion(f"{type(exc).__name__}: {exc}", raw.text, called)
        if self.lane is not None and reservation is not None:
            if isinstance(total, int):
                self.lane.settle(reservation, total)
                call[LANE_TOKENS] = total
            if self.lane.statistics().circuit_open:
                self.lane.close_circuit()  # this call was the probe, and it went through
                try:
                    await self.lane.publish()
                except asyncio.CancelledError as exc:  # answered already: not to be paid twice
                    if answer is not None:
                        keep_detail(exc, result=answer, answer_reused=False, **call)
                    raise
        self._observe(raw.headers)  # after the settle: its refund must not undo the upstream's word
        if answer is None:
            return self._not_a_completion("it has no choices", raw.text, called)
        if not isinstance(answer["text"], str):  # no answer, however the server may count it
            content = json.dumps(answer["text"], ensure_ascii=False, default=str)
            return self._not_a_completion("its message's content is not text", content, called)
        return answer

    def _not_a_completion(self, why: str, body: str, started: float) -> Outcome:
        """A 200 that is no chat completion (a proxy's page, a server not quite compatible): a
        retry saying where from, what is wrong with it, and how it began."""
        return Outcome.retry(
            f"the answer of {self.asks} is not a chat completion: {why}: "
            + (excerpt(body) or "an empty body"),
            duration_s=_round(started),
        )

    def _too_large_answer(self, exc: _TooLarge, started: float) -> Outcome:
        """Dead: asked again, the server (one ignoring max_tokens, or a hostile one) answers as
        much, and each try may be paid for."""
        size = f"is {exc.size:,} bytes, over" if exc.size is not None else "is over"
        return Outcome.dead(
            f"the answer of {self.asks} {size} the {MOST_ANSWER_BYTES // 1024 // 1024} MiB a chat"
            f" completion may have: not read past it (does the server ignore"
            f" {self.settings.token_limit_name}?)",
            status=exc.status,
            duration_s=_round(started),
        )

    def _observe(self, headers: Mapping[str, str]) -> None:
        if self.lane is not None:
            self.lane.observe_remaining(
                header_int(headers, "x-ratelimit-remaining-requests"),
                header_int(headers, "x-ratelimit-remaining-tokens"),
            )

    def _failed(
        self, exc: openai.APIStatusError, reservation: Reservation | None, duration_s: float
    ) -> Outcome:
        status = exc.status_code
        code = exc.code or exc.type or ""
        detail = {"status": status, "code": code, "duration_s": round(duration_s, 4)}
        # The status once (the client's own message repeats it), where, and what the server said.
        error = f"{self.asks} answered {status}" + (f" {code}" if code else "")
        said = _said(exc.body)
        if 300 <= status < 400 and exc.response.headers.get("location"):
            said = f"redirect to {excerpt(exc.response.headers['location'])} not followed"
        elif status == 404 and not _message(exc.body) and "/v1/" not in self.asks:
            # Not the API's own 404 (no such model): a base_url without the API's /v1.
            said = f"{said} (no such path: is /v1 missing from base_url?)".lstrip()
        error += f": {said}" if said else ""
        headers = exc.response.headers
        if status == 429 and self.lane is not None and reservation is not None:
            self.lane.settle(reservation, 0)  # refused: nothing was used upstream
        self._observe(headers)
        if status == 429:
            if code == "insufficient_quota":
                if self.lane is not None:
                    self.lane.open_circuit("insufficient_quota")
                # Held, not failed: a lane out of quota keeps its jobs until a call succeeds.
                return Outcome.wait(error, _QUOTA_WAIT_S, held=True, **detail)
            too_large = self._too_large(exc)
            if too_large is not None:
                # However long it waits, the request is refused again: each try would cool the
                # whole lane, holding every other call on it back for nothing.
                return Outcome.dead(too_large, **detail)
            wait_s = cooldown_s(headers, _message(exc.body))
            if self.lane is not None:
                wait_s = self.lane.cooldown(wait_s)  # capped at the lane's max_cooldown_s
            else:
                wait_s = min(wait_s, DEFAULT_MAX_COOLDOWN_S)
            return Outcome.wait(error, wait_s, **detail)
        if status >= 500 or status in _RETRYABLE_4XX:
            return Outcome.retry(
                error, after_s=parse_retry_after(headers.get("retry-after"), time.time()), **detail
            )
        return Outcome.dead(error, **detail)

    def _unreachable(self, exc: openai.APIConnectionError) -> str:
        """A connection error in a forward's words, where to and why: the client's own says
        only "Connection error." for a refused port and an unknown host alike."""
        if isinstance(exc, openai.APITimeoutError):
            return f"timed out after {self.config.timeout_s:g}s ({self.host})"
        chain: list[BaseException] = []
        cause = exc.__cause__ or exc.__context__
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        proxy = self.settings.proxy
        to = self.host + (f" through the proxy {proxy.url}" if proxy is not None else "")
        # The deepest OS error says why ("All connection attempts failed" stands above it).
        reasons = [c for c in chain if isinstance(c, OSError)]
        if reasons and not isinstance(reasons[-1], ssl.SSLError):
            return f"connection failed: cannot connect to {to}: {connect_reason(reasons[-1])}"
        # A TLS failure's own text says what it was; else what lies under the client's words.
        last = reasons[-1] if reasons else chain[-1] if chain else exc
        return f"connection failed: {to}: {type(last).__name__}: {last}"

    def _too_large(self, exc: openai.APIStatusError) -> str | None:
        """The error for a 429 that refuses a request bigger than the provider's limit per
        minute, else ``None``."""
        message = _message(exc.body)
        found = _LIMIT_REQUESTED.search(message)
        limit, requested = (_count(found[1]), _count(found[2])) if found else (0, 0)
        if requested <= limit and "Request too large" not in message:
            return None
        said = "the request's tokens are over the provider's limit per minute"
        if requested > limit:
            said = (
                f"the request's {requested:,} tokens are over the provider's limit of {limit:,}"
                " per minute"
            )
        return (
            f"{self.asks} answered {exc.status_code} {exc.code or 'rate_limit_exceeded'}: {said},"
            " and no wait lets it through: shorten the prompt (or what it quotes of the payload)"
            f" or lower {self.settings.token_limit_name}"
        )

    async def aclose(self) -> None:
        await self.client.close()


class _TooLarge(Exception):
    """A successful answer's body over ``MOST_ANSWER_BYTES``: ``size`` as its Content-Length
    announced it, ``None`` when it went past the limit as it was read."""

    def __init__(self, status: int, size: int | None) -> None:
        super().__init__(f"an answer over {MOST_ANSWER_BYTES} bytes")
        self.status = status
        self.size = size


async def _read_at_most(response: Any) -> None:
    """The client's response hook: the body read here, before the client reads it whole, and
    no further than ``MOST_ANSWER_BYTES``, counted decompressed (a gzip of kilobytes can hold
    gigabytes). Past that, a 2xx raises ``_TooLarge`` (the connection closed, the rest never
    read), and an error's body is cut there (only its start is shown). The client's own read
    then finds the body read (``aread`` keeps it in ``_content``, in httpx and httpx2 alike)."""
    length = response.headers.get("content-length", "")
    if response.is_success and length.isdigit() and int(length) > MOST_ANSWER_BYTES:
        raise _TooLarge(response.status_code, int(length))
    body = bytearray()
    # Closed however the loop ends, and the response (its connection) with it.
    async with contextlib.aclosing(response.aiter_bytes()) as parts:
        async for part in parts:
            body += part
            if len(body) > MOST_ANSWER_BYTES:
                if response.is_success:
                    raise _TooLarge(response.status_code, None)
                del body[MOST_ANSWER_BYTES:]
                break
    response._content = bytes(body)


def _is_answer(value: Any) -> bool:
    """Is ``value`` an answer as ``_ask`` returns it (kept by an earlier attempt)?"""
    return isinstance(value, dict) and isinstance(value.get("text"), str) and "model" in value


def _message(body: object) -> str:
    """An API error's message (the client's ``body`` is the error object of a JSON answer)."""
    message = body.get("message") if isinstance(body, Mapping) else None
    return message if isinstance(message, str) else ""


def _said(body: object) -> str:
    """What an error answer says, on one line: its API error's message, else its body's start
    (a proxy's page, a compatible server's own JSON)."""
    if _message(body):
        return excerpt(_message(body))
    if body is None or isinstance(body, str):
        return excerpt(body or "")
    return excerpt(json.dumps(body, ensure_ascii=False, default=str))


def _count(digits: str) -> int:
    return int(digits.replace(",", ""))


def _round(started: float) -> float:
    return round(time.monotonic() - started, 4)


def _answer(completion: ChatCompletion, most_chars: int) -> dict[str, Any] | None:
    """The job's result from a chat completion; ``None`` when it holds no choice. Each text in
    it is kept to ``most_chars``, and ``truncated`` says one was cut: a server that ignores
    max_tokens could answer megabytes, journaled, posted on and served whole otherwise."""
    usage = completion.usage
    if not completion.choices:
        return None
    choice = completion.choices[0]
    # A model that declines says why in ``refusal``, with no content: kept, not lost as "".
    refusal = getattr(choice.message, "refusal", None)
    texts = {
        "text": choice.message.content or "",
        **({"refusal": refusal} if refusal else {}),
        "model": completion.model,
        "finish_reason": choice.finish_reason,
    }
    kept = {name: v[:most_chars] if isinstance(v, str) else v for name, v in texts.items()}
    return {
        **kept,
        "usage": {
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "total_tokens": usage.total_tokens if usage else None,
        },
        **({"truncated": True} if kept != texts else {}),
    }


def create(config: ActionConfig, resources: Resources) -> OpenAIAction:
    return OpenAIAction(config, resources)


def lane_actions(actions: Mapping[tuple[str, str], Action]) -> list[LaneAction]:
    """The actions of ``actions`` (by source and name, as ``build`` makes them) that make their
    calls through a lane, as ``BaseJournal.lane_calls`` asks for them: the daemon's start
    counts their calls of the minute before it in their lanes (``Lane.seed``). A call whose
    attempt kept no count counts the action's ``max_tokens``."""
    found = []
    for (source, name), action in actions.items():
        if isinstance(action, OpenAIAction) and action.lane is not None:
            lane = action.lane
            found.append(
                LaneAction(source, name, lane.name, lane.most_seeded, action.settings.max_tokens)
            )
    return found
