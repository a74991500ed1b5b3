"""Prefix reuse benchmark: a first turn that shares its system prompt with a chat of the same user.

    .venv/bin/python bench/prefix.py [--data-dir DIR] [--precision int8] [--threads 2]
                                     [--rounds 5] [--out bench/results/prefix.json]

On the default model, greedy, one engine, side by side in one run:

* TTFT of a new chat's first turn whose long system prompt is resident in another chat of
  the same user (reused: copied from that cache) against the same prompt under a new user
  (what per-chat-only reuse gives: computed from scratch). Rounds alternate A B A B;
* the same with 8 new chats submitted at once;
* what a reuse costs: copying N positions between slots (``Runner.copy_slot``) against
  computing them (a prefill of N tokens), on a bare runner;
* the lookup: hashing a prompt and finding the longest prefix among hundreds of resident
  caches, against one decode step of one chat.

Prints a table and writes everything as JSON (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/prefix.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import RESULTS_DIR, fmt, format_table, median, ratio, run_facts, write_json  # noqa: E402
from service.config import EngineSettings  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.kv_cache import CacheEntry, KVCacheManager  # noqa: E402
from service.engine.loader import load_engine  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402
from service.engine.prefix_index import prompt_hashes  # noqa: E402
from service.engine.runner import Runner  # noqa: E402
from service.engine.types import ChatKey, GenerationResult, SamplingParams  # noqa: E402

SYSTEM = (
    "You are the support assistant of Northwind Outdoor Supply, a shop for hiking and camping gear. "
    "Answer in short, friendly paragraphs. You know the catalogue: tents, sleeping bags, stoves, "
    "backpacks, boots and rain wear. Orders ship within two working days; returns are free within "
    "thirty days if the item is unused and in its original packaging. Never promise delivery dates, "
    "never give medical advice, and when a question is about safety in the mountains, recommend "
    "asking a local guide. If you do not know an answer, say so and offer to pass the question on "
    "to a human colleague by email."
)
QUESTIONS = (
    "Which tent would you suggest for two people in the Alps?",
    "Can I return boots I wore once indoors?",
    "What stove works best above 3000 metres?",
    "How warm should a sleeping bag be for Scotland in March?",
    "Do you ship to Norway?",
    "Is a 40 litre backpack enough for a week?",
    "What should I wear for rain in the Lake District?",
    "Can you recommend boots for wide feet?",
    "Do your stoves take standard gas canisters?",
)
REPLY_TOKENS = 8
CONCURRENT = 8
RESIDENT_CACHES = 500  # for the lookup: caches of one user, beside as many of others


def greedy(max_tokens: int = REPLY_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def first_turn(engine: Engine, question: str) -> list[int]:
    return engine.tokenizer.prompt_ids(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    )


async def one(engine: Engine, key: str, prompt: list[int]) -> GenerationResult:
    result = await engine.submit(ChatKey(key), prompt, greedy()).result()
    await engine.wait_idle()
    if result.error is not None or result.ttft_ms is None:
        raise RuntimeError(f"generation failed: {result.error}")
    return result


async def together(engine: Engine, keys: list[str], prompts: list[list[int]]) -> list[GenerationResult]:
    streams = [engine.submit(ChatKey(k), p, greedy()) for k, p in zip(keys, prompts, strict=True)]
    results = [await s.result() for s in streams]
    await engine.wait_idle()
    return results


async def first_turns(engine: Engine, rounds: int, verbose: bool) -> dict[str, Any]:
    """Sequential and 8-at-once first turns: reused (same user) against computed (new users)."""
    await one(engine, "alice/warm", first_turn(engine, QUESTIONS[-1]))  # alice's system prompt is resident
    single: dict[str, list[float]] = {"reuse": [], "per_chat": []}
    cached: dict[str, list[int]] = {"reuse": [], "per_chat": []}
    burst_max: dict[str, list[float]] = {"reuse": [], "per_chat": []}
    burst_mean: dict[str, list[float]] = {"reuse": [], "per_chat": []}
    for r in range(rounds):
        question = QUESTIONS[r % len(QUESTIONS)]
        prompt = first_turn(engine, question)
        for mode in ("reuse", "per_chat") if r % 2 == 0 else ("per_chat", "reuse"):
            key = f"alice/s{r}" if mode == "reuse" else f"user-s{r}/c"
            result = await one(engine, key, prompt)
            assert result.ttft_ms is not None
            single[mode].append(result.ttft_ms)
            cached[mode].append(result.cached_tokens)
            prompts = [first_turn(engine, QUESTIONS[(r + i) % len(QUESTIONS)]) for i in range(CONCURRENT)]
            keys = [f"alice/b{r}-{i}" if mode == "reuse" else f"user-b{r}-{i}/c" for i in range(CONCURRENT)]
            results = await together(engine, keys, prompts)
            ttfts = [x.ttft_ms for x in results if x.ttft_ms is not None]
            burst_max[mode].append(max(ttfts))
            burst_mean[mode].append(sum(ttfts) / len(ttfts))
            if verbose:
                print(
                    f"round {r} {mode}: single {result.ttft_ms:.1f} ms ({result.cached_tokens} cached of "
                    f"{result.prompt_tokens}), 8 at once mean {burst_mean[mode][-1]:.1f} ms, "
                    f"max {burst_max[mode][-1]:.1f} ms"
                )
    return {
        "prompt_tokens": len(first_turn(engine, QUESTIONS[0])),
        "single_ttft_ms": {m: median(v) for m, v in single.items()},
        "single_cached_tokens": {m: median(v) for m, v in cached.items()},
        "burst8_mean_ttft_ms": {m: median(v) for m, v in burst_mean.items()},
        "burst8_max_ttft_ms": {m: median(v) for m, v in burst_max.items()},
        "runs": {"single": single, "burst8_max": burst_max, "burst8_mean": burst_mean},
    }


def copy_against_prefill(
    model_file: Path, threads: int, lengths: tuple[int, ...], reps: int
) -> list[dict[str, Any]]:
    """Copying N positions between two slots against computing them, on a bare runner."""
    runner = Runner(model_file, device="cpu", threads=threads, slots=2, max_len=max(lengths) + 8)
    rows = []
    rng = np.random.default_rng(0)
    for n in lengths:
        tokens = rng.integers(100, 20000, size=(1, n), dtype=np.int64)
        prefill, copy = [], []
        for _ in range(reps):
            start = time.perf_counter()
            runner.forward(0, tokens, [0])
            prefill.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            runner.copy_slot(0, 1, n)
            copy.append((time.perf_counter() - start) * 1000)
        rows.append({"positions": n, "prefill_ms": median(prefill), "copy_ms": median(copy)})
    runner.release_slot(0)
    runner.release_slot(1)
    return rows


def lookup_cost(prompt_len: int, reps: int) -> dict[str, Any]:
    """Hashing a prompt, and planning its reuse among RESIDENT_CACHES caches of its owner (all
    sharing the system prompt, as a user's chats do) plus as many of other owners."""
    rng = np.random.default_rng(1)
    system = rng.integers(0, 49152, size=200).tolist()
    manager = KVCacheManager(slots=2 * RESIDENT_CACHES, budget_tokens=10**9)
    for i in range(2 * RESIDENT_CACHES):
        owner = "alice" if i < RESIDENT_CACHES else f"user{i}"
        entry = CacheEntry(key=ChatKey(f"{owner}/c{i}"), slot=i, owner=owner)
        entry.ids = system + rng.integers(0, 49152, size=prompt_len - 200).tolist()
        entry.exact = len(entry.ids)
        manager.by_slot[i] = entry
        assert entry.key is not None
        manager.by_key[entry.key] = entry
        manager.index.sync(entry)
    target = manager.by_slot[RESIDENT_CACHES // 2]
    assert target is not None
    prompt = target.ids[: prompt_len - 40] + rng.integers(0, 49152, size=40).tolist()
    hashing, planning = [], []
    for _ in range(reps):
        start = time.perf_counter()
        hashes = prompt_hashes(prompt)
        hashing.append((time.perf_counter() - start) * 1e6)
        start = time.perf_counter()
        plan = manager.plan(ChatKey("alice/new"), prompt, hashes)
        planning.append((time.perf_counter() - start) * 1e6)
    if plan.source is not target or plan.length != prompt_len - 40:
        raise RuntimeError("the lookup missed the cache that shares the prompt")
    return {
        "prompt_tokens": prompt_len,
        "resident_caches": 2 * RESIDENT_CACHES,
        "of_the_owner": RESIDENT_CACHES,
        "hash_us": median(hashing),
        "plan_us": median(planning),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    model = resolve(
        parse_model_arg("default"), args.data_dir, precision=Precision(args.precision), progress=True
    )
    engine = await asyncio.to_thread(load_engine, model, EngineSettings(threads=args.threads, kv_slots=48))
    await engine.start()
    try:
        turns = await first_turns(engine, args.rounds, args.verbose)
        decode = await engine.submit(
            ChatKey("bob/decode"), first_turn(engine, "Tell me a story."), greedy(64)
        ).result()
        await engine.wait_idle()
    finally:
        await engine.close()
    step_us = 1e6 / decode.tokens_per_s if decode.tokens_per_s else None
    copies = copy_against_prefill(model.model_file, args.threads, (128, 512, 1024), reps=3)
    lookups = [lookup_cost(n, reps=200) for n in (256, 1024, 4096)]
    for row in lookups:
        row["fraction_of_decode_step"] = ratio(row["hash_us"] + row["plan_us"], step_us)
    return {
        "model": model.id,
        "precision": args.precision,
        "threads": args.threads,
        "rounds": args.rounds,
        "reply_tokens": REPLY_TOKENS,
        "first_turn": turns,
        "ttft_reuse_vs_per_chat": ratio(
            turns["single_ttft_ms"]["reuse"], turns["single_ttft_ms"]["per_chat"]
        ),
        "burst8_max_reuse_vs_per_chat": ratio(
            turns["burst8_max_ttft_ms"]["reuse"], turns["burst8_max_ttft_ms"]["per_chat"]
        ),
        "decode_step_us": step_us,
        "copy_vs_prefill": copies,
        "lookup": lookups,
        **run_facts(began),
    }


def table(data: dict[str, Any]) -> str:
    t = data["first_turn"]
    rows = [
        [
            "first turn TTFT, ms",
            fmt(t["single_ttft_ms"]["reuse"]),
            fmt(t["single_ttft_ms"]["per_chat"]),
            fmt(data["ttft_reuse_vs_per_chat"], 2),
        ],
        [
            "  cached tokens",
            fmt(t["single_cached_tokens"]["reuse"], 0),
            fmt(t["single_cached_tokens"]["per_chat"], 0),
            f"of {t['prompt_tokens']}",
        ],
        [
            "8 at once, mean TTFT, ms",
            fmt(t["burst8_mean_ttft_ms"]["reuse"]),
            fmt(t["burst8_mean_ttft_ms"]["per_chat"]),
            fmt(ratio(t["burst8_mean_ttft_ms"]["reuse"], t["burst8_mean_ttft_ms"]["per_chat"]), 2),
        ],
        [
            "8 at once, max TTFT, ms",
            fmt(t["burst8_max_ttft_ms"]["reuse"]),
            fmt(t["burst8_max_ttft_ms"]["per_chat"]),
            fmt(data["burst8_max_reuse_vs_per_chat"], 2),
        ],
    ]
    out = [format_table(["shared system prompt", "reuse", "per-chat only", "ratio"], rows), ""]
    copy_rows = [
        [
            str(r["positions"]),
            fmt(r["copy_ms"], 2),
            fmt(r["prefill_ms"], 1),
            fmt(ratio(r["copy_ms"], r["prefill_ms"]), 3),
        ]
        for r in data["copy_vs_prefill"]
    ]
    out += [format_table(["positions", "copy ms", "prefill ms", "copy/prefill"], copy_rows), ""]
    lookup_rows = [
        [
            str(r["prompt_tokens"]),
            str(r["resident_caches"]),
            fmt(r["hash_us"]),
            fmt(r["plan_us"]),
            fmt(r["fraction_of_decode_step"], 4),
        ]
        for r in data["lookup"]
    ]
    out.append(
        format_table(["prompt", "resident caches", "hash us", "lookup us", "of a decode step"], lookup_rows)
    )
    out.append(f"(one decode step, one chat: {fmt(data['decode_step_us'], 0)} us)")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO_ROOT / ".cache",
        help="where the model is prepared and cached (default: <repo>/.cache)",
    )
    parser.add_argument("--precision", choices=[p.value for p in Precision], default=Precision.INT8.value)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="repetitions; medians are reported (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "prefix.json", help="JSON output file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every round as it ends")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads >= 1 and --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(bench(args))
    print(table(data))
    path = write_json(args.out, data)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
