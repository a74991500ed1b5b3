"""The status line of one chat, from its ``started``, ``token`` and ``done`` frames: pure."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.protocol import frames


@dataclass(slots=True)
class ReplyStatus:
    """Where the current (or last) reply of a chat stands; :meth:`line` renders it."""

    clock: Callable[[], float] = field(default=time.monotonic)
    phase: str = "idle"  # idle | sending | queued | generating | done | stopped | failed | waiting
    queue_position: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tokens: int = 0
    first_token_at: float | None = None
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    reason: str | None = None

    def sending(self) -> None:
        self.phase, self.tokens, self.first_token_at = "sending", 0, None
        self.ttft_ms = self.tokens_per_s = None
        self.reason = None

    def started(self, frame: frames.StartedFrame) -> None:
        self.queue_position = frame["queue_position"]
        self.phase = "queued" if self.queue_position > 0 else "generating"
        self.prompt_tokens, self.cached_tokens = frame["prompt_tokens"], frame["cached_tokens"]

    def token(self, frame: frames.TokenFrame) -> None:
        now = self.clock()
        if self.first_token_at is None:
            self.first_token_at = now
        self.phase = "generating"
        self.tokens = frame["index"] + frame.get("tokens", 1)
        elapsed = now - self.first_token_at
        if self.tokens > 1 and elapsed > 0:
            self.tokens_per_s = (self.tokens - 1) / elapsed

    def done(self, frame: frames.DoneFrame) -> None:
        self.reason = frame["reason"]
        self.phase = {"cancelled": "stopped", "error": "failed"}.get(frame["reason"], "done")
        self.tokens = frame["usage"]["completion_tokens"]
        self.cached_tokens = frame["usage"]["cached_tokens"]
        self.prompt_tokens = frame["usage"]["prompt_tokens"]
        self.ttft_ms = frame["timing"]["ttft_ms"]
        self.tokens_per_s = frame["timing"]["tokens_per_s"]

    def waiting(self) -> None:
        """The connection dropped while this reply was streaming."""
        if self.phase in ("sending", "queued", "generating"):
            self.phase = "waiting"

    @property
    def busy(self) -> bool:
        return self.phase in ("sending", "queued", "generating", "waiting")

    def line(self) -> str:
        """The status line. A stopped or failed reply carries that word as its own note, right
        above this line, so here the chat is just ``ready`` again (with the last reply's numbers)."""
        head = {
            "idle": "ready",
            "sending": "sending…",
            "queued": f"queued (#{self.queue_position})",
            "generating": "generating",
            "done": f"done ({self.reason})" if self.reason == "length" else "done",
            "stopped": "ready",
            "failed": "ready",
            "waiting": "connection lost: waiting to reattach",
        }[self.phase]
        if self.phase in ("idle", "sending"):
            return head
        parts = [head, f"{self.tokens} tok"]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.1f} tok/s")
        parts.append(f"cached {self.cached_tokens}/{self.prompt_tokens}")
        if self.ttft_ms is not None:
            parts.append(f"TTFT {self.ttft_ms:.0f} ms")
        return " · ".join(parts)
