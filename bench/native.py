"""Native GGUF bits on MatMulNBits: kernel speed per layout and accuracy level, and int8 vs native end to end.

    .venv/bin/python bench/native.py [--data-dir DIR] [--model default|FILE.gguf] [--threads 2]
                                     [--tokens 64] [--rounds 3] [--out bench/results/native.json]

Two parts, each measured side by side in one run (the machine is shared and loaded, so only
the ratios mean anything):

* kernels: one ``MatMulNBits`` per GGUF layout (SmolLM2's 576x1536 and 1536x576 matrices),
  decode (M = 1) and prefill (M = 256), at accuracy levels 0, 1 and 4, one thread; the
  Q4_1/Q4_K layout with and without its minimum term (the block-sum product), and our int8
  re-quantization for comparison;
* the default model prepared as int8 and as native, and two variants of native with wrong
  values: without its minimum products, and with every minimum product reading one shared,
  cache-resident matrix (the same nodes and arithmetic: what it gains is the cost of reading
  the minimums from memory), driven by a bare runner loop (alternating A B C D): decode tok/s
  and the prefill time of a ~200-token prompt;
* the kernel floor: each build's ``MatMulNBits`` nodes alone (the same weights, in the same
  order, each fed a graph input of its width), timed per decoded token in the same rounds:
  what the products cost with nothing else around them, so the rest of a step (minimum
  products, attention, norms, the executor's per-node cost) is the gap to the full graph;
* where decode time goes: ORT's profiler, per op kind, int8 against native.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/native.py
    sys.path.insert(0, str(REPO_ROOT))

import gguf  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench.common import RESULTS_DIR, fmt, format_table, median, ratio, run_facts, write_json  # noqa: E402
from service.engine.models.default_model import fetch_default_gguf  # noqa: E402
from service.engine.models.gguf_source import GGUFSource  # noqa: E402
from service.engine.models.native_linear import MS_DOMAIN, emit_native_linear  # noqa: E402
from service.engine.models.native_quant import NativeWeight, from_gguf  # noqa: E402
from service.engine.models.onnx_builder import BLOCK_SIZE, Precision, build_decoder, quantize_blockwise  # noqa: E402
from service.engine.models.prepare import ACCURACY_LEVELS  # noqa: E402
from service.engine.models.registry import PreparedModel, parse_model_arg, resolve  # noqa: E402
from service.engine.runner import Runner  # noqa: E402

SHAPES = ((576, 1536), (1536, 576))  # (K, N): SmolLM2's up/gate and down projections
LEVELS = (0, 1, 4)
PREFILL_M = 256
KERNEL_TYPES = (T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q3_K, T.Q6_K)


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))


def _session(weight: NativeWeight, level: int) -> ort.InferenceSession:
    g = _Graph()
    out = emit_native_linear(g, "w", "x", weight, level)
    graph = helper.make_graph(
        g.nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "m", weight.k])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], g.initializers,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)]
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _raw(qtype: T, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        return np.asarray(gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05, qtype))
    elements, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n * k // elements, type_size), dtype=np.uint8)
    at = {T.Q3_K: 108, T.Q6_K: 208}[qtype]
    blocks[:, at : at + 2] = np.full((blocks.shape[0], 1), 1e-3, dtype=np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def _time_us(run: Callable[[], object], budget_s: float = 0.25) -> float:
    run()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(samples) < 5:
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1e6)
    return float(np.median(samples))


def kernel_rows() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for k, n in SHAPES:
        weights: dict[str, NativeWeight] = {}
        for qtype in KERNEL_TYPES:
            if k % 256 and qtype in (T.Q3_K, T.Q6_K):
                continue
            weight = from_gguf(_raw(qtype, n, k, rng), qtype, k)
            weights[qtype.name] = weight
            if weight.mins is not None:
                weights[f"{qtype.name} no min-term"] = NativeWeight(
                    weight.codes, weight.scales, None, weight.bits, weight.block_size
                )
        q8 = quantize_blockwise(rng.standard_normal((n, k)).astype(np.float32), 8)
        weights["int8 (re-quantized)"] = NativeWeight(
            q8.packed, q8.scales.reshape(n, -1), None, 8, BLOCK_SIZE
        )
        for name, weight in weights.items():
            for level in LEVELS:
                session = _session(weight, level)
                row: dict[str, Any] = {"layout": name, "k": k, "n": n, "bits": weight.bits,
                                       "block_size": weight.block_size, "accuracy_level": level}  # fmt: skip
                for m in (1, PREFILL_M):
                    feeds = {"x": rng.standard_normal((1, m, k)).astype(np.float32)}
                    row[f"us_m{m}"] = _time_us(partial(session.run, None, feeds))
                rows.append(row)
    return rows


def _runner(model: PreparedModel, threads: int, max_len: int) -> Runner:
    return Runner(
        model.model_file, device="cpu", threads=threads, slots=1, max_len=max_len, style=model.style
    )


def _decode_run(runner: Runner, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of one greedy generation."""
    started = time.perf_counter()
    logits = runner.forward(0, np.array([prompt], dtype=np.int64), [0])
    prefill = time.perf_counter() - started
    token = int(np.argmax(logits[0]))
    started = time.perf_counter()
    for step in range(tokens):
        logits = runner.forward(0, np.array([[token]], dtype=np.int64), [len(prompt) + step])
        token = int(np.argmax(logits[0]))
    return prefill, tokens / (time.perf_counter() - started)


class _NoMinTerms(GGUFSource):
    """A source whose native weights lose their minimums."""

    def native_tensor(self, name: str) -> NativeWeight | None:
        weight = super().native_tensor(name)
        return None if weight is None else replace(weight, mins=None)


def _native_variant(source: GGUFSource, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    build_decoder(
        source, out_dir / "model.onnx", precision=Precision.NATIVE,
        accuracy_level=ACCURACY_LEVELS[Precision.NATIVE], max_positions=1024,
    )  # fmt: skip
    return out_dir / "model.onnx"


def _without_min_terms(gguf_path: Path, out_dir: Path) -> Path:
    """The native graph minus its minimum products: wrong values, but it shows what they cost."""
    return _native_variant(_NoMinTerms(gguf_path), out_dir)


def _with_shared_minimums(gguf_path: Path, out_dir: Path) -> Path:
    """The native graph whose minimum products all read the first minimum matrix of their
    shape: the same nodes and arithmetic, but minimums that stay in cache (wrong values). What
    it gains over native is the cost of streaming the minimums from memory."""
    model_file = _native_variant(GGUFSource(gguf_path), out_dir)
    model = onnx.load(str(model_file), load_external_data=False)
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    first: dict[tuple[int, ...], str] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.output[0].endswith("/min_term"):
            node.input[1] = first.setdefault(dims[node.input[1]], node.input[1])
    onnx.save(model, str(model_file))
    return model_file


def _kernels_only(model_file: Path, out_dir: Path) -> Path:
    """A graph of ``model_file``'s ``MatMulNBits`` nodes alone, each reading input ``x<K>``."""
    model = onnx.load(str(model_file))
    initializers = {t.name: t for t in model.graph.initializer}
    nodes, weights, widths = [], [], set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        k = next(a.i for a in node.attribute if a.name == "K")
        widths.add(k)
        alone = helper.make_node(node.op_type, [f"x{k}", *node.input[1:]], node.output, domain=node.domain)
        alone.attribute.extend(node.attribute)
        nodes.append(alone)
        weights += [initializers[name] for name in node.input[1:] if name in initializers]
    unique = list({w.name: w for w in weights}.values())  # a tied lm_head shares the embedding's codes
    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in sorted(widths)]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes]
    graph = helper.make_graph(nodes, "kernels", inputs, outputs, unique)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=model.opset_import), str(out),
        save_as_external_data=True, location="model.onnx.data",
    )  # fmt: skip
    return out


def _kernels_run(session: ort.InferenceSession, tokens: int) -> tuple[float | None, float]:
    """(no prefill, decoded tokens per second) of a :func:`_kernels_only` graph."""
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    session.run(None, feeds)
    started = time.perf_counter()
    for _ in range(tokens):
        session.run(None, feeds)
    return None, tokens / (time.perf_counter() - started)


def model_rows(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    prompt = [int(t) for t in np.random.default_rng(1).integers(100, 40000, 200)]
    max_len = len(prompt) + args.tokens + 1
    runners = {}
    models = {}
    for precision in (Precision.INT8, Precision.NATIVE):
        models[precision] = resolve(
            parse_model_arg(args.model), args.data_dir, precision=precision, progress=True
        )
        runners[str(precision)] = _runner(models[precision], args.threads, max_len)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory(dir=args.data_dir) as work:
        floors = {
            f"{precision}, MatMulNBits only": ort.InferenceSession(
                str(_kernels_only(model.model_file, Path(work) / f"{precision}-kernels")),
                options,
                providers=["CPUExecutionProvider"],
            )
            for precision, model in models.items()
        }
        gguf_path = fetch_default_gguf(args.data_dir) if args.model == "default" else Path(args.model)
        variants = {
            "native, no min-term": _without_min_terms(gguf_path, Path(work) / "no-min"),
            "native, minimums in cache": _with_shared_minimums(gguf_path, Path(work) / "shared"),
        }
        for name, graph in variants.items():
            runners[name] = Runner(graph, device="cpu", threads=args.threads, slots=1, max_len=max_len)
        samples: dict[str, list[tuple[float | None, float]]] = {name: [] for name in [*runners, *floors]}
        for _ in range(args.rounds):
            for name, runner in runners.items():
                samples[name].append(_decode_run(runner, prompt, args.tokens))
            for name, session in floors.items():
                samples[name].append(_kernels_run(session, args.tokens))
    return {
        name: {
            "prefill_ms": median(p * 1000 for p, _ in runs if p is not None),
            "decode_tok_s": median(r for _, r in runs),
            "prompt_tokens": len(prompt),
            "decode_tokens": args.tokens,
        }
        for name, runs in samples.items()
    }


def op_profile(model_file: Path, steps: int = 16) -> dict[str, dict[str, float]]:
    """Per op kind (min-term nodes apart): ms per decoded token, one thread, ORT's profiler."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "localchat-native-profile")
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    past = {
        inp.name: np.zeros((1, inp.shape[1], 0, inp.shape[3]), dtype=np.float32)
        for inp in session.get_inputs()
        if inp.name.startswith("past_key_values.")
    }
    for step in range(steps):
        feeds = {
            "input_ids": np.array([[100 + step]], dtype=np.int64),
            "attention_mask": np.ones((1, step + 1), dtype=np.int64),
            **past,
        }
        outputs = session.run(None, feeds)
        past = dict(zip(past, outputs[1:], strict=True))
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    totals: dict[str, dict[str, float]] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        name = event["name"]
        kind = event["args"]["op_name"]
        if "blocksum" in name:
            kind += " (block sums)"
        elif "min_term" in name:
            kind += " (min term)"
        entry = totals.setdefault(kind, {"ms_per_token": 0.0, "nodes_per_token": 0.0})
        entry["ms_per_token"] += event["dur"] / 1000 / steps
        entry["nodes_per_token"] += 1 / steps
    return dict(sorted(totals.items(), key=lambda item: -item[1]["ms_per_token"]))


def table(data: dict[str, Any]) -> str:
    kernels = data["kernels"]
    header = [
        "layout",
        "K x N",
        "bits/block",
        *(f"M=1 L{lv} us" for lv in LEVELS),
        *(f"M=256 L{lv} us" for lv in LEVELS),
    ]
    rows = []
    seen: dict[tuple[str, int, int], dict[int, dict[str, Any]]] = {}
    for row in kernels:
        seen.setdefault((row["layout"], row["k"], row["n"]), {})[row["accuracy_level"]] = row
    for (layout, k, n), levels in seen.items():
        first = next(iter(levels.values()))
        rows.append(
            [layout, f"{k}x{n}", f"{first['bits']}/{first['block_size']}"]
            + [fmt(levels[lv]["us_m1"], 0) if lv in levels else "-" for lv in LEVELS]
            + [fmt(levels[lv][f"us_m{PREFILL_M}"], 0) if lv in levels else "-" for lv in LEVELS]
        )
    out = [
        "MatMulNBits kernels, 1 thread (machine loaded: compare within a column)",
        format_table(header, rows),
        "",
    ]
    model = data["model"]
    out.append(
        f"{data['model_name']}, {data['threads']} threads, bare runner loop, "
        f"median of {data['rounds']} alternated rounds (machine loaded: ratios only)"
    )
    mrows = [[name, fmt(m["decode_tok_s"]), fmt(m["prefill_ms"])] for name, m in model.items()]
    for name in ("native", "native, no min-term", "native, minimums in cache"):
        decode = ratio(model[name]["decode_tok_s"], model["int8"]["decode_tok_s"])
        prefill = ratio(model[name]["prefill_ms"], model["int8"]["prefill_ms"])
        mrows.append([f"{name} / int8", fmt(decode, 2), fmt(prefill, 2)])
    for name in ("int8", "native"):  # the products' share of a whole decode step
        share = ratio(model[name]["decode_tok_s"], model[f"{name}, MatMulNBits only"]["decode_tok_s"])
        mrows.append([f"{name}: MatMulNBits' share of a step", fmt(share, 2), "-"])
    out.append(format_table(["precision", "decode tok/s", "prefill ms (200 tok)"], mrows))
    out += ["", "where decode time goes (ms per token, 1 thread, ORT profiler)"]
    profiles = data["profile"]
    kinds = list(dict.fromkeys(kind for profile in profiles.values() for kind in profile))
    prows = [
        [kind, *(fmt(p.get(kind, {}).get("ms_per_token"), 2) for p in profiles.values())] for kind in kinds
    ]
    out.append(format_table(["op", *profiles], prows))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache")
    parser.add_argument("--model", default="default", help="a GGUF file (e.g. from bench/models.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "native.json")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    data: dict[str, Any] = {"model_name": args.model, "threads": args.threads, "rounds": args.rounds}
    data["kernels"] = [] if args.skip_kernels else kernel_rows()
    data["model"] = model_rows(args)
    data["profile"] = {
        str(precision): op_profile(
            resolve(
                parse_model_arg(args.model), args.data_dir, precision=precision, progress=False
            ).model_file
        )
        for precision in (Precision.INT8, Precision.NATIVE)
    }
    data["facts"] = run_facts(began)
    print(table(data))
    write_json(args.out, data)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
