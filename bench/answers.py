"""Answer quality of the default model at the service's default sampling, against candidates.

    .venv/bin/python bench/answers.py [--data-dir DIR] [--database-url URL] [--threads 2]
                                      [--max-tokens 96] [--out bench/results/answers.json]

Starts the real service (``python -m service --model default``, an embedded PostgreSQL in a
temporary folder unless ``--database-url``) and asks it the committed question set
(``bench/questions.json``: facts, arithmetic, lists, follow-ups in the same chat), once per
configuration:

* ``service defaults``: no sampling parameters sent, so the service's defaults for the model apply
  (``service/engine/models/sampling_defaults.py``); this is what a new user gets;
* candidates, sent explicitly as ``params``: greedy, greedy with repetition penalties 1.1 / 1.2 /
  1.3, and the former default (temperature 0.7) with three fixed seeds, so a rerun asks the same.

An answer is right when it matches its turn's pattern (or names enough items of a list). It
*loops* when a run of 4 words comes back 3 or more times, or the reply ran into ``max_tokens``
while repeating itself. Prints a table and writes every answer with its verdict as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/answers.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_service_arguments,
    format_table,
    run_facts,
    service_subprocess,
    write_json,
)
from bench.ws_client import SessionClient  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402

QUESTIONS = Path(__file__).resolve().parent / "questions.json"
DEFAULTS = "service defaults"
CANDIDATES: dict[str, dict[str, Any]] = {
    DEFAULTS: {},
    "greedy": {"temperature": 0.0, "repetition_penalty": 1.0},
    "greedy, rep 1.1": {"temperature": 0.0, "repetition_penalty": 1.1},
    "greedy, rep 1.2": {"temperature": 0.0, "repetition_penalty": 1.2},
    "greedy, rep 1.3": {"temperature": 0.0, "repetition_penalty": 1.3},
    # The former default, sampled: one row per seed, since one draw says little.
    **{
        f"t0.7 (former default), seed {seed}": {"temperature": 0.7, "repetition_penalty": 1.0, "seed": seed}
        for seed in (1, 2, 3)
    },
}
# How the default was chosen from the rows: no loops first, then the most right answers.
_LOOP_NGRAM, _LOOP_REPEATS = 4, 3


def loops(text: str) -> bool:
    words = re.findall(r"\w+", text.lower())
    grams = Counter(tuple(words[i : i + _LOOP_NGRAM]) for i in range(len(words) - _LOOP_NGRAM + 1))
    return any(count >= _LOOP_REPEATS for count in grams.values())


def right(turn: dict[str, Any], text: str) -> bool:
    if "words" in turn:
        named = {word for word in turn["words"] if re.search(rf"\b{word}(s|es)?\b", text, re.I)}
        return len(named) >= int(turn["min_items"])
    return re.search(turn["pattern"], text, re.I) is not None


async def ask(client: SessionClient, session: str, text: str, params: dict[str, Any]) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "send", "session": session, "text": text}
    if params:
        frame["params"] = params
    await client.send(frame)
    reply = ""
    while True:
        _, got = await client.next(session)
        if got["type"] == "token":
            reply += got["text"]
        elif got["type"] == "done":
            return {"text": reply, "reason": got["reason"], "tokens": got["usage"]["completion_tokens"]}


async def run_config(url: str, name: str, params: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    conversations = json.loads(QUESTIONS.read_text())["conversations"]
    client = await SessionClient.connect(url)
    answers = []
    try:
        for n, conversation in enumerate(conversations):
            session = f"q{n}"
            await client.send({"type": "open", "session": session, "title": conversation["id"]})
            await client.next(session)
            for turn in conversation["turns"]:
                # max_tokens is the same for every configuration, so it is always sent.
                reply = await ask(client, session, turn["ask"], {**params, "max_tokens": max_tokens})
                scored = turn.get("scored", True)
                answers.append(
                    {
                        "conversation": conversation["id"],
                        "kind": conversation["kind"],
                        "ask": turn["ask"],
                        **reply,
                        "scored": scored,
                        "right": right(turn, reply["text"]) if scored else None,
                        "loops": loops(reply["text"]),
                    }
                )
            await client.send({"type": "close", "session": session})
            await client.next(session)
    finally:
        await client.close()
    scored_answers = [a for a in answers if a["scored"]]
    return {
        "name": name,
        "params": params,
        "right": sum(1 for a in scored_answers if a["right"]),
        "questions": len(scored_answers),
        "loops": sum(1 for a in answers if a["loops"]),
        "length_stops": sum(1 for a in answers if a["reason"] == "length"),
        "answers": answers,
    }


@asynccontextmanager
async def service(data_dir: Path, args: argparse.Namespace) -> AsyncIterator[str]:
    """The service at its defaults, on the default model prepared in ``data_dir``."""
    with tempfile.TemporaryDirectory(prefix="localchat-answers-") as scratch:
        for part in ("models", "gguf"):  # the prepared model, no copy; the database stays in scratch
            if (data_dir / part).exists():
                (Path(scratch) / part).symlink_to((data_dir / part).resolve())
        options = ["--threads", str(args.threads), "--data-dir", scratch, "--precision", args.precision]
        if args.database_url:
            options += ["--database-url", args.database_url]
        async with service_subprocess(*options) as running:
            yield running.url


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    model = resolve(
        parse_model_arg("default"), args.data_dir, precision=Precision(args.precision), progress=True
    )
    configs = []
    async with service(args.data_dir, args) as url:
        for name, params in CANDIDATES.items():
            configs.append(await run_config(url, name, params, args.max_tokens))
            print(f"{name}: {configs[-1]['right']}/{configs[-1]['questions']} right", file=sys.stderr)
    return {
        "model": model.id,
        "sampling_defaults": model.sampling.params(),
        "sampling_defaults_source": model.sampling.source,
        "max_tokens": args.max_tokens,
        "questions_file": str(QUESTIONS.relative_to(REPO_ROOT)),
        "loop_rule": f"a run of {_LOOP_NGRAM} words repeated {_LOOP_REPEATS}+ times",
        "configs": configs,
        **run_facts(began),
    }


def table(data: dict[str, Any]) -> str:
    rows = [
        [
            c["name"],
            json.dumps(c["params"]) if c["params"] else "(none sent)",
            f"{c['right']}/{c['questions']}",
            str(c["loops"]),
            str(c["length_stops"]),
        ]
        for c in data["configs"]
    ]
    head = ["configuration", "params", "right", "loops", "hit max_tokens"]
    defaults = f"service defaults for {data['model']}: {data['sampling_defaults']}"
    return format_table(head, rows) + f"\n{defaults} ({data['sampling_defaults_source']})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_service_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "answers.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(bench(args))
    print(table(data))
    print(f"wrote {write_json(args.out, data)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
