"""Behaviour of the chat.v1 parser (parse_client_frame), Params and the server-frame builders."""

from __future__ import annotations

import json
import typing
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.protocol import codec, frames
from service.protocol.errors import ErrorCode, ProtocolError


def parse(frame: object) -> frames.ClientFrame:
    return codec.parse_client_frame(json.dumps(frame))  # json: integers beyond 64 bits too


def refused(frame: object) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(frame)
    return caught.value


# ---- not a frame at all ------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "{", "hello", '{"type": "ping",}', b"\xff\xfe", "\ud800"])
def test_not_json_is_bad_frame(text: str | bytes) -> None:
    """Text that is not JSON (or not UTF-8) is refused as bad_frame."""
    with pytest.raises(ProtocolError) as caught:
        codec.parse_client_frame(text)
    assert caught.value.code == ErrorCode.BAD_FRAME
    assert caught.value.id is None


@pytest.mark.parametrize("value", [[], [{"type": "ping"}], 1, "ping", None, True])
def test_not_an_object_is_bad_frame(value: object) -> None:
    """A JSON value that is not an object is refused as bad_frame."""
    assert refused(value).code == ErrorCode.BAD_FRAME


def test_missing_type_is_bad_frame_with_id() -> None:
    """An object without type is bad_frame, its id and session echoed."""
    exc = refused({"id": 5, "session": "s1"})
    assert (exc.code, exc.id, exc.session) == (ErrorCode.BAD_FRAME, 5, "s1")
    assert "type" in exc.message


@pytest.mark.parametrize("kind", [1, ["ping"], {"ping": 1}, True])
def test_type_not_a_string_is_bad_frame(kind: object) -> None:
    """A type that is not a string is bad_frame."""
    exc = refused({"type": kind, "id": "a"})
    assert (exc.code, exc.id) == (ErrorCode.BAD_FRAME, "a")


def test_unknown_type_is_unknown_type_with_id_echoed() -> None:
    """An unknown type is refused as unknown_type, the id echoed and the type named."""
    exc = refused({"type": "subscribe", "id": "x-1"})
    assert (exc.code, exc.id) == (ErrorCode.UNKNOWN_TYPE, "x-1")
    assert "subscribe" in exc.message


def test_type_is_case_sensitive() -> None:
    """Types are matched exactly: PING is unknown."""
    assert refused({"type": "PING"}).code == ErrorCode.UNKNOWN_TYPE


# ---- id -----------------------------------------------------------------------------


@pytest.mark.parametrize("frame_id", ["req-1", "", "x" * 64, 0, -3, 2**63, 2**64 - 1])
def test_id_echoed_on_errors_when_readable(frame_id: str | int) -> None:
    """A readable id (string or integer, at most 64 characters) is echoed on the error."""
    exc = refused({"type": "send", "id": frame_id, "session": "s1"})
    assert exc.id == frame_id
    assert type(exc.id) is type(frame_id)


@pytest.mark.parametrize("frame_id", ["req-1", 7, 0])
def test_id_kept_on_parsed_frame(frame_id: str | int) -> None:
    """A valid id is carried on the parsed frame."""
    assert parse({"type": "ping", "id": frame_id}) == frames.Ping(id=frame_id)


@pytest.mark.parametrize("frame_id", [True, False, [1], {"a": 1}, 1.5, 1.0, "x" * 65, 2**64])
def test_unreadable_id_refused(frame_id: object) -> None:
    """An id that is a bool, list, object, float, over 64 chars or over 64 bits is bad_frame, not echoed."""
    exc = refused({"type": "ping", "id": frame_id})
    assert (exc.code, exc.id) == (ErrorCode.BAD_FRAME, None)


def test_null_id_reads_as_no_id() -> None:
    """id: null is the same as no id."""
    assert parse({"type": "ping", "id": None}) == frames.Ping(id=None)


# ---- session ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["open", "send", "stop", "close"])
@pytest.mark.parametrize(
    "session", [None, "", "s" * 65, 5, ["s"]], ids=["missing", "empty", "too_long", "int", "list"]
)
def test_bad_session_is_bad_frame_with_id(kind: str, session: object) -> None:
    """A session missing, empty, over 64 chars or not a string: bad_frame, id echoed, session not."""
    frame: dict[str, Any] = {"type": kind, "id": 3, "text": "hi"}
    if session is not None:
        frame["session"] = session
    exc = refused(frame)
    assert (exc.code, exc.id) == (ErrorCode.BAD_FRAME, 3)
    assert "session" in exc.message
    assert exc.session is None  # an invalid session is not echoed


def test_session_of_64_chars_accepted() -> None:
    """A session of exactly 64 characters is accepted."""
    assert parse({"type": "stop", "session": "s" * 64}) == frames.Stop(id=None, session="s" * 64)


def test_session_echoed_on_errors() -> None:
    """An error in a session-scoped frame carries the frame's session."""
    exc = refused({"type": "send", "id": 1, "session": "s1"})
    assert (exc.code, exc.id, exc.session) == (ErrorCode.BAD_FRAME, 1, "s1")
    assert "text" in exc.message


@pytest.mark.parametrize("kind", ["history", "delete"])
@pytest.mark.parametrize("chat", [None, "", "c" * 65, 42])
def test_bad_chat_is_bad_frame(kind: str, chat: object) -> None:
    """history and delete need chat: a non-empty string of at most 64 characters."""
    frame: dict[str, Any] = {"type": kind, "id": 2}
    if chat is not None:
        frame["chat"] = chat
    exc = refused(frame)
    assert (exc.code, exc.id) == (ErrorCode.BAD_FRAME, 2)


# ---- params -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"max_tokens": "64"},
        {"max_tokens": 2.5},
        {"temperature": "hot"},
        {"temperature": [0.5]},
        {"top_p": "0.9"},
        {"top_k": 1.5},
        {"repetition_penalty": {}},
        {"seed": "42"},
        {"stop": 5},
        {"stop": ["a", 1]},
        {"stop": {"a": "b"}},
    ],
)
def test_params_mistyped_is_bad_params(params: dict[str, Any]) -> None:
    """A params field of the wrong type is bad_params, with the id and session echoed."""
    exc = refused({"type": "send", "id": 9, "session": "s1", "text": "hi", "params": params})
    assert (exc.code, exc.id, exc.session) == (ErrorCode.BAD_PARAMS, 9, "s1")
    assert next(iter(params)) in exc.message


@pytest.mark.parametrize("params", [[0.7], "temperature=0", 1, True])
def test_params_not_an_object_is_bad_frame(params: object) -> None:
    """params that is not an object is bad_frame (the frame's shape, not a value)."""
    exc = refused({"type": "open", "id": 4, "session": "s1", "params": params})
    assert (exc.code, exc.id) == (ErrorCode.BAD_FRAME, 4)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "chats", "limit": True}, ErrorCode.BAD_FRAME),
        ({"type": "history", "chat": "c", "limit": False}, ErrorCode.BAD_FRAME),
        ({"type": "open", "session": "s", "resume": {"message": "m", "index": True}}, ErrorCode.BAD_FRAME),
        ({"type": "send", "session": "s", "text": "t", "params": {"max_tokens": True}}, ErrorCode.BAD_PARAMS),
        ({"type": "send", "session": "s", "text": "t", "params": {"top_k": False}}, ErrorCode.BAD_PARAMS),
        ({"type": "send", "session": "s", "text": "t", "params": {"seed": True}}, ErrorCode.BAD_PARAMS),
        (
            {"type": "send", "session": "s", "text": "t", "params": {"temperature": True}},
            ErrorCode.BAD_PARAMS,
        ),
    ],
)
def test_bool_refused_where_a_number_is_expected(frame: dict[str, Any], code: ErrorCode) -> None:
    """JSON true/false is never read as 1/0."""
    assert refused(frame).code == code


def test_all_params_read() -> None:
    """Every params field is read into Params, integers as int and the others as float."""
    frame = parse(
        {
            "type": "send",
            "session": "s",
            "text": "t",
            "params": {
                "max_tokens": 64,
                "temperature": 0,
                "top_p": 0.9,
                "top_k": 40,
                "repetition_penalty": 1.1,
                "seed": 7,
                "stop": ["\n\n", "END"],
            },
        }
    )
    assert isinstance(frame, frames.Send)
    assert frame.params == frames.Params(
        max_tokens=64,
        temperature=0.0,
        top_p=0.9,
        top_k=40,
        repetition_penalty=1.1,
        seed=7,
        stop=("\n\n", "END"),
    )
    assert isinstance(frame.params.temperature, float)


def test_integral_float_read_as_integer_in_params() -> None:
    """An integer-valued float (64.0) in an integer params field is read as the integer."""
    frame = parse({"type": "send", "session": "s", "text": "t", "params": {"max_tokens": 64.0}})
    assert isinstance(frame, frames.Send)
    assert frame.params.max_tokens == 64
    assert type(frame.params.max_tokens) is int


def test_stop_as_a_single_string_accepted() -> None:
    """stop given as one string is read as a list of that one string."""
    frame = parse({"type": "send", "session": "s", "text": "t", "params": {"stop": "\n"}})
    assert isinstance(frame, frames.Send)
    assert frame.params.stop == ("\n",)


def test_params_ranges_left_to_the_server() -> None:
    """The parser checks types only: an out-of-range value parses (the server answers bad_params)."""
    frame = parse(
        {"type": "send", "session": "s", "text": "t", "params": {"temperature": -1, "max_tokens": 0}}
    )
    assert isinstance(frame, frames.Send)
    assert (frame.params.temperature, frame.params.max_tokens) == (-1.0, 0)


def test_missing_params_is_empty_params() -> None:
    """Without params every field is None (inherit)."""
    frame = parse({"type": "send", "session": "s", "text": "t"})
    assert isinstance(frame, frames.Send)
    assert frame.params == frames.Params()
    assert frame.params.given() == {}


def test_params_over_merges_field_by_field() -> None:
    """Params.over takes each field from self when given, else from base."""
    base = frames.Params(max_tokens=256, temperature=0.7, stop=("END",))
    turn = frames.Params(temperature=0.0, seed=3)
    assert turn.over(base) == frames.Params(max_tokens=256, temperature=0.0, seed=3, stop=("END",))
    assert frames.Params().over(base) == base
    assert base.over(frames.Params()) == base


def test_params_given_is_json_ready() -> None:
    """Params.given lists only the fields set, stop as a list."""
    params = frames.Params(temperature=0.0, stop=("a", "b"))
    assert params.given() == {"temperature": 0.0, "stop": ["a", "b"]}
    assert orjson.loads(orjson.dumps(params.given())) == params.given()


# ---- the other fields ---------------------------------------------------------------


def test_unknown_fields_ignored() -> None:
    """Fields the contract does not define are ignored, wherever they are."""
    frame = parse({"type": "ping", "id": 1, "x_trace": {"a": [1, 2]}, "session": 5})
    assert frame == frames.Ping(id=1)
    send = parse({"type": "send", "session": "s", "text": "t", "params": {"mirostat": 2, "temperature": 0.1}})
    assert isinstance(send, frames.Send)
    assert send.params == frames.Params(temperature=0.1)


def test_null_fields_read_as_absent() -> None:
    """An optional field that is null is the same as a missing one."""
    frame = parse(
        {"type": "open", "session": "s", "chat": None, "params": None, "resume": None, "title": None}
    )
    assert isinstance(frame, frames.Open)
    assert (frame.chat, frame.title, frame.resume, frame.params) == (None, None, None, frames.Params())


def test_open_reads_every_field() -> None:
    """open carries chat, model, system, title, params and resume through."""
    frame = parse(
        {
            "type": "open",
            "id": "o",
            "session": "s1",
            "chat": "c1",
            "model": "m",
            "system": "Be terse.",
            "title": "T",
            "params": {"top_k": 5},
            "resume": {"message": "m1", "index": 17},
        }
    )
    assert frame == frames.Open(
        id="o",
        session="s1",
        chat="c1",
        model="m",
        system="Be terse.",
        title="T",
        params=frames.Params(top_k=5),
        resume=frames.Resume(message="m1", index=17),
    )


@pytest.mark.parametrize(
    "resume",
    [
        "m1",
        [1],
        {"index": 3},
        {"message": 5, "index": 0},
        {"message": "m", "index": -1},
        {"message": "m", "index": 1.5},
    ],
)
def test_bad_resume_is_bad_frame(resume: object) -> None:
    """resume must be an object with a string message and an integer index >= 0."""
    exc = refused({"type": "open", "id": 1, "session": "s", "resume": resume})
    assert (exc.code, exc.id, exc.session) == (ErrorCode.BAD_FRAME, 1, "s")


def test_title_of_200_chars_accepted_201_refused() -> None:
    """title is at most 200 characters."""
    assert isinstance(parse({"type": "open", "session": "s", "title": "t" * 200}), frames.Open)
    assert refused({"type": "open", "session": "s", "title": "t" * 201}).code == ErrorCode.BAD_FRAME


def test_send_needs_text_as_a_string() -> None:
    """send without text, or with text that is not a string, is bad_frame; empty text is allowed."""
    assert refused({"type": "send", "session": "s"}).code == ErrorCode.BAD_FRAME
    assert refused({"type": "send", "session": "s", "text": ["hi"]}).code == ErrorCode.BAD_FRAME
    assert parse({"type": "send", "session": "s", "text": ""}) == frames.Send(
        id=None, session="s", text="", params=frames.Params()
    )


def test_hello_reads_token_and_client() -> None:
    """hello carries token (a string) and client (any JSON value) through."""
    assert parse({"type": "hello", "token": "t", "client": {"name": "tui"}}) == frames.Hello(
        id=None, token="t", client={"name": "tui"}
    )
    assert refused({"type": "hello", "token": 5}).code == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(("limit", "read"), [(None, 50), (1, 1), (200, 200), (201, 200), (10**9, 200)])
def test_chats_limit_defaults_to_50_and_clamps_at_200(limit: int | None, read: int) -> None:
    """chats limit defaults to 50; values above 200 are read as 200, not refused."""
    frame: dict[str, Any] = {"type": "chats", "before": "c9"}
    if limit is not None:
        frame["limit"] = limit
    assert parse(frame) == frames.ListChats(id=None, limit=read, before="c9")


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_bad_frame(limit: int) -> None:
    """chats and history limits below 1 are bad_frame."""
    assert refused({"type": "chats", "limit": limit}).code == ErrorCode.BAD_FRAME
    assert refused({"type": "history", "chat": "c", "limit": limit}).code == ErrorCode.BAD_FRAME


def test_history_limit_optional_and_clamped() -> None:
    """history limit is None when absent and clamped at 10000."""
    assert parse({"type": "history", "chat": "c"}) == frames.GetHistory(
        id=None, chat="c", limit=None, before=None
    )
    assert parse({"type": "history", "chat": "c", "limit": 10**6, "before": "m"}) == frames.GetHistory(
        id=None, chat="c", limit=10_000, before="m"
    )


@pytest.mark.parametrize(
    ("frame", "parsed"),
    [
        ({"type": "stop", "session": "s"}, frames.Stop(id=None, session="s")),
        ({"type": "close", "id": 2, "session": "s"}, frames.Close(id=2, session="s")),
        ({"type": "models", "id": "m"}, frames.ListModels(id="m")),
        ({"type": "delete", "chat": "c"}, frames.Delete(id=None, chat="c")),
        ({"type": "ping"}, frames.Ping(id=None)),
    ],
)
def test_simple_frames_parse(frame: dict[str, Any], parsed: frames.ClientFrame) -> None:
    """stop, close, models, delete and ping parse to their dataclasses."""
    assert parse(frame) == parsed


def test_parse_accepts_bytes_and_str() -> None:
    """The parser takes the text frame as str or as UTF-8 bytes."""
    assert codec.parse_client_frame('{"type":"ping","id":"é"}') == frames.Ping(id="é")
    assert codec.parse_client_frame('{"type":"ping","id":"é"}'.encode()) == frames.Ping(id="é")


# ---- builders -----------------------------------------------------------------------


def test_builders_omit_id_when_none() -> None:
    """A reply built with id None has no id key; with an id (even 0 or "") it carries it."""
    assert frames.pong(None) == {"type": "pong"}
    assert frames.pong(0) == {"type": "pong", "id": 0}
    assert frames.pong("") == {"type": "pong", "id": ""}
    assert "id" not in frames.closed(None, session="s")
    assert frames.deleted(5, chat="c") == {"type": "deleted", "chat": "c", "id": 5}


def test_token_omits_tokens_when_one() -> None:
    """A token frame carrying one token has no tokens key; more carry it."""
    assert frames.token("s", 0, "a") == {"type": "token", "session": "s", "index": 0, "text": "a"}
    assert frames.token("s", 1, "bc", tokens=2)["tokens"] == 2


def test_done_carries_error_only_when_given() -> None:
    """done has an error key only when an error body is passed."""
    usage: frames.Usage = {"prompt_tokens": 1, "cached_tokens": 0, "completion_tokens": 0}
    timing: frames.Timing = {"queued_ms": 0.0, "ttft_ms": None, "total_ms": 1.0, "tokens_per_s": 0.0}
    plain = frames.done(session="s", message="m", reason="stop", usage=usage, timing=timing)
    assert "error" not in plain
    failed = frames.done(
        session="s",
        message="m",
        reason="error",
        usage=usage,
        timing=timing,
        error={"code": "internal", "message": "x"},
    )
    assert failed["error"] == {"code": "internal", "message": "x"}


def test_error_frame_fields() -> None:
    """error carries the code's value, the message, and session and id only when given."""
    assert frames.error(ErrorCode.NOT_FOUND, "no such chat") == {
        "type": "error",
        "code": "not_found",
        "message": "no such chat",
    }
    assert frames.error(ErrorCode.BUSY, "busy", id=3, session="s") == {
        "type": "error",
        "code": "busy",
        "message": "busy",
        "session": "s",
        "id": 3,
    }


def test_welcome_names_the_protocol() -> None:
    """welcome always says protocol chat.v1."""
    limits: frames.Limits = {"max_frame_bytes": 1, "max_sessions": 1, "max_tokens": 1, "hello_timeout_s": 1.0}
    frame = frames.welcome(None, server="s", user={"id": "u", "name": "n"}, models=[], limits=limits)
    assert frame["protocol"] == frames.PROTOCOL == "chat.v1"


def test_encode_is_compact_utf8_json() -> None:
    """encode gives UTF-8 JSON bytes that decode back to the same frame."""
    frame = frames.token("s", 0, "héllo 🙂")
    data = codec.encode(frame)
    assert isinstance(data, bytes)
    assert orjson.loads(data) == frame
    assert "🙂".encode() in data


# ---- property: only ProtocolError escapes -------------------------------------------

CLIENT_FRAME_CLASSES = typing.get_args(frames.ClientFrame)
JSON_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)  # orjson: no lone surrogates
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson reads as integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | JSON_TEXT
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(JSON_TEXT, children, max_size=5),
    max_leaves=25,
)
FIELDS = ["id", "session", "text", "chat", "model", "system", "title", "limit", "before", "token", "client"]
PARAM_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop"]
FRAME_SHAPED = st.builds(
    lambda kind, fields, params, resume: {"type": kind, **fields, "params": params, "resume": resume},
    st.sampled_from(sorted(codec.CLIENT_FRAME_TYPES)),
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6),
    st.none() | st.dictionaries(st.sampled_from(PARAM_FIELDS), JSON_VALUES, max_size=4) | JSON_VALUES,
    st.none()
    | st.fixed_dictionaries({}, optional={"message": JSON_VALUES, "index": JSON_VALUES})
    | JSON_VALUES,
)
PROPERTY = settings(max_examples=300, deadline=None, database=None)


def _parse_or_protocol_error(data: str | bytes) -> None:
    outcome: object
    try:
        outcome = codec.parse_client_frame(data)
    except ProtocolError as exc:
        outcome = exc
    if isinstance(outcome, ProtocolError):
        assert isinstance(outcome.code, ErrorCode)
        assert outcome.id is None or isinstance(outcome.id, str | int)
    else:
        assert isinstance(outcome, CLIENT_FRAME_CLASSES)


@PROPERTY
@given(JSON_VALUES)
def test_any_json_value_parses_or_raises_protocol_error(value: object) -> None:
    """Any JSON value gives a client frame or a ProtocolError, nothing else."""
    _parse_or_protocol_error(orjson.dumps(value))


@PROPERTY
@given(FRAME_SHAPED)
def test_any_frame_shaped_object_parses_or_raises_protocol_error(value: dict[str, Any]) -> None:
    """Objects with a known type and arbitrary values in the known fields never raise anything else."""
    _parse_or_protocol_error(orjson.dumps(value))


@PROPERTY
@given(st.text() | st.binary())
def test_any_text_parses_or_raises_protocol_error(data: str | bytes) -> None:
    """Arbitrary text or bytes (lone surrogates, bad UTF-8 too) never raise anything but ProtocolError."""
    _parse_or_protocol_error(data)
