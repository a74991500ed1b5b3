"""A private PostgreSQL server for when no database URL is configured, run by the ``pgserver`` package.

``pgserver`` bundles PostgreSQL 16 binaries, runs ``initdb`` on first use and ``pg_ctl start``
(about 0.5 s), listening on a unix socket only (in the data folder, or under the runtime folder
when that path is too long for a socket). Its traps, and what this module does about them:

- **Orphans.** pgserver stops the server from an ``atexit`` hook, which does not run when the
  process dies of a signal. The service's entry point installs SIGTERM/SIGINT handlers whose clean
  shutdown calls :meth:`EmbeddedPostgres.stop`; after a SIGKILL, the next start adopts the server
  still running on the same data folder and stops it normally.
- **Reference counting.** pgserver records each process using a data folder in
  ``pgdata/.handle_pids.json`` and only stops the server when the last one leaves; a process that
  died without leaving would keep it running forever. :meth:`EmbeddedPostgres.start` forgets the
  pids of processes that no longer exist first.
- **Root.** As root, pgserver creates a system user ``pgserver`` (``useradd``) to own the data
  folder and run the server, and makes **every parent folder of the data folder** readable and
  traversable by everyone (``chmod g+rx,o+rx`` up to ``/``), so don't put the data folder under
  a home directory you want private (e.g. ``/root``).
- **Chatter.** pgserver logs every command it runs, with its whole output, at INFO (37 of 42
  lines of a restart's log). Its records below WARNING are passed on at DEBUG under this module's
  logger (``--log-level DEBUG`` shows them); its warnings and errors keep their level.
- **Warnings.** Importing pgserver reads the runtime folder, which warns (``RuntimeDirWarning``)
  when ``XDG_RUNTIME_DIR`` is unset; that one warning is suppressed around the import.

One ``EmbeddedPostgres`` per data folder per process: pgserver shares one handle per folder.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import subprocess
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from service.errors import StoreError

log = logging.getLogger(__name__)

PGDATA_NAME: Final = "pgdata"
_HANDLES_FILE: Final = ".handle_pids.json"  # pgserver's list of processes using a data folder


class EmbeddedPostgres:
    """A running pgserver PostgreSQL; ``dsn`` is the URI to give :meth:`Store.open`."""

    def __init__(self, server: Any, pgdata: Path) -> None:
        self._server = server
        self.pgdata = pgdata
        self.pid: int = server.get_pid()
        # e.g. postgresql://postgres:@/postgres?host=/data/pgdata (asyncpg reads ?host= as the socket dir)
        self.dsn: str = server.get_uri()

    @classmethod
    def start(cls, data_dir: Path) -> EmbeddedPostgres:
        """Start (or adopt) the server whose data is ``data_dir/pgdata``. Blocking: run it in a thread."""
        pgserver = _import_pgserver()
        data_dir.mkdir(parents=True, exist_ok=True)
        pgdata = (data_dir / PGDATA_NAME).resolve()
        started = time.perf_counter()
        try:
            with pgserver.PostgresServer._lock:
                _forget_dead_handles(pgdata)
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
        except Exception as exc:  # pgserver raises CalledProcessError, TimeoutExpired, OSError, ...
            raise StoreError(
                f"cannot start the embedded PostgreSQL in {pgdata}: {exc} (see {pgdata}/log)"
            ) from exc
        embedded = cls(server, pgdata)
        log.info(
            "embedded PostgreSQL (pid %d) ready in %.2f s at %s",
            embedded.pid,
            time.perf_counter() - started,
            pgdata,
        )
        return embedded

    def stop(self, *, wait_s: float = 10.0) -> None:
        """Stop the server (unless another live process still uses it) and wait until it has exited.

        Blocking: run it in a thread. Close the :class:`Store` first: the server's fast shutdown
        disconnects whoever is still connected.
        """
        self._server.cleanup()  # pg_ctl -w stop when this process is the last user
        atexit.unregister(self._server._cleanup)
        if _other_users(self.pgdata):
            log.info("embedded PostgreSQL left running for the other processes using %s", self.pgdata)
            return
        if (self.pgdata / "postmaster.pid").exists() and _alive(self.pid):
            # pgserver believed another process still used it: nobody does, so stop it ourselves.
            log.info("stopping the embedded PostgreSQL that pgserver left running")
            try:
                _import_pgserver().pg_ctl(
                    ["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._server.system_user
                )
            except subprocess.CalledProcessError as exc:
                raise StoreError(f"cannot stop the embedded PostgreSQL (pid {self.pid}): {exc}") from exc
        # pg_ctl -w returns once postmaster.pid is gone; the process may take a moment more to exit.
        deadline = time.monotonic() + wait_s
        while _alive(self.pid):
            if time.monotonic() > deadline:
                raise StoreError(f"embedded PostgreSQL (pid {self.pid}) still running {wait_s} s after stop")
            time.sleep(0.01)


class _DemoteChatter(logging.Filter):
    """Drop pgserver's records below WARNING, re-logging them at DEBUG under our logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if log.isEnabledFor(logging.DEBUG):
            log.debug("pgserver: %s", record.getMessage())
        return False


_PGSERVER_LOGGER: Final = logging.getLogger("pgserver")
if not any(isinstance(f, _DemoteChatter) for f in _PGSERVER_LOGGER.filters):
    _PGSERVER_LOGGER.addFilter(_DemoteChatter())


def _import_pgserver() -> ModuleType:
    # The RuntimeDirWarning comes from a class attribute computed at import; platformdirs warns once.
    with warnings.catch_warnings():
        try:
            from platformdirs import RuntimeDirWarning
        except ImportError:  # older platformdirs: no such warning
            pass
        else:
            warnings.simplefilter("ignore", RuntimeDirWarning)
        import pgserver
    return pgserver


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop from pgserver's handle list the processes that died without leaving (so never stopped it)."""
    handles = pgdata / _HANDLES_FILE
    if not handles.exists():
        return
    pids: list[int] = json.loads(handles.read_text())
    alive = [pid for pid in pids if _alive(pid)]
    if alive != pids:
        log.info("forgetting dead users %s of the embedded PostgreSQL", sorted(set(pids) - set(alive)))
        handles.write_text(json.dumps(alive))


def _other_users(pgdata: Path) -> bool:
    handles = pgdata / _HANDLES_FILE
    if not handles.exists():
        return False
    pids: list[int] = json.loads(handles.read_text())
    return any(pid != os.getpid() and _alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting for its parent to reap it."""
    if _HAVE_PROC:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


_HAVE_PROC: Final = Path("/proc/self/stat").exists()
