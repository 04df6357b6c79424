"""The operations server on HTTP_PORT: health, readiness and metrics, and the paths that
adapters mount while they run (Slack's Events API), on one aiohttp server.

- `GET /healthz`: 200 while the process and its event loop live (the loop answers it).
- `GET /readyz`: 200 when every check of `Vitals.readiness` is "ok", else 503; the JSON
  body has each check.
- `GET /metrics`: every metric, in Prometheus text format.

It starts before the model loads, so /healthz answers (and /readyz says "loading")
through a first start's long download.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Self

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from bot.health import READY, Vitals
from bot.metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from adapters.base import HttpHandler

logger = logging.getLogger(__name__)

SHUTDOWN_S = 2.0  # a request still open when the server stops gets this long
IDLE_CLOSE_S = 30.0
"""A connection with no whole request in this long is closed: one kept alive between
scrapes, or one whose request never ends (aiohttp's default, an hour, let such clients
hold a file descriptor each until the process could open no more)."""


class _ClientMistakes(logging.Filter):
    """A request that is not well-formed HTTP (too long, say) is answered 400 and is the
    client's mistake: aiohttp logs each at ERROR, with a traceback, for scanners to fill
    the log with."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, HttpProcessingError)


_CLIENT_MISTAKES = _ClientMistakes()


class OpsServerError(RuntimeError):
    """The server cannot listen; the message names HTTP_PORT."""


class OpsServer:
    """Serves /healthz, /readyz, /metrics and mounted paths on `port` while open."""

    def __init__(
        self, *, vitals: Vitals, metrics: Metrics, port: int, host: str | None = None
    ) -> None:
        self.vitals = vitals
        self.metrics = metrics
        self.port = port
        self.host = host  # None: every interface
        self._mounted: dict[str, HttpHandler] = {}
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        # aiohttp freezes its routes at start; adapters mount theirs later, so one route
        # takes every other path and looks the mounted ones up.
        app.router.add_route("*", "/{path:.*}", self._mounted_path)
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=SHUTDOWN_S, keepalive_timeout=IDLE_CLOSE_S
        )
        logging.getLogger("aiohttp.server").addFilter(_CLIENT_MISTAKES)  # (once, however often)

    async def __aenter__(self) -> Self:
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as error:
            await self._runner.cleanup()
            raise OpsServerError(
                f"cannot serve HTTP_PORT={self.port} ({error.strerror or error}): set HTTP_PORT "
                "to a free port, or to 0 to turn health, readiness and metrics off"
            ) from error
        logger.info("serving /healthz, /readyz and /metrics on port %d", self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()

    def mount(self, path: str, handler: HttpHandler) -> None:
        self._mounted[path] = handler

    def unmount(self, path: str) -> None:
        self._mounted.pop(path, None)

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, request: web.Request) -> web.Response:
        checks = await self.vitals.readiness()
        ready = all(state == READY for state in checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.vitals.refresh()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _mounted_path(self, request: web.Request) -> web.StreamResponse:
        handler = self._mounted.get(request.path)
        if handler is None:
            raise web.HTTPNotFound()
        return await handler(request)
