"""The full-screen client: a sidebar of open chats, one pane per chat, dialogs for the rest.

All network work runs in workers (the client's own reader, and one worker per request); what
happens on the connection reaches the app as :class:`ClientEventMessage` and is routed to the
chat pane its session names. Tests wait on :meth:`ChatApp.wait_until`, which re-checks its
condition whenever the app handled something.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, ContentSwitcher, Footer, Label, ListItem, ListView, Static

from service.protocol import frames
from tui_client.affinity import affinity_key
from tui_client.chat_pane import ChatPane
from tui_client.client import (
    ChatClient,
    ClientError,
    ClientEvent,
    Connected,
    Disconnected,
    Failed,
    ServerNotice,
    SessionFrame,
    SessionLost,
    SessionRestored,
)
from tui_client.screens import (
    HelpScreen,
    ModelScreen,
    PastChatsScreen,
    RenameScreen,
    SettingsDefaults,
    SettingsResult,
    SettingsScreen,
    Updated,
)
from tui_client.settings import ClientSettings

_CHAT_ACTIONS = frozenset(
    {"new_chat", "close_chat", "rename", "stop", "past_chats", "pick_model", "chat_settings", "cycle"}
)


@dataclass
class ClientEventMessage(Message):
    """Something happened on the connection (posted by the client's callback)."""

    event: ClientEvent


class ChatApp(App[None]):
    CSS_PATH = Path(__file__).with_name("app.tcss")
    TITLE = "localchat"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+n", "new_chat", "New", priority=True),
        Binding("ctrl+w", "close_chat", "Close", priority=True),
        Binding("f2", "rename", "Rename"),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+o", "past_chats", "Past chats", priority=True),
        Binding("ctrl+l", "pick_model", "Model", priority=True),
        Binding("ctrl+t", "chat_settings", "Settings", priority=True),
        Binding("ctrl+pagedown", "cycle(1)", "Next chat", show=False, priority=True),
        Binding("ctrl+pageup", "cycle(-1)", "Previous chat", show=False, priority=True),
        Binding("f1", "help", "Help"),
    ]

    def __init__(
        self,
        settings: ClientSettings | None = None,
        *,
        client: ChatClient | None = None,
        connect: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings or ClientSettings()
        self.client = client or ChatClient(
            self.settings.url, token=self.settings.token, affinity=affinity_key(self.settings.token)
        )
        self.client.on_event = self._post_event
        self.connect = connect
        self.models: list[frames.ModelBody] = []
        self.limits: frames.Limits | None = None  # from welcome
        self.default_model = self.settings.model
        self.panes: dict[str, ChatPane] = {}
        self._sessions = (f"s{n}" for n in itertools.count(1))
        self._change = asyncio.Event()
        self.connection_state = "connecting"

    def _post_event(self, event: ClientEvent) -> None:
        self.post_message(ClientEventMessage(event))

    # ---- layout ------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Static("", id="banner", classes="hidden")
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Label("Chats", classes="sidebar-title")
                yield ListView(id="chat-list")
                yield Button("Past chats", id="past-chats")
            yield ContentSwitcher(id="panes")
        yield Footer()

    async def on_mount(self) -> None:
        await self.new_chat()
        if self.connect:
            self._run_client()
        else:
            self.connection_state = "offline"

    async def on_unmount(self) -> None:
        await self.client.aclose()

    @work(exclusive=True, exit_on_error=False, group="client")
    async def _run_client(self) -> None:
        await self.client.run()

    # ---- waiting on the app (tests) ------------------------------------------------------------

    def _pulse(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Wait until ``predicate()`` holds, re-checked after each event the app handled."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._change.wait()

    # ---- chats ----------------------------------------------------------------------------------

    @property
    def current(self) -> ChatPane | None:
        shown = self.query_one("#panes", ContentSwitcher).current
        return next((p for p in self.panes.values() if p.id == shown), None)

    async def new_chat(self, *, model: str | None = None, title: str | None = None) -> ChatPane:
        session = next(self._sessions)
        pane = ChatPane(self.client, session, model=model or self.default_model, title=title)
        # --temperature / --max-tokens are every new chat's settings until Ctrl+T changes them.
        pane.settings.temperature, pane.settings.max_tokens = (
            self.settings.temperature,
            self.settings.max_tokens,
        )
        self.panes[session] = pane
        await self.query_one("#panes", ContentSwitcher).mount(pane)
        await self.query_one("#chat-list", ListView).append(
            ListItem(Label(pane.label), id=f"item-{session}", classes="chat-item")
        )
        self.show(pane)
        return pane

    def show(self, pane: ChatPane) -> None:
        self.query_one("#panes", ContentSwitcher).current = pane.id
        items = self.query_one("#chat-list", ListView)
        index = list(self.panes).index(pane.session)
        if items.index != index:
            items.index = index
        pane.focus_prompt()
        self._pulse()

    async def close_chat(self, pane: ChatPane) -> None:
        if pane.chat is not None:
            self._close_session(pane.session)
        del self.panes[pane.session]
        await self.query_one(f"#item-{pane.session}", ListItem).remove()
        await pane.remove()
        if not self.panes:
            await self.new_chat()
        else:
            self.show(list(self.panes.values())[-1])

    @work(exit_on_error=False, group="close")
    async def _close_session(self, session: str) -> None:
        try:
            await self.client.close(session)
        except ClientError as exc:
            self.notify(f"Could not close the chat: {exc}", severity="error")

    async def reopen(self, chat: frames.ChatSummaryBody) -> None:
        """Open a stored chat in a pane (or show the pane that has it)."""
        for pane in self.panes.values():
            if pane.chat == chat["chat"]:
                self.show(pane)
                return
        current = self.current
        if current is not None and current.chat is None and not current.messages:
            pane = current  # reuse the empty new chat
            pane.title = chat["title"]
        else:
            pane = await self.new_chat(title=chat["title"])
        self._reopen(pane, chat)

    @work(exit_on_error=False, group="reopen")
    async def _reopen(self, pane: ChatPane, chat: frames.ChatSummaryBody) -> None:
        try:
            opened = await self.client.open(pane.session, chat=chat["chat"], params=pane.settings.params)
        except ClientError as exc:
            self.notify(f"Could not open the chat: {exc}", severity="error")
            return
        self.post_message(self.Reopened(pane, opened, chat["title"]))

    @dataclass
    class Reopened(Message):
        pane: ChatPane
        opened: frames.OpenedFrame
        title: str | None

    @on(Reopened)
    async def _reopened(self, event: Reopened) -> None:
        await event.pane.show_opened(event.opened, title=event.title)
        self.show(event.pane)

    # ---- connection events ----------------------------------------------------------------------

    @on(ClientEventMessage)
    async def _client_event(self, message: ClientEventMessage) -> None:
        event = message.event
        if isinstance(event, SessionFrame):
            pane = self.panes.get(event.session)
            if pane is not None:
                await pane.on_frame(event.frame)
        elif isinstance(event, Connected):
            self.connection_state = "connected"
            self._banner(None)
            self.models = event.welcome["models"]
            self.limits = event.welcome["limits"]
            if event.restored:
                self.notify("Reconnected.")
        elif isinstance(event, Disconnected):
            self.connection_state = "disconnected"
            self._banner(
                f"Connection lost ({event.reason}). Reconnecting in {event.retry_in_s:.1f} s "
                f"(attempt {event.attempt})…"
            )
            for pane in self.panes.values():
                pane.connection_lost()
        elif isinstance(event, Failed):
            self.connection_state = "failed"
            self._banner(f"Not connected: {event.reason}. Restart with the right --token.")
            self.notify(event.reason, severity="error")
        elif isinstance(event, SessionRestored):
            pane = self.panes.get(event.session)
            if pane is not None:
                await pane.restored(event.opened, event.reattached)
        elif isinstance(event, SessionLost):
            pane = self.panes.get(event.session)
            if pane is not None:
                pane.chat = None
            self.notify(f"A chat could not be reopened: {event.reason}", severity="error")
        elif isinstance(event, ServerNotice):
            self.notify(f"{event.code}: {event.message}", severity="error")
        self._pulse()

    def _banner(self, text: str | None) -> None:
        banner = self.query_one("#banner", Static)
        banner.update(text or "")
        banner.set_class(text is None, "hidden")

    @on(ChatPane.Changed)
    def _pane_changed(self, event: ChatPane.Changed) -> None:
        pane = event.pane
        if pane.session in self.panes:
            item = self.query_one(f"#item-{pane.session}", ListItem)
            marker = "● " if pane.status.busy else ""
            item.query_one(Label).update(marker + pane.label)
        self._pulse()

    @on(Updated)
    def _dialog_updated(self) -> None:
        self._pulse()

    @on(ListView.Highlighted, "#chat-list")
    def _chat_highlighted(self, event: ListView.Highlighted) -> None:
        if event.item is not None and event.item.id is not None:
            pane = self.panes.get(event.item.id.removeprefix("item-"))
            if pane is not None and pane is not self.current:
                self.show(pane)

    @on(Button.Pressed, "#past-chats")
    def _past_pressed(self) -> None:
        self.action_past_chats()

    # ---- actions ------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The chat actions wait while a dialog is open."""
        return not (isinstance(self.screen, ModalScreen) and action in _CHAT_ACTIONS)

    async def action_new_chat(self) -> None:
        await self.new_chat()

    async def action_close_chat(self) -> None:
        if self.current is not None:
            await self.close_chat(self.current)

    def action_stop(self) -> None:
        if self.current is not None:
            self.current.stop()

    def action_cycle(self, step: int) -> None:
        panes = list(self.panes.values())
        if self.current is not None and len(panes) > 1:
            self.show(panes[(panes.index(self.current) + step) % len(panes)])

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_rename(self) -> None:
        pane = self.current
        if pane is None:
            return

        def renamed(title: str | None) -> None:
            if title:
                pane.title = title
                pane.post_message(ChatPane.Changed(pane))

        self.push_screen(RenameScreen(pane.label), renamed)

    def action_chat_settings(self) -> None:
        pane = self.current
        if pane is None:
            return

        def saved(result: SettingsResult | None) -> None:
            if result is not None:
                pane.settings.temperature, pane.settings.max_tokens = result.temperature, result.max_tokens
                self.notify("Chat settings saved: they apply from the next prompt.")

        defaults = SettingsDefaults(
            model=pane.model or self._default_model_id(),
            max_tokens=frames.DEFAULT_MAX_TOKENS,
            max_tokens_limit=self.limits["max_tokens"] if self.limits is not None else None,
        )
        self.push_screen(SettingsScreen(pane.settings.temperature, pane.settings.max_tokens, defaults), saved)

    def _default_model_id(self) -> str | None:
        return next((m["id"] for m in self.models if m["default"]), None)

    def action_past_chats(self) -> None:
        async def chosen(chat: frames.ChatSummaryBody | None) -> None:
            if chat is not None:
                await self.reopen(chat)

        self.push_screen(PastChatsScreen(self.client), chosen)

    def action_pick_model(self) -> None:
        self._pick_model()

    @work(exclusive=True, exit_on_error=False, group="models")
    async def _pick_model(self) -> None:
        try:
            self.models = await self.client.models()
        except ClientError as exc:
            if not self.models:
                self.notify(f"Could not list models: {exc}", severity="error")
                return
        pane = self.current
        choice = await self.push_screen_wait(ModelScreen(self.models, pane.model if pane else None))
        if choice is None or pane is None:
            return
        if any(m["id"] == choice and m.get("chat") is False for m in self.models):
            self.notify(
                f"{choice} is a base model, not a chat model: it continues a plain "
                "'User: … / Assistant: …' transcript rather than following instructions."
            )
        self.default_model = choice
        if pane.chat is None:
            pane.model = choice
            pane.post_message(ChatPane.Changed(pane))
        elif pane.status.busy:
            self.notify("Stop the reply before switching models.", severity="warning")
        else:  # reopen the session on the same chat with the other model
            try:
                await self.client.close(pane.session)
                opened = await self.client.open(
                    pane.session, chat=pane.chat, model=choice, params=pane.settings.params
                )
            except ClientError as exc:
                self.notify(f"Could not switch models: {exc}", severity="error")
                return
            self.post_message(self.Reopened(pane, opened, pane.title))
