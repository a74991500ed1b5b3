"""Snapshots of the main screen mid-stream, with two chats, and of the help screen. The app
runs offline; fixed frames are posted to it as if they came from the service."""

from __future__ import annotations

from textual.pilot import Pilot

from service.protocol import frames
from tests.tui import helpers
from tests.tui.snapshot import assert_snapshot, screen_text
from tui_client.app import ChatApp, ClientEventMessage
from tui_client.chat_pane import ChatPane
from tui_client.client import SessionFrame
from tui_client.settings import ClientSettings

SIZE = (100, 30)
MODEL = "tiny"
REPLY = (
    "**localchat** runs a chat model on your own machine.\n\n"
    "- several chats stream at once\n"
    "- `Esc` stops a reply\n"
)


def offline_app() -> ChatApp:
    return ChatApp(ClientSettings(url="ws://127.0.0.1:9/ws", model=MODEL), connect=False)


def post(app: ChatApp, pane: ChatPane, frame: frames.ServerFrame) -> None:
    app.post_message(ClientEventMessage(SessionFrame(pane.session, frame)))


def stream(app: ChatApp, pane: ChatPane, text: str, *, first: int = 0) -> None:
    """``started`` then one token frame per word of ``text``."""
    if first == 0:
        post(
            app,
            pane,
            frames.started(
                None, session=pane.session, message="m1", prompt_tokens=24, cached_tokens=0, queue_position=0
            ),
        )
    for n, word in enumerate(text.split(" ")):
        post(app, pane, frames.token(pane.session, first + n, word if n == 0 else " " + word))


def finish(app: ChatApp, pane: ChatPane, tokens: int) -> None:
    post(
        app,
        pane,
        frames.done(
            session=pane.session,
            message="m1",
            reason="stop",
            usage={"prompt_tokens": 24, "cached_tokens": 16, "completion_tokens": tokens},
            timing={"queued_ms": 0.0, "ttft_ms": 21.0, "total_ms": 300.0, "tokens_per_s": 48.0},
        ),
    )


async def settle(app: ChatApp, pilot: Pilot[None], pane: ChatPane, tokens: int) -> None:
    """Wait until the pane has handled ``tokens`` tokens and shows all the text it got."""
    await app.wait_until(lambda: pane.status.tokens >= tokens)
    await helpers.settle(pilot, lambda: all(view.rendered for view in pane.messages))


async def test_main_screen_mid_stream() -> None:
    """One chat with a reply half streamed: Markdown so far, status `generating`."""
    app = offline_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = app.current
        assert pane is not None
        pane.status.clock = lambda: 100.0  # no tok/s from the wall clock
        await pane.begin_reply("What is localchat?")
        half = REPLY[: REPLY.index("- `Esc`")]
        stream(app, pane, half)
        await settle(app, pilot, pane, len(half.split(" ")))
        assert_snapshot(app, "main_mid_stream")


async def test_main_screen_with_two_chats() -> None:
    """Two chats in the sidebar; the second shown with a finished reply and its timing."""
    app = offline_app()
    async with app.run_test(size=SIZE) as pilot:
        first = app.current
        assert first is not None
        first.status.clock = lambda: 100.0
        await first.begin_reply("Write a haiku about terminals")
        stream(app, first, "Green text on black glass")
        second = await app.new_chat()
        second.status.clock = lambda: 100.0
        await second.begin_reply("What is localchat?")
        stream(app, second, REPLY)
        finish(app, second, len(REPLY.split(" ")))
        await app.wait_until(lambda: second.status.phase == "done")
        await settle(app, pilot, second, len(REPLY.split(" ")))
        await settle(app, pilot, first, 5)
        assert_snapshot(app, "main_two_chats")


async def test_help_screen() -> None:
    """F1 lists the keys."""
    app = offline_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f1")
        await pilot.pause()
        assert_snapshot(app, "help")


async def test_a_blank_line_inside_a_fenced_code_block_survives_streaming() -> None:
    """A reply whose code block holds blank lines, streamed in token-sized pieces (the blank line
    arriving on its own and split across frames), shows them while streaming and once done."""
    pieces = ["Here", ":\n\n", "```", "python", "\n", "x", " =", " 1", "\n", "\n", "y = 2", "\n", "    \n"]
    pieces += ["z", " = 3", "\n```", "\n"]
    app = offline_app()
    async with app.run_test(size=SIZE) as pilot:
        pane = app.current
        assert pane is not None
        pane.status.clock = lambda: 100.0
        await pane.begin_reply("Show code")
        stream(app, pane, "")  # started
        for n, piece in enumerate(pieces):
            post(app, pane, frames.token(pane.session, n, piece))
            await settle(app, pilot, pane, n + 1)
            if piece == "y = 2":
                assert _code_lines(app, "x = 1", 3) == ["x = 1", "", "y = 2"]
        finish(app, pane, len(pieces))
        await app.wait_until(lambda: pane.status.phase == "done")
        await helpers.settle(pilot, lambda: all(view.rendered for view in pane.messages))
        assert _code_lines(app, "x = 1", 5) == ["x = 1", "", "y = 2", "", "z = 3"]


def _code_lines(app: ChatApp, first: str, count: int) -> list[str]:
    """``count`` screen lines of the transcript from the one holding ``first``, stripped."""
    lines = [line.split("▕", 1)[-1].strip() for line in screen_text(app).splitlines()]
    start = lines.index(first)
    return lines[start : start + count]
