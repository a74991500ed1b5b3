"""Load benchmark: N connections x M sessions x K turns against the service, on loopback.

    .venv/bin/python bench/load.py [--connections 4] [--sessions 16] [--turns 3] [--tokens 32]
                                   [--threads 2] [--model default] [--data-dir DIR]
                                   [--database-url URL] [--timeout 600]
                                   [--out bench/results/load.json]

Bounded: a fixed amount of work, a global timeout, the service listening on 127.0.0.1 only;
it stops by itself. The service runs in this process (``service.app.running_service`` on a
free port, with ``--database-url`` or an embedded PostgreSQL in a temporary folder), so the
engine's yield of each token and its receipt by the client are stamped on the same clock.

Every connection opens its sessions, every session runs its turns one after the other (a
greedy reply of at most ``--tokens`` tokens each), all sessions at once. Then each reply is
checked against what was stored: its token frames must cover the token indices
``0 .. completion_tokens - 1`` exactly once each (``lost_tokens``, ``duplicated_tokens``),
their text must be the stored assistant message, and the message must be stored ``complete``.

Prints a table with the goals and writes everything as JSON (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/load.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_service_arguments,
    fmt,
    format_table,
    median,
    percentile,
    run_facts,
    write_json,
)
from bench.ws_client import SessionClient  # noqa: E402
from service.app import running_service  # noqa: E402
from service.config import EngineSettings, ServerSettings, ServiceSettings  # noqa: E402
from service.core import chats as chats_module  # noqa: E402
from service.core.reply import Reply as CoreReply  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402
from service.engine.types import Delta, GenerationResult  # noqa: E402

SYSTEM = "You are a concise assistant."
TOPICS = ("rivers", "bridges", "owls", "tea", "glaciers", "clocks", "maps", "bees")


class StampedGeneration(CoreReply):
    """A reply that notes when the engine delivered each token (on the event loop)."""

    yielded: ClassVar[dict[tuple[str, int], float]] = {}  # (message id, token index) -> time

    def _on_event(self, event: Delta | GenerationResult) -> None:
        if isinstance(event, Delta):
            now = time.perf_counter()
            message = str(self.message_id)
            for index in range(event.index, event.index + event.tokens):
                self.yielded[(message, index)] = now
        super()._on_event(event)


@dataclass
class Reply:
    """What one ``send`` produced, as the client saw it."""

    session: str
    message: str = ""
    frames: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (receipt, token frame)
    done: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(frame["text"] for _, frame in self.frames)


class LoadClient(SessionClient):
    """One connection of the load: turns of its sessions, and chat histories."""

    async def request(self, session: str, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a frame and return the next frame of its session (the reply)."""
        await self.send(frame)
        return (await self.next(session))[1]

    async def turn(self, session: str, text: str, max_tokens: int) -> Reply:
        params = {"temperature": 0, "max_tokens": max_tokens}
        reply = Reply(session)
        reply.message = (
            await self.request(session, {"type": "send", "session": session, "text": text, "params": params})
        )["message"]
        while True:
            at, frame = await self.next(session)
            if frame["type"] == "token":
                reply.frames.append((at, frame))
            else:
                assert frame["type"] == "done", frame
                reply.done = frame
                return reply

    async def history(self, chat: str) -> list[dict[str, Any]]:
        await self.send({"type": "history", "chat": chat, "id": chat})
        _, frame = await self.next("")
        assert (frame["type"], frame["chat"]) == ("history", chat), frame
        messages: list[dict[str, Any]] = frame["messages"]
        return messages


async def run_connection(
    url: str, index: int, args: argparse.Namespace
) -> tuple[LoadClient, dict[str, str], list[Reply]]:
    """Open the sessions, run every session's turns (all sessions at once); the client, each
    session's chat id, and the replies."""
    client = await LoadClient.connect(url)
    chats: dict[str, str] = {}
    for s in range(args.sessions):
        name = f"c{index}s{s}"
        opened = await client.request(name, {"type": "open", "session": name, "system": SYSTEM})
        chats[name] = opened["chat"]

    async def session(name: str, s: int) -> list[Reply]:
        replies = []
        for turn in range(args.turns):
            topic = TOPICS[(index + s + turn) % len(TOPICS)]
            text = f"Turn {turn + 1}: tell me one thing about {topic}, in a sentence."
            replies.append(await client.turn(name, text, args.tokens))
        return replies

    per_session = await asyncio.gather(*(session(name, s) for s, name in enumerate(chats)))
    return client, chats, [reply for replies in per_session for reply in replies]


def check(reply: Reply, stored: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Lost and duplicated token indices, the text against the stored message, latencies."""
    completion = reply.done["usage"]["completion_tokens"]
    covered: Counter[int] = Counter()
    latencies = []
    for at, frame in reply.frames:
        for index in range(frame["index"], frame["index"] + frame.get("tokens", 1)):
            covered[index] += 1
            yielded = StampedGeneration.yielded.get((reply.message, index))
            if yielded is not None:
                latencies.append((at - yielded) * 1000)
    uncovered = [i for i in range(completion) if covered[i] == 0]
    # A reply that ends with its end-of-sequence token counts that token in completion_tokens,
    # but the token has no text, so no frame carries it: lost by the definition above, and
    # counted apart as well, so that real losses stand out.
    eos = reply.done["reason"] == "stop" and uncovered == [completion - 1]
    duplicated = sum(n - 1 for n in covered.values() if n > 1)
    duplicated += sum(n for i, n in covered.items() if not 0 <= i < completion)  # tokens that never were
    message = stored.get(reply.message)
    return {
        "lost": len(uncovered),
        "lost_end_of_sequence": int(eos),
        "duplicated": duplicated,
        "stored": message is not None and message["status"] == "complete",
        "text_matches": message is not None and message["text"] == reply.text,
        "latencies_ms": latencies,
        "completion_tokens": completion,
        "reason": reply.done["reason"],
    }


async def measure(url: str, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    results = await asyncio.gather(*(run_connection(url, c, args) for c in range(args.connections)))
    elapsed = time.perf_counter() - start
    checks = []
    try:
        for client, chats, replies in results:
            stored: dict[str, dict[str, Any]] = {}
            for chat in chats.values():
                stored |= {m["id"]: m for m in await client.history(chat) if m["role"] == "assistant"}
            checks += [check(reply, stored) for reply in replies]
    finally:
        for client, _, _ in results:
            await client.close()
    latencies = sorted(ms for c in checks for ms in c["latencies_ms"])
    tokens = sum(c["completion_tokens"] for c in checks)
    return {
        "frames": sum(client.received for client, _, _ in results),
        "frames_sent": sum(client.sent for client, _, _ in results),
        "token_frames": sum(len(reply.frames) for _, _, replies in results for reply in replies),
        "lost_tokens": sum(c["lost"] for c in checks),
        "lost_tokens_end_of_sequence": sum(c["lost_end_of_sequence"] for c in checks),
        "duplicated_tokens": sum(c["duplicated"] for c in checks),
        "replies_stored": sum(c["stored"] for c in checks),
        "replies_expected": args.connections * args.sessions * args.turns,
        "replies_received": len(checks),
        "text_mismatches": sum(not c["text_matches"] for c in checks),
        "token_latency_ms_p50": percentile(latencies, 0.50),
        "token_latency_ms_p99": percentile(latencies, 0.99),
        "token_latency_ms_max": latencies[-1] if latencies else None,
        "tokens_measured": len(latencies),
        "completion_tokens": tokens,
        "done_reasons": dict(Counter(c["reason"] for c in checks)),
        "aggregate_tok_s": tokens / elapsed if elapsed > 0 else None,
        "median_reply_tokens": median(c["completion_tokens"] for c in checks),
        "workload_seconds": elapsed,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    model = resolve(
        parse_model_arg(args.model), args.data_dir, precision=Precision(args.precision), progress=True
    )
    # Every reply the service starts from now on stamps its tokens.
    chats_module.Reply = StampedGeneration  # type: ignore[attr-defined]
    engine_stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="localchat-load-") as scratch:
        settings = ServiceSettings(
            server=ServerSettings(host="127.0.0.1", port=0, max_sessions=max(16, args.sessions)),
            engine=EngineSettings(threads=args.threads),
            data_dir=Path(scratch),  # the embedded PostgreSQL, when no --database-url
            database_url=args.database_url,
            models=(str(model.directory),),
            precision=args.precision,
        )
        async with asyncio.timeout(args.timeout), running_service(settings) as server:
            data = await measure(f"ws://127.0.0.1:{server.port}/ws", args)
            await server.idle()
            engines: list[Engine] = server.models.loaded()
            engine_stats = asdict(engines[0].stats)
    goals = {
        "lost_tokens": data["lost_tokens"] == 0,
        "duplicated_tokens": data["duplicated_tokens"] == 0,
        "replies_stored": data["replies_stored"] == data["replies_expected"],
    }
    data.update(
        {
            "goals_met": goals,
            "connections": args.connections,
            "sessions": args.sessions,
            "turns": args.turns,
            "max_tokens": args.tokens,
            "model": model.id,
            "precision": args.precision,
            "threads": args.threads,
            "database": "url" if args.database_url else "embedded",
            "engine_stats": engine_stats,
            **run_facts(began),
        }
    )
    return data


def table(data: dict[str, Any]) -> str:
    goals = data["goals_met"]

    def met(key: str) -> str:
        return "yes" if goals[key] else "NO"

    rows = [
        ["frames", fmt(data["frames"]), "", ""],
        ["lost_tokens", fmt(data["lost_tokens"]), "0", met("lost_tokens")],
        ["  of them end-of-sequence", fmt(data["lost_tokens_end_of_sequence"]), "", ""],
        ["duplicated_tokens", fmt(data["duplicated_tokens"]), "0", met("duplicated_tokens")],
        ["replies_stored", fmt(data["replies_stored"]), f"{data['replies_expected']}", met("replies_stored")],
        ["text_mismatches", fmt(data["text_mismatches"]), "", ""],
        ["token_latency_ms_p50", fmt(data["token_latency_ms_p50"], 2), "", ""],
        ["token_latency_ms_p99", fmt(data["token_latency_ms_p99"], 2), "", ""],
        ["aggregate_tok_s", fmt(data["aggregate_tok_s"]), "", ""],
        ["peak_rss_mb", fmt(data["peak_rss_mb"]), "", ""],
    ]
    machine = data["machine"]
    head = (
        f"load benchmark: {data['connections']} connections x {data['sessions']} sessions x "
        f"{data['turns']} turns, {data['max_tokens']} tokens; {data['model']} ({data['precision']}), "
        f"{data['threads']} threads, database {data['database']}\n"
        f"{machine['cpu_model']} ({machine['usable_cores']} cores, load {machine['load_avg_1m']:.2f}); "
        f"onnxruntime {data['onnxruntime_version']}; workload {data['workload_seconds']:.1f} s, "
        f"{data['bench_seconds']:.0f} s in all"
    )
    return head + "\n\n" + format_table(["metric", "value", "goal", "met"], rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=4, help="WebSocket connections (default 4)")
    parser.add_argument("--sessions", type=int, default=16, help="sessions per connection (default 16)")
    parser.add_argument("--turns", type=int, default=3, help="turns per session (default 3)")
    parser.add_argument("--tokens", type=int, default=32, help="max tokens per reply (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="decoder threads (default 2)")
    parser.add_argument(
        "--model", default="default", help="a model name or a prepared model directory (default: the default)"
    )
    add_service_arguments(parser)
    parser.add_argument(
        "--timeout", type=float, default=600, help="give up after this many seconds (default 600)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "load.json", help="JSON output file")
    args = parser.parse_args(argv)
    if min(args.connections, args.sessions, args.turns, args.tokens, args.threads) < 1 or args.timeout <= 0:
        parser.error("--connections, --sessions, --turns, --tokens and --threads >= 1; --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(bench(args))
    print(table(data))
    print(f"\nwrote {write_json(args.out, data)}")
    return 0 if all(data["goals_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
