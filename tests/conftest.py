"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.engine.models.default_model import fetch_default_gguf

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the default model's GGUF, downloaded into <repo>/.cache once per machine."""
    return fetch_default_gguf(CACHE_DIR)
