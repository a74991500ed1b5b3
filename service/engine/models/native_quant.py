"""Map GGUF quantized tensors onto ONNX Runtime ``MatMulNBits`` with the file's own values.

No re-quantization: every format is decoded to its integer codes and per-block scales, and
those are laid out as ``MatMulNBits`` wants them (``com.microsoft``):

* ``B`` uint8 ``[N, n_blocks, block_size * bits / 8]`` (4-bit: element ``2j`` in the low
  nibble of byte ``j``);
* ``scales`` float32 ``[N * n_blocks]``;
* no ``zero_points``: every code is stored around the op's default zero point
  (``2 ** (bits - 1)``: 8 or 128).

Formats with a per-block minimum (``w = scale * q + min``: Q4_1, Q5_1 and the K-quants
except Q3_K/Q6_K) keep integer zero points (float zero points leave ORT's fast kernels) and
carry ``mins`` ``[N, n_blocks]`` separately: ``x @ min_term.T`` equals the block sums of
``x`` times ``mins``, a product 1/``block_size`` the size of the weight. Their codes are
centred on the op's default zero point, ``c`` (half their range) moving into the minimum:
``w = scale * (q - c) + (min + c * scale)``.

+--------+------+-------+-------------------------------+-----------------------+
| type   | bits | block | codes (zero point)            | mins                  |
+========+======+=======+===============================+=======================+
| Q4_0   | 4    | 32    | q (8, the default)            | no                    |
| Q4_1   | 4    | 32    | q (8)                         | min + 8 scale         |
| Q4_K   | 4    | 32    | q (8)                         | min + 8 scale         |
| Q2_K   | 4    | 16    | q + 6 (8)                     | min + 2 scale         |
| Q3_K   | 4    | 16    | q + 8 (8)                     | no                    |
| Q8_0   | 8    | 32    | q + 128 (128, the default)    | no                    |
| Q5_0   | 8    | 32    | q + 112 (128)                 | no                    |
| Q5_1   | 8    | 32    | q + 112 (128)                 | min + 16 scale        |
| Q5_K   | 8    | 32    | q + 112 (128)                 | min + 16 scale        |
| Q6_K   | 8    | 16    | q + 96 (128)                  | no                    |
+--------+------+-------+-------------------------------+-----------------------+

Every scale is computed in float32 exactly as ``gguf.quants.dequantize`` computes it
(``f16 d`` times the integer sub-scale), so the product differs from the dequantized one
only by float rounding (summation order, and the one addition of the centred minimum).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as T

QK_K = 256

#: Block layout of a type's values: (bits, block_size, has_mins).
LAYOUTS: dict[T, tuple[int, int, bool]] = {
    T.Q4_0: (4, 32, False),
    T.Q4_1: (4, 32, True),
    T.Q4_K: (4, 32, True),
    T.Q2_K: (4, 16, True),
    T.Q3_K: (4, 16, False),
    T.Q8_0: (8, 32, False),
    T.Q5_0: (8, 32, False),
    T.Q5_1: (8, 32, True),
    T.Q5_K: (8, 32, True),
    T.Q6_K: (8, 16, False),
}
NATIVE_TYPES = frozenset(LAYOUTS)


@dataclass(frozen=True, slots=True)
class NativeWeight:
    """A weight [N, K] in MatMulNBits form: ``w = scale * (code - zero_point) + min``, the
    zero point being the op's default for the width (8 or 128)."""

    codes: np.ndarray  # uint8 [N, n_blocks, block_size], one code per element (unpacked)
    scales: np.ndarray  # float32 [N, n_blocks]
    mins: np.ndarray | None  # float32 [N, n_blocks]
    bits: int
    block_size: int

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def k(self) -> int:
        return int(self.codes.shape[1] * self.codes.shape[2])

    @property
    def n_blocks(self) -> int:
        return int(self.codes.shape[1])

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def packed(self) -> np.ndarray:
        """``B`` input: uint8 [N, n_blocks, blob]."""
        if self.bits == 8:
            return np.ascontiguousarray(self.codes)
        return np.ascontiguousarray(self.codes[:, :, 0::2] | (self.codes[:, :, 1::2] << 4))

    def flat_scales(self) -> np.ndarray:
        return np.ascontiguousarray(self.scales.reshape(-1), dtype=np.float32)

    def dequantize(self) -> np.ndarray:
        """The float32 [N, K] weight this stands for (for tests)."""
        w = (self.codes.astype(np.float32) - np.float32(self.zero_point)) * self.scales[:, :, None]
        if self.mins is not None:
            w = w + self.mins[:, :, None]
        return np.asarray(w.reshape(self.n, self.k), dtype=np.float32)

    def with_layout(self, bits: int, block_size: int, with_mins: bool) -> NativeWeight:
        """The same values in a wider or finer layout (for concatenating mixed-type rows)."""
        if bits < self.bits or block_size > self.block_size or self.block_size % block_size:
            raise ValueError(f"cannot narrow {self.bits}-bit/{self.block_size} to {bits}-bit/{block_size}")
        split = self.block_size // block_size
        codes = self.codes.reshape(self.n, self.n_blocks * split, block_size)
        if bits != self.bits:
            codes = codes.astype(np.int32) + (1 << (bits - 1)) - self.zero_point
        scales = np.repeat(self.scales, split, axis=1)
        mins = None if self.mins is None else np.repeat(self.mins, split, axis=1)
        if with_mins and mins is None:
            mins = np.zeros_like(scales)
        if mins is not None and not with_mins:
            raise ValueError("cannot drop the minimums of a weight that has them")
        return NativeWeight(codes.astype(np.uint8), scales, mins, bits, block_size)


def concat_rows(weights: Sequence[NativeWeight]) -> NativeWeight:
    """Stack weights along N (packed QKV), in the widest bits and finest blocks among them."""
    bits = max(w.bits for w in weights)
    block_size = min(w.block_size for w in weights)
    with_mins = any(w.mins is not None for w in weights)
    parts = [w.with_layout(bits, block_size, with_mins) for w in weights]
    mins = None if not with_mins else np.concatenate([p.mins for p in parts if p.mins is not None])
    return NativeWeight(
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        mins,
        parts[0].bits,
        block_size,
    )


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian f16 bytes [..., 2] to float32 [..., 1]."""
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Bytes [b, m] split into groups of ``group`` bytes: low nibbles then high ones per group."""
    b, m = qs.shape
    grouped = qs.reshape(b, m // group, 1, group)
    return ((grouped >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(b, -1)


def _crumbs(qs: np.ndarray, group: int, width: int) -> np.ndarray:
    """Bytes [b, m] in groups of ``group``: bit-fields of ``width`` bits, lowest first per group."""
    b, m = qs.shape
    shifts = np.arange(0, 8, width, dtype=np.uint8).reshape(1, 1, -1, 1)
    grouped = qs.reshape(b, m // group, 1, group)
    return ((grouped >> shifts) & ((1 << width) - 1)).reshape(b, -1)


def _high_bits(qh: np.ndarray, values: int) -> np.ndarray:
    """Bit ``i`` of a little-endian bit field [b, values / 8] for i < values: [b, values]."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[:, :values]


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit mins."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


# Each decoder takes raw blocks [b, type_size] and returns (codes [b, elements], scales [b, subblocks],
# mins [b, subblocks] or None): codes around the width's default zero point where there are no
# mins, else the format's unsigned values (from_gguf centres them).
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _q4_0(raw: np.ndarray) -> Decoded:
    return _nibbles(raw[:, 2:], 16), _f16(raw[:, 0:2]), None


def _q4_1(raw: np.ndarray) -> Decoded:
    return _nibbles(raw[:, 4:], 16), _f16(raw[:, 0:2]), _f16(raw[:, 2:4])


def _q5_0(raw: np.ndarray) -> Decoded:
    q = _nibbles(raw[:, 6:], 16) | (_high_bits(raw[:, 2:6], 32) << 4)
    return q + 112, _f16(raw[:, 0:2]), None


def _q5_1(raw: np.ndarray) -> Decoded:
    q = _nibbles(raw[:, 8:], 16) | (_high_bits(raw[:, 4:8], 32) << 4)
    return q, _f16(raw[:, 0:2]), _f16(raw[:, 2:4])


def _q8_0(raw: np.ndarray) -> Decoded:
    q = np.ascontiguousarray(raw[:, 2:]).view(np.int8).astype(np.int16) + 128
    return q.astype(np.uint8), _f16(raw[:, 0:2]), None


def _q2_k(raw: np.ndarray) -> Decoded:
    scales, qs = raw[:, 0:16], raw[:, 16:80]
    d, dmin = _f16(raw[:, 80:82]), _f16(raw[:, 82:84])
    q = _crumbs(qs, 32, 2)
    return q, d * (scales & 0x0F).astype(np.float32), -(dmin * (scales >> 4).astype(np.float32))


def _q3_k(raw: np.ndarray) -> Decoded:
    hmask, qs, packed, d = raw[:, 0:32], raw[:, 32:96], raw[:, 96:108], _f16(raw[:, 108:110])
    low = np.concatenate([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], axis=-1)
    high = _crumbs(packed[:, 8:12], 4, 2)
    sc = (low | (high << 4)).astype(np.float32) - 32.0
    ql = _crumbs(qs, 32, 2)
    qh = ((hmask.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)
    # A clear high bit subtracts 4: q = ql - 4 * (1 - qh) in -4..3, stored as q + 8.
    return ql + 4 + 4 * qh, d * sc, None


def _q4_k(raw: np.ndarray) -> Decoded:
    d, dmin = _f16(raw[:, 0:2]), _f16(raw[:, 2:4])
    sc, mn = _k_scale_min(raw[:, 4:16])
    return _nibbles(raw[:, 16:], 32), d * sc, -(dmin * mn)


def _q5_k(raw: np.ndarray) -> Decoded:
    d, dmin = _f16(raw[:, 0:2]), _f16(raw[:, 2:4])
    sc, mn = _k_scale_min(raw[:, 4:16])
    qh = raw[:, 16:48]
    high = ((qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)
    q = _nibbles(raw[:, 48:], 32) | (high << 4)
    return q, d * sc, -(dmin * mn)


def _q6_k(raw: np.ndarray) -> Decoded:
    ql, qh, scales, d = raw[:, 0:128], raw[:, 128:192], raw[:, 192:208], _f16(raw[:, 208:210])
    q = _nibbles(ql, 64) | (_crumbs(qh, 32, 2) << 4)
    return q + 96, d * scales.view(np.int8).astype(np.float32), None


_DECODERS: dict[T, Callable[[np.ndarray], Decoded]] = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q4_K: _q4_k,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q8_0: _q8_0,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}
# Formats with minimums: the middle of their values' range (Q2_K's are 2-bit, Q5's 5-bit).
_CENTRES = {T.Q4_1: 8, T.Q4_K: 8, T.Q2_K: 2, T.Q5_1: 16, T.Q5_K: 16}


def from_gguf(raw: np.ndarray, qtype: T, k: int) -> NativeWeight:
    """``raw``: the tensor's bytes as ``GGUFReader`` gives them, uint8 [N, K / elements * type_size]."""
    if qtype not in _DECODERS:
        raise ValueError(f"{qtype.name} has no native MatMulNBits mapping")
    bits, block_size, _ = LAYOUTS[qtype]
    elements = QK_K if qtype in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K) else 32
    rows = np.asarray(raw, dtype=np.uint8)
    n = rows.shape[0]
    if k % elements or rows.size % (n * (k // elements)):
        raise ValueError(f"{qtype.name} tensor of {rows.shape} bytes does not hold {n}x{k} values")
    blocks = rows.reshape(n * (k // elements), -1)
    codes, scales, mins = _DECODERS[qtype](blocks)
    n_blocks = k // block_size
    codes = codes.reshape(n, n_blocks, block_size)
    scales = scales.astype(np.float32).reshape(n, n_blocks)
    if mins is not None:
        # Centre the codes on the op's default zero point and move the difference into the
        # minimum: w = scale * (q - c) + (min + c * scale). Summed with uncentred codes, the
        # int8-quantized activations' rounding (accuracy level 4) would be multiplied by the
        # codes' mean and no longer cancel against the exact minimum term.
        centre = _CENTRES[qtype]
        codes = codes.astype(np.int16) + (1 << (bits - 1)) - centre
        mins = mins.astype(np.float32).reshape(n, n_blocks) + np.float32(centre) * scales
    return NativeWeight(
        codes=np.ascontiguousarray(codes.astype(np.uint8)),
        scales=np.ascontiguousarray(scales),
        mins=None if mins is None else np.ascontiguousarray(mins, dtype=np.float32),
        bits=bits,
        block_size=block_size,
    )


def stack_rows(parts: Sequence[np.ndarray | NativeWeight]) -> np.ndarray | NativeWeight:
    """Stack weights along N: native ones natively, float ones (or a mix) as float32."""
    natives = [p for p in parts if isinstance(p, NativeWeight)]
    if len(natives) == len(parts):
        return concat_rows(natives)
    return np.concatenate([p.dequantize() if isinstance(p, NativeWeight) else p for p in parts])
