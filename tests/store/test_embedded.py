"""The embedded PostgreSQL (pgserver) used when no database URL is configured."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import uuid
from pathlib import Path

import pytest

from service.store import Store
from service.store.embedded import EmbeddedPostgres
from tests.completions import completion


def _processes_using(folder: Path) -> list[int]:
    """Pids whose command line names ``folder`` (the postmaster is started with ``-D folder``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:  # exited meanwhile
            continue
        if str(folder).encode() in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


async def test_embedded_postgres_serves_the_store_and_stops_for_good(tmp_path: Path) -> None:
    """start → Store.open → a chat round trip → stop, after which no postgres process is left."""
    embedded = await asyncio.to_thread(EmbeddedPostgres.start, tmp_path / "data")
    try:
        assert embedded.dsn.startswith("postgresql://")
        assert embedded.pid in _processes_using(embedded.pgdata)
        store = await Store.open(embedded.dsn)
        try:
            user = await store.local_user()
            chat, _ = await store.create_chat(user.id, model="tiny", title=None, system=None, params={})
            reply_id = uuid.uuid4()
            await store.begin_turn(chat.id, user_text="ping", user_token_ids=[1], assistant_id=reply_id)
            await store.finish_message(
                reply_id,
                completion("pong", token_ids=[2], completion_tokens=1),
            )
            history = await store.messages(user.id, chat.id)
            assert history is not None
            assert [(m.role, m.text) for m in history] == [("user", "ping"), ("assistant", "pong")]
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(embedded.stop)
    assert _processes_using(embedded.pgdata) == []


async def test_embedded_postgres_restarts_on_its_data_after_a_stop(tmp_path: Path) -> None:
    """A second start on the same folder finds what the first one stored."""
    data_dir = tmp_path / "data"
    first = await asyncio.to_thread(EmbeddedPostgres.start, data_dir)
    try:
        store = await Store.open(first.dsn)
        user = await store.local_user()
        await store.close()
    finally:
        await asyncio.to_thread(first.stop)
    second = await asyncio.to_thread(EmbeddedPostgres.start, data_dir)
    try:
        assert second.pid != first.pid
        store = await Store.open(second.dsn)
        assert await store.local_user() == user
        await store.close()
    finally:
        await asyncio.to_thread(second.stop)
    assert _processes_using(second.pgdata) == []


async def test_a_server_orphaned_by_a_killed_process_is_adopted_and_stopped(tmp_path: Path) -> None:
    """After its owner dies of SIGKILL, the next start reuses the running server and stop ends it."""
    data_dir = tmp_path / "data"
    crash = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from service.store.embedded import EmbeddedPostgres\n"
        "print(EmbeddedPostgres.start(Path(sys.argv[1])).pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", crash, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await child.communicate()
    assert child.returncode == -signal.SIGKILL
    orphan = int(out)
    adopted = await asyncio.to_thread(EmbeddedPostgres.start, data_dir)
    try:
        assert adopted.pid == orphan
    finally:
        await asyncio.to_thread(adopted.stop)
    assert _processes_using(adopted.pgdata) == []


async def test_pgserver_chatter_is_logged_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """pgserver's own INFO lines (each command it runs) never reach INFO; at DEBUG they are ours."""
    caplog.set_level(logging.DEBUG)
    embedded = await asyncio.to_thread(EmbeddedPostgres.start, tmp_path / "data")
    await asyncio.to_thread(embedded.stop)
    chatter = [r for r in caplog.records if r.name == "pgserver" and r.levelno < logging.WARNING]
    assert chatter == []
    demoted = [r for r in caplog.records if r.getMessage().startswith("pgserver: ")]
    assert demoted, "pgserver said nothing at all: the filter would be untested"
    assert {r.levelno for r in demoted} == {logging.DEBUG}
    assert {r.name for r in demoted} == {"service.store.embedded"}
    ours = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("embedded PostgreSQL (pid" in m for m in ours), ours
