"""The ways in: ``chat.v1`` over WebSocket (:mod:`.ws`), the plain HTTP endpoints and the
page (:mod:`.http`), and the OpenAI-compatible API (:mod:`.openai`), all on one port
(:mod:`.asgi`). Each only frames and routes; the turns themselves are the chat core's."""
