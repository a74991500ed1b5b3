"""``python -m service models prepare|tokenize|inspect``: build a model ahead of time, or look into
a GGUF file without serving it.

``prepare --model M`` fetches and builds a model as the service would at start, and prints its
directory (see ``service.engine.models.__main__``).

``tokenize FILE.gguf [TEXT]`` prints the token ids of TEXT (else of stdin, exactly as read) as a
JSON list, with the tokenizer this service builds from the file's metadata. Without
``--special`` nothing is added (no BOS) and special-token text such as ``<|im_end|>`` is plain
text; with it, the file's BOS/EOS are added and special-token text becomes those tokens, as in
a prompt. Vocabulary-only files (tokenizer metadata, no tensors) work.

``inspect FILE.gguf`` prints the architecture, sizes, quantization types, context length,
tokenizer, whether there is a chat template, and whether this service can run the file (and if
not, why); ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from service.engine.models.__main__ import add_prepare_arguments, prepare
from service.engine.models.gguf_inspect import Report, inspect_gguf
from service.engine.models.gguf_tokenizer import build_tokenizer, read_gguf_tokenizer

if TYPE_CHECKING:
    from collections.abc import Iterator


def add_models_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``models`` (``prepare``, ``tokenize``, ``inspect``) on the entry point's subcommands."""
    models = subparsers.add_parser(
        "models",
        help="prepare a model ahead of time, tokenize text or inspect a GGUF file",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    actions = models.add_subparsers(dest="models_action", metavar="ACTION", required=True)
    add_prepare_arguments(actions.add_parser("prepare", help="fetch and build a model; print its directory"))
    tokenize = actions.add_parser(
        "tokenize", help="print the token ids of TEXT (or stdin) as a JSON list", description=__doc__
    )
    tokenize.add_argument("file", type=Path, metavar="FILE.gguf")
    tokenize.add_argument("text", nargs="?", metavar="TEXT", help="default: stdin, exactly as read")
    tokenize.add_argument(
        "--special",
        action="store_true",
        help="add the file's BOS/EOS and read special-token text as those tokens",
    )
    inspect = actions.add_parser("inspect", help="describe a GGUF file and whether it runs here")
    inspect.add_argument("file", type=Path, metavar="FILE.gguf")
    inspect.add_argument("--json", action="store_true", help="one JSON object instead of lines")


def main(args: argparse.Namespace) -> int:
    """Run the ``models`` action that ``args`` names; the exit status."""
    if args.models_action == "prepare":
        return prepare(args)
    path: Path = args.file
    if not path.is_file():
        print(f"error: no such file: {path}", file=sys.stderr)
        return 1
    try:
        if args.models_action == "tokenize":
            text = args.text if args.text is not None else sys.stdin.read()
            print(json.dumps(_tokenize(path, text, special=args.special)))
        else:
            report = inspect_gguf(path)
            if args.json:
                print(json.dumps(report, indent=2, ensure_ascii=False))
            else:
                print("\n".join(_lines(report)))
    except (ValueError, NotImplementedError) as exc:
        message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


def _tokenize(path: Path, text: str, *, special: bool) -> list[int]:
    tokenizer = build_tokenizer(read_gguf_tokenizer(path))
    tokenizer.encode_special_tokens = not special
    return tokenizer.encode(text, add_special_tokens=special).ids


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _lines(report: Report) -> Iterator[str]:
    mib = report["file_bytes"] / 2**20
    yield f"file:           {report['file']} ({mib:.1f} MiB, GGUF v{report['gguf_version']})"
    yield f"name:           {report['name'] or '-'}"
    yield f"architecture:   {report['architecture'] or '-'}"
    shape = ", ".join(
        f"{label} {value}"
        for label, value in (
            ("layers", report["layers"]),
            ("hidden", report["hidden_size"]),
            ("heads", report["heads"]),
            ("kv heads", report["kv_heads"]),
        )
        if value is not None
    )
    yield f"size:           {_count(report['parameters'])} parameters in {report['tensors']} tensors" + (
        f"; {shape}" if shape else ""
    )
    quant = ", ".join(f"{name} x{n}" for name, n in report["quantization_types"].items()) or "-"
    yield f"quantization:   {report['file_type'] or '-'} ({quant})"
    yield f"context length: {report['context_length'] or '-'}"
    tok = report["tokenizer"]
    if tok is None:
        yield "tokenizer:      none"
    else:
        bos = tok["bos"] if tok["add_bos"] else "not added"
        ends = " ".join(tok["end_tokens"]) or "-"
        yield (
            f"tokenizer:      {tok['kind']} (pre {tok['pre']}), {tok['vocab_size']} tokens, "
            f"BOS {bos}, ends on {ends}"
        )
    template = "yes" if report["chat_template"] else "no (a base model: chats use a plain transcript)"
    yield f"chat template:  {template}"
    yield f"runs here:      {'yes' if report['runnable'] else 'no: ' + str(report['reason'])}"
