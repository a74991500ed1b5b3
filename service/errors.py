"""The service's one exception tree.

``ServiceError``
 ├── ``ModelError``        a model cannot be found, prepared or loaded
 ├── ``EngineError``       the decoder failed while running a generation
 │    └── ``ContextOverflow`` a prompt does not fit the model's context
 ├── ``QueueFull``         the engine's waiting queue is at its bound
 ├── ``InvalidParams``     sampling parameters out of range (also a ``ValueError``)
 ├── ``Refused``           the chat core turns a request away
 │    ├── ``NotFound``        no such chat (or not the caller's)
 │    ├── ``Busy``            the conversation is already generating
 │    ├── ``TooManyRequests`` the caller already runs as many generations as allowed
 │    └── ``Draining``        the server is shutting down
 ├── ``UserExists``        ``users add``: a user of that name already holds a live token
 └── ``StoreError``        the history database is unreachable, or refuses or fails a query
      ├── ``ChatGone``           a write named a chat deleted meanwhile
      └── ``StoreUnavailable``  the database cannot be reached now (retrying may succeed)
           └── ``WriteBacklogFull`` too many writes wait for the database to return
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


class InvalidParams(ServiceError, ValueError):
    """A sampling parameter is out of range; the message names it."""


class Refused(ServiceError):
    """The chat core turns a request away; every transport maps the subclasses."""


class NotFound(Refused):
    """No such chat, or one of another user's (the two are never told apart)."""


class Busy(Refused):
    """The conversation already has a reply generating."""


class TooManyRequests(Refused):
    """The caller already runs as many generations at once as a connection may."""


class Draining(Refused):
    """The server is shutting down and starts no new generation."""


class StoreError(ServiceError):
    """The history database cannot be reached, has an unknown schema, or failed a query."""


class ChatGone(StoreError):
    """A write named a chat that no longer exists (deleted while a session had it open)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached now (down, restarting, connection lost): retrying may succeed."""


class WriteBacklogFull(StoreUnavailable):
    """So many writes already wait for the database to return that no new work is accepted."""


class UserExists(ServiceError):
    """``users add``: a user of that name already holds a live (unrevoked) token."""
