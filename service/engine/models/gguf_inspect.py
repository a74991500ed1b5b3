"""What a GGUF file holds, and whether this service can run it (``python -m service models inspect``)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, TypedDict

from gguf import GGMLQuantizationType, LlamaFileType

from service.engine.models.gguf_metadata import GGUFMetadata, read_metadata
from service.engine.models.gguf_source import GGUFSource
from service.engine.models.gguf_tokenizer import SUPPORTED_TOKENIZER_KINDS, GGUFTokenizerSpec
from service.errors import ModelError

if TYPE_CHECKING:
    from pathlib import Path


class TokenizerReport(TypedDict):
    kind: str  # tokenizer.ggml.model: gpt2 (byte-level BPE), llama (SentencePiece BPE), ...
    pre: str
    vocab_size: int
    add_bos: bool
    bos: str | None
    end_tokens: list[str]


class Report(TypedDict):
    file: str
    file_bytes: int
    gguf_version: int
    name: str | None
    architecture: str | None
    file_type: str | None
    parameters: int
    tensors: int
    quantization_types: dict[str, int]  # ggml type name: how many tensors
    layers: int | None
    hidden_size: int | None
    heads: int | None
    kv_heads: int | None
    context_length: int | None
    tokenizer: TokenizerReport | None
    chat_template: bool
    runnable: bool
    reason: str | None  # why not, when not runnable


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def _file_type(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {value}"


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _tokenizer(meta: GGUFMetadata) -> tuple[TokenizerReport | None, str | None]:
    """The tokenizer's summary, and why this service cannot use it (None: it can)."""
    if meta.get("tokenizer.ggml.model") is None:
        return None, "the file has no tokenizer"
    spec = GGUFTokenizerSpec.from_fields(meta.fields)
    report = TokenizerReport(
        kind=spec.model,
        pre=spec.pre,
        vocab_size=len(spec.tokens),
        add_bos=spec.add_bos,
        bos=spec.token(spec.bos_id),
        end_tokens=[spec.tokens[i] for i in spec.end_ids()],
    )
    if spec.model not in SUPPORTED_TOKENIZER_KINDS:
        supported = ", ".join(SUPPORTED_TOKENIZER_KINDS)
        return report, f"tokenizer kind {spec.model!r} is not supported (supported: {supported})"
    return report, None


def _why_not_runnable(path: Path, meta: GGUFMetadata, tokenizer_problem: str | None) -> str | None:
    if not meta.tensors:
        return "a vocabulary-only file: it has no weights"
    if tokenizer_problem is not None:
        return tokenizer_problem
    try:
        GGUFSource(path)  # the builder's own checks: architecture, quantization types, tensors
    except ModelError as exc:
        return str(exc)
    return None


def inspect_gguf(path: Path) -> Report:
    """Describe ``path``; raises ``GGUFFormatError`` (a ``ValueError``) for a file that is not GGUF."""
    meta = read_metadata(path)
    arch = meta.get("general.architecture")

    def arch_key(key: str) -> Any:
        return meta.get(f"{arch}.{key}")

    tokenizer, problem = _tokenizer(meta)
    reason = _why_not_runnable(path, meta, problem)
    return Report(
        file=str(path),
        file_bytes=path.stat().st_size,
        gguf_version=meta.version,
        name=meta.get("general.name"),
        architecture=arch,
        file_type=_file_type(meta.get("general.file_type")),
        parameters=sum(t.elements for t in meta.tensors),
        tensors=len(meta.tensors),
        quantization_types=dict(Counter(_type_name(t.type_id) for t in meta.tensors).most_common()),
        layers=_int(arch_key("block_count")),
        hidden_size=_int(arch_key("embedding_length")),
        heads=_int(arch_key("attention.head_count")),
        kv_heads=_int(arch_key("attention.head_count_kv")),
        context_length=_int(arch_key("context_length")),
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template") is not None,
        runnable=reason is None,
        reason=reason,
    )
