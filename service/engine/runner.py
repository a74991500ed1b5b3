"""The model runner: the only module that imports onnxruntime.

KV memory is one pool per layer and kind, ``[slots, kv_heads, max_len, head_dim]``. A
chat's cache lives in one slot. A model run binds a contiguous range of slots as both
the past and the present tensor of every ``GroupQueryAttention`` node (its shared-buffer
mode), so each step writes only the new positions: no cache copy per step, and the cost
of a step does not grow with context beyond attention itself.

On the CPU the pool is anonymous ``mmap`` memory: pages are committed only when written,
so a slot costs memory in proportion to the tokens it holds, and releasing a slot hands
its pages back to the system (``MADV_DONTNEED``).
"""

from __future__ import annotations

import logging
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.engine.model_runner import ModelShape
from service.errors import ModelError

__all__ = ["ModelShape", "Runner", "available_devices", "resolve_device"]

log = logging.getLogger(__name__)

PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"


def available_devices() -> list[str]:
    providers = ort.get_available_providers()
    return ["cuda", "cpu"] if "CUDAExecutionProvider" in providers else ["cpu"]


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|cuda`` to the device that will actually run."""
    if device == "auto":
        return available_devices()[0]
    if device == "cuda" and "cuda" not in available_devices():
        raise ModelError(
            "--device cuda asked for, but this onnxruntime has no CUDA provider "
            "(install onnxruntime-gpu in place of onnxruntime; see the README)"
        )
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r} (auto, cpu or cuda)")
    return device


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
    return ModelShape(layers, int(kv_heads), int(head_dim), int(vocab))


# Python < 3.13's mmap module lacks the constant; without it a mapping larger than RAM is refused
# (gemma3-270m's 32k context x 32 slots asks for 39 GB on a 24 GiB machine). Linux's value.
_MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


class _HostPool:
    """KV memory for every layer in one anonymous mapping, committed lazily."""

    def __init__(self, shape: ModelShape, slots: int, max_len: int) -> None:
        self.per_slot = shape.num_kv_heads * max_len * shape.head_dim
        per_tensor = slots * self.per_slot * 4
        self.page = mmap.PAGESIZE
        self.tensor_bytes = -(-per_tensor // self.page) * self.page
        tensors = shape.num_layers * 2
        # NORESERVE: the mapping is sized for every slot at full context, far more than is ever
        # written; the kernel must not refuse it for the size alone (overcommit heuristics).
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        self.map = mmap.mmap(-1, self.tensor_bytes * tensors, flags=flags)
        flat = np.frombuffer(self.map, dtype=np.float32)
        self.arrays = [
            flat[t * self.tensor_bytes // 4 : t * self.tensor_bytes // 4 + slots * self.per_slot].reshape(
                slots, shape.num_kv_heads, max_len, shape.head_dim
            )
            for t in range(tensors)
        ]

    def release(self, slot: int) -> None:
        for t in range(len(self.arrays)):
            start = t * self.tensor_bytes + slot * self.per_slot * 4
            end = start + self.per_slot * 4
            first = -(-start // self.page) * self.page
            last = end // self.page * self.page
            if last > first:
                self.map.madvise(mmap.MADV_DONTNEED, first, last - first)


class Runner:
    """Runs the decoder graph over slots of the KV pool (a ``ModelRunner``).

    ``forward`` takes either one slot with a chunk of tokens (prefill), or a contiguous
    range of slots with one token each (a batched decode step). Not thread-safe: the
    engine calls it from its one worker thread.
    """

    def __init__(
        self, model_path: Path, *, device: str, threads: int, slots: int, max_len: int, style: str = "genai"
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
        self._pool = _HostPool(self.shape, slots, max_len)
        self._logits = np.zeros((slots, self.shape.vocab_size), dtype=np.float32)
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
        logits = self._logits[:batch]
        self.session.run_with_iobinding(binding)
        return logits

    def _bind_cache(self, first_slot: int, batch: int) -> None:
        """Bind slots ``first_slot..+batch`` as every layer's past and present (one buffer).
        Bindings persist across runs, so this runs only when the slot range changes."""
        binding = self._binding
        kv_shape = [batch, self.shape.num_kv_heads, self.max_len, self.shape.head_dim]
        arrays = self._pool.arrays
        for layer, (past_k, present_k, past_v, present_v) in enumerate(self._kv_names):
            for array, past, present in (
                (arrays[2 * layer], past_k, present_k),
                (arrays[2 * layer + 1], past_v, present_v),
            ):
                ptr = array[first_slot].ctypes.data
                binding.bind_input(past, "cpu", 0, np.float32, kv_shape, ptr)
                binding.bind_output(present, "cpu", 0, np.float32, kv_shape, ptr)
        logits_shape = [batch, 1, self.shape.vocab_size]
        binding.bind_output("logits", "cpu", 0, np.float32, logits_shape, self._logits.ctypes.data)
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
        arrays = self._pool.arrays
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
        self._logits[:batch] = logits[:, -1, :]
        return self._logits[:batch]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of one slot's cache into another."""
        if src == dst or length == 0:
            return
        for array in self._pool.arrays:
            array[dst, :, :length] = array[src, :, :length]

    def swap_slots(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange two slots' caches (the first ``length_*`` positions of each)."""
        if a == b:
            return
        n = max(length_a, length_b)
        for array in self._pool.arrays:
            tmp = array[a, :, :n].copy()
            array[a, :, :n] = array[b, :, :n]
            array[b, :, :n] = tmp

    def release_slot(self, slot: int) -> None:
        """Give a slot's memory back to the system; its contents become zeros."""
        self._pool.release(slot)
