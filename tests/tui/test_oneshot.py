"""``python -m tui_client --prompt``: one reply to stdout as plain text, exit codes."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

from service.server import ChatServer
from tests.service.client import TIMEOUT_S
from tests.service.conftest import ws_url
from tests.tui.helpers import chats, stored
from tui_client.oneshot import EXIT_FAILED, EXIT_NO_CONNECTION, EXIT_OK

REPO = Path(__file__).resolve().parents[2]


async def oneshot(*args: str, stdin: bytes | None = None, stdout: Path | None = None) -> tuple[int, str, str]:
    """Run ``python -m tui_client ARGS`` (stdout to a file when given); (rc, stdout, stderr)."""
    out = stdout.open("wb") if stdout is not None else asyncio.subprocess.PIPE
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tui_client",
            *args,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=out,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LOCALCHAT_URL": "", "LOCALCHAT_TOKEN": ""},
        )
        got_out, got_err = await asyncio.wait_for(process.communicate(stdin or b""), TIMEOUT_S)
    finally:
        if stdout is not None:
            out.close()  # type: ignore[union-attr]
    text = stdout.read_bytes().decode() if stdout is not None else got_out.decode()  # noqa: ASYNC240
    assert process.returncode is not None
    return process.returncode, text, got_err.decode()


async def test_prompt_streams_the_reply_to_a_file(server: ChatServer, tmp_path: Path) -> None:
    """The reply piped to a file is exactly the stored reply plus a newline; the chat is
    titled after the prompt."""
    target = tmp_path / "reply.txt"
    rc, text, err = await oneshot(
        "--url",
        ws_url(server),
        "--prompt",
        "Say hello",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        stdout=target,
    )
    assert (rc, err) == (EXIT_OK, "")
    listed = await chats(server)
    assert [c["title"] for c in listed] == ["Say hello"]
    messages = await stored(server, listed[0]["chat"])
    assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "complete")]
    assert text == messages[-1]["text"] + "\n"


async def test_prompt_from_stdin_when_it_is_not_a_tty(server: ChatServer) -> None:
    """Without --prompt, the prompt is read from a piped stdin."""
    rc, text, _ = await oneshot(
        "--url", ws_url(server), "--temperature", "0", "--max-tokens", "4", stdin=b"Piped question\n"
    )
    assert rc == EXIT_OK
    messages = await stored(server, (await chats(server))[0]["chat"])
    assert messages[0]["text"] == "Piped question\n"
    assert text == messages[-1]["text"] + "\n"


async def test_failures_exit_non_zero_with_a_message(server: ChatServer) -> None:
    """Refused parameters exit 1, no service exits 3; each says why on stderr, never a traceback."""
    rc, _, err = await oneshot("--url", ws_url(server), "--prompt", "hi", "--max-tokens", "100000000")
    assert rc == EXIT_FAILED
    assert "bad_params" in err
    assert "Traceback" not in err

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = await oneshot("--url", f"ws://127.0.0.1:{port}/ws", "--prompt", "hi")
    assert rc == EXIT_NO_CONNECTION
    assert "cannot connect" in err
    assert "Traceback" not in err
