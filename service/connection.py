"""One WebSocket connection: a reader task that handles client frames in order, and a
writer task that sends the outbox. Many sessions share the connection; each has at most
one generation running, whose frames the generation itself queues in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, assert_never

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from service.engine.engine import Engine
from service.engine.tokenizer import ChatMessage
from service.engine.types import SamplingParams
from service.errors import (
    ChatGone,
    ContextOverflow,
    ModelError,
    QueueFull,
    StoreUnavailable,
    WriteBacklogFull,
)
from service.generation import Generation, Sink
from service.metrics import CancelCause
from service.outbox import Outbox, OutboxClosed
from service.protocol import codec, frames
from service.protocol.errors import CloseCode, ErrorCode, FrameId, ProtocolError
from service.session import Session, common_prefix, conversation, message_body
from service.store.records import Completion, User, parse_id

if TYPE_CHECKING:
    from service.server import ChatServer

log = logging.getLogger(__name__)

_CLOSE_DRAIN_S = 1.0  # how long a close waits for the frames queued before it (the error explaining it)


class _Closed(Exception):
    """The reader decided to close the connection."""


class Connection:
    def __init__(self, server: ChatServer, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.outbox = Outbox(server.settings.server.max_queued_frames)
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
        timeout_s = self.server.settings.server.send_timeout_s
        try:
            while True:
                frame = await self.outbox.get()
                if self.server.frame_observer is not None:
                    self.server.frame_observer(frame)
                async with asyncio.timeout(timeout_s):
                    await self.ws.send(codec.encode(frame), text=True)
        except TimeoutError:
            log.warning("dropping a connection that read nothing for %.0f s", timeout_s)
            self.ws.transport.abort()
        except (OutboxClosed, ConnectionClosed):
            pass

    async def _read(self) -> None:
        limits = self.server.settings.server
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
            async for message in self.ws:
                await self._handle(message)
                if self.outbox.overflowed:
                    await self._close(CloseCode.POLICY_VIOLATION, "too many unread frames")
                    return
        except (ConnectionClosed, _Closed):
            return

    async def end_revoked(self) -> None:
        """The user's token was revoked while connected: say so, then close with 4401 (the
        server cancels the user's generations)."""
        self.outbox.put(frames.error(ErrorCode.UNAUTHENTICATED, "this user's token was revoked"))
        await self._close(CloseCode.UNAUTHENTICATED, "token revoked")

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
            session = getattr(frame, "session", None)
            self.outbox.put(frames.error(code, text, id=frame.id, session=session))
        except (ConnectionClosed, _Closed):
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
                await self._send(frame, self.user, received)
            case frames.Stop():
                session = self._session(frame.session, frame.id)
                if session.generation is not None:
                    session.generation.cancel(CancelCause.STOP)
            case frames.Close():
                self._close_session(frame)
            case frames.ListModels():
                self.outbox.put(frames.models(frame.id, models=self.server.models.describe()))
            case frames.ListChats():
                await self._chats(frame, self.user)
            case frames.GetHistory():
                await self._history(frame, self.user)
            case frames.Delete():
                await self._delete(frame, self.user)
            case frames.Ping():
                self.outbox.put(frames.pong(frame.id))
            case _:
                assert_never(frame)

    async def _hello(self, frame: frames.Hello) -> None:
        user = await self.server.authenticate(frame.token)
        if user is None:
            raise ProtocolError(
                ErrorCode.UNAUTHENTICATED,
                "missing or invalid token",
                id=frame.id,
                close=CloseCode.UNAUTHENTICATED,
            )
        self.user = user
        self.outbox.put(
            frames.welcome(
                frame.id,
                server=self.server.name,
                user=frames.UserBody(id=str(user.id), name=user.name),
                models=self.server.models.describe(),
                limits=self.server.limits(),
            )
        )

    def _session(self, name: str, frame_id: FrameId | None) -> Session:
        session = self.sessions.get(name)
        if session is None or session.closing:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SESSION, f"no open session {name!r}", id=frame_id, session=name
            )
        return session

    def _sampling(
        self, params: frames.Params, frame_id: FrameId | None, session: str, model_id: str | None = None
    ) -> SamplingParams:
        """Validate ranges (``bad_params``) and fill the defaults: the model's, then the server's."""
        limits = self.server.settings.server
        given = params.given()
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        given.setdefault("max_tokens", limits.default_max_tokens)
        if model_id is not None:
            for name, value in self.server.models.sampling_defaults(model_id).params().items():
                given.setdefault(name, value)
        try:
            sampling = SamplingParams(**given)
            sampling.validate()
        except (TypeError, ValueError) as exc:
            raise ProtocolError(ErrorCode.BAD_PARAMS, str(exc), id=frame_id, session=session) from None
        if sampling.max_tokens > limits.max_tokens:
            raise ProtocolError(
                ErrorCode.BAD_PARAMS,
                f"max_tokens must be at most {limits.max_tokens}",
                id=frame_id,
                session=session,
            )
        return sampling

    # ---- session frames ------------------------------------------------------------------

    async def _open(self, frame: frames.Open, user: User) -> None:
        name, store = frame.session, self.server.store
        if name in self.sessions:
            raise ProtocolError(
                ErrorCode.SESSION_EXISTS, f"session {name!r} is open", id=frame.id, session=name
            )
        if len(self.sessions) >= self.server.settings.server.max_sessions:
            raise ProtocolError(
                ErrorCode.LIMIT,
                f"at most {self.server.settings.server.max_sessions} sessions per connection",
                id=frame.id,
                session=name,
            )
        self._sampling(frame.params, frame.id, name)
        if frame.chat is not None:
            chat_id = parse_id(frame.chat)
            chat = None if chat_id is None else await store.get_chat(user.id, chat_id)
            if chat is None:
                raise ProtocolError(ErrorCode.NOT_FOUND, "no such chat", id=frame.id, session=name)
            model_id = frame.model or chat.model
            params = frame.params.over(codec.parse_params(chat.params))
            engine = await self._engine(model_id, frame.id, name)
            stored = await store.messages(user.id, chat.id) or []
        else:
            model_id = frame.model or self.server.models.default_id
            engine = await self._engine(model_id, frame.id, name)
            params = frame.params
            chat, stored = await store.create_chat(
                user.id, model=model_id, title=frame.title, system=frame.system, params=params.given()
            )
        messages, token_ids = conversation(stored)
        session = Session(
            name=name,
            chat_id=chat.id,
            user_id=user.id,
            model_id=model_id,
            engine=engine,
            params=params,
            messages=messages,
            token_ids=token_ids,
        )
        self.sessions[name] = session
        self.server.metrics.sessions.inc()
        self.outbox.put(
            frames.opened(
                frame.id,
                session=name,
                chat=str(chat.id),
                model=model_id,
                messages=[message_body(m) for m in stored],
            )
        )
        if frame.resume is not None:
            self._resume(session, frame.resume)

    def _resume(self, session: Session, resume: frames.Resume) -> None:
        generation = self.server.detached_generation(resume.message, session.user_id, session.chat_id)
        if generation is None:
            return  # finished (its text is in `messages`) or never existed
        session.generation = generation
        generation.attach(Sink(self.outbox, session.name), resume.index)
        self._spawn(self._track(session, generation))

    async def _engine(self, model_id: str, frame_id: FrameId | None, session: str) -> Engine:
        try:
            return await self.server.models.engine(model_id)
        except ModelError as exc:
            raise ProtocolError(ErrorCode.MODEL_UNAVAILABLE, str(exc), id=frame_id, session=session) from None

    async def _send(self, frame: frames.Send, user: User, received: float) -> None:
        session = self._session(frame.session, frame.id)
        session.fold_finished()  # a send read before _track ran must still see the last reply
        if session.generating:
            raise ProtocolError(
                ErrorCode.BUSY, "this session is already generating", id=frame.id, session=session.name
            )
        sampling = self._sampling(frame.params.over(session.params), frame.id, session.name, session.model_id)
        engine = session.engine
        messages = [*session.messages, ChatMessage(role="user", content=frame.text)]
        prompt = engine.tokenizer.next_turn_ids(session.token_ids, messages)
        if len(prompt) + 1 > engine.max_len:
            raise ProtocolError(
                ErrorCode.LIMIT,
                f"the conversation ({len(prompt)} tokens) does not fit the context of {engine.max_len}",
                id=frame.id,
                session=session.name,
            )
        if self.server.draining:
            raise ProtocolError(
                ErrorCode.OVERLOADED, "the server is shutting down", id=frame.id, session=session.name
            )
        if engine.stats.waiting >= engine.settings.max_waiting:
            raise ProtocolError(
                ErrorCode.OVERLOADED, "the queue is full; try again", id=frame.id, session=session.name
            )
        offset = common_prefix(session.token_ids, prompt)
        message_id = uuid.uuid4()
        try:
            await self.server.store.begin_turn(
                session.chat_id,
                user_text=frame.text,
                user_token_ids=prompt[offset:],
                prompt_offset=offset,
                assistant_id=message_id,
            )
        except ChatGone:
            raise ProtocolError(
                ErrorCode.NOT_FOUND, "this session's chat was deleted", id=frame.id, session=session.name
            ) from None
        session.messages = messages
        session.token_ids = prompt
        try:
            stream = engine.submit(session.key, prompt, sampling)
        except (QueueFull, ContextOverflow, ValueError) as exc:
            code = ErrorCode.OVERLOADED if isinstance(exc, QueueFull) else ErrorCode.LIMIT
            await self.server.store.finish_message(message_id, _failed_completion(str(exc), len(prompt)))
            raise ProtocolError(code, str(exc), id=frame.id, session=session.name) from None
        self.outbox.put(
            frames.started(
                frame.id,
                session=session.name,
                message=str(message_id),
                prompt_tokens=stream.prompt_tokens,
                cached_tokens=stream.cached_tokens,
                queue_position=stream.queue_position,
            )
        )
        generation = Generation(
            message_id=message_id,
            chat_id=session.chat_id,
            user_id=user.id,
            prompt_ids=prompt,
            stream=stream,
            sink=Sink(self.outbox, session.name),
            metrics=self.server.metrics,
            on_finish=self.server.store_result,
            sent_at=received,
        )
        session.generation = generation
        self.server.track(generation)
        self._spawn(self._track(session, generation))

    async def _track(self, session: Session, generation: Generation) -> None:
        await generation.done.wait()
        if session.generation is generation:
            session.fold_finished()

    def _close_session(self, frame: frames.Close) -> None:
        session = self._session(frame.session, frame.id)
        session.closing = True
        generation = session.generation
        if generation is not None and not generation.done.is_set():
            generation.cancel(CancelCause.CLOSE)

        async def finish() -> None:
            if generation is not None:
                await generation.done.wait()
            self.sessions.pop(session.name, None)
            self.server.metrics.sessions.dec()
            self.outbox.put(frames.closed(frame.id, session=session.name))

        self._spawn(finish())

    def _drop_sessions(self) -> None:
        grace = self.server.settings.server.disconnect_grace_s
        for session in self.sessions.values():
            if session.generating:
                session.generation.detach(grace)  # type: ignore[union-attr]
            self.server.metrics.sessions.dec()
        self.sessions.clear()

    # ---- history frames ------------------------------------------------------------------

    async def _chats(self, frame: frames.ListChats, user: User) -> None:
        store = self.server.store
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
        store = self.server.store
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

    async def _delete(self, frame: frames.Delete, user: User) -> None:
        store = self.server.store
        chat_id = parse_id(frame.chat)
        if chat_id is None or not await store.delete_chat(user.id, chat_id):
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such chat", id=frame.id)
        await self.server.forget_chat(user.id, chat_id)
        self.outbox.put(frames.deleted(frame.id, chat=frame.chat))


def _failed_completion(message: str, prompt_tokens: int) -> Completion:
    return Completion(
        text="",
        token_ids=[],
        status="error",
        prompt_tokens=prompt_tokens,
        cached_tokens=0,
        completion_tokens=0,
        queued_ms=0.0,
        ttft_ms=None,
        total_ms=0.0,
        tokens_per_s=0.0,
        error=message,
    )
