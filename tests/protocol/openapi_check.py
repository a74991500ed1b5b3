"""Check the plain HTTP routes' responses against ``schema/openapi.yaml`` (for tests only).

Every response a test of those routes sees goes through one of these::

    validate_json("POST", "/generate", 200, body)              # an application/json body
    validate_event("POST", "/generate", 200, data)             # one decoded SSE `data:` payload
    validate_request("POST", "/generate", body)                # what a test sends, as documented

``path`` is the route's template as the document writes it (``/chats/{chat}``). A route, status or
media type the document lacks is an error too, so an undocumented answer cannot pass.
"""

from __future__ import annotations

import functools
from typing import Any

from jsonschema import Draft202012Validator

from tests.protocol.schema_check import OPENAPI_URI, inlined, openapi_document

JSON = "application/json"
EVENT_STREAM = "text/event-stream"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


class ResponseSchemaError(AssertionError):
    pass


def operations() -> set[tuple[str, str]]:
    """Every (METHOD, path template) the document describes."""
    paths: dict[str, dict[str, Any]] = openapi_document().get("paths") or {}
    return {(method.upper(), path) for path, item in paths.items() for method in item if method in METHODS}


def _operation(method: str, path: str) -> dict[str, Any]:
    item = (openapi_document().get("paths") or {}).get(path)
    if item is None or method.lower() not in item:
        raise ResponseSchemaError(f"schema/openapi.yaml does not describe {method} {path}")
    operation: dict[str, Any] = item[method.lower()]
    return operation


@functools.cache
def _validator(method: str, path: str, status: int, media: str, key: str) -> Draft202012Validator:
    responses = _operation(method, path).get("responses", {})
    response = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX") or responses.get("default")
    if response is None:
        raise ResponseSchemaError(f"schema/openapi.yaml: {method} {path} documents no {status} response")
    response = inlined(response, OPENAPI_URI)
    content = response.get("content", {}).get(media)
    if content is None or key not in content:
        raise ResponseSchemaError(f"schema/openapi.yaml: {method} {path} {status} has no {media} {key}")
    return Draft202012Validator(content[key])


def _check(validator: Draft202012Validator, instance: Any, what: str) -> None:
    errors = sorted(validator.iter_errors(instance), key=lambda e: e.json_path)
    if errors:
        detail = "\n".join(f"  - at {e.json_path}: {e.message[:300]}" for e in errors)
        raise ResponseSchemaError(f"{what} does not match schema/openapi.yaml:\n{detail}\n{instance!r:.1500}")


def validate_json(method: str, path: str, status: int, body: Any) -> None:
    _check(_validator(method, path, status, JSON, "schema"), body, f"{method} {path} {status}")


def validate_event(method: str, path: str, status: int, data: Any) -> None:
    _check(_validator(method, path, status, EVENT_STREAM, "itemSchema"), data, f"an event of {method} {path}")


def validate_request(method: str, path: str, body: Any) -> None:
    content = _operation(method, path).get("requestBody", {}).get("content", {}).get(JSON)
    if content is None:
        raise ResponseSchemaError(f"schema/openapi.yaml: {method} {path} documents no JSON request body")
    schema = inlined(content["schema"], OPENAPI_URI)
    _check(Draft202012Validator(schema), body, f"a request to {method} {path}")
