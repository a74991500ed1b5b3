"""Beam search benchmark: what a beam costs per step, and how much of it streams early.

    .venv/bin/python bench/beam.py [--data-dir DIR] [--precision int8] [--threads 2]
                                   [--tokens 32] [--out bench/results/beam.json]

On the default model, one engine, side by side in one run, for each of a few chat prompts:
greedy decoding, then beam searches of width 1, 2, 4 and 8 (scorer ``logprob``) and 4 with
``use_rerank`` (``length_normalised``). For each: wall time, decode steps, rows per step, the
time of one search step against one greedy step (the beams run as rows of one batched step,
so a width-4 step should cost far less than 4 greedy steps), and the share of the winner's
tokens that streamed early (``final_prefix``) rather than at the end.

Prints a table and writes everything as JSON (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/beam.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import RESULTS_DIR, fmt, format_table, median, ratio, run_facts, write_json  # noqa: E402
from service.config import EngineSettings  # noqa: E402
from service.engine.beam import ScorerName  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.loader import load_engine  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402
from service.engine.types import BeamResult, ChatKey, SamplingParams  # noqa: E402

PROMPTS = (
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Say hello.",
    "What is the capital of France?",
    "Give me two tips for sleeping better.",
)
RUNS: tuple[tuple[str, int, ScorerName], ...] = (
    ("beam 1", 1, "logprob"),
    ("beam 2", 2, "logprob"),
    ("beam 4", 4, "logprob"),
    ("beam 8", 8, "logprob"),
    ("beam 4, rerank", 4, "length_normalised"),
)


async def one_prompt(engine: Engine, index: int, text: str, tokens: int) -> dict[str, Any]:
    ids = engine.tokenizer.prompt_ids([{"role": "user", "content": text}])
    # Each run under a new owner, so no run reuses another's cached prompt.
    start = time.perf_counter()
    steps_before = engine.stats.decode_steps
    greedy = await engine.submit(
        ChatKey(f"g{index}/x"), ids, SamplingParams(temperature=0, max_tokens=tokens)
    ).result()
    greedy_steps = engine.stats.decode_steps - steps_before
    out: dict[str, Any] = {
        "prompt": text,
        "greedy": {
            "wall_ms": (time.perf_counter() - start) * 1000,
            "tokens": greedy.completion_tokens,
            "decode_steps": greedy_steps,
            "step_ms": ratio((greedy.total_ms - (greedy.ttft_ms or 0)), greedy_steps),
        },
    }
    for name, width, scorer in RUNS:
        await engine.wait_idle()
        steps_before, rows_before = engine.stats.decode_steps, engine.stats.beam_rows
        start = time.perf_counter()
        result = await engine.submit_beam(
            ChatKey(f"b{index}-{name}/x"), ids, SamplingParams(max_tokens=tokens), width, scorer=scorer
        ).result()
        assert isinstance(result, BeamResult)
        steps = engine.stats.decode_steps - steps_before
        out[name] = {
            "wall_ms": (time.perf_counter() - start) * 1000,
            "tokens": result.completion_tokens,
            "streamed_early": result.streamed_early,
            "decode_steps": steps,
            "rows_per_step": ratio(engine.stats.beam_rows - rows_before, steps),
            "step_ms": ratio(result.total_ms - (result.ttft_ms or 0), steps),
            "text": result.text,
        }
    await engine.wait_idle()
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    model = resolve(
        parse_model_arg("default"), args.data_dir, precision=Precision(args.precision), progress=True
    )
    engine = await asyncio.to_thread(load_engine, model, EngineSettings(threads=args.threads, kv_slots=16))
    await engine.start()
    try:
        prompts = [await one_prompt(engine, i, text, args.tokens) for i, text in enumerate(PROMPTS)]
    finally:
        await engine.close()
    summary: dict[str, Any] = {}
    greedy_step = median(p["greedy"]["step_ms"] for p in prompts if p["greedy"]["step_ms"])
    for name, _, _ in RUNS:
        runs = [p[name] for p in prompts]
        step = median(r["step_ms"] for r in runs if r["step_ms"])
        summary[name] = {
            "median_wall_ms": median(r["wall_ms"] for r in runs),
            "median_step_ms": step,
            "step_vs_greedy_step": ratio(step, greedy_step),
            "median_rows_per_step": median(r["rows_per_step"] for r in runs if r["rows_per_step"]),
            "early_share": ratio(sum(r["streamed_early"] for r in runs), sum(r["tokens"] for r in runs)),
        }
    return {
        "model": model.id,
        "precision": args.precision,
        "threads": args.threads,
        "max_tokens": args.tokens,
        "greedy_median_step_ms": greedy_step,
        "greedy_median_wall_ms": median(p["greedy"]["wall_ms"] for p in prompts),
        "summary": summary,
        "prompts": prompts,
        **run_facts(began),
    }


def table(data: dict[str, Any]) -> str:
    greedy = [fmt(data["greedy_median_wall_ms"]), fmt(data["greedy_median_step_ms"], 2), "1.00", "1", "-"]
    rows = [["greedy", *greedy]]
    for name, s in data["summary"].items():
        rows.append(
            [
                name,
                fmt(s["median_wall_ms"]),
                fmt(s["median_step_ms"], 2),
                fmt(s["step_vs_greedy_step"], 2),
                fmt(s["median_rows_per_step"], 1),
                fmt(100 * (s["early_share"] or 0), 0) + " %",
            ]
        )
    header = ["run", "wall ms", "step ms", "step / greedy step", "rows/step", "streamed early"]
    return format_table(header, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache", help="model cache")
    parser.add_argument("--precision", choices=[p.value for p in Precision], default=Precision.INT8.value)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every run (default 32)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "beam.json", help="JSON output file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(bench(args))
    print(table(data))
    path = write_json(args.out, data)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
