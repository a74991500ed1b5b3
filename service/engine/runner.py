"""The model runner: with its KV pools (``kv_pool``), the only module that imports onnxruntime.

KV memory is one pool per layer and kind, ``[slots, kv_heads, max_len, head_dim]``, in the
graph's float type (float32, or float16 for the half builds). A chat's cache lives in one
slot. A model run binds a contiguous range of slots as both the past and the present tensor
of every ``GroupQueryAttention`` node (its shared-buffer mode), so each step writes only the
new positions: no cache copy per step, and the cost of a step does not grow with context
beyond attention itself.

On the CPU the pool is host ``mmap`` memory (committed as written, handed back on release);
on CUDA it is device memory allocated once (``kv_pool.DevicePool``), so a step moves only
the token ids in and the last position's logits out. Either pool can be asked for on the
CPU (``kv_pool="device"``), which is how the device pool's code runs in CI.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from service.engine.kv_pool import DevicePool, HostPool, KVPool, copy_graph
from service.engine.model_runner import ModelShape
from service.engine.models.onnx_builder import Precision
from service.errors import ModelError

__all__ = ["ModelShape", "Runner", "available_devices", "choose_precision", "cuda_answers", "resolve_device"]

PoolKind = Literal["auto", "host", "device"]

log = logging.getLogger(__name__)

PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"


def available_devices() -> list[str]:
    providers = ort.get_available_providers()
    return ["cuda", "cpu"] if "CUDAExecutionProvider" in providers else ["cpu"]


@functools.cache
def cuda_answers() -> bool:
    """Whether a CUDA session really starts: onnxruntime-gpu without a usable GPU or CUDA
    libraries falls back to the CPU with only a logged error, so ask a tiny session."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    # The CUDA and cuDNN libraries of the pip ``nvidia-*`` packages (onnxruntime-gpu's ``cuda`` and
    # ``cudnn`` extras) are not on the loader's path: ORT (1.21+) can load them from there itself.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload(directory="")
        except Exception as exc:  # best effort: LD_LIBRARY_PATH may provide them instead
            log.debug("onnxruntime.preload_dlls: %s", exc)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    graph = copy_graph(1, TensorProto.FLOAT)
    try:
        session = ort.InferenceSession(
            graph.SerializeToString(), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    except Exception:  # onnxruntime raises its own untyped exceptions
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|cuda`` to the device that will actually run: ``auto`` is CUDA when the
    CUDA provider is installed and a GPU answers, else the CPU."""
    if device == "auto":
        return "cuda" if cuda_answers() else "cpu"
    if device == "cuda" and "cuda" not in available_devices():
        raise ModelError(
            "--device cuda asked for, but this onnxruntime has no CUDA provider "
            "(install onnxruntime-gpu in place of onnxruntime; see the README's GPU section)"
        )
    if device == "cuda" and not cuda_answers():
        raise ModelError(
            "--device cuda asked for, but the CUDA provider does not start: no GPU answers, or "
            "its CUDA 13 / cuDNN 9 libraries are not on LD_LIBRARY_PATH (see the README's GPU section)"
        )
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r} (auto, cpu or cuda)")
    return device


def choose_precision(precision: str, device: str) -> Precision:
    """``--precision auto``: fp16 where ``device`` resolves to CUDA, else native (the file's own
    bits; its float tensors at int8)."""
    if precision != "auto":
        try:
            return Precision(precision)
        except ValueError:
            raise ModelError(f"unknown precision {precision!r}") from None
    return Precision.FP16 if resolve_device(device) == "cuda" else Precision.NATIVE


_FLOAT_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


def _float_type(session: ort.InferenceSession) -> type[np.floating[Any]]:
    """The graph's KV and logits type."""
    kind = next(i.type for i in session.get_inputs() if i.name == PAST_KEY.format(0))
    if kind not in _FLOAT_TYPES:
        raise ModelError(f"unsupported KV cache type {kind} (float or float16)")
    return _FLOAT_TYPES[kind]


def _shape_from_graph(session: ort.InferenceSession) -> ModelShape:
    inputs = {i.name: i for i in session.get_inputs()}
    missing = {"input_ids", "attention_mask", PAST_KEY.format(0)} - inputs.keys()
    if missing:
        raise ModelError(f"model graph lacks inputs {sorted(missing)}")
    layers = sum(1 for name in inputs if name.startswith("past_key_values.") and name.endswith(".key"))
    _, kv_heads, _, head_dim = inputs[PAST_KEY.format(0)].shape
    logits = next(o for o in session.get_outputs() if o.name == "logits")
    vocab = logits.shape[-1]
    if not all(isinstance(d, int) for d in (kv_heads, head_dim, vocab)):
        raise ModelError("model graph has symbolic KV head/size or vocab dimensions")
    itemsize = np.dtype(_float_type(session)).itemsize
    return ModelShape(layers, int(kv_heads), int(head_dim), int(vocab), kv_itemsize=itemsize)


class Runner:
    """Runs the decoder graph over slots of the KV pool (a ``ModelRunner``).

    ``forward`` takes either one slot with a chunk of tokens (prefill), or a contiguous
    range of slots with one token each (a batched decode step). Not thread-safe: the
    engine calls it from its one worker thread.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        device: str,
        threads: int,
        slots: int,
        max_len: int,
        style: str = "genai",
        kv_pool: PoolKind = "auto",
    ) -> None:
        self.device = resolve_device(device)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if self.device == "cuda"
            else ["CPUExecutionProvider"]
        )
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise ModelError(f"cannot load {model_path}: {exc}") from exc
        self.shape = _shape_from_graph(self.session)
        self.style = style
        self._needs_position_ids = any(i.name == "position_ids" for i in self.session.get_inputs())
        self.slots = slots
        self.max_len = max_len
        self.dtype = _float_type(self.session)
        if self.device == "cuda" and self.dtype is np.float32 and style == "genai":
            raise ModelError(
                f"{model_path} is a float32 build, which runs on the CPU only (GroupQueryAttention on "
                "CUDA takes float16): use --precision fp16 (or auto) with --device cuda"
            )
        if kv_pool == "auto":
            kv_pool = "device" if self.device == "cuda" else "host"
        if kv_pool == "device" and style == "optimum":
            raise ModelError("an optimum-style graph (present = past + new) needs the host KV pool")
        self._host: HostPool | None = None
        self._pool: KVPool
        if kv_pool == "host":
            self._host = HostPool(self.shape, slots, max_len, self.dtype)
            self._pool = self._host
        else:
            self._pool = DevicePool(
                self.shape, slots, max_len, self.dtype, device=self.device, providers=providers
            )
        self.kv_pool: str = kv_pool
        # Logits come back to host memory whatever the pool: only the batch's last positions.
        self._logits = np.zeros((slots, self.shape.vocab_size), dtype=self.dtype)
        self._logits32 = (
            self._logits if self.dtype is np.float32 else np.zeros((slots, self.shape.vocab_size), np.float32)
        )
        self._binding = self.session.io_binding()
        self._bound: tuple[int, int] | None = None
        self._kv_names = [
            (PAST_KEY.format(i), PRESENT_KEY.format(i), PAST_VALUE.format(i), PRESENT_VALUE.format(i))
            for i in range(self.shape.num_layers)
        ]

    def forward(self, first_slot: int, tokens: np.ndarray, past_lengths: Sequence[int]) -> np.ndarray:
        """Run one step and return the last position's logits, float32 ``[batch, vocab]``.

        ``tokens`` is int64 ``[batch, seq]`` for slots ``first_slot .. first_slot+batch-1``;
        ``past_lengths[b]`` is how many positions slot b already holds. Either batch is 1
        or seq is 1. The returned array is a view into a buffer reused by the next call.
        """
        batch, seq = tokens.shape
        if batch > 1 and seq > 1:
            raise ValueError("a step is either one slot's chunk or one token per slot")
        if first_slot < 0 or first_slot + batch > self.slots:
            raise ValueError(f"slots {first_slot}..{first_slot + batch - 1} outside the pool")
        totals = np.asarray(past_lengths, dtype=np.int64) + seq
        width = int(totals.max())
        if width > self.max_len:
            raise ValueError(f"sequence of {width} positions exceeds the cache length {self.max_len}")
        if self.style == "optimum":
            return self._forward_concat(first_slot, tokens, past_lengths)
        mask = (np.arange(width, dtype=np.int64)[None, :] < totals[:, None]).astype(np.int64)

        binding = self._binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", mask)
        if self._bound != (first_slot, batch):
            self._bind_cache(first_slot, batch)
        self.session.run_with_iobinding(binding)
        if self._logits32 is self._logits:
            return self._logits[:batch]
        out = self._logits32[:batch]
        out[...] = self._logits[:batch]
        return out

    def _bind_cache(self, first_slot: int, batch: int) -> None:
        """Bind slots ``first_slot..+batch`` as every layer's past and present (one buffer).
        Bindings persist across runs, so this runs only when the slot range changes."""
        binding = self._binding
        kv_shape = [batch, self.shape.num_kv_heads, self.max_len, self.shape.head_dim]
        pool, dtype = self._pool, self.dtype
        for layer, (past_k, present_k, past_v, present_v) in enumerate(self._kv_names):
            for tensor, past, present in ((2 * layer, past_k, present_k), (2 * layer + 1, past_v, present_v)):
                ptr = pool.address(tensor, first_slot)
                binding.bind_input(past, pool.location, 0, dtype, kv_shape, ptr)
                binding.bind_output(present, pool.location, 0, dtype, kv_shape, ptr)
        logits_shape = [batch, 1, self.shape.vocab_size]
        binding.bind_output("logits", "cpu", 0, dtype, logits_shape, self._logits.ctypes.data)
        self._bound = (first_slot, batch)

    def _forward_concat(self, first_slot: int, tokens: np.ndarray, past_lengths: Sequence[int]) -> np.ndarray:
        """Graphs exported by optimum append to the past themselves (present = past + new):
        gather each slot's cache into one right-padded batch, run, scatter the new
        positions back. Costs a cache copy per step, which such graphs impose anyway."""
        batch, seq = tokens.shape
        past = np.asarray(past_lengths, dtype=np.int64)
        width = int(past.max())
        mask = np.zeros((batch, width + seq), dtype=np.int64)
        mask[:, :width] = np.arange(width)[None, :] < past[:, None]
        mask[:, width:] = 1
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(tokens, dtype=np.int64),
            "attention_mask": mask,
        }
        if self._needs_position_ids:
            feeds["position_ids"] = past[:, None] + np.arange(seq, dtype=np.int64)[None, :]
        assert self._host is not None  # the constructor gives optimum graphs the host pool
        arrays = self._host.arrays
        rows = slice(first_slot, first_slot + batch)
        for layer, (past_k, _, past_v, _) in enumerate(self._kv_names):
            feeds[past_k] = np.ascontiguousarray(arrays[2 * layer][rows, :, :width])
            feeds[past_v] = np.ascontiguousarray(arrays[2 * layer + 1][rows, :, :width])
        outputs = ["logits"] + [name for names in self._kv_names for name in (names[1], names[3])]
        logits, *presents = self.session.run(outputs, feeds)
        for index, present in enumerate(presents):
            array = arrays[index]
            for b in range(batch):
                start = int(past[b])
                array[first_slot + b, :, start : start + seq] = present[b, :, width : width + seq]
        self._logits32[:batch] = logits[:, -1, :]
        return self._logits32[:batch]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of one slot's cache into another."""
        if src == dst or length == 0:
            return
        self._pool.copy(src, dst, length)

    def swap_slots(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange two slots' caches (the first ``length_*`` positions of each)."""
        if a == b:
            return
        self._pool.swap(a, b, max(length_a, length_b))

    def release_slot(self, slot: int) -> None:
        """Give a slot's memory back (host pool: to the system, contents become zeros; device pool:
        nothing is freed, contents become undefined)."""
        self._pool.release(slot)
