"""Every plain HTTP route group, in the order they are matched (see schema/openapi.yaml)."""

from __future__ import annotations

from starlette.routing import BaseRoute

from service.config import ServerSettings
from service.core.chats import ChatCore
from service.transports.http.beam import BeamRoutes
from service.transports.http.chats import ChatRoutes
from service.transports.http.generate import GenerateRoutes


def plain_routes(core: ChatCore, settings: ServerSettings) -> list[BaseRoute]:
    routes: list[BaseRoute] = []
    routes += GenerateRoutes(core, settings).routes()
    routes += BeamRoutes(core, settings).routes()
    routes += ChatRoutes(core, settings).routes()
    return routes
