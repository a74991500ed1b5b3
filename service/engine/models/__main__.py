"""``python -m service.engine.models prepare``: download and build a model ahead of time."""

from __future__ import annotations

import argparse
import sys
import time

from service.cli.options import add_model_arguments, data_dir
from service.engine.models.registry import parse_model_arg, resolve
from service.engine.runner import choose_precision
from service.errors import ModelError


def add_prepare_arguments(prepare: argparse.ArgumentParser) -> None:
    """The options of ``prepare`` (also ``python -m service models prepare``)."""
    add_model_arguments(prepare)
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog)
    commands = parser.add_subparsers(dest="command", required=True)
    add_prepare_arguments(commands.add_parser("prepare", help="fetch and build a model; print its directory"))
    return parser


def main(argv: list[str] | None = None, *, prog: str = "python -m service.engine.models") -> int:
    return prepare(_parser(prog).parse_args(argv))


def prepare(args: argparse.Namespace) -> int:
    """Fetch and build the model ``args`` names; print its directory; the exit status."""
    started = time.perf_counter()
    try:
        prepared = resolve(
            parse_model_arg(args.model),
            data_dir(args),
            precision=choose_precision(args.precision, "auto"),
            progress=not args.quiet,
        )
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(
            f"{prepared.id}: {prepared.style} graph, context {prepared.context_length} "
            f"(ready in {time.perf_counter() - started:.2f} s)",
            file=sys.stderr,
        )
    print(prepared.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
