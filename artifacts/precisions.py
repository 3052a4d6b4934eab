"""The precisions Fate stores weights at, declared once: the name a manifest writes, the bits, whether
the weights are block-wise quantized (MatMulNBits, the layout the native kernel and the slots read) and
the block size the compiler uses unless told. Everything else (the compiler's --bits choices, the
profiler's measured precisions, the manifest's checks, the slot layouts) is derived from this table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    bits: int
    default_block: int | None = None  # block-wise quantized (MatMulNBits) when set; None: float weights

    @property
    def quantized(self) -> bool:
        return self.default_block is not None


PRECISIONS = (
    Precision("fp32", 32),
    Precision("fp16", 16),
    Precision("int8", 8, default_block=128),
    Precision("int4", 4, default_block=128),  # 128 against 32: half the load time for +0.27% perplexity
    Precision("int2", 2, default_block=32),  # INT2 loses the output at 128
)
BY_NAME = {p.name: p for p in PRECISIONS}
BY_BITS = {p.bits: p for p in PRECISIONS}
PRECISION_BITS = {p.name: p.bits for p in PRECISIONS}
QUANTIZED = tuple(p for p in PRECISIONS if p.quantized)
QUANTIZED_BITS = tuple(p.bits for p in QUANTIZED)  # what MatMulNBits, the slot layouts and the kernel take
DEFAULT_BLOCK_SIZE = {p.bits: p.default_block for p in QUANTIZED}
