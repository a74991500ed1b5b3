"""A stored reply's record for tests that write history directly, with plausible numbers."""

from __future__ import annotations

from service.store.records import Completion


def completion(text: str = "Hi there.", *, status: str = "complete", **overrides: object) -> Completion:
    """A finished reply's record; any field may be overridden."""
    fields: dict[str, object] = {
        "text": text,
        "token_ids": [1, 2, 3],
        "status": status,
        "prompt_tokens": 12,
        "cached_tokens": 4,
        "completion_tokens": 3,
        "queued_ms": 0.5,
        "ttft_ms": 12.25,
        "total_ms": 40.0,
        "tokens_per_s": 75.5,
    }
    fields.update(overrides)
    return Completion(**fields)  # type: ignore[arg-type]
