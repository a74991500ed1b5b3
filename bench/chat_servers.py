"""Our service and llama-server behind one small chat interface, for bench/llama.py: a server
opens chats, a chat takes turns and returns each reply as its client saw it (a ``Reply``)."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from bench import llama_server
from bench.common import service_subprocess
from bench.llama_server import Reply
from bench.service import service_idle
from bench.ws_client import SessionClient


class Chat(Protocol):
    async def turn(self, text: str, max_tokens: int) -> Reply: ...
    async def close(self) -> None: ...


class Server(Protocol):
    name: str
    pid: int

    async def chat(self, system: str) -> Chat: ...
    async def idle(self) -> None: ...


class OursChat:
    def __init__(self, client: SessionClient, session: str) -> None:
        self.client, self.session = client, session

    async def turn(self, text: str, max_tokens: int) -> Reply:
        params = {"temperature": 0, "max_tokens": max_tokens}
        reply = Reply(sent=time.perf_counter())
        await self.client.send({"type": "send", "session": self.session, "text": text, "params": params})
        tokens = 0
        while True:
            at, frame = await self.client.next(self.session)
            if frame["type"] == "token":
                reply.stamps.append(at)
                reply.text += frame["text"]
                tokens += frame.get("tokens", 1)
            elif frame["type"] == "done":
                usage = frame["usage"]
                # Tokens the frames carried: an end-of-sequence token counts in usage but has no frame.
                reply.completion_tokens = tokens
                reply.prompt_tokens, reply.cached_tokens = usage["prompt_tokens"], usage["cached_tokens"]
                reply.finish_reason = frame["reason"]
                reply.timings = frame.get("timing", {})
                return reply

    async def close(self) -> None:
        await self.client.send({"type": "close", "session": self.session})
        while (await self.client.next(self.session))[1]["type"] != "closed":
            pass


@dataclass(slots=True)
class OursServer:
    name: str
    pid: int
    url: str
    client: SessionClient
    serial: itertools.count[int]

    async def chat(self, system: str) -> Chat:
        session = f"c{next(self.serial)}"
        await self.client.send({"type": "open", "session": session, "system": system})
        await self.client.next(session)
        return OursChat(self.client, session)

    async def idle(self) -> None:
        await service_idle(self.url)


class LlamaChat:
    def __init__(self, server: llama_server.LlamaServer, system: str) -> None:
        self.server = server
        self.messages = [{"role": "system", "content": system}]

    async def turn(self, text: str, max_tokens: int) -> Reply:
        self.messages.append({"role": "user", "content": text})
        reply = await self.server.chat(self.messages, max_tokens)
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply

    async def close(self) -> None:
        pass


@dataclass(slots=True)
class LlamaServerAdapter:
    name: str
    pid: int
    server: llama_server.LlamaServer

    async def chat(self, system: str) -> Chat:
        return LlamaChat(self.server, system)

    async def idle(self) -> None:
        pass  # a streamed completion is finished when its stream ends


@asynccontextmanager
async def ours_process(
    model_dir: Path, scratch: Path, *, threads: int, context: int, name: str
) -> AsyncIterator[OursServer]:
    """``python -m service`` on a prepared model, as users run it (embedded PostgreSQL in ``scratch``),
    with one open chat.v1 connection."""
    options = ["--threads", str(threads), "--model", str(model_dir), "--data-dir", str(scratch)]
    async with service_subprocess(*options, "--max-context", str(context), start_timeout_s=900) as running:
        client = await SessionClient.connect(running.url)
        try:
            yield OursServer(name, running.pid, running.url, client, itertools.count())
        finally:
            await client.close()


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), in MiB."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
