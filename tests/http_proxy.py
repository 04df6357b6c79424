"""An HTTP forward proxy on 127.0.0.1, standing for a deployment's egress proxy (what
HTTPS_PROXY names): it carries plain-HTTP requests on to their host, and keeps each URL."""

from __future__ import annotations

from typing import Any, Self

import aiohttp
from aiohttp import web
from fake_server import serve

# Headers for one hop only; and those the proxy's own client undoes (it decompresses).
NOT_CARRIED = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "upgrade",
     "transfer-encoding", "content-length", "content-encoding", "host"}
)  # fmt: skip


def _carried(headers: Any) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() not in NOT_CARRIED}


class ForwardProxy:
    def __init__(self) -> None:
        self.carried: list[str] = []  # the URL of each request, in order
        self.url = ""

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._carry)
        self._runner, port = await serve(app)
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._runner.cleanup()

    async def _carry(self, request: web.Request) -> web.Response:
        """A request in absolute form (`GET http://host/path`), sent on as it came."""
        self.carried.append(str(request.url))
        async with (
            aiohttp.ClientSession() as session,
            session.request(
                request.method, request.url, headers=_carried(request.headers),
                data=await request.read(), allow_redirects=False,
            ) as answer,
        ):  # fmt: skip
            body = await answer.read()
            return web.Response(body=body, status=answer.status, headers=_carried(answer.headers))
