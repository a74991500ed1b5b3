"""Stop strings over streamed text."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


class StopMatcher:
    """Finds stop strings in text that arrives in chunks.

    Text that might be the start of a stop string is held back until the next chunk
    settles it, so a stop string is never partly emitted.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop if s)
        self._buffer = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit now, whether a stop string was reached).

        On a match the text before the stop string is returned and the stop string
        itself is dropped; later calls return ``("", True)``.
        """
        if self._stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._buffer + text
        found = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if found:
            self._buffer = ""
            self._stopped = True
            return buffer[: min(found)], True
        keep = self._held_suffix_length(buffer)
        self._buffer = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of a generation that no stop string ended."""
        text, self._buffer = self._buffer, ""
        return "" if self._stopped else text

    def _held_suffix_length(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:n]):
                    longest = n
                    break
        return longest
