"""Engine benchmark: our engine against onnxruntime-genai on the same ONNX model, in one process.

    .venv/bin/python bench/engine.py [--data-dir DIR] [--precision int8] [--threads 2]
                                     [--tokens 128] [--rounds 3] [--out bench/results/engine.json]

Measures, on the default model prepared into the data directory (``<repo>/.cache`` unless
told, the test suite's cache):

* single-generation decode rate and prefill time (TTFT of an uncached ~200-token chat
  prompt), ours and ``onnxruntime_genai``'s ``Generator``, alternating A B A B so that a
  noisy machine hurts both alike; medians of ``--rounds``. A third column, our runner
  driven by a bare Python loop (no engine), splits the difference into what the engine
  costs and what the runtimes differ by;
* aggregate throughput of 1, 2, 4 and 8 concurrent chats: their first turns (cold
  ~200-token prompts), then their follow-up turns (history cached, as the service keeps
  it), each turn's prefill included;
* time to first token of the 5th turn of a conversation, served from the chat's cache
  versus recomputed under a fresh chat.

Prints a table with the targets and writes everything as JSON (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/engine.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    current_rss_mb,
    fmt,
    format_table,
    median,
    package_version,
    ratio,
    run_facts,
    write_json,
)
from service.config import EngineSettings  # noqa: E402
from service.engine.engine import Engine, GenerationStream  # noqa: E402
from service.engine.loader import load_engine  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import PreparedModel, parse_model_arg, resolve  # noqa: E402
from service.engine.runner import Runner  # noqa: E402
from service.engine.tokenizer import ChatMessage  # noqa: E402
from service.engine.types import ChatKey, GenerationResult, SamplingParams  # noqa: E402

CONCURRENCY = (1, 2, 4, 8)
PROMPT_ROOM = 256  # positions the bare runner keeps for the prompt
TURN_REPLY_TOKENS = 64

# Targets: decode at least as fast as onnxruntime-genai; 8 concurrent chats give at least
# 2.7x the throughput of one; a cached 5th turn starts in at most a quarter of a recompute.
TARGET_DECODE_VS_OG = 1.0
TARGET_AGGREGATE_8_VS_1 = 2.7
TARGET_TURN5_CACHED_VS_RECOMPUTED = 0.25

SYSTEM = (
    "You are a knowledgeable, patient assistant. Give thorough, well-organised answers "
    "in plain prose, with concrete examples, and do not stop until the question is fully answered."
)
LONG_REQUEST = (
    "I am preparing a talk for a local community group about how bread has been made through history. "
    "Please write a long, detailed essay that starts with the first flatbreads baked on hot stones, "
    "explains how people discovered leavening and wild yeast, and describes how ancient Egyptian, Greek "
    "and Roman bakers worked, including their ovens, their grains and the role bread played in daily life "
    "and in paying workers. Then continue with medieval guilds and village ovens, the arrival of milling "
    "machines, commercial yeast in the nineteenth century, and the sliced loaf of the twentieth century. "
    "Finish with today's revival of sourdough and home baking, and explain step by step how a beginner "
    "could bake a simple loaf at home this weekend."
)
FOLLOW_UP = (
    "Thank you. Now pick the single most important step for a beginner and explain it in detail, "
    "with the mistakes people usually make and how to avoid them."
)
CONVERSATION = (
    "I'm planning a ten-day trip to Japan in April. Which cities would you suggest for a first visit?",
    "How many days should I spend in Kyoto, and which temples there are worth the early start?",
    "What is the best way to get from Tokyo to Kyoto, and roughly what does it cost?",
    "Which traditional dishes should I try, and where would I find good versions of them?",
    "Last question: what etiquette should I keep in mind in temples, onsen and restaurants?",
)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@dataclass(frozen=True, slots=True)
class Run:
    """One single-stream generation: time to first token, decode rate after it, tokens made."""

    ttft_ms: float
    tok_s: float
    tokens: int


# ---- onnxruntime-genai baseline ------------------------------------------------------------


def import_og() -> Any | None:
    try:
        import onnxruntime_genai
    except ImportError:
        return None
    return onnxruntime_genai


class OgBaseline:
    """``og.Generator`` on the same directory (it holds a genai_config.json), CPU, N threads."""

    def __init__(self, og: Any, directory: Path, threads: int) -> None:
        self._og = og
        config = og.Config(str(directory))
        config.clear_providers()  # the CPU provider
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self._model = og.Model(config)

    def generate(self, prompt: list[int], max_tokens: int) -> Run:
        """Greedy; TTFT covers the prompt's run and the first token, the rate the rest."""
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + max_tokens)
        generator = self._og.Generator(self._model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)  # runs the prompt and computes its logits
        generator.generate_next_token()  # picks the first token from them
        first = time.perf_counter()
        tokens = 1
        while tokens < max_tokens and not generator.is_done():
            generator.generate_next_token()
            tokens += 1
        end = time.perf_counter()
        rate = (tokens - 1) / (end - first) if tokens > 1 else 0.0
        return Run(ttft_ms=(first - start) * 1000, tok_s=rate, tokens=tokens)


# ---- our runner without the engine ----------------------------------------------------------


def bare_decode(runner: Runner, prompt: list[int], max_tokens: int) -> Run:
    """Greedy with our runner in a plain loop, as og's loop drives its generator: no engine,
    no scheduler, no streaming. The gap to og is the runtimes'; the gap to ours, the engine's."""
    start = time.perf_counter()
    logits = runner.forward(0, np.asarray([prompt], dtype=np.int64), [0])
    token = int(np.argmax(logits[0]))
    first = time.perf_counter()
    tokens, position = 1, len(prompt)
    while tokens < max_tokens:
        logits = runner.forward(0, np.asarray([[token]], dtype=np.int64), [position])
        token = int(np.argmax(logits[0]))
        tokens += 1
        position += 1
    end = time.perf_counter()
    return Run(ttft_ms=(first - start) * 1000, tok_s=(tokens - 1) / (end - first), tokens=tokens)


# ---- our engine ------------------------------------------------------------------------------


async def generate(engine: Engine, chat: str, prompt: list[int], max_tokens: int) -> GenerationResult:
    """One generation, then wait until the engine has settled the chat's cache (idle again)."""
    result = await engine.submit(ChatKey(chat), prompt, greedy(max_tokens)).result()
    await engine.wait_idle()
    if result.error is not None:
        raise RuntimeError(f"generation failed: {result.error}")
    return result


def as_run(result: GenerationResult) -> Run:
    assert result.ttft_ms is not None
    return Run(ttft_ms=result.ttft_ms, tok_s=result.tokens_per_s, tokens=result.completion_tokens)


async def _drain(stream: GenerationStream) -> tuple[list[tuple[float, int]], GenerationResult]:
    """Read a stream's deltas, stamping each with its arrival time and token count."""
    marks: list[tuple[float, int]] = []
    async for delta in stream:
        marks.append((time.perf_counter(), delta.tokens))
    return marks, await stream.result()


@dataclass(frozen=True, slots=True)
class Concurrent:
    tok_s: float  # all generated tokens / (submit .. last result)
    decode_tok_s: float | None  # tokens while every generation was decoding / that window
    max_ttft_ms: float
    tokens: int


async def concurrent(
    engine: Engine, tag: str, prompts: list[list[int]], max_tokens: int
) -> tuple[Concurrent, list[GenerationResult]]:
    """Submit one generation per prompt at once (chat ``tag-i`` for prompt i); wait for all."""
    n = len(prompts)
    start = time.perf_counter()
    streams = [
        engine.submit(ChatKey(f"{tag}-{i}"), prompt, greedy(max_tokens)) for i, prompt in enumerate(prompts)
    ]
    drained = await asyncio.gather(*(_drain(s) for s in streams))
    end = time.perf_counter()
    await engine.wait_idle()
    results = [result for _, result in drained]
    if any(r.error is not None for r in results):
        raise RuntimeError(f"generation failed: {[r.error for r in results if r.error]}")
    tokens = sum(r.completion_tokens for r in results)
    # Steady state: from the moment the last generation produced its first token until the
    # first one finished, every generation was in the decode batch.
    marks = [m for m, _ in drained if m]
    decode_rate = None
    if len(marks) == n:
        window_start = max(m[0][0] for m in marks)
        window_end = min(m[-1][0] for m in marks)
        in_window = sum(count for m in marks for at, count in m if window_start < at <= window_end)
        if window_end > window_start and in_window:
            decode_rate = in_window / (window_end - window_start)
    measured = Concurrent(
        tok_s=tokens / (end - start),
        decode_tok_s=decode_rate,
        max_ttft_ms=max(r.ttft_ms or 0.0 for r in results),
        tokens=tokens,
    )
    return measured, results


async def two_turns(engine: Engine, tag: str, n: int, max_tokens: int) -> tuple[Concurrent, Concurrent, int]:
    """``n`` chats take their first turn at once (cold prompts), then their follow-up turn at
    once (each chat's history cached and settled, as between a user's turns). Returns both
    measurements and the follow-up prompt's new tokens (what its prefill computes)."""
    tokenizer = engine.tokenizer
    messages: list[ChatMessage] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": LONG_REQUEST},
    ]
    prompt = tokenizer.prompt_ids(messages)
    first, replies = await concurrent(engine, tag, [prompt] * n, max_tokens)
    follow_ups = []
    for reply in replies:
        turn: list[ChatMessage] = [
            *messages,
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": FOLLOW_UP},
        ]
        follow_ups.append(tokenizer.next_turn_ids(prompt + reply.token_ids, turn))
    second, results = await concurrent(engine, tag, follow_ups, max_tokens)
    new_tokens = min(r.prompt_tokens - r.cached_tokens for r in results)
    return first, second, new_tokens


async def fifth_turn_prompt(engine: Engine, chat: str) -> list[int]:
    """Hold four real turns in ``chat`` (greedy replies) and return the 5th turn's prompt ids."""
    tokenizer = engine.tokenizer
    messages: list[ChatMessage] = [{"role": "system", "content": SYSTEM}]
    held: list[int] = []  # what the chat's cache holds: earlier prompts and replies
    for text in CONVERSATION[:-1]:
        messages.append({"role": "user", "content": text})
        ids = tokenizer.next_turn_ids(held, messages) if held else tokenizer.prompt_ids(messages)
        reply = await generate(engine, chat, ids, TURN_REPLY_TOKENS)
        messages.append({"role": "assistant", "content": reply.text})
        held = ids + reply.token_ids
    messages.append({"role": "user", "content": CONVERSATION[-1]})
    return tokenizer.next_turn_ids(held, messages)


# ---- the benchmark ---------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    precision = Precision(args.precision)
    model: PreparedModel = resolve(
        parse_model_arg("default"), args.data_dir, precision=precision, progress=True
    )
    settings = EngineSettings(threads=args.threads)
    engine = await asyncio.to_thread(load_engine, model, settings)
    await engine.start()
    rss_engine = current_rss_mb()
    og_module = import_og()
    og = OgBaseline(og_module, model.directory, args.threads) if og_module is not None and args.og else None
    bare = Runner(
        model.model_file, device="cpu", threads=args.threads, slots=1, max_len=PROMPT_ROOM + args.tokens
    )
    try:
        return await _measure(args, engine, og, bare, model, rss_engine, began, og_module)
    finally:
        await engine.close()


async def _measure(
    args: argparse.Namespace,
    engine: Engine,
    og: OgBaseline | None,
    bare: Runner,
    model: PreparedModel,
    rss_engine: float | None,
    began: float,
    og_module: Any | None,
) -> dict[str, Any]:
    tokens: int = args.tokens
    rounds: int = args.rounds
    prompt = engine.tokenizer.prompt_ids(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": LONG_REQUEST}]
    )
    say = print if args.verbose else (lambda *_: None)

    # Warm up both (first runs allocate and pick kernels).
    if len(prompt) > PROMPT_ROOM:
        raise SystemExit(f"the benchmark prompt has {len(prompt)} tokens, more than {PROMPT_ROOM}")
    await generate(engine, "warmup", prompt, 8)
    bare_decode(bare, prompt, 8)
    if og is not None:
        og.generate(prompt, 8)

    # Single stream, alternating ours / bare runner / og.
    ours: list[Run] = []
    bare_runs: list[Run] = []
    theirs: list[Run] = []
    for r in range(rounds):
        ours.append(as_run(await generate(engine, f"single-{r}", prompt, tokens)))
        say(f"ours  round {r}: {ours[-1]}")
        bare_runs.append(bare_decode(bare, prompt, tokens))
        say(f"bare  round {r}: {bare_runs[-1]}")
        if og is not None:
            theirs.append(og.generate(prompt, tokens))
            say(f"og    round {r}: {theirs[-1]}")

    # Concurrency sweep, the whole sweep repeated per round: first turns, then follow-ups.
    first_turns: dict[int, list[Concurrent]] = {n: [] for n in CONCURRENCY}
    follow_ups: dict[int, list[Concurrent]] = {n: [] for n in CONCURRENCY}
    follow_up_new_tokens = 0
    for r in range(rounds):
        for n in CONCURRENCY:
            first, second, follow_up_new_tokens = await two_turns(engine, f"agg-{r}-{n}", n, tokens)
            first_turns[n].append(first)
            follow_ups[n].append(second)
            say(f"agg n={n} round {r}: first turns {first}, follow-ups {second}")

    # 5th turn: cached versus recomputed under a fresh chat (same ids, cold).
    cached: list[float] = []
    recomputed: list[float] = []
    cached_tokens: list[int] = []
    same_first_token = True
    turn5_prompt_tokens = 0
    for r in range(rounds):
        ids = await fifth_turn_prompt(engine, f"conv-{r}")
        turn5_prompt_tokens = len(ids)
        warm = await generate(engine, f"conv-{r}", ids, 1)
        cold = await generate(engine, f"conv-{r}-cold", ids, 1)
        assert warm.ttft_ms is not None
        assert cold.ttft_ms is not None
        cached.append(warm.ttft_ms)
        recomputed.append(cold.ttft_ms)
        cached_tokens.append(warm.cached_tokens)
        same_first_token &= warm.token_ids == cold.token_ids
        say(
            f"turn5 round {r}: cached {warm.ttft_ms:.1f} ms ({warm.cached_tokens} cached), "
            f"cold {cold.ttft_ms:.1f} ms"
        )

    decode = median(run.tok_s for run in ours)
    og_decode = median(run.tok_s for run in theirs)
    aggregate = {str(n): median(c.tok_s for c in first_turns[n]) for n in CONCURRENCY}
    follow_up = {str(n): median(c.tok_s for c in follow_ups[n]) for n in CONCURRENCY}
    turn5_cached = median(cached)
    turn5_recomputed = median(recomputed)
    decode_vs_og = ratio(decode, og_decode)
    agg_8_vs_1 = ratio(aggregate["8"], aggregate["1"])
    turn5_ratio = ratio(turn5_cached, turn5_recomputed)
    return {
        "benchmark": "engine",
        "model": model.id,
        "model_dir": str(model.directory),
        "precision": args.precision,
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "max_tokens": tokens,
        "rounds": rounds,
        "decode_tok_s": decode,
        "prefill_ms": median(run.ttft_ms for run in ours),
        "completion_tokens": median(run.tokens for run in ours),
        "bare_decode_tok_s": median(run.tok_s for run in bare_runs),
        "bare_prefill_ms": median(run.ttft_ms for run in bare_runs),
        "og_decode_tok_s": og_decode,
        "og_prefill_ms": median(run.ttft_ms for run in theirs),
        "og_completion_tokens": median(run.tokens for run in theirs),
        "og_available": og is not None,
        "og_status": "ran"
        if og is not None
        else ("not installed" if og_module is None else "skipped (--no-og)"),
        "aggregate_tok_s": aggregate,
        "aggregate_decode_tok_s": {
            str(n): median(_present(c.decode_tok_s for c in first_turns[n])) for n in CONCURRENCY
        },
        "aggregate_max_ttft_ms": {str(n): median(c.max_ttft_ms for c in first_turns[n]) for n in CONCURRENCY},
        "aggregate_tokens": {str(n): median(c.tokens for c in first_turns[n]) for n in CONCURRENCY},
        "follow_up_new_tokens": follow_up_new_tokens,
        "follow_up_tok_s": follow_up,
        "follow_up_decode_tok_s": {
            str(n): median(_present(c.decode_tok_s for c in follow_ups[n])) for n in CONCURRENCY
        },
        "follow_up_max_ttft_ms": {str(n): median(c.max_ttft_ms for c in follow_ups[n]) for n in CONCURRENCY},
        "follow_up_8_vs_1": ratio(follow_up["8"], follow_up["1"]),
        "turn5_prompt_tokens": turn5_prompt_tokens,
        "turn5_cached_tokens": median(cached_tokens),
        "turn5_ttft_cached_ms": turn5_cached,
        "turn5_ttft_recomputed_ms": turn5_recomputed,
        "turn5_same_first_token": same_first_token,
        "decode_vs_og": decode_vs_og,
        "aggregate_8_vs_1": agg_8_vs_1,
        "turn5_cached_vs_recomputed": turn5_ratio,
        "targets": {
            "decode_vs_og": {"min": TARGET_DECODE_VS_OG, "met": _at_least(decode_vs_og, TARGET_DECODE_VS_OG)},
            "aggregate_8_vs_1": {
                "min": TARGET_AGGREGATE_8_VS_1,
                "met": _at_least(agg_8_vs_1, TARGET_AGGREGATE_8_VS_1),
            },
            "turn5_cached_vs_recomputed": {
                "max": TARGET_TURN5_CACHED_VS_RECOMPUTED,
                "met": None if turn5_ratio is None else turn5_ratio <= TARGET_TURN5_CACHED_VS_RECOMPUTED,
            },
        },
        "raw": {
            "ours": [vars_of(run) for run in ours],
            "bare": [vars_of(run) for run in bare_runs],
            "og": [vars_of(run) for run in theirs],
            "aggregate": {str(n): [vars_of(c) for c in first_turns[n]] for n in CONCURRENCY},
            "follow_up": {str(n): [vars_of(c) for c in follow_ups[n]] for n in CONCURRENCY},
            "turn5_cached_ms": cached,
            "turn5_recomputed_ms": recomputed,
        },
        "engine_stats": vars_of(engine.stats),
        "og_version": None if og_module is None else package_version("onnxruntime-genai"),
        "rss_after_engine_load_mb": rss_engine,
        **run_facts(began),  # its peak_rss_mb: both runtimes in this one process
    }


def _present(values: Any) -> list[float]:
    return [v for v in values if v is not None]


def _at_least(value: float | None, minimum: float) -> bool | None:
    return None if value is None else value >= minimum


def vars_of(obj: Any) -> dict[str, Any]:
    """A slots dataclass as a plain dict (``vars`` needs a ``__dict__``)."""
    return {name: getattr(obj, name) for name in obj.__slots__}


# ---- output ---------------------------------------------------------------------------------


def _verdict(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def table(data: dict[str, Any]) -> str:
    og_ran = data["og_available"]
    agg = data["aggregate_tok_s"]
    agg_decode = data["aggregate_decode_tok_s"]
    agg_ttft = data["aggregate_max_ttft_ms"]
    targets = data["targets"]
    one = agg["1"]
    rows: list[list[str]] = [
        [
            "decode_tok_s",
            fmt(data["decode_tok_s"]),
            f">= og ({fmt(data['og_decode_tok_s'])})",
            _verdict(targets["decode_vs_og"]["met"]),
        ],
        ["og_decode_tok_s", fmt(data["og_decode_tok_s"]), "" if og_ran else f"og {data['og_status']}", ""],
        ["  bare runner loop tok/s", fmt(data["bare_decode_tok_s"]), "our runtime, no engine", ""],
        ["decode_vs_og", fmt(data["decode_vs_og"], 2), f">= {TARGET_DECODE_VS_OG}", ""],
        [f"prefill_ms ({data['prompt_tokens']} tokens)", fmt(data["prefill_ms"]), "", ""],
        ["og_prefill_ms", fmt(data["og_prefill_ms"]), "", ""],
    ]
    for n in CONCURRENCY:
        key = str(n)
        target = f"first turns, cold {data['prompt_tokens']}-token prompts" if n == 1 else ""
        met = ""
        if n == 8 and one is not None:
            target = f">= {TARGET_AGGREGATE_8_VS_1} x [1] ({fmt(TARGET_AGGREGATE_8_VS_1 * one)})"
            met = _verdict(targets["aggregate_8_vs_1"]["met"])
        rows.append([f"aggregate_tok_s[{n}]", fmt(agg[key]), target, met])
    for n in CONCURRENCY:
        key = str(n)
        rows.append(
            [f"  steady decode tok/s [{n}]", fmt(agg_decode[key]), f"max TTFT {fmt(agg_ttft[key], 0)} ms", ""]
        )
    follow = data["follow_up_tok_s"]
    follow_decode = data["follow_up_decode_tok_s"]
    for n in CONCURRENCY:
        key = str(n)
        note = f"{data['follow_up_new_tokens']} new tokens, history cached" if n == 1 else ""
        rows.append([f"follow_up_tok_s[{n}]", fmt(follow[key]), note, ""])
    for n in CONCURRENCY:
        key = str(n)
        rows.append([f"  steady decode tok/s [{n}]", fmt(follow_decode[key]), "", ""])
    rows.append(["follow_up_8_vs_1", fmt(data["follow_up_8_vs_1"], 2), "", ""])
    rows += [
        ["aggregate_8_vs_1", fmt(data["aggregate_8_vs_1"], 2), f">= {TARGET_AGGREGATE_8_VS_1}", ""],
        [
            f"turn5_ttft_cached_ms ({data['turn5_prompt_tokens']} tok)",
            fmt(data["turn5_ttft_cached_ms"]),
            f"<= {TARGET_TURN5_CACHED_VS_RECOMPUTED} x recomputed",
            _verdict(targets["turn5_cached_vs_recomputed"]["met"]),
        ],
        ["turn5_ttft_recomputed_ms", fmt(data["turn5_ttft_recomputed_ms"]), "", ""],
        [
            "turn5_cached_vs_recomputed",
            fmt(data["turn5_cached_vs_recomputed"], 3),
            f"<= {TARGET_TURN5_CACHED_VS_RECOMPUTED}",
            "",
        ],
    ]
    machine = data["machine"]
    og_version = data["og_version"] or "not installed"
    head = (
        f"engine benchmark: {data['model']} {data['precision']}, {data['threads']} threads, "
        f"{data['max_tokens']} tokens, median of {data['rounds']}\n"
        f"{machine['cpu_model']} ({machine['usable_cores']} usable cores, "
        f"load {machine['load_avg_1m']:.2f}); "
        f"onnxruntime {data['onnxruntime_version']}, onnxruntime-genai {og_version}; "
        f"peak RSS {data['peak_rss_mb']:.0f} MiB; {data['bench_seconds']:.0f} s"
    )
    return head + "\n\n" + format_table(["metric", "value", "target", "met"], rows)


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
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, ours and og's (default 2)")
    parser.add_argument("--tokens", type=int, default=128, help="max tokens per generation (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument(
        "--no-og", dest="og", action="store_false", help="skip the onnxruntime-genai baseline"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "engine.json", help="JSON output file")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every run as it ends")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.tokens < 2 or args.rounds < 1:
        parser.error("--threads >= 1, --tokens >= 2 and --rounds >= 1")
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
