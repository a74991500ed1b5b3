"""Snapshot comparison of the app's screen as plain text (pytest-textual-snapshot needs
pytest < 9 through syrupy 4.8): committed under tests/tui/snapshots/, regenerated with
``LOCALCHAT_UPDATE_SNAPSHOTS=1``."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from textual.app import App

SNAPSHOTS = Path(__file__).with_name("snapshots")
UPDATE_ENV = "LOCALCHAT_UPDATE_SNAPSHOTS"


def screen_text(app: App[Any]) -> str:
    """The current screen (dialogs over their background included) as plain text, one line
    per terminal row, trailing spaces dropped."""
    width, height = app.size
    console = Console(
        width=width,
        height=height,
        file=io.StringIO(),
        force_terminal=True,
        color_system=None,
        record=True,
        legacy_windows=False,
        safe_box=False,
    )
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return "\n".join(line.rstrip() for line in console.export_text().splitlines()) + "\n"


def assert_snapshot(app: App[Any], name: str) -> None:
    """The screen matches ``snapshots/NAME.txt`` (written instead when updating or new;
    an SVG of the same screen is written next to it for people to look at)."""
    text = screen_text(app)
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get(UPDATE_ENV) == "1" or not path.exists():
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text)
        path.with_suffix(".svg").write_text(app.export_screenshot(title=name))
        return
    expected = path.read_text()
    assert text == expected, f"{path.name} differs (set {UPDATE_ENV}=1 to accept):\n{text}"
