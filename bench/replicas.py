"""Replicas benchmark: bench/load.py's workload over N replica processes behind HAProxy, then
the same with one replica killed (SIGKILL) in the middle. (Issue 14's ``--via-haproxy`` run.)

    .venv/bin/python bench/replicas.py [--replicas 2] [--connections 4] [--sessions 4] [--turns 2]
                                       [--tokens 32] [--kill-tokens 160] [--model default]
                                       [--data-dir DIR] [--database-url URL] [--timeout 600]
                                       [--out bench/results/replicas.json]

Four phases on the same replicas and database, one after the other:

1. ``direct``: each connection goes straight to a replica (round robin), no HAProxy;
2. ``haproxy``: the same workload through HAProxy (deploy/haproxy.cfg), each connection with
   its own affinity key. Both check every reply as bench/load.py does (lost and duplicated
   token indices, stored ``complete`` with the text the client saw). What HAProxy adds is
   measured by a probe connection that sends ``ping`` frames throughout the workload: the
   round-trip times of the two phases, side by side (p50/p99);
3. ``reprefill``: a chat with a few turns of history continues on its own replica (KV cache
   warm), then on the other one (re-prefilled from its stored ids): prompt tokens, cached
   tokens and time to first token of each;
4. ``kill``: through HAProxy with longer replies; once every session is streaming, replica
   ``r1`` gets SIGKILL. Its clients reconnect with the same key (HAProxy sends them to a live
   replica), reopen their chats, wait until the cut reply shows ``interrupted`` in the history
   (a survivor's sweeper marks it once r1's lease is over), and go on with their remaining
   turns there. Reported: replies interrupted, sessions resumed, and that every reply a
   client got ``done`` for is stored with its text (no stored text lost).

The replicas run with a short lease (2 s, heartbeat 0.5 s) so that phase 3 stays short.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/replicas.py
    sys.path.insert(0, str(REPO_ROOT))

import asyncpg  # noqa: E402  (the kill phase reads the database, as an operator would)
from websockets.exceptions import ConnectionClosed  # noqa: E402

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_service_arguments,
    fmt,
    format_table,
    percentile,
    run_facts,
    write_json,
)
from bench.load import SYSTEM, TOPICS, LoadClient, check, run_connection  # noqa: E402
from deploy.haproxy_local import BIND_ENV, Replica, render  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402
from service.store.embedded import EmbeddedPostgres  # noqa: E402

LEASE = ("--lease", "2", "--heartbeat", "0.5")
PING_EVERY_S = 0.02


class Dropped(Exception):
    """The connection ended under a session that was waiting for its frames."""


class DropAwareClient(LoadClient):
    """A load client whose waits end with :class:`Dropped` when the connection does."""

    async def next(self, session: str) -> tuple[float, dict[str, Any]]:
        getter = asyncio.ensure_future(super().next(session))
        await asyncio.wait({getter, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        if not self._reader.cancelled():
            self._reader.exception()  # the drop is expected here: retrieved, not logged at exit
        raise Dropped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replicas:
    """The replica processes and HAProxy in front of them."""

    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    proxy: asyncio.subprocess.Process | None = None
    proxy_port: int = 0

    def direct_url(self, index: int) -> str:
        names = sorted(self.ports)
        return f"ws://127.0.0.1:{self.ports[names[index % len(names)]]}/ws"

    def proxy_url(self, key: str) -> str:
        return f"ws://127.0.0.1:{self.proxy_port}/ws?affinity={key}"


async def _start_replica(name: str, port: int, command: list[str]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        *command, "--port", str(port), "--instance-name", name, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    while line := await process.stderr.readline():
        if b"listening on http://" in line:
            break
    else:
        raise RuntimeError(f"replica {name} exited before it listened")
    stream = process.stderr

    async def drain() -> None:
        while await stream.readline():
            pass

    asyncio.get_running_loop().create_task(drain())
    return process


async def _until_routed(replicas: Replicas) -> None:
    """Until HAProxy accepts WebSockets (its checks run every second; polled, bounded)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            client = await LoadClient.connect(replicas.proxy_url("probe"))
            await client.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _pinger(url: str, stop: asyncio.Event) -> list[float]:
    """Round-trip times (ms) of ``ping`` frames on a connection of its own, until ``stop``."""
    client = await LoadClient.connect(url)
    rtts: list[float] = []
    try:
        i = 0
        while not stop.is_set():
            i += 1
            sent = time.perf_counter()
            await client.send({"type": "ping", "id": i})
            at, frame = await client.next("")
            assert frame["type"] == "pong", frame
            rtts.append((at - sent) * 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PING_EVERY_S)  # the probe's pace, not a sync
    finally:
        await client.close()
    return rtts


async def _load_phase(urls: list[str], probe_url: str, args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    pinger = asyncio.create_task(_pinger(probe_url, stop))
    start = time.perf_counter()
    results = await asyncio.gather(*(run_connection(url, i, args) for i, url in enumerate(urls)))
    elapsed = time.perf_counter() - start
    stop.set()
    rtts = sorted(await pinger)
    checks = []
    for client, chats, replies in results:
        stored: dict[str, dict[str, Any]] = {}
        for chat in chats.values():
            stored |= {m["id"]: m for m in await client.history(chat) if m["role"] == "assistant"}
        checks += [check(reply, stored) for reply in replies]
        await client.close()
    tokens = sum(c["completion_tokens"] for c in checks)
    return {
        "replies_expected": len(urls) * args.sessions * args.turns,
        "replies_received": len(checks),
        "replies_stored": sum(c["stored"] for c in checks),
        "lost_tokens": sum(c["lost"] - c["lost_end_of_sequence"] for c in checks),
        "duplicated_tokens": sum(c["duplicated"] for c in checks),
        "text_mismatches": sum(not c["text_matches"] for c in checks),
        "ping_rtt_ms_p50": percentile(rtts, 0.50),
        "ping_rtt_ms_p99": percentile(rtts, 0.99),
        "pings": len(rtts),
        "aggregate_tok_s": tokens / elapsed if elapsed > 0 else None,
        "workload_seconds": elapsed,
    }


@dataclass
class KillSession:
    name: str
    chat: str = ""
    done: dict[str, str] = field(default_factory=dict)  # message id -> text the client saw
    cut: list[str] = field(default_factory=list)  # message ids cut off by the kill
    resumed: bool = False


async def _kill_connection(
    replicas: Replicas,
    index: int,
    args: argparse.Namespace,
    streaming: asyncio.Semaphore,
    killed: asyncio.Event,
) -> list[KillSession]:
    key = f"bench-kill-{index}"
    client = await DropAwareClient.connect(replicas.proxy_url(key))
    sessions = [KillSession(f"k{index}s{s}") for s in range(args.sessions)]
    for session in sessions:
        opened = await client.request(
            session.name, {"type": "open", "session": session.name, "system": SYSTEM}
        )
        session.chat = opened["chat"]
    reconnected: asyncio.Future[DropAwareClient] | None = None

    async def reconnect() -> DropAwareClient:
        fresh = await DropAwareClient.connect(replicas.proxy_url(key))
        for session in sessions:
            await fresh.request(session.name, {"type": "open", "session": session.name, "chat": session.chat})
        return fresh

    async def run(session: KillSession, s: int) -> None:
        nonlocal client, reconnected
        turn = 0
        while turn < args.turns:
            topic = TOPICS[(index + s + turn) % len(TOPICS)]
            text = f"Turn {turn + 1}: tell me all about {topic}."
            message = ""
            try:
                reply_client = client
                started = await reply_client.request(
                    session.name,
                    {"type": "send", "session": session.name, "text": text,
                     "params": {"temperature": 0, "max_tokens": args.kill_tokens}},
                )  # fmt: skip
                message = started["message"]
                parts: list[str] = []
                while True:
                    _, frame = await reply_client.next(session.name)
                    if frame["type"] == "token":
                        if not parts and turn == 0:
                            streaming.release()
                        parts.append(frame["text"])
                    else:
                        break
                session.done[message] = "".join(parts)
                if session.cut:
                    session.resumed = True
                turn += 1
            except (Dropped, ConnectionClosed):
                if message:
                    session.cut.append(message)
                if reconnected is None:
                    reconnected = asyncio.ensure_future(reconnect())
                client = await reconnected
                turn += 1  # the cut turn is over (interrupted); go on with the next one

    await asyncio.gather(*(run(session, s) for s, session in enumerate(sessions)))
    await client.close()
    return sessions


async def _kill_phase(replicas: Replicas, args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    streaming = asyncio.Semaphore(0)
    killed = asyncio.Event()
    total = args.connections * args.sessions

    async def killer() -> float:
        for _ in range(total):  # every session of the first turn has streamed a token
            await streaming.acquire()
        replicas.processes["r1"].kill()
        await replicas.processes["r1"].wait()
        killed.set()
        return time.time()  # compared with the database's finished_at: one machine, one clock

    kill_task = asyncio.create_task(killer())
    start = time.perf_counter()
    per_connection = await asyncio.gather(
        *(_kill_connection(replicas, i, args, streaming, killed) for i in range(args.connections))
    )
    elapsed = time.perf_counter() - start
    killed_at = await kill_task if kill_task.done() else None
    kill_task.cancel()
    sessions = [s for sessions in per_connection for s in sessions]
    cut = {m for s in sessions for m in s.cut}
    conn = await asyncpg.connect(dsn)
    try:
        # The sweeper marks cut replies once r1's lease (2 s) is over: polled, bounded.
        deadline = time.monotonic() + 30
        while await conn.fetchval(
            "SELECT count(*) FROM messages WHERE id = ANY($1::uuid[]) AND status = 'generating'", list(cut)
        ):
            assert time.monotonic() < deadline, "cut replies never swept"
            await asyncio.sleep(0.1)
        swept_at = await conn.fetchval(
            "SELECT extract(epoch FROM max(finished_at)) FROM messages WHERE id = ANY($1::uuid[])", list(cut)
        )
        done = {m: text for s in sessions for m, text in s.done.items()}
        rows = await conn.fetch(
            "SELECT id::text, status, text FROM messages WHERE id = ANY($1::uuid[])", [*done, *cut]
        )
    finally:
        await conn.close()
    stored = {r["id"]: (r["status"], r["text"]) for r in rows}
    statuses = Counter(stored[m][0] for m in cut if m in stored)
    return {
        "sessions": total,
        "replies_done": len(done),
        "replies_cut": len(cut),
        "cut_stored_interrupted": statuses.get("interrupted", 0),
        "sessions_resumed": sum(s.resumed for s in sessions),
        "done_replies_stored_with_their_text": sum(
            stored.get(m) in (("complete", t), ("cancelled", t)) for m, t in done.items()
        ),
        "interrupted_total_in_db": statuses.get("interrupted", 0),
        "seconds_kill_to_all_swept": None
        if killed_at is None or swept_at is None
        else float(swept_at) - killed_at,
        "workload_seconds": elapsed,
    }


async def _reprefill_phase(replicas: Replicas, args: argparse.Namespace) -> dict[str, Any]:
    """What landing on another replica costs: a chat with some history continues on its own
    replica (KV cache warm) and then on another one (re-prefilled from the stored ids)."""
    r1, r2 = replicas.direct_url(0), replicas.direct_url(1)
    params = {"temperature": 0, "max_tokens": args.tokens}
    home = await LoadClient.connect(r1)
    opened = await home.request("h", {"type": "open", "session": "h", "system": SYSTEM})
    chat = opened["chat"]
    for turn in range(args.history_turns):
        await home.turn(
            "h", f"Turn {turn + 1}: tell me about {TOPICS[turn % len(TOPICS)]}.", args.history_tokens
        )
    warm = await home.turn("h", "Now sum it all up in one line.", args.tokens)
    await home.close()
    away = await LoadClient.connect(r2)
    await away.request("a", {"type": "open", "session": "a", "chat": chat, "params": params})
    cold = await away.turn("a", "And once more, shorter.", args.tokens)
    await away.close()

    def facts(reply: Any) -> dict[str, Any]:
        usage, timing = reply.done["usage"], reply.done["timing"]
        return {
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["cached_tokens"],
            "ttft_ms": timing["ttft_ms"],
        }

    return {"warm_same_replica": facts(warm), "cold_other_replica": facts(cold)}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise SystemExit("haproxy is not installed (apt-get install haproxy)")
    model = resolve(
        parse_model_arg(args.model), args.data_dir, precision=Precision(args.precision), progress=True
    )
    replicas = Replicas()
    with tempfile.TemporaryDirectory(prefix="localchat-replicas-") as scratch:
        embedded = None
        dsn = args.database_url
        if dsn is None:
            embedded = await asyncio.to_thread(EmbeddedPostgres.start, Path(scratch))
            dsn = embedded.dsn
        command = [
            sys.executable, "-m", "service", "--model", str(model.directory), "--data-dir", scratch,
            "--database-url", dsn, "--threads", str(args.threads), "--precision", args.precision,
            "--max-sessions", str(max(16, args.sessions)), *LEASE,
        ]  # fmt: skip
        names = [f"r{i + 1}" for i in range(args.replicas)]
        replicas.ports = {name: _free_port() for name in names}
        replicas.proxy_port = _free_port()
        config = Path(scratch) / "haproxy.cfg"
        config.write_text(
            render([Replica(n, "127.0.0.1", replicas.ports[n]) for n in names]), encoding="utf-8"
        )
        try:
            async with asyncio.timeout(args.timeout):
                for name in names:
                    replicas.processes[name] = await _start_replica(name, replicas.ports[name], command)
                replicas.proxy = await asyncio.create_subprocess_exec(
                    haproxy, "-db", "-f", str(config),
                    env={**os.environ, BIND_ENV: f"127.0.0.1:{replicas.proxy_port}"},
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                await _until_routed(replicas)
                n = args.connections
                direct = await _load_phase(
                    [replicas.direct_url(i) for i in range(n)], replicas.direct_url(0), args
                )
                via = await _load_phase(
                    [replicas.proxy_url(f"bench-{i}") for i in range(n)], replicas.proxy_url("bench-0"), args
                )
                reprefill = await _reprefill_phase(replicas, args)
                killed = await _kill_phase(replicas, args, dsn)
        finally:
            for process in [*replicas.processes.values(), replicas.proxy]:
                if process is not None and process.returncode is None:
                    process.send_signal(signal.SIGTERM)
                    await process.wait()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
    goals = {
        "lost_tokens": direct["lost_tokens"] == via["lost_tokens"] == 0,
        "duplicated_tokens": direct["duplicated_tokens"] == via["duplicated_tokens"] == 0,
        "replies_stored": all(p["replies_stored"] == p["replies_expected"] for p in (direct, via)),
        "kill_no_stored_text_lost": killed["done_replies_stored_with_their_text"] == killed["replies_done"],
        "kill_cut_marked_interrupted": killed["cut_stored_interrupted"] == killed["replies_cut"],
    }
    return {
        "direct": direct,
        "haproxy": via,
        "kill": killed,
        "reprefill": reprefill,
        "haproxy_added_rtt_ms_p50": _minus(via["ping_rtt_ms_p50"], direct["ping_rtt_ms_p50"]),
        "haproxy_added_rtt_ms_p99": _minus(via["ping_rtt_ms_p99"], direct["ping_rtt_ms_p99"]),
        "goals_met": goals,
        "replicas": args.replicas,
        "connections": args.connections,
        "sessions": args.sessions,
        "turns": args.turns,
        "max_tokens": args.tokens,
        "kill_max_tokens": args.kill_tokens,
        "model": model.id,
        "threads_per_replica": args.threads,
        **run_facts(began),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table(data: dict[str, Any]) -> str:
    d, v, k = data["direct"], data["haproxy"], data["kill"]
    rows = [
        ["replies stored / expected", f"{d['replies_stored']}/{d['replies_expected']}",
         f"{v['replies_stored']}/{v['replies_expected']}"],
        ["lost tokens", fmt(d["lost_tokens"]), fmt(v["lost_tokens"])],
        ["duplicated tokens", fmt(d["duplicated_tokens"]), fmt(v["duplicated_tokens"])],
        ["text mismatches", fmt(d["text_mismatches"]), fmt(v["text_mismatches"])],
        ["ping RTT p50 (ms)", fmt(d["ping_rtt_ms_p50"], 2), fmt(v["ping_rtt_ms_p50"], 2)],
        ["ping RTT p99 (ms)", fmt(d["ping_rtt_ms_p99"], 2), fmt(v["ping_rtt_ms_p99"], 2)],
        ["aggregate tok/s", fmt(d["aggregate_tok_s"]), fmt(v["aggregate_tok_s"])],
    ]  # fmt: skip
    kill_rows = [
        ["sessions", fmt(k["sessions"])],
        ["replies done (client got done)", fmt(k["replies_done"])],
        ["  stored with the text the client saw", fmt(k["done_replies_stored_with_their_text"])],
        ["replies cut by the kill", fmt(k["replies_cut"])],
        ["  stored interrupted", fmt(k["cut_stored_interrupted"])],
        ["sessions cut, then resumed on a survivor", fmt(k["sessions_resumed"])],
        ["kill -> all cut replies swept (s)", fmt(k["seconds_kill_to_all_swept"], 2)],
    ]
    warm, cold = data["reprefill"]["warm_same_replica"], data["reprefill"]["cold_other_replica"]
    reprefill_rows = [
        [name, fmt(r["prompt_tokens"]), fmt(r["cached_tokens"]), fmt(r["ttft_ms"], 1)]
        for name, r in (("same replica (cache warm)", warm), ("other replica (re-prefill)", cold))
    ]
    machine = data["machine"]
    head = (
        f"replicas benchmark: {data['replicas']} replicas x {data['threads_per_replica']} thread(s), "
        f"{data['connections']} connections x {data['sessions']} sessions x {data['turns']} turns, "
        f"{data['max_tokens']} tokens ({data['kill_max_tokens']} in the kill phase); {data['model']}\n"
        f"{machine['cpu_model']} ({machine['usable_cores']} cores, load {machine['load_avg_1m']:.2f}); "
        f"{data['bench_seconds']:.0f} s in all\n"
        f"HAProxy adds {fmt(data['haproxy_added_rtt_ms_p50'], 2)} ms p50, "
        f"{fmt(data['haproxy_added_rtt_ms_p99'], 2)} ms p99 to a frame's round trip"
    )
    goals = ", ".join(f"{key}: {'yes' if met else 'NO'}" for key, met in data["goals_met"].items())
    return (
        head
        + "\n\n"
        + format_table(["metric", "direct", "via haproxy"], rows)
        + "\n\na chat continued on its replica, then on another (direct)\n"
        + format_table(["follow-up turn", "prompt tokens", "cached", "TTFT ms"], reprefill_rows)
        + "\n\nreplica r1 killed mid-run (SIGKILL), through HAProxy\n"
        + format_table(["metric", "value"], kill_rows)
        + f"\n\ngoals: {goals}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=2, help="replica processes (default 2)")
    parser.add_argument("--connections", type=int, default=4, help="WebSocket connections (default 4)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions per connection (default 4)")
    parser.add_argument("--turns", type=int, default=2, help="turns per session (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="max tokens per reply (default 32)")
    parser.add_argument("--kill-tokens", type=int, default=160, help="max tokens per reply, kill phase")
    parser.add_argument("--history-turns", type=int, default=4, help="turns before the re-prefill test")
    parser.add_argument("--history-tokens", type=int, default=96, help="max tokens of each of those turns")
    parser.add_argument("--threads", type=int, default=1, help="decoder threads per replica (default 1)")
    parser.add_argument("--model", default="default", help="a model name or a prepared model directory")
    add_service_arguments(parser)
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "replicas.json", help="JSON output file")
    args = parser.parse_args(argv)
    if (
        args.replicas < 2
        or min(args.connections, args.sessions, args.turns, args.tokens, args.kill_tokens) < 1
    ):
        parser.error("--replicas >= 2; --connections, --sessions, --turns, --tokens, --kill-tokens >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data = asyncio.run(bench(args))
    print(table(data))
    print(f"\nwrote {write_json(args.out, data)}")
    return 0 if all(data["goals_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
