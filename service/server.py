"""The chat server: the chat core and the transports wired together on one port.

``ChatServer.serve()`` runs uvicorn on one port with the ASGI application of
:mod:`service.transports.asgi`: the WebSocket endpoint ``/ws`` (subprotocol ``chat.v1``,
carried by uvicorn's implementation on the ``websockets`` library's sans-I/O protocol),
the page and the plain HTTP endpoints, and the OpenAI-compatible API under ``/v1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from service.access import AccessPolicy
from service.config import ServiceSettings
from service.core.chats import ChatCore
from service.core.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from service.core.metrics import Metrics
from service.core.reply import Reply
from service.engine.types import GenerationResult
from service.model_pool import ModelPool
from service.revocations import watch_revocations
from service.store.records import User, parse_id
from service.store.store import Store
from service.transports.asgi import Gateway
from service.transports.http import pages
from service.transports.http.routes import plain_routes
from service.transports.openai.routes import openai_routes
from service.transports.ws.connection import Connection
from service.transports.ws.endpoint import WebSocketEndpoint

log = logging.getLogger(__name__)

SERVER_NAME = "localchat/0.1"
_CLOSE_CONNECTIONS_S = 5  # at shutdown, how long open connections get to close


class _ClientFaultsAreInfo(logging.Filter):
    """uvicorn logs a client's invalid UTF-8 as an error with a traceback; it is the client's
    fault (answered with close 1007), so it is logged as one line at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith("Invalid UTF-8"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True


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
            reused=lambda: {
                "shared": sum(e.stats.shared_tokens for e in self.models.loaded()),
                "forked": sum(e.stats.forked_tokens for e in self.models.loaded()),
            },
        )
        # Every frame the server sends passes here first (tests validate them against schema/).
        self.frame_observer: Callable[[Mapping[str, Any]], None] | None = None
        self.access = AccessPolicy.build(
            host=settings.server.host,
            allowed_hosts=settings.server.allowed_hosts,
            allowed_origins=settings.server.allowed_origins,
        )
        self.core = ChatCore(
            settings.server,
            store,
            models,
            self.metrics,
            local_user,
            on_change=self._pulse,
            record=lambda reply, result: self.store_result(reply, result),
        )
        self._changed = asyncio.Event()  # pulsed when a connection closes or a reply starts
        self._uvicorn: uvicorn.Server | None = None
        self._closing: set[asyncio.Task[None]] = set()  # connections being closed by the server
        self.websockets = WebSocketEndpoint(
            self,
            self.access,
            lambda: self.port,
            settings.server.max_connections,
            on_change=self._pulse,
            on_count=self.metrics.connections.inc,
        )
        http = Starlette(
            routes=[
                Mount("/v1", routes=openai_routes(self.core, settings.server)),
                *plain_routes(self.core, settings.server),
                *pages.routes(
                    ready=self.ready,
                    metrics=self.metrics.exposition,
                    metrics_type=METRICS_CONTENT_TYPE,
                    instance=settings.replica.instance_name,
                ),
                Route("/{path:path}", pages.not_found, methods=pages.ANY_METHOD),
            ]
        )
        self.app = Gateway(self.access, http, self.websockets)

    # ---- serving -------------------------------------------------------------------------

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[ChatServer]:
        s = self.settings.server
        config = uvicorn.Config(
            self.app,
            host=s.host,
            port=s.port,
            http="h11",
            ws="websockets-sansio",
            lifespan="off",
            ws_max_size=s.max_frame_bytes,
            ws_ping_interval=s.ping_interval_s,
            ws_ping_timeout=s.ping_timeout_s,
            # Token frames are a few bytes: deflate costs more CPU per frame than it saves.
            ws_per_message_deflate=False,
            server_header=False,
            headers=[("Server", SERVER_NAME)],
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=_CLOSE_CONNECTIONS_S,
        )
        config.load()
        uvicorn_log = logging.getLogger("uvicorn.error")
        client_faults = _ClientFaultsAreInfo()
        uvicorn_log.addFilter(client_faults)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup()
        self._uvicorn = server
        watch = None
        if s.auth == "token":
            watch = asyncio.create_task(
                watch_revocations(self.store, self._connected_user_ids, self.end_user_sessions),
                name="revocation-watch",
            )
        try:
            yield self
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch
            await self.shutdown()
            # uvicorn would close open WebSockets with 1012 (service restart); the contract says
            # 1001 (going away), after every reply is stored.
            await asyncio.gather(*(c.end_going_away() for c in self.websockets.connections))
            await server.shutdown()
            uvicorn_log.removeFilter(client_faults)

    @property
    def port(self) -> int:
        assert self._uvicorn is not None
        return int(self._uvicorn.servers[0].sockets[0].getsockname()[1])

    @property
    def connection_count(self) -> int:
        return len(self.websockets.connections)

    @property
    def connections(self) -> list[Connection]:
        return list(self.websockets.connections)

    @property
    def generation_count(self) -> int:
        """Replies running or being stored."""
        return len(self.core.replies)

    @property
    def _generations(self) -> dict[UUID, Reply]:
        return self.core.replies.running

    @property
    def draining(self) -> bool:
        return self.core.draining

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` holds, re-checked whenever a connection closes or a
        reply starts (for tests and benchmarks: no polling)."""
        while not predicate():
            await self._changed.wait()

    async def wait_connections(self, count: int) -> None:
        await self.wait_until(lambda: self.connection_count <= count)

    async def drain(self) -> None:
        """Stop accepting connections and new replies; give the running ones up to
        ``shutdown_grace_s`` to finish (then :meth:`shutdown` cancels and stores the rest)."""
        if self._uvicorn is not None:
            for listener in self._uvicorn.servers:
                listener.close()  # stop listening; open connections stay
        await self.core.drain()

    async def shutdown(self) -> None:
        """Cancel every reply and wait until each result is stored."""
        await self.core.shutdown()

    async def idle(self) -> None:
        """Wait until no reply is running and every result is stored."""
        await self.core.replies.idle()

    # ---- shared state --------------------------------------------------------------------

    def _connected_user_ids(self) -> set[UUID]:
        """Users with an open connection or a running reply (an API request's, say)."""
        connected = {c.user.id for c in self.websockets.connections if c.user is not None}
        return connected | {r.user_id for r in self.core.replies.running.values()}

    def end_user_sessions(self, user_id: UUID) -> None:
        """The user's token was revoked: close their connections (4401) and cancel their
        replies, including those waiting for a reconnect that can no longer happen."""
        for connection in self.websockets.connections:
            if connection.user is not None and connection.user.id == user_id:
                task = asyncio.create_task(connection.end_revoked())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        self.core.revoke(user_id)

    async def authenticate(self, token: str | None) -> User | None:
        return await self.core.authenticate(token)

    def detached_generation(self, message: str, user_id: UUID, chat_id: UUID) -> Reply | None:
        """A running reply of this user's chat that no session holds, by message id."""
        return self.core.replies.detached(parse_id(message), user_id, chat_id)

    async def store_result(self, reply: Reply, result: GenerationResult) -> None:
        """Store a finished reply of a chat (the core calls it; tests wrap it)."""
        await self.core.record(reply, result)

    async def ready(self) -> str | None:
        """Why the service is not ready, or ``None`` when it is."""
        return await self.core.ready()
