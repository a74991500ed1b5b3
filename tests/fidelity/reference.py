"""Reference outputs from transformers reading the same GGUF file as our engine.

Importing this module needs the fidelity extra (torch, transformers); tests import it
behind ``pytest.importorskip("torch")``. Everything runs on CPU in float32, offline, and
is fed token ids directly: no tokenizer takes part, so a mismatch points at the model
conversion or the runner rather than at text handling.
"""

from __future__ import annotations

import inspect
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoModelForCausalLM  # after the offline switches


def load_reference_model(gguf_path: Path, overrides: dict[str, Any] | None = None) -> Any:
    """Load (once per path) the GGUF as a float32 transformers model in eval mode.

    ``overrides`` are config values the file does not carry or transformers does not read
    from it (each caller says which and why).
    """
    return _load(Path(gguf_path).resolve(), json.dumps(overrides or {}, sort_keys=True))


@lru_cache(maxsize=2)
def _load(path: Path, overrides_json: str) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=torch.float32,
        local_files_only=True,
        **json.loads(overrides_json),
    )
    model.eval()
    return model


def _cache_keyword(model: Any) -> str:
    """The forward() keyword for the KV cache: ``cache`` in transformers 5.x, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _as_batch(ids: list[int]) -> torch.Tensor:
    if not ids:
        raise ValueError("need at least one token id")
    return torch.tensor([ids], dtype=torch.long)


@torch.inference_mode()
def reference_logits(
    gguf_path: Path, ids: list[int], overrides: dict[str, Any] | None = None
) -> npt.NDArray[np.float32]:
    """Teacher-forced logits, shape ``[len(ids), vocab]``: row i predicts the token after ids[i]."""
    model = load_reference_model(gguf_path, overrides)
    out = model(input_ids=_as_batch(ids), use_cache=False)
    logits: npt.NDArray[np.float32] = out.logits[0].to(torch.float32).numpy().copy()
    return logits


@torch.inference_mode()
def reference_greedy(
    gguf_path: Path, prompt_ids: list[int], n: int, overrides: dict[str, Any] | None = None
) -> list[int]:
    """Exactly ``n`` greedy (argmax) continuation ids: prefill once, then one token per step on the KV cache.

    No stopping on EOS and no generation config: the caller compares token for token.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    model = load_reference_model(gguf_path, overrides)
    cache_kw = _cache_keyword(model)
    out = model(input_ids=_as_batch(prompt_ids), use_cache=True)
    generated: list[int] = []
    while len(generated) < n:
        next_id = int(torch.argmax(out.logits[0, -1]).item())
        generated.append(next_id)
        if len(generated) == n:
            break
        out = model(
            input_ids=torch.tensor([[next_id]], dtype=torch.long),
            use_cache=True,
            **{cache_kw: _cache_of(out)},
        )
    return generated
