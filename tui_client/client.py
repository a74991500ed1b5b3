"""One ``chat.v1`` connection for a client: hello, request/reply by id, per-session frame
routing, and reconnect with backoff that restores the open sessions. Plain asyncio, no Textual.

Frames are built as the protocol package's dataclasses and encoded by its codec; what the
server sends is handed on as its ``ServerFrame`` TypedDicts. Everything that happens on the
connection is reported to one callback as a :data:`ClientEvent`:

- :class:`Connected` after each successful ``hello`` (``restored`` on a reconnect);
- :class:`Disconnected` when the connection is lost or a connect attempt fails, with the delay
  before the next attempt;
- :class:`Failed` when the client gives up (a refused token: retrying would not help);
- :class:`SessionFrame` for every frame that names an open session (``started``, ``token``,
  ``done``, ``closed``, session errors), in the order the server sent them;
- :class:`SessionRestored` when a session was reopened after a reconnect (``reattached`` when
  a reply that was streaming at the drop goes on streaming);
- :class:`SessionLost` when a session could not be reopened;
- :class:`ServerNotice` for an ``error`` frame that names neither a request nor a session.

Requests raise :class:`ServerError` when the server answers with ``error`` and
:class:`ConnectionLost` when the connection drops before the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.typing import Subprotocol

from service.protocol import codec, frames
from service.protocol.errors import FrameId
from tui_client.affinity import with_affinity

DEFAULT_URL = "ws://127.0.0.1:8765/ws"
CLIENT_NAME = "localchat-tui"


class ClientError(Exception):
    """Base of the errors this module raises."""


class ServerError(ClientError):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(ClientError):
    """The connection is down (or dropped before the reply came)."""


class Unauthenticated(ServerError):
    """The token was refused: reconnecting would not help."""


# ---- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    welcome: frames.WelcomeFrame
    restored: bool  # a reconnect, not the first connection


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str
    retry_in_s: float
    attempt: int  # failed attempts in a row


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


@dataclass(frozen=True, slots=True)
class SessionFrame:
    session: str
    frame: frames.ServerFrame


@dataclass(frozen=True, slots=True)
class SessionRestored:
    session: str
    opened: frames.OpenedFrame
    reattached: bool  # the reply streaming at the drop goes on (tokens follow)


@dataclass(frozen=True, slots=True)
class SessionLost:
    session: str
    reason: str


@dataclass(frozen=True, slots=True)
class ServerNotice:
    code: str
    message: str


ClientEvent = Connected | Disconnected | Failed | SessionFrame | SessionRestored | SessionLost | ServerNotice


# ---- backoff and session bookkeeping -----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """Exponential backoff with jitter: ``first_s * factor**(attempt-1)``, capped at ``max_s``."""

    first_s: float = 0.5
    factor: float = 2.0
    max_s: float = 15.0
    jitter: float = 0.1  # +- this fraction

    def delay(self, attempt: int) -> float:
        base = min(self.max_s, self.first_s * self.factor ** max(0, attempt - 1))
        return base * (1 + random.uniform(-self.jitter, self.jitter))


@dataclass(slots=True)
class SessionState:
    """What the client must remember to reopen a session after a reconnect."""

    name: str
    chat: str
    model: str
    params: frames.Params
    generating: str | None = None  # the assistant message being streamed
    next_index: int = 0  # the first token index not yet received

    def track(self, frame: frames.ServerFrame) -> None:
        if frame["type"] == "started":
            self.generating, self.next_index = frame["message"], 0
        elif frame["type"] == "token":
            self.next_index = frame["index"] + frame.get("tokens", 1)
        elif frame["type"] == "done":
            self.generating = None


def _parse(raw: str | bytes) -> frames.ServerFrame | None:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return None
    return cast(frames.ServerFrame, obj)


# ---- the client ------------------------------------------------------------------------------


@dataclass
class ChatClient:
    """A ``chat.v1`` client over one WebSocket.

    Either :meth:`connect` once (a script: a dropped connection stays dropped), or :meth:`run`
    (connect, and reconnect with backoff until :meth:`aclose`, restoring open sessions).
    """

    url: str = DEFAULT_URL
    token: str | None = None
    on_event: Callable[[ClientEvent], None] = lambda event: None
    backoff: Backoff = field(default_factory=Backoff)
    open_timeout_s: float = 10.0
    client_name: str = CLIENT_NAME
    affinity: str | None = None  # sent as ?affinity= for a load balancer (tui_client.affinity)

    welcome: frames.WelcomeFrame | None = field(default=None, init=False)
    sessions: dict[str, SessionState] = field(default_factory=dict, init=False)
    _ws: ClientConnection | None = field(default=None, init=False)
    _reader: asyncio.Task[None] | None = field(default=None, init=False)
    _pending: dict[FrameId, asyncio.Future[frames.ServerFrame]] = field(default_factory=dict, init=False)
    _ids: int = field(default=0, init=False)
    _closing: bool = field(default=False, init=False)
    _woken: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _restoring: asyncio.Task[None] | None = field(default=None, init=False)
    _ever_connected: bool = field(default=False, init=False)

    @property
    def connected(self) -> bool:
        return self._ws is not None

    @property
    def reader(self) -> asyncio.Task[None] | None:
        """The task reading the current connection; it ends when the connection does."""
        return self._reader

    def closing(self) -> bool:
        """Whether :meth:`aclose` was called (a method: its value changes across awaits)."""
        return self._closing

    # ---- connecting ------------------------------------------------------------------

    async def connect(self) -> frames.WelcomeFrame:
        """Open the WebSocket and say hello; raises :class:`ConnectionLost` or
        :class:`Unauthenticated`."""
        try:
            ws = await connect(
                with_affinity(self.url, self.affinity),
                subprotocols=[Subprotocol(frames.PROTOCOL)],
                open_timeout=self.open_timeout_s,
                compression=None,
                max_size=None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise ConnectionLost(f"cannot connect to {self.url}: {exc}") from exc
        try:
            hello = frames.Hello(id="hello", token=self.token, client=self.client_name)
            await ws.send(codec.encode_client_frame(hello).decode())
            reply = _parse(await asyncio.wait_for(ws.recv(), self.open_timeout_s))
        except (ConnectionClosed, TimeoutError) as exc:
            await ws.close()
            raise ConnectionLost(f"no welcome from {self.url}: {exc}") from exc
        if reply is None or reply["type"] != "welcome":
            await ws.close()
            if reply is not None and reply["type"] == "error":
                cls = Unauthenticated if reply["code"] == "unauthenticated" else ServerError
                raise cls(reply["code"], reply["message"])
            raise ConnectionLost(f"unexpected first frame from {self.url}: {reply}")
        self._ws, self.welcome = ws, reply
        self._reader = asyncio.create_task(self._read(ws))
        self.on_event(Connected(reply, restored=self._ever_connected))
        self._ever_connected = True
        return reply

    async def run(self) -> None:
        """Stay connected until :meth:`aclose`: reconnect with backoff after every drop and
        reopen the sessions that were open. Returns after ``aclose`` or a refused token."""
        attempt = 0
        while not self.closing():
            try:
                if self._ws is None:
                    await self.connect()
                    self._restoring = asyncio.create_task(self._restore())
                attempt = 0
                assert self._reader is not None
                await self._reader
                reason = "connection closed"
            except Unauthenticated as exc:
                self.on_event(Failed(f"the server refused the token ({exc.message})"))
                return
            except ClientError as exc:
                reason = str(exc)
            if self.closing():
                return
            attempt += 1
            delay = self.backoff.delay(attempt)
            self.on_event(Disconnected(reason, delay, attempt))
            self._woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), delay)

    def retry_now(self) -> None:
        """Cut the current backoff wait short."""
        self._woken.set()

    async def aclose(self) -> None:
        self._closing = True
        self._woken.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    # ---- reading ---------------------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                frame = _parse(raw)
                if frame is not None:
                    self._route(frame)
        except ConnectionClosed:
            pass
        finally:
            if self._ws is ws:
                self._ws = None
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionLost("the connection was lost"))
            self._pending.clear()

    def _route(self, frame: frames.ServerFrame) -> None:
        session = cast(dict[str, Any], frame).get("session")
        state = self.sessions.get(session) if isinstance(session, str) else None
        if state is not None:
            state.track(frame)
        frame_id = cast(dict[str, Any], frame).get("id")
        future = self._pending.pop(frame_id, None) if frame_id is not None else None
        if future is not None and not future.done():
            future.set_result(frame)
        if state is not None:
            if frame["type"] == "closed":
                del self.sessions[state.name]
            # A reopened session is reported as SessionRestored; a request's error, by raising.
            answered_error = future is not None and frame["type"] == "error"
            if frame["type"] != "opened" and not answered_error:
                self.on_event(SessionFrame(state.name, frame))
        elif future is None and frame["type"] == "error":
            self.on_event(ServerNotice(frame["code"], frame["message"]))

    # ---- requests --------------------------------------------------------------------

    def _next_id(self) -> str:
        self._ids += 1
        return f"c{self._ids}"

    async def _send(self, frame: frames.ClientFrame) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionLost("not connected")
        try:
            await ws.send(codec.encode_client_frame(frame).decode())
        except ConnectionClosed as exc:
            raise ConnectionLost("the connection was lost") from exc

    async def request(self, make: Callable[[str], frames.ClientFrame]) -> frames.ServerFrame:
        """Send ``make(id)`` and return the reply that echoes the id; an ``error`` reply
        raises :class:`ServerError`."""
        frame_id = self._next_id()
        future: asyncio.Future[frames.ServerFrame] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = future
        try:
            await self._send(make(frame_id))
            reply = await future
        finally:
            self._pending.pop(frame_id, None)
        if reply["type"] == "error":
            raise ServerError(reply["code"], reply["message"])
        return reply

    async def open(
        self,
        session: str,
        *,
        chat: str | None = None,
        model: str | None = None,
        title: str | None = None,
        params: frames.Params | None = None,
    ) -> frames.OpenedFrame:
        """Open a session on a new chat, or on a stored one (``chat``)."""
        params = params or frames.Params()
        reply = await self.request(
            lambda id: frames.Open(
                id=id,
                session=session,
                chat=chat,
                model=model,
                system=None,
                title=title,
                params=params,
                resume=None,
            )
        )
        opened = cast(frames.OpenedFrame, reply)
        self.sessions[session] = SessionState(session, opened["chat"], opened["model"], params)
        return opened

    async def send(self, session: str, text: str, params: frames.Params | None = None) -> frames.StartedFrame:
        reply = await self.request(
            lambda id: frames.Send(id=id, session=session, text=text, params=params or frames.Params())
        )
        return cast(frames.StartedFrame, reply)

    async def stop(self, session: str) -> None:
        await self._send(frames.Stop(id=None, session=session))

    async def close(self, session: str) -> None:
        """Close a session; while disconnected it is simply forgotten."""
        if self._ws is None:
            self.sessions.pop(session, None)
            return
        await self.request(lambda id: frames.Close(id=id, session=session))
        self.sessions.pop(session, None)

    async def models(self) -> list[frames.ModelBody]:
        reply = await self.request(lambda id: frames.ListModels(id=id))
        return cast(frames.ModelsFrame, reply)["models"]

    async def chats(self, limit: int = 50, before: str | None = None) -> list[frames.ChatSummaryBody]:
        reply = await self.request(lambda id: frames.ListChats(id=id, limit=limit, before=before))
        return cast(frames.ChatsFrame, reply)["chats"]

    async def history(self, chat: str) -> list[frames.MessageBody]:
        reply = await self.request(lambda id: frames.GetHistory(id=id, chat=chat, limit=None, before=None))
        return cast(frames.HistoryFrame, reply)["messages"]

    async def delete(self, chat: str) -> None:
        await self.request(lambda id: frames.Delete(id=id, chat=chat))

    async def ping(self) -> None:
        await self.request(lambda id: frames.Ping(id=id))

    # ---- restoring after a reconnect ---------------------------------------------------

    async def _restore(self) -> None:
        await asyncio.gather(*(self._reopen(state) for state in list(self.sessions.values())))

    async def _reopen(self, state: SessionState) -> None:
        resume = None if state.generating is None else frames.Resume(state.generating, state.next_index)
        try:
            reply = await self.request(
                lambda id: frames.Open(
                    id=id,
                    session=state.name,
                    chat=state.chat,
                    model=state.model,
                    system=None,
                    title=None,
                    params=state.params,
                    resume=resume,
                )
            )
        except ConnectionLost:
            return  # the next reconnect tries again
        except ServerError as exc:
            self.sessions.pop(state.name, None)
            self.on_event(SessionLost(state.name, exc.message))
            return
        opened = cast(frames.OpenedFrame, reply)
        stored = {m["id"] for m in opened["messages"]}
        reattached = state.generating is not None and state.generating not in stored
        if not reattached:
            state.generating = None
        self.on_event(SessionRestored(state.name, opened, reattached))
