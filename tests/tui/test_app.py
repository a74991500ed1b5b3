"""The app with Textual's pilot against a real running service."""

from __future__ import annotations

import dataclasses

from textual.widgets import Button, Input, Label, ListItem, OptionList

from service.app import running_service
from service.config import ServiceSettings
from service.engine.models.registry import PreparedModel
from service.server import ChatServer
from tests.engine_gate import GateFactory
from tests.service.conftest import ServiceFactory
from tests.tui.helpers import (
    LONG,
    SHORT,
    SIZE,
    chats,
    configure,
    connected,
    current,
    live_app,
    settle,
    shown,
    stored,
    until,
)
from tests.tui.snapshot import screen_text
from tui_client.client import SessionFrame, SessionRestored
from tui_client.screens import ConfirmScreen, ModelScreen, PastChatsScreen, RenameScreen, SettingsScreen


async def test_two_chats_stream_at_once(server: ChatServer, engine_gate: GateFactory) -> None:
    """Two chats on one connection stream interleaved; each shows exactly its stored reply. The
    engine is held until both replies are submitted, so they decode in the same batch."""
    gate = engine_gate(server)
    gate.hold()
    app, events = live_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await connected(app)
        first = current(app)
        second = await app.new_chat()
        assert app.current is second
        configure(first, LONG)
        configure(second, LONG)
        second.prompt.text = "Write another long story"
        await first.submit("Write a long story")
        await pilot.press("enter")  # in the second chat, which has the focus
        await until(app, lambda: first.status.phase != "sending" and second.status.phase != "sending")
        gate.release()
        await until(app, lambda: first.status.phase == "done" and second.status.phase == "done")

        order = [(e.session, e.frame["type"]) for e in events if isinstance(e, SessionFrame)]
        first_done = order.index((first.session, "done"))
        second_done = order.index((second.session, "done"))
        assert (second.session, "token") in order[:first_done], order
        assert (first.session, "token") in order[:second_done]
        for pane in (first, second):
            assert pane.chat is not None
            history = await stored(server, pane.chat)
            assert shown(pane) == [(m["role"], m["text"]) for m in history]
            await settle(pilot, lambda p=pane: all(v.rendered for v in p.messages))  # type: ignore[misc]
        assert "done" in first.status.line()
        assert "tok/s" in first.status.line()


async def test_stop_keeps_the_partial_reply_marked_stopped(
    server: ChatServer, engine_gate: GateFactory
) -> None:
    """Esc stops the current chat's reply at once; the partial text stays, marked stopped (once
    on the screen: the note; the status line says the chat is ready), and matches what the
    service stored as cancelled."""
    gate = engine_gate(server)
    gate.hold(4)  # the prefill and three tokens: the reply cannot end before the stop arrives
    app, _ = live_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await connected(app)
        pane = current(app)
        configure(pane, LONG)
        await pane.submit("Write a long story")
        await until(app, lambda: pane.status.tokens > 0)
        await pilot.press("escape")
        await until(app, lambda: not any(w.group == "stop" and not w.is_finished for w in app.workers))
        await app.client.ping()  # the stop was sent, and frames are handled in order: it is in
        gate.release()
        await until(app, lambda: pane.status.phase in ("stopped", "done"))
        assert pane.status.phase == "stopped"
        reply = pane.messages[-1]
        assert reply.role == "assistant"
        assert reply.text
        assert pane.chat is not None
        last = (await stored(server, pane.chat))[-1]
        assert (last["status"], last["text"]) == ("cancelled", reply.text)
        await settle(pilot, lambda: reply.rendered)
        assert "stopped" in str(reply.query_one(".note", Label).render())
        assert pane.query_one(".stop", Button).disabled
        await pilot.pause()
        screen = screen_text(app)
        assert screen.count("stopped") == 1, screen
        assert pane.status.line().startswith("ready · ")


async def test_reopening_a_past_chat_shows_history_and_continues(server: ChatServer) -> None:
    """A chat from an earlier run comes back from the past-chats browser with its history,
    and a new prompt continues it."""
    app, _ = live_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await connected(app)
        pane = current(app)
        configure(pane, SHORT)
        await pane.submit("Hello there")
        await until(app, lambda: pane.status.phase == "done")
        chat = pane.chat
        assert chat is not None

    app, _ = live_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await connected(app)
        await pilot.press("ctrl+o")
        browser = app.screen
        await until(app, lambda: bool(getattr(browser, "chats", None)))
        await pilot.pause()
        await pilot.press("enter")
        pane = current(app)
        await until(app, lambda: pane.chat == chat and len(pane.messages) == 2)
        assert pane.label == "Hello there"
        assert [role for role, _ in shown(pane)] == ["user", "assistant"]
        configure(pane, SHORT)
        await pane.submit("And again")
        await until(app, lambda: pane.status.phase == "done")
        history = await stored(server, chat)
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        assert shown(pane) == [(m["role"], m["text"]) for m in history]


async def test_reconnect_reattaches_a_running_reply(
    start_service: ServiceFactory, engine_gate: GateFactory
) -> None:
    """When the connection drops mid-reply the banner says so; the client reconnects, reopens
    the chat with ``resume`` and the reply streams on without a gap or a repeat."""
    async with start_service(disconnect_grace_s=60) as server:
        gate = engine_gate(server)
        app, events = live_app(server)
        async with app.run_test(size=SIZE):
            await connected(app)
            pane = current(app)
            configure(pane, LONG)
            await pane.submit("Write a long story")
            await until(app, lambda: pane.status.tokens >= 3)
            gate.hold()  # the reply is still running when the client comes back
            for connection in server.connections:
                connection.ws.transport.abort()
            await until(app, lambda: app.connection_state == "disconnected")
            assert not app.query_one("#banner").has_class("hidden")
            await until(app, lambda: any(isinstance(e, SessionRestored) for e in events))
            gate.release()
            await until(app, lambda: pane.status.phase in ("done", "stopped", "failed"))
            assert app.query_one("#banner").has_class("hidden")
            assert pane.chat is not None
            history = await stored(server, pane.chat)
            assert shown(pane) == [(m["role"], m["text"]) for m in history]
            assert history[-1]["status"] == "complete"
            restored = [e for e in events if isinstance(e, SessionRestored)]
            assert [e.reattached for e in restored] == [True]


async def test_dialogs_settings_rename_model_newline_and_delete(server: ChatServer) -> None:
    """Ctrl+T sets the chat's sampling (sent with the prompt), Ctrl+J puts a newline in the
    prompt, F2 renames the chat in the sidebar, Ctrl+L picks a model, and the past-chats
    browser deletes a chat only after the confirmation."""
    app, _ = live_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await connected(app)
        pane = current(app)

        await pilot.press("ctrl+t")
        await settle(pilot, lambda: isinstance(app.screen, SettingsScreen))
        # Nothing set: the fields show the defaults in force instead of staying blank.
        temperature = app.screen.query_one("#temperature", Input)
        assert (temperature.value, temperature.placeholder) == (
            "",
            f"default: {server.models.default_id}'s own, set by the service",
        )
        assert app.screen.query_one("#max_tokens", Input).placeholder == "default: 256"
        in_force = str(app.screen.query_one("#in-force", Label).render())
        assert in_force == "In force: the model's temperature, up to 256 tokens per reply."
        app.screen.query_one("#temperature", Input).value = "0"
        app.screen.query_one("#max_tokens", Input).value = "3"
        await pilot.click("#save")
        await settle(pilot, lambda: not isinstance(app.screen, SettingsScreen))
        assert (pane.settings.temperature, pane.settings.max_tokens) == (0.0, 3)

        await pilot.press("ctrl+l")
        await settle(pilot, lambda: isinstance(app.screen, ModelScreen))
        await pilot.press("enter")
        await settle(pilot, lambda: not isinstance(app.screen, ModelScreen))
        assert pane.model == server.models.default_id

        await pilot.press(*"Two", "ctrl+j", *"lines")
        assert pane.prompt.text == "Two\nlines"
        await pilot.press("enter")
        await until(app, lambda: pane.status.phase == "done")
        assert pane.status.tokens <= 3
        assert shown(pane)[0] == ("user", "Two\nlines")

        await pilot.press("f2")
        await settle(pilot, lambda: isinstance(app.screen, RenameScreen))
        app.screen.query_one(Input).value = "Renamed"
        await pilot.press("enter")
        await settle(pilot, lambda: pane.label == "Renamed")
        item = app.query_one(f"#item-{pane.session}", ListItem)
        await settle(pilot, lambda: "Renamed" in str(item.query_one(Label).render()))

        assert pane.chat is not None
        await pilot.press("ctrl+o")
        browser = app.screen
        assert isinstance(browser, PastChatsScreen)
        await until(app, lambda: len(browser.chats) == 1)
        await pilot.press("d")
        await settle(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # changed my mind: nothing happens
        await settle(pilot, lambda: app.screen is browser)
        assert len(await chats(server)) == 1
        await pilot.press("d")
        await settle(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(app, lambda: not browser.chats)
        assert await chats(server) == []


async def test_a_base_model_is_marked_in_the_model_picker(
    service_settings: ServiceSettings, tiny_base_model: PreparedModel
) -> None:
    """Ctrl+L lists a model without a chat template as a base model, and picking it says that it
    continues a plain transcript."""
    models = (*service_settings.models, str(tiny_base_model.directory))
    async with running_service(dataclasses.replace(service_settings, models=models)) as server:
        app, _ = live_app(server)
        async with app.run_test(size=SIZE) as pilot:
            await connected(app)
            await pilot.press("ctrl+l")
            await settle(pilot, lambda: isinstance(app.screen, ModelScreen))
            options = app.screen.query_one(OptionList)
            labels = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
            assert [label for label in labels if "base model" in label] == [
                "tiny-base  (256 ctx, base model: plain transcript)"
            ]
            options.highlighted = labels.index(labels[-1])
            await pilot.press("enter")
            await settle(pilot, lambda: not isinstance(app.screen, ModelScreen))
            assert current(app).model == "tiny-base"
            notes = [str(n.message) for n in app._notifications]
            assert any("tiny-base is a base model" in note for note in notes), notes


async def test_command_line_sampling_is_each_new_chats_setting(server: ChatServer) -> None:
    """--temperature / --max-tokens apply to every chat of the app, and Ctrl+T shows them."""
    app, _ = live_app(server, temperature=0.25, max_tokens=5)
    async with app.run_test(size=SIZE) as pilot:
        await connected(app)
        pane = current(app)
        assert (pane.settings.temperature, pane.settings.max_tokens) == (0.25, 5)
        await pilot.press("ctrl+t")
        await settle(pilot, lambda: isinstance(app.screen, SettingsScreen))
        assert app.screen.query_one("#temperature", Input).value == "0.25"
        assert app.screen.query_one("#max_tokens", Input).value == "5"
        in_force = str(app.screen.query_one("#in-force", Label).render())
        assert in_force == "In force: temperature 0.25, up to 5 tokens per reply."
        await pilot.press("escape")
        await pane.submit("Hello")
        await until(app, lambda: pane.status.phase == "done")
        assert pane.status.tokens <= 5
