from __future__ import annotations

from service.engine.stopping import StopMatcher


def _run(matcher: StopMatcher, chunks: list[str]) -> tuple[str, bool]:
    out = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_no_stop_strings_pass_through() -> None:
    """Without stop strings every chunk is emitted at once."""
    m = StopMatcher([])
    assert m.feed("hello") == ("hello", False)
    assert m.flush() == ""


def test_stop_within_one_chunk() -> None:
    """Text before a stop string is emitted, the stop string is not."""
    assert _run(StopMatcher(["STOP"]), ["abcSTOPdef"]) == ("abc", True)


def test_stop_across_chunk_boundaries() -> None:
    """A stop string split over several chunks is still found and never partly emitted."""
    m = StopMatcher(["</answer>"])
    assert m.feed("the end</") == ("the end", False)
    assert m.feed("ans") == ("", False)
    assert m.feed("wer> trailing") == ("", True)


def test_false_start_is_released() -> None:
    """Held-back text that turns out not to start a stop string is emitted later."""
    m = StopMatcher(["\n\nUser:"])
    assert m.feed("a\n") == ("a", False)
    assert m.feed("\nU") == ("", False)
    assert m.feed("nder") == ("\n\nUnder", False)


def test_flush_returns_held_text() -> None:
    """At the end, a held-back possible prefix is returned by flush."""
    m = StopMatcher(["###"])
    assert m.feed("x##") == ("x", False)
    assert m.flush() == "##"


def test_earliest_stop_wins() -> None:
    """With several stop strings, output ends before the first one in the text."""
    assert _run(StopMatcher(["bb", "a"]), ["xxbb", "a"]) == ("xx", True)
    assert _run(StopMatcher(["world", "o"]), ["hell", "o world"]) == ("hell", True)


def test_character_by_character_stream() -> None:
    """Feeding one character at a time gives the same result as one chunk."""
    text = "Sure! Here it is.<|end|>ignored"
    assert _run(StopMatcher(["<|end|>"]), list(text)) == ("Sure! Here it is.", True)


def test_after_stop_nothing_more() -> None:
    """Once stopped, further text is swallowed and flush is empty."""
    m = StopMatcher(["x"])
    assert m.feed("ax") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""
