"""``python -m service``: until the WebSocket server lands, this runs the engine's terminal chat."""

from __future__ import annotations

import sys

from service.engine.demo import main

if __name__ == "__main__":
    sys.exit(main())
