"""Plain HTTP on the WebSocket port, through websockets' ``process_request`` hook:
``/`` (the browser page), ``/healthz``, ``/readyz`` and ``/metrics``. ``/ws`` goes on to
the WebSocket handshake; anything else is 404. A foreign ``Host`` (any path) or ``Origin``
(``/ws``) gets 403 (see :mod:`service.access`); past the connection limit, ``/ws`` gets 503.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from service.server import ChatServer

WS_PATH = "/ws"
TEXT = "text/plain; charset=utf-8"

ProcessRequest = Callable[[ServerConnection, Request], Awaitable[Response | None]]


def _respond(connection: ServerConnection, status: HTTPStatus, body: str, content_type: str) -> Response:
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response


# The page may load only its own scripts and styles and talk only to its own service.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC_PREFIX = "/static/"
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _page() -> str:
    return resources.files("service.web").joinpath("index.html").read_text(encoding="utf-8")


def _static(name: str) -> tuple[str, str] | None:
    """(body, content type) of a file directly in ``service/web`` with a known suffix, else None."""
    stem, dot, suffix = name.rpartition(".")
    content_type = STATIC_TYPES.get(dot + suffix)
    if content_type is None or not stem or not all(c.isalnum() or c in "-_" for c in stem):
        return None  # no "/", "..", or hidden names: nothing outside the folder
    resource = resources.files("service.web").joinpath(name)
    if not resource.is_file():
        return None
    return resource.read_text(encoding="utf-8"), content_type


def process_request(server: ChatServer) -> ProcessRequest:
    async def handle(connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        hosts, origins = request.headers.get_all("Host"), request.headers.get_all("Origin")
        if len(hosts) != 1 or not server.access.host_allowed(hosts[0]):
            return _respond(connection, HTTPStatus.FORBIDDEN, "unknown Host\n", TEXT)
        if path == WS_PATH:
            if len(origins) > 1 or not server.access.origin_allowed(next(iter(origins), None), server.port):
                return _respond(connection, HTTPStatus.FORBIDDEN, "Origin not allowed\n", TEXT)
            if server.connection_count >= server.settings.server.max_connections:
                return _respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n", TEXT)
            return None
        if path == "/healthz":
            return _respond(connection, HTTPStatus.OK, '{"status":"ok"}', "application/json")
        if path == "/readyz":
            reason = await server.ready()
            instance = server.settings.replica.instance_name
            if reason is None:
                body = orjson.dumps({"status": "ready", "instance": instance}).decode()
                return _respond(connection, HTTPStatus.OK, body, "application/json")
            body = orjson.dumps({"status": "unavailable", "reason": reason, "instance": instance}).decode()
            return _respond(connection, HTTPStatus.SERVICE_UNAVAILABLE, body, "application/json")
        if path == "/metrics":
            return _respond(
                connection, HTTPStatus.OK, server.metrics.exposition().decode(), METRICS_CONTENT_TYPE
            )
        if path in ("/", "/index.html"):
            response = _respond(connection, HTTPStatus.OK, _page(), "text/html; charset=utf-8")
            response.headers["Content-Security-Policy"] = PAGE_CSP
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            return response
        if path.startswith(STATIC_PREFIX) and (found := _static(path.removeprefix(STATIC_PREFIX))):
            response = _respond(connection, HTTPStatus.OK, found[0], found[1])
            del response.headers["Cache-Control"]
            response.headers["Cache-Control"] = "no-cache"  # revalidated: page and modules change together
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response
        return _respond(connection, HTTPStatus.NOT_FOUND, "not found\n", TEXT)

    return handle
