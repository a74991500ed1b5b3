"""A TCP relay a test can cut and restore: one process loses its database while others keep it.

Stopping PostgreSQL cuts every client at once; a replica that cannot reach the database while
the others still can (a network partition) needs the cut on its own path. :meth:`cut` closes
every relayed connection and refuses new ones until :meth:`restore`; the listening port stays
the same throughout, so the client's DSN does not change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class TcpRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.open = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Drop every relayed connection, and refuse new ones until :meth:`restore`."""
        self.open = False
        for writer in list(self._writers):
            writer.transport.abort()

    def restore(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers.difference_update((writer, up_writer))
            writer.transport.abort()
            up_writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@asynccontextmanager
async def tcp_relay(target_host: str, target_port: int) -> AsyncIterator[TcpRelay]:
    relay = TcpRelay(target_host, target_port)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()
