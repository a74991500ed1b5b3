"""``python -m service`` as a real process: its logs, SIGTERM, a kill mid-generation, and
the embedded PostgreSQL it starts when no database URL is given."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from service.engine.models.registry import PreparedModel
from tests.service.client import TIMEOUT_S, Client
from tests.service.conftest import ServiceFactory, ws_url

_LISTENING = re.compile(rb"listening on http://[\d.]+:(\d+)/")


class ServiceProcess:
    def __init__(self, process: asyncio.subprocess.Process, port: int, log: list[bytes]) -> None:
        self.process = process
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.log = log


@asynccontextmanager
async def service_process(*args: str) -> AsyncIterator[ServiceProcess]:
    """Run ``python -m service --port 0 ...`` until it logs where it listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "--port",
        "0",
        "--threads",
        "2",
        *args,
        stderr=asyncio.subprocess.PIPE,
        # The database is always named by --database-url, or embedded: never the caller's $DATABASE_URL.
        env={**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    log: list[bytes] = []
    try:
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), TIMEOUT_S * 4)
            assert line, b"".join(log).decode()
            log.append(line)
            if match := _LISTENING.search(line):
                break
        drain = asyncio.create_task(_drain(process, log))
        yield ServiceProcess(process, int(match.group(1)), log)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
    await drain


async def _drain(process: asyncio.subprocess.Process, log: list[bytes]) -> None:
    assert process.stderr is not None
    while line := await process.stderr.readline():
        log.append(line)


async def start_long_reply(url: str) -> tuple[Client, str]:
    client = await Client.connect(url)
    await client.hello()
    chat = (await client.open("s"))["chat"]
    await client.start("s", "Write a long story", temperature=0, max_tokens=200)
    await client.wait_for(lambda f: f["type"] == "token")
    return client, chat


async def last_message(start_service: ServiceFactory, chat: str) -> dict[str, object]:
    async with start_service() as server:
        client = await Client.connect(ws_url(server))
        await client.hello()
        history = await client.request({"type": "history", "chat": chat})
        await client.close()
    return dict(history["messages"][-1])


async def _until_leases_expired(database_url: str) -> None:
    """Until no instance holds a live lease (the database's clock decides; polled, bounded)."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while await conn.fetchval("SELECT count(*) FROM instances WHERE lease_expires_at > now()"):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_a_killed_server_leaves_interrupted_replies(
    start_service: ServiceFactory, database_url: str, tiny_model: PreparedModel, tmp_path: Path
) -> None:
    """A reply cut off by SIGKILL is marked ``interrupted`` by the next start once the dead
    instance's lease has expired; the log names the instance."""
    args = ("--database-url", database_url, "--model", str(tiny_model.directory), "--data-dir", str(tmp_path))
    async with service_process(
        *args, "--lease", "1", "--heartbeat", "0.2", "--instance-name", "one"
    ) as service:
        log = b"".join(service.log).decode()
        assert "database: postgresql://***@127.0.0.1" in log
        assert f"models: {tiny_model.directory.name}" in log
        assert " [one] INFO service: instance: one (id " in log
        client, chat = await start_long_reply(service.url)
        service.process.kill()
        await service.process.wait()
        await client.close()
    await _until_leases_expired(database_url)
    message = await last_message(start_service, chat)
    assert (message["role"], message["status"]) == ("assistant", "interrupted")


async def test_sigterm_lets_running_replies_finish(
    start_service: ServiceFactory, database_url: str, tiny_model: PreparedModel, tmp_path: Path
) -> None:
    """On SIGTERM a running generation may finish within the shutdown grace: the client gets
    its whole reply and ``done``, the reply is stored complete, and the process exits 0."""
    args = ("--database-url", database_url, "--model", str(tiny_model.directory), "--data-dir", str(tmp_path))
    async with service_process(*args) as service:
        client, chat = await start_long_reply(service.url)
        service.process.send_signal(signal.SIGTERM)
        done = await client.wait_for(lambda f: f["type"] == "done")
        assert done["reason"] == "length"
        assert await asyncio.wait_for(service.process.wait(), TIMEOUT_S) == 0
        await client.close()
    assert b"shutting down" in b"".join(service.log)
    message = await last_message(start_service, chat)
    assert (message["role"], message["status"]) == ("assistant", "complete")


async def test_sigterm_past_the_grace_cancels_and_stores(
    start_service: ServiceFactory, database_url: str, tiny_model: PreparedModel, tmp_path: Path
) -> None:
    """With no shutdown grace, SIGTERM cancels running generations, stores them, exits 0."""
    args = ("--database-url", database_url, "--model", str(tiny_model.directory), "--data-dir", str(tmp_path))
    async with service_process(*args, "--shutdown-grace", "0") as service:
        client, chat = await start_long_reply(service.url)
        service.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(service.process.wait(), TIMEOUT_S) == 0
        await client.close()
    message = await last_message(start_service, chat)
    assert (message["role"], message["status"]) == ("assistant", "cancelled")


async def test_embedded_postgres_by_default(tiny_model: PreparedModel, tmp_path: Path) -> None:
    """Without a database URL the service runs on an embedded PostgreSQL in its data dir."""
    async with service_process("--model", str(tiny_model.directory), "--data-dir", str(tmp_path)) as service:
        assert "database: embedded PostgreSQL" in b"".join(service.log).decode()
        client = await Client.connect(service.url)
        await client.hello()
        chat = (await client.open("s"))["chat"]
        reply = await client.chat("s", "hello", temperature=0, max_tokens=5)
        history = await client.request({"type": "history", "chat": chat})
        assert history["messages"][-1]["text"] == reply.text
        await client.close()
        service.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(service.process.wait(), TIMEOUT_S) == 0
    postmaster = tmp_path / "pgdata" / "postmaster.pid"
    assert not postmaster.exists(), "the embedded PostgreSQL outlived the service"
