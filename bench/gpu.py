"""GPU benchmark: decode, prefill and TTFT of our runner on CUDA, against the bandwidth bound
and against transformers' ``generate``. Run by ``bench/gpu.sh`` (which installs the CUDA build
first); ``--device cpu`` with small settings is how it is checked without a GPU.

    python bench/gpu.py --out DIR [--device cuda] [--shapes llama-3.2-1b,llama-3.1-8b]
                        [--batches 1,8,32,64] [--tokens 64] [--prompt 1000] [--no-hf]

Models: the default model (SmolLM2-135M) built at ``--precision`` (fp16), and synthetic GGUFs
in real shapes (``bench/models.py``: random Q4_0 weights, SmolLM2's vocabulary) built at
``--synthetic-precision`` (native-fp16: the file's own 4-bit codes as MatMulNBits, float16
elsewhere). For each model:

* decode tok/s of ``b`` chats decoding together (all tokens of the batch per second), each
  slot holding a short prompt, for every ``b`` in ``--batches``: the runner alone, no engine;
* TTFT of one ``--prompt``-token prompt, prefilled in chunks of ``--chunk`` as the engine
  does, and the prefill rate that gives;
* the HBM bound of each: a decode step must read every weight once (the embedding table
  aside: one row per token), so at batch ``b`` it cannot beat ``b * 4.8 TB/s / weight bytes``;
  a prefill, ``weight bytes / 4.8 TB/s`` per chunk. KV reads are left out, so the bound is
  loose at long contexts;
* transformers' ``generate`` on a model of the same configuration in bf16 with a static cache
  (random weights: speed does not depend on their values), same batches, same prompt.

A check before the timings: greedy tokens of the default model on the device against the
CPU provider's host pool (on ``--device cpu``: the device pool against the host pool), and
slot copy and swap on the device pool (the moved cache must give the same next logits).
Writes ``gpu.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/gpu.py
    sys.path.insert(0, str(REPO_ROOT))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from bench.models import SHAPES, ensure_synthetic  # noqa: E402
from service.engine.models.onnx_builder import Precision  # noqa: E402
from service.engine.models.prepare import prepare_gguf, read_manifest  # noqa: E402
from service.engine.models.registry import parse_model_arg, resolve  # noqa: E402
from service.engine.runner import Runner  # noqa: E402

HBM_BYTES_PER_S = 4.8e12  # H200, vendor's figure
SHORT_PROMPT = 16  # tokens each slot holds before the decode timing
CHECK_TOKENS = 32
EMBED_TABLES = frozenset({"embed_tokens.weight", "embed_tokens.weight_fp16"})


def weight_bytes(model_file: Path) -> int:
    """Bytes of every initializer a decode step reads: all but the embedding table."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    total = 0
    for tensor in graph.initializer:
        if tensor.name in EMBED_TABLES:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next(e.value for e in tensor.external_data if e.key == "length"))
        else:
            total += len(tensor.SerializeToString())
    return total


def _sync_forward(runner: Runner, slot: int, tokens: np.ndarray, past: list[int]) -> int:
    """One step; the logits are on the host when it returns, so timing it is synchronous."""
    return int(runner.forward(slot, tokens, past)[0].argmax())


def ttft(runner: Runner, prompt: list[int], chunk: int) -> float:
    start = time.perf_counter()
    for at in range(0, len(prompt), chunk):
        piece = np.asarray([prompt[at : at + chunk]], dtype=np.int64)
        _sync_forward(runner, 0, piece, [at])
    return time.perf_counter() - start


def decode_rate(runner: Runner, batch: int, tokens: int, rng: np.random.Generator) -> float:
    """Tokens per second of ``batch`` slots decoding together (after ``SHORT_PROMPT`` each)."""
    vocab = runner.shape.vocab_size
    for slot in range(batch):
        _sync_forward(runner, slot, rng.integers(0, vocab, (1, SHORT_PROMPT)), [0])
    step = rng.integers(0, vocab, (batch, 1))
    lengths = [SHORT_PROMPT] * batch
    for _ in range(2):  # warm-up steps, not timed
        runner.forward(0, step, lengths)
        lengths = [n + 1 for n in lengths]
    start = time.perf_counter()
    for _ in range(tokens):
        logits = runner.forward(0, step, lengths)
        step = logits.argmax(axis=-1).astype(np.int64)[:, None]
        lengths = [n + 1 for n in lengths]
    return batch * tokens / (time.perf_counter() - start)


def bench_ours(model_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    batches: list[int] = args.batches
    runner = Runner(
        model_file,
        device=args.device,
        threads=args.threads,
        slots=max(batches),
        max_len=max(args.prompt, SHORT_PROMPT + args.tokens + 2) + 8,
    )
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, runner.shape.vocab_size, args.prompt)]
    ttft(runner, prompt[: min(64, len(prompt))], args.chunk)  # warm-up: kernels, allocations
    ttfts = [ttft(runner, prompt, args.chunk) for _ in range(args.rounds)]
    wbytes = weight_bytes(model_file)
    decode = {}
    for batch in batches:
        rate = max(decode_rate(runner, batch, args.tokens, rng) for _ in range(args.rounds))
        bound = batch * HBM_BYTES_PER_S / wbytes
        decode[str(batch)] = {"tok_s": rate, "hbm_bound_tok_s": bound, "fraction_of_bound": rate / bound}
    best = min(ttfts)
    chunks = -(-args.prompt // args.chunk)
    return {
        "device": runner.device,
        "kv_pool": runner.kv_pool,
        "dtype": np.dtype(runner.dtype).name,
        "weight_bytes": wbytes,
        "decode": decode,
        "ttft_ms": best * 1000,
        "ttft_ms_rounds": [t * 1000 for t in ttfts],
        "prefill_tok_s": args.prompt / best,
        "prefill_hbm_bound_ms": chunks * wbytes / HBM_BYTES_PER_S * 1000,
    }


def bench_transformers(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """transformers' ``generate`` (bf16, static cache, greedy) on a random model of ``config``."""
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        return {"skipped": f"transformers or torch missing: {exc}"}
    device = "cuda" if args.device == "cuda" else "cpu"
    hf_config = LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_heads"],
        num_key_value_heads=config["num_kv_heads"],
        head_dim=config["head_dim"],
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
        rms_norm_eps=config["rms_norm_eps"],
        tie_word_embeddings=config["tie_word_embeddings"],
        max_position_embeddings=max(args.prompt, SHORT_PROMPT + args.tokens) + 8,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(hf_config)
    model = model.to(dtype=torch.bfloat16).eval()

    def generate(ids: Any, new: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                cache_implementation="static",
                pad_token_id=0,
            )
        out.cpu()  # waits for the device
        return time.perf_counter() - start

    vocab = config["vocab_size"]
    decode = {}
    for batch in args.batches:
        ids = torch.randint(0, vocab, (batch, SHORT_PROMPT), device=device)
        generate(ids, 2)  # warm-up
        one = min(generate(ids, 1) for _ in range(args.rounds))
        full = min(generate(ids, args.tokens + 1) for _ in range(args.rounds))
        decode[str(batch)] = {"tok_s": batch * args.tokens / max(full - one, 1e-9)}
    prompt = torch.randint(0, vocab, (1, args.prompt), device=device)
    generate(prompt, 1)
    first = min(generate(prompt, 1) for _ in range(args.rounds))
    return {
        "torch": torch.__version__,
        "decode": decode,
        "ttft_ms": first * 1000,
        "prefill_tok_s": args.prompt / first,
    }


def check_tokens(model_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy tokens on the benchmark's device and pool against the CPU provider's host pool."""
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411]

    def greedy(device: str, pool: str) -> list[int]:
        runner = Runner(model_file, device=device, threads=args.threads, slots=1, max_len=64, kv_pool=pool)  # type: ignore[arg-type]
        token = _sync_forward(runner, 0, np.asarray([prompt]), [0])
        out = [token]
        for i in range(CHECK_TOKENS - 1):
            token = _sync_forward(runner, 0, np.asarray([[token]]), [len(prompt) + i])
            out.append(token)
        return out

    got = greedy(args.device, "device")
    expected = greedy("cpu", "host")
    agreement = float(np.mean([a == b for a, b in zip(got, expected, strict=True)]))
    first_difference = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None)
    return {
        "against": "cpu provider, host pool",
        "agreement": agreement,
        "first_difference": first_difference,
        "tokens": got,
        "reference": expected,
    }


def check_slot_moves(model_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Copy and swap on the device pool: the moved cache gives the same next logits."""
    runner = Runner(
        model_file, device=args.device, threads=args.threads, slots=4, max_len=64, kv_pool="device"
    )
    prompts = [[1, 520, 33, 77, 19, 8, 4000], [1, 99, 1000, 4, 2001]]
    last = [_sync_forward(runner, slot, np.asarray([p]), [0]) for slot, p in enumerate(prompts)]

    def step(slot: int, chat: int) -> np.ndarray:
        return np.array(runner.forward(slot, np.asarray([[last[chat]]]), [len(prompts[chat])])[0])

    expected = [step(0, 0), step(1, 1)]
    runner.copy_slot(0, 3, len(prompts[0]))
    copied = step(3, 0)
    runner.swap_slots(0, 1, len(prompts[0]), len(prompts[1]))
    swapped = [step(1, 0), step(0, 1)]
    diffs = [copied - expected[0], swapped[0] - expected[0], swapped[1] - expected[1]]
    worst = max(float(np.abs(d).max()) for d in diffs)
    return {"copy_equal": bool(np.array_equal(copied, expected[0])), "max_abs_difference": worst}


def models(args: argparse.Namespace) -> list[tuple[str, Path, dict[str, Any], str]]:
    """(name, model file, config, precision) of the default model and each synthetic shape."""
    out = []
    default = resolve(parse_model_arg("default"), args.data_dir, precision=args.precision, progress=False)
    manifest = read_manifest(default.directory)
    assert manifest is not None
    out.append(("smollm2-135m", default.model_file, manifest["config"], str(args.precision)))
    for name in args.shapes:
        gguf_path = ensure_synthetic(args.data_dir, SHAPES[name], T.Q4_0)
        directory = args.data_dir / "models" / f"{gguf_path.stem}-{args.synthetic_precision}-bench"
        if read_manifest(directory) is None:
            prepare_gguf(gguf_path, directory, precision=args.synthetic_precision, progress=False)
        manifest = read_manifest(directory)
        assert manifest is not None
        out.append((name, directory / "model.onnx", manifest["config"], str(args.synthetic_precision)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit("no CUDAExecutionProvider in this onnxruntime: run bench/gpu.sh, which installs it")
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {
            "device": args.device,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
        },
        "settings": {k: str(v) if isinstance(v, Path | Precision) else v for k, v in vars(args).items()},
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "models": {},
    }
    prepared = models(args)
    results["check"] = check_tokens(prepared[0][1], args)
    results["check"]["slot_moves"] = check_slot_moves(prepared[0][1], args)
    print(f"check: agreement {results['check']['agreement']:.3f} with the CPU provider", flush=True)
    for name, model_file, config, precision in prepared:
        entry: dict[str, Any] = {"precision": precision, "ours": bench_ours(model_file, args)}
        if args.hf:
            entry["transformers"] = bench_transformers(config, args)
        results["models"][name] = entry
        print(table_rows(name, entry), flush=True)
        (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")  # partial results too
    results["wall_s"] = time.perf_counter() - began
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'gpu.json'} in {results['wall_s']:.0f} s")
    return 0


def table_rows(name: str, entry: dict[str, Any]) -> str:
    ours, hf = entry["ours"], entry.get("transformers", {})
    gib = ours["weight_bytes"] / 2**30
    lines = [f"{name} ({entry['precision']}, {ours['device']}, weights {gib:.2f} GiB)"]
    for batch, d in ours["decode"].items():
        theirs = hf.get("decode", {}).get(batch, {}).get("tok_s")
        vs = f"{d['tok_s'] / theirs:.2f}x transformers" if theirs else "transformers: -"
        share = d["fraction_of_bound"]
        lines.append(f"  batch {batch:>3}: {d['tok_s']:10.1f} tok/s  {share:.3f} of the HBM bound  {vs}")
    hf_ttft = hf.get("ttft_ms")
    vs = f"{hf_ttft / ours['ttft_ms']:.2f}x faster than transformers" if hf_ttft else ""
    lines.append(f"  TTFT {ours['ttft_ms']:.1f} ms, prefill {ours['prefill_tok_s']:.0f} tok/s {vs}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    def names(text: str) -> list[str]:
        found = [x for x in text.split(",") if x]
        unknown = [x for x in found if x not in SHAPES]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown shapes {unknown} (known: {sorted(SHAPES)})")
        return found

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache")
    parser.add_argument("--precision", type=Precision, default=Precision.FP16)
    parser.add_argument("--synthetic-precision", type=Precision, default=Precision.NATIVE_FP16)
    parser.add_argument("--shapes", type=names, default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--batches", type=ints, default=[1, 8, 32, 64])
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed per batch")
    parser.add_argument("--prompt", type=int, default=1000, help="tokens of the TTFT prompt")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (the engine's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
