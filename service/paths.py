"""Where the service keeps its data (downloaded and prepared models)."""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "localchat"


def default_data_dir() -> Path:
    """``$LOCALCHAT_DATA_DIR``, else ``$XDG_DATA_HOME/localchat``, else ``~/.local/share/localchat``."""
    explicit = os.environ.get("LOCALCHAT_DATA_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg).expanduser() / APP_NAME
    return Path.home() / ".local" / "share" / APP_NAME
