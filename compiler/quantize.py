"""Block-wise weight quantization in onnxruntime's MatMulNBits layout, and its numpy reference.

MatMulNBits computes Y = A @ dequant(B)^T with, for output column n and K-block j,
    dequant(B)[n, j*bs:(j+1)*bs] = (code - zero_point[n, j]) * scale[n, j]
Layout (from the com.microsoft contrib-op spec): B is uint8 [N, n_blocks, bs*bits/8] with codes
packed low bits first along K; scales float [N * n_blocks]; zero points uint8, packed the same
way per row ([N * ceil(n_blocks*bits/8)]). K is zero-padded to a multiple of the block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fate.artifacts import precisions
from fate.artifacts.precisions import QUANTIZED_BITS

from .onnx_builder import MS_DOMAIN, GraphBuilder

SUPPORTED_BITS = QUANTIZED_BITS

# Group size along K when the user names none. 128 (GPTQ's and AWQ's usual group, and onnxruntime's
# quantizer default) for 8 and 4 bits: measured here on a 2048x1408 INT4 expert, block 128 against 32
# halves session creation (7.6 -> 3.7 ms, the cost of every cache miss), runs 25% faster and stores
# 16% fewer bytes, for 1.3x the output error on random weights and perplexity x1.0075 instead of
# x1.0048 on the trained example. INT2 keeps 32: at 128 its error reaches the size of the output.
DEFAULT_BLOCK_SIZE = precisions.DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class QuantizedWeight:
    packed: np.ndarray  # uint8 [N, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray  # uint8 [N * ceil(n_blocks * bits / 8)]
    n: int
    k: int
    bits: int
    block_size: int

    @staticmethod
    def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """The weights one above the other, [sum N, K]: each row keeps its own blocks, scales and
        (byte-padded) zero points, so the stack computes exactly what the parts do."""
        first = parts[0]
        if any((p.k, p.bits, p.block_size) != (first.k, first.bits, first.block_size) for p in parts):
            raise ValueError("stacked weights need one K, bit width and block size")
        return QuantizedWeight(np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
                               np.concatenate([p.zero_points for p in parts]), sum(p.n for p in parts),
                               first.k, first.bits, first.block_size)


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 codes (< 2**bits) into bytes, first code in the low bits."""
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), np.uint8)], axis=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint8)
    out = np.zeros(grouped.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= grouped[..., i] << np.uint8(i * bits)
    return out


def _unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(i * bits)) & mask for i in range(per_byte)]
    codes = np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)
    return codes[..., :count]


def quantize(weight: np.ndarray, bits: int, block_size: int | None = None) -> QuantizedWeight:
    """Asymmetric min/max quantization of weight [N, K] (a Linear's [out, in] layout) in blocks of
    `block_size` along K (None: DEFAULT_BLOCK_SIZE), a band of rows at a time: a 151,936 x 2,048
    LM head would otherwise need three float32 copies at once."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE[bits]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size must be a power of two >= 16, got {block_size}")
    n, k = weight.shape
    n_blocks = -(-k // block_size)
    zero_row = -(-n_blocks * bits // 8)
    packed = np.empty((n, n_blocks, block_size * bits // 8), np.uint8)
    scales = np.empty(n * n_blocks, np.float32)
    zero_points = np.empty(n * zero_row, np.uint8)
    for i, j in _bands(n, k):
        band = _quantize_rows(np.asarray(weight[i:j], dtype=np.float32), bits, block_size)
        packed[i:j], scales[i * n_blocks:j * n_blocks], zero_points[i * zero_row:j * zero_row] = band
    return QuantizedWeight(packed=packed, scales=scales, zero_points=zero_points,
                           n=n, k=k, bits=bits, block_size=block_size)


ROWS_ELEMENTS = 1 << 22  # weights quantized per band: 16 MB of float32 temporaries


def _bands(rows: int, cols: int):
    """(start, stop) row ranges of about ROWS_ELEMENTS weights each."""
    step = max(1, ROWS_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _quantize_rows(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed codes, scales, packed zero points) of float32 rows w [n, K]."""
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block_size)
    levels = (1 << bits) - 1
    # Zero stays exactly representable (padding, and weights that are exactly zero).
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, levels).astype(np.uint8)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, levels).astype(np.uint8)
    return _pack_low_first(codes, bits), scale.reshape(-1), _pack_low_first(zero, bits).reshape(-1)


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """The float [N, K] weight that MatMulNBits multiplies by: the reference for tests."""
    n_blocks = q.packed.shape[1]
    codes = _unpack_low_first(q.packed, q.bits, q.block_size).astype(np.float32)
    zero = _unpack_low_first(q.zero_points.reshape(q.n, -1), q.bits, n_blocks).astype(np.float32)
    scale = q.scales.reshape(q.n, n_blocks)
    w = (codes - zero[..., None]) * scale[..., None]
    return w.reshape(q.n, -1)[:, : q.k]


def matmul_nbits(b: GraphBuilder, x: str, q: QuantizedWeight, accuracy_level: int = 0, prefix: str | None = None) -> str:
    """x [..., K] @ dequant(q)^T through com.microsoft.MatMulNBits with constant weights
    (constant initializers are what onnxruntime prepacks; fed as inputs it is ~70x slower).
    accuracy_level 4 lets onnxruntime quantize the activations to int8 per block for an integer
    dot product (measured here: about 3x faster for a 2048x1408 INT4 expert on one core);
    0 computes in float32, exactly the numpy reference. `prefix` names the three initializers
    `{prefix}.qweight`, `{prefix}.scales`, `{prefix}.zero_points` (expert graphs: the slot layout)."""
    named = (lambda part: f"{prefix}.{part}") if prefix else (lambda part: None)
    return b.op(
        "MatMulNBits", x,
        b.const(q.packed, "qweight", named("qweight")), b.const(q.scales, "scales", named("scales")),
        b.const(q.zero_points, "zero_points", named("zero_points")),
        domain=MS_DOMAIN, K=q.k, N=q.n, bits=q.bits, block_size=q.block_size, accuracy_level=accuracy_level,
    )


def quantize_rows_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 per row, for lookup tables (embeddings) that are gathered, not multiplied:
    (codes int8 [V, H], scales float32 [V, 1]) with table ~= codes * scales. A band of rows at a time."""
    v, h = table.shape
    codes, scales = np.empty((v, h), np.int8), np.empty((v, 1), np.float32)
    for i, j in _bands(v, h):
        t = np.asarray(table[i:j], dtype=np.float32)
        scale = np.abs(t).max(axis=1, keepdims=True) / 127.0
        scales[i:j] = np.where(scale > 0, scale, 1.0)
        codes[i:j] = np.clip(np.round(t / scales[i:j]), -127, 127)
    return codes, scales


def dequantize_rows(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scales
