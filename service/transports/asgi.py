"""One port for everything: the ASGI application uvicorn serves.

Every request, plain HTTP or WebSocket handshake, must name this service in ``Host`` (403
otherwise, see :mod:`service.access`). Then ``/ws`` goes to ``chat.v1``; every other
WebSocket handshake is 404; plain HTTP goes to the Starlette application (the page, health,
metrics and the OpenAI-compatible ``/v1``).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.access import AccessPolicy
from service.transports.http.pages import TEXT, respond

WS_PATH = "/ws"


def header_values(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope["headers"] if key.lower() == name]


class Gateway:
    def __init__(self, access: AccessPolicy, http: ASGIApp, websocket: ASGIApp) -> None:
        self.access = access
        self.http = http
        self.websocket = websocket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            return  # lifespan: the service starts and stops its parts itself
        hosts = header_values(scope, b"host")
        if len(hosts) != 1 or not self.access.host_allowed(hosts[0]):
            # A Starlette response sent in a websocket scope refuses the handshake with it.
            await respond(403, "unknown Host\n", TEXT)(scope, receive, send)
        elif kind == "http":
            await self.http(scope, receive, send)
        elif scope["path"] == WS_PATH:
            await self.websocket(scope, receive, send)
        else:
            await respond(404, "not found\n", TEXT)(scope, receive, send)
