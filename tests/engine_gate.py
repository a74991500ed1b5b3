"""Holding the engine between model runs, so a test can keep a reply mid-stream deterministically."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import pytest

from service.server import ChatServer

# Longer than any test waits: a gate left closed by a failing test cannot hang the suite.
_MAX_HOLD_S = 60.0


class EngineGate:
    """Holds the engine before its model runs: ``hold(n)`` lets ``n`` more runs through, then blocks
    (a prefill is one run, each decoded token one more); ``release()`` lets everything through."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._permits: int | None = None  # None: open

    def hold(self, runs: int = 0) -> None:
        with self._cond:
            self._permits = runs
            self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._permits = None
            self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._permits != 0, timeout=_MAX_HOLD_S)
            if self._permits:
                self._permits -= 1

    def install(self, service: ChatServer, monkeypatch: pytest.MonkeyPatch) -> None:
        for engine in service.models.loaded():

            def gated(*args: Any, _forward: Callable[..., np.ndarray] = engine.runner.forward) -> np.ndarray:
                self.wait()
                return _forward(*args)

            monkeypatch.setattr(engine.runner, "forward", gated)


GateFactory = Callable[[ChatServer], EngineGate]


Gate = TypeVar("Gate", bound=EngineGate)


def installed_gates(
    make: Callable[[], Gate], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[ChatServer], Gate]]:
    """What a gate fixture yields: ``install(server)`` puts a new gate on that server's engines;
    every gate is released at teardown (a test that starts its own service releases it before
    stopping the service)."""
    gates: list[Gate] = []

    def install(service: ChatServer) -> Gate:
        gate = make()
        gate.install(service, monkeypatch)
        gates.append(gate)
        return gate

    try:
        yield install
    finally:
        for gate in gates:
            gate.release()


@pytest.fixture
def engine_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[GateFactory]:
    """``engine_gate(server)``: an :class:`EngineGate` on that server's engines."""
    yield from installed_gates(EngineGate, monkeypatch)
