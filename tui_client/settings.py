"""Where the client connects and how it samples: the command line over the environment."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from service.protocol import frames
from tui_client.client import DEFAULT_URL

URL_ENV = "LOCALCHAT_URL"
TOKEN_ENV = "LOCALCHAT_TOKEN"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSettings:
    url: str = DEFAULT_URL
    token: str | None = None
    model: str | None = None  # None: the server's default
    temperature: float | None = None  # None: the server's default
    max_tokens: int | None = None

    @property
    def params(self) -> frames.Params:
        return frames.Params(temperature=self.temperature, max_tokens=self.max_tokens)


def parser(prog: str = "python -m tui_client") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="The localchat terminal client. With --prompt (or a prompt piped on stdin) it "
        "prints one reply to stdout and exits; otherwise it opens the full-screen app.",
    )
    p.add_argument("--url", default=None, help=f"the service's WebSocket URL (${URL_ENV}; {DEFAULT_URL})")
    p.add_argument("--token", default=None, help=f"access token when the service asks for one (${TOKEN_ENV})")
    p.add_argument("--model", default=None, help="model id (default: the server's default model)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens in a reply")
    p.add_argument("--prompt", default=None, help="one-shot mode: send this prompt, print the reply, exit")
    return p


def from_args(args: argparse.Namespace) -> ClientSettings:
    return ClientSettings(
        url=args.url or os.environ.get(URL_ENV) or DEFAULT_URL,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        model=args.model,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )
