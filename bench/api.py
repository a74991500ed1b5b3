"""API benchmark: what an ``openai`` SDK client of ``/v1/chat/completions`` sees, against the
engine alone, in one run.

    .venv/bin/python bench/api.py [--data-dir DIR] [--database-url URL] [--threads 2]
                                  [--tokens 128] [--rounds 3] [--out bench/results/api.json]

Starts the real service as its own process (as bench/service.py does), loads the same model
into an engine in this process, and alternates: one streamed greedy chat completion through
plain HTTP (the server-sent events read line by line, as curl would: the server's rate),
then the same generation on the engine alone (first to last delta), then through the SDK
(decode rate from the first content chunk to the finish chunk: what an SDK user sees when the
SDK shares the machine's cores with the server). Prints a table with the target
(>= 0.97x, as for ``chat.v1``) and writes JSON (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/api.py
    sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
from openai import AsyncOpenAI  # noqa: E402

from bench.common import (  # noqa: E402
    add_run_arguments,
    add_service_arguments,
    fmt,
    format_table,
    machine_line,
    median,
    ratio,
    run_facts,
    write_json,
)
from bench.engine import LONG_REQUEST, SYSTEM  # noqa: E402
from bench.service import engine_rate, service_idle, service_process  # noqa: E402
from service.config import EngineSettings  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.loader import load_engine  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402

TARGET_API_VS_ENGINE = 0.97


async def api_rate(client: AsyncOpenAI, model: str, max_tokens: int) -> tuple[float | None, int]:
    """Decode rate of one streamed greedy completion as the SDK delivers it, and its tokens."""
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": LONG_REQUEST}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    first = last = None
    tokens = 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = first or now
            last = now
    if first is None or last is None or last <= first or tokens < 2:
        return None, tokens
    return (tokens - 1) / (last - first), tokens


async def http_rate(http: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[float | None, int]:
    """The same request read as plain server-sent events (what curl or a few lines of any
    language see): the server's own rate, without the SDK's per-chunk parsing, which on a
    2-core machine competes with the server for the cores."""
    body = {
        "model": model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": LONG_REQUEST}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first = last = None
    tokens = 0
    async with http.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = orjson.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and (
                chunk["choices"][0]["delta"].get("content") or chunk["choices"][0]["finish_reason"]
            ):
                first = first or now
                last = now
    if first is None or last is None or last <= first or tokens < 2:
        return None, tokens
    return (tokens - 1) / (last - first), tokens


async def measure(url: str, engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, list[Any]] = {"api": [], "sdk": [], "engine": []}
    base = url.replace("ws://", "http://").removesuffix("/ws") + "/v1"
    async with (
        AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600) as client,
        httpx.AsyncClient(base_url=base, timeout=600) as http,
    ):
        model = (await client.models.list()).data[0].id
        await api_rate(client, model, 8)  # warm up: first runs pay for allocation
        await service_idle(url)
        for round_ in range(args.rounds):
            tok_s, tokens = await http_rate(http, model, args.tokens)
            await service_idle(url)
            raw["api"].append({"tok_s": tok_s, "tokens": tokens})
            tok_s, tokens = await engine_rate(engine, f"bench-{round_}", args.tokens)
            raw["engine"].append({"tok_s": tok_s, "tokens": tokens})
            tok_s, tokens = await api_rate(client, model, args.tokens)
            await service_idle(url)
            raw["sdk"].append({"tok_s": tok_s, "tokens": tokens})
            if args.verbose:
                print(f"round {round_}: api {raw['api'][-1]} engine {raw['engine'][-1]} sdk {raw['sdk'][-1]}")
    api = median(r["tok_s"] for r in raw["api"] if r["tok_s"])
    sdk = median(r["tok_s"] for r in raw["sdk"] if r["tok_s"])
    alone = median(r["tok_s"] for r in raw["engine"] if r["tok_s"])
    return {
        "api_decode_tok_s": api,
        "sdk_decode_tok_s": sdk,
        "engine_decode_tok_s": alone,
        "api_vs_engine": ratio(api, alone),
        "sdk_vs_engine": ratio(sdk, alone),
        "raw": raw,
        "engine_stats": asdict(engine.stats),
    }


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
    met = None if data["api_vs_engine"] is None else data["api_vs_engine"] >= TARGET_API_VS_ENGINE
    data.update(
        {
            "targets": {"api_decode_vs_engine": {"target": TARGET_API_VS_ENGINE, "met": met}},
            "model": model.id,
            "precision": args.precision,
            "threads": args.threads,
            "max_tokens": args.tokens,
            "rounds": args.rounds,
            **run_facts(began),
        }
    )
    return data


def table(data: dict[str, Any]) -> str:
    met = data["targets"]["api_decode_vs_engine"]["met"]
    rows = [
        ["api_decode_tok_s", fmt(data["api_decode_tok_s"]), "", ""],
        ["sdk_decode_tok_s", fmt(data["sdk_decode_tok_s"]), "", ""],
        ["engine_decode_tok_s", fmt(data["engine_decode_tok_s"]), "", ""],
        [
            "api_vs_engine",
            fmt(data["api_vs_engine"], 3),
            f">= {TARGET_API_VS_ENGINE}",
            {True: "yes", False: "NO"}.get(met, "-"),
        ],
        ["sdk_vs_engine", fmt(data["sdk_vs_engine"], 3), "", ""],
    ]
    head = (
        f"API benchmark: {data['model']} ({data['precision']}), {data['threads']} threads, "
        f"{data['max_tokens']} tokens, median of {data['rounds']}\n" + machine_line(data)
    )
    return head + "\n\n" + format_table(["metric", "value", "target", "met"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_service_arguments(parser)
    add_run_arguments(parser, out="api.json")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.tokens < 2 or args.rounds < 1:
        parser.error("--threads >= 1, --tokens >= 2, --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(bench(args))
    print(table(data))
    print(f"\nwrote {write_json(args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
