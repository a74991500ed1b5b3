"""The physical bound of decoding: bytes of weights read per token, and the machine's read bandwidth.

Every decoded token reads every weight matrix once (the embedding table only by the row it
looks up, unless it doubles as the output projection). At ``bandwidth`` bytes per second a
decoder can therefore make at most ``bandwidth / bytes_per_token`` tokens per second; a decode
figure divided by that is the fraction of the bound it reaches. The KV cache read per token
(small at these contexts) is left out, so the bound is slightly optimistic.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import onnx

_GATHERS = {"Gather", "GatherBlockQuantized"}


def read_bandwidth(threads: int = 2, mib_per_thread: int = 256, passes: int = 7) -> dict[str, Any]:
    """Read bandwidth in GB/s: ``threads`` threads at once, each OR-reducing its own array of
    64-bit words, larger than any cache (a pure streaming read; numpy releases the GIL in
    reductions); every pass reads all arrays once. ``gb_s`` is the best pass: the bound."""
    arrays = [np.ones(mib_per_thread * 2**20 // 8, dtype=np.uint64) for _ in range(threads)]
    total = sum(a.nbytes for a in arrays)
    for a in arrays:
        np.bitwise_or.reduce(a)  # touch every page before timing
    rates: list[float] = []
    for _ in range(passes):
        barrier = threading.Barrier(threads + 1)

        def read(a: np.ndarray, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            np.bitwise_or.reduce(a)

        workers = [threading.Thread(target=read, args=(a,)) for a in arrays]
        for w in workers:
            w.start()
        barrier.wait()
        started = time.perf_counter()
        for w in workers:
            w.join()
        rates.append(total / (time.perf_counter() - started) / 1e9)
    return {
        "threads": threads,
        "bytes_per_pass": total,
        "gb_s": max(rates),
        "gb_s_median": statistics.median(rates),
        "gb_s_passes": rates,
    }


def gguf_bytes_per_token(path: Path) -> dict[str, int]:
    """Bytes of weights llama.cpp reads per decoded token from a GGUF file."""
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    embedding = tensors.get("token_embd.weight", 0)
    tied = "output.weight" not in tensors
    per_token = sum(tensors.values()) - (0 if tied else embedding)
    return {"bytes_per_token": per_token, "file_tensor_bytes": sum(tensors.values()), "tied_embedding": tied}


def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
    if tensor.raw_data:
        return len(tensor.raw_data)
    return (
        int(np.prod(tensor.dims, dtype=np.int64))
        * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    )


def _mlas_block_sums(node: onnx.NodeProto) -> int:
    """Bytes ONNX Runtime's CPU kernels add when they pack a 4-bit ``MatMulNBits`` for accuracy
    level 4: a float32 block sum (the zero point times the scale) per block, N padded to 16
    (MLAS ``SQ4BitGemmPackQuantBDataSize`` for ``CompInt8``). Read with the codes every step."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("bits") != 4 or attrs.get("accuracy_level") != 4:
        return 0
    blocks = -(-int(attrs["K"]) // int(attrs["block_size"]))
    return -(-int(attrs["N"]) // 16) * 16 * blocks * 4


def onnx_bytes_per_token(model_file: Path) -> dict[str, int]:
    """Bytes of weights our decoder reads per token: every initializer, except those only
    gathered from (the embedding table, when it is not also the output projection), plus the
    block sums the runtime adds when it packs 4-bit weights."""
    model = onnx.load(str(model_file), load_external_data=False)
    users: dict[str, set[str]] = defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            users[name].add(node.op_type)
    sizes = {t.name: _initializer_bytes(t) for t in model.graph.initializer}
    gathered = sum(size for name, size in sizes.items() if users[name] and users[name] <= _GATHERS)
    packing = sum(_mlas_block_sums(node) for node in model.graph.node if node.op_type == "MatMulNBits")
    return {
        "bytes_per_token": sum(sizes.values()) - gathered + packing,
        "initializer_bytes": sum(sizes.values()),
        "packing_bytes": packing,
    }
