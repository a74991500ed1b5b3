"""``localchat``: the one command installed into the venv (``.venv/bin/localchat``).

It names the existing entry points, so they work without activating the venv or setting
``PYTHONPATH``:

- ``localchat serve ...``  is ``python -m service ...`` (the service);
- ``localchat chat ...``   is ``python -m tui_client ...`` (the terminal client, or one-shot);
- ``localchat users ...``  is ``python -m service users ...`` (accounts of ``--auth token``);
- ``localchat models ...`` is ``python -m service models ...`` (prepare, tokenize, inspect).

Each subcommand's modules are imported only when it runs, so ``localchat chat`` never loads the
engine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Final

_USAGE: Final = """usage: localchat COMMAND [ARGS...]

commands:
  serve    run the service (python -m service)
  chat     the terminal client; --prompt TEXT for one reply (python -m tui_client)
  users    add|list|revoke the users of --auth token (python -m service users)
  models   prepare a model ahead of time, tokenize text, inspect a GGUF (python -m service models)

'localchat COMMAND --help' describes each command's options.
"""


def _serve(argv: list[str]) -> int:
    from service.cli.serve import main_and_exit

    main_and_exit(argv, prog="localchat serve")


def _users(argv: list[str]) -> int:
    from service.cli.serve import main

    return main(["users", *argv], prog="localchat")


def _chat(argv: list[str]) -> int:
    from tui_client.__main__ import main

    return main(argv, prog="localchat chat")


def _models(argv: list[str]) -> int:
    from service.cli.serve import main

    return main(["models", *argv], prog="localchat")


COMMANDS: Final[dict[str, Callable[[list[str]], int]]] = {
    "serve": _serve,
    "chat": _chat,
    "users": _users,
    "models": _models,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"localchat: unknown command {args[0]!r}\n\n{_USAGE}", end="", file=sys.stderr)
        return 2
    return command(args[1:])


if __name__ == "__main__":
    sys.exit(main())
