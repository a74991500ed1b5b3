"""Our service against llama.cpp's llama-server, side by side on the same GGUF files, in one run.

    .venv/bin/python bench/llama.py --build-llama-server      # once: builds llama-server (8+ min)
    .venv/bin/python bench/llama.py [--model default] [--model llama-3.2-1b:Q4_0 ...]
                                    [--precision native] [--precision int8] [--threads 2]
                                    [--rounds 2] [--tokens 64] [--chat-tokens 32] [--quick]
                                    [--merge] [--out bench/results/llama.json]

Both servers run as their own processes on the same GGUF, with the same thread count, the same
prompts and greedy decoding; the benchmark is their client: ours over ``chat.v1``, llama-server
over its OpenAI-compatible streaming ``/v1/chat/completions``. Each measurement runs on every
server in turn (A B A B ..., the order rotating each round), and every chat has a prompt of its
own (a distinct first line), so neither server gets a cache hit by accident; the case of a
system prompt shared across chats is measured apart. Per model it also measures the machine's
read bandwidth (2 threads, like the servers) and reports each decode rate as a fraction of the
bound that bandwidth sets on the bytes of weights each server reads per token.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/llama.py
    sys.path.insert(0, str(REPO_ROOT))

import orjson  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from bench import llama_server  # noqa: E402
from bench.bandwidth import gguf_bytes_per_token, onnx_bytes_per_token, read_bandwidth  # noqa: E402
from bench.chat_servers import LlamaServerAdapter, Server, ours_process, peak_rss_mb  # noqa: E402
from bench.common import (  # noqa: E402
    RESULTS_DIR,
    fmt,
    format_table,
    median,
    ratio,
    run_facts,
    timestamp,
    write_json,
)
from bench.engine import SYSTEM  # noqa: E402
from bench.llama_server import Reply  # noqa: E402
from bench.models import SHAPES, TYPES, ensure_synthetic  # noqa: E402
from service.engine.models.default_model import fetch_default_gguf  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402

LLAMA_CACHE = REPO_ROOT / ".cache" / "llama.cpp"
CHATS = 8
FOLLOW_UPS = 3  # turns 2-4
CONTEXT = 2048  # positions per chat, both servers
SHORT, LONG = 150, 1000  # prompt sizes, in tokens
TARGETS = {  # (figure, model kind): at least this ratio ours / llama-server (TTFT: llama / ours)
    ("decode", "default"): 1.5,
    ("decode", "1b"): 1.2,
    ("concurrent8", "1b"): 1.5,
    ("prefill1000", "default"): 1.0,
    ("prefill1000", "1b"): 1.0,
}
TARGET_BOUND_FRACTION = 0.8  # default model, native: decode >= 0.8 of the bandwidth bound

_TOPICS = (
    "the history of bread", "how bridges carry their loads", "the life of honey bees",
    "how tides work", "the invention of the printing press", "growing tomatoes at home",
    "how glaciers shape valleys", "the first railways", "how vaccines train the immune system",
    "the migration of birds", "how a violin makes its sound", "the chemistry of soap",
    "keeping a sourdough starter", "the building of cathedrals", "how maps were made at sea",
    "the water cycle", "why the sky is blue", "the craft of bookbinding", "how volcanoes form",
    "the story of tea", "how clocks keep time", "coral reefs", "the Silk Road", "how wind turbines work",
)  # fmt: skip
_WORDS = (
    "river", "stone", "market", "garden", "letter", "winter", "copper", "harbour", "lantern",
    "orchard", "meadow", "engine", "village", "valley", "candle", "window", "ladder", "basket",
    "thunder", "silver", "forest", "bridge", "mirror", "pocket", "compass", "feather", "marble",
    "cellar", "signal", "shadow", "blanket", "kettle", "saddle", "tower",
)  # fmt: skip


class Prompts:
    """Distinct prompts of a given size in tokens (SmolLM2's vocabulary, which every model here uses)."""

    def __init__(self, tokenizer: Tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.serial = itertools.count(1)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _notes(self, tokens: int) -> str:
        notes: list[str] = []
        while self.count(" ".join(notes)) < tokens:
            a, b, c = self.rng.sample(_WORDS, 3)
            n = self.rng.randint(2, 999)
            notes.append(f"Note {len(notes) + 1}: the {a} near the {b} held {n} {c}s.")
        return " ".join(notes)

    def chat(self, tokens: int) -> tuple[str, str]:
        """(system, user) of about ``tokens`` tokens in all (chat template included), unique from
        its first token on."""
        system = f"Conversation {next(self.serial)}-{self.rng.randrange(10**6)}. {SYSTEM}"
        question = (
            f"Please write a long, detailed essay about {self.rng.choice(_TOPICS)}, "
            "with its history, concrete examples and practical advice."
        )
        room = tokens - self.count(system) - self.count(question) - 32  # the template, the joins
        notes = self._notes(room) if room > 0 else ""
        return system, f"My notes: {notes}\n\n{question}" if notes else question

    def shared_system(self, tokens: int) -> str:
        """A system prompt of about ``tokens`` tokens, to be shared by many chats."""
        return f"{SYSTEM} House rules: {self._notes(tokens - self.count(SYSTEM) - 4)}"

    def follow_up(self) -> str:
        return f"Thank you. Now say more about point {self.rng.randint(1, 9)}, in other words."


# ---------------------------------------------------------------- the measurements


async def first_turn(server: Server, system: str, user: str, max_tokens: int) -> Reply:
    """A new chat's one turn; the chat is closed and the server idle again when it returns."""
    chat = await server.chat(system)
    reply = await chat.turn(user, max_tokens)
    await chat.close()
    await server.idle()
    return reply


async def single(server: Server, prompts: Prompts, tokens: int, max_tokens: int) -> dict[str, Any]:
    reply = await first_turn(server, *prompts.chat(tokens), max_tokens)
    return {
        "ttft_ms": reply.ttft_ms,
        "decode_tok_s": reply.decode_tok_s,
        "prompt_tokens": reply.prompt_tokens,
        "cached_tokens": reply.cached_tokens,
        "completion_tokens": reply.completion_tokens,
        "finish_reason": reply.finish_reason,
        "server_timings": reply.timings,
    }


async def shared(server: Server, system: str, prompts: Prompts) -> dict[str, Any]:
    """A new chat's first turn under a system prompt other chats of the same user already used."""
    reply = await first_turn(server, system, prompts.follow_up(), 2)
    return {
        "ttft_ms": reply.ttft_ms,
        "prompt_tokens": reply.prompt_tokens,
        "cached_tokens": reply.cached_tokens,
    }


async def concurrent(server: Server, prompts: Prompts, max_tokens: int) -> dict[str, Any]:
    """8 chats at once: their first turns (total tok/s), then turns 2-4 all at once (TTFTs)."""
    firsts = [prompts.chat(SHORT) for _ in range(CHATS)]
    chats = [await server.chat(system) for system, _ in firsts]
    started = time.perf_counter()
    replies = await asyncio.gather(
        *(c.turn(user, max_tokens) for c, (_, user) in zip(chats, firsts, strict=True))
    )
    elapsed = time.perf_counter() - started
    await server.idle()
    follow: list[Reply] = []
    for _ in range(FOLLOW_UPS):
        follow += await asyncio.gather(*(c.turn(prompts.follow_up(), max_tokens) for c in chats))
        await server.idle()
    for c in chats:
        await c.close()
    total = sum(r.completion_tokens for r in replies)
    ttfts = [r.ttft_ms for r in follow if r.ttft_ms is not None]
    return {
        "tok_s": total / elapsed,
        "completion_tokens": total,
        "prompt_tokens": sum(r.prompt_tokens for r in replies),
        "seconds": elapsed,
        "follow_up_ttft_ms_median": median(ttfts),
        "follow_up_ttft_ms": ttfts,
        "follow_up_cached_tokens": [r.cached_tokens for r in follow],
        "follow_up_prompt_tokens": [r.prompt_tokens for r in follow],
    }


async def measure(servers: list[Server], args: argparse.Namespace, tokenizer: Tokenizer) -> dict[str, Any]:
    prompts = Prompts(tokenizer, seed=args.seed)
    shared_system = prompts.shared_system(SHORT - 30)
    raw: dict[str, dict[str, list[Any]]] = {s.name: {} for s in servers}

    def record(server: Server, key: str, value: Any) -> None:
        raw[server.name].setdefault(key, []).append(value)
        if args.verbose:
            print(f"  {server.name:>14} {key}: {_brief(value)}", flush=True)

    for server in servers:  # warm up (first runs allocate), and make the shared prompt resident
        await single(server, prompts, 40, 4)
        await shared(server, shared_system, prompts)
    steps: list[tuple[str, Callable[[Server], Awaitable[Any]]]] = [
        ("single", lambda s: single(s, prompts, SHORT, args.tokens)),
        ("long", lambda s: single(s, prompts, LONG, 2)),
        ("shared", lambda s: shared(s, shared_system, prompts)),
        ("concurrent", lambda s: concurrent(s, prompts, args.chat_tokens)),
    ]
    for round_ in range(args.rounds):
        order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
        for key, step in steps:
            for server in order:
                record(server, key, await step(server))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    out: dict[str, Any] = {}
    for server in servers:
        runs = raw[server.name]
        out[server.name] = {
            "decode_tok_s": median(r["decode_tok_s"] for r in runs["single"] if r["decode_tok_s"]),
            "ttft_150_ms": median(r["ttft_ms"] for r in runs["single"]),
            "ttft_1000_ms": median(r["ttft_ms"] for r in runs["long"]),
            "ttft_shared_system_ms": median(r["ttft_ms"] for r in runs["shared"]),
            "concurrent8_tok_s": median(r["tok_s"] for r in runs["concurrent"]),
            "concurrent8_tokens": median(
                r["prompt_tokens"] + r["completion_tokens"] for r in runs["concurrent"]
            ),
            "concurrent8_completion_tokens": median(r["completion_tokens"] for r in runs["concurrent"]),
            "follow_up_ttft_ms": median(r["follow_up_ttft_ms_median"] for r in runs["concurrent"]),
            "prompt_tokens_150": median(r["prompt_tokens"] for r in runs["single"]),
            "prompt_tokens_1000": median(r["prompt_tokens"] for r in runs["long"]),
            "cached_tokens_distinct": max(r["cached_tokens"] for r in runs["single"] + runs["long"]),
            "cached_tokens_shared": median(r["cached_tokens"] for r in runs["shared"]),
            "peak_rss_mb": peak_rss_mb(server.pid),
            "raw": runs,
        }
    return out


def _brief(value: Any) -> str:
    if isinstance(value, dict):
        keys = ("ttft_ms", "decode_tok_s", "tok_s", "follow_up_ttft_ms_median", "cached_tokens")
        return " ".join(f"{k}={fmt(value[k])}" for k in keys if k in value)
    return str(value)


# ---------------------------------------------------------------- models and the run


@dataclass(frozen=True, slots=True)
class BenchModel:
    name: str
    kind: str  # "default", "1b" or "other": which targets apply
    gguf: Path
    spec: str  # what resolve() is given


def bench_model(name: str, data_dir: Path) -> BenchModel:
    if name == "default":
        return BenchModel(name, "default", fetch_default_gguf(data_dir), "default")
    if ":" in name and not name.endswith(".gguf"):
        shape, qtype = name.split(":", 1)
        if shape not in SHAPES or qtype not in TYPES:
            raise SystemExit(f"--model {name}: shapes {sorted(SHAPES)}, types {sorted(TYPES)}")
        path = ensure_synthetic(data_dir, SHAPES[shape], TYPES[qtype])
        return BenchModel(name, "1b" if shape == "llama-3.2-1b" else "other", path, str(path))
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--model {name}: not a GGUF file")
    return BenchModel(path.name, "other", path, str(path))


def targets(model: BenchModel, result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (figure, kind), target in TARGETS.items():
        if kind != model.kind:
            continue
        value = result.get(f"{figure}_vs_llama")
        out[figure] = {
            "target": target,
            "value": value,
            "met": None if value is None else value >= target,
            **headroom(figure, target, result),
        }
    if model.kind == "default" and "native" in result["ours"]:
        value = result["ours"]["native"]["decode_fraction_of_bound"]
        out["decode_fraction_of_bound"] = {
            "target": TARGET_BOUND_FRACTION,
            "value": value,
            "met": None if value is None else value >= TARGET_BOUND_FRACTION,
        }
    return out


def headroom(figure: str, target: float, result: dict[str, Any]) -> dict[str, Any]:
    """What meeting ``target`` would take, from this run's own measurements.

    Decode: the weight stream (GB/s, and as a fraction of the measured read bandwidth) that
    ``target`` times llama-server's rate needs, for the bytes our graph reads per token and for
    the file's own bytes (what llama-server reads), beside the fastest stream any server
    decoded at in this run. Concurrent chats: every token of that run (prompts and replies) at
    our prefill's cost per token (the ~150-token TTFT over its prompt, the size of each chat's
    first turn) is the time the run cannot go below while its products are bound by compute;
    its rate against llama-server's is the highest ratio our kernels allow.
    """
    ours, llama = result["ours"][result["ratios_of"]], result["llama_server"]
    if figure == "decode":
        needed = target * llama["decode_tok_s"]
        return {
            "needs_fraction_of_bound": ratio(needed, ours["bound_tok_s"]),
            "needs_fraction_of_bound_file_bytes": ratio(needed, llama["bound_tok_s"]),
            "needs_gb_s": needed * ours["bytes_per_token"] / 1e9,
            "needs_gb_s_file_bytes": needed * llama["bytes_per_token"] / 1e9,
            "fastest_stream_gb_s": max(f["streamed_gb_s"] for f in [*result["ours"].values(), llama]),
        }
    if figure == "concurrent8":
        floor_s = ours["concurrent8_tokens"] * ours["ttft_150_ms"] / ours["prompt_tokens_150"] / 1000
        ceiling = ours["concurrent8_completion_tokens"] / floor_s
        vs_llama = ratio(ceiling, llama["concurrent8_tok_s"])
        return {"compute_ceiling_tok_s": ceiling, "ceiling_vs_llama": vs_llama}
    return {}


async def bench_one(model: BenchModel, args: argparse.Namespace, binary: Path) -> dict[str, Any]:
    print(f"== {model.name}: {model.gguf}", flush=True)
    prepared = {
        p: resolve(parse_model_arg(model.spec), args.data_dir, precision=Precision(p), progress=True)
        for p in args.precision
    }
    tokenizer = Tokenizer.from_file(str(next(iter(prepared.values())).directory / "tokenizer.json"))
    bandwidth = await asyncio.to_thread(read_bandwidth, args.threads)
    gb_s = bandwidth["gb_s"]
    llama_bytes = gguf_bytes_per_token(model.gguf)
    ours_bytes = {p: onnx_bytes_per_token(m.model_file) for p, m in prepared.items()}
    with tempfile.TemporaryDirectory(prefix="localchat-llama-bench-") as scratch:
        async with AsyncExitStack() as stack:
            servers: list[Server] = []
            for p, m in prepared.items():
                data = Path(scratch, p)
                await asyncio.to_thread(data.mkdir)
                servers.append(
                    await stack.enter_async_context(
                        ours_process(m.directory, data, threads=args.threads, context=CONTEXT, name=p)
                    )
                )
            llama = await stack.enter_async_context(
                llama_server.llama_server(
                    binary,
                    model.gguf,
                    threads=args.threads,
                    slots=CHATS,
                    context=CONTEXT,
                    extra=args.llama_arg,
                )
            )
            servers.append(LlamaServerAdapter("llama-server", llama.pid, llama))
            runs = await measure(servers, args, tokenizer)
    llama_figures = runs.pop("llama-server")

    def bound(figures: dict[str, Any], per_token: int) -> None:
        figures["bytes_per_token"] = per_token
        figures["bound_tok_s"] = gb_s * 1e9 / per_token
        figures["decode_fraction_of_bound"] = ratio(figures["decode_tok_s"], figures["bound_tok_s"])
        figures["streamed_gb_s"] = figures["decode_tok_s"] * per_token / 1e9

    bound(llama_figures, llama_bytes["bytes_per_token"])
    for p, figures in runs.items():
        bound(figures, ours_bytes[p]["bytes_per_token"])
    first = runs[args.precision[0]]
    ratios = {
        "decode_vs_llama": ratio(first["decode_tok_s"], llama_figures["decode_tok_s"]),
        "prefill150_vs_llama": ratio(llama_figures["ttft_150_ms"], first["ttft_150_ms"]),
        "prefill1000_vs_llama": ratio(llama_figures["ttft_1000_ms"], first["ttft_1000_ms"]),
        "shared_system_vs_llama": ratio(
            llama_figures["ttft_shared_system_ms"], first["ttft_shared_system_ms"]
        ),
        "concurrent8_vs_llama": ratio(first["concurrent8_tok_s"], llama_figures["concurrent8_tok_s"]),
        "follow_up_vs_llama": ratio(llama_figures["follow_up_ttft_ms"], first["follow_up_ttft_ms"]),
    }
    result: dict[str, Any] = {
        "gguf": str(
            model.gguf.relative_to(REPO_ROOT) if model.gguf.is_relative_to(REPO_ROOT) else model.gguf
        ),
        "kind": model.kind,
        "ratios_of": args.precision[0],
        **ratios,
        "bandwidth": bandwidth,
        "load_avg_1m": os.getloadavg()[0],
        "timestamp": timestamp(),
        "ours": runs,
        "llama_server": llama_figures,
    }
    result["targets"] = targets(model, result)
    return result


async def bench(args: argparse.Namespace, binary: Path) -> dict[str, Any]:
    began = time.perf_counter()
    models = [bench_model(name, args.data_dir) for name in args.model]
    results = {m.name: await bench_one(m, args, binary) for m in models}
    return {
        "models": results,
        "llama_server_version": llama_server.version(binary),
        "llama_server_extra_args": args.llama_arg,
        "threads": args.threads,
        "rounds": args.rounds,
        "max_tokens": args.tokens,
        "chat_max_tokens": args.chat_tokens,
        "precisions": args.precision,
        "seed": args.seed,
        **run_facts(began),
    }


def table(data: dict[str, Any]) -> str:
    out: list[str] = []
    rows_spec = (
        ("decode tok/s", "decode_tok_s", 1, "decode_vs_llama"),
        ("  fraction of bandwidth bound", "decode_fraction_of_bound", 2, None),
        ("  weights streamed, GB/s", "streamed_gb_s", 1, None),
        ("TTFT ~150-token prompt, ms", "ttft_150_ms", 0, "prefill150_vs_llama"),
        ("TTFT ~1000-token prompt, ms", "ttft_1000_ms", 0, "prefill1000_vs_llama"),
        ("TTFT shared system prompt, ms", "ttft_shared_system_ms", 0, "shared_system_vs_llama"),
        (f"{CHATS} chats at once, tok/s", "concurrent8_tok_s", 1, "concurrent8_vs_llama"),
        (f"TTFT turns 2-4, {CHATS} chats, ms", "follow_up_ttft_ms", 0, "follow_up_vs_llama"),
        ("peak RSS, MiB", "peak_rss_mb", 0, None),
        ("weights read per token, MB", "bytes_per_token", 1, None),
    )
    for name, result in data["models"].items():
        ours = result["ours"]
        header = ["metric", *(f"ours {p}" for p in ours), "llama-server", f"ratio ({result['ratios_of']})"]
        rows = []
        for label, key, digits, ratio_key in rows_spec:
            cells = [*(ours[p][key] for p in ours), result["llama_server"][key]]
            if key == "bytes_per_token":
                cells = [c / 1e6 for c in cells]
            rows.append([label, *(fmt(c, digits) for c in cells), fmt(result.get(ratio_key or ""), 2)])
        bw = result["bandwidth"]
        out.append(
            f"{name} ({result['gguf']}): read bandwidth {bw['gb_s']:.1f} GB/s "
            f"({bw['threads']} threads, best of {len(bw['gb_s_passes'])}; median {bw['gb_s_median']:.1f})"
        )
        out.append(format_table(header, rows))
        for figure, t in result["targets"].items():
            met = {True: "met", False: "NOT met"}.get(t["met"], "-")
            why = ""
            if "needs_gb_s" in t:
                why = (
                    f"; it needs a {fmt(t['needs_gb_s'])} GB/s weight stream, "
                    f"{fmt(t['needs_fraction_of_bound'], 2)} of the bound "
                    f"({fmt(t['needs_gb_s_file_bytes'])} GB/s, "
                    f"{fmt(t['needs_fraction_of_bound_file_bytes'], 2)}, with the file's bytes); "
                    f"the fastest stream here: {fmt(t['fastest_stream_gb_s'])} GB/s"
                )
            elif "ceiling_vs_llama" in t:
                why = f"; at our prefill's cost per token the ceiling is {fmt(t['ceiling_vs_llama'], 2)}"
            out.append(f"  target {figure} >= {t['target']}: {fmt(t['value'], 2)} ({met}){why}")
        out.append("")
    m = data["machine"]
    out.append(
        f"{data['llama_server_version']}; {data['threads']} threads, median of {data['rounds']} "
        f"alternated rounds; {m['cpu_model']} ({m['usable_cores']} cores, load {m['load_avg_1m']:.2f}); "
        f"{data['bench_seconds']:.0f} s.\nRatios: ours/llama-server for rates, llama-server/ours for times."
    )
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--build-llama-server",
        action="store_true",
        help=f"build llama-server into {LLAMA_CACHE} first (once; 8+ minutes on 2 cores)",
    )
    parser.add_argument("--llama-server", type=Path, default=None, help="use this llama-server binary")
    parser.add_argument(
        "--llama-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra llama-server argument (repeatable; e.g. --llama-arg=--poll --llama-arg=0)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=REPO_ROOT / ".cache", help="model cache (default <repo>/.cache)"
    )
    parser.add_argument(
        "--model",
        action="append",
        help="'default', a synthetic SHAPE:TYPE (e.g. llama-3.2-1b:Q4_0) or a .gguf; repeatable",
    )
    parser.add_argument(
        "--precision",
        action="append",
        choices=["native", "int8", "int4", "fp32"],
        help="our build(s) of each model; the first is the one ratios use (default: native)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="single-stream decode tokens (default 64)")
    parser.add_argument(
        "--chat-tokens", type=int, default=32, help="tokens per reply of the 8 chats (default 32)"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 32 decode tokens, 16 per chat reply")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge", action="store_true", help="keep other models' results already in --out")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "llama.json")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.model = args.model or ["default"]
    args.precision = list(dict.fromkeys(args.precision or ["native"]))
    if args.quick:
        args.rounds, args.tokens, args.chat_tokens = 1, 32, 16
    if args.threads < 1 or args.rounds < 1 or args.tokens < 2 or args.chat_tokens < 2:
        parser.error("--threads, --rounds >= 1; --tokens, --chat-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    binary = args.llama_server or llama_server.find_binary(LLAMA_CACHE)
    if args.build_llama_server and binary is None:
        binary = llama_server.build(LLAMA_CACHE)
    if binary is None:
        print(f"no llama-server under {LLAMA_CACHE}: run with --build-llama-server once", file=sys.stderr)
        return 2
    data = asyncio.run(bench(args, binary))
    if args.merge and args.out.is_file():
        kept = orjson.loads(args.out.read_bytes())
        data["models"] = {**kept.get("models", {}), **data["models"]}
    print(table(data))
    print(f"\nwrote {write_json(args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
