"""A fake OpenAI-compatible server for tests: GET /v1/models and streamed
POST /v1/chat/completions on 127.0.0.1, as vLLM and OpenAI's API stream them.

Each completion request gets the next reply of `script` (once it is empty, the whole
`answer`, a word a chunk), and is recorded with its JSON and headers::

    async with FakeOpenAI() as server:
        server.script += [Status(429, retry_after="0.2"), Stream(["Hel", "lo"])]
        ... # OpenAIBackend(url=server.url, ...)
        assert server.requests[1].body["max_tokens"] == 8
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web
from fake_server import serve

HOLD_SECONDS = 10  # the longest a held stream waits for the test or the client


@dataclass
class Stream:
    """A whole answer: these chunks, then the finish, the usage and `[DONE]`; with
    `keep_alive`, an empty event first (`data:`), as some proxies send one; nothing at all,
    not even the headers, for `late_s` seconds first (a server's queue, or a long prefill)."""

    chunks: list[str]
    keep_alive: bool = False
    late_s: float = 0.0


@dataclass
class Drop:
    """These chunks (and the finish, `after_finish`), then the connection closed in the
    middle of the response."""

    chunks: list[str]
    after_finish: bool = False


@dataclass
class Aborted:
    """These chunks, then a finish_reason of "abort" (vLLM giving the request up) and
    `[DONE]`."""

    chunks: list[str]


@dataclass
class Cut:
    """These chunks, then the response ended cleanly, with no finish and no `[DONE]`."""

    chunks: list[str]


@dataclass
class Hold:
    """These chunks (and the finish, `after_finish`), then a wait until the test calls
    `release` (the answer then ends as a Stream's does) or the client goes away (recorded
    as `Request.gone`)."""

    chunks: list[str]
    after_finish: bool = False


@dataclass
class Status:
    """An error response: this status, an OpenAI-style error body, maybe a Retry-After."""

    status: int
    message: str = "the fake server says no"
    retry_after: str | None = None


@dataclass
class ProxyPage:
    """A proxy's own error page in front of the server: this status, HTML in Latin-1 that
    names no charset (so not UTF-8, which a client would read by default)."""

    status: int
    page: str = "<h1>502</h1><p>Le serveur en amont ne répond pas.</p>"

    def response(self) -> web.Response:
        return web.Response(
            status=self.status, body=self.page.encode("latin-1"), content_type="text/html"
        )


@dataclass
class ErrorEvent:
    """These chunks, then an error event in the stream (as vLLM sends one midway); or,
    `legacy`, an `error:` line and `[DONE]`, as llama.cpp's server did before mid-2025."""

    chunks: list[str]
    message: str = "the model fell over"
    legacy: bool = False
    fields: dict[str, Any] = field(default_factory=lambda: {"code": 500})  # with the message


@dataclass
class Redirect:
    """A redirect to the same address, for this request and every later one."""


Reply = Stream | Drop | Cut | Hold | Status | ProxyPage | ErrorEvent | Redirect


@dataclass
class Request:
    """One completion request as the fake got it; `at` is time.monotonic() on arrival."""

    body: dict[str, Any]
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)
    gone: bool = False  # the client closed the connection while its answer was held


class FakeOpenAI:
    """Serves `models`; needs `api_key` as a bearer token where one is given."""

    def __init__(
        self,
        *,
        models: tuple[str, ...] = ("fake-model", "other-model"),
        answer: str = "The capital of France is Paris.",
        api_key: str | None = None,
        window: int | None = None,
    ) -> None:
        self.models = models
        self.window = window  # each model's max_model_len, as vLLM lists it; None: not said
        self.answer = answer
        self.api_key = api_key
        self.script: list[Reply] = []
        # The finish_reason of the chunks before the finish: null, as OpenAI and vLLM send
        # it; "" where a server sends that.
        self.unfinished_reason: str | None = None
        self.requests: list[Request] = []
        self.model_listings = 0  # GET /v1/models requests
        self.models_page: ProxyPage | None = None  # set: GET /v1/models answers it
        self._released = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner, port = await serve(app)
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._released.set()  # no held answer outlives the server
        assert self._runner is not None
        await self._runner.cleanup()

    def release(self) -> None:
        """Let every held answer, and every one held from now on, finish."""
        self._released.set()

    # --- the API ------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.model_listings += 1
        if refused := self._unauthorized(request):
            return refused
        if self.models_page is not None:
            return self.models_page.response()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        if self.window is not None:
            data = [model | {"max_model_len": self.window} for model in data]
        return web.json_response({"object": "list", "data": data})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Request(body, dict(request.headers)))
        if refused := self._unauthorized(request):
            return refused
        reply = self.script.pop(0) if self.script else Stream(_words(self.answer))
        if isinstance(reply, Redirect):
            self.script.insert(0, reply)
            raise web.HTTPTemporaryRedirect(request.url)
        if isinstance(reply, ProxyPage):
            return reply.response()
        if isinstance(reply, Status):
            headers = {"Retry-After": reply.retry_after} if reply.retry_after else {}
            return _error(reply.status, reply.message, headers)
        stream = _Stream(
            request, body, chunk_id=f"chatcmpl-{len(self.requests)}",
            unfinished_reason=self.unfinished_reason,
        )  # fmt: skip
        if isinstance(reply, Stream):
            await asyncio.sleep(reply.late_s)
        await stream.open()
        if isinstance(reply, Stream) and reply.keep_alive:
            await stream.response.write(b"data:\n\n")
        await stream.text(reply.chunks[: body.get("max_tokens") or None])
        match reply:
            case Drop():
                if reply.after_finish:
                    await stream.chunk({}, "stop")
                assert request.transport is not None
                request.transport.close()  # mid-body: the chunked encoding never ends
                return stream.response
            case Cut():
                pass
            case Aborted():
                await stream.chunk({}, "abort")
                await stream.response.write(b"data: [DONE]\n\n")
            case Hold():
                if reply.after_finish:
                    await stream.chunk({}, "stop")
                self.requests[-1].gone = await _held(request, self._released)
                if self.requests[-1].gone:
                    return stream.response
                await stream.finish()
            case ErrorEvent(legacy=True):
                error = json.dumps(reply.fields | {"message": reply.message})
                await stream.response.write(f"error: {error}\n\ndata: [DONE]\n\n".encode())
            case ErrorEvent():
                await stream.event({"error": reply.fields | {"message": reply.message}})
            case Stream():
                await stream.finish()
        await stream.response.write_eof()
        return stream.response

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return _error(401, "Incorrect API key provided")


class _Stream:
    """One streamed answer's events, as the API writes them."""

    def __init__(
        self,
        request: web.Request,
        body: dict[str, Any],
        chunk_id: str,
        unfinished_reason: str | None,
    ) -> None:
        self.request = request
        self.unfinished_reason = unfinished_reason
        self.body = body
        self.id = chunk_id
        self.response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        self.written = 0  # content chunks
        self.usage = (body.get("stream_options") or {}).get("include_usage", False)

    async def open(self) -> None:
        await self.response.prepare(self.request)
        await self.chunk({"role": "assistant", "content": ""}, self.unfinished_reason)

    async def text(self, chunks: list[str]) -> None:
        for text in chunks:
            await self.chunk({"content": text}, self.unfinished_reason)
            self.written += 1

    async def finish(self) -> None:
        """The finish (`length` where the answer reached max_tokens), the usage where it
        was asked for, then `[DONE]`."""
        limit = self.body.get("max_tokens")
        reason = "length" if limit is not None and self.written >= limit else "stop"
        await self.chunk({}, reason)
        if self.usage:
            prompt = sum(len(m["content"].split()) for m in self.body["messages"])
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": self.written,
                "total_tokens": prompt + self.written,
            }
            await self.event(self._chunk([], usage=usage))
        await self.response.write(b"data: [DONE]\n\n")

    async def chunk(self, delta: dict[str, Any], finish_reason: str | None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        await self.event(self._chunk([choice]))

    async def event(self, data: dict[str, Any]) -> None:
        await self.response.write(f"data: {json.dumps(data)}\n\n".encode())

    def _chunk(self, choices: list[dict[str, Any]], usage: dict | None = None) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.body["model"],
            "choices": choices,
        }
        return chunk | ({"usage": usage} if self.usage else {})


async def _held(request: web.Request, released: asyncio.Event) -> bool:
    """Wait (bounded) for the release or the client's going; whether the client went."""
    for _ in range(int(HOLD_SECONDS / 0.01)):
        if request.transport is None or request.transport.is_closing():
            return True
        if released.is_set():
            return False
        await asyncio.sleep(0.01)
    return False


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    error = {"message": message, "type": "invalid_request_error", "code": status}
    return web.json_response({"error": error}, status=status, headers=headers)


def _words(text: str) -> list[str]:
    """The text in chunks of a word each, spaces kept, so that they add up to it."""
    words = text.split(" ")
    return [word if i == 0 else f" {word}" for i, word in enumerate(words)]
