"""llama.cpp's ``llama-server`` for the side-by-side benchmark: built once into the cache (only
when asked), started on a GGUF file, and driven over its OpenAI-compatible streaming API.

The sources are the ones the PyPI sdist of ``llama-cpp-python`` vendors, built for AVX2 without
``-DGGML_NATIVE=ON`` (which crashed on this CPU once). The build takes 8+ minutes on 2 cores;
it never runs in CI.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

SDIST = "llama-cpp-python"
CMAKE_FLAGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_AVX512=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
)
_BINARY = Path("vendor", "llama.cpp", "build", "bin", "llama-server")


def find_binary(cache: Path) -> Path | None:
    """The newest ``llama-server`` built under ``cache`` (``<cache>/<sdist>/vendor/llama.cpp/...``)."""
    found = sorted(p for p in cache.glob(f"*/{_BINARY}") if os.access(p, os.X_OK))
    return found[-1] if found else None


def _run(command: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def build(cache: Path, jobs: int = 2) -> Path:
    """Build ``llama-server`` into ``cache`` unless one is there; return its path.

    Progress is cmake's own (inherited stdout). Needs cmake and a C++ compiler
    (Debian: ``apt-get install -y cmake g++``).
    """
    if (existing := find_binary(cache)) is not None:
        return existing
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(
            f"building llama-server needs {' and '.join(missing)} (apt-get install -y cmake g++)"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                SDIST,
            ]
        )
        sdist = next(Path(tmp).glob("*.tar.gz"))
        print(f"unpacking {sdist.name} into {cache}", flush=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
        source = cache / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    _run(["cmake", "-B", "build", *CMAKE_FLAGS], cwd=source)
    started = time.perf_counter()
    _run(["cmake", "--build", "build", "--target", "llama-server", f"-j{jobs}"], cwd=source)
    print(f"built llama-server in {time.perf_counter() - started:.0f} s", flush=True)
    binary = find_binary(cache)
    if binary is None:
        raise SystemExit(f"the build left no {_BINARY} under {cache}")
    return binary


def version(binary: Path) -> str:
    """``llama-server --version``'s version line, and the sdist it was built from."""
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    sdist = binary.parents[len(_BINARY.parts) - 1].name
    return f"{lines[0] if lines else '?'} ({sdist})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Reply:
    """One streamed chat completion as the client saw it."""

    sent: float
    stamps: list[float] = field(default_factory=list)  # arrival of each chunk that carried choices
    text: str = ""
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    timings: dict[str, Any] = field(default_factory=dict)  # llama-server's own figures

    @property
    def ttft_ms(self) -> float | None:
        return (self.stamps[0] - self.sent) * 1000 if self.stamps else None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first / time from the first chunk to the last."""
        if len(self.stamps) < 2 or self.completion_tokens < 2 or self.stamps[-1] <= self.stamps[0]:
            return None
        return (self.completion_tokens - 1) / (self.stamps[-1] - self.stamps[0])


@dataclass(slots=True)
class LlamaServer:
    base_url: str
    pid: int
    client: httpx.AsyncClient

    async def chat(self, messages: list[dict[str, str]], max_tokens: int) -> Reply:
        """One greedy, streamed ``/v1/chat/completions``."""
        body = {
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        reply = Reply(sent=time.perf_counter())
        async with self.client.stream("POST", f"{self.base_url}/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                at = time.perf_counter()
                chunk = orjson.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    reply.stamps.append(at)
                    reply.text += (choice.get("delta") or {}).get("content") or ""
                    reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
                if usage := chunk.get("usage"):
                    reply.completion_tokens = usage.get("completion_tokens", 0)
                    reply.prompt_tokens = usage.get("prompt_tokens", 0)
                    details = usage.get("prompt_tokens_details") or {}
                    reply.cached_tokens = details.get("cached_tokens", 0)
                if timings := chunk.get("timings"):
                    reply.timings = timings
        if not reply.cached_tokens and reply.timings:
            reply.cached_tokens = int(reply.timings.get("cache_n", 0))
        return reply


async def _keep_tail(stream: asyncio.StreamReader, tail: deque[bytes]) -> None:
    while line := await stream.readline():
        tail.append(line)


@asynccontextmanager
async def llama_server(
    binary: Path, gguf: Path, *, threads: int, slots: int, context: int, extra: Sequence[str] = ()
) -> AsyncIterator[LlamaServer]:
    """``llama-server`` on ``gguf`` with ``slots`` parallel slots sharing one KV cache of
    ``slots * context`` positions (and ``extra`` arguments); waits for ``/health``, stops it on exit."""
    port = free_port()
    command = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * context),
        "-kvu", "--no-webui", *extra,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    log: deque[bytes] = deque(maxlen=200)  # its last lines, for an error message
    drain = asyncio.create_task(_keep_tail(process.stderr, log))
    base = f"http://127.0.0.1:{port}"
    # A connection per request: llama-server sometimes closes a kept-alive connection just as the
    # next request goes out on it ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=4 * slots, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        try:
            deadline = time.monotonic() + 600
            while True:
                if process.returncode is not None:
                    raise RuntimeError("llama-server exited:\n" + b"".join(log).decode(errors="replace"))
                try:
                    if (await client.get(f"{base}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("llama-server did not become healthy within 600 s")
                # Another process: its /health is the only readiness signal there is.
                await asyncio.sleep(0.2)
            yield LlamaServer(base, process.pid, client)
        finally:
            if process.returncode is None:
                process.terminate()
                await process.wait()
            await drain
