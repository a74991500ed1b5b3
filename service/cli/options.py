"""Command-line options shared by every entry point, turned into settings in one place."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.config import EngineSettings
from service.engine.models.onnx_builder import Precision
from service.paths import default_data_dir

_DEFAULTS = EngineSettings()


def add_model_arguments(parser: argparse.ArgumentParser, *, several: bool = False) -> argparse._ArgumentGroup:
    """--model, --precision, --data-dir: which model (or models), built how, cached where."""
    group = parser.add_argument_group("model")
    what = (
        "'default' (SmolLM2-135M-Instruct), 'gemma3-270m' (a base model), a .gguf file, "
        "an ONNX dir or org/name"
    )
    if several:
        group.add_argument(
            "--model",
            action="append",
            dest="models",
            metavar="ID_OR_PATH",
            help=f"{what}; repeat to offer several, the first is the default (default: 'default')",
        )
    else:
        group.add_argument("--model", default="default", help=what)
    group.add_argument(
        "--precision",
        choices=["auto", *(p.value for p in Precision)],
        default="auto",
        help="how a GGUF's weights are built: auto (default) is fp16 when the device is CUDA, else "
        "native; native computes with the file's own quantized values (its float tensors at "
        "int8); int8 re-quantizes every weight to 8 bits; int4 re-quantizes to 4 bits (meant for "
        "F16 files); fp32 dequantizes; fp16 and native-fp16 (the CUDA builds) are int8 and native "
        "with float16 activations, KV cache and logits",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="prepared models (and the embedded database) live here (default: $LOCALCHAT_DATA_DIR, "
        "$XDG_DATA_HOME/localchat, ~/.local/share/localchat, or /var/lib/localchat for root)",
    )
    return group


def add_engine_arguments(parser: argparse.ArgumentParser, *, several_models: bool = False) -> None:
    group = add_model_arguments(parser, several=several_models)
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    group.add_argument("--threads", type=int, default=0, help="decoder threads (default: every core)")
    group.add_argument(
        "--max-batch", type=int, default=_DEFAULTS.max_batch, help="generations per decode step"
    )
    group.add_argument(
        "--max-context",
        type=int,
        default=_DEFAULTS.max_context,
        help="positions per chat (default: the model's context, capped to what one chat's cache "
        "can hold within --kv-budget-mb)",
    )
    group.add_argument(
        "--kv-budget-mb", type=int, default=_DEFAULTS.kv_budget_mb, help="memory for cached chats"
    )


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    for name in ("threads", "max_batch", "max_context", "kv_budget_mb"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "threads" else 1):
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    return EngineSettings(
        device=args.device,
        threads=args.threads,
        max_batch=args.max_batch,
        max_context=args.max_context,
        kv_budget_mb=args.kv_budget_mb,
    )


def data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) if args.data_dir is not None else default_data_dir()
