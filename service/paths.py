"""Where the service keeps its data: prepared models and the embedded database."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "localchat"


SYSTEM_DATA_DIR = Path("/var/lib") / APP_NAME


def default_data_dir() -> Path:
    """``$LOCALCHAT_DATA_DIR``, else ``$XDG_DATA_HOME/localchat``, else ``~/.local/share/localchat``
    (``/var/lib/localchat`` for root: the embedded PostgreSQL makes every parent folder of its
    data world-readable, which must not happen to root's home)."""
    explicit = os.environ.get("LOCALCHAT_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg).expanduser() / APP_NAME
    if os.geteuid() == 0:
        return SYSTEM_DATA_DIR
    return Path.home() / ".local" / "share" / APP_NAME
