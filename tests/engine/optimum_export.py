"""Export a tiny random Llama with optimum, and record torch's greedy continuations.

Run by ``test_optimum_dir.py`` in a child process whose ``PYTHONPATH`` starts with the optimum
side-install (``scripts/test`` makes it in ``.venv/optimum-side``): ``optimum-onnx`` pins a
``transformers`` older than the one the fidelity tests use, so the two never share a process.

    python tests/engine/optimum_export.py OUT_DIR < prompts.json   # [[ids...], ...]

Writes the ONNX export into ``OUT_DIR/onnx`` and ``OUT_DIR/reference.json``:
``{"transformers": version, "continuations": [[ids...], ...]}``, one greedy continuation of
``NEW_TOKENS`` per prompt, computed by full recomputation (no cache): the simplest reference.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

NEW_TOKENS = 16
MAX_LEN = 128


def main() -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    out = Path(sys.argv[1])
    prompts: list[list[int]] = json.load(sys.stdin)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        # Larger than the default 0.02, so greedy picks win by clear margins (no near-ties for
        # float rounding to flip).
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with warnings.catch_warnings():
        # The exporter traces the model: TracerWarnings and deprecations are expected here.
        warnings.simplefilter("ignore")
        model.save_pretrained(out / "hf")
        main_export(str(out / "hf"), output=out / "onnx", task="text-generation-with-past")
    continuations = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                logits = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits
                ids.append(int(torch.argmax(logits[0, -1]).item()))
            continuations.append(ids[len(prompt) :])
    reference = {"transformers": transformers.__version__, "continuations": continuations}
    (out / "reference.json").write_text(json.dumps(reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
