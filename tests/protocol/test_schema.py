"""schema/ agrees with itself, with its examples and with service.protocol (parser, builders, types)."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from jsonschema import Draft202012Validator

from service.engine.types import FinishReason, SamplingParams
from service.protocol import codec, frames
from service.protocol.errors import ErrorCode, ProtocolError
from tests.protocol.schema_check import (
    BASE_URI,
    SCHEMA_DIR,
    FrameSchemaError,
    frame_types,
    load_registry,
    referencing_validator_for,
    schema_documents,
    validate_client_frame,
    validate_server_frame,
    validator_for,
)

EXAMPLES = SCHEMA_DIR / "examples"
VALID = sorted((EXAMPLES / "valid").glob("*.json"))
INVALID = sorted((EXAMPLES / "invalid").glob("*.json"))
INVALID_CLIENT = [p for p in INVALID if p.name.startswith("client.")]
INVALID_SERVER = [p for p in INVALID if p.name.startswith("server.")]
DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"

# Pseudo frame types in the names of invalid examples whose frame has no usable type.
NO_TYPE = {"frame", "untyped", "unknown"}

PARSED_AS: dict[str, type] = {
    "hello": frames.Hello,
    "open": frames.Open,
    "send": frames.Send,
    "stop": frames.Stop,
    "close": frames.Close,
    "models": frames.ListModels,
    "chats": frames.ListChats,
    "history": frames.GetHistory,
    "delete": frames.Delete,
    "ping": frames.Ping,
}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name.removesuffix(".json") for p in paths]


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _side(path: Path) -> str:
    return path.name.split(".")[0]


def _kind(path: Path) -> str:
    return path.name.split(".")[1]


def _expected_code(path: Path) -> str:
    return path.name.removesuffix(".json").rsplit(".", 1)[-1]


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _pointer(document: Any, fragment: str) -> Any:
    """What the JSON pointer ``fragment`` (``/a/b``, or empty) names in ``document``; KeyError if nothing."""
    node = document
    for token in filter(None, fragment.split("/")):
        key = token.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def _parse_outcome(data: bytes) -> frames.ClientFrame | ProtocolError:
    try:
        return codec.parse_client_frame(data)
    except ProtocolError as exc:
        return exc


def _engine_params(params: frames.Params) -> SamplingParams:
    given = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    return SamplingParams(**{name: value for name, value in given.items() if value is not None})


# ---- the schema files themselves ----------------------------------------------------


@pytest.mark.parametrize("relative", sorted(schema_documents()))
def test_schema_file_is_a_valid_draft_2020_12_schema(relative: str) -> None:
    """Each schema file declares draft 2020-12, is a valid schema and has the $id of its path."""
    document = schema_documents()[relative]
    assert document["$schema"] == DRAFT_2020_12
    assert document["$id"] == BASE_URI + relative
    Draft202012Validator.check_schema(document)


@pytest.mark.parametrize("relative", sorted(schema_documents()))
def test_every_ref_resolves_offline(relative: str) -> None:
    """Every $ref in a schema file resolves through the registry built from the files."""
    resolver = load_registry().resolver(BASE_URI + relative)
    refs = _refs(schema_documents()[relative])
    for ref in refs:
        resolver.lookup(ref)  # raises when unresolvable


def test_frame_files_match_the_unions() -> None:
    """schema/client/ and schema/server/ hold the types their unions (client.json, server.json) admit."""
    for side in ("client", "server"):
        files = {p.stem for p in (SCHEMA_DIR / side).glob("*.json")}
        assert files == frame_types(side)


def test_client_frame_types_match_the_codec() -> None:
    """The client frame types of the schema are exactly those the parser knows."""
    assert frame_types("client") == codec.CLIENT_FRAME_TYPES


def test_server_frame_types_match_the_typed_dicts() -> None:
    """The server frame types of the schema are exactly the ServerFrame TypedDicts' type literals."""
    literals = {
        typing.get_args(typing.get_type_hints(td)["type"])[0] for td in typing.get_args(frames.ServerFrame)
    }
    assert frame_types("server") == literals


def test_error_codes_match_error_code_enum() -> None:
    """common.json's error_code enum is exactly ErrorCode."""
    defs = schema_documents()["common.json"]["$defs"]
    assert set(defs["error_code"]["enum"]) == {code.value for code in ErrorCode}


def test_enums_match_the_protocol_literals() -> None:
    """Role, message status and done reason enums equal the Literals in frames (and the engine's reasons)."""
    defs = schema_documents()["common.json"]["$defs"]
    assert set(defs["role"]["enum"]) == set(typing.get_args(frames.MessageRole))
    assert set(defs["message_status"]["enum"]) == set(typing.get_args(frames.MessageStatus))
    assert set(defs["done_reason"]["enum"]) == set(typing.get_args(frames.DoneReason))
    assert set(defs["done_reason"]["enum"]) == {reason.value for reason in FinishReason}


def _typed_dict_keys(td: type) -> tuple[set[str], set[str]]:
    """(required keys, all keys) of a TypedDict, NotRequired read from the annotations."""
    hints = typing.get_type_hints(td, include_extras=True)
    optional = {name for name, hint in hints.items() if typing.get_origin(hint) is typing.NotRequired}
    return set(hints) - optional, set(hints)


@pytest.mark.parametrize("td", typing.get_args(frames.ServerFrame), ids=lambda td: td.__name__)
def test_server_frame_fields_match_the_typed_dict(td: type) -> None:
    """Each server frame schema requires and allows exactly the TypedDict's (required) keys."""
    kind = typing.get_args(typing.get_type_hints(td)["type"])[0]
    schema = schema_documents()[f"server/{kind}.json"]
    required, keys = _typed_dict_keys(td)
    assert set(schema["required"]) == required
    assert set(schema["properties"]) == keys
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("td", "name"),
    [
        (frames.MessageBody, "message"),
        (frames.UserBody, "user"),
        (frames.ModelBody, "model"),
        (frames.ChatSummaryBody, "chat_summary"),
        (frames.Usage, "usage"),
        (frames.Timing, "timing"),
        (frames.ErrorBody, "error_body"),
        (frames.Limits, "limits"),
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_nested_objects_match_their_typed_dict(td: type, name: str) -> None:
    """Each object in common.json's $defs has exactly the fields of its TypedDict in frames."""
    schema = schema_documents()["common.json"]["$defs"][name]
    required, keys = _typed_dict_keys(td)
    assert set(schema["required"]) == required
    assert set(schema["properties"]) == keys
    assert schema["additionalProperties"] is False


# ---- valid examples -----------------------------------------------------------------


def test_valid_examples_cover_every_frame_type() -> None:
    """There is a valid example of every client and every server frame type."""
    for side in ("client", "server"):
        kinds = {_load(p)["type"] for p in VALID if _side(p) == side}
        assert kinds == frame_types(side)


@pytest.mark.parametrize("path", VALID, ids=_ids(VALID))
def test_valid_example_validates(path: Path) -> None:
    """A valid example matches its union schema (as written and inlined) and its own frame schema."""
    side, frame = _side(path), _load(path)
    assert side in ("client", "server")
    assert _kind(path) == frame["type"], "valid examples are named <side>.<type>.<what>.json"
    referencing_validator_for(f"{side}.json").validate(frame)
    assert validator_for(f"{side}.json").is_valid(frame)
    (validate_client_frame if side == "client" else validate_server_frame)(frame)


@pytest.mark.parametrize("path", [p for p in VALID if _side(p) == "client"], ids=lambda p: p.name)
def test_valid_client_example_parses(path: Path) -> None:
    """A valid client example, as the bytes on the wire, parses into the dataclass of its type."""
    parsed = codec.parse_client_frame(path.read_bytes())
    assert isinstance(parsed, PARSED_AS[_load(path)["type"]])
    if isinstance(parsed, frames.Open | frames.Send):
        _engine_params(parsed.params).validate()  # within the engine's ranges too


# ---- invalid examples ---------------------------------------------------------------


def test_there_are_a_dozen_invalid_examples_of_each_side() -> None:
    """The invalid examples cover at least a dozen client and a dozen server mistakes."""
    assert len(INVALID_CLIENT) >= 12
    assert len(INVALID_SERVER) >= 12


@pytest.mark.parametrize("path", INVALID, ids=_ids(INVALID))
def test_invalid_example_is_named_for_its_frame(path: Path) -> None:
    """Invalid examples are named <side>.<type>.<what>[.<code>].json with a real type and error code."""
    side, kind = _side(path), _kind(path)
    assert side in ("client", "server")
    assert kind in frame_types(side) | NO_TYPE
    if side == "client":
        assert _expected_code(path) in {code.value for code in ErrorCode}


@pytest.mark.parametrize("path", INVALID, ids=_ids(INVALID))
def test_invalid_example_fails_the_schema(path: Path) -> None:
    """An invalid example fails its union schema (as written and inlined) and the validate_* helper."""
    side, frame = _side(path), _load(path)
    assert not referencing_validator_for(f"{side}.json").is_valid(frame)
    assert not validator_for(f"{side}.json").is_valid(frame)
    with pytest.raises(FrameSchemaError, match=rf"{side} frame .*does not match schema/"):
        (validate_client_frame if side == "client" else validate_server_frame)(frame)


@pytest.mark.parametrize("path", INVALID_CLIENT, ids=_ids(INVALID_CLIENT))
def test_invalid_client_example_is_refused_with_its_code(path: Path) -> None:
    """The parser refuses an invalid client example with the code in its name; a frame it lets
    through (a range only the server checks) is out of the engine's ranges: bad_params."""
    expected = _expected_code(path)
    outcome = _parse_outcome(path.read_bytes())
    if isinstance(outcome, ProtocolError):
        assert outcome.code == expected, outcome.message
        return
    assert expected == ErrorCode.BAD_PARAMS, f"parsed, yet named for {expected}"
    assert isinstance(outcome, frames.Open | frames.Send)
    with pytest.raises(ValueError, match=r"must|at most"):
        _engine_params(outcome.params).validate()


@pytest.mark.parametrize("path", INVALID_CLIENT, ids=_ids(INVALID_CLIENT))
def test_error_reply_to_invalid_client_example_is_a_valid_server_frame(path: Path) -> None:
    """The error frame built from the parser's ProtocolError (code, message, id, session) is valid."""
    exc = _parse_outcome(path.read_bytes())
    if isinstance(exc, ProtocolError):
        reply = frames.error(exc.code, exc.message, id=exc.id, session=exc.session)
    else:
        reply = frames.error(ErrorCode.BAD_PARAMS, "out of range")
    validate_server_frame(orjson.loads(codec.encode(reply)))


# ---- the server's builders ----------------------------------------------------------

CHAT = "5f0c6a2e-8d1b-4c9a-9e57-0b3f2a1d4c88"
MESSAGE = "c4e5f6a7-b8c9-4d0e-8f1a-2b3c4d5e6f70"
MODEL: frames.ModelBody = {"id": "smollm2", "context_length": 8192, "loaded": True, "default": True}
STORED: frames.MessageBody = {
    "id": "0d6e8f7a-1c2b-4a3d-9e8f-7a6b5c4d3e2f",
    "role": "user",
    "text": "hi",
    "status": "complete",
    "created_at": "2025-03-14T09:26:53.589793+00:00",
}
USAGE: frames.Usage = {"prompt_tokens": 12, "cached_tokens": 0, "completion_tokens": 3}
TIMING: frames.Timing = {"queued_ms": 0.0, "ttft_ms": 21.5, "total_ms": 80.25, "tokens_per_s": 37.4}
LIMITS: frames.Limits = {
    "max_frame_bytes": 65536,
    "max_sessions": 16,
    "max_tokens": 4096,
    "hello_timeout_s": 10.0,
}
SUMMARY: frames.ChatSummaryBody = {
    "chat": CHAT,
    "title": None,
    "model": "smollm2",
    "updated_at": "2025-03-14T09:27:00Z",
    "messages": 2,
}

BUILT: dict[str, typing.Mapping[str, object]] = {
    "welcome": frames.welcome(
        1, server="localchat/0.1.0", user={"id": "local", "name": "local"}, models=[MODEL], limits=LIMITS
    ),
    "welcome-no-id": frames.welcome(
        None, server="s", user={"id": "u", "name": "n"}, models=[], limits=LIMITS
    ),
    "opened": frames.opened("o", session="s1", chat=CHAT, model="smollm2", messages=[STORED]),
    "started": frames.started(
        4, session="s1", message=MESSAGE, prompt_tokens=12, cached_tokens=8, queue_position=0
    ),
    "token": frames.token("s1", 0, "Hel"),
    "token-coalesced": frames.token("s1", 1, "lo!", tokens=3),
    "done": frames.done(session="s1", message=MESSAGE, reason="stop", usage=USAGE, timing=TIMING),
    "done-no-token": frames.done(
        session="s1",
        message=MESSAGE,
        reason="cancelled",
        usage={**USAGE, "completion_tokens": 0},
        timing={**TIMING, "ttft_ms": None, "tokens_per_s": 0.0},
    ),
    "done-error": frames.done(
        session="s1",
        message=MESSAGE,
        reason="error",
        usage=USAGE,
        timing=TIMING,
        error={"code": ErrorCode.INTERNAL.value, "message": "boom"},
    ),
    "closed": frames.closed(7, session="s1"),
    "chats": frames.chats(9, chats=[SUMMARY, {**SUMMARY, "title": "Primes"}]),
    "chats-empty": frames.chats(None, chats=[]),
    "history": frames.history(11, chat=CHAT, messages=[STORED]),
    "deleted": frames.deleted(13, chat=CHAT),
    "models": frames.models(8, models=[MODEL, {**MODEL, "id": "other", "default": False}]),
    "pong": frames.pong("p"),
    "pong-no-id": frames.pong(None),
    "error": frames.error(ErrorCode.BUSY, "busy", id=2, session="s1"),
    **{f"error-{code.value}": frames.error(code, code.value) for code in ErrorCode},
}


def test_builders_cover_every_server_frame_type() -> None:
    """The builder cases below produce every server frame type."""
    assert {frame["type"] for frame in BUILT.values()} == frame_types("server")


@pytest.mark.parametrize("name", sorted(BUILT))
def test_builder_frame_validates(name: str) -> None:
    """A frame from a builder in service.protocol.frames, encoded and decoded, matches its schema."""
    validate_server_frame(orjson.loads(codec.encode(BUILT[name])))


def test_validate_server_frame_names_the_problem() -> None:
    """validate_server_frame's failure names the schema file, the JSON path and the reason."""
    frame = dict(frames.token("s1", 3, "x", tokens=0))
    with pytest.raises(FrameSchemaError) as caught:
        validate_server_frame(frame)
    message = str(caught.value)
    assert "server frame 'token' does not match schema/server/token.json" in message
    assert "at $.tokens: 0 is less than the minimum of 2" in message
    assert '"tokens": 0' in message


# ---- params ranges: the schema says what the engine enforces ------------------------

PARAM_VALUES: list[tuple[str, object]] = [
    *[("max_tokens", v) for v in (0, 1, 256, 1_000_000, 1_000_001)],
    *[("temperature", v) for v in (-0.1, 0, 0.7, 10, 10.5)],
    *[("top_p", v) for v in (-1, 0, 0.01, 1, 1.01)],
    *[("top_k", v) for v in (-1, 0, 50)],
    *[("repetition_penalty", v) for v in (0, 0.5, 10, 10.5)],
    *[("seed", v) for v in (-1, 0, 2**63 - 1, 2**63)],
    *[("stop", v) for v in ("", "\n", [], [""], ["a" * 256], ["a" * 257], ["x"] * 16, ["x"] * 17)],
]


@pytest.mark.parametrize(
    ("field", "value"), PARAM_VALUES, ids=[f"{f}={str(v)[:12]}" for f, v in PARAM_VALUES]
)
def test_params_schema_agrees_with_engine_ranges(field: str, value: object) -> None:
    """A params value passes the schema exactly when it passes SamplingParams.validate."""
    frame = {"type": "send", "session": "s", "text": "t", "params": {field: value}}
    parsed = codec.parse_client_frame(orjson.dumps(frame))
    assert isinstance(parsed, frames.Send)
    try:
        _engine_params(parsed.params).validate()
    except ValueError:
        engine_accepts = False
    else:
        engine_accepts = True
    assert validator_for("client.json").is_valid(frame) == engine_accepts


# ---- AsyncAPI ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    document = yaml.safe_load((SCHEMA_DIR / "asyncapi.yaml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def test_asyncapi_describes_the_websocket(asyncapi: dict[str, Any]) -> None:
    """asyncapi.yaml is AsyncAPI 3.0 with one /ws channel, the chat.v1 subprotocol and the HTTP endpoints."""
    assert asyncapi["asyncapi"] == "3.0.0"
    assert [channel["address"] for channel in asyncapi["channels"].values()] == ["/ws"]
    text = (SCHEMA_DIR / "asyncapi.yaml").read_text(encoding="utf-8")
    for needle in ("chat.v1", "Sec-WebSocket-Protocol", "/healthz", "/readyz", "/metrics"):
        assert needle in text
    assert {op["action"] for op in asyncapi["operations"].values()} == {"send", "receive"}


def test_asyncapi_refs_point_at_existing_targets(asyncapi: dict[str, Any]) -> None:
    """Every $ref in asyncapi.yaml names an existing file under schema/ and, with a fragment, a node in it."""
    refs = _refs(asyncapi)
    assert refs
    for ref in refs:
        file_part, _, fragment = ref.partition("#")
        if file_part:
            target = (SCHEMA_DIR / file_part).resolve()
            assert target.is_file(), f"$ref {ref!r}: no file {target}"
            document = json.loads(target.read_text(encoding="utf-8"))
        else:
            document = asyncapi
        try:
            _pointer(document, fragment)
        except (KeyError, IndexError, ValueError):
            pytest.fail(f"$ref {ref!r}: nothing at #{fragment}")


def test_asyncapi_messages_cover_every_frame_schema(asyncapi: dict[str, Any]) -> None:
    """The AsyncAPI messages' payloads reference every client and server frame schema, once each."""
    payloads = [
        message["payload"]["schema"]["$ref"] for message in asyncapi["components"]["messages"].values()
    ]
    expected = [f"./{side}/{kind}.json" for side in ("client", "server") for kind in frame_types(side)]
    assert sorted(payloads) == sorted(expected)


def test_asyncapi_operations_use_channel_messages(asyncapi: dict[str, Any]) -> None:
    """Operations (and their replies) reference messages of the channel they name."""
    for name, operation in asyncapi["operations"].items():
        for part in (operation, operation.get("reply")):
            if part is None:
                continue
            channel = part["channel"]["$ref"]
            for message in part["messages"]:
                assert message["$ref"].startswith(channel + "/messages/"), f"operation {name}"
