"""One-shot mode: send one prompt in a new chat, stream the reply to stdout as plain text.

Exit codes: 0 the reply ended normally (``stop`` or ``length``); 1 the server refused the
request or the generation failed; 3 no connection (or it dropped); 130 interrupted (the
generation is stopped first, so its partial reply is stored as cancelled).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TextIO

from service.protocol import frames
from tui_client.affinity import affinity_key
from tui_client.client import ChatClient, ClientEvent, ConnectionLost, ServerError, SessionFrame
from tui_client.settings import ClientSettings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_CONNECTION = 3
EXIT_INTERRUPTED = 130
SESSION = "oneshot"
TITLE_CHARS = 60


def title_of(prompt: str) -> str:
    """A chat title from the prompt's first non-empty line."""
    line = next((ln.strip() for ln in prompt.splitlines() if ln.strip()), "")
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1] + "…"


async def run_oneshot(settings: ClientSettings, prompt: str, out: TextIO, err: TextIO) -> int:
    done: asyncio.Future[frames.DoneFrame] = asyncio.get_running_loop().create_future()

    def on_event(event: ClientEvent) -> None:
        if not isinstance(event, SessionFrame):
            return
        frame = event.frame
        if frame["type"] == "token":
            out.write(frame["text"])
            out.flush()
        elif frame["type"] == "done" and not done.done():
            done.set_result(frame)

    client = ChatClient(
        settings.url, token=settings.token, on_event=on_event, affinity=affinity_key(settings.token)
    )
    try:
        await client.connect()
        await client.open(SESSION, model=settings.model, title=title_of(prompt), params=settings.params)
        await client.send(SESSION, prompt)
        try:
            finished = await _until_done(client, done)
        except asyncio.CancelledError:
            await client.stop(SESSION)
            raise
    except ServerError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_FAILED
    except ConnectionLost as exc:
        print(f"error: {exc}", file=err)
        return EXIT_NO_CONNECTION
    finally:
        await client.aclose()
    out.write("\n")
    out.flush()
    if finished["reason"] in ("stop", "length"):
        return EXIT_OK
    error = finished.get("error")
    detail = f"{error['code']}: {error['message']}" if error else finished["reason"]
    print(f"error: the reply ended early ({detail})", file=err)
    return EXIT_FAILED


async def _until_done(client: ChatClient, done: asyncio.Future[frames.DoneFrame]) -> frames.DoneFrame:
    """The ``done`` frame, or :class:`ConnectionLost` if the connection drops first."""
    reader = client.reader
    assert reader is not None
    waiters: list[asyncio.Future[Any]] = [done, reader]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if not done.done():
        raise ConnectionLost("the connection was lost before the reply ended")
    return done.result()


def main(settings: ClientSettings, prompt: str) -> int:
    try:
        return asyncio.run(run_oneshot(settings, prompt, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
