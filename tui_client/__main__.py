"""``python -m tui_client``: the full-screen app, or one-shot mode with --prompt or piped stdin."""

from __future__ import annotations

import sys

from tui_client import oneshot
from tui_client.settings import from_args, parser


def main(argv: list[str] | None = None, *, prog: str = "python -m tui_client") -> int:
    args = parser(prog).parse_args(argv)
    settings = from_args(args)
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is not None:
        if not prompt.strip():
            print("error: the prompt is empty", file=sys.stderr)
            return 2
        return oneshot.main(settings, prompt)
    from tui_client.app import ChatApp  # Textual only when the app runs

    ChatApp(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
