"""The status line of a chat, from its frames (pure)."""

from __future__ import annotations

from service.protocol import frames
from tui_client.status import ReplyStatus


def test_status_line_follows_a_reply_from_queue_to_done() -> None:
    """queued, generating with live tok/s, then done with the server's numbers."""
    now = [0.0]
    status = ReplyStatus(clock=lambda: now[0])
    assert status.line() == "ready"
    status.sending()
    assert (status.line(), status.busy) == ("sending…", True)
    status.started(
        frames.started(None, session="s", message="m", prompt_tokens=30, cached_tokens=20, queue_position=2)
    )
    assert status.line() == "queued (#2) · 0 tok · cached 20/30"
    status.token(frames.token("s", 0, "a"))
    now[0] = 0.5
    status.token(frames.token("s", 1, "bc", tokens=5))
    assert status.line() == "generating · 6 tok · 10.0 tok/s · cached 20/30"
    status.done(
        frames.done(
            session="s",
            message="m",
            reason="cancelled",
            usage={"prompt_tokens": 30, "cached_tokens": 20, "completion_tokens": 6},
            timing={"queued_ms": 5.0, "ttft_ms": 40.0, "total_ms": 600.0, "tokens_per_s": 11.0},
        )
    )
    assert status.line() == "ready · 6 tok · 11.0 tok/s · cached 20/30 · TTFT 40 ms"  # the note says stopped
    assert not status.busy


def test_a_dropped_connection_marks_a_running_reply_waiting() -> None:
    """Only a reply in flight waits for the reconnect; a finished one keeps its line."""
    status = ReplyStatus()
    status.waiting()
    assert status.phase == "idle"
    status.sending()
    status.waiting()
    assert status.line() == "connection lost: waiting to reattach · 0 tok · cached 0/0"
