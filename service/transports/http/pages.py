"""The plain HTTP endpoints: ``/`` (the browser page) and its static files, ``/healthz``,
``/readyz`` and ``/metrics``. Anything else is 404."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"

# The page may load only its own scripts and styles and talk only to its own service.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def respond(status: int, body: str | bytes, content_type: str) -> Response:
    """A response that no cache keeps."""
    return Response(body, status, headers={"Cache-Control": "no-store"}, media_type=content_type)


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


ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def routes(
    *,
    ready: Callable[[], Awaitable[str | None]],
    metrics: Callable[[], bytes],
    metrics_type: str,
    instance: str,
) -> list[BaseRoute]:
    """``ready`` says why the service is not ready (``None``: it is); ``metrics`` is the
    Prometheus exposition; ``instance`` names this replica in ``/readyz``."""

    async def healthz(request: Request) -> Response:
        return respond(200, '{"status":"ok"}', JSON)

    async def readyz(request: Request) -> Response:
        reason = await ready()
        if reason is None:
            return respond(200, orjson.dumps({"status": "ready", "instance": instance}), JSON)
        body = {"status": "unavailable", "reason": reason, "instance": instance}
        return respond(503, orjson.dumps(body), JSON)

    async def exposition(request: Request) -> Response:
        return respond(200, metrics(), metrics_type)

    async def page(request: Request) -> Response:
        response = respond(200, _page(), "text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = PAGE_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def static(request: Request) -> Response:
        found = _static(request.path_params["name"])
        if found is None:
            return not_found(request)
        response = respond(200, found[0], found[1])
        response.headers["Cache-Control"] = "no-cache"  # revalidated: page and modules change together
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    get = ["GET", "HEAD"]
    return [
        Route("/healthz", healthz, methods=get),
        Route("/readyz", readyz, methods=get),
        Route("/metrics", exposition, methods=get),
        Route("/", page, methods=get),
        Route("/index.html", page, methods=get),
        Route("/static/{name:path}", static, methods=get),
    ]


def not_found(request: Request | None = None) -> Response:
    return respond(404, "not found\n", TEXT)
