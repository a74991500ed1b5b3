"""``python -m service``: the chat service (WebSocket ``/ws``, the OpenAI-compatible API under
``/v1``, the plain HTTP routes of schema/openapi.yaml, the page, health and metrics).

``python -m service users add|list|revoke`` manages the users of ``--auth token``
(:mod:`service.cli.users`); ``python -m service models tokenize|inspect`` looks into a GGUF
file (:mod:`service.cli.models`). The engine's terminal demo is ``python -m service.engine.demo``;
model preparation alone is ``python -m service.engine.models prepare``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import NoReturn

from service.app import run
from service.cli import models as models_cli
from service.cli import users as users_cli
from service.cli.options import add_engine_arguments, data_dir, engine_settings
from service.config import ReplicaSettings, ServerSettings, ServiceSettings
from service.errors import ServiceError

_DEFAULTS = ServerSettings()
_REPLICA = ReplicaSettings()
# (flag, ServerSettings field, type, unit) of the limits a server operator may want to change.
_LIMITS = (
    ("--max-connections", "max_connections", int, "N"),
    ("--max-sessions", "max_sessions", int, "N"),
    ("--max-frame-bytes", "max_frame_bytes", int, "BYTES"),
    ("--max-body-bytes", "max_body_bytes", int, "BYTES"),
    ("--max-tokens", "max_tokens", int, "N"),
    ("--max-batch-prompts", "max_batch_prompts", int, "N"),
    ("--hello-timeout", "hello_timeout_s", float, "SECONDS"),
    ("--send-timeout", "send_timeout_s", float, "SECONDS"),
    ("--shutdown-grace", "shutdown_grace_s", float, "SECONDS"),
)


def _parser(prog: str = "python -m service") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    net = parser.add_argument_group("server")
    net.add_argument("--host", default=_DEFAULTS.host, help="interface to listen on (default: %(default)s)")
    net.add_argument("--port", type=int, default=_DEFAULTS.port, help="(default: %(default)s)")
    net.add_argument(
        "--auth",
        choices=["none", "token"],
        default=_DEFAULTS.auth,
        help="none: one local user, hello needs no token; token: hello must carry a user's token",
    )
    net.add_argument(
        "--disconnect-grace",
        type=float,
        default=_DEFAULTS.disconnect_grace_s,
        metavar="SECONDS",
        help="keep a dropped connection's generations running this long, for `open` with `resume`",
    )
    net.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="also accept browser pages from this origin, e.g. https://chat.example (repeatable)",
    )
    net.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer to this Host name (IP literals, localhost and --host always work; repeatable)",
    )
    net.add_argument(
        "--reranker",
        default=None,
        metavar="MODEL",
        help="an offered model (its --model id) that scores the candidates of /stream_chat_beam "
        "with use_rerank (default: their length-normalised log-probability)",
    )
    replicas = parser.add_argument_group("replicas (several processes on one database: docs/scaling.md)")
    replicas.add_argument(
        "--instance-name",
        default="",
        metavar="NAME",
        help="this replica's name in logs, /metrics and /readyz (default: HOST:PID)",
    )
    replicas.add_argument(
        "--lease",
        type=float,
        default=_REPLICA.lease_s,
        metavar="SECONDS",
        help="a reply whose replica missed its heartbeats this long is marked interrupted "
        "by another replica (default: %(default)s)",
    )
    replicas.add_argument(
        "--heartbeat",
        type=float,
        default=_REPLICA.heartbeat_s,
        metavar="SECONDS",
        help="how often the lease is renewed and expired replies swept (default: %(default)s)",
    )
    limits = parser.add_argument_group("limits")
    for flag, field, kind, unit in _LIMITS:
        limits.add_argument(
            flag, type=kind, default=getattr(_DEFAULTS, field), metavar=unit, help="(default: %(default)s)"
        )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or None,
        help="PostgreSQL >= 15 (default: $DATABASE_URL, else an embedded PostgreSQL in --data-dir)",
    )
    add_engine_arguments(parser, several_models=True)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # No subcommand: the server. `users ...`: manage the accounts of --auth token. `models ...`:
    # look into a GGUF file.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    users_cli.add_users_command(commands)
    models_cli.add_models_command(commands)
    return parser


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    if not 0 <= args.port <= 65535:
        raise SystemExit("--port must be in 0..65535")
    if args.disconnect_grace < 0:
        raise SystemExit("--disconnect-grace must be >= 0")
    if not 0 < args.heartbeat < args.lease:
        raise SystemExit("--heartbeat must be positive and shorter than --lease")
    if any(c.isspace() or not c.isprintable() for c in args.instance_name):
        raise SystemExit("--instance-name must be printable, without whitespace")
    limits = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _, _ in _LIMITS}
    for flag, field, _, _ in _LIMITS:
        if limits[field] < 0 or (limits[field] == 0 and not field.endswith("_s")):
            raise SystemExit(f"{flag} must be positive")
    return ServiceSettings(
        server=ServerSettings(
            host=args.host,
            port=args.port,
            auth=args.auth,
            disconnect_grace_s=args.disconnect_grace,
            allowed_origins=tuple(args.allowed_origin),
            allowed_hosts=tuple(args.allowed_host),
            reranker=args.reranker,
            **limits,
        ),
        engine=engine_settings(args),
        data_dir=data_dir(args),
        database_url=args.database_url,
        models=tuple(args.models or ["default"]),
        precision=args.precision,
        replica=ReplicaSettings(
            instance_name=args.instance_name, lease_s=args.lease, heartbeat_s=args.heartbeat
        ),
    ).with_instance_name()


def main(argv: list[str] | None = None, *, prog: str = "python -m service") -> int:
    args = _parser(prog).parse_args(argv)
    if args.command == "users":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return users_cli.main(args)
    if args.command == "models":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return models_cli.main(args)
    settings = settings_from_args(args)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s [{settings.replica.instance_name}] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(run(settings))
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main_and_exit(argv: list[str] | None = None, *, prog: str = "python -m service") -> NoReturn:
    """:func:`main`, then leave at once, skipping the interpreter's teardown.

    When ``stopped`` is logged, everything the service held has been released explicitly (the
    port, connections, engines and their threads, the database pool, the embedded PostgreSQL), and
    pgserver's exit hook is unregistered. What Python would still do is finalize its modules and
    free the heap (numpy, onnx, onnxruntime, asyncpg, ...): measured at 0.45 s after ``stopped``
    on an idle service here, none of it Python code, and seconds on a loaded machine. So the logs
    and standard streams are flushed, and the process ends with ``os._exit``.
    """
    status = main(argv, prog=prog)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main_and_exit()
