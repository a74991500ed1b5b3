"""What the TUI tests share: an app on a live server, waiting on it, the stored messages."""

from __future__ import annotations

from collections.abc import Callable

from textual.pilot import Pilot

from service.protocol import frames
from service.server import ChatServer
from tests.service.client import TIMEOUT_S, Client
from tests.service.conftest import ws_url
from tui_client.app import ChatApp
from tui_client.chat_pane import ChatPane
from tui_client.client import Backoff, ChatClient, ClientEvent
from tui_client.settings import ClientSettings

FAST_BACKOFF = Backoff(first_s=0.02, max_s=0.2)
LONG = {"temperature": 0.0, "max_tokens": 200}
SHORT = {"temperature": 0.0, "max_tokens": 8}
SIZE = (110, 36)


def live_app(
    server: ChatServer, *, temperature: float | None = None, max_tokens: int | None = None
) -> tuple[ChatApp, list[ClientEvent]]:
    """An app connected to ``server`` (fast reconnects), and the log of its client's events."""
    client = ChatClient(ws_url(server), backoff=FAST_BACKOFF)
    settings = ClientSettings(url=ws_url(server), temperature=temperature, max_tokens=max_tokens)
    app = ChatApp(settings, client=client)
    events: list[ClientEvent] = []
    post = client.on_event

    def record(event: ClientEvent) -> None:
        events.append(event)
        post(event)

    client.on_event = record
    return app, events


def configure(pane: ChatPane, params: dict[str, float]) -> None:
    pane.settings.temperature = params["temperature"]
    pane.settings.max_tokens = int(params["max_tokens"])


def current(app: ChatApp) -> ChatPane:
    pane = app.current
    assert pane is not None
    return pane


async def settle(pilot: Pilot[None], predicate: Callable[[], bool]) -> None:
    """Let the app render (Markdown streams render in the background) until ``predicate``
    holds: a bounded number of pilot pauses, then one more for the layout."""
    for _ in range(200):
        if predicate():
            break
        await pilot.pause()
    await pilot.pause()
    assert predicate()


async def until(app: ChatApp, predicate: Callable[[], bool]) -> None:
    await app.wait_until(predicate, TIMEOUT_S)


async def connected(app: ChatApp) -> None:
    await until(app, lambda: app.connection_state == "connected")


async def stored(server: ChatServer, chat: str) -> list[frames.MessageBody]:
    """The chat's messages as the service stored them (after every reply was stored)."""
    await server.idle()
    client = await Client.connect(ws_url(server))
    try:
        await client.hello()
        reply = await client.request({"type": "history", "chat": chat})
        messages: list[frames.MessageBody] = reply["messages"]
        return messages
    finally:
        await client.close()


async def chats(server: ChatServer) -> list[frames.ChatSummaryBody]:
    """The stored chats, newest first."""
    client = await Client.connect(ws_url(server))
    try:
        await client.hello()
        listed: list[frames.ChatSummaryBody] = (await client.request({"type": "chats"}))["chats"]
        return listed
    finally:
        await client.close()


def shown(pane: ChatPane) -> list[tuple[str, str]]:
    """The pane's transcript as (role, text)."""
    return [(view.role, view.text) for view in pane.messages]
