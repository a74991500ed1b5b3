"""One open chat: its transcript, status line and prompt, fed by its session's frames."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Static

from service.protocol import frames
from tui_client.client import ChatClient, ClientError
from tui_client.oneshot import title_of
from tui_client.status import ReplyStatus
from tui_client.widgets import STATUS_NOTES, MessageView, PromptInput


@dataclass(slots=True)
class ChatSettings:
    """Per-chat sampling settings; ``None`` = the server's (or the chat's stored) default."""

    temperature: float | None = None
    max_tokens: int | None = None

    @property
    def params(self) -> frames.Params:
        return frames.Params(temperature=self.temperature, max_tokens=self.max_tokens)


class ChatPane(Vertical):
    """A chat session. It opens on the server lazily, with the first prompt as its title."""

    @dataclass
    class Changed(Message):
        """Title, model or status changed (the sidebar and the app's waiters listen)."""

        pane: ChatPane

    @dataclass
    class SendFailed(Message):
        pane: ChatPane
        text: str
        error: str

    def __init__(
        self, client: ChatClient, session: str, *, model: str | None, title: str | None = None
    ) -> None:
        super().__init__(id=f"pane-{session}", classes="chat-pane")
        self.client = client
        self.session = session
        self.model = model
        self.title = title
        self.chat: str | None = None  # the stored chat, once opened
        self.settings = ChatSettings()
        self.status = ReplyStatus()
        self.reply: MessageView | None = None  # the reply being streamed

    # ---- layout ------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield VerticalScroll(classes="transcript")
        yield Static(self.status.line(), classes="status-line")
        with Horizontal(classes="composer"):
            yield PromptInput(
                classes="prompt",
                soft_wrap=True,
                show_line_numbers=False,
                placeholder="Message · Enter sends · Ctrl+J new line · F1 help",
            )
            with Vertical(classes="buttons"):
                yield Button("Send", variant="primary", classes="send")
                yield Button("Stop", variant="error", classes="stop", disabled=True)

    @property
    def transcript(self) -> VerticalScroll:
        return self.query_one(".transcript", VerticalScroll)

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(".prompt", PromptInput)

    @property
    def label(self) -> str:
        return self.title or "New chat"

    @property
    def messages(self) -> list[MessageView]:
        return list(self.transcript.query(MessageView))

    def focus_prompt(self) -> None:
        self.prompt.focus()

    def _changed(self) -> None:
        self.query_one(".status-line", Static).update(self._status_text())
        busy = self.status.busy
        self.query_one(".stop", Button).disabled = not busy
        self.query_one(".send", Button).disabled = busy
        self.post_message(self.Changed(self))

    def _status_text(self) -> str:
        model = self.model or "default model"
        return f"{self.status.line()}  ·  {model}"

    # ---- showing stored messages -----------------------------------------------------------

    async def show_opened(self, opened: frames.OpenedFrame, *, title: str | None = None) -> None:
        """The session is open on ``opened['chat']``: show its stored messages."""
        self.chat, self.model = opened["chat"], opened["model"]
        if title:
            self.title = title
        await self._show_history(opened["messages"])
        self._changed()

    async def _show_history(self, messages: list[frames.MessageBody]) -> None:
        await self.transcript.remove_children()
        views = [
            MessageView(m["role"], m["text"], note=STATUS_NOTES.get(m["status"]))
            for m in messages
            if m["role"] != "system"
        ]
        self.reply = None
        await self.transcript.mount_all(views)
        self.transcript.scroll_end(animate=False)

    async def restored(self, opened: frames.OpenedFrame, reattached: bool) -> None:
        """Reopened after a reconnect: the stored history replaces what was shown, except
        for a reply that goes on streaming (the server replays what was missed into it)."""
        streaming = self.reply if reattached else None
        await self._show_history(opened["messages"])
        if streaming is not None:
            self.reply = MessageView("assistant", "")
            await self.transcript.mount(self.reply)
            await self.reply.write(streaming.text)
            self.status.phase = "generating"
        elif self.status.busy:  # the reply ended while we were away: its stored status says how
            last = opened["messages"][-1] if opened["messages"] else None
            ended = last["status"] if last is not None and last["role"] == "assistant" else "cancelled"
            self.status.phase = {"complete": "done", "cancelled": "stopped"}.get(ended, "failed")
        self._changed()

    def connection_lost(self) -> None:
        self.status.waiting()
        self._changed()

    # ---- sending -------------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        await self.submit(event.text)

    @on(Button.Pressed, ".send")
    async def _send_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        await self.submit(self.prompt.text)

    @on(Button.Pressed, ".stop")
    def _stop_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.stop()

    async def submit(self, text: str) -> None:
        if not text.strip():
            return
        if self.status.busy:
            self.notify("This chat is still replying: Esc stops it.", severity="warning")
            return
        self.prompt.clear()
        await self.begin_reply(text)
        self._send(text)

    async def begin_reply(self, text: str) -> None:
        """Show the prompt and an empty reply that the session's frames will fill."""
        if self.title is None:
            self.title = title_of(text)
        await self.transcript.mount(MessageView("user", text))
        self.reply = MessageView("assistant", "")
        await self.transcript.mount(self.reply)
        self.transcript.scroll_end(animate=False)
        self.status.sending()
        self._changed()

    @work(exclusive=True, exit_on_error=False, group="send")
    async def _send(self, text: str) -> None:
        try:
            if self.chat is None:
                opened = await self.client.open(
                    self.session, model=self.model, title=self.title, params=self.settings.params
                )
                self.chat, self.model = opened["chat"], opened["model"]
            await self.client.send(self.session, text, self.settings.params)
        except ClientError as exc:
            self.post_message(self.SendFailed(self, text, str(exc)))

    @on(SendFailed)
    async def _send_failed(self, event: SendFailed) -> None:
        """Nothing started: take the prompt and its reply back, put the text in the input."""
        event.stop()
        views = self.messages
        for view in views[-2:]:
            await view.remove()
        self.reply = None
        if not self.prompt.text.strip():
            self.prompt.text = event.text
        self.status.phase = "idle"
        self._changed()
        self.notify(f"Not sent: {event.error}", severity="error")

    def stop(self) -> None:
        if self.status.busy and self.chat is not None:
            self._stop()

    @work(exit_on_error=False, group="stop")
    async def _stop(self) -> None:
        try:
            await self.client.stop(self.session)
        except ClientError as exc:
            self.notify(f"Could not stop: {exc}", severity="error")

    # ---- the session's frames --------------------------------------------------------------

    async def on_frame(self, frame: frames.ServerFrame) -> None:
        if frame["type"] == "started":
            self.status.started(frame)
        elif frame["type"] == "token":
            self.status.token(frame)
            if self.reply is not None:
                await self.reply.write(frame["text"])
                self.transcript.scroll_end(animate=False)
        elif frame["type"] == "done":
            self.status.done(frame)
            if self.reply is not None:
                await self.reply.finish(STATUS_NOTES.get(frame["reason"]))
            self.reply = None
            if frame["reason"] == "error" and "error" in frame:
                self.notify(f"The reply failed: {frame['error']['message']}", severity="error")
        elif frame["type"] == "error":
            self.notify(f"{frame['code']}: {frame['message']}", severity="error")
        self._changed()
