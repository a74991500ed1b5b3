"""Headless Chromium's own ``EventSource`` on a reply of the REST chat API: when the connection
drops mid-stream (a TCP relay in front of the service cuts it), the browser reconnects by
itself with ``Last-Event-ID`` and gets every token exactly once."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Browser

from service.server import ChatServer
from tests.protocol.openapi_check import validate_event
from tests.service.client import TIMEOUT_S
from tests.service.rest_api import (
    EVENTS,
    Event,
    ReplyGates,
    RestApi,
    covered,
    reply_gate_fixture,  # noqa: F401  (the reply_gate fixture)
    running,
    text_of,
)
from tests.tcp_relay import tcp_relay

# Every event with the connection it came on (``opens`` counts the connections so far).
LISTEN = """
(url) => {
  const seen = (window.seen = { events: [], opens: 0, errors: 0, done: false });
  const source = new EventSource(url);
  source.onopen = () => { seen.opens += 1; };
  source.onerror = () => { seen.errors += 1; };
  source.onmessage = (message) => {
    const data = JSON.parse(message.data);
    seen.events.push({ id: message.lastEventId, data, connection: seen.opens });
    if (data.done) { seen.done = true; source.close(); }
  };
}
"""


async def test_eventsource_reattaches_by_itself_after_a_drop(
    server: ChatServer, browser: Browser, reply_gate: ReplyGates
) -> None:
    """The browser's EventSource, cut off mid-reply, comes back by itself: the tokens generated
    while it was away and the rest arrive on the second connection, none twice, none missing."""
    gate = reply_gate(server)
    api = RestApi(server)
    chat = await api.new_chat()
    message = await api.send(chat, "Tell me a story", max_tokens=32, temperature=0)
    gate.watch(running(server, message))
    await gate.run_to(2)
    wait = {"timeout": TIMEOUT_S * 1000}
    async with tcp_relay("127.0.0.1", server.port) as relay:
        context = await browser.new_context()
        try:
            page = await context.new_page()
            await page.goto(f"http://127.0.0.1:{relay.port}/healthz")
            await page.evaluate(LISTEN, EVENTS.format(chat=chat, message=message))
            await page.wait_for_function("window.seen.events.length >= 1", **wait)

            relay.cut()  # the connection drops mid-reply ...
            relay.restore()  # ... and the service is reachable again
            await page.wait_for_function("window.seen.errors >= 1", **wait)
            await gate.run_to(6)  # generated while the browser is away
            await page.wait_for_function("window.seen.opens >= 2 && window.seen.events.length >= 2", **wait)
            gate.release()
            await page.wait_for_function("window.seen.done", **wait)
            seen: dict[str, Any] = await page.evaluate("window.seen")
        finally:
            await context.close()

    for item in seen["events"]:
        validate_event("GET", EVENTS, 200, item["data"])
    events = [Event(item["id"], item["data"]) for item in seen["events"]]
    first = [e for e, item in zip(events, seen["events"], strict=True) if item["connection"] == 1]
    second = [e for e, item in zip(events, seen["events"], strict=True) if item["connection"] == 2]
    assert seen["opens"] == 2
    assert first
    assert covered(second)[0] == covered(first)[-1] + 1  # resumed right after its last event
    total = events[-1].data["total_tokens"]
    assert covered(events) == list(range(total))
    stored = (await api.call("GET", "/chats/{chat}", 200, chat=chat))["messages"][-1]
    assert stored["text"] == text_of(events)
    await api.close()
