"""The plain HTTP endpoints on the WebSocket port."""

from __future__ import annotations

import asyncio
import http.client

import orjson
from starlette.routing import Route

from service.server import ChatServer
from service.transports.http.routes import plain_routes
from tests.engine_gate import GateFactory
from tests.protocol.openapi_check import operations
from tests.service.client import TIMEOUT_S, Client
from tests.service.conftest import ws_url


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


async def get(server: ChatServer, path: str) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(_get, server.port, path)


async def scrape(server: ChatServer) -> dict[str, float]:
    """``/metrics``, as ``{'name{labels}': value}``."""
    status, kind, body = await get(server, "/metrics")
    assert status == 200
    assert kind.startswith("text/plain")
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_health_and_readiness(server: ChatServer) -> None:
    """/healthz and /readyz answer 200 with JSON once the model and database are up."""
    assert await get(server, "/healthz") == (200, "application/json", b'{"status":"ok"}')
    status, kind, body = await get(server, "/readyz")
    ready = {"status": "ready", "instance": server.settings.replica.instance_name}
    assert (status, kind, orjson.loads(body)) == (200, "application/json", ready)
    assert server.settings.replica.instance_name  # named even when no --instance-name was given


async def test_readiness_fails_without_the_database(server: ChatServer) -> None:
    """/readyz answers 503 with a JSON reason when the database is unreachable."""
    await server.store.close()
    status, _, body = await get(server, "/readyz")
    assert status == 503
    assert "database" in orjson.loads(body)["reason"]


async def test_page_and_unknown_paths(server: ChatServer) -> None:
    """/ serves the HTML page; an unknown path is 404."""
    status, kind, body = await get(server, "/")
    assert (status, kind) == (200, "text/html; charset=utf-8")
    assert b"<html" in body
    assert (await get(server, "/nope"))[0] == 404


async def test_metrics_count_what_happened(
    client: Client, server: ChatServer, engine_gate: GateFactory
) -> None:
    """/metrics exposes latency histograms and counters that move with real traffic."""
    gate = engine_gate(server)
    await client.open("s")
    reply = await client.chat("s", "hello", temperature=0, max_tokens=8)
    gate.hold(3)  # the prefill and two tokens; the reply cannot end before the stop arrives
    started = await client.start("s", "more", temperature=0, max_tokens=200)
    await client.wait_for(lambda f: f["type"] == "token")
    await client.send({"type": "stop", "session": "s"})
    await client.request({"type": "ping"})  # frames are handled in order: the stop is in
    gate.release()
    await client.finish("s", started)
    await server.idle()
    samples = await scrape(server)
    assert samples["localchat_time_to_first_token_seconds_count"] == 2
    assert (
        samples["localchat_inter_token_latency_seconds_count"] >= reply.done["usage"]["completion_tokens"] - 1
    )
    assert samples["localchat_generated_tokens_total"] >= reply.done["usage"]["completion_tokens"] + 1
    assert samples['localchat_cancellations_total{cause="stop"}'] == 1
    assert samples['localchat_prompt_tokens_total{source="computed"}'] > 0
    assert samples["localchat_open_connections"] == 1
    assert samples["localchat_open_sessions"] == 1
    assert samples["localchat_queue_depth"] == 0
    assert samples["localchat_running_generations"] == 0


async def test_websocket_only_on_ws_path(server: ChatServer) -> None:
    """The WebSocket endpoint is /ws."""
    c = await Client.connect(ws_url(server))
    assert c.ws.subprotocol == "chat.v1"
    await c.close()


async def test_schema_openapi_describes_exactly_the_plain_routes(server: ChatServer) -> None:
    """schema/openapi.yaml has every plain HTTP route the server answers (generation, beam search,
    REST chats) and no other."""
    served = {
        (method, route.path)
        for route in plain_routes(server.core, server.settings.server)
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert served == operations()
