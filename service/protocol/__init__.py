"""The ``chat.v1`` wire protocol, pure and free of I/O: frames, codec, error and close codes.

The server and the TUI both speak it through this package; nothing here touches a socket,
the event loop, the database or the model.
"""
