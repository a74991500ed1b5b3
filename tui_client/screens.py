"""The app's dialogs: help, confirm, rename, per-chat settings, model picker, past chats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from service.protocol import frames
from tui_client.client import ChatClient, ClientError

KEYS: list[tuple[str, str]] = [
    ("Enter", "send the prompt"),
    ("Ctrl+J", "new line in the prompt (also Shift+Enter / Alt+Enter if the terminal sends them)"),
    ("Esc", "stop the reply of the current chat (the partial reply stays, marked stopped)"),
    ("Ctrl+N", "new chat"),
    ("Ctrl+W", "close the current chat (it stays in past chats)"),
    ("F2", "rename the current chat"),
    ("Ctrl+PgDn / PgUp", "next / previous chat"),
    ("Ctrl+O", "past chats: Enter reopens and continues one, d deletes it"),
    ("Ctrl+L", "pick the model of the current chat (and of new ones)"),
    ("Ctrl+T", "chat settings: temperature, max tokens"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
]


class Updated(Message):
    """A dialog's content changed (it bubbles to the app, whose waiters re-check)."""


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        width = max(len(k) for k, _ in KEYS)
        lines = "\n".join(f"{k.ljust(width)}  {what}" for k, what in KEYS)
        with Vertical(classes="dialog help"):
            yield Label("Keys", classes="dialog-title")
            yield Static(lines, markup=False)
            yield Label("Esc closes this help.", classes="hint")

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,n", "answer(False)", "No"),
        Binding("y", "answer(True)", "Yes"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog confirm"):
            yield Label(self.question)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Delete", variant="error", id="yes")
                yield Button("Cancel", id="no")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class RenameScreen(ModalScreen[str | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.current = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog rename"):
            yield Label("Rename chat", classes="dialog-title")
            yield Input(self.current, id="title")

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


@dataclass(frozen=True, slots=True)
class SettingsResult:
    temperature: float | None
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class SettingsDefaults:
    """What the service uses for a field the chat leaves empty, as far as the client can know it:
    ``max_tokens`` is the contract's default (``max_tokens_limit`` the service's cap, from
    ``welcome``); the temperature default belongs to the model on the service, which ``chat.v1``
    does not report, so the dialog names the model whose default applies."""

    model: str | None
    max_tokens: int
    max_tokens_limit: int | None


class SettingsScreen(ModalScreen[SettingsResult | None]):
    """Temperature and max tokens of one chat; empty = the service's default, shown in the field."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self, temperature: float | None, max_tokens: int | None, defaults: SettingsDefaults | None = None
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.defaults = defaults or SettingsDefaults(model=None, max_tokens=256, max_tokens_limit=None)

    def compose(self) -> ComposeResult:
        model = f"{self.defaults.model}'s" if self.defaults.model else "the model's"
        cap = self.defaults.max_tokens_limit
        with Vertical(classes="dialog settings"):
            yield Label("Chat settings", classes="dialog-title")
            yield Label("Temperature (0 = greedy; empty = the default)")
            yield Input(
                "" if self.temperature is None else str(self.temperature),
                id="temperature",
                type="number",
                placeholder=f"default: {model} own, set by the service",
            )
            yield Label("Max tokens (empty = the default)" + (f"; at most {cap}" if cap else ""))
            yield Input(
                "" if self.max_tokens is None else str(self.max_tokens),
                id="max_tokens",
                type="integer",
                placeholder=f"default: {self.defaults.max_tokens}",
            )
            yield Label(self._in_force(), id="in-force", classes="hint")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def _in_force(self) -> str:
        temperature = (
            f"temperature {self.temperature:g}" if self.temperature is not None else "the model's temperature"
        )
        tokens = self.max_tokens if self.max_tokens is not None else self.defaults.max_tokens
        return f"In force: {temperature}, up to {tokens} tokens per reply."

    def _result(self) -> SettingsResult | None:
        temperature = self.query_one("#temperature", Input).value.strip()
        max_tokens = self.query_one("#max_tokens", Input).value.strip()
        try:
            t = None if not temperature else float(temperature)
            m = None if not max_tokens else int(max_tokens)
        except ValueError:
            return None
        if (t is not None and t < 0) or (m is not None and m < 1):
            return None
        return SettingsResult(t, m)

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def _save(self) -> None:
        result = self._result()
        if result is None:
            self.notify("Temperature must be a number >= 0, max tokens an integer >= 1.", severity="error")
            return
        self.dismiss(result)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class ModelScreen(ModalScreen[str | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, models: list[frames.ModelBody], current: str | None) -> None:
        super().__init__()
        self.models = models
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog models"):
            yield Label("Model", classes="dialog-title")
            options = [
                Option(
                    f"{m['id']}  ({m['context_length']} ctx"
                    + (", default" if m["default"] else "")
                    + (", loaded" if m["loaded"] else "")
                    + (", base model: plain transcript" if m.get("chat") is False else "")
                    + ")",
                    id=m["id"],
                )
                for m in self.models
            ]
            yield OptionList(*options)

    def on_mount(self) -> None:
        ids = [m["id"] for m in self.models]
        if self.current in ids:
            self.query_one(OptionList).highlighted = ids.index(self.current)

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)


class PastChatsScreen(ModalScreen[frames.ChatSummaryBody | None]):
    """Stored chats, newest first, with a preview of the highlighted one's history.
    Enter reopens it; d deletes it (after a confirmation)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Close"),
        Binding("d,delete", "delete", "Delete"),
        Binding("r", "refresh", "Refresh"),
    ]

    @dataclass
    class Loaded(Message):
        chats: list[frames.ChatSummaryBody]

    @dataclass
    class Previewed(Message):
        chat: str
        messages: list[frames.MessageBody]

    def __init__(self, client: ChatClient) -> None:
        super().__init__()
        self.client = client
        self.chats: list[frames.ChatSummaryBody] = []

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog past"):
            yield Label("Past chats  (Enter reopens · d deletes · Esc closes)", classes="dialog-title")
            with Horizontal():
                yield OptionList(classes="chat-list")
                yield Static("", classes="preview", markup=False)

    def on_mount(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        self._load()

    @work(exclusive=True, exit_on_error=False, group="load")
    async def _load(self) -> None:
        try:
            self.post_message(self.Loaded(await self.client.chats()))
        except ClientError as exc:
            self.notify(f"Could not list chats: {exc}", severity="error")

    @on(Loaded)
    def _loaded(self, event: Loaded) -> None:
        self.chats = event.chats
        options = self.query_one(OptionList)
        options.clear_options()
        options.add_options(
            [
                Option(
                    f"{c['title'] or '(untitled)'}  · {c['messages']} msgs · {c['updated_at'][:16]}",
                    id=c["chat"],
                )
                for c in self.chats
            ]
        )
        if self.chats:
            options.highlighted = 0
            options.focus()
        else:
            self.query_one(".preview", Static).update("No stored chats yet.")
        self.post_message(Updated())

    @on(OptionList.OptionHighlighted)
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        if event.option.id is not None:
            self._preview(event.option.id)

    @work(exclusive=True, exit_on_error=False, group="preview")
    async def _preview(self, chat: str) -> None:
        try:
            self.post_message(self.Previewed(chat, await self.client.history(chat)))
        except ClientError as exc:
            self.notify(f"Could not load the chat: {exc}", severity="error")

    @on(Previewed)
    def _previewed(self, event: Previewed) -> None:
        text = "\n\n".join(f"{m['role']}: {m['text']}" for m in event.messages if m["role"] != "system")
        self.query_one(".preview", Static).update(text or "(no messages)")
        self.post_message(Updated())

    def _selected_chat(self) -> frames.ChatSummaryBody | None:
        index = self.query_one(OptionList).highlighted
        return self.chats[index] if index is not None and index < len(self.chats) else None

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self._selected_chat())

    def action_delete(self) -> None:
        chat = self._selected_chat()
        if chat is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._delete(chat["chat"])

        self.app.push_screen(ConfirmScreen(f"Delete “{chat['title'] or '(untitled)'}” for good?"), answered)

    @work(exit_on_error=False, group="delete")
    async def _delete(self, chat: str) -> None:
        try:
            await self.client.delete(chat)
        except ClientError as exc:
            self.notify(f"Could not delete: {exc}", severity="error")
            return
        self.notify("Chat deleted.")
        self._load()

    def action_cancel(self) -> None:
        self.dismiss(None)
