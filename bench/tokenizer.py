"""Tokenizer benchmark: reading a GGUF's metadata, building its tokenizer, encoding a corpus.

    .venv/bin/python bench/tokenizer.py FILE.gguf [FILE.gguf ...] [--repeat 3]
                                        [--out bench/results/tokenizer.json]

Per file, side by side in one run: our metadata reader (``gguf_metadata.read_metadata``)
against ``gguf.GGUFReader`` plus ``contents()`` of the tokenizer fields (what the builder used
before); building the ``tokenizers`` pipeline (for SentencePiece files that includes recovering
the merges); and encoding a mixed corpus (English, code, CJK, emoji; about 40 kB) with our
tokenizer against transformers' tokenizer from the same file, when the fidelity extra is
installed. Medians of ``--repeat`` runs. Prints a table and writes JSON (see bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/tokenizer.py
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import fmt, format_table, median, ratio, run_facts, write_json  # noqa: E402
from service.engine.models.gguf_metadata import read_metadata  # noqa: E402
from service.engine.models.gguf_tokenizer import GGUFTokenizerSpec, build_tokenizer  # noqa: E402

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it?\n"
    "def f(x: int) -> int:\n    return x ** 2  # square\n"
    "日本語のテキストです。中文文本，한국어 텍스트 😀👍🏽 naïve café\n"
) * 200

_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
)


def _timed(fn: Any, repeat: int) -> tuple[float | None, Any]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return median(times), result


def _gguf_reader(path: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    for key in _TOKENIZER_KEYS:
        field = reader.fields.get(key)
        if field is not None:
            field.contents()


def _transformers_encode_s(path: Path, repeat: int) -> float | None:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    seconds, _ = _timed(lambda: reference.encode(CORPUS, add_special_tokens=False), repeat)
    return seconds


def bench_file(path: Path, repeat: int) -> dict[str, Any]:
    ours_read, meta = _timed(lambda: read_metadata(path), repeat)
    reader_read, _ = _timed(lambda: _gguf_reader(path), 1)
    spec = GGUFTokenizerSpec.from_fields(meta.fields)
    build, tokenizer = _timed(lambda: build_tokenizer(spec), repeat)
    encode, encoding = _timed(lambda: tokenizer.encode(CORPUS, add_special_tokens=False), repeat)
    return {
        "file": path.name,
        "tokenizer": spec.model,
        "vocab": len(spec.tokens),
        "read_metadata_s": ours_read,
        "gguf_reader_s": reader_read,
        "build_s": build,
        "corpus_chars": len(CORPUS),
        "corpus_tokens": len(encoding.ids),
        "encode_s": encode,
        "transformers_encode_s": _transformers_encode_s(path, repeat),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE.gguf")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tokenizer.json"))
    args = parser.parse_args(argv)
    began = time.perf_counter()
    rows = [bench_file(path, args.repeat) for path in args.files]
    header = ["file", "vocab", "read (ours) s", "GGUFReader s", "build s", "encode ms", "transformers ms"]
    table = [
        [
            r["file"],
            str(r["vocab"]),
            fmt(r["read_metadata_s"], 2),
            fmt(r["gguf_reader_s"], 1),
            fmt(r["build_s"], 1),
            fmt(None if r["encode_s"] is None else r["encode_s"] * 1e3, 1),
            fmt(None if r["transformers_encode_s"] is None else r["transformers_encode_s"] * 1e3, 1),
        ]
        for r in rows
    ]
    print(format_table(header, table))
    for r in rows:
        speedup = ratio(r["gguf_reader_s"], r["read_metadata_s"])
        print(f"{r['file']}: metadata read {fmt(speedup, 0)}x faster than GGUFReader")
    path = write_json(args.out, {"files": rows, **run_facts(began)})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
