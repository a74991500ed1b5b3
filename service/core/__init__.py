"""The chat core: the life of a turn, whatever transport asked for it.

Parameters and their defaults, the prompt ids from history and the template, the store
writes before and after, submit/stop/cancel, and the registry of running replies that
shutdown, chat deletion, user revocation and ``resume`` reach. Transports (``chat.v1``
over WebSocket, the OpenAI-compatible HTTP API) only frame and route.
"""
