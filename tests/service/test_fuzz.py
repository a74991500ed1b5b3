"""Property-based fuzzing of a live server: more than 10,000 malformed, mistyped, oversized and
out-of-order frames, each answered as an independent model of the connection predicts, while a
well-behaved session on another connection streams undisturbed throughout.

How it runs
    The service runs on pytest-asyncio's event loop. Hypothesis runs in a worker thread
    (:func:`asyncio.to_thread`) as a :class:`~hypothesis.stateful.RuleBasedStateMachine`: each
    example is one fuzzing connection, each step draws a batch of frames (``st.data()``, so a
    frame can aim at the sessions and chats the earlier ones made), pipelines them to the server
    with a ``ping`` barrier last, and reads everything the server sends until the barrier's
    answer (coroutines handed to the loop with :func:`asyncio.run_coroutine_threadsafe`). The
    settings are derandomized and keep no example database, and no draw depends on what the
    server answered (:func:`pick`): every run throws the same frames. A failure reports the
    failing example's steps and draws; ``LOCALCHAT_FUZZ_SHRINK=1`` shrinks it first (slow:
    every attempt replays its frames against the server).

The frames
    * junk: a well-formed frame with exactly one defect (not JSON, not an object, a bad ``id``,
      ``type`` missing, mistyped or unknown, a field missing, mistyped, empty or too long,
      ``params`` or ``resume`` broken, nesting past the parser's depth, ...). The defect alone
      decides the answer, whatever the connection's state: ``bad_frame``, ``unknown_type`` or
      ``bad_params``, with the ``id`` echoed when it could be read.
    * well-formed: every client frame type, aimed at sessions that are open, closing or unknown
      and chats that are ours, deleted, random UUIDs or no UUID at all; before and after
      ``hello``; with sampling parameters in and out of range, huge prompts, unicode and NUL,
      unknown fields of any shape; a ``ping`` of exactly the frame size limit. Now and then a
      ``send`` that really generates (1 to 4 tokens, or a long one that the batch stops again).
    * close-triggering: a binary frame (1003), a frame one byte or more over the limit (1009),
      a text frame that is not UTF-8 (1007), each on its own throwaway connection.

The oracle
    :class:`ConnectionModel` replays what the server sends, in order. The server answers a
    connection's frames one after the other, and queues the frames that come later on their own
    (``token``, ``done``, ``closed``) at the very moment of the state change they announce (a
    generation ends as its ``done`` is queued; a closing session leaves as its ``closed`` is
    queued). So when a direct answer arrives, the frames read before it tell the model exactly
    the state the server handled that frame in: which sessions were open or closing, whether a
    session was still generating, which chats were ours. The model predicts each answer from
    that state and the frame alone (it shares no code with the server) and checks it: type and
    error code, the echoed ``id`` and ``session``, token indices contiguous, one ``done`` per
    ``started``. A ``send`` whose prompt might or might not fit the context is the one place
    where either ``started`` or ``limit`` is accepted: the model bounds a prompt's tokens from
    below and above without a tokenizer.

The steady session streams greedy replies on its own connection the whole time; every fuzzing
example waits (no sleeps) until it has finished at least one more reply, and every reply is
checked: contiguous indices, ``done`` with ``stop`` or ``length``, text equal to the stored
message, and greedy output equal to the first reply's. After the fuzzing a fresh connection
gets its ``pong``, ``/healthz`` answers 200, no connection is left, and the server logged no
error.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
from collections import Counter, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from websockets.exceptions import ConnectionClosed

from service.errors import StoreError
from tests.service.client import TIMEOUT_S, Client, Frame, Reply
from tests.service.conftest import ServiceFactory, ws_url

T = TypeVar("T")

MIN_FRAMES = 10_000
# Shrinking replays thousands of frames per attempt against a live server (minutes): off unless
# asked for, so a failure reports the failing example as found.
SHRINK = os.environ.get("LOCALCHAT_FUZZ_SHRINK") == "1"
FUZZ_SETTINGS = settings(
    max_examples=125,  # about 90 frames each: 10,000+ with a margin (the count depends on the answers)
    phases=[Phase.explicit, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    stateful_step_count=40,
    derandomize=True,  # the same frames on every run
    database=None,
    deadline=None,
    report_multiple_bugs=False,
    # Batches are large on purpose, and each example talks to a live server.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

KNOWN_TYPES = ("hello", "open", "send", "stop", "close", "models", "chats", "history", "delete", "ping")
FIELDS = {
    "hello": ("token", "client"),
    "open": ("session", "chat", "model", "system", "title", "params", "resume"),
    "send": ("session", "text", "params"),
    "stop": ("session",),
    "close": ("session",),
    "models": (),
    "chats": ("limit", "before"),
    "history": ("chat", "limit", "before"),
    "delete": ("chat",),
    "ping": (),
}
ALL_FIELDS = frozenset({"type", "id"}.union(*FIELDS.values()))
REQUIRED = {"open": ("session",), "send": ("session", "text"), "stop": ("session",), "close": ("session",)}
REQUIRED |= {"history": ("chat",), "delete": ("chat",)}
NAMES = ("session", "chat")  # non-empty strings of at most 64 characters
MAX_CHARS = {"session": 64, "chat": 64, "before": 64, "title": 200, "model": 1024, "token": 1024}
STRING_FIELDS = ("session", "chat", "before", "title", "model", "token", "system", "text")
COUNT_FIELDS = ("limit",)

# Session names the fuzzer reuses, more of them than a connection may open at once.
SESSION_NAMES = (*(f"s{i}" for i in range(20)), "ümlaut", "日本語", "🙂" * 64, " ", "\x00", "x" * 64)

# A prompt's tokens, bounded without a tokenizer. Byte-level BPE: a token is at least one byte,
# so a message costs at most its UTF-8 bytes plus the template around it. A space-separated
# "word" is a pre-token of its own, so it costs at least one token.
TEMPLATE_TOKENS = 48  # the default system prompt and the generation prompt (31 in all for "hi")
MESSAGE_TOKENS = 8  # <|im_start|>role\n ... <|im_end|>\n around one message
HUGE_WORD = "word"

# The steady session: the same greedy question in a fresh chat, again and again.
STEADY_PROMPTS = ("Tell me about the sea.", "And the mountains?")
STEADY_TOKENS = 12


def upper_tokens(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass")) + MESSAGE_TOKENS


def lower_tokens(text: str) -> int:
    return text.split(" ").count(HUGE_WORD)


def is_uuid(text: str) -> bool:
    return (
        re.fullmatch(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", text)
        is not None
    )


def frame_kind(probe: Probe) -> str:
    return "junk" if probe.frame is None else str(probe.frame["type"])


def is_name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64


def short(value: object, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# ---- strategies --------------------------------------------------------------------------------

INT64 = st.integers(-(2**63), 2**64 - 1)
scalars = st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False)
scalars |= st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# Lone surrogates are no Unicode text: JSON can only carry them as escapes, which the server's
# parser refuses (bad_frame) and the oracle does not model, so characters exclude them.
CHARS = st.characters(exclude_categories=("Cs",))
readable_ids: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    INT64,
    st.text(max_size=8),
    st.builds(lambda c, n: c * n, CHARS, st.integers(60, 64)),
)
bad_ids: st.SearchStrategy[Any] = st.one_of(
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.builds(lambda c, n: c * n, CHARS, st.integers(65, 300)),
    st.integers(2**64, 2**80),
    st.integers(-(2**80), -(2**63) - 1),
    st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)
short_texts = st.text(max_size=12)
unknown_fields = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k not in ALL_FIELDS), json_values, max_size=2
)
not_strings = st.one_of(
    INT64, st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)  # fmt: skip
not_integers = st.one_of(
    st.text(max_size=4),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
    st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)
not_numbers = st.one_of(
    st.text(max_size=4), st.booleans(), st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)  # fmt: skip
not_stops = st.one_of(  # neither a string nor a list of strings
    INT64,
    st.booleans(),
    st.dictionaries(st.text(max_size=3), scalars, min_size=1, max_size=2),
    st.lists(st.none() | INT64 | st.booleans(), min_size=1, max_size=3),
)
not_objects = st.one_of(scalars, st.lists(scalars, max_size=3))
huge_texts = st.integers(300, 6000).map(lambda n: " ".join([HUGE_WORD] * n))
whitespace = st.text(alphabet=" \t\r\n", max_size=3)

# The smallest positive sampling values, down to subnormals: logits that overflow must still
# sample (a temperature of 1e-310 once killed the engine's worker thread).
TINY = 5e-324

# Sampling parameters: field -> (in range, out of range), the contract's ranges.
above_ten = st.floats(10, 1e300, exclude_min=True)
PARAM_RANGES: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "temperature": (
        st.just(0.0) | st.floats(TINY, 10),
        above_ten | st.floats(-1e300, 0, exclude_max=True),
    ),
    "top_p": (
        st.floats(0, 1, exclude_min=True),
        st.floats(1, 1e300, exclude_min=True) | st.floats(-1e300, 0),
    ),
    "top_k": (st.integers(0, 2**62), st.integers(-(2**63), -1)),
    "repetition_penalty": (st.floats(TINY, 10), above_ten | st.floats(-1e9, 0)),
    "seed": (st.integers(0, 2**63 - 1), st.integers(2**63, 2**64 - 1) | st.integers(-(2**63), -1)),
    "stop": (
        st.lists(st.text(min_size=1, max_size=5), max_size=4) | st.text(min_size=1, max_size=5),
        st.lists(st.text(min_size=1, max_size=2), min_size=17, max_size=20)
        | st.lists(st.just(""), min_size=1, max_size=2)
        | st.builds(lambda n: ["x" * n], st.integers(257, 400)),
    ),
}
NUMBER_PARAMS = ("temperature", "top_p", "repetition_penalty")
INTEGER_PARAMS = ("max_tokens", "top_k", "seed")


other_chat_refs = st.one_of(
    st.uuids().map(str),
    st.text(min_size=1, max_size=10),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: f"{{{u}}}"),
)
other_message_refs = st.uuids().map(str) | st.text(min_size=1, max_size=10)


def pick(data: st.DataObject, choices: list[T], other: T, *, chance: int = 4) -> T:
    """One of ``choices`` (sessions, chats: how many there are differs from run to run), or
    ``other``. Draws the same way whatever the choices: hypothesis replays choice sequences and
    refuses draws that depend on outside state."""
    roll = data.draw(st.integers(0, chance))
    index = data.draw(st.integers(0, 2**16))
    return choices[index % len(choices)] if choices and roll else other


# ---- probes ------------------------------------------------------------------------------------

NO_ID: Any = type("NoId", (), {"__repr__": lambda self: "<no id>"})()


@dataclass
class Probe:
    """One text frame and what decides its answer."""

    raw: str
    frame: dict[str, Any] | None = None  # a well-formed frame: the state decides
    junk: str | None = None  # the error code a junk frame must get, whatever the state
    id: Any = NO_ID  # the id the answer must echo (NO_ID: none)
    session: str | None = None  # the session an error may echo
    huge_send: bool = False  # a send that the model is told to stop at the end of the batch


def dump(frame: dict[str, Any], ascii_only: bool, pad: tuple[str, str]) -> str:
    return pad[0] + json.dumps(frame, ensure_ascii=ascii_only) + pad[1]


@st.composite
def encodings(draw: st.DrawFn) -> tuple[bool, tuple[str, str]]:
    return draw(st.booleans()), (draw(whitespace), draw(whitespace))


@st.composite
def base_frames(draw: st.DrawFn, kind: str | None = None) -> dict[str, Any]:
    """A well-formed frame of any type (state aside), for junk to be made of."""
    kind = kind or draw(st.sampled_from(KNOWN_TYPES))
    frame: dict[str, Any] = {"type": kind}
    if "session" in FIELDS[kind]:
        frame["session"] = draw(st.sampled_from(SESSION_NAMES))
    if "chat" in FIELDS[kind] and kind != "open":
        frame["chat"] = str(draw(st.uuids()))
    if kind == "send":
        frame["text"] = draw(short_texts)
    return frame


def finish_junk(draw: st.DrawFn, frame: dict[str, Any], code: str, *, readable_id: bool = True) -> Probe:
    """Add an id (echoed) and unknown fields (ignored), serialize."""
    frame_id = NO_ID
    if readable_id and "id" not in frame:
        value = draw(readable_ids)
        if value is not None:
            frame["id"] = frame_id = value
    frame.update(draw(unknown_fields))
    session = frame.get("session")
    ascii_only, pad = draw(encodings())
    return Probe(
        dump(frame, ascii_only, pad), junk=code, id=frame_id, session=session if is_name(session) else None
    )


NOT_JSON_SNIPPETS = (
    "",
    " ",
    "{",
    "}",
    "null x",
    "{'type': 'ping'}",
    "{type: ping}",
    '{"type": "ping",}',
    '{"type": "ping"}{}',
    '{"type": "ping"} x',
    '{"type": "ping"}\x00',
    '\ufeff{"type": "ping"}',
    '// a comment\n{"type": "ping"}',
    '{"type": "ping" "id": 1}',
    '{"type": "ping", "id": 01}',
    '{"type": "ping", "x": NaN}',
    '{"type": "ping", "x": -Infinity}',
    '{"type": "ping", "x": 1e400}',
    '{"type": "ping", "x": "\\ud800"}',
    '{"type": "ping", "x": "\\udc00\\ud800"}',
    '{"type": "ping", "x": "\\x41"}',
    '{"type": "ping", "x": "tab\there"}',
    '{"type": "ping", "x": "line\nbreak"}',
    '"unterminated',
    "[1, 2,]",
    "True",
)


@st.composite
def not_json(draw: st.DrawFn) -> Probe:
    way = draw(st.integers(0, 3))
    if way == 0:
        raw = draw(st.sampled_from(NOT_JSON_SNIPPETS))
    elif way == 1:  # a frame cut short: no proper prefix of an object is JSON
        whole = json.dumps(draw(base_frames()) | draw(unknown_fields), ensure_ascii=draw(st.booleans()))
        raw = whole[: draw(st.integers(0, len(whole) - 1))]
    elif way == 2:  # nothing JSON can start with
        raw = draw(st.sampled_from("#<'/@=)xé\x00")) + draw(st.text(max_size=20))
    else:  # nested past the parser's depth (1024)
        depth = draw(st.integers(1024, 2000))
        raw = '{"type": "ping", "deep": ' + "[" * depth + "]" * depth + "}"
    return Probe(raw, junk="bad_frame")


@st.composite
def not_objects_probe(draw: st.DrawFn) -> Probe:
    ascii_only, pad = draw(encodings())
    return Probe(dump(draw(not_objects), ascii_only, pad), junk="bad_frame")


@st.composite
def bad_id(draw: st.DrawFn) -> Probe:
    """The id is read first: a bad one makes any object a bad_frame with no id."""
    frame = draw(base_frames()) if draw(st.booleans()) else {"type": draw(st.text(max_size=6))}
    frame["id"] = draw(bad_ids)
    return finish_junk(draw, frame, "bad_frame", readable_id=False)


@st.composite
def bad_type(draw: st.DrawFn) -> Probe:
    frame = draw(base_frames())
    way = draw(st.integers(0, 3))
    if way == 0:
        del frame["type"]
        return finish_junk(draw, frame, "bad_frame")
    if way == 1:
        frame["type"] = draw(st.none() | not_strings)
        return finish_junk(draw, frame, "bad_frame")
    kind = frame["type"]
    frame["type"] = draw(
        st.sampled_from(
            [kind.upper(), kind.title(), f" {kind}", f"{kind} ", f"{kind}\x00", f"{kind}\u200b", kind * 2]
        )
        | st.text(max_size=12).filter(lambda t: t not in KNOWN_TYPES)
    )
    return finish_junk(draw, frame, "unknown_type")


@st.composite
def bad_field(draw: st.DrawFn) -> Probe:
    """One field of a well-formed frame broken: missing, mistyped, empty, too long."""
    kind = draw(st.sampled_from([k for k in KNOWN_TYPES if FIELDS[k] and k != "models"]))
    frame = draw(base_frames(kind))
    defects: list[str] = []
    for name in REQUIRED.get(kind, ()):
        defects += [f"missing:{name}", f"null:{name}"]
    for name in FIELDS[kind]:
        if name in STRING_FIELDS:
            defects.append(f"mistyped:{name}")
        if name in NAMES:
            defects.append(f"empty:{name}")
        if name in MAX_CHARS:
            defects.append(f"long:{name}")
        if name in COUNT_FIELDS:
            defects += [f"count:{name}", f"small:{name}"]
    if "params" in FIELDS[kind]:
        defects += ["params:object", "params:number", "params:integer", "params:stop"]
    if "resume" in FIELDS[kind]:
        defects += ["resume:object", "resume:index", "resume:message"]
    defect, name = draw(st.sampled_from(defects)).split(":")
    code = "bad_frame"
    if defect in ("missing", "null"):
        frame[name] = None
        if defect == "missing":
            del frame[name]
    elif defect == "mistyped":
        frame[name] = draw(not_strings)
    elif defect == "empty":
        frame[name] = ""
    elif defect == "long":
        frame[name] = draw(CHARS) * draw(st.integers(MAX_CHARS[name] + 1, MAX_CHARS[name] + 300))
    elif defect == "count":
        frame[name] = draw(not_integers)
    elif defect == "small":
        frame[name] = draw(st.integers(-(2**63), 0))
    elif defect == "params":
        if name == "object":
            frame["params"] = draw(not_objects.filter(lambda v: v is not None))
        else:
            code = "bad_params"
            key = draw(st.sampled_from(NUMBER_PARAMS if name == "number" else INTEGER_PARAMS))
            wrong = not_numbers if name == "number" else not_integers
            if name == "stop":
                key, wrong = "stop", not_stops
            frame["params"] = {key: draw(wrong)}
    else:  # resume
        resume: Any = {"message": str(draw(st.uuids())), "index": draw(st.integers(0, 100))}
        if name == "object":
            resume = draw(not_objects.filter(lambda v: v is not None))
        elif name == "index":
            resume["index"] = draw(
                st.sampled_from([None, "missing"]) | not_integers | st.integers(-(2**63), -1)
            )
            if resume["index"] == "missing":
                del resume["index"]
        else:
            wrong = st.none() | not_strings  # (not "": schema/ allows it, the server refuses it)
            wrong |= st.builds(lambda n: "m" * n, st.integers(65, 200))
            resume["message"] = draw(wrong)
        frame["resume"] = resume
    return finish_junk(draw, frame, code)


junk_probes = st.one_of(not_json(), not_objects_probe(), bad_id(), bad_type(), bad_field())


# ---- the model of one connection -------------------------------------------------------------


@dataclass
class Generation:
    message: str
    max_tokens: int
    prompt_tokens: int
    next_index: int = 0
    cancel_asked: bool = False
    done: bool = False


@dataclass
class SessionModel:
    name: str
    chat: str  # lower case
    system_words: int  # tokens the system prompt costs at least
    high: int  # tokens the conversation costs at most (the next prompt adds its text)
    max_tokens: int  # the session's default
    generation: Generation | None = None
    closing: bool = False
    close_id: Any = NO_ID

    @property
    def generating(self) -> bool:
        return self.generation is not None and not self.generation.done


class OracleError(AssertionError):
    pass


@dataclass
class Limits:
    context: int
    max_sessions: int
    max_tokens: int
    max_frame_bytes: int
    model: str
    welcome_models: list[Frame]


class ConnectionModel:
    """What one fuzzing connection's server state is, replayed from what the server sends."""

    def __init__(self, limits: Limits, outcomes: Counter[str]) -> None:
        self.limits = limits
        self.outcomes = outcomes
        self.hello = False
        self.sessions: dict[str, SessionModel] = {}
        self.chats: dict[str, bool] = {}  # our chats (lower case): alive?
        self.message_ids: list[str] = []
        self.pending: deque[Probe] = deque()

    # ---- what the generator may aim at (the state after the last batch) ----

    def open_names(self) -> list[str]:
        return [s.name for s in self.sessions.values() if not s.closing]

    def quiet(self) -> bool:
        return not any(s.generating or s.closing for s in self.sessions.values())

    # ---- replay ----

    def on_frame(self, frame: Frame) -> None:
        kind = frame["type"]
        if kind == "token":
            self._token(frame)
        elif kind == "done":
            self._done(frame)
        elif kind == "closed":
            self._closed(frame)
        else:
            self._answer(frame)

    def _fail(self, message: str, probe: Probe | None = None, frame: Frame | None = None) -> OracleError:
        lines = [message]
        if probe is not None:
            lines.append(f"  sent:     {short(probe.raw)}")
        if frame is not None:
            lines.append(f"  received: {short(frame)}")
        return OracleError("\n".join(lines))

    def _session_of(self, frame: Frame) -> SessionModel:
        session = self.sessions.get(frame["session"])
        if session is None:
            raise self._fail("a frame for a session that is not open", frame=frame)
        return session

    def _token(self, frame: Frame) -> None:
        generation = self._session_of(frame).generation
        if generation is None or generation.done:
            raise self._fail("a token with no generation running", frame=frame)
        if frame["index"] != generation.next_index:
            raise self._fail(f"token index {frame['index']}, expected {generation.next_index}", frame=frame)
        generation.next_index += frame.get("tokens", 1)

    def _done(self, frame: Frame) -> None:
        session = self._session_of(frame)
        generation = session.generation
        if generation is None or generation.done:
            raise self._fail("a done with no generation running", frame=frame)
        generation.done = True
        reasons = {"stop", "length"}
        if generation.cancel_asked or any(self._cancels(p, session) for p in self.pending):
            reasons.add("cancelled")
        usage = frame["usage"]
        # The frames cover every token, those without text (end of sequence, a stop string,
        # bytes held back at a cancel) in a last frame whose text may be empty.
        streamed = generation.next_index
        checks = {
            "message": frame["message"] == generation.message,
            "reason": frame["reason"] in reasons,
            "completion_tokens": usage["completion_tokens"] == streamed <= generation.max_tokens,
            "prompt_tokens": usage["prompt_tokens"] == generation.prompt_tokens,
        }
        if not all(checks.values()):
            wrong = [name for name, ok in checks.items() if not ok]
            raise self._fail(f"done disagrees on {wrong} (tokens seen {generation.next_index})", frame=frame)
        # The conversation holds what was generated, not what was reserved.
        session.high -= generation.max_tokens - usage["completion_tokens"]
        self.outcomes[f"done:{frame['reason']}"] += 1

    def _cancels(self, probe: Probe, session: SessionModel) -> bool:
        frame = probe.frame
        if frame is None:
            return False
        if frame["type"] in ("stop", "close"):
            return bool(frame["session"] == session.name)
        return frame["type"] == "delete" and frame["chat"].lower() == session.chat

    def _closed(self, frame: Frame) -> None:
        session = self._session_of(frame)
        # The close frame may still be pending (it has no direct answer): the server handled it,
        # and every frame before it, which therefore had no direct answer either.
        while not session.closing and self.pending and self.expect(self.pending[0]) is None:
            self.apply(self.pending.popleft(), None)
        if not session.closing or session.generating:
            raise self._fail("closed for a session not closing, or still generating", frame=frame)
        if frame.get("id", NO_ID) != session.close_id:
            raise self._fail(f"closed echoes the wrong id (expected {session.close_id!r})", frame=frame)
        del self.sessions[session.name]
        self.outcomes["closed"] += 1

    def _answer(self, frame: Frame) -> None:
        """A direct answer: to the first pending frame that gets one."""
        while True:
            if not self.pending:
                raise self._fail("an answer to no frame", frame=frame)
            probe = self.pending.popleft()
            expected = self.expect(probe)
            if expected is None:  # answered by nothing (now): just its effect
                self.apply(probe, None)
                continue
            got = frame["type"] if frame["type"] != "error" else f"error:{frame['code']}"
            if got not in expected:
                raise self._fail(f"expected {sorted(expected)}, got {got}", probe, frame)
            if frame.get("id", NO_ID) != probe.id:
                raise self._fail(f"the answer echoes the wrong id (expected {probe.id!r})", probe, frame)
            if "session" in frame and frame["session"] != probe.session:
                raise self._fail(
                    f"the answer names the wrong session (expected {probe.session!r})", probe, frame
                )
            self.outcomes[got] += 1
            self.apply(probe, frame)
            return

    # ---- prediction ----

    def expect(self, probe: Probe) -> set[str] | None:
        """The acceptable answers (``error:CODE`` for errors), or None: no direct answer."""
        if probe.junk is not None:
            return {f"error:{probe.junk}"}
        frame = probe.frame
        assert frame is not None
        kind = frame["type"]
        if kind == "hello":
            return {"welcome"}
        if not self.hello:
            return {"error:unauthenticated"}
        if kind in ("ping", "models", "chats"):
            return {"pong" if kind == "ping" else kind}
        if kind in ("history", "delete"):
            alive = self.chats.get(frame["chat"].lower(), False) and is_uuid(frame["chat"])
            return {kind if kind == "history" else "deleted"} if alive else {"error:not_found"}
        stop = (frame.get("params") or {}).get("stop", [])
        if any("\x00" in s for s in ([stop] if isinstance(stop, str) else stop)):
            return {"error:bad_params"}  # refused by the parser: a NUL cannot be stored
        session = self.sessions.get(frame["session"])
        if kind == "open":
            if session is not None:
                return {"error:session_exists"}
            if len(self.sessions) >= self.limits.max_sessions:
                return {"error:limit"}
            if not self.params_ok(frame.get("params")):
                return {"error:bad_params"}
            chat = frame.get("chat")
            if chat is not None and not (is_uuid(chat) and self.chats.get(chat.lower(), False)):
                return {"error:not_found"}
            if (frame.get("model") or self.limits.model) != self.limits.model:  # "" is the default
                return {"error:model_unavailable"}
            return {"opened"}
        if session is None or session.closing:
            return {"error:unknown_session"}
        if kind in ("stop", "close"):
            return None
        assert kind == "send"
        if session.generating:
            return {"error:busy"}
        if not self.params_ok(frame.get("params")):
            return {"error:bad_params"}
        context = self.limits.context
        if session.system_words + lower_tokens(frame["text"]) + 1 > context:
            return {"error:limit"}
        fits = session.high + upper_tokens(frame["text"]) + 1 <= context
        if self.chats[session.chat]:
            return {"started"} if fits else {"started", "error:limit"}
        # The chat was deleted under the open session: nothing to write the turn to.
        return {"error:not_found"} | (set() if fits else {"error:limit"})

    def params_ok(self, params: dict[str, Any] | None) -> bool:
        """Ranges as the contract states them (the types are right: junk is made elsewhere)."""
        p = params or {}
        stop = p.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        return (
            1 <= p.get("max_tokens", 1) <= self.limits.max_tokens
            and 0 <= p.get("temperature", 0) <= 10
            and 0 < p.get("top_p", 1) <= 1
            and p.get("top_k", 0) >= 0
            and 0 < p.get("repetition_penalty", 1) <= 10
            and 0 <= p.get("seed", 0) < 2**63
            and len(stop) <= 16
            and all(0 < len(s) <= 256 for s in stop)
        )

    # ---- effects ----

    def apply(self, probe: Probe, answer: Frame | None) -> None:
        frame = probe.frame
        if frame is None:
            return
        kind = frame["type"]
        if answer is None and kind == "stop":
            session = self.sessions[frame["session"]]
            if session.generating:
                session.generation.cancel_asked = True  # type: ignore[union-attr]
            return
        if answer is None and kind == "close":
            session = self.sessions[frame["session"]]
            session.closing, session.close_id = True, probe.id
            if session.generating:
                session.generation.cancel_asked = True  # type: ignore[union-attr]
            return
        if answer is None:
            return
        if answer["type"] == "welcome":
            self.hello = True
            limits = answer["limits"]
            assert answer["protocol"] == "chat.v1"
            assert (limits["max_sessions"], limits["max_tokens"], limits["max_frame_bytes"]) == (
                self.limits.max_sessions,
                self.limits.max_tokens,
                self.limits.max_frame_bytes,
            ), answer
            assert answer["models"] == self.limits.welcome_models, answer
        elif answer["type"] == "models":
            assert answer["models"] == self.limits.welcome_models, answer
        elif answer["type"] == "opened":
            self._opened(probe, frame, answer)
        elif answer["type"] == "started":
            self._started(probe, frame, answer)
        elif answer["type"] == "deleted":
            assert answer["chat"] == frame["chat"], answer
            self.chats[frame["chat"].lower()] = False
            for session in self.sessions.values():  # their generations were cancelled
                if session.chat == frame["chat"].lower() and session.generation is not None:
                    session.generation.cancel_asked = True
        elif answer["type"] == "history":
            assert answer["chat"] == frame["chat"], answer
            assert len(answer["messages"]) <= frame.get("limit", 10**9), answer

    def _opened(self, probe: Probe, frame: dict[str, Any], answer: Frame) -> None:
        chat = answer["chat"].lower()
        messages = answer["messages"]
        if frame.get("chat") is not None:
            if chat != frame["chat"].lower():
                raise self._fail("opened names another chat", probe, answer)
        elif chat in self.chats or len(messages) > 1 or any(m["role"] != "system" for m in messages):
            raise self._fail("a new chat that is not new", probe, answer)
        if answer["model"] != self.limits.model:
            raise self._fail("opened names the wrong model", probe, answer)
        system = messages[0]["text"] if messages and messages[0]["role"] == "system" else ""
        high = TEMPLATE_TOKENS + sum(upper_tokens(m["text"]) + 2 for m in messages)
        for other in self.sessions.values():  # replies of this chat not stored yet
            if other.chat == chat and other.generating:
                high += other.generation.max_tokens + MESSAGE_TOKENS  # type: ignore[union-attr]
        self.chats.setdefault(chat, True)
        self.message_ids += [m["id"] for m in messages]
        # The session's default max_tokens: the open's, else a resumed chat's (unknown: bound
        # it), else the contract's default.
        default = 256 if frame.get("chat") is None else self.limits.max_tokens
        self.sessions[frame["session"]] = SessionModel(
            name=frame["session"],
            chat=chat,
            system_words=lower_tokens(system),
            high=high,
            max_tokens=(frame.get("params") or {}).get("max_tokens", default),
        )

    def _started(self, probe: Probe, frame: dict[str, Any], answer: Frame) -> None:
        session = self.sessions[frame["session"]]
        bound = session.high + upper_tokens(frame["text"])
        if not answer["cached_tokens"] <= answer["prompt_tokens"] <= bound:
            raise self._fail(f"a prompt of more tokens than the conversation holds ({bound})", probe, answer)
        max_tokens = (frame.get("params") or {}).get("max_tokens", session.max_tokens)
        session.generation = Generation(answer["message"], max_tokens, answer["prompt_tokens"])
        session.high = bound + max_tokens + MESSAGE_TOKENS
        self.message_ids.append(answer["message"])


# ---- the fuzzing machine -------------------------------------------------------------------------


@dataclass
class Steady:
    """The well-behaved session's progress, shared with the fuzzing thread."""

    replies: int = 0
    during_fuzz: int = 0
    texts: dict[int, set[str]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, fuzzing: bool) -> None:
        self.replies += 1
        self.during_fuzz += int(fuzzing)
        self.changed.set()
        self.changed = asyncio.Event()

    async def beyond(self, replies: int) -> None:
        while self.replies <= replies:
            await self.changed.wait()


@dataclass
class FuzzRun:
    loop: asyncio.AbstractEventLoop
    url: str
    limits: Limits
    steady: Steady
    fuzzing: bool = False
    frames: int = 0
    batches: int = 0
    examples: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[int] = field(default_factory=Counter)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the service's loop and wait for it (from the hypothesis thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=4 * TIMEOUT_S)


class FuzzConnection(RuleBasedStateMachine):
    """One fuzzing connection; each step, one batch of frames and everything they cause."""

    def __init__(self, run: FuzzRun) -> None:
        super().__init__()
        self.run = run
        run.examples += 1
        self.model = ConnectionModel(run.limits, run.outcomes)
        self.steady_at_start = run.steady.replies
        self.client: Client = run.call(connect(run.url))
        self.barriers = 0
        self.broken = False

    # ---- steps ----

    @rule(data=st.data())
    def junk(self, data: st.DataObject) -> None:
        """Frames that are wrong whatever the state, with some well-formed ones between; now and
        then a frame that ends the connection, on a throwaway connection of its own."""
        probes = [
            data.draw(junk_probes) if data.draw(st.integers(0, 7)) else self.draw_frame(data)
            for _ in range(data.draw(st.sampled_from(range(5, 41))))
        ]
        self.exchange(probes)
        if data.draw(st.integers(0, 3)) == 0:
            self.close_probe(data)

    @rule(data=st.data())
    def session_traffic(self, data: st.DataObject) -> None:
        """Well-formed frames in and out of order: the state decides each answer."""
        probes = [self.draw_frame(data) for _ in range(data.draw(st.sampled_from(range(3, 25))))]
        self.exchange(probes)

    @rule(data=st.data())
    def many_opens(self, data: st.DataObject) -> None:
        """Open sessions past the connection's limit."""
        if data.draw(st.booleans()) and not self.model.hello:
            self.exchange([self.wellformed(data, {"type": "hello"})])
        names = data.draw(st.lists(st.sampled_from(SESSION_NAMES), min_size=4, max_size=20))
        self.exchange([self.wellformed(data, {"type": "open", "session": name}) for name in names])

    def close_probe(self, data: st.DataObject) -> None:
        """A binary (1003), oversized (1009) or not UTF-8 (1007) frame after a few good ones."""
        before = [
            self.wellformed(data, {"type": kind}).raw
            for kind in data.draw(st.lists(st.sampled_from(["hello", "ping", "models"]), max_size=3))
        ]
        # Each way in turn (hypothesis would favour the first); every value drawn each time,
        # so that the draws do not depend on which way it is.
        way = ("binary", "oversized", "not_utf8")[sum(self.run.close_codes.values()) % 3]
        limit = self.run.limits.max_frame_bytes
        payload = data.draw(st.binary(max_size=64))
        as_text = data.draw(st.booleans())
        extra = data.draw(st.integers(1, 3 * limit) | st.just(1))
        good = self.wellformed(data, {"type": "ping"}).raw.encode()
        cut = data.draw(st.integers(0, 2**16)) % (len(good) + 1)
        bad = data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc", b"\xf8\x88\x80\x80"]))
        offending: str | bytes
        if way == "binary":  # any bytes, or a text frame's content sent as binary
            offending, code = good if as_text else payload, 1003
        elif way == "oversized":
            prefix = '{"type": "ping", "pad": "'
            offending, code = prefix + "x" * (limit + extra - len(prefix) - 2) + '"}', 1009
        else:
            offending, code = good[:cut] + bad + good[cut:], 1007
        self.run.frames += len(before) + 1
        got = self.run.call(close_probe(self.run.url, before, offending, binary=way == "binary"))
        assert got == code, f"{way}: expected close {code}, got {got}"
        self.run.close_codes[code] += 1

    def teardown(self) -> None:
        try:
            if not self.broken:
                # Stop what still runs, then every done and closed must arrive.
                stops = [
                    self.probe({"type": "stop", "session": s.name}, NO_ID)
                    for s in self.model.sessions.values()
                    if s.generating and not s.closing
                ]
                self.exchange(stops, until_quiet=True)
                # The steady session kept streaming through this connection's whole life.
                self.run.call(asyncio.wait_for(self.run.steady.beyond(self.steady_at_start), TIMEOUT_S))
        finally:
            self.run.call(self.client.close())

    # ---- exchanging frames ----

    def exchange(self, probes: list[Probe], *, until_quiet: bool = False) -> None:
        """Send the probes and a barrier ping; read and check everything until its answer."""
        limit = self.run.limits.max_frame_bytes
        for probe in probes:
            assert len(probe.raw.encode("utf-8", "surrogatepass")) <= limit, (
                "the fuzzer made an oversized frame"
            )
        self.barriers += 1
        barrier = f"barrier-{self.barriers}"
        stops = [
            self.probe({"type": "stop", "session": p.frame["session"]}, NO_ID)  # type: ignore[index]
            for p in probes
            if p.huge_send
        ]
        self.run.frames += len(probes) + len(stops)  # the barrier aside
        self.run.batches += 1
        probes = [*probes, *stops, self.probe({"type": "ping"}, barrier)]
        try:
            self.run.call(self._exchange(probes, until_quiet))
        except BaseException:
            self.broken = True
            raise

    async def _exchange(self, probes: list[Probe], until_quiet: bool) -> None:
        model = self.model
        for probe in probes:
            model.pending.append(probe)
            await self.client.send_raw(probe.raw)
        while model.pending or (until_quiet and not model.quiet()):
            model.on_frame(await self.client.wait_for(lambda f: True))

    def probe(self, frame: dict[str, Any], frame_id: Any) -> Probe:
        if frame_id is not NO_ID:
            frame["id"] = frame_id
        session = frame.get("session")
        return Probe(
            json.dumps(frame), frame=frame, id=frame_id, session=session if is_name(session) else None
        )

    def wellformed(self, data: st.DataObject, frame: dict[str, Any], *, huge_send: bool = False) -> Probe:
        """Add an id, unknown fields of any shape, maybe deep nesting; serialize any way."""
        frame_id = data.draw(readable_ids)
        frame_id = NO_ID if frame_id is None else frame_id
        extra = data.draw(unknown_fields)
        sent = {**frame, **extra} | ({} if frame_id is NO_ID else {"id": frame_id})
        ascii_only, pad = data.draw(encodings())
        raw = dump(sent, ascii_only, pad)
        if data.draw(st.integers(0, 30)) == 0:  # nested as deep as the parser allows
            depth = data.draw(st.integers(1, 1023))
            raw = raw.rstrip()[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
        session = frame.get("session")
        return Probe(
            raw, frame=frame, id=frame_id, session=session if is_name(session) else None, huge_send=huge_send
        )

    # ---- drawing well-formed frames ----

    def draw_frame(self, data: st.DataObject) -> Probe:
        hello_first = data.draw(st.integers(0, 6)) == 0  # drawn whatever the state (see pick)
        kind = data.draw(
            st.sampled_from(
                ["open"] * 6 + ["send"] * 5 + ["stop"] * 2 + ["close"] * 3 + ["history"] * 3 + ["delete"] * 2
                + ["chats", "models", "ping", "hello", "exact"]
            )
        )  # fmt: skip
        if kind == "hello" or (hello_first and not self.model.hello):
            return self.wellformed(data, {"type": "hello", **self.draw_hello(data)})
        if kind == "exact":  # a ping of exactly the frame size limit is still a frame
            frame_id = data.draw(st.integers(0, 2**63))
            head = json.dumps({"type": "ping", "id": frame_id, "pad": ""})
            raw = head[:-2] + "x" * (self.run.limits.max_frame_bytes - len(head)) + '"}'
            return Probe(raw, frame={"type": "ping"}, id=frame_id)
        if kind in ("models", "ping"):
            return self.wellformed(data, {"type": kind})
        if kind == "chats":
            frame: dict[str, Any] = {"type": "chats"}
            if data.draw(st.booleans()):
                frame["limit"] = data.draw(st.integers(1, 10**6))
            if data.draw(st.booleans()):
                frame["before"] = self.draw_chat_ref(data)
            return self.wellformed(data, frame)
        if kind in ("history", "delete"):
            frame = {"type": kind, "chat": self.draw_chat_ref(data)}
            if kind == "history":
                if data.draw(st.booleans()):
                    frame["limit"] = data.draw(st.integers(1, 10**6))
                if data.draw(st.integers(0, 3)) == 0:
                    ref = self.draw_message_ref(data)
                    frame["before"] = "" if data.draw(st.integers(0, 5)) == 0 else ref
            return self.wellformed(data, frame)
        if kind == "open":
            return self.draw_open(data)
        name = self.draw_session(data)
        if kind in ("stop", "close"):
            return self.wellformed(data, {"type": kind, "session": name})
        return self.draw_send(data, name)

    def draw_hello(self, data: st.DataObject) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if data.draw(st.booleans()):
            fields["token"] = data.draw(
                st.text(max_size=10) | st.builds(lambda n: "t" * n, st.integers(0, 1024))
            )
        if data.draw(st.booleans()):
            fields["client"] = data.draw(json_values)
        return fields

    def draw_session(self, data: st.DataObject) -> str:
        other = data.draw(st.sampled_from(SESSION_NAMES) | st.text(min_size=1, max_size=3))
        return pick(data, self.model.open_names(), other)

    def draw_chat_ref(self, data: st.DataObject) -> str:
        other = data.draw(other_chat_refs)
        ours = sorted(self.model.chats)
        ref = pick(data, ours, other, chance=2)
        return ref.upper() if data.draw(st.integers(0, 3)) == 0 and ref in ours else ref

    def draw_message_ref(self, data: st.DataObject) -> str:
        return pick(data, self.model.message_ids, data.draw(other_message_refs))

    def draw_params(self, data: st.DataObject, *, in_range: bool, max_tokens: int | None) -> dict[str, Any]:
        keys = data.draw(st.lists(st.sampled_from(sorted(PARAM_RANGES)), max_size=3, unique=True))
        params = {key: data.draw(PARAM_RANGES[key][0]) for key in keys}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if not in_range:
            key = data.draw(st.sampled_from([*sorted(PARAM_RANGES), "max_tokens"]))
            if key == "max_tokens":
                wrong = st.integers(-(2**63), 0) | st.integers(self.run.limits.max_tokens + 1, 2**63)
                params[key] = data.draw(wrong)
            else:
                params[key] = data.draw(PARAM_RANGES[key][1])
        return params

    def draw_open(self, data: st.DataObject) -> Probe:
        free_names = [n for n in SESSION_NAMES if n not in self.model.sessions]
        name = pick(data, free_names, self.draw_session(data))
        frame: dict[str, Any] = {"type": "open", "session": name}
        way = data.draw(st.integers(0, 9))
        if way >= 6:
            frame["chat"] = self.draw_chat_ref(data)
        if data.draw(st.integers(0, 9)) == 0:
            frame["model"] = data.draw(st.just(self.run.limits.model) | st.text(max_size=10))
        if data.draw(st.integers(0, 3)) == 0:
            frame["system"] = data.draw(short_texts | huge_texts) if data.draw(st.integers(0, 9)) else ""
        if data.draw(st.integers(0, 3)) == 0:
            frame["title"] = data.draw(
                short_texts | st.builds(lambda c, n: c * n, CHARS, st.integers(190, 200))
            )
        chance = data.draw(st.integers(0, 9))
        if chance < 4:
            max_tokens = data.draw(st.none() | st.integers(1, self.run.limits.max_tokens))
            frame["params"] = self.draw_params(data, in_range=chance > 0, max_tokens=max_tokens)
        if data.draw(st.integers(0, 9)) == 0:
            frame["resume"] = {
                "message": self.draw_message_ref(data),
                "index": data.draw(st.integers(0, 2**62)),
            }
        return self.wellformed(data, frame)

    def draw_send(self, data: st.DataObject, name: str) -> Probe:
        how = data.draw(st.integers(0, 19))
        huge = False
        text = data.draw(huge_texts) if how == 0 else data.draw(short_texts)  # huge: no context holds it
        if how == 1:
            params = self.draw_params(data, in_range=False, max_tokens=data.draw(st.integers(1, 4)))
        elif how == 2:  # a long one: another send to the session is busy; the batch stops it
            params, huge = self.draw_params(data, in_range=True, max_tokens=200), True
        else:
            params = self.draw_params(data, in_range=True, max_tokens=data.draw(st.integers(1, 4)))
        return self.wellformed(
            data, {"type": "send", "session": name, "text": text, "params": params}, huge_send=huge
        )


async def close_probe(url: str, before: list[str], offending: str | bytes, *, binary: bool) -> int:
    """Send ``before``, then the offending frame; the close code the server ends with."""
    client = await connect(url)
    try:
        for raw in before:
            await client.send_raw(raw)
        if isinstance(offending, bytes) and not binary:
            await client.ws.send(offending, text=True)  # not UTF-8, sent as a text frame
        else:
            await client.send_raw(offending)
        with pytest.raises(ConnectionClosed) as closed:
            await client.wait_for(lambda f: False)  # everything, until the close
    finally:
        await client.close()
    close = closed.value.rcvd
    assert close is not None, "the server dropped the connection without a close frame"
    if binary:  # closed by the server's reader: what came before was answered first
        assert len(client.received) == len(before), client.received
    return close.code


# ---- the well-behaved session -------------------------------------------------------------------


async def stream_steadily(url: str, run: FuzzRun, stop: asyncio.Event) -> None:
    """Greedy two-turn chats in fresh sessions, one after the other, each reply checked."""
    client = await connect(url)
    await client.hello(client="steady")
    n = 0
    try:
        while not stop.is_set():
            name = f"steady-{n}"
            chat = (await client.open(name))["chat"]
            for turn, prompt in enumerate(STEADY_PROMPTS):
                reply = await client.chat(name, prompt, temperature=0, max_tokens=STEADY_TOKENS)
                check_reply(reply, name)
                history = await client.request({"type": "history", "chat": chat})
                stored = history["messages"][-1]
                assert (stored["role"], stored["status"], stored["text"]) == (
                    "assistant",
                    "complete",
                    reply.text,
                )
                run.steady.texts.setdefault(turn, set()).add(reply.text)
                run.steady.count(run.fuzzing)
            assert (await client.request({"type": "close", "session": name}))["type"] == "closed"
            n += 1
    finally:
        await client.close()


def check_reply(reply: Reply, session: str) -> None:
    index = 0
    for token in reply.tokens:
        assert (token["session"], token["index"]) == (session, index), reply
        index += token.get("tokens", 1)
    done = reply.done
    assert done["message"] == reply.started["message"], reply
    assert done["reason"] in ("stop", "length"), reply
    eos = done["reason"] == "stop"  # an end-of-sequence token counts, with no frame (see _done)
    assert done["usage"]["completion_tokens"] in (index, index + eos), reply
    assert done["usage"]["completion_tokens"] <= STEADY_TOKENS, reply


async def connect(url: str) -> Client:
    """A client without keepalive pings: their payloads come from the ``random`` module, which
    hypothesis, drawing in the other thread, would take for a strategy using it."""
    return await Client.connect(url, ping_interval=None)


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


# ---- the test ------------------------------------------------------------------------------------


async def test_fuzzed_frames_are_answered_and_a_steady_session_streams_on(
    start_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """10,000+ frames of junk and out-of-order traffic: each gets the answer or close code the
    model predicts, the server never fails, and another connection streams undisturbed."""
    caplog.set_level(logging.WARNING)
    async with start_service() as server:
        url = ws_url(server)
        settings_ = server.settings.server
        welcome = await probe_welcome(url)
        (model,) = [m for m in welcome["models"] if m["default"]]
        limits = Limits(
            context=model["context_length"],
            max_sessions=settings_.max_sessions,
            max_tokens=settings_.max_tokens,
            max_frame_bytes=settings_.max_frame_bytes,
            model=model["id"],
            welcome_models=welcome["models"],
        )
        run = FuzzRun(asyncio.get_running_loop(), url, limits, Steady())
        stop_steady = asyncio.Event()
        steady = asyncio.create_task(stream_steadily(url, run, stop_steady))
        await asyncio.wait_for(run.steady.beyond(0), TIMEOUT_S)  # streaming before the fuzzing starts

        run.fuzzing = True
        try:
            await asyncio.to_thread(
                run_state_machine_as_test, lambda: FuzzConnection(run), settings=FUZZ_SETTINGS
            )
        except BaseException:
            stop_steady.set()  # the service is about to stop under it
            steady.cancel()
            await asyncio.wait([steady], timeout=TIMEOUT_S)
            raise
        run.fuzzing = False
        stop_steady.set()
        await asyncio.wait_for(steady, 4 * TIMEOUT_S)

        print(
            f"\nfuzz: {run.frames} frames (and a ping after each of {run.batches} batches) on "
            f"{run.examples} connections; "
            f"answers {dict(run.outcomes)}; closes {dict(run.close_codes)}; "
            f"steady replies {run.steady.replies} ({run.steady.during_fuzz} while fuzzing)"
        )
        assert run.frames >= MIN_FRAMES
        codes = {k.removeprefix("error:") for k in run.outcomes if k.startswith("error:")}
        assert codes >= {
            "bad_frame", "unknown_type", "unauthenticated", "unknown_session", "session_exists", "busy",
            "bad_params", "not_found", "limit", "model_unavailable",
        }, codes  # fmt: skip
        assert set(run.close_codes) == {1003, 1007, 1009}
        # Streamed all along, and the fuzzing changed nothing: greedy replies stayed identical.
        assert run.steady.during_fuzz >= run.examples
        assert all(len(texts) == 1 for texts in run.steady.texts.values()), run.steady.texts

        # The server is whole: a fresh connection is served, /healthz answers, nothing leaked.
        fresh = await connect(url)
        await fresh.hello()
        assert (await fresh.request({"type": "ping"}))["type"] == "pong"
        await fresh.close()
        assert await asyncio.to_thread(_get, server.port, "/healthz") == 200
        await asyncio.wait_for(server.wait_connections(0), TIMEOUT_S)
        assert server.connection_count == 0
        await asyncio.wait_for(server.idle(), TIMEOUT_S)
    # Nothing failed in the server but the known bugs, each logged once.
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    known = [r for r in failures if r.exc_info is not None and isinstance(r.exc_info[1], StoreError)]
    assert len(known) == sum(n for k, n in run.outcomes.items() if k.startswith("known bug")), known
    assert len(known) == len(failures), "\n".join(r.getMessage() for r in failures if r not in known)


async def probe_welcome(url: str) -> Frame:
    client = await connect(url)
    try:
        return await client.hello()
    finally:
        await client.close()
