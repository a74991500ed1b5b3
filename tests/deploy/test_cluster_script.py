"""``scripts/cluster N`` (deploy/cluster.py) as a real process: replicas and HAProxy come up,
a chat streams through, and Ctrl-C drains every replica and stops everything."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

from service.engine.models.registry import PreparedModel
from tests.deploy.cluster import free_port
from tests.service.client import TIMEOUT_S, Client

REPO_ROOT = Path(__file__).resolve().parents[2]


async def _connect_when_routed(url: str) -> Client:
    """HAProxy's first checks run a second after it starts: polled, bounded."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        try:
            client = await Client.connect(url)
            await client.hello()
            return client
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_cluster_runs_replicas_behind_haproxy_and_drains_on_ctrl_c(
    database_url: str, tiny_model: PreparedModel, tmp_path: Path
) -> None:
    """Two replicas and HAProxy start; a reply streams through HAProxy; SIGINT stops the
    replicas with a drain (each logs 'stopped'), then HAProxy, and the command exits 0."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy.cluster", "2", "--port", str(port), "--base-port", "0",
        "--database-url", database_url, "--data-dir", str(tmp_path),
        "--", "--model", str(tiny_model.directory), "--threads", "1",
        cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    log: list[str] = []
    try:
        while "replica(s) behind HAProxy" not in (log[-1] if log else ""):
            line = await asyncio.wait_for(process.stderr.readline(), TIMEOUT_S * 4)
            assert line, "".join(log)
            log.append(line.decode())
        client = await _connect_when_routed(f"ws://127.0.0.1:{port}/ws?affinity=someone")
        await client.open("s")
        reply = await client.chat("s", "hello", temperature=0, max_tokens=8)
        assert reply.done["reason"] in ("stop", "length")
        await client.close()
        process.send_signal(signal.SIGINT)
        _, rest = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
        assert process.returncode == 0
        log.append(rest.decode())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    for name in ("chat-1", "chat-2"):
        assert f"[{name}] INFO service: stopped" in "".join(log)
    assert await asyncio.to_thread(_port_refuses, port), "HAProxy outlived the cluster"


def _port_refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True
