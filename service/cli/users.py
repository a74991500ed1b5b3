"""``python -m service users add|list|revoke``: the accounts of ``--auth token``.

``add NAME`` creates a user and prints a new token once, as the last word of the last line; only
its SHA-256 is stored. Adding a revoked user again issues a new token to the same account (same id,
same chats): revoke then add is how a token is rotated. Adding a user that holds a live token is
refused. ``revoke NAME`` makes the token fail at the next ``hello``, and a running server closes
that user's open connections (it hears of the revocation through PostgreSQL: service.revocations).
``list`` shows names and dates, never tokens. The local user of ``--auth none`` (``local``) has no
token and cannot be given one: it is never usable with ``--auth token``.

The commands take the server's ``--data-dir`` / ``--database-url`` (and ``$DATABASE_URL``), so they
reach the same database, embedded or not. Exit status: 0 done, 1 refused or failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import unicodedata
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Final, TypeVar

from service.app import database
from service.cli.options import data_dir
from service.config import EngineSettings, ServerSettings, ServiceSettings
from service.errors import ServiceError, UserExists
from service.store.records import LOCAL_USER_NAME, token_hash
from service.store.store import Store

NAME_MAX_CHARS: Final = 64
TOKEN_BYTES: Final = 32  # secrets.token_urlsafe(32): 43 characters, 256 bits

_T = TypeVar("_T")

_DESCRIPTION: Final = (
    "add NAME creates a user and prints a new token once (the last word of the last line); adding "
    "a revoked user again issues a new token to the same account and chats. revoke NAME makes the "
    "token fail from the next hello on and closes that user's open connections. list shows "
    "users, never tokens. They reach the server's database: the same --data-dir or --database-url."
)


class UsageError(Exception):
    """A request the command refuses (bad name, unknown or reserved user): exit status 1."""


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def check_name(name: str) -> str:
    """``name`` when it is a valid user name: 1-64 characters, none whitespace or control/format."""
    if not name:
        raise UsageError("a user name cannot be empty")
    if len(name) > NAME_MAX_CHARS:
        raise UsageError(f"a user name has at most {NAME_MAX_CHARS} characters (this one has {len(name)})")
    for char in name:
        if char.isspace() or unicodedata.category(char).startswith("C"):
            raise UsageError(f"a user name cannot contain whitespace or control characters ({char!r})")
    if name == LOCAL_USER_NAME:
        raise UsageError(
            f"{LOCAL_USER_NAME!r} is the user of --auth none; it has no token and cannot be given one"
        )
    return name


def add_users_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``users`` (with ``add``, ``list``, ``revoke``) on the entry point's subcommands."""
    users = subparsers.add_parser(
        "users",
        help="manage the users of --auth token",
        description=_DESCRIPTION,
    )
    actions = users.add_subparsers(dest="users_action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create a user (or re-admit a revoked one) and print a new token")
    add.add_argument("name", metavar="NAME")
    actions.add_parser("list", help="every user: name, created, revoked (no tokens)")
    revoke = actions.add_parser(
        "revoke", help="revoke a user's token: refused from the next hello on, their open connections closed"
    )
    revoke.add_argument("name", metavar="NAME")
    for parser in (users, *actions.choices.values()):
        _add_database_arguments(parser)


def _add_database_arguments(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before `users` (server style) or after the action, either way counts.
    group = parser.add_argument_group("database (as for the server)")
    group.add_argument(
        "--database-url",
        default=argparse.SUPPRESS,
        help="PostgreSQL >= 15 (default: $DATABASE_URL, else the embedded PostgreSQL in --data-dir)",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="the service's data directory (default: $LOCALCHAT_DATA_DIR, $XDG_DATA_HOME/localchat "
        "or ~/.local/share/localchat)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the ``users`` action that ``args`` names; the exit status."""
    settings = ServiceSettings(
        server=ServerSettings(),
        engine=EngineSettings(),
        data_dir=data_dir(args),
        database_url=args.database_url,
    )
    try:
        match args.users_action:
            case "add":
                lines = _add(settings, check_name(args.name))
            case "list":
                lines = _list(settings)
            case "revoke":
                lines = _revoke(settings, check_name(args.name))
            case _:
                raise UsageError(f"unknown action {args.users_action!r}")
    except (UsageError, ServiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # Printed once the database is closed (and an embedded one stopped): nothing follows the token.
    for line in lines:
        print(line)
    return 0


def _with_store(settings: ServiceSettings, work: Callable[[Store], Awaitable[_T]]) -> _T:
    async def run() -> _T:
        async with database(settings) as (store, _):
            return await work(store)

    return asyncio.run(run())


def _add(settings: ServiceSettings, name: str) -> list[str]:
    token = new_token()

    async def add(store: Store) -> str:
        before = {u.name: u for u in await store.list_users()}.get(name)
        try:
            user = await store.add_user(name, token_hash(token))
        except UserExists:
            raise UsageError(
                f"user {name!r} exists and holds a live token; "
                f"`users revoke {name}` first, then `users add {name}` issues a new one"
            ) from None
        how = "re-admitted revoked" if before is not None and before.revoked_at is not None else "added"
        return f"{how} user {user.name} (id {user.id})"

    summary = _with_store(settings, add)
    return [summary, f"token for {name} (shown once): {token}"]


def _list(settings: ServiceSettings) -> list[str]:
    users = _with_store(settings, lambda store: store.list_users())
    if not users:
        return ["no users"]
    rows = [("NAME", "CREATED", "REVOKED", "")]
    for user in users:
        note = "" if user.has_token else "(no token)"
        if user.name == LOCAL_USER_NAME:
            note = "(the --auth none user; no token)"
        rows.append((user.name, _when(user.created_at), _when(user.revoked_at), note))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"{n:<{width[0]}}  {c:<{width[1]}}  {r:<{width[2]}}  {note}".rstrip() for n, c, r, note in rows]


def _revoke(settings: ServiceSettings, name: str) -> list[str]:
    async def revoke(store: Store) -> str:
        if await store.revoke_user(name):
            return f"revoked {name}: the token fails from the next hello on"
        known = {u.name: u for u in await store.list_users()}.get(name)
        if known is None:
            raise UsageError(f"no user named {name!r}")
        return f"{name} was already revoked (at {_when(known.revoked_at)})"

    return [_with_store(settings, revoke)]


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().isoformat(sep=" ", timespec="seconds")
