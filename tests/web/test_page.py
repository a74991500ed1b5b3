"""The browser page end to end: headless Chromium against the real service."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import secrets
import uuid
from collections.abc import Callable
from typing import Any

from playwright.async_api import Dialog, Locator, Page, WebSocketRoute, expect

from service.app import running_service
from service.config import ServiceSettings
from service.engine.models.registry import PreparedModel
from service.server import ChatServer
from service.store.records import token_hash
from tests.completions import completion
from tests.engine_gate import GateFactory
from tests.service.conftest import ServiceFactory
from tests.web.conftest import ARTIFACTS

NewPage = Callable[..., Any]
DONE_STATUS = re.compile(r"^\d+ tokens · \d+\.\d tok/s")


def pane(page: Page) -> Locator:
    return page.locator("section.pane:not([hidden])")


def last_reply(page: Page) -> Locator:
    return pane(page).locator(".msg.assistant").last


async def send(page: Page, text: str) -> Locator:
    """Types ``text`` into the open chat and presses Enter; the reply's element."""
    box = pane(page).get_by_role("textbox", name="Message")
    await box.fill(text)
    await box.press("Enter")
    await expect(pane(page).locator(".msg.user .body").last).to_have_text(re.compile(re.escape(text)))
    return last_reply(page)


async def mid_stream(reply: Locator) -> str:
    """Waits until ``reply`` shows some text while still generating; that text."""
    await expect(reply).to_have_attribute("data-state", "generating")
    await expect(reply.locator(".body")).not_to_have_text("")
    await expect(reply).to_have_attribute("data-state", "generating")
    return await reply.locator(".body").text_content() or ""


async def finished(reply: Locator) -> str:
    await expect(reply).to_have_attribute("data-state", "done")
    await expect(reply.locator(".status")).to_have_text(DONE_STATUS)
    return await reply.locator(".body").text_content() or ""


async def test_a_reply_streams_in_token_by_token(
    server: ChatServer, new_page: NewPage, engine_gate: GateFactory
) -> None:
    """Enter sends (Shift+Enter is a newline); the reply grows while generating, a screenshot is
    taken mid-stream, and the final status gives tokens and tok/s."""
    gate = engine_gate(server)
    page = await new_page(server)
    await expect(page.locator("#conn")).to_have_text("Connected as local")
    box = pane(page).get_by_role("textbox", name="Message")
    await box.press("Shift+Enter")
    assert await box.input_value() == "\n"
    assert await pane(page).locator(".msg").count() == 0

    gate.hold(12)  # the prefill and 11 tokens, then the engine waits
    reply = await send(page, "Tell me a story")
    partial = await mid_stream(reply)
    assert await reply.locator(".status").text_content() == "generating…"
    await expect(pane(page).get_by_role("button", name="Stop the reply")).to_be_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "mid-stream.png"
    await page.screenshot(path=str(shot))
    print(f"mid-stream screenshot: {shot}")

    gate.release()
    text = await finished(reply)
    assert text.startswith(partial[:20])
    assert len(text) > len(partial)
    await expect(pane(page).get_by_role("button", name="Stop the reply")).to_be_disabled()
    await expect(page.get_by_role("tab", name="Tell me a story")).to_have_count(1)
    await expect(page.locator("#past .past-item")).to_have_count(0)  # saved, but open: listed once
    await expect(page.locator("#past-empty")).to_have_text("Every saved chat is open.")


async def test_two_chats_stream_at_once(
    server: ChatServer, new_page: NewPage, engine_gate: GateFactory
) -> None:
    """Two chats in two tabs over one connection: both replies are mid-stream at the same time."""
    gate = engine_gate(server)
    page = await new_page(server)
    gate.hold(0)
    first = await send(page, "First chat")
    await page.get_by_role("button", name="New chat", exact=True).click()
    second = await send(page, "Second chat")
    await expect(page.get_by_role("tab")).to_have_count(2)
    # Both generations must be in the engine before it runs: else the first may use all 40 runs.
    await server.wait_until(lambda: server.generation_count == 2)
    gate.hold(40)
    await mid_stream(first)
    await mid_stream(second)
    gate.release()
    await finished(first)
    await finished(second)
    await page.get_by_role("tab", name="First chat").click()
    await expect(pane(page).locator(".msg.user .body")).to_have_text(["First chat"])


async def test_stop_mid_reply(server: ChatServer, new_page: NewPage, engine_gate: GateFactory) -> None:
    """The Stop button ends a running reply: status says stopped, and the chat can go on."""
    gate = engine_gate(server)
    page = await new_page(server)
    gate.hold(6)
    reply = await send(page, "Count to a thousand")
    partial = await mid_stream(reply)
    await pane(page).get_by_role("button", name="Stop the reply").click()
    gate.release()
    await expect(reply.locator(".status")).to_have_text(re.compile(r"stopped$"))
    stopped = await reply.locator(".body").text_content() or ""
    assert stopped.startswith(partial[:10])
    tokens = int((await reply.locator(".status").text_content() or "").split()[0])
    assert tokens < 20  # default max_tokens is 256: it really stopped mid-reply
    await finished(await send(page, "Go on"))


async def test_reload_reopen_continue_and_delete(start_service: ServiceFactory, new_page: NewPage) -> None:
    """After a reload the chat is in past chats; reopened it shows its history and goes on; delete
    removes it."""
    async with start_service(default_max_tokens=24) as server:  # two turns fit the tiny context
        await reopen_continue_and_delete(server, new_page)


async def reopen_continue_and_delete(server: ChatServer, new_page: NewPage) -> None:
    page = await new_page(server)
    reply_text = await finished(await send(page, "Remember the word banana"))
    await page.reload()
    item = page.locator("#past .past-item").filter(has_text="Remember the word banana")
    await expect(item).to_have_count(1)
    await item.get_by_role("button", name=re.compile("^Remember")).click()
    await expect(page.get_by_role("tab", name="Remember the word banana")).to_have_attribute(
        "aria-selected", "true"
    )
    await expect(pane(page).locator(".msg.user .body")).to_have_text(["Remember the word banana"])
    assert await pane(page).locator(".msg.assistant .body").text_content() == reply_text
    await finished(await send(page, "What was the word?"))
    await expect(pane(page).locator(".msg")).to_have_count(4)
    await expect(item).to_have_count(0)  # open: listed under "Open chats" only
    await page.get_by_role("button", name="Close Remember the word banana").click()
    await expect(item.locator(".past-meta")).to_have_text(re.compile("^4 msgs"))

    delete = item.get_by_role("button", name="Delete Remember the word banana")
    asked: list[str] = []

    async def answer(dialog: Dialog, accept: bool) -> None:
        asked.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())

    page.once("dialog", lambda dialog: answer(dialog, accept=False))
    await delete.click()
    await expect(item).to_have_count(1)  # the user said no: nothing deleted
    assert len(asked) == 1
    assert "cannot be undone" in asked[0], asked
    assert len(await server.store.list_chats(server.local_user.id, limit=10)) == 1
    page.once("dialog", lambda dialog: answer(dialog, accept=True))
    await delete.click()
    await expect(page.locator("#past .past-item")).to_have_count(0)
    await expect(page.locator("#past-empty")).to_have_text("No saved chats yet.")
    assert await server.store.list_chats(server.local_user.id, limit=10) == []


async def test_past_chats_load_visibly_and_never_list_an_open_chat(
    server: ChatServer, new_page: NewPage
) -> None:
    """Until the first `chats` reply the list says it is loading (never "No saved chats yet.");
    a chat that is open is listed under "Open chats" only, and comes back to "Past chats" when
    closed. The `chats` reply is held back in the browser (Playwright's WebSocket routing) until
    the loading state has been seen."""
    user = server.local_user.id
    for title in ("First saved chat", "Second saved chat"):
        await server.store.create_chat(
            user, model=server.models.default_id, title=title, system=None, params={}
        )
    held: list[str | bytes] = []
    chats_held = asyncio.Event()
    routes: list[WebSocketRoute] = []

    def hold_chats_reply(browser_side: WebSocketRoute) -> None:
        service_side = browser_side.connect_to_server()
        routes.append(browser_side)

        def to_browser(message: str | bytes) -> None:
            if (
                not chats_held.is_set()
                and isinstance(message, str)
                and json.loads(message)["type"] == "chats"
            ):
                held.append(message)
                chats_held.set()
                return
            browser_side.send(message)

        service_side.on_message(to_browser)
        browser_side.on_message(service_side.send)

    async def setup(page: Page) -> None:
        await page.route_web_socket(re.compile(r"/ws(\?.*)?$"), hold_chats_reply)

    page = await new_page(server, setup=setup)
    past, hint = page.locator("#past .past-item"), page.locator("#past-empty")
    await asyncio.wait_for(chats_held.wait(), 30)
    await expect(page.locator("#conn")).to_have_text("Connected as local")
    await expect(hint).to_have_text("Loading past chats…")
    await expect(page.locator("#past")).to_have_attribute("aria-busy", "true")
    assert await past.count() == 0
    routes[0].send(held.pop())

    await expect(past).to_have_count(2)
    await expect(hint).to_be_hidden()
    await expect(page.locator("#past")).to_have_attribute("aria-busy", "false")
    sidebar = page.locator("#sidebar")
    await past.get_by_role("button", name=re.compile("^First saved chat")).click()
    await expect(page.get_by_role("tab", name="First saved chat")).to_have_attribute("aria-selected", "true")
    await expect(past).to_have_count(1)
    await expect(sidebar.get_by_text("First saved chat")).to_have_count(1)  # the tab only
    await past.get_by_role("button", name=re.compile("^Second saved chat")).click()
    await expect(past).to_have_count(0)
    await expect(hint).to_have_text("Every saved chat is open.")

    await page.get_by_role("button", name="Close First saved chat").click()
    await expect(past).to_have_count(1)
    await expect(past.filter(has_text="First saved chat")).to_have_count(1)
    await expect(page.get_by_role("tab", name="First saved chat")).to_have_count(0)


XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


async def test_markup_in_a_reply_or_title_shows_as_text(server: ChatServer, new_page: NewPage) -> None:
    """A stored title and reply full of markup render as text: no element made, no script run."""
    model = server.models.default_id
    reply = f"Here: {XSS}\n```html\n{XSS}\n```\nbye"
    chat, _ = await server.store.create_chat(
        server.local_user.id, model=model, title=f"T {XSS}", system=None, params={}
    )
    assistant = uuid.uuid4()
    await server.store.begin_turn(chat.id, user_text=f"U {XSS}", user_token_ids=[], assistant_id=assistant)
    await server.store.finish_message(
        assistant,
        completion(reply, token_ids=[], completion_tokens=1),
    )
    page = await new_page(server)
    title = page.locator("#past .past-title")
    await expect(title).to_have_text([f"T {XSS}"])
    await title.click()
    await expect(pane(page).locator(".msg.user .body")).to_have_text([f"U {XSS}"])
    body = pane(page).locator(".msg.assistant .body")
    await expect(body.locator(".prose").first).to_have_text(f"Here: {XSS}")
    await expect(body.locator("pre.code code")).to_have_text(XSS)
    assert await page.evaluate("() => window.__xss") is None
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "markup-as-text.png"))
    assert await page.locator("body img, body script, #panes iframe").count() == 0


async def test_token_auth_asks_once_per_browser_session(
    start_service: ServiceFactory, new_page: NewPage
) -> None:
    """With --auth token the page asks for a token (again when it is refused), keeps it in session
    storage, and a reload connects without asking."""
    async with start_service(auth="token") as server:
        token = secrets.token_urlsafe(32)
        await server.store.add_user("alice", token_hash(token))
        page = await new_page(server)
        dialog = page.get_by_role("dialog", name="Sign in")
        await expect(dialog).to_be_visible()
        await dialog.get_by_label("Access token").fill("wrong")
        await dialog.get_by_role("button", name="Connect").click()
        await expect(dialog.locator("#auth-message")).to_have_text(re.compile("not accepted"))
        await dialog.get_by_label("Access token").fill(token)
        await dialog.get_by_role("button", name="Connect").click()
        await expect(page.locator("#conn")).to_have_text("Connected as alice")
        assert await page.evaluate("() => sessionStorage.getItem('localchat.token')") == token
        await page.reload()
        await expect(page.locator("#conn")).to_have_text("Connected as alice")
        await expect(dialog).to_be_hidden()
        await finished(await send(page, "hi"))


async def test_a_dropped_connection_is_shown_and_the_reply_resumes(
    start_service: ServiceFactory, new_page: NewPage, engine_gate: GateFactory
) -> None:
    """The connection drops mid-reply: a message says so, the page reconnects by itself and resumes
    the running reply, which ends with exactly the stored text."""
    async with start_service(disconnect_grace_s=60) as server:
        gate = engine_gate(server)
        try:
            page = await new_page(server)
            gate.hold(8)
            reply = await send(page, "A long answer please")
            await mid_stream(reply)
            banner = asyncio.ensure_future(
                page.wait_for_function("() => !document.getElementById('banner').hidden", polling="raf")
            )
            for connection in server.connections:
                connection.ws.transport.abort()
            await banner
            await expect(page.locator("#banner-text")).to_have_text(re.compile("^Connection lost"))
            await expect(page.locator("#conn")).to_have_text("Connected as local")
            await expect(page.locator("#banner")).to_be_hidden()
            gate.release()
            text = await finished(reply)
        finally:
            gate.release()
        await server.idle()
        chats = await server.store.list_chats(server.local_user.id, limit=10)
        stored = await server.store.messages(server.local_user.id, chats[0].id)
        assert stored is not None
        assert stored[-1].text == text


async def test_phone_width_layout(server: ChatServer, new_page: NewPage) -> None:
    """At phone width the chat list is a drawer behind the Chats button; chatting works."""
    page = await new_page(server, viewport={"width": 390, "height": 760})
    sidebar = page.get_by_role("navigation", name="Chats")
    await expect(sidebar).to_be_hidden()
    toggle = page.get_by_role("button", name="Chats", exact=True)
    await toggle.click()
    await expect(sidebar).to_be_visible()
    await expect(toggle).to_have_attribute("aria-expanded", "true")
    await page.get_by_role("button", name="New chat", exact=True).click()
    await expect(sidebar).to_be_hidden()
    await finished(await send(page, "Hello from a phone"))
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "phone.png"))


async def test_static_files_and_headers(server: ChatServer, new_page: NewPage) -> None:
    """The page has a strict CSP; its modules and styles come with their types; nothing else does."""
    page = await new_page(server)
    response = await page.request.get(f"http://127.0.0.1:{server.port}/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'none'" in csp
    for name, kind in [
        ("app.js", "text/javascript"),
        ("protocol.js", "text/javascript"),
        ("app.css", "text/css"),
    ]:
        found = await page.request.get(f"http://127.0.0.1:{server.port}/static/{name}")
        assert found.status == 200, name
        assert found.headers["content-type"].startswith(kind), name
    for path in [
        "/static/__init__.py",
        "/static/index.html",
        "/static/..%2Fhttp.py",
        "/static/../http.py",
        "/static/",
    ]:
        assert (await page.request.get(f"http://127.0.0.1:{server.port}{path}")).status == 404, path


async def test_a_reply_cancelled_by_the_drop_shows_its_stored_text(
    server: ChatServer, new_page: NewPage, engine_gate: GateFactory
) -> None:
    """Without a grace period the drop cancels the reply: after reconnecting, the page shows it from
    the stored history (status cancelled)."""
    gate = engine_gate(server)
    page = await new_page(server)
    gate.hold(6)
    reply = await send(page, "Talk for a while")
    partial = await mid_stream(reply)
    await page.context.set_offline(True)  # no reconnecting until the reply is stored
    for connection in server.connections:
        connection.ws.transport.abort()
    await expect(page.locator("#banner-text")).to_have_text(re.compile("^Connection lost"))
    gate.release()  # the cancelled generation ends (one more step) and is stored
    await server.idle()
    await page.context.set_offline(False)
    await expect(page.locator("#conn")).to_have_text("Connected as local", timeout=20_000)
    stored = pane(page).locator(".msg.assistant").last
    await expect(stored.locator(".status")).to_have_text("cancelled")
    assert (await stored.locator(".body").text_content() or "").startswith(partial[:10])
    await expect(pane(page).get_by_role("button", name="Send")).to_be_enabled()


async def test_a_reply_behind_a_full_batch_shows_queued(
    start_service: ServiceFactory, new_page: NewPage, engine_gate: GateFactory
) -> None:
    """With one generation at a time, a second chat's reply says it is queued, then streams."""
    async with start_service(engine={"max_batch": 1}) as server:
        gate = engine_gate(server)
        try:
            page = await new_page(server)
            gate.hold(0)
            first = await send(page, "First")
            await expect(first).to_have_attribute("data-state", "generating")
            await page.get_by_role("button", name="New chat", exact=True).click()
            second = await send(page, "Second")
            await expect(second.locator(".status")).to_have_text("queued (position 1)")
            await expect(second).to_have_attribute("data-state", "queued")
            gate.release()
            await finished(first)
            await finished(second)
        finally:
            gate.release()


async def test_the_page_sends_a_stable_affinity_key(server: ChatServer, new_page: NewPage) -> None:
    """The page's WebSocket carries ?affinity= for a load balancer: without a token a random id
    kept in localStorage (the same after a reload); with one a hash that does not show it."""
    page = await new_page(server)
    urls: list[str] = []
    page.on("websocket", lambda ws: urls.append(ws.url))
    await page.reload()
    await expect(page.locator("#conn")).to_have_text("Connected as local")
    kept = await page.evaluate("() => localStorage.getItem('localchat.affinity')")
    assert re.fullmatch(r"[0-9a-f]{32}", kept)
    await page.reload()
    await expect(page.locator("#conn")).to_have_text("Connected as local")
    assert len(urls) >= 2  # one socket per load at least
    assert {url.split("?", 1)[1] for url in urls} == {f"affinity={kept}"}
    keys = await page.evaluate(
        """async () => {
            const { affinityKey } = await import('/static/protocol.js');
            return [affinityKey('secret-one'), affinityKey('secret-one'), affinityKey('secret-two')];
        }"""
    )
    assert keys[0] == keys[1] != keys[2]
    assert "secret" not in keys[0]
    assert kept not in keys


async def test_a_base_model_is_marked_as_such(
    service_settings: ServiceSettings, tiny_base_model: PreparedModel, new_page: NewPage
) -> None:
    """The model picker marks a model without a chat template as a base model, and a chat on it
    says, above the conversation, that it continues a plain transcript."""
    models = (*service_settings.models, str(tiny_base_model.directory))
    async with running_service(dataclasses.replace(service_settings, models=models)) as server:
        page = await new_page(server)
        picker = page.get_by_role("combobox", name="Model")
        await expect(picker.locator("option", has_text="tiny-base")).to_have_text(
            "tiny-base (base model, not loaded)"
        )
        await picker.select_option("tiny-base")
        await finished(await send(page, "Once upon a time"))
        note = pane(page).locator(".note.base-model")
        await expect(note).to_contain_text("tiny-base is a base model, not a chat model")
