"""Answers from an OpenAI-compatible server (vLLM, TGI, the llama.cpp server, Ollama).

The same `Inference` as this process's queue, so the service cannot tell them apart:
`submit` returns a `Generation` at once (or raises `QueueFull` at `max_size` in flight),
and requests wait in fair order (`FairOrder`) until one of `max_concurrent` streams is
free. The server batches whatever it is sent; sending more at once would only make them
wait there instead, out of our fair order, our places in line, and a cancel's reach.

Each request is one task that POSTs `/chat/completions` with `stream: true` and writes
the server-sent events' text into its `Generation`. The connection failing, a 429 and a
5xx are tried again after a backoff (the server's `Retry-After` where it sends one); a
try that breaks off after some text restarts the answer (`Generation.restart`), so the
service replaces what it showed. Any other refusal fails the request at once: it would
fail again. A cancel (Stop, the timeout, a stop of threadbot) cancels the task, which
closes the connection, so the server stops generating too. Nothing here needs torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import logging
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from functools import partial
from typing import Any, Self

import aiohttp

from bot.config import DEFAULT_CONTEXT_TOKENS, Settings
from bot.loading import ModelError
from bot.metrics import Metrics
from bot.queue import FairOrder, Generation, QueueFull, QueuePlace
from bot.tokens import alternating, defused
from bot.types import ChatMessage
from storage.connection import NOT_A_URL, redact_url

logger = logging.getLogger(__name__)

START_SECONDS = 30  # for GET /models at start: the whole request
CONNECT_SECONDS = 30  # for each connection; a stream itself is bounded by the request timeout
READ_SECONDS = 120.0
"""A stream that, once begun, sends nothing this long (its server's host gone without a
word, or hung) is broken off and tried again. Its beginning may take longer: a server
begins a request once it has room for it, and answers once it has read the prompt."""
RETRY_AFTER_MAX_S = 60.0  # the longest a server's Retry-After holds a request asleep
PROBE_EVERY_S = 10.0  # while requests run out of tries: how often GET /models is asked
# What may go right on another try: the connection failing, before or during the answer.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
REFUSED_MIDWAY = ("Input validation error", "Template error", "Missing template", "Tool error")
"""How TGI's failures in a stream begin where another try would fail the same way: it
checks a streamed request inside its 200 (a prompt past its --max-total-tokens) and
marks every failure there 422, overloaded or not, so its words tell them apart."""
REFUSED_TYPES = frozenset({"invalid_request_error", "exceed_context_size_error"})
"""llama.cpp's types for a request it refuses as asked, which its server sent in the stream
before mid-2025 (a prompt past its context, for one)."""
GIVEN_UP = ("abort", "error")
"""Finish reasons of an answer the server gave up partway (vLLM's and SGLang's "abort"),
not a whole one: tried again, as a stream broken off is."""


class InferenceUnavailable(RuntimeError):
    """INFERENCE_URL did not answer a request; the message names it and why (its status,
    its own words). Unless `may_pass`, it refused the request, and would again."""

    may_pass = False


class _OutOfTries(InferenceUnavailable):
    """Every try of a request failed in a way the next might not have: the server is down,
    or overloaded, for now."""

    may_pass = True


class InferenceServerError(ModelError):
    """At start, INFERENCE_URL could not be reached, refused (a wrong key), or lists no
    model to answer with; the message names it and what to fix. A server that is still
    starting may answer after a restart."""

    def __init__(self, message: str) -> None:
        super().__init__(message, may_pass=True)


class _RefusesAll(InferenceUnavailable):
    """A refusal that every request meets until someone acts: the API key (401, 403), or
    a model the server no longer serves (404)."""


REFUSES_ALL = frozenset({401, 403, 404})


class _Retry(Exception):
    """This try failed in a way another may not: `retry_after` is the server's wait in
    seconds, if it said one."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class OpenAIBackend:
    """Requests answered by an OpenAI-compatible server, streamed, `max_concurrent` at once.

    Keeps `metrics.queue_waiting` (requests in line) and `metrics.batch_rows` (requests
    streaming) current."""

    def __init__(
        self,
        *,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        retries: int = 3,
        max_size: int,
        max_concurrent: int,
        timeout: float,
        max_new_tokens: int,
        context_tokens: int | None = None,
        metrics: Metrics | None = None,
        backoff: float = 1.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.where = redact_url(self.url)  # in logs, errors and `status`: no password
        self.model = model  # None until `__aenter__` asks the server
        self.retries = retries
        self.max_size = max_size
        self.max_concurrent = max_concurrent
        self.timeout = timeout
        self.max_new_tokens = max_new_tokens
        self.context_tokens = context_tokens  # a conversation's prompt and answer, at most
        self.metrics = metrics if metrics is not None else Metrics()
        self.backoff = backoff  # seconds before the first retry; doubled for each next one
        self.died = asyncio.Event()  # never set: a server's failure is one request's
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._order = FairOrder()
        self._tasks: dict[Generation, asyncio.Task[None]] = {}  # the requests streaming
        self._in_flight = 0  # waiting + streaming: what `max_size` bounds
        self._closing = False
        # Why the last request ran out of tries: readiness says so until a request is
        # answered, or GET /models is (asked by `_probe`); where refused as every one would
        # be (`_RefusesAll`), until it lists the model.
        self._failing: str | None = None
        self._refuses_all = False
        self._probe: asyncio.Task[None] | None = None
        # Whether GET /models lists the model by the name we send (Ollama lists
        # `llama3.2:latest` and answers to `llama3.2`; llama.cpp lists its file and
        # answers to any name): where not, the listing cannot tell it is served again.
        self._listed = True

    @classmethod
    def from_settings(cls, settings: Settings, *, metrics: Metrics | None = None) -> Self:
        """The backend INFERENCE_URL and its settings describe; MAX_BATCH streams at once."""
        if settings.inference_url is None:
            raise ValueError("an OpenAI-compatible backend needs INFERENCE_URL")
        key = settings.inference_api_key
        return cls(
            url=settings.inference_url,
            model=settings.inference_model,
            api_key=key.get_secret_value() if key else None,
            retries=settings.inference_retries,
            max_size=settings.queue_max,
            max_concurrent=settings.max_batch,
            timeout=settings.request_timeout,
            max_new_tokens=settings.max_new_tokens,
            context_tokens=settings.max_context_tokens or DEFAULT_CONTEXT_TOKENS,
            metrics=metrics,
        )

    async def __aenter__(self) -> Self:
        """Open the connection pool and ask the server what it serves (which also checks
        that it can be reached, and takes the key); raises InferenceServerError if not."""
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_SECONDS),
            connector=aiohttp.TCPConnector(limit=0),  # `max_concurrent` is the bound
        )
        try:
            served = await self._served_models()
            self.model = self._chosen(list(served))
            self._within_window(served.get(self.model))
        except BaseException:
            await self._session.close()
            raise
        logger.info("answering with %s from %s", self.model, self.where)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Refuse new requests, cancel those waiting and streaming, close the connections."""
        self._closing = True
        if self._probe is not None:
            self._probe.cancel()
        tasks = list(self._tasks.values())
        for generation in [*self._order.line(), *self._tasks]:
            generation.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _served_models(self) -> dict[str, int | None]:
        """The ids GET /models lists, in its order, with each one's window where it says
        it (vLLM's max_model_len); raises InferenceServerError, naming INFERENCE_URL, where
        it cannot be reached or refuses."""
        assert self._session is not None
        try:
            async with self._session.get(
                f"{self.url}/models", timeout=aiohttp.ClientTimeout(total=START_SECONDS)
            ) as response:
                if response.status != 200:
                    said = _message(await response.text(errors="replace"))
                    raise InferenceServerError(
                        f"INFERENCE_URL={self.where} answered {response.status} to GET /models: "
                        f"{said}. Check INFERENCE_URL and INFERENCE_API_KEY"
                    )
                body = await response.text(errors="replace")
        except aiohttp.InvalidURL:  # its message is the URL, password and all
            raise InferenceServerError(f"INFERENCE_URL={self.where} is {NOT_A_URL}") from None
        except (aiohttp.ClientError, TimeoutError) as error:
            raise InferenceServerError(
                f"INFERENCE_URL={self.where} cannot be reached ({_described(error)}): "
                "start the server, or correct INFERENCE_URL"
            ) from error
        try:
            listed = json.loads(body)["data"]
            served = {entry["id"]: entry.get("max_model_len") for entry in listed}
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise InferenceServerError(
                f"INFERENCE_URL={self.where} does not answer GET /models as an OpenAI-compatible "
                "API does: correct INFERENCE_URL (it ends in /v1 on most servers)"
            ) from error
        return served

    def _chosen(self, served: list[str]) -> str:
        """INFERENCE_MODEL, else the first model the server lists."""
        if self.model is None:
            if not served:
                raise InferenceServerError(
                    f"INFERENCE_URL={self.where} lists no model at GET /models: load one into "
                    "the server, or set INFERENCE_MODEL"
                )
            return served[0]
        if self.model not in served:
            self._listed = False
            logger.warning("INFERENCE_MODEL=%s is not among those %s lists: %s",
                           self.model, self.where, ", ".join(served))  # fmt: skip
        return self.model

    def _within_window(self, window: object) -> None:
        """Refuse a model whose window is smaller than a conversation may grow: every
        turn past it would be refused by the server (a 400) until the conversation is
        reset."""
        if isinstance(window, int) and self.context_tokens and window < self.context_tokens:
            raise ModelError(
                f"INFERENCE_URL={self.where} serves {self.model} with a window of {window} "
                f"tokens, less than the {self.context_tokens} a conversation may take: set "
                f"MAX_CONTEXT_TOKENS to {window} or less"
            )

    @property
    def depth(self) -> int:
        """Requests waiting and streaming: what `max_size` bounds."""
        return self._in_flight

    @property
    def room(self) -> int:
        return max(self.max_size - self._in_flight, 0)

    def places(self, user: str) -> list[QueuePlace]:
        """Where each of a user's requests stands: 0 while it streams, n while n-th in line."""
        return self._order.places(user)

    def checks(self) -> dict[str, str]:
        """While requests run out of tries (the server down, or overloaded), why; a 400 is
        one request's own failure."""
        return {} if self._failing is None else {"inference": self._failing}

    def submit(
        self,
        messages: list[ChatMessage],
        *,
        user: str,
        conversation: str,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        """Ask the server for an answer of at most `max_new_tokens` (None: MAX_NEW_TOKENS),
        picked with `temperature` (None: the server's default; 0: greedy). Raises
        ValueError for options out of range and QueueFull when `max_size` are in flight."""
        if self._in_flight >= self.max_size or self._closing:
            raise QueueFull
        generation = Generation.submitted(
            messages,
            user=user,
            conversation=conversation,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            timeout=self.timeout,
        )
        generation.on_cancel = partial(self._cancelled, generation)
        self._in_flight += 1
        self._order.push(generation)
        self._dispatch()
        return generation

    # --- In line, and out of it ------------------------------------------------------------

    def _dispatch(self) -> None:
        """Start the next requests in fair order while fewer than `max_concurrent` stream."""
        while self._order and len(self._tasks) < self.max_concurrent and not self._closing:
            generation = self._order.pop()
            generation.started()
            task = asyncio.create_task(self._answer(generation), name="inference request")
            self._tasks[generation] = task
            # `_answer` finishes the request itself, before its end is read; this is for a
            # task cancelled before it ran, whose body (and its `finally`) never runs.
            task.add_done_callback(lambda _, generation=generation: self._finish(generation))
        self._count()

    def _cancelled(self, generation: Generation) -> None:
        """A cancel: the request's task stops (closing its connection), or it leaves the line."""
        if (task := self._tasks.get(generation)) is not None:
            task.cancel()
        elif self._order.remove(generation):
            self._in_flight -= 1
            generation.released()
            self._count()

    def _finish(self, generation: Generation) -> None:
        """A request's task is done with it: it no longer counts, and the next may start."""
        if self._tasks.pop(generation, None) is None:
            return  # finished already
        self._order.finished(generation)
        self._in_flight -= 1
        generation.released()
        self._dispatch()

    def _count(self) -> None:
        self.metrics.queue_waiting.set(self._order.waiting)
        self.metrics.batch_rows.set(len(self._tasks))

    # --- One request ---------------------------------------------------------------------

    async def _answer(self, generation: Generation) -> None:
        """The request's task: its answer written, or its failure; never an exception.
        Its tokens are counted however it ends (a cancel too), as far as its last try went."""
        answer = _Answer(generation)
        try:
            await self._tries(answer)
            self._failing = None
        except Exception as error:
            if isinstance(error, _OutOfTries | _RefusesAll):  # not ready: none would pass
                self._failing = f"failing: {error}"
                self._refuses_all = isinstance(error, _RefusesAll)
                if self._probe is None:
                    self._probe = asyncio.create_task(self._probed_until_answering())
            elif not isinstance(error, InferenceUnavailable):  # an answer we cannot read
                # Its name and message: aiohttp's repr of a response error holds the
                # request's headers, the API key among them.
                error = InferenceUnavailable(
                    f"INFERENCE_URL={self.where} answered in a way threadbot cannot read: "
                    f"{type(error).__name__}: {_described(error)}"
                )
            logger.error("generation failed: %s", error)
            generation.fail(error)
        finally:  # before the end or failure is read, so whoever reads it sees it gone
            self.metrics.prompt_tokens.inc(answer.prompt_tokens)
            self.metrics.generated_tokens.inc(answer.answer_tokens)
            self._finish(generation)

    async def _tries(self, answer: _Answer) -> None:
        """The request, tried again after a backoff where that may help, `retries` times,
        until its answer has ended."""
        for attempt in range(self.retries + 1):
            try:
                await self._try(answer)
                return
            except _Retry as error:
                failure = error
            except CONNECTION_ERRORS as error:
                failure = _Retry(f"could not be reached or broke off: {_described(error)}")
            if attempt == self.retries:
                break
            wait = failure.retry_after
            wait = self.backoff * 2**attempt if wait is None else wait
            logger.warning("INFERENCE_URL=%s %s; trying again in %.1f s (retry %d of %d)",
                           self.where, failure, wait, attempt + 1, self.retries)  # fmt: skip
            await asyncio.sleep(wait)
        # Not said where none were to be (the doctor's one try): INFERENCE_RETRIES=0 there
        # read as the operator's setting.
        left = f"; no retry left (INFERENCE_RETRIES={self.retries})" if self.retries else ""
        raise _OutOfTries(f"INFERENCE_URL={self.where} {failure}{left}")

    async def _probed_until_answering(self) -> None:
        """Ask GET /models every PROBE_EVERY_S until it lists our model (or, one it never
        listed that ran out of tries, until it answers; or a request is answered):
        readiness (`checks`) would otherwise say failing for as long as no request came.
        A model it never listed and refuses (a 404: a name mistyped) stays failing."""
        try:
            while self._failing is not None:
                await asyncio.sleep(PROBE_EVERY_S)
                with contextlib.suppress(InferenceServerError):
                    served = await self._served_models()  # (to a key that works)
                    if self.model in served or not (self._listed or self._refuses_all):
                        self._failing = None
        finally:
            self._probe = None

    async def _try(self, answer: _Answer) -> None:
        """One request and its stream, written into `answer`; raises _Retry where another
        try may go better, and InferenceUnavailable where it would not."""
        assert self._session is not None, "used outside `async with`"
        answer.start_over()
        async with self._session.post(
            f"{self.url}/chat/completions", json=self._request(answer.generation)
        ) as response:
            if response.status != 200:
                said = _message(await response.text(errors="replace"))
                if response.status == 429 or response.status >= 500:
                    retry_after = _seconds(response.headers.get("Retry-After"))
                    raise _Retry(f"answered {response.status} ({said})", retry_after)
                refused = _RefusesAll if response.status in REFUSES_ALL else InferenceUnavailable
                raise refused(
                    f"INFERENCE_URL={self.where} refused the request with {response.status}: {said}"
                )
            if response.content_type != "text/event-stream":
                raise InferenceUnavailable(f"INFERENCE_URL={self.where} answered "
                                           f"{response.content_type}, not a stream")  # fmt: skip
            try:
                async for data in _server_sent_events(_paced(response.content, READ_SECONDS)):
                    if data == "[DONE]":
                        answer.end()
                        return
                    answer.read(json.loads(data), self.where)
            except (TimeoutError, *CONNECTION_ERRORS) as error:
                if not answer.finished:
                    if isinstance(error, TimeoutError):
                        raise _Retry(f"sent nothing for {READ_SECONDS:g} s midway") from None
                    raise
                # Broken off after the finish: only the token counts or [DONE] were lost.
        if not answer.finished:
            raise _Retry("ended the stream before the answer")
        answer.end()  # a server that sends no [DONE] after the finish

    def _request(self, generation: Generation) -> dict[str, Any]:
        """The JSON of a streamed chat completion for the request; its token counts come
        in the stream's last event."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": message["role"], "content": message["content"]}
                # The server renders and tokenizes the prompt: a user's `<|im_start|>`
                # would be the token itself there too.
                for message in alternating(defused(None, generation.messages))
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": generation.max_new_tokens or self.max_new_tokens,
        }
        if generation.temperature is not None:
            request["temperature"] = generation.temperature
        return request


class _Answer:
    """One request's answer across its tries: the text of the try under way, and whether
    an earlier try showed text that the next must take back before it writes (or ends)."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.text = ""
        self.chunks = 0  # the pieces of text streamed in this try
        self.usage: Mapping[str, Any] = {}
        self.finished = False  # the server said why the answer ended (a finish_reason)
        self._take_back = False

    def start_over(self) -> None:
        """Another try: its answer replaces what the last ones showed."""
        self._take_back = self._take_back or bool(self.text)
        self.text, self.chunks, self.usage, self.finished = "", 0, {}, False

    def read(self, event: Any, url: str) -> None:
        """One chunk of the stream: its text, its finish, its token counts."""
        if "error" in event:  # vLLM, TGI and llama.cpp report a failure midway as an event
            if _refused_as_asked(event["error"]):
                raise InferenceUnavailable(
                    f"INFERENCE_URL={url} refused the request in its stream: {_said(event)}"
                )
            # The server took the request (its 200), then failed at it: tried again, as a
            # 5xx before the stream is (vLLM marks even its engine's death 400 here).
            raise _Retry(f"stopped the answer with an error ({_said(event)})")
        self.usage = event.get("usage") or self.usage
        for choice in event.get("choices") or []:  # one (n=1); none in the usage event
            if text := (choice.get("delta") or {}).get("content"):
                self._restarted()
                self.text += text
                self.chunks += 1
                self.generation.write(text, self.prompt_tokens, self.answer_tokens)
            reason = choice.get("finish_reason")
            if reason in GIVEN_UP:
                raise _Retry(f"gave the answer up midway (finish_reason {reason})")
            self.finished = self.finished or bool(reason)  # "": none yet

    @property
    def prompt_tokens(self) -> int:
        """As the server counted them: 0 until its usage event, which comes at the end."""
        return self.usage.get("prompt_tokens") or 0

    @property
    def answer_tokens(self) -> int:
        """As the server counted them; until it has (a stream stopped before its usage
        event, a server that sends none), the chunks streamed: about a token each."""
        return self.usage.get("completion_tokens") or self.chunks

    def end(self) -> None:
        self._restarted()
        self.generation.end(self.text, self.prompt_tokens, self.answer_tokens)

    def _restarted(self) -> None:
        if self._take_back:
            self._take_back = False
            self.generation.restart()


async def _paced(lines: AsyncIterable[bytes], gap: float) -> AsyncIterator[bytes]:
    """`lines` as they come, raising TimeoutError where one comes more than `gap` seconds
    after the one before; the first takes as long as it takes."""
    following = aiter(lines)
    limit = None
    while True:
        try:
            async with asyncio.timeout(limit):
                line = await anext(following)
        except StopAsyncIteration:
            return
        limit = gap
        yield line


async def _server_sent_events(lines: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The data of each server-sent event, in order: its `data:` lines joined by newlines;
    comments (keep-alive pings) and other fields skipped, but for an `error:` line, which
    llama.cpp's server sent before mid-2025 where others send an error event: it comes as
    one. An event the stream ends in the middle of is dropped, as the standard says, so a
    cut stream yields no half event."""
    data: list[str] = []
    async for raw in lines:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if joined := "\n".join(data):  # an empty one (a proxy's keep-alive) is no event
                yield joined
            data = []
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
        elif field == "error":
            try:
                error = json.loads(value)
            except ValueError:
                error = value.strip()
            yield json.dumps({"error": error})


def _refused_as_asked(error: Any) -> bool:
    """Whether an error in a stream is the server refusing the request as it was asked,
    which another try would meet again (`REFUSED_MIDWAY`, `REFUSED_TYPES`)."""
    if not isinstance(error, dict):
        return False
    message = error.get("message")
    return error.get("type") in REFUSED_TYPES or (
        isinstance(message, str) and message.startswith(REFUSED_MIDWAY)
    )


def _message(body: str) -> str:
    """What an error response says, from its JSON if it has some."""
    try:
        return _said(json.loads(body))
    except ValueError:
        return body.strip()[:300] or "no message"


def _said(error: Any) -> str:
    """The message of an error object as OpenAI (`{"error": {"message"}}`), vLLM
    (`{"message"}`) and TGI (`{"error": "..."}`) write it."""
    if not isinstance(error, dict):
        return str(error)[:300]
    inner = error.get("error", error)
    if isinstance(inner, dict):
        return str(inner.get("message", inner))[:300]
    return str(inner)[:300]


def _seconds(retry_after: str | None) -> float | None:
    """A `Retry-After` header in seconds, from its number or its HTTP date, at most
    RETRY_AFTER_MAX_S (a request is not held asleep for a day); None for none, and for
    what is neither."""
    if not retry_after:
        return None
    try:
        seconds = float(retry_after)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(retry_after)
        except (TypeError, ValueError):
            return None
        seconds = when.replace(tzinfo=when.tzinfo or datetime.UTC).timestamp() - time.time()
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S) if math.isfinite(seconds) else None


def _described(error: Exception) -> str:
    """An exception's message, or its name where it has none (a timeout has none)."""
    return str(error) or type(error).__name__
