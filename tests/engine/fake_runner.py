"""A ``ModelRunner`` with no model, and a byte-level tokenizer with no files, for engine tests.

The fake's "KV cache" holds, per slot and position, the token computed there and how: in
prompt mode (a chunk of two or more tokens, or position 0) or in decode mode (one token
after position 0). Its logits are random, seeded by a hash of everything the slot holds up
to the step's position, modes included. So, like the real model after int8 rounding, a
cache holding a wrong token, a stale position or a decode-mode position where a recompute
would hold a prompt-mode one continues differently, and a test comparing against a
recompute sees it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from service.engine.model_runner import ModelShape
from service.engine.tokenizer import ChatTokenizer

PROMPT, DECODE = 1, 2
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer() -> ChatTokenizer:
    """Byte-level BPE without merges: one token per byte, plus the two ChatML markers."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[IM_START], vocab[IM_END] = 256, 257
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([IM_START, IM_END])
    return ChatTokenizer(tokenizer, chat_template=CHATML, eos_token_ids=frozenset({257}), eos_token=IM_END)


@dataclass
class FakeRunner:
    """Implements ``service.engine.model_runner.ModelRunner``; records what it was asked."""

    slots: int
    max_len: int
    tokenizer: ChatTokenizer
    device: str = "fake"
    forwards: list[tuple[int, int, int]] = field(default_factory=list)  # (first slot, batch, seq)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src, dst, length)
    # 8 KiB per position, so that a budget of 1 MiB holds 128 positions
    shape: ModelShape = field(
        default_factory=lambda: ModelShape(num_layers=1, num_kv_heads=1, head_dim=1024, vocab_size=258)
    )

    def __post_init__(self) -> None:
        self.kv = np.full((self.slots, self.max_len), -1, dtype=np.int64)
        self.mode = np.zeros((self.slots, self.max_len), dtype=np.int64)
        # Replies are lower-case letters and spaces: printable, never an end of sequence.
        self._choices = np.asarray(
            [self.tokenizer.tokenizer.token_to_id(ch) for ch in "abcdefghijklmnopqrstuvwxyz"]
            + [self.tokenizer.encode(" ")[0]],
            dtype=np.int64,
        )
        self._logits = np.zeros((self.slots, self.shape.vocab_size), dtype=np.float32)

    def forward(self, first_slot: int, tokens: np.ndarray, past_lengths: Sequence[int]) -> np.ndarray:
        batch, seq = tokens.shape
        assert batch == 1 or seq == 1
        assert first_slot >= 0
        assert first_slot + batch <= self.slots
        self.forwards.append((first_slot, batch, seq))
        logits = self._logits[:batch]
        logits.fill(-30.0)
        for b in range(batch):
            slot, past = first_slot + b, int(past_lengths[b])
            end = past + seq
            assert end <= self.max_len
            self.kv[slot, past:end] = tokens[b]
            self.mode[slot, past:end] = DECODE if seq == 1 and past > 0 else PROMPT
            digest = hashlib.blake2b(self.kv[slot, :end].tobytes() + self.mode[slot, :end].tobytes()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            logits[b, self._choices] = rng.normal(0.0, 2.0, len(self._choices))
        return logits

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.copies.append((src, dst, length))
        self.kv[dst, :length] = self.kv[src, :length]
        self.mode[dst, :length] = self.mode[src, :length]

    def swap_slots(self, a: int, b: int, length_a: int, length_b: int) -> None:
        n = max(length_a, length_b)
        for array in (self.kv, self.mode):
            array[[a, b], :n] = array[[b, a], :n]

    def release_slot(self, slot: int) -> None:
        self.kv[slot] = -1
        self.mode[slot] = 0
