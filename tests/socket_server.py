"""Loopback servers for tests: a raw TCP one whose upstream must speak raw bytes
(malformed HTTP, a strict `Expect` handshake, an answer scripted per request, a host
that must never be reached; a subclass answers each connection in `_serve`), and
`serving`, an aiohttp application for the length of a block; and `exchange`, the raw
client to go with them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Self

from aiohttp import web


class SocketServer:
    """`async with` it: listening on 127.0.0.1 at `port` (`url`) until the block ends."""

    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.url = ""

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    """An aiohttp application served on 127.0.0.1 for the block: its port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes to 127.0.0.1:`port`; everything it sends back until it closes
    the connection (requests say `Connection: close`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
