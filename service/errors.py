"""The service's one exception tree.

``ServiceError``
 ├── ``ModelError``        a model cannot be found, prepared or loaded
 ├── ``EngineError``       the decoder failed while running a generation
 │    └── ``ContextOverflow`` a prompt does not fit the model's context
 ├── ``QueueFull``         the engine's waiting queue is at its bound
 └── ``StoreError``        the history database is unreachable, or refuses or fails a query
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the service raises on purpose."""


class ModelError(ServiceError):
    """A model cannot be found, prepared or loaded."""


class EngineError(ServiceError):
    """The decoder failed while running a generation."""


class ContextOverflow(EngineError):
    """A prompt (plus at least one generated token) does not fit the model's context."""


class QueueFull(ServiceError):
    """The engine's waiting queue is full; try again later."""


class StoreError(ServiceError):
    """The history database cannot be reached, has an unknown schema, or failed a query."""
