"""docs/protocol.md, the protocol in prose, agrees with schema/ (and the close codes with the code).

The page's tables are read as data: the first column of "Client → server" and "Server → client"
are frame types, of "Errors" error codes, of "Close codes" close codes. Each must exist in the
schemas (or in ``CloseCode``), and each one there must be documented.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from service.protocol.errors import CloseCode
from tests.protocol.schema_check import SCHEMA_DIR, frame_types, schema_documents

DOC = SCHEMA_DIR.parent / "docs" / "protocol.md"
_REPO = SCHEMA_DIR.parent


def _table_keys(heading: str) -> list[str]:
    """The first cell of every body row of the first table under ``## heading``, backticks removed."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/protocol.md has no section {heading!r}"
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    assert len(rows) > 2, f"the section {heading!r} has no table"
    return [row.split("|")[1].strip().strip("`") for row in rows[2:]]


def _schema_error_codes() -> set[str]:
    return set(schema_documents()["common.json"]["$defs"]["error_code"]["enum"])


@pytest.mark.parametrize(("heading", "side"), [("Client → server", "client"), ("Server → client", "server")])
def test_every_documented_frame_type_is_in_the_schemas_and_back(heading: str, side: str) -> None:
    documented = _table_keys(heading)
    assert len(documented) == len(set(documented)), f"a frame type is listed twice: {documented}"
    schema = frame_types(side)  # type: ignore[arg-type]
    assert set(documented) - schema == set(), "documented but not in schema/"
    assert schema - set(documented) == set(), "in schema/ but not documented"
    for frame_type in documented:
        assert (SCHEMA_DIR / side / f"{frame_type}.json").is_file()


def test_every_documented_error_code_is_in_the_schemas_and_back() -> None:
    documented = _table_keys("Errors")
    assert len(documented) == len(set(documented))
    assert set(documented) == _schema_error_codes()


def test_every_error_code_named_anywhere_on_the_page_exists() -> None:
    """Prose names codes as `error` `code`: each such code must be one the schemas have."""
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`error` `([a-z_]+)`", text))
    assert named, "the pattern found nothing: the check would be empty"
    assert named - _schema_error_codes() == set()


def test_every_close_code_is_documented_and_back() -> None:
    documented = {int(code) for code in _table_keys("Close codes")}
    assert documented == {int(code) for code in CloseCode}


@pytest.mark.parametrize(
    "path",
    [
        "schema/README.md",
        "schema/asyncapi.yaml",
        "schema/common.json",
        "service/protocol/frames.py",
        "README.md",
    ],
)
def test_the_project_points_at_its_own_protocol_document(path: str) -> None:
    text = (_REPO / path).read_text(encoding="utf-8")
    assert "PROTOCOL.md" not in text
    assert "docs/protocol.md" in text


def test_no_file_of_the_project_names_the_outside_document() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=_REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    files = [_REPO / name for name in listed if (_REPO / name).is_file()]
    this = Path(__file__).resolve()
    offenders = [str(p.relative_to(_REPO)) for p in files if p != this and "PROTOCOL.md" in _text(p)]
    assert offenders == []


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""
