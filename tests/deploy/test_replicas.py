"""Several replicas behind a real HAProxy on one real PostgreSQL (issue 14): routing by affinity
key, a replica killed or restarted mid-reply, a replica cut off from the database, a drain.

Leases are short here (tests/deploy/cluster.py: 1 s, heartbeat 0.2 s). Where a test waits for
something that only shows in the database (a sweeper's update on another process), it polls
with a bounded loop: there is no event to wait on across processes.
"""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import orjson
import pytest

from service.engine.models.onnx_builder import Precision
from service.engine.models.prepare import prepare_gguf
from service.engine.models.registry import PreparedModel, describe_dir
from tests.deploy.cluster import Cluster, cluster
from tests.engine.tiny_model import write_tiny_gguf
from tests.service.client import TIMEOUT_S, Client
from tests.service.test_errors import expect_close
from tests.service.test_users_cli import users
from tests.tcp_relay import tcp_relay

LONG = {"temperature": 0, "max_tokens": 3000}
SHORT = {"temperature": 0, "max_tokens": 16}
POLL_S = 0.05  # between two looks at the database in a bounded poll


@pytest.fixture(scope="module")
def long_tiny_model(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> PreparedModel:
    """The tiny model with a 2048-position context: a LONG reply runs for seconds, so a replica
    killed mid-reply is still generating it (at the 256 positions of ``tiny_model`` it could end
    before the kill landed)."""
    work = tmp_path_factory.mktemp("tiny-long")
    gguf_path = write_tiny_gguf(work / "tiny.gguf", smollm2_gguf, context_length=2048)
    return describe_dir(
        "tiny", prepare_gguf(gguf_path, work / "model", precision=Precision.INT8, progress=False)
    )


@pytest.fixture
def running(database_url: str, long_tiny_model: PreparedModel, tmp_path: Path) -> Callable[..., Any]:
    def start(count: int, **kwargs: Any) -> Any:
        return cluster(
            count, database_url=database_url, model_dir=long_tiny_model.directory, data_dir=tmp_path, **kwargs
        )

    return start


async def _message(db: asyncpg.Connection, message: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT status, text, owner FROM messages WHERE id = $1", UUID(message))
    assert row is not None
    return row


async def _until_status(db: asyncpg.Connection, message: str, status: str) -> asyncpg.Record:
    """The message once the database shows ``status`` (another process writes it: polled)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while (row := await _message(db, message))["status"] != status:
        assert asyncio.get_running_loop().time() < deadline, f"{message} stayed {row['status']}"
        await asyncio.sleep(POLL_S)
    return row


def _text(client: Client, session: str) -> str:
    return "".join(f["text"] for f in client.received if f.get("session") == session and f["type"] == "token")


async def _start_long(client: Client, session: str) -> tuple[str, str]:
    """(chat id, assistant message id) of a long greedy reply that has begun streaming."""
    chat = (await client.open(session))["chat"]
    started = await client.start(session, "Write a long story", **LONG)
    await client.wait_for(lambda f: f.get("session") == session and f["type"] == "token")
    return chat, started["message"]


async def test_chats_stream_through_haproxy_and_a_key_returns_to_its_replica(
    running: Callable[..., Any], db: asyncpg.Connection
) -> None:
    """A chat streams through HAProxy; the same key lands on the same replica every time, and a
    client that reconnects with it resumes its running reply from index 0."""
    async with running(2, extra=("--disconnect-grace", "60")) as c:
        c: Cluster
        client, home = await c.connect("alice")
        await client.open("s")
        reply = await client.chat("s", "hello", **SHORT)
        assert reply.done["reason"] in ("stop", "length")
        assert reply.text
        assert (await _message(db, reply.started["message"]))["text"] == reply.text
        await client.close()
        # Connection by connection: HAProxy's bounded load (hash-balance-factor) would send a
        # second connection of the only busy client elsewhere, which is its job.
        for _ in range(3):
            client, landed = await c.connect("alice")
            assert landed == home
            await client.close()
        client, _ = await c.connect("alice")
        long_chat, message = await _start_long(client, "long")
        await client.close()
        client, landed = await c.connect("alice")
        assert landed == home
        opened = await client.open("long", chat=long_chat, resume={"message": message, "index": 0})
        assert opened["chat"] == long_chat
        done = await client.wait_for(lambda f: f["type"] == "done" and f["session"] == "long")
        assert done["reason"] == "length"
        stored = await _message(db, message)
        assert (stored["status"], stored["text"]) == ("complete", _text(client, "long"))
        assert stored["owner"] == await c.instance_id(home)
        await client.close()


async def test_a_killed_replica_loses_only_its_own_replies(
    running: Callable[..., Any], db: asyncpg.Connection
) -> None:
    """kill -9 of r1 mid-reply: a survivor marks exactly r1's reply interrupted (after r1's lease),
    r2's reply completes in full; r1's client reconnects to r2, sees its history and continues
    its chat re-prefilled from stored ids, greedily equal to a twin chat whose cache is warm."""
    async with running(2) as c:
        c: Cluster
        key1, key2 = await c.key_for("r1"), await c.key_for("r2")
        a, _ = await c.connect(key1)
        b, _ = await c.connect(key2)
        chat_a = (await a.open("short"))["chat"]
        await b.open("short")
        first_a, first_b = await a.chat("short", "hello", **SHORT), await b.chat("short", "hello", **SHORT)
        assert first_a.text == first_b.text  # the same model, prompt and greedy decoding
        long_chat_a, doomed = await _start_long(a, "long")
        _, survivor = await _start_long(b, "long")
        r1_id = await c.instance_id("r1")
        c.replicas["r1"].process.kill()
        await c.replicas["r1"].process.wait()
        swept = await _until_status(db, doomed, "interrupted")
        assert swept["owner"] == r1_id
        assert (await _message(db, survivor))["status"] in ("generating", "complete")
        done = await b.wait_for(lambda f: f["type"] == "done" and f["session"] == "long")
        assert done["reason"] == "length"
        kept = await _message(db, survivor)
        assert (kept["status"], kept["text"]) == ("complete", _text(b, "long"))
        interrupted = await db.fetch("SELECT id FROM messages WHERE status = 'interrupted'")
        assert [str(r["id"]) for r in interrupted] == [doomed]

        await a.close()
        a, landed = await c.connect(key1)
        assert landed == "r2"
        history = await a.request({"type": "history", "chat": long_chat_a})
        assert [m["status"] for m in history["messages"]][-1] == "interrupted"
        await a.open("short", chat=chat_a)
        again_a = await a.chat("short", "Tell me more", **SHORT)
        again_b = await b.chat("short", "Tell me more", **SHORT)
        # r2 has no cache of a's chat: it is rebuilt from the stored ids, and those match the ids
        # in the twin's cache (the same user's, so its prefix is reused), token for token.
        assert 0 < again_a.started["cached_tokens"] <= again_b.started["cached_tokens"]
        assert again_a.text == again_b.text
        await a.close()
        await b.close()


async def test_restarting_a_replica_leaves_the_others_replies_complete(
    running: Callable[..., Any], db: asyncpg.Connection
) -> None:
    """Restarting r1 (stop, start on the same port: its start sweeps) while r2 streams leaves
    r2's reply untouched: stored complete with its full text. (Before leases, every start
    marked every replica's replies in flight interrupted.)"""
    async with running(2) as c:
        c: Cluster
        key2 = await c.key_for("r2")
        b, _ = await c.connect(key2)
        _, message = await _start_long(b, "long")
        c.replicas["r1"].process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(c.replicas["r1"].process.wait(), TIMEOUT_S) == 0
        await c.stop("r1")
        await c.start("r1")  # returns once r1 listens: its start-up sweep has run
        assert (await _message(db, message))["status"] in ("generating", "complete")
        done = await b.wait_for(lambda f: f["type"] == "done" and f["session"] == "long")
        assert done["reason"] == "length"
        stored = await _message(db, message)
        assert (stored["status"], stored["text"]) == ("complete", _text(b, "long"))
        assert await db.fetchval("SELECT count(*) FROM messages WHERE status = 'interrupted'") == 0
        await b.close()


async def test_an_owner_cut_off_from_the_database_past_its_lease_still_stores_the_full_reply(
    running: Callable[..., Any], db: asyncpg.Connection, database_url: str
) -> None:
    """r1 reaches PostgreSQL through a relay the test cuts: its reply streams on to ``done`` (the
    final write waits in its journal), its lease runs out and r2's sweeper marks the reply
    interrupted; once the relay is back, r1's final write stores the full text, complete."""
    parts = urlsplit(database_url)
    async with tcp_relay(parts.hostname or "127.0.0.1", parts.port or 5432) as relay:
        netloc = f"{parts.username}:{parts.password}@127.0.0.1:{relay.port}"
        via_relay = urlunsplit(parts._replace(netloc=netloc))
        async with running(2, replica_args={"r1": ("--database-url", via_relay)}) as c:
            c: Cluster
            key1 = await c.key_for("r1")
            a, _ = await c.connect(key1)
            chat = (await a.open("s"))["chat"]
            started = await a.start("s", "Write a long story", temperature=0, max_tokens=300)
            await a.wait_for(lambda f: f["type"] == "token")
            relay.cut()
            done = await a.wait_for(lambda f: f["type"] == "done")
            assert done["reason"] == "length"
            message = started["message"]
            await _until_status(db, message, "interrupted")  # by r2, once r1's lease is over
            relay.restore()
            stored = await _until_status(db, message, "complete")
            assert stored["text"] == _text(a, "s")
            assert chat
            await a.close()


async def test_sigterm_drains_closes_with_1001_and_loses_nothing(
    running: Callable[..., Any], db: asyncpg.Connection
) -> None:
    """SIGTERM on r1 mid-reply: the reply finishes within the grace, the client gets it all and
    ``done``, then the close 1001 (going away) through HAProxy; it is stored complete, and the
    client reconnecting with its key lands on r2 and finds it in its history."""
    async with running(2, extra=("--shutdown-grace", "60")) as c:
        c: Cluster
        key1 = await c.key_for("r1")
        a, _ = await c.connect(key1)
        chat = (await a.open("s"))["chat"]
        started = await a.start("s", "Write a long story", temperature=0, max_tokens=300)
        await a.wait_for(lambda f: f["type"] == "token")
        c.replicas["r1"].process.send_signal(signal.SIGTERM)
        done = await a.wait_for(lambda f: f["type"] == "done")
        assert done["reason"] == "length"
        await asyncio.wait_for(a.ws.wait_closed(), TIMEOUT_S)
        assert a.ws.close_code == 1001
        assert await asyncio.wait_for(c.replicas["r1"].process.wait(), TIMEOUT_S) == 0
        stored = await _message(db, started["message"])
        assert (stored["status"], stored["text"]) == ("complete", _text(a, "s"))
        a, landed = await c.connect(key1)
        assert landed == "r2"
        history = await a.request({"type": "history", "chat": chat})
        assert history["messages"][-1]["text"] == stored["text"]
        await a.close()


async def _get(port: int, path: str) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=TIMEOUT_S) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(fetch)


async def test_revocation_reaches_every_replica_and_metrics_are_per_replica(
    running: Callable[..., Any], database_url: str
) -> None:
    """``users revoke`` (NOTIFY) closes the user's connections on both replicas with 4401; each
    replica's /metrics and /readyz, reached through HAProxy by key, name that replica."""
    added = await users("add", "alice", "--database-url", database_url)
    assert added.code == 0, added.err
    async with running(2, extra=("--auth", "token"), token=added.token) as c:
        c: Cluster
        key1, key2 = await c.key_for("r1"), await c.key_for("r2")
        for key, name in ((key1, "r1"), (key2, "r2")):
            assert f'instance_name="{name}"' in await _get(c.haproxy_port, f"/metrics?affinity={key}")
            assert orjson.loads(await _get(c.haproxy_port, f"/readyz?affinity={key}"))["instance"] == name
        a, on_a = await c.connect(key1)
        b, on_b = await c.connect(key2)
        assert (on_a, on_b) == ("r1", "r2")
        revoked = await users("revoke", "alice", "--database-url", database_url)
        assert revoked.code == 0, revoked.err
        for client in (a, b):
            error = await client.wait_for(lambda f: f["type"] == "error")
            assert error["code"] == "unauthenticated"
            assert await expect_close(client) == 4401
