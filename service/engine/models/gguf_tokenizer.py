"""Turn a GGUF file's tokenizer metadata into a Hugging Face tokenizer directory.

Only the ``gpt2`` (byte-level BPE) tokenizer model is supported. The GGUF ``pre``
field names the pre-tokenizer llama.cpp applies; the tables below map the common
names onto the equivalent ``tokenizers`` pipeline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

# gguf.TokenType values (kept local so this module does not need the gguf package).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# transformers writes this when a tokenizer has no known length limit.
_UNKNOWN_MAX_LENGTH = int(1e30)

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
_LLAMA3 = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"})
_QWEN2 = frozenset({"qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"})
_GPT2 = frozenset({"default", "gpt-2", "gpt2", "olmo", "jais"})


@dataclass(frozen=True, slots=True)
class GGUFTokenizerSpec:
    """The tokenizer-related values of one GGUF file."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    context_length: int | None = None

    @classmethod
    def from_reader(cls, reader: Any) -> GGUFTokenizerSpec:
        """Read the spec from a ``gguf.GGUFReader``."""
        fields = reader.fields

        def value(key: str) -> Any:
            field = fields.get(key)
            return None if field is None else field.contents()

        arch = value("general.architecture")
        context = value(f"{arch}.context_length") if arch else None
        return cls(
            model=str(value("tokenizer.ggml.model")),
            pre=str(value("tokenizer.ggml.pre") or "default"),
            tokens=list(value("tokenizer.ggml.tokens") or []),
            token_types=list(value("tokenizer.ggml.token_type") or []),
            merges=list(value("tokenizer.ggml.merges") or []),
            bos_id=value("tokenizer.ggml.bos_token_id"),
            eos_id=value("tokenizer.ggml.eos_token_id"),
            unk_id=value("tokenizer.ggml.unknown_token_id"),
            pad_id=value("tokenizer.ggml.padding_token_id"),
            add_bos=bool(value("tokenizer.ggml.add_bos_token")),
            add_eos=bool(value("tokenizer.ggml.add_eos_token")),
            chat_template=value("tokenizer.chat_template"),
            context_length=None if context is None else int(context),
        )

    def token(self, token_id: int | None) -> str | None:
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]


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


def _post_processor(spec: GGUFTokenizerSpec) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
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
        return byte_level
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return processors.Sequence([byte_level, template])


def build_tokenizer(spec: GGUFTokenizerSpec) -> Tokenizer:
    """Build the ``tokenizers`` pipeline equivalent to llama.cpp's for this spec."""
    if spec.model != "gpt2":
        raise NotImplementedError(
            f"GGUF tokenizer model {spec.model!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    if len(spec.token_types) != len(spec.tokens):
        raise ValueError("GGUF token_type and tokens differ in length")
    vocab: dict[str, int] = {}
    for token_id, text in enumerate(spec.tokens):
        vocab.setdefault(text, token_id)
    merges = [tuple(m.split(" ", 1)) for m in spec.merges]
    pre, normalizer, ignore_merges = _pre_tokenizer(spec.pre)
    model = BPE(
        vocab=vocab,
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
    tokenizer.post_processor = _post_processor(spec)
    added = [
        AddedToken(spec.tokens[i], special=t == _TOKEN_CONTROL, normalized=False)
        for i, t in enumerate(spec.token_types)
        if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    tokenizer.add_tokens(added)
    return tokenizer


def _added_tokens_decoder(spec: GGUFTokenizerSpec) -> dict[str, dict[str, object]]:
    return {
        str(i): {
            "content": spec.tokens[i],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t == _TOKEN_CONTROL,
        }
        for i, t in enumerate(spec.token_types)
        if t in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
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


def write_tokenizer_dir(spec: GGUFTokenizerSpec, out_dir: Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(spec).save(str(out_dir / "tokenizer.json"))
    config = json.dumps(tokenizer_config(spec), indent=2, ensure_ascii=False)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


def export_gguf_tokenizer(gguf_path: Path, out_dir: Path) -> GGUFTokenizerSpec:
    """Read ``gguf_path`` and write its tokenizer into ``out_dir``; returns the spec read."""
    from gguf import GGUFReader  # deferred: opening the package costs time callers may not need

    spec = GGUFTokenizerSpec.from_reader(GGUFReader(gguf_path))
    write_tokenizer_dir(spec, out_dir)
    return spec
