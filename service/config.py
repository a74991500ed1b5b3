"""All configuration in one place: frozen settings objects, built once and passed in."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
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
    max_body_bytes: int = 1024 * 1024  # an HTTP API request body larger than this: 413
    sse_keepalive_s: float = 15.0  # a streaming API response sends a comment line this often
    max_batch_prompts: int = 16  # prompts of one POST /generate_batch; more: 413
    reranker: str | None = None  # an offered model that re-ranks beam search candidates (use_rerank)
    allowed_origins: tuple[str, ...] = ()  # browser origins besides the service's own
    allowed_hosts: tuple[str, ...] = ()  # Host names besides localhost, the --host and this machine's


def default_instance_name() -> str:
    """``host:pid``: distinct for every process, readable in logs (``--instance-name`` overrides)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaSettings:
    """This process as one replica among several on one database (``docs/scaling.md``).

    The heartbeat renews this instance's lease every ``heartbeat_s``; the lease ends ``lease_s``
    after the last renewal, on the database's clock. A reply whose owner's lease has ended is
    marked ``interrupted`` by the sweeper of any replica, which runs at start and every
    ``heartbeat_s``. ``lease_s`` must exceed ``heartbeat_s`` by enough to absorb a slow renewal.
    """

    instance_name: str = ""  # empty: default_instance_name()
    lease_s: float = 15.0
    heartbeat_s: float = 5.0

    def resolved_name(self) -> str:
        return self.instance_name or default_instance_name()


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSettings:
    """Everything ``python -m service`` runs with, built once from the command line."""

    server: ServerSettings
    engine: EngineSettings
    data_dir: Path
    database_url: str | None  # None: start the embedded PostgreSQL in data_dir
    models: tuple[str, ...] = ("default",)  # as named on the command line; the first is the default
    precision: str = "auto"  # auto: fp16 on CUDA, native on the CPU
    replica: ReplicaSettings = field(default_factory=ReplicaSettings)

    def with_instance_name(self) -> ServiceSettings:
        """These settings with the instance name filled in (the default when none was given)."""
        if self.replica.instance_name:
            return self
        return replace(self, replica=replace(self.replica, instance_name=default_instance_name()))
