"""The browser page in headless system Chromium (Debian's ``chromium``), driven by Playwright's async
API on pytest-asyncio's session loop, against the real service (tiny model, real PostgreSQL)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from service.server import ChatServer
from tests.service.conftest import server, service_settings, start_service, tiny_base_model  # noqa: F401

CHROMIUM = os.environ.get("LOCALCHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def page_url(service: ChatServer) -> str:
    return f"http://127.0.0.1:{service.port}/"


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    if not shutil.which(CHROMIUM):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the browser tests need Debian's chromium package "
            "(apt-get install -y chromium; scripts/test installs it), or LOCALCHAT_CHROMIUM naming one"
        )
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture
async def new_page(browser: Browser) -> AsyncIterator[Callable[..., Any]]:
    """``await new_page(server, setup=None, **context_options)``: a page of the service in a fresh
    context (``await setup(page)`` runs before it loads); any
    page error or console error fails the test at teardown."""
    contexts = []
    problems: list[str] = []

    async def make(
        service: ChatServer, setup: Callable[[Page], Awaitable[None]] | None = None, **options: Any
    ) -> Page:
        context = await browser.new_context(**options)
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

        def console(message: ConsoleMessage) -> None:
            if message.type == "error" and "WebSocket" not in message.text:
                problems.append(f"console error: {message.text}")

        page.on("console", console)
        if setup is not None:  # e.g. page.route_web_socket(...), which must come before the load
            await setup(page)
        await page.goto(page_url(service))
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not problems, "\n".join(problems)
