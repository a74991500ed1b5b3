"""``chat.v1`` over WebSocket: framing, sessions and routing to the chat core."""
