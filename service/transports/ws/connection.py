"""One ``chat.v1`` connection: a reader task that parses client frames and routes each to
the chat core in order, and a writer task that sends the outbox. Many sessions share the
connection; each has at most one reply running, whose frames the reply's sink queues in
the outbox. The turns themselves are the core's (:mod:`service.core.chats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, assert_never

from service.config import ServerSettings
from service.core.chats import ChatCore
from service.core.metrics import CancelCause
from service.errors import (
    Busy,
    ChatGone,
    ContextOverflow,
    Draining,
    InvalidParams,
    ModelError,
    NotFound,
    QueueFull,
    StoreUnavailable,
    WriteBacklogFull,
)
from service.protocol import codec, frames
from service.protocol.errors import CloseCode, ErrorCode, FrameId, ProtocolError
from service.store.records import User, parse_id
from service.transports.ws.outbox import Outbox, OutboxClosed
from service.transports.ws.session import Session, SessionSink, message_body
from service.transports.ws.socket import Socket, SocketClosed

log = logging.getLogger(__name__)

_CLOSE_DRAIN_S = 1.0  # how long a close waits for the frames queued before it (the error explaining it)


class _Closed(Exception):
    """The reader decided to close the connection."""


class Host(Protocol):
    """What a connection needs of the server that accepted it."""

    @property
    def core(self) -> ChatCore: ...

    @property
    def name(self) -> str: ...

    @property
    def frame_observer(self) -> Callable[[Mapping[str, Any]], None] | None:
        """Sees every frame before it is sent (tests validate them against schema/)."""
        ...


class Connection:
    def __init__(self, host: Host, ws: Socket) -> None:
        self.host = host
        self.core = host.core
        self.limits: ServerSettings = host.core.settings
        self.ws = ws
        self.outbox = Outbox(self.limits.max_queued_frames)
        self.user: User | None = None
        self.sessions: dict[str, Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writer: asyncio.Task[None] | None = None

    async def run(self) -> None:
        writer = self._writer = asyncio.create_task(self._write(), name="connection-writer")
        try:
            await self._read()
        finally:
            self._drop_sessions()
            self.outbox.close()
            # Let queued frames (an error before a close, say) leave; a dead peer ends it at once.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, timeout=5)
            writer.cancel()

    # ---- tasks ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write(self) -> None:
        """Send the outbox in order. A send blocks while the client is not reading (the
        outbox coalesces token text meanwhile); one blocked past ``send_timeout_s`` drops
        the connection, which cancels its generations and stores their replies."""
        timeout_s = self.limits.send_timeout_s
        try:
            while True:
                frame = await self.outbox.get()
                observer = self.host.frame_observer
                if observer is not None:
                    observer(frame)
                async with asyncio.timeout(timeout_s):
                    await self.ws.send(codec.encode(frame))
        except TimeoutError:
            log.warning("dropping a connection that read nothing for %.0f s", timeout_s)
            self.ws.transport.abort()
        except (OutboxClosed, SocketClosed):
            pass

    async def _read(self) -> None:
        limits = self.limits
        deadline = asyncio.get_running_loop().time() + limits.hello_timeout_s
        try:
            while self.user is None:
                remaining = deadline - asyncio.get_running_loop().time()
                try:
                    message = await asyncio.wait_for(self.ws.recv(), timeout=max(remaining, 0))
                except TimeoutError:
                    await self._close(CloseCode.HELLO_TIMEOUT, "no hello in time")
                    return
                await self._handle(message)
            while True:
                await self._handle(await self.ws.recv())
                if self.outbox.overflowed:
                    await self._close(CloseCode.POLICY_VIOLATION, "too many unread frames")
                    return
        except (SocketClosed, _Closed):
            return

    async def end_revoked(self) -> None:
        """The user's token was revoked while connected: say so, then close with 4401 (the
        core cancels the user's replies)."""
        self.outbox.put(frames.error(ErrorCode.UNAUTHENTICATED, "this user's token was revoked"))
        await self._close(CloseCode.UNAUTHENTICATED, "token revoked")

    async def end_going_away(self) -> None:
        """The server is stopping (its replies are stored): close with 1001, so a client
        reconnects, through a load balancer to another replica."""
        await self._close(CloseCode.GOING_AWAY, "the server is shutting down")

    async def _close(self, code: CloseCode, reason: str) -> None:
        self.outbox.close()
        # The frames queued before the close (`error unauthenticated` before 4401, say) leave
        # first; a client that reads nothing gets the close all the same, a moment later.
        if self._writer is not None:
            await asyncio.wait({self._writer}, timeout=_CLOSE_DRAIN_S)
        await self.ws.close(code, reason)

    # ---- frames --------------------------------------------------------------------------

    async def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self._close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
            raise _Closed
        received = time.perf_counter()
        try:
            frame = codec.parse_client_frame(message)
            await self._dispatch(frame, received)
        except ProtocolError as exc:
            self.outbox.put(frames.error(exc.code, exc.message, id=exc.id, session=exc.session))
            if exc.close is not None:
                await self._close(exc.close, exc.message)
                raise _Closed from None
        except StoreUnavailable as exc:
            # The database is away, or writes still wait for it (service.store.durable): the
            # client may try again; too many waiting writes is a full queue.
            log.info("%s refused: %s", type(frame).__name__, exc)
            if isinstance(exc, WriteBacklogFull):
                code, text = ErrorCode.OVERLOADED, str(exc)
            else:  # the details (addresses, drivers' errors) stay in the log and /readyz
                code, text = ErrorCode.INTERNAL, "the database is unavailable; try again shortly"
            self.outbox.put(frames.error(code, text, id=frame.id, session=getattr(frame, "session", None)))
        except tuple(_REFUSED) as exc:
            code = next(c for kind, c in _REFUSED.items() if isinstance(exc, kind))
            text = _SESSION_CHAT_GONE if isinstance(exc, ChatGone) else str(exc)
            self.outbox.put(frames.error(code, text, id=frame.id, session=getattr(frame, "session", None)))
        except (SocketClosed, _Closed):
            raise
        except Exception:
            log.exception("frame handling failed")
            self.outbox.put(frames.error(ErrorCode.INTERNAL, "internal error; see the server log"))

    async def _dispatch(self, frame: frames.ClientFrame, received: float) -> None:
        if isinstance(frame, frames.Hello):
            await self._hello(frame)
            return
        if self.user is None:
            raise ProtocolError(ErrorCode.UNAUTHENTICATED, "send hello first", id=frame.id)
        match frame:
            case frames.Open():
                await self._open(frame, self.user)
            case frames.Send():
                await self._send(frame, received)
            case frames.Stop():
                self.core.stop(self._session(frame.session, frame.id).conversation)
            case frames.Close():
                self._close_session(frame)
            case frames.ListModels():
                self.outbox.put(frames.models(frame.id, models=self.core.models.describe()))
            case frames.ListChats():
                await self._chats(frame, self.user)
            case frames.GetHistory():
                await self._history(frame, self.user)
            case frames.Delete():
                await self.core.delete_chat(self.user, frame.chat)
                self.outbox.put(frames.deleted(frame.id, chat=frame.chat))
            case frames.Ping():
                self.outbox.put(frames.pong(frame.id))
            case _:
                assert_never(frame)

    async def _hello(self, frame: frames.Hello) -> None:
        user = await self.core.authenticate(frame.token)
        if user is None:
            raise ProtocolError(
                ErrorCode.UNAUTHENTICATED,
                "missing or invalid token",
                id=frame.id,
                close=CloseCode.UNAUTHENTICATED,
            )
        self.user = user
        limits = self.limits
        self.outbox.put(
            frames.welcome(
                frame.id,
                server=self.host.name,
                user=frames.UserBody(id=str(user.id), name=user.name),
                models=self.core.models.describe(),
                limits=frames.Limits(
                    max_frame_bytes=limits.max_frame_bytes,
                    max_sessions=limits.max_sessions,
                    max_tokens=limits.max_tokens,
                    hello_timeout_s=limits.hello_timeout_s,
                ),
            )
        )

    def _session(self, name: str, frame_id: FrameId | None) -> Session:
        session = self.sessions.get(name)
        if session is None or session.closing:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SESSION, f"no open session {name!r}", id=frame_id, session=name
            )
        return session

    # ---- session frames ------------------------------------------------------------------

    async def _open(self, frame: frames.Open, user: User) -> None:
        name = frame.session
        if name in self.sessions:
            raise ProtocolError(
                ErrorCode.SESSION_EXISTS, f"session {name!r} is open", id=frame.id, session=name
            )
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError(
                ErrorCode.LIMIT,
                f"at most {self.limits.max_sessions} sessions per connection",
                id=frame.id,
                session=name,
            )
        conversation, stored = await self.core.open(
            user,
            chat=frame.chat,
            model=frame.model,
            title=frame.title,
            system=frame.system,
            params=frame.params,
        )
        self.sessions[name] = Session(name, conversation)
        self.core.metrics.sessions.inc()
        self.outbox.put(
            frames.opened(
                frame.id,
                session=name,
                chat=str(conversation.chat_id),
                model=conversation.model_id,
                messages=[message_body(m) for m in stored],
            )
        )
        if frame.resume is not None:
            reply = self.core.resume(conversation, frame.resume.message)
            if reply is not None:
                reply.attach(SessionSink(self.outbox, name), frame.resume.index)

    async def _send(self, frame: frames.Send, received: float) -> None:
        session = self._session(frame.session, frame.id)
        reply = await self.core.send(session.conversation, frame.text, frame.params, sent_at=received)
        stream = reply.stream
        self.outbox.put(
            frames.started(
                frame.id,
                session=session.name,
                message=str(reply.message_id),
                prompt_tokens=stream.prompt_tokens,
                cached_tokens=stream.cached_tokens,
                queue_position=stream.queue_position,
            )
        )
        reply.attach(SessionSink(self.outbox, session.name))

    def _close_session(self, frame: frames.Close) -> None:
        session = self._session(frame.session, frame.id)
        session.closing = True
        reply = session.conversation.reply
        if reply is not None and not reply.done.is_set():
            reply.cancel(CancelCause.CLOSE)

        async def finish() -> None:
            if reply is not None:
                await reply.done.wait()
            self.sessions.pop(session.name, None)
            self.core.metrics.sessions.dec()
            self.outbox.put(frames.closed(frame.id, session=session.name))

        self._spawn(finish())

    def _drop_sessions(self) -> None:
        grace = self.limits.disconnect_grace_s
        for session in self.sessions.values():
            reply = session.conversation.reply
            if reply is not None and session.conversation.generating:
                # Equal to the sink this session attached (a REST reader of the reply stays).
                reply.detach(grace, SessionSink(self.outbox, session.name))
            self.core.metrics.sessions.dec()
        self.sessions.clear()

    # ---- history frames ------------------------------------------------------------------

    async def _chats(self, frame: frames.ListChats, user: User) -> None:
        store = self.core.store
        before = None
        if frame.before is not None:
            before = parse_id(frame.before)
            if before is None:
                self.outbox.put(frames.chats(frame.id, chats=[]))
                return
        found = await store.list_chats(user.id, limit=frame.limit, before=before)
        self.outbox.put(
            frames.chats(
                frame.id,
                chats=[
                    frames.ChatSummaryBody(
                        chat=str(c.id),
                        title=c.title,
                        model=c.model,
                        updated_at=c.updated_at.isoformat(),
                        messages=c.messages,
                    )
                    for c in found
                ],
            )
        )

    async def _history(self, frame: frames.GetHistory, user: User) -> None:
        store = self.core.store
        chat_id = parse_id(frame.chat)
        before = None if frame.before is None else parse_id(frame.before)
        stored = None
        if chat_id is not None:
            stored = await store.messages(user.id, chat_id, limit=frame.limit, before=before)
        if stored is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such chat", id=frame.id)
        if frame.before is not None and before is None:
            stored = []  # no message has such an id: nothing is older, as for an unknown message id
        self.outbox.put(frames.history(frame.id, chat=frame.chat, messages=[message_body(m) for m in stored]))


# How the chat core's refusals read in chat.v1.
_REFUSED: dict[type[Exception], ErrorCode] = {
    NotFound: ErrorCode.NOT_FOUND,
    ChatGone: ErrorCode.NOT_FOUND,
    Busy: ErrorCode.BUSY,
    Draining: ErrorCode.OVERLOADED,
    QueueFull: ErrorCode.OVERLOADED,
    ContextOverflow: ErrorCode.LIMIT,
    InvalidParams: ErrorCode.BAD_PARAMS,
    ModelError: ErrorCode.MODEL_UNAVAILABLE,
}
_SESSION_CHAT_GONE = "this session's chat was deleted"
