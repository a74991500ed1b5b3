"""Small widgets of a chat: one message, the multi-line prompt."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.app import ComposeResult
from textual.message import Message
from textual.widgets import Label, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownStream

from service.protocol import frames

NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")
"""Keys that insert a newline in the prompt (Enter sends). Terminals send ctrl+j for
shift+enter unless they report modifiers, so ctrl+j is the one that always works."""

STATUS_NOTES: dict[str, str] = {
    "cancelled": "stopped",
    "error": "failed",
    "interrupted": "interrupted (the service restarted mid-reply)",
}


class MessageView(Static):
    """One message: a role line, the text (Markdown for the assistant), a note when the
    reply did not complete. An assistant reply can be streamed into with :meth:`write`."""

    def __init__(self, role: frames.MessageRole, text: str = "", *, note: str | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.text = text
        self._note = note
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield Label({"user": "You", "assistant": "Assistant", "system": "System"}[self.role], classes="role")
        if self.role == "assistant":
            yield Markdown(self.text, classes="body")
        else:
            yield Static(self.text, classes="body", markup=False)
        yield Label(self._note or "", classes="note" if self._note else "note hidden")

    async def on_unmount(self) -> None:
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    @property
    def body(self) -> Markdown:
        return self.query_one(".body", Markdown)

    async def write(self, fragment: str) -> None:
        """Append streamed text (assistant only)."""
        self.text += fragment
        if self._stream is None:
            self._stream = Markdown.get_stream(self.body)
        await self._stream.write(fragment)

    async def finish(self, note: str | None = None) -> None:
        """The reply ended: flush the stream; ``note`` marks a reply that did not complete."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        if self.role == "assistant" and self.body.source != self.text:
            await self.body.update(self.text)
        self.set_note(note)

    def set_note(self, note: str | None) -> None:
        self._note = note
        label = self.query_one(".note", Label)
        label.update(note or "")
        label.set_class(not note, "hidden")

    @property
    def rendered(self) -> bool:
        """Whether the widget shows all of :attr:`text` (streams render in the background)."""
        return self.role != "assistant" or self.body.source == self.text


class PromptInput(TextArea):
    """The prompt: Enter sends (posts :class:`PromptInput.Submitted`), ctrl+j inserts a newline."""

    @dataclass
    class Submitted(Message):
        prompt: PromptInput
        text: str

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)
