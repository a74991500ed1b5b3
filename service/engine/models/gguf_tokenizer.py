"""Turn a GGUF file's tokenizer metadata into a Hugging Face ``tokenizers`` tokenizer.

Two kinds of vocabulary (``tokenizer.ggml.model``) are built, both as ``tokenizers`` pipelines so
that encoding runs in Rust:

- ``gpt2``: byte-level BPE with the file's merges. ``tokenizer.ggml.pre`` names the split
  llama.cpp applies before BPE (Llama 3's, Qwen2's, SmolLM's digits, GPT-2's); the tables below
  map those names onto the same split.
- ``llama``: SentencePiece BPE (Llama 2, Mistral, TinyLlama, Gemma). Spaces are written ``▁``,
  a space is prepended to each stretch of text when ``tokenizer.ggml.add_space_prefix`` says so
  (the default),
  characters missing from the vocabulary fall back to their UTF-8 bytes (``<0xE2>`` …), and the
  merges, which these files do not store, are recovered from the vocabulary: a token is made of
  two smaller tokens, and higher-priority tokens merge first (priority: the token's score, or its
  position in the file for Gemma, whose scores do not follow its merge order).

For both, tokens typed ``control`` become special added tokens and ``user-defined`` ones plain
added tokens (matched whole, never split), and the file's BOS/EOS flags become the
post-processor. The behaviour follows what transformers builds from the same file
(``integrations/gguf``), which the tests compare against, except where transformers is known to
differ from the model's original tokenizer.json (and from llama.cpp): Llama 3's
``ignore_merges``, SmolLM's digit split, and SentencePiece's dummy prefix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from service.engine.models.gguf_metadata import read_metadata

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

log = logging.getLogger(__name__)

# gguf.TokenType values (kept local so this module does not need the gguf package).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_BYTE = 6

SUPPORTED_TOKENIZER_KINDS = ("gpt2", "llama")

# transformers writes this when a tokenizer has no known length limit.
_UNKNOWN_MAX_LENGTH = int(1e30)
_SPIECE_SPACE = "\u2581"

# Control tokens that end a turn, by text, as llama.cpp's vocabulary loader lists them (files often
# carry only one end id; the others are found by name).
_END_TOKEN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
        "_<EOT>",
        "<｜end▁of▁sentence｜>",
    }
)

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# llama.cpp groups these under one regex pair: single digits, then the GPT-2 pattern.
_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
_LLAMA3 = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"})
_QWEN2 = frozenset({"qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"})
_GPT2 = frozenset({"default", "gpt-2", "gpt2", "olmo", "jais"})

# SentencePiece vocabularies whose merge order is the file order rather than the scores.
_MERGE_BY_POSITION_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})


def _byte_alphabet() -> frozenset[str]:
    return frozenset(pre_tokenizers.ByteLevel.alphabet())


@dataclass(frozen=True, slots=True)
class GGUFTokenizerSpec:
    """The tokenizer-related values of one GGUF file."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] = field(default_factory=list)
    architecture: str = "llama"
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True
    chat_template: str | None = None
    context_length: int | None = None

    @classmethod
    def from_reader(cls, reader: Any) -> GGUFTokenizerSpec:
        """Read the spec from a ``gguf.GGUFReader`` (slow on big vocabularies: prefer ``read``)."""

        def value(key: str) -> Any:
            entry = reader.fields.get(key)
            return None if entry is None else entry.contents()

        return cls._from_values(value)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> GGUFTokenizerSpec:
        """Read the spec from metadata key-values (``gguf_metadata.read_metadata(...).fields``)."""
        return cls._from_values(fields.get)

    @classmethod
    def _from_values(cls, value: Callable[[str], Any]) -> GGUFTokenizerSpec:
        arch = str(value("general.architecture") or "llama")
        model = value("tokenizer.ggml.model")
        if model is None:
            raise ValueError("the file has no tokenizer (no tokenizer.ggml.model)")
        context = value(f"{arch}.context_length")
        add_bos = value("tokenizer.ggml.add_bos_token")
        add_prefix = value("tokenizer.ggml.add_space_prefix")
        return cls(
            model=str(model),
            pre=str(value("tokenizer.ggml.pre") or "default"),
            tokens=list(value("tokenizer.ggml.tokens") or []),
            token_types=[int(t) for t in value("tokenizer.ggml.token_type") or []],
            merges=list(value("tokenizer.ggml.merges") or []),
            scores=[float(s) for s in value("tokenizer.ggml.scores") or []],
            architecture=arch,
            bos_id=value("tokenizer.ggml.bos_token_id"),
            eos_id=value("tokenizer.ggml.eos_token_id"),
            eot_id=value("tokenizer.ggml.eot_token_id"),
            eom_id=value("tokenizer.ggml.eom_token_id"),
            unk_id=value("tokenizer.ggml.unknown_token_id"),
            pad_id=value("tokenizer.ggml.padding_token_id"),
            # A SentencePiece file that does not say gets a BOS, as llama.cpp and transformers do.
            add_bos=bool(add_bos) if add_bos is not None else model == "llama",
            add_eos=bool(value("tokenizer.ggml.add_eos_token")),
            add_space_prefix=bool(add_prefix) if add_prefix is not None else model == "llama",
            chat_template=value("tokenizer.chat_template"),
            context_length=None if context is None else int(context),
        )

    def token(self, token_id: int | None) -> str | None:
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]

    def end_ids(self) -> list[int]:
        """Every id that ends a generation: EOS, EOT, EOM, and control tokens named like an end.

        ``tokenizer.ggml.eos_token_id`` alone is often the end of a *document* (Llama 3's
        ``<|end_of_text|>``), while a chat turn ends with another token (``<|eot_id|>``,
        Gemma's ``<end_of_turn>``); stopping on only one of them runs past the reply.
        """
        named = (self.eos_id, self.eot_id, self.eom_id)
        ids = {i for i in named if i is not None and self.token(i) is not None}
        for token_id, (text, kind) in enumerate(zip(self.tokens, self.token_types, strict=True)):
            if text in _END_TOKEN_TEXTS and kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                ids.add(token_id)
        return sorted(ids)


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None, bool]:
    """Return (pre-tokenizer, normalizer, ignore_merges) for a llama.cpp ``pre`` name."""
    if pre in _DIGITS_THEN_GPT2:
        seq = [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
        return pre_tokenizers.Sequence(seq), None, False
    if pre in _LLAMA3 or pre in _QWEN2:
        regex = _LLAMA3_REGEX if pre in _LLAMA3 else _QWEN2_REGEX
        seq = [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
        normalizer = normalizers.NFC() if pre in _QWEN2 else None
        return pre_tokenizers.Sequence(seq), normalizer, pre in _LLAMA3
    if pre not in _GPT2:
        log.warning("unknown GGUF pre-tokenizer %r: using the plain GPT-2 byte-level split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None, False


def _bos_eos_template(spec: GGUFTokenizerSpec) -> processors.TemplateProcessing | None:
    bos, eos = spec.token(spec.bos_id), spec.token(spec.eos_id)
    single, pair, specials = ["$A:0"], ["$A:0", "$B:1"], []
    if spec.add_bos and bos is not None and spec.bos_id is not None:
        single.insert(0, f"{bos}:0")
        pair = [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        specials.append((bos, spec.bos_id))
    if spec.add_eos and eos is not None and spec.eos_id is not None:
        single.append(f"{eos}:0")
        pair.insert(pair.index("$B:1"), f"{eos}:0")
        pair.append(f"{eos}:1")
        specials.append((eos, spec.eos_id))
    if not specials:
        return None
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for token_id, text in enumerate(tokens):
        vocab.setdefault(text, token_id)  # a repeated spelling keeps its first id
    return vocab


def _byte_level_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    pre, normalizer, ignore_merges = _pre_tokenizer(spec.pre)
    model = BPE(
        vocab=_vocab(spec.tokens),
        merges=merges,  # type: ignore[arg-type]  # the stub wants list[tuple[str, str]]
        unk_token=None,
        byte_fallback=False,
        ignore_merges=ignore_merges,
    )
    tokenizer = Tokenizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre
    tokenizer.decoder = decoders.ByteLevel()
    byte_level = processors.ByteLevel(trim_offsets=False)
    template = _bos_eos_template(spec)
    tokenizer.post_processor = byte_level if template is None else processors.Sequence([byte_level, template])
    return tokenizer


def _sentencepiece_tokens(spec: GGUFTokenizerSpec) -> list[str]:
    """The tokens as the tokenizer looks them up: a token of plain spaces (Gemma stores "  ")
    is spelled with ``▁``, since the text it must match has its spaces replaced."""
    return [_SPIECE_SPACE * len(t) if t and not t.strip(" ") else t for t in spec.tokens]


def _recovered_merges(spec: GGUFTokenizerSpec, tokens: list[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary.

    Every split of a token into two tokens of the vocabulary is a merge. Merges are ranked by the
    priority of the token they make (best first), then by the longer left part; a token's own
    splits keep the order of their parts' ids. Control, unknown and byte tokens are never merge
    results, so text can never be merged into a control token.
    """
    vocab = _vocab(tokens)
    by_position = spec.architecture in _MERGE_BY_POSITION_ARCHS or len(spec.scores) != len(tokens)
    ranked: list[tuple[float, int, int, int, int, str, str]] = []
    for token_id, text in enumerate(tokens):
        if (
            spec.token_types[token_id] in (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE)
            or vocab[text] != token_id
        ):
            continue
        priority = -float(token_id) if by_position else spec.scores[token_id]
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            left_id, right_id = vocab.get(left), vocab.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-priority, -len(left), -len(right), left_id, right_id, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    tokens = _sentencepiece_tokens(spec)
    unk = spec.token(spec.unk_id)
    model = BPE(
        vocab=_vocab(tokens),
        merges=_recovered_merges(spec, tokens),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    # SentencePiece's dummy prefix: "▁" before every stretch of text between added tokens, even one
    # that starts with a space (" hi" is "▁▁hi"), as llama.cpp does and as the original Llama 2 and
    # Phi-3 tokenizer.json files do (transformers' GGUF reader uses Metaspace, which prepends only
    # to the start of the text and not to text that already starts with a space).
    replace = normalizers.Replace(" ", _SPIECE_SPACE)
    if spec.add_space_prefix:
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(_SPIECE_SPACE), replace])
    else:
        tokenizer.normalizer = replace
    steps = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    template = _bos_eos_template(spec)
    if template is not None:
        tokenizer.post_processor = template
    return tokenizer


def _added_tokens(spec: GGUFTokenizerSpec) -> list[AddedToken]:
    """Control tokens and the unknown token (special) and user-defined ones (plain), matched
    whole in the text.

    In a byte-level vocabulary every real token is spelled in the byte alphabet; one typed
    control that is not is a converter's mislabel and is left out, as transformers does.
    """
    alphabet = _byte_alphabet() if spec.model == "gpt2" else None
    added = []
    for text, kind in zip(spec.tokens, spec.token_types, strict=True):
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN) and (alphabet is None or set(text) <= alphabet):
            added.append(AddedToken(text, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED and (spec.model == "gpt2" or text.strip(" ")):
            added.append(AddedToken(text, special=False, normalized=False))
    return added


def build_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    """Build the ``tokenizers`` pipeline equivalent to the file's vocabulary."""
    if spec.model not in SUPPORTED_TOKENIZER_KINDS:
        raise NotImplementedError(
            f"GGUF tokenizer model {spec.model!r} is not supported "
            "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)"
        )
    if len(spec.token_types) != len(spec.tokens):
        raise ValueError("GGUF token_type and tokens differ in length")
    build = _byte_level_tokenizer if spec.model == "gpt2" else _sentencepiece_tokenizer
    tokenizer = build(spec)
    tokenizer.add_tokens(_added_tokens(spec))
    return tokenizer


def _added_tokens_decoder(spec: GGUFTokenizerSpec) -> dict[str, dict[str, object]]:
    return {
        str(i): {
            "content": spec.tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t != TOKEN_USER_DEFINED,
        }
        for i, t in enumerate(spec.token_types)
        if t in (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED)
    }


def tokenizer_config(spec: GGUFTokenizerSpec) -> dict[str, object]:
    """The ``tokenizer_config.json`` content transformers would expect for this spec."""
    return {
        "add_bos_token": spec.add_bos,
        "add_eos_token": spec.add_eos,
        "added_tokens_decoder": _added_tokens_decoder(spec),
        "bos_token": spec.token(spec.bos_id),
        "eos_token": spec.token(spec.eos_id),
        "pad_token": spec.token(spec.pad_id),
        "unk_token": spec.token(spec.unk_id),
        "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.context_length or _UNKNOWN_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def generation_config(spec: GGUFTokenizerSpec) -> dict[str, object]:
    """``generation_config.json``: the ids that end a generation (see ``end_ids``)."""
    return {"bos_token_id": spec.bos_id, "eos_token_id": spec.end_ids(), "pad_token_id": spec.pad_id}


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_dir(spec: GGUFTokenizerSpec, out_dir: Path) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(spec).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(spec))
    _write_json(out_dir / "generation_config.json", generation_config(spec))


def read_gguf_tokenizer(gguf_path: Path) -> GGUFTokenizerSpec:
    """The tokenizer spec of ``gguf_path``; vocabulary-only files (no tensors) work too.

    Raises ``GGUFFormatError`` (a ``ValueError``) for a file that is not GGUF or has no tokenizer.
    """
    return GGUFTokenizerSpec.from_fields(read_metadata(gguf_path).fields)


def export_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> GGUFTokenizerSpec:
    """Read ``gguf_path`` and write its tokenizer into ``out_dir``; returns the spec read."""
    spec = read_gguf_tokenizer(gguf_path)
    write_tokenizer_dir(spec, out_dir)
    return spec
