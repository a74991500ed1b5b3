"""Service benchmark: what a WebSocket client sees, against the engine alone, in one run.

    .venv/bin/python bench/service.py [--data-dir DIR] [--database-url URL] [--threads 2]
                                      [--tokens 128] [--rounds 3] [--stops 40]
                                      [--out bench/results/service.json]

Starts the real service as its own process (``python -m service`` on the default model, with
``--database-url`` or an embedded PostgreSQL in a temporary folder), loads the same model
into an engine in this process, and measures, alternating WebSocket and engine runs so that
a noisy machine hurts both alike:

* the decode rate of one session as its WebSocket client sees it (first to last token
  frame) and of the same generation on the engine alone, with the same settings (first to
  last delta);
* aggregate throughput of 8 sessions on one connection;
* stop latency: from sending ``stop`` to receiving ``done``.

Prints a table with the targets and writes everything as JSON (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/service.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    add_run_arguments,
    add_service_arguments,
    fmt,
    format_table,
    machine_line,
    median,
    percentile,
    ratio,
    run_facts,
    service_subprocess,
    write_json,
)
from bench.engine import LONG_REQUEST, SYSTEM, greedy  # noqa: E402
from bench.ws_client import SessionClient  # noqa: E402
from service.config import EngineSettings  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.loader import load_engine  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402
from service.engine.tokenizer import ChatMessage  # noqa: E402
from service.engine.types import ChatKey  # noqa: E402

TARGET_WS_VS_ENGINE = 0.97
SESSIONS = 8
STOP_AFTER_TOKENS = 3


def rate(stamps: list[tuple[float, int]]) -> float | None:
    """Tokens after the first frame / time from the first frame to the last."""
    if len(stamps) < 2 or stamps[-1][0] <= stamps[0][0]:
        return None
    return sum(n for _, n in stamps[1:]) / (stamps[-1][0] - stamps[0][0])


class BenchClient(SessionClient):
    """Sessions ``s0``..``sN-1`` of one connection, each a chat with the benchmark's system prompt."""

    @classmethod
    async def open(cls, url: str, sessions: int) -> BenchClient:
        client = await cls.connect(url)
        for i in range(sessions):
            await client.send({"type": "open", "session": f"s{i}", "system": SYSTEM})
            await client.next(f"s{i}")
        return client

    async def generate(self, session: str, max_tokens: int) -> tuple[list[tuple[float, int]], dict[str, Any]]:
        """One greedy reply: (arrival, tokens) per token frame, and the ``done`` frame."""
        params = {"temperature": 0, "max_tokens": max_tokens}
        await self.send({"type": "send", "session": session, "text": LONG_REQUEST, "params": params})
        stamps: list[tuple[float, int]] = []
        while True:
            at, frame = await self.next(session)
            if frame["type"] == "token":
                stamps.append((at, frame.get("tokens", 1)))
            elif frame["type"] == "done":
                return stamps, frame

    async def stop_latency_ms(self, session: str) -> float:
        params = {"temperature": 0, "max_tokens": 1000}
        await self.send({"type": "send", "session": session, "text": LONG_REQUEST, "params": params})
        tokens = 0
        while tokens < STOP_AFTER_TOKENS:
            _, frame = await self.next(session)
            tokens += frame["type"] == "token"
        sent = time.perf_counter()
        await self.send({"type": "stop", "session": session})
        while True:
            at, frame = await self.next(session)
            if frame["type"] == "done":
                assert frame["reason"] == "cancelled", frame
                return (at - sent) * 1000

    async def reopen(self, sessions: list[str]) -> None:
        """Close and open each session again, under a new chat."""
        for session in sessions:
            await self.send({"type": "close", "session": session})
            await self.next(session)
            await self.send({"type": "open", "session": session, "system": SYSTEM})
            await self.next(session)


def _engine_busy(metrics_url: str) -> bool:
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    busy = ("localchat_queue_depth", "localchat_running_generations", "localchat_unsettled_chats")
    return any(float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines() if line.startswith(busy))


async def service_idle(url: str) -> None:
    """Wait until the service's engine has no work left, background cache settling included
    (polling /metrics), so that it never competes with the next measurement."""
    metrics_url = url.replace("ws://", "http://").removesuffix("/ws") + "/metrics"
    # Another process: there is nothing to await but its /metrics.
    while await asyncio.to_thread(_engine_busy, metrics_url):  # noqa: ASYNC110
        await asyncio.sleep(0.02)


async def engine_rate(engine: Engine, chat: str, max_tokens: int) -> tuple[float | None, int]:
    messages = [ChatMessage(role="system", content=SYSTEM), ChatMessage(role="user", content=LONG_REQUEST)]
    stream = engine.submit(ChatKey(chat), engine.tokenizer.prompt_ids(messages), greedy(max_tokens))
    stamps = [(time.perf_counter(), delta.tokens) async for delta in stream]
    result = await stream.result()
    await engine.wait_idle()
    return rate(stamps), result.completion_tokens


async def measure(url: str, engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, list[Any]] = {"ws": [], "engine": [], "aggregate": [], "stop_ms": []}
    client = await BenchClient.open(url, SESSIONS)
    sessions = [f"s{i}" for i in range(SESSIONS)]
    try:
        await client.generate("s0", 8)  # warm up: first runs pay for allocation
        for round_ in range(args.rounds):
            # Fresh sessions every round: each generation prefills the same uncached prompt.
            await client.reopen(sessions)
            stamps, done = await client.generate("s0", args.tokens)
            await service_idle(url)
            raw["ws"].append({"tok_s": rate(stamps), "tokens": done["usage"]["completion_tokens"]})
            tok_s, tokens = await engine_rate(engine, f"bench-{round_}", args.tokens)
            raw["engine"].append({"tok_s": tok_s, "tokens": tokens})
            await client.reopen(sessions)
            start = time.perf_counter()
            replies = await asyncio.gather(*(client.generate(s, args.tokens) for s in sessions))
            end = time.perf_counter()
            await service_idle(url)
            total = sum(done["usage"]["completion_tokens"] for _, done in replies)
            raw["aggregate"].append({"tok_s": total / (end - start), "tokens": total})
            if args.verbose:
                print(
                    f"round {round_}: ws {raw['ws'][-1]} engine {raw['engine'][-1]} 8x {raw['aggregate'][-1]}"
                )
        for _ in range(args.stops):
            await client.reopen(["s0"])
            raw["stop_ms"].append(await client.stop_latency_ms("s0"))
            await service_idle(url)
    finally:
        await client.close()
    stops = sorted(raw["stop_ms"])
    ws = median(r["tok_s"] for r in raw["ws"] if r["tok_s"])
    alone = median(r["tok_s"] for r in raw["engine"] if r["tok_s"])
    return {
        "ws_decode_tok_s": ws,
        "engine_decode_tok_s": alone,
        "ws_vs_engine": ratio(ws, alone),
        f"ws_aggregate_tok_s_{SESSIONS}": median(r["tok_s"] for r in raw["aggregate"]),
        "stop_latency_ms_p50": median(stops),
        "stop_latency_ms_p99": percentile(stops, 0.99),
        "raw": raw,
        "engine_stats": asdict(engine.stats),
    }


@asynccontextmanager
async def service_process(model_dir: Path, scratch: Path, args: argparse.Namespace) -> AsyncIterator[str]:
    """``python -m service`` in its own process, as users run it; yields its WebSocket URL."""
    options = ["--threads", str(args.threads), "--model", str(model_dir), "--data-dir", str(scratch)]
    if args.database_url:
        options += ["--database-url", args.database_url]
    async with service_subprocess(*options) as running:
        yield running.url


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    model = resolve(
        parse_model_arg("default"), args.data_dir, precision=Precision(args.precision), progress=True
    )
    engine = load_engine(model, EngineSettings(threads=args.threads))
    await engine.start()
    try:
        with tempfile.TemporaryDirectory(prefix="localchat-bench-") as scratch:
            async with service_process(model.directory, Path(scratch), args) as url:
                data = await measure(url, engine, args)
    finally:
        await engine.close()
    data.update(
        {
            "targets": {
                "ws_decode_vs_engine": {
                    "target": TARGET_WS_VS_ENGINE,
                    "met": None
                    if data["ws_vs_engine"] is None
                    else data["ws_vs_engine"] >= TARGET_WS_VS_ENGINE,
                }
            },
            "model": model.id,
            "precision": args.precision,
            "threads": args.threads,
            "max_tokens": args.tokens,
            "rounds": args.rounds,
            "database": "url" if args.database_url else "embedded",
            **run_facts(began),
        }
    )
    return data


def table(data: dict[str, Any]) -> str:
    met = data["targets"]["ws_decode_vs_engine"]["met"]
    rows = [
        ["ws_decode_tok_s", fmt(data["ws_decode_tok_s"]), "", ""],
        ["engine_decode_tok_s", fmt(data["engine_decode_tok_s"]), "", ""],
        [
            "ws_vs_engine",
            fmt(data["ws_vs_engine"], 3),
            f">= {TARGET_WS_VS_ENGINE}",
            {True: "yes", False: "NO"}.get(met, "-"),
        ],
        [f"ws_aggregate_tok_s_{SESSIONS}", fmt(data[f"ws_aggregate_tok_s_{SESSIONS}"]), "", ""],
        ["stop_latency_ms_p50", fmt(data["stop_latency_ms_p50"]), "", ""],
        ["stop_latency_ms_p99", fmt(data["stop_latency_ms_p99"]), "", ""],
    ]
    head = (
        f"service benchmark: {data['model']} ({data['precision']}), {data['threads']} threads, "
        f"{data['max_tokens']} tokens, median of {data['rounds']}, database {data['database']}\n"
        + machine_line(data)
    )
    return head + "\n\n" + format_table(["metric", "value", "target", "met"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_service_arguments(parser)
    add_run_arguments(parser, out="service.json")
    parser.add_argument("--stops", type=int, default=40, help="stop-latency trials (default 40)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.tokens < 2 or args.rounds < 1 or args.stops < 0:
        parser.error("--threads >= 1, --tokens >= 2, --rounds >= 1, --stops >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(bench(args))
    print(table(data))
    print(f"\nwrote {write_json(args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
