"""The OpenAI-compatible HTTP API under ``/v1``: models, chat completions, completions.

Requests are stateless: nothing is written to the chat history (the user's record of their
own chats), but every generation runs through the chat core, counts in ``/metrics``, and
is validated as strictly as a ``chat.v1`` turn.
"""
