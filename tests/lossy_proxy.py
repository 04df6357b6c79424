"""A TCP proxy on 127.0.0.1 in front of Redis that loses chosen replies.

Once for each pattern it is given, the first request holding that pattern reaches Redis
and runs, and then the connection is cut as its reply comes back: the client sees what a
network or server failure at that moment shows it, a write whose reply was lost, and its
retry sends it again. An error reply (NOSCRIPT, say) is passed on and keeps the pattern
armed, as nothing was written. With `down_after_loss`, Redis then looks gone (every new
connection is closed at once) until `back()`: the retry fails too, and the caller sees
an outage after a write that was made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from redis.asyncio import Redis

from storage.connection import Resilience, open_redis

SERVICES = Resilience()  # how the service's clients retry, by default


class LossyProxy:
    def __init__(
        self, redis_url: str, lose_after: list[bytes], *, down_after_loss: bool = False
    ) -> None:
        target = urlsplit(redis_url)
        self._target = (target.hostname or "127.0.0.1", target.port or 6379)
        self._auth, self._path = target.netloc.rpartition("@")[0], target.path
        self._armed = list(lose_after)
        self.lost: list[bytes] = []  # the patterns whose reply was lost, in order
        self._down_after_loss = down_after_loss
        self.down = False  # every new connection is closed at once
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.Task, list[asyncio.StreamWriter]] = {}  # connection: ends

    @property
    def url(self) -> str:
        assert self._server is not None, "started"
        port = self._server.sockets[0].getsockname()[1]
        auth = f"{self._auth}@" if self._auth else ""
        return f"redis://{auth}127.0.0.1:{port}{self._path}"

    def cut(self) -> None:
        """Redis is gone: the open connections close, and every new one until `back`."""
        self.down = True
        for end in [end for ends in self._open.values() for end in ends]:
            end.close()

    def back(self) -> None:
        """Redis is there again."""
        self.down = False

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in [writer for ends in self._open.values() for writer in ends]:
            writer.close()  # its connection's task ends on its own
        await asyncio.gather(*self._open, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        if self.down:
            client_out.close()
            return
        connection = asyncio.current_task()
        self._open[connection] = [client_out]
        server_in, server_out = await asyncio.open_connection(*self._target)
        self._open[connection].append(server_out)
        cutting: list[bytes] = []  # the pattern whose request went on, until its reply
        try:
            async with asyncio.TaskGroup() as both_ways:
                both_ways.create_task(self._requests(client_in, server_out, cutting))
                both_ways.create_task(self._replies(server_in, client_out, cutting))
        except* ConnectionError:
            pass
        finally:
            del self._open[connection]
            for writer in (client_out, server_out):
                writer.close()
                with suppress(ConnectionError):
                    await writer.wait_closed()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cutting: list[bytes]
    ) -> None:
        while data := await reader.read(65536):
            if not cutting:
                cutting += [p for p in self._armed if p in data][:1]
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _replies(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cutting: list[bytes]
    ) -> None:
        while data := await reader.read(65536):
            if cutting and not data.startswith(b"-"):
                self._armed.remove(cutting[0])
                self.lost.append(cutting[0])
                if self._down_after_loss:  # and every other connection with it
                    self.cut()
                raise ConnectionResetError("a reply lost on its way")
            cutting.clear()
            writer.write(data)
            await writer.drain()
        writer.close()


@asynccontextmanager
async def lossy_redis(
    redis_url: str,
    data_dir: Path,
    lose: list[bytes],
    resilience: Resilience = SERVICES,
    *,
    down_after_loss: bool = False,
) -> AsyncIterator[tuple[Redis, LossyProxy]]:
    """A client whose connection loses the reply to the first request holding each of
    `lose`, after Redis ran it; it retries as the service's clients do (`resilience`)."""
    async with (
        LossyProxy(redis_url, lose, down_after_loss=down_after_loss) as proxy,
        open_redis(redis_url=proxy.url, data_dir=data_dir, resilience=resilience) as redis,
    ):
        yield redis, proxy
