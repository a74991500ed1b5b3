"""Collecting what a callback is handed, and waiting (without polling) until it holds something."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from tests.service.client import TIMEOUT_S

T = TypeVar("T")


class Recorder(Generic[T]):
    """A callback that keeps every value it is called with; ``until`` waits for a condition on them."""

    def __init__(self) -> None:
        self.events: list[T] = []
        self._changed = asyncio.Event()

    def __call__(self, event: T) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(TIMEOUT_S):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
