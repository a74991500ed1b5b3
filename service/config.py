"""All configuration in one place: frozen settings objects, built once and passed in."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    """How the engine uses the machine.

    ``kv_budget_mb`` bounds the memory of cached chats (least recently used chats are
    evicted past it and simply re-prefill on their next turn); ``kv_slots`` bounds how
    many chats can hold a cache at once; ``max_context`` caps the positions per chat (None:
    the model's own context, but no more than one chat's cache can hold within
    ``kv_budget_mb``, so a 128k-context model is not served at 128k blindly).
    """

    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0 = every core this process may use
    max_batch: int = 16  # generations decoded together in one model run
    max_waiting: int = 256  # bounded FIFO queue behind them
    kv_slots: int = 32
    kv_budget_mb: int = 2048
    max_context: int | None = None
    prefill_chunk: int = 512  # tokens per prefill run when nobody is decoding
    interleaved_chunk: int = 64  # tokens per prefill run while others decode

    def resolved_threads(self) -> int:
        return self.threads or default_threads()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSettings:
    """The WebSocket server: where it listens and the limits it enforces (units in names)."""

    host: str = "127.0.0.1"
    port: int = 8765
    auth: str = "none"  # none | token
    max_frame_bytes: int = 64 * 1024  # larger client frames: close 1009
    max_sessions: int = 16  # open sessions per connection
    max_connections: int = 1024
    hello_timeout_s: float = 10.0  # no hello by then: close 4408
    disconnect_grace_s: float = 0.0  # how long a dropped connection's generations keep running
    max_tokens: int = 4096  # upper bound of params.max_tokens
    default_max_tokens: int = 256
    ping_interval_s: float | None = 20.0  # websockets' keepalive pings
    ping_timeout_s: float | None = 20.0
    send_timeout_s: float = 30.0  # a client that reads nothing this long is dropped
    max_queued_frames: int = 1024  # replies a client may leave unread before it is dropped
    shutdown_grace_s: float = 10.0  # on SIGTERM, running generations may finish this long
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the service's own
    allowed_hosts: tuple[str, ...] = ()  # Host names besides localhost, the --host and this machine's


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings:
    """Everything ``python -m service`` runs with, built once from the command line."""

    server: ServerSettings
    engine: EngineSettings
    data_dir: Path
    database_url: str | None  # None: start the embedded PostgreSQL in data_dir
    models: tuple[str, ...] = ("default",)  # as named on the command line; the first is the default
    precision: str = "int8"
