"""Where the runner's KV cache lives: host memory, or memory of an ONNX Runtime device.

Both pools hold one tensor per layer and kind (key, value), ``[slots, kv_heads, max_len,
head_dim]``, and give the runner the address of a slot; the runner binds a contiguous range of
slots as both past and present of every ``GroupQueryAttention`` node (its shared-buffer mode).

* :class:`HostPool`: anonymous ``mmap`` memory, committed only when written; releasing a slot
  hands its pages back (``MADV_DONTNEED``). Slot moves are numpy slices. On the CPU provider.
* :class:`DevicePool`: ``OrtValue`` tensors allocated once, whole, by ONNX Runtime on a device
  (``"cuda"``, or ``"cpu"``, which runs the very same code so CI covers it). Slot copies and
  swaps run on that device as a tiny ONNX graph of ``Identity`` nodes bound with IO binding to
  the slots' addresses: nothing crosses to the host. ``release`` frees nothing (the memory is
  preallocated); the slot's contents are simply no longer read.

Why a copy graph rather than a layout that needs no moves (a slot table the attention reads):
``GroupQueryAttention`` reads one contiguous batch of caches, with no indirection, so a batch
must be contiguous slots; the engine moves a slot only when it compacts the batch or reuses a
prefix, rarely against the decode steps, and a move is one device-to-device copy per tensor.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from service.engine.model_runner import ModelShape
from service.errors import ModelError

__all__ = ["DevicePool", "HostPool", "KVPool", "copy_graph"]

# Python < 3.13's mmap module lacks the constant; without it a mapping larger than RAM is refused
# (gemma3-270m's 32k context x 32 slots asks for 39 GB on a 24 GiB machine). Linux's value.
_MAP_NORESERVE: int = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform == "linux" else 0)


class KVPool(Protocol):
    """``2 * layers`` tensors (layer i: key at ``2i``, value at ``2i + 1``) of ``slots`` caches."""

    @property
    def location(self) -> str:
        """The ONNX Runtime device type of the memory (``"cpu"`` or ``"cuda"``)."""
        ...

    @property
    def dtype(self) -> type[np.floating[Any]]: ...

    def address(self, tensor: int, slot: int) -> int:
        """The address of ``slot`` in tensor ``tensor`` (slots are contiguous, in order)."""
        ...

    def copy(self, src: int, dst: int, length: int) -> None: ...

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first ``length`` positions of two slots."""
        ...

    def release(self, slot: int) -> None: ...


class HostPool:
    """KV memory for every layer in one anonymous mapping, committed lazily."""

    location = "cpu"

    def __init__(self, shape: ModelShape, slots: int, max_len: int, dtype: type[np.floating[Any]]) -> None:
        self.dtype = dtype
        self.itemsize = np.dtype(dtype).itemsize
        self.per_slot = shape.num_kv_heads * max_len * shape.head_dim
        per_tensor = slots * self.per_slot * self.itemsize
        self.page = mmap.PAGESIZE
        self.tensor_bytes = -(-per_tensor // self.page) * self.page
        tensors = shape.num_layers * 2
        # NORESERVE: the mapping is sized for every slot at full context, far more than is ever
        # written; the kernel must not refuse it for the size alone (overcommit heuristics).
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        self.map = mmap.mmap(-1, self.tensor_bytes * tensors, flags=flags)
        flat = np.frombuffer(self.map, dtype=dtype)
        step = self.tensor_bytes // self.itemsize
        self.arrays = [
            flat[t * step : t * step + slots * self.per_slot].reshape(
                slots, shape.num_kv_heads, max_len, shape.head_dim
            )
            for t in range(tensors)
        ]

    def address(self, tensor: int, slot: int) -> int:
        return int(self.arrays[tensor][slot].ctypes.data)

    def copy(self, src: int, dst: int, length: int) -> None:
        for array in self.arrays:
            array[dst, :, :length] = array[src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        for array in self.arrays:
            tmp = array[a, :, :length].copy()
            array[a, :, :length] = array[b, :, :length]
            array[b, :, :length] = tmp

    def release(self, slot: int) -> None:
        for t in range(len(self.arrays)):
            start = t * self.tensor_bytes + slot * self.per_slot * self.itemsize
            end = start + self.per_slot * self.itemsize
            first = -(-start // self.page) * self.page
            last = end // self.page * self.page
            if last > first:
                self.map.madvise(mmap.MADV_DONTNEED, first, last - first)


class DevicePool:
    """KV memory allocated whole on an ONNX Runtime device; slot moves run on that device.

    One slot more than asked for is kept as scratch for swaps. ``providers`` are the session's,
    so the copy graph runs where the cache is.
    """

    def __init__(
        self,
        shape: ModelShape,
        slots: int,
        max_len: int,
        dtype: type[np.floating[Any]],
        *,
        device: str,
        providers: list[str],
        device_id: int = 0,
    ) -> None:
        self.location = device
        self.dtype = dtype
        self.device_id = device_id
        self.itemsize = np.dtype(dtype).itemsize
        self.slots = slots
        self.max_len = max_len
        self.head_dim = shape.head_dim
        self.kv_heads = shape.num_kv_heads
        self.per_slot = shape.num_kv_heads * max_len * shape.head_dim
        self._scratch = slots
        dims = [slots + 1, shape.num_kv_heads, max_len, shape.head_dim]
        try:
            self.values = [
                ort.OrtValue.ortvalue_from_shape_and_type(dims, dtype, device, device_id)
                for _ in range(shape.num_layers * 2)
            ]
        except Exception as exc:  # onnxruntime raises its own untyped exceptions (out of memory)
            total = (slots + 1) * self.per_slot * self.itemsize * shape.num_layers * 2
            raise ModelError(
                f"cannot allocate the KV cache on {device} ({total / 2**30:.2f} GiB for {slots} chats "
                f"of {max_len} positions): {exc}; lower --kv-budget-mb or --max-context"
            ) from exc
        self._bases = [int(value.data_ptr()) for value in self.values]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        graph = copy_graph(len(self.values), helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        self._session = ort.InferenceSession(graph.SerializeToString(), options, providers=providers)
        self._binding = self._session.io_binding()
        self._element_type = np.dtype(dtype).type

    def address(self, tensor: int, slot: int) -> int:
        return self._bases[tensor] + slot * self.per_slot * self.itemsize

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy a slot's first ``length`` positions of every head into another slot.

        Each head's positions are contiguous and heads follow each other at ``max_len``
        positions apart, so one contiguous range from the slot's start covers them all: the
        last head's ``length`` positions and, before them, whole heads. Positions past
        ``length`` in the destination are undefined anyway, so copying them does no harm."""
        count = ((self.kv_heads - 1) * self.max_len + length) * self.head_dim
        binding = self._binding
        for t in range(len(self.values)):
            binding.bind_input(
                f"x{t}", self.location, self.device_id, self._element_type, [count], self.address(t, src)
            )
            binding.bind_output(
                f"y{t}", self.location, self.device_id, self._element_type, [count], self.address(t, dst)
            )
        self._session.run_with_iobinding(binding)

    def swap(self, a: int, b: int, length: int) -> None:
        self.copy(a, self._scratch, length)
        self.copy(b, a, length)
        self.copy(self._scratch, b, length)

    def release(self, slot: int) -> None:
        """Nothing to hand back: the pool is allocated once, whole."""


def copy_graph(tensors: int, elem_type: int) -> onnx.ModelProto:
    """``y{i} = Identity(x{i})`` for 1-D tensors of any length: one run copies every tensor."""
    inputs = [helper.make_tensor_value_info(f"x{t}", elem_type, ["n"]) for t in range(tensors)]
    outputs = [helper.make_tensor_value_info(f"y{t}", elem_type, ["n"]) for t in range(tensors)]
    nodes = [helper.make_node("Identity", [f"x{t}"], [f"y{t}"], name=f"copy{t}") for t in range(tensors)]
    graph = helper.make_graph(nodes, "kv_copy", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model
