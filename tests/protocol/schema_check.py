"""Check frames against the ``chat.v1`` JSON Schemas in ``schema/`` (for tests only).

The protocol package stays free of file I/O, so the schemas are loaded here: once, into a
:class:`referencing.Registry` keyed by each file's ``$id``. Each frame type gets one cached
:class:`~jsonschema.Draft202012Validator` built from its schema with every ``$ref`` inlined
(the schemas are not recursive), which validates about twice as fast as resolving references
frame after frame. Use it on every frame a test sees::

    from tests.protocol.schema_check import validate_server_frame

    validate_server_frame(frame)  # raises FrameSchemaError (an AssertionError) naming each violation
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urldefrag, urljoin

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"
BASE_URI = "https://localchat.example/schema/chat.v1/"
OPENAPI_URI = BASE_URI + "openapi.yaml"

Side = Literal["client", "server"]

_FRAME_SHOWN_CHARS = 1500


class FrameSchemaError(AssertionError):
    """A frame that its schema refuses; the message names the schema file and every violation."""

    def __init__(self, side: Side, frame: object, schema: str, errors: list[ValidationError]) -> None:
        self.side = side
        self.frame = frame
        self.schema = schema
        self.errors = errors
        kind = frame.get("type") if isinstance(frame, dict) else None
        what = f"{side} frame {kind!r}" if isinstance(kind, str) else f"{side} frame"
        lines = [f"{what} does not match schema/{schema}:"]
        for error in errors:
            lines.extend(_describe(error, "  "))
        lines.append(f"frame: {_shown(frame)}")
        super().__init__("\n".join(lines))


def schema_documents() -> dict[str, dict[str, Any]]:
    """Every schema file (examples aside), by its path relative to ``schema/``."""
    return dict(_documents())


@functools.cache
def _documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    found = []
    for path in sorted(SCHEMA_DIR.rglob("*.json")):
        relative = path.relative_to(SCHEMA_DIR).as_posix()
        if not relative.startswith("examples/"):
            found.append((relative, json.loads(path.read_text(encoding="utf-8"))))
    return tuple(found)


@functools.cache
def load_registry() -> Registry[Any]:
    """A registry of every schema file under its ``$id`` (resolves every ``$ref`` offline)."""
    resources = []
    for relative, contents in _documents():
        expected = BASE_URI + relative
        if contents.get("$id") != expected:
            raise ValueError(f"schema/{relative}: $id must be {expected!r}, not {contents.get('$id')!r}")
        resources.append((expected, Resource.from_contents(contents, default_specification=DRAFT202012)))
    # The OpenAPI document's schemas refer to common.json and to their own components.
    resources.append((OPENAPI_URI, DRAFT202012.create_resource(openapi_document())))
    return Registry().with_resources(resources).crawl()


@functools.cache
def openapi_document() -> dict[str, Any]:
    """``schema/openapi.yaml``, parsed."""
    loaded: dict[str, Any] = yaml.safe_load((SCHEMA_DIR / "openapi.yaml").read_text(encoding="utf-8"))
    return loaded


def inlined(node: Any, base: str) -> Any:
    """A schema node found in the document at ``base``, with every ``$ref`` inlined."""
    return _inline(node, base, ())


@functools.cache
def validator_for(relative: str) -> Draft202012Validator:
    """The cached validator of one schema file, e.g. ``"server/token.json"``, references inlined."""
    uri = BASE_URI + relative
    return Draft202012Validator(_inline(load_registry().contents(uri), uri, ()))


@functools.cache
def referencing_validator_for(relative: str) -> Draft202012Validator:
    """The validator of one schema file as written, resolving its ``$ref`` through the registry."""
    registry = load_registry()
    return Draft202012Validator(registry.contents(BASE_URI + relative), registry=registry)


_ANNOTATIONS = frozenset({"description", "title", "$comment"})


def _inline(node: Any, base: str, trail: tuple[str, ...]) -> Any:
    """``node`` with every ``$ref`` replaced by what it points at (``base``: the URI it is in)."""
    if isinstance(node, list):
        return [_inline(item, base, trail) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" not in node:
        return {key: _inline(value, base, trail) for key, value in node.items()}
    target = urljoin(base, node["$ref"])
    if target in trail:
        raise ValueError(f"recursive $ref {target!r}: the schemas cannot be inlined")
    resolved = load_registry().resolver().lookup(target).contents
    inlined = _inline(resolved, urldefrag(target).url, (*trail, target))
    inlined = {key: value for key, value in inlined.items() if key not in ("$id", "$schema")}
    siblings = {key: _inline(value, base, trail) for key, value in node.items() if key != "$ref"}
    if siblings.keys() <= _ANNOTATIONS:
        return {**inlined, **siblings}
    return {"allOf": [inlined], **siblings}


@functools.cache
def frame_types(side: Side) -> frozenset[str]:
    """The frame types the union schema ``client.json`` / ``server.json`` admits."""
    schema = load_registry().contents(BASE_URI + f"{side}.json")
    return frozenset(schema["properties"]["type"]["enum"])


def validate_client_frame(frame: Mapping[str, Any]) -> None:
    """Raise :class:`FrameSchemaError` unless ``frame`` (decoded JSON) is a valid client frame."""
    _validate("client", frame)


def validate_server_frame(frame: Mapping[str, Any]) -> None:
    """Raise :class:`FrameSchemaError` unless ``frame`` (decoded JSON) is a valid server frame."""
    _validate("server", frame)


def _validate(side: Side, frame: Mapping[str, Any]) -> None:
    instance: object = dict(frame) if isinstance(frame, Mapping) and not isinstance(frame, dict) else frame
    kind = instance.get("type") if isinstance(instance, dict) else None
    # Straight to the frame type's own schema: faster than the union, and its errors are the
    # relevant ones; anything without a known type goes through the union for its message.
    schema = f"{side}/{kind}.json" if isinstance(kind, str) and kind in frame_types(side) else f"{side}.json"
    validator = validator_for(schema)
    if validator.is_valid(instance):
        return
    errors: dict[tuple[str, str], ValidationError] = {}
    for error in validator.iter_errors(instance):
        errors.setdefault((error.json_path, error.message), error)
    raise FrameSchemaError(side, instance, schema, [errors[key] for key in sorted(errors)])


def _describe(error: ValidationError, indent: str) -> list[str]:
    lines = [f"{indent}- at {error.json_path}: {_short(error.message)}"]
    if error.context:  # anyOf/oneOf: say why each alternative failed
        for sub in sorted(error.context, key=lambda e: (list(map(str, e.relative_schema_path)), e.message)):
            for line in _describe(sub, indent + "    "):
                if line not in lines:
                    lines.append(line)
    return lines


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _shown(frame: object) -> str:
    try:
        text = json.dumps(frame, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(frame)
    return _short(text, _FRAME_SHOWN_CHARS)
