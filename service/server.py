"""The chat server: shared state of all connections, and the ``websockets`` server itself.

``ChatServer.serve()`` listens on one port for both the WebSocket endpoint ``/ws``
(subprotocol ``chat.v1``) and the plain HTTP endpoints of :mod:`service.http`. Each
connection runs in :class:`service.connection.Connection`; the generations they start
are tracked here so that shutdown, deletion and reattachment after a dropped
connection can reach them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.typing import Subprotocol

from service import http
from service.access import AccessPolicy
from service.config import ServiceSettings
from service.connection import Connection
from service.engine.types import FinishReason, GenerationResult
from service.generation import Generation
from service.metrics import CancelCause, Metrics
from service.model_pool import ModelPool
from service.protocol import frames
from service.protocol.frames import PROTOCOL
from service.revocations import watch_revocations
from service.session import chat_key
from service.store.records import Completion, User, parse_id
from service.store.store import Store

log = logging.getLogger(__name__)

SERVER_NAME = "localchat/0.1"
CHAT_V1 = Subprotocol(PROTOCOL)

_STORED_STATUS = {
    FinishReason.STOP: "complete",
    FinishReason.LENGTH: "complete",
    FinishReason.CANCELLED: "cancelled",
    FinishReason.ERROR: "error",
}


def completion(result: GenerationResult) -> Completion:
    """What the database keeps of a finished generation."""
    return Completion(
        text=result.text,
        token_ids=result.token_ids,
        status=_STORED_STATUS[result.reason],
        prompt_tokens=result.prompt_tokens,
        cached_tokens=result.cached_tokens,
        completion_tokens=result.completion_tokens,
        queued_ms=result.queued_ms,
        ttft_ms=result.ttft_ms,
        total_ms=result.total_ms,
        tokens_per_s=result.tokens_per_s,
        error=result.error,
    )


def _select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Accept ``chat.v1`` when offered; a client that offers none is served all the same."""
    return CHAT_V1 if CHAT_V1 in offered else None


class ChatServer:
    def __init__(self, settings: ServiceSettings, store: Store, models: ModelPool, local_user: User) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self.name = SERVER_NAME
        self.local_user = local_user
        self.metrics = Metrics(
            queue_depth=lambda: sum(e.stats.waiting for e in self.models.loaded()),
            running=lambda: sum(e.stats.running for e in self.models.loaded()),
            pending_writes=lambda: self.store.pending_writes,
            unsettled=lambda: sum(e.stats.unsettled_chats for e in self.models.loaded()),
        )
        # Every frame the server sends passes here first (tests validate them against schema/).
        self.frame_observer: Callable[[Mapping[str, Any]], None] | None = None
        self.access = AccessPolicy.build(
            host=settings.server.host,
            allowed_hosts=settings.server.allowed_hosts,
            allowed_origins=settings.server.allowed_origins,
        )
        self._generations: dict[UUID, Generation] = {}
        self.draining = False
        self._connections: dict[ServerConnection, Connection] = {}
        self._changed = asyncio.Event()  # pulsed when a connection closes or a generation starts
        self._server: Server | None = None
        self._closing: set[asyncio.Task[None]] = set()  # connections being closed by the server

    # ---- serving -------------------------------------------------------------------------

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Server]:
        s = self.settings.server
        async with serve(
            self._handler,
            s.host,
            s.port,
            select_subprotocol=_select_subprotocol,
            process_request=http.process_request(self),
            max_size=s.max_frame_bytes,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            server_header=SERVER_NAME,
            # Token frames are a few bytes: deflate costs more CPU per frame than it saves.
            compression=None,
        ) as server:
            self._server = server
            watch = None
            if s.auth == "token":
                watch = asyncio.create_task(
                    watch_revocations(self.store, self._connected_user_ids, self.end_user_sessions),
                    name="revocation-watch",
                )
            try:
                yield server
            finally:
                if watch is not None:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
                await self.shutdown()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    @property
    def generation_count(self) -> int:
        """Generations running or being stored."""
        return len(self._generations)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds, re-checked whenever a connection closes or a
        generation starts (for tests and benchmarks: no polling)."""
        while not predicate():
            await self._changed.wait()

    async def wait_connections(self, count: int) -> None:
        await self.wait_until(lambda: self.connection_count <= count)

    async def _handler(self, ws: ServerConnection) -> None:
        connection = Connection(self, ws)
        self._connections[ws] = connection
        self.metrics.connections.inc()
        try:
            await connection.run()
        finally:
            del self._connections[ws]
            self.metrics.connections.dec()
            self._pulse()

    async def drain(self) -> None:
        """Stop accepting connections and new generations; give the running ones up to
        ``shutdown_grace_s`` to finish (then :meth:`shutdown` cancels and stores the rest)."""
        self.draining = True
        if self._server is not None:
            self._server.server.close()  # stop listening; open connections stay
        running = [asyncio.ensure_future(g.done.wait()) for g in self._generations.values()]
        if running:
            log.info(
                "letting %d generation(s) finish (at most %.0f s)",
                len(running),
                self.settings.server.shutdown_grace_s,
            )
            _, pending = await asyncio.wait(running, timeout=self.settings.server.shutdown_grace_s)
            for waiter in pending:
                waiter.cancel()

    async def shutdown(self) -> None:
        """Cancel every generation and wait until each result is stored."""
        running = list(self._generations.values())
        for generation in running:
            generation.cancel(CancelCause.SHUTDOWN)
        if running:
            await asyncio.gather(*(g.done.wait() for g in running))

    async def idle(self) -> None:
        """Wait until no generation is running and every result is stored."""
        while self._generations:
            await asyncio.gather(*(g.done.wait() for g in list(self._generations.values())))

    # ---- shared state --------------------------------------------------------------------

    def _connected_user_ids(self) -> set[UUID]:
        return {c.user.id for c in self._connections.values() if c.user is not None}

    def end_user_sessions(self, user_id: UUID) -> None:
        """The user's token was revoked: close their connections (4401) and cancel their
        generations, including those waiting for a reconnect that can no longer happen."""
        for connection in self._connections.values():
            if connection.user is not None and connection.user.id == user_id:
                task = asyncio.create_task(connection.end_revoked())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        for generation in self._generations.values():
            if generation.user_id == user_id:
                generation.cancel(CancelCause.REVOKED)

    async def authenticate(self, token: str | None) -> User | None:
        if self.settings.server.auth == "none":
            return self.local_user
        if token is None:
            return None
        return await self.store.user_for_token(token)

    def limits(self) -> frames.Limits:
        s = self.settings.server
        return frames.Limits(
            max_frame_bytes=s.max_frame_bytes,
            max_sessions=s.max_sessions,
            max_tokens=s.max_tokens,
            hello_timeout_s=s.hello_timeout_s,
        )

    def track(self, generation: Generation) -> None:
        self._generations[generation.message_id] = generation
        self._pulse()

    def detached_generation(self, message: str, user_id: UUID, chat_id: UUID) -> Generation | None:
        """A running generation of this user's chat that no session holds, by message id."""
        message_id = parse_id(message)
        generation = None if message_id is None else self._generations.get(message_id)
        if (
            generation is None
            or generation.attached
            or generation.result is not None
            or generation.user_id != user_id
            or generation.chat_id != chat_id
        ):
            return None
        return generation

    async def store_result(self, generation: Generation, result: GenerationResult) -> None:
        try:
            await self.store.finish_message(generation.message_id, completion(result))
        finally:
            self._generations.pop(generation.message_id, None)

    async def forget_chat(self, user_id: UUID, chat_id: UUID) -> None:
        """The chat was deleted: stop its generations and drop its KV caches."""
        doomed = [g for g in self._generations.values() if g.chat_id == chat_id and g.user_id == user_id]
        for generation in doomed:
            generation.cancel(CancelCause.CLOSE)
        await asyncio.gather(*(g.done.wait() for g in doomed))
        for engine in self.models.loaded():
            engine.forget(chat_key(user_id, chat_id))

    async def ready(self) -> str | None:
        """Why the service is not ready, or ``None`` when it is."""
        if not self.models.ready:
            return "the default model is not loaded"
        try:
            await self.store.ping()
        except Exception as exc:
            return f"database unreachable: {exc}"
        return None
