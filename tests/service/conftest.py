"""A real service on port 0: the tiny model, a fresh PostgreSQL database per test."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from service.app import running_service
from service.config import EngineSettings, ServerSettings, ServiceSettings
from service.core.reply import Reply
from service.engine.models.onnx_builder import Precision
from service.engine.models.prepare import prepare_gguf
from service.engine.models.registry import PreparedModel, describe_dir
from service.server import ChatServer
from tests.engine.gguf_files import llama_vocab
from tests.engine.tiny_model import write_tiny_gguf
from tests.protocol.schema_check import validate_server_frame
from tests.service.client import Client

ServiceFactory = Callable[..., AbstractAsyncContextManager[ChatServer]]


def ws_url(server: ChatServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


def noting_cancels(reply: Reply) -> asyncio.Event:
    """Wrap ``reply.cancel`` so the returned event is set once the server cancels the reply
    (how a test sees that the server noticed its client leave)."""
    cancelled = asyncio.Event()
    cancel = reply.cancel

    def noting(cause: Any) -> None:
        cancel(cause)
        cancelled.set()

    reply.cancel = noting  # type: ignore[method-assign]
    return cancelled


def tiny_settings(database_url: str, tiny_model: PreparedModel, data_dir: Path) -> ServiceSettings:
    """The tests' service: the tiny model on port 0."""
    return ServiceSettings(
        server=ServerSettings(port=0, ping_interval_s=None),
        engine=EngineSettings(threads=2, kv_slots=16, max_context=256),
        data_dir=data_dir,
        database_url=database_url,
        models=(str(tiny_model.directory),),
    )


@pytest.fixture
def service_settings(database_url: str, tiny_model: PreparedModel, tmp_path: Path) -> ServiceSettings:
    return tiny_settings(database_url, tiny_model, tmp_path)


@asynccontextmanager
async def serving(
    service_settings: ServiceSettings, engine: dict[str, Any] | None = None, **overrides: Any
) -> AsyncIterator[ChatServer]:
    """A running service of these settings with ``engine`` and server ``overrides``; every
    ``chat.v1`` frame it sends is checked against schema/."""
    settings = dataclasses.replace(
        service_settings,
        server=dataclasses.replace(service_settings.server, **overrides),
        engine=dataclasses.replace(service_settings.engine, **(engine or {})),
    )
    violations: list[str] = []

    def check(frame: Mapping[str, Any]) -> None:
        try:
            validate_server_frame(dict(frame))
        except Exception as exc:
            violations.append(f"{exc}: {frame}")

    async with running_service(settings) as server:
        server.frame_observer = check
        yield server
    assert not violations, "frames that break schema/:\n" + "\n".join(violations)


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> PreparedModel:
    """A tiny random Llama with Llama 2's SentencePiece vocabulary and no chat template (nor
    ChatML tokens): a base model, which chats through the plain transcript."""
    work = tmp_path_factory.mktemp("tiny-base")
    gguf_path = write_tiny_gguf(work / "tiny-base.gguf", llama_vocab("llama-spm"))
    directory = prepare_gguf(gguf_path, work / "tiny-base", precision=Precision.INT8, progress=False)
    return describe_dir("tiny-base", directory)


@pytest.fixture
def start_service(service_settings: ServiceSettings) -> ServiceFactory:
    """``async with start_service(engine={...}, **server_overrides) as server``: a running
    service; start it again (same database) to test a restart."""

    def running(
        engine: dict[str, Any] | None = None, **overrides: Any
    ) -> AbstractAsyncContextManager[ChatServer]:
        return serving(service_settings, engine, **overrides)

    return running


@pytest.fixture
async def server(start_service: ServiceFactory) -> AsyncIterator[ChatServer]:
    async with start_service() as running:
        yield running


@pytest.fixture
async def client(server: ChatServer) -> AsyncIterator[Client]:
    """A connected client that has said hello."""
    connected = await Client.connect(ws_url(server))
    await connected.hello(client="pytest")
    yield connected
    await connected.close()
