"""Where the time of 8 chats at once goes: the engine's model runs, timed one by one.

    .venv/bin/python bench/schedule.py [--model llama-3.2-1b:Q4_0] [--precision native]
                                       [--chunk 64 --chunk 512] [--tokens 32] [--threads 2]
                                       [--rounds 2] [--out bench/results/schedule.json]

The engine in this process (no server, no client) takes the first turns of 8 chats at once,
each a distinct ~140-token prompt and ``--tokens`` greedy tokens, as ``bench/llama.py``'s
"8 chats at once" does through the service. Every model run is timed: prefill chunks (tokens,
ms per token) and batched decode steps (by batch size). It runs once per ``--chunk``, the
engine's ``interleaved_chunk`` (prompt tokens per prefill run while others decode): 64 is the
default, and a chunk as long as a whole prompt is the schedule that spends the least on
decode steps (fewest steps, largest batches) at the price of stalling running replies for a
whole prompt. The floor is every token of the run at the prefill's cost per token.

With ``--llama-json`` (default ``bench/results/llama.json``) holding llama-server's rate for
the same model, each total is also given as a ratio to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/schedule.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import RESULTS_DIR, fmt, format_table, ratio, run_facts, write_json  # noqa: E402
from bench.engine import concurrent  # noqa: E402
from bench.llama import CHATS, bench_model  # noqa: E402
from service.config import EngineSettings  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.loader import load_engine  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402

PROMPT_TOKENS = 140  # what bench/llama.py's ~150-token chat prompts come to


class TimedRuns:
    """Wraps the engine's runner: every model run's shape, seconds and end."""

    def __init__(self, engine: Engine) -> None:
        self.runs: list[tuple[int, int, float, float]] = []  # (batch, tokens per row, seconds, ended)
        forward = engine.runner.forward

        def timed(first_slot: int, tokens: np.ndarray, past_lengths: Any) -> np.ndarray:
            started = time.perf_counter()
            logits = forward(first_slot, tokens, past_lengths)
            ended = time.perf_counter()
            self.runs.append((*tokens.shape, ended - started, ended))
            return logits

        engine.runner.forward = timed  # type: ignore[method-assign]


async def eight_chats(engine: Engine, runs: TimedRuns, tokens: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(100, 40000, PROMPT_TOKENS)] for _ in range(CHATS)]
    runs.runs.clear()
    started = time.perf_counter()
    measured, _ = await concurrent(engine, f"s{seed}", prompts, tokens)
    seconds = measured.tokens / measured.tok_s  # from the submits to the last reply's end
    # The turns' own runs: after the last reply the engine settles the chats' caches, not theirs.
    timed = [(b, s, t) for b, s, t, ended in runs.runs if ended <= started + seconds]
    prefills = [(s, t) for b, s, t in timed if s > 1]
    decodes = [(b, t) for b, s, t in timed if s == 1]
    prefill_tokens, prefill_s = sum(s for s, _ in prefills), sum(t for _, t in prefills)
    by_batch: dict[int, list[float]] = defaultdict(list)
    for batch, t in decodes:
        by_batch[batch].append(t)
    per_token = prefill_s / prefill_tokens
    return {
        "seconds": seconds,
        "tok_s": measured.tok_s,
        "completion_tokens": measured.tokens,
        "prefill_runs": len(prefills),
        "prefill_tokens": prefill_tokens,
        "prefill_s": prefill_s,
        "prefill_ms_per_token": per_token * 1000,
        "decode_steps": len(decodes),
        "decode_tokens": sum(b for b, _ in decodes),
        "decode_s": sum(t for _, t in decodes),
        "decode_ms_by_batch": {str(b): float(np.median(ts)) * 1000 for b, ts in sorted(by_batch.items())},
        "outside_runs_s": seconds - prefill_s - sum(t for _, t in decodes),
        "floor_s": (prefill_tokens + measured.tokens) * per_token,
    }


async def measure(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    model = bench_model(args.model, args.data_dir)
    prepared = resolve(parse_model_arg(model.spec), args.data_dir, precision=args.precision, progress=True)
    out: dict[str, dict[str, Any]] = {}
    for chunk in args.chunk:
        engine = await asyncio.to_thread(
            load_engine, prepared, EngineSettings(threads=args.threads, interleaved_chunk=chunk)
        )
        runs = TimedRuns(engine)
        await engine.start()
        try:
            await eight_chats(engine, runs, 2, seed=99)  # warm up: first runs allocate
            samples = [await eight_chats(engine, runs, args.tokens, seed=r) for r in range(args.rounds)]
        finally:
            await engine.close()
        best = min(samples, key=lambda s: s["seconds"])
        out[str(chunk)] = {**best, "tok_s_runs": [s["tok_s"] for s in samples]}
        print(f"chunk {chunk}: {best['tok_s']:.1f} tok/s", flush=True)
    return out


def llama_rate(path: Path, model: str) -> float | None:
    """llama-server's 8-chat rate for ``model`` from a ``bench/llama.py`` result, if there."""
    try:
        data = json.loads(path.read_text())
        return float(data["models"][model]["llama_server"]["concurrent8_tok_s"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def table(data: dict[str, Any]) -> str:
    header = ["interleaved chunk", *data["chunks"]]
    chunks = list(data["chunks"].values())
    rows = [
        ["total tok/s", *(fmt(c["tok_s"]) for c in chunks)],
        ["  / llama-server's", *(fmt(ratio(c["tok_s"], data["llama_tok_s"]), 2) for c in chunks)],
        ["seconds", *(fmt(c["seconds"], 2) for c in chunks)],
        ["floor: every token at prefill cost, s", *(fmt(c["floor_s"], 2) for c in chunks)],
        ["prefill runs / tokens", *(f"{c['prefill_runs']} / {c['prefill_tokens']}" for c in chunks)],
        [
            "prefill s (ms per token)",
            *(f"{c['prefill_s']:.2f} ({c['prefill_ms_per_token']:.2f})" for c in chunks),
        ],
        ["decode steps / tokens", *(f"{c['decode_steps']} / {c['decode_tokens']}" for c in chunks)],
        ["decode s", *(fmt(c["decode_s"], 2) for c in chunks)],
        ["outside model runs, s", *(fmt(c["outside_runs_s"], 2) for c in chunks)],
    ]
    batches = sorted({b for c in chunks for b in c["decode_ms_by_batch"]}, key=int)
    rows += [
        [f"decode step ms, batch {b}", *(fmt(c["decode_ms_by_batch"].get(b)) for c in chunks)]
        for b in batches
    ]
    return (
        f"{data['model']} ({data['precision']}), {CHATS} chats' first turns, {PROMPT_TOKENS}-token prompts, "
        f"{data['tokens']} tokens each; in-process engine, best of {data['rounds']}\n"
        + format_table(header, rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache")
    parser.add_argument("--model", default="llama-3.2-1b:Q4_0", help="as bench/llama.py's --model")
    parser.add_argument("--precision", type=Precision, default=Precision.NATIVE)
    parser.add_argument("--chunk", type=int, action="append", help="interleaved chunks (default 64 and 512)")
    parser.add_argument(
        "--tokens", type=int, default=32, help="tokens per reply (bench/llama.py's --chat-tokens)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-json", type=Path, default=RESULTS_DIR / "llama.json")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "schedule.json")
    args = parser.parse_args(argv)
    args.chunk = args.chunk or [64, 512]
    began = time.perf_counter()
    data: dict[str, Any] = {
        "model": args.model,
        "precision": str(args.precision),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "chunks": asyncio.run(measure(args)),
        "llama_tok_s": llama_rate(args.llama_json, args.model),
        **run_facts(began),
    }
    print(table(data))
    write_json(args.out, data)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
