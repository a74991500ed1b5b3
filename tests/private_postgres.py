"""A private PostgreSQL server that a test may stop and start at will (outage tests).

The shared ``database_url`` fixture points at the machine's cluster, which other tests use at the
same time, so it must never be stopped. This one is made for one test: ``initdb`` in a fresh
folder (about 0.5 s with ``--no-sync``), a server on a free loopback port, ``trust`` auth. It uses
the server binaries of the PostgreSQL the shared fixture needs anyway (Debian's
``/usr/lib/postgresql/N/bin``, or whatever ``pg_config --bindir`` names). PostgreSQL refuses to
run as root, so as root every command runs as the ``postgres`` account, and the folder is under
``/tmp`` and owned by it (not under pytest's ``tmp_path``, which that account cannot enter).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

SERVER_ACCOUNT = "postgres"


def _bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if candidates:
        return candidates[-1]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        found = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (found / "pg_ctl").exists():
            return found
    pytest.fail("no PostgreSQL server binaries (initdb, pg_ctl) for the outage tests", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """One throwaway PostgreSQL server; blocking methods (run them in a thread from async code)."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="localchat-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False
        if os.geteuid() == 0:
            shutil.chown(self.root, SERVER_ACCOUNT, SERVER_ACCOUNT)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", SERVER_ACCOUNT, "--", *argv]
        result = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()}\n{tail}")

    def start(self) -> None:
        """Start the server (again) on the same port, and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", options, "start")
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server: ``immediate`` is a crash (every connection cut, recovery on the next
        start), ``fast`` a clean shutdown that also ends every session at once."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")
        self.running = False

    def destroy(self) -> None:
        if self.running:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@asynccontextmanager
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    """A started :class:`PrivatePostgres`, removed (stopped first if need be) when the block ends."""
    server = await asyncio.to_thread(PrivatePostgres)
    try:
        await asyncio.to_thread(server.start)
        yield server
    finally:
        await asyncio.to_thread(server.destroy)
