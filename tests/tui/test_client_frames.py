"""The client side of the codec: frames the TUI sends parse back to themselves."""

from __future__ import annotations

import orjson
import pytest

from service.protocol import codec, frames

FRAMES: list[frames.ClientFrame] = [
    frames.Hello(id="hello", token="t0k", client="localchat-tui"),
    frames.Hello(id=None, token=None, client=None),
    frames.Open(
        id="c1",
        session="s1",
        chat=None,
        model="tiny",
        system=None,
        title="A title",
        params=frames.Params(temperature=0.0, max_tokens=12, stop=("\n\n",)),
        resume=None,
    ),
    frames.Open(
        id=7,
        session="s2",
        chat="0b6f0c55-5f3c-4a0e-9d77-8a3c25f1b9a1",
        model=None,
        system=None,
        title=None,
        params=frames.Params(),
        resume=frames.Resume("m1", 5),
    ),
    frames.Send(id="c2", session="s1", text="Hi\nthere", params=frames.Params(seed=3)),
    frames.Stop(id=None, session="s1"),
    frames.Close(id="c3", session="s1"),
    frames.ListModels(id="c4"),
    frames.ListChats(id="c5", limit=20, before=None),
    frames.GetHistory(id="c6", chat="c", limit=None, before=None),
    frames.Delete(id="c7", chat="c"),
    frames.Ping(id="c8"),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_encoded_client_frames_parse_back_to_themselves(frame: frames.ClientFrame) -> None:
    """encode_client_frame is the inverse of parse_client_frame."""
    assert codec.parse_client_frame(codec.encode_client_frame(frame)) == frame


def test_unset_fields_are_left_out() -> None:
    """Fields left None and empty params are not sent at all."""
    encoded = orjson.loads(
        codec.encode_client_frame(frames.Send(id=None, session="s", text="x", params=frames.Params()))
    )
    assert encoded == {"type": "send", "session": "s", "text": "x"}
