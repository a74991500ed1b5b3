"""A streaming chat with the engine in the terminal: the engine on its own, no server.

``python -m service.engine.demo`` prepares the model on first use (with progress), then
reads prompts and streams replies token by token. Ctrl-C stops a reply at once (the next
turn still reuses the chat's KV cache); Ctrl-D quits. With ``--prompt`` or a pipe on stdin
it answers once and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

from service.cli.options import add_engine_arguments, data_dir, engine_settings
from service.engine.engine import GenerationStream
from service.engine.loader import load_engine
from service.engine.models.registry import parse_model_arg, resolve
from service.engine.runner import choose_precision
from service.engine.tokenizer import ChatMessage
from service.engine.types import ChatKey, GenerationResult, SamplingParams
from service.errors import ServiceError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.engine.demo", description=__doc__.split("\n\n")[0]
    )
    add_engine_arguments(parser)
    parser.add_argument("--prompt", help="answer this once and exit")
    parser.add_argument("--system", help="system message")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=None)
    return parser


async def _stream(stream: GenerationStream) -> GenerationResult:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stream.cancel)
    try:
        async for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        return await stream.result()
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _summary(result: GenerationResult) -> str:
    ttft = f"{result.ttft_ms:.0f} ms" if result.ttft_ms is not None else "-"
    return (
        f"[{result.reason}: {result.completion_tokens} tokens, {result.tokens_per_s:.1f} tok/s, "
        f"TTFT {ttft}, prompt {result.prompt_tokens} tokens of which {result.cached_tokens} cached]"
    )


async def _chat(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model = await asyncio.to_thread(
        resolve,
        parse_model_arg(args.model),
        data_dir(args),
        precision=choose_precision(args.precision, args.device),
        progress=True,
    )
    engine = await asyncio.to_thread(load_engine, model, engine_settings(args))
    await engine.start()
    print(
        f"{model.id} ready on {engine.runner.device} in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    messages: list[ChatMessage] = [{"role": "system", "content": args.system}] if args.system else []
    consumed: list[int] = []
    one_shot = args.prompt is not None or not sys.stdin.isatty()
    try:
        while True:
            if args.prompt is not None:
                text = args.prompt
            elif one_shot:
                text = await asyncio.to_thread(sys.stdin.read)
            else:
                try:
                    text = await asyncio.to_thread(input, "\nyou> ")
                except EOFError:
                    return 0
            if not text.strip():
                continue
            messages.append({"role": "user", "content": text})
            prompt = engine.tokenizer.next_turn_ids(consumed, messages)
            stops = engine.tokenizer.turn_stops
            result = await _stream(engine.submit(ChatKey("demo"), prompt, params, turn_stops=stops))
            print(f"\n{_summary(result)}", file=sys.stderr)
            messages.append({"role": "assistant", "content": result.text})
            consumed = prompt + result.token_ids
            if one_shot:
                return 0 if result.reason != "error" else 1
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_chat(args))
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
