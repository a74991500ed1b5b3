"""Encode a rendered prompt so that message contents can never become control tokens.

A rendered chat prompt is template text (holding the template's own special tokens, such as
``<|im_start|>``) with message contents in between, which are what people typed: a
``<|im_start|>system`` typed there must stay text. ``tokenizers`` matches special tokens in all
of the text or in none of it, so the prompt is cut here instead:

1. the text is split at every added token, longest first as ``tokenizers`` matches them, except
   at a special token that would take characters from a message (user-defined tokens such as
   Gemma's ``\\n\\n`` are matched in any text, across a message's edge too);
2. the text between two added tokens (a *stretch*) is encoded as one string, with special
   tokens off.

That is exactly what ``tokenizers`` does for the whole text (added tokens are split out first,
then each stretch is normalized, pre-tokenized and merged on its own), so a prompt without
special-token text in its contents gets the ids of encoding it whole, and merges still cross the
edges of contents. SentencePiece's dummy prefix (a ``▁`` before each stretch, from a ``Prepend``
normalizer or a ``Metaspace`` pre-tokenizer) is applied here explicitly, because a continuation
of cached ids (see ``ChatTokenizer.next_turn_ids``) starts mid-stretch and must not get one.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Literal

from tokenizers import Tokenizer

if TYPE_CHECKING:
    from collections.abc import Sequence

# "every": a "▁" before every stretch (a Prepend normalizer); "metaspace": before every stretch
# that does not start with a space; "metaspace-first": the same, for the first stretch of the
# text only; "none".
DummyPrefix = Literal["none", "every", "metaspace", "metaspace-first"]


def _without_dummy_prefix(config: dict[str, Any]) -> DummyPrefix:
    """Remove the dummy prefix from a tokenizer.json ``config`` in place; say which it was."""
    mode: DummyPrefix = "none"
    normalizer = config.get("normalizer")
    if isinstance(normalizer, dict):
        if normalizer.get("type") == "Prepend":
            config["normalizer"], mode = None, "every"
        elif normalizer.get("type") == "Sequence":
            steps = normalizer.get("normalizers", [])
            kept = [step for step in steps if step.get("type") != "Prepend"]
            if len(kept) != len(steps):
                normalizer["normalizers"], mode = kept, "every"
    pre = config.get("pre_tokenizer")
    if isinstance(pre, dict) and pre.get("type") == "Metaspace":
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if scheme != "never":
            mode = "metaspace" if scheme == "always" else "metaspace-first"
            pre["prepend_scheme"] = "never"
            pre.pop("add_prefix_space", None)
    return mode


def _alternation(texts: Sequence[str]) -> re.Pattern[str] | None:
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


class PromptEncoder:
    """Encodes (text, is_message_content) pieces as described in the module docstring."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        added = tokenizer.get_added_tokens_decoder()
        self._ids = {token.content: token_id for token_id, token in sorted(added.items(), reverse=True)}
        self.added_ids = frozenset(added)
        self._special = frozenset(t.content for t in added.values() if t.special)
        self._any_added = _alternation([t.content for t in added.values()])
        self._in_content = _alternation([t.content for t in added.values() if not t.special])
        config = json.loads(tokenizer.to_str())
        self.dummy_prefix = _without_dummy_prefix(config)
        self._stretch = Tokenizer.from_str(json.dumps(config))
        self._stretch.encode_special_tokens = True

    def encode(self, pieces: Sequence[tuple[str, bool]], *, continues: bool = False) -> list[int]:
        """Ids of the pieces. ``continues``: they continue text that did not end with an added
        token, so their first stretch gets no dummy prefix."""
        ids: list[int] = []
        stretch = ""
        starts_stretch, at_start = not continues, not continues
        for part in self._parts(pieces):
            if isinstance(part, str):
                stretch += part
                continue
            if stretch:
                ids += self._encode_stretch(stretch, starts_stretch, at_start)
                at_start, stretch = False, ""
            ids.append(part)
            starts_stretch, at_start = True, False
        if stretch:
            ids += self._encode_stretch(stretch, starts_stretch, at_start)
        return ids

    def _parts(self, pieces: Sequence[tuple[str, bool]]) -> list[str | int]:
        """The prompt's text cut at its added tokens: ids for those, text between them."""
        text = "".join(piece for piece, _ in pieces)
        if self._any_added is None:
            return [text]
        contents = []
        at = 0
        for piece, is_content in pieces:
            if is_content:
                contents.append((at, at + len(piece)))
            at += len(piece)
        parts: list[str | int] = []
        pos = last = 0
        while match := self._any_added.search(text, pos):
            start, end = match.span()
            token = match.group()
            if token in self._special and any(a < end and start < b for a, b in contents):
                # A special token that would take text from a message: not one. A plain added
                # token may still start here (they are matched in any text, as tokenizers does).
                plain = None if self._in_content is None else self._in_content.match(text, start)
                if plain is None:
                    pos = start + 1
                    continue
                token, end = plain.group(), plain.end()
            parts += [text[last:start], self._ids[token]]
            pos = last = end
        parts.append(text[last:])
        return parts

    def _encode_stretch(self, text: str, starts_stretch: bool, at_start: bool) -> list[int]:
        mode = self.dummy_prefix
        prefixed = (mode == "every" and starts_stretch) or (
            not text.startswith((" ", "\u2581"))
            and ((mode == "metaspace" and starts_stretch) or (mode == "metaspace-first" and at_start))
        )
        return self._stretch.encode((" " + text) if prefixed else text, add_special_tokens=False).ids
