"""Position inputs of the layer graphs: RoPE cos/sin and the additive attention mask."""

from __future__ import annotations

import numpy as np

from fate.artifacts import LayerSpec, ModelSpec
from fate.artifacts.layout import GraphIO as IO

FIRST_TABLE_ROWS = 256


def rope(spec: ModelSpec, positions: np.ndarray, inv_freq: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [S, rotary dims] as transformers computes them (float32, halves duplicated), for the
    model's frequencies or a layer's own (`inv_freq`)."""
    inv_freq = np.asarray(spec.rope_inv_freq if inv_freq is None else inv_freq, np.float32)
    freqs = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    scale = np.float32(spec.rope_attention_scaling)
    return np.cos(emb) * scale, np.sin(emb) * scale


def attention_bias(spec: ModelSpec, past: int, new: int, window: int | None = None) -> np.ndarray:
    """Additive mask [new, past+new]: causal, and windowed when the layer (or model) slides."""
    q = np.arange(past, past + new)[:, None]
    k = np.arange(past + new)[None, :]
    allowed = k <= q
    window = window or spec.sliding_window
    if window:
        allowed &= (q - k) < window
    return np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)


class PositionTables:
    """A model's RoPE cos and sin for positions 0..n-1, half the rotary dims (what GroupQueryAttention
    rotates with): grown by doubling as sequences get longer, so a step slices them instead of
    computing them again. The same float32 numbers `rope` gives for those positions. One pair of
    tables per set of frequencies: the model's, and each that layers rotate with instead."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        # frequencies -> (cos, sin); each pair replaced whole, never changed: threads may read it as it grows
        self.tables: dict[tuple[float, ...], tuple[np.ndarray, np.ndarray]] = {}

    def upto(self, total: int, inv_freq: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [total, rotary dims / 2] of the model's frequencies, or of a layer's own."""
        freq = tuple(self.spec.rope_inv_freq if inv_freq is None else inv_freq)
        empty = np.zeros((0, len(freq)), np.float32)
        cos, sin = self.tables.get(freq, (empty, empty))
        if total > len(cos):
            rows = min(max(total, 2 * len(cos), FIRST_TABLE_ROWS), max(total, self.spec.max_positions))
            cos, sin = (np.ascontiguousarray(t[:, :len(freq)]) for t in rope(self.spec, np.arange(rows), list(freq)))
            self.tables = {**self.tables, freq: (cos, sin)}
        return cos[:total], sin[:total]

    def step(self, past: int, new: int) -> "StepPositions":
        return StepPositions(self, past, new)


class StepPositions:
    """The position inputs of one step (`new` tokens after `past`), each computed once and shared by
    the attention layers that take it (LayerSpec.positions)."""

    def __init__(self, tables: PositionTables, past: int, new: int):
        self.tables, self.past, self.new = tables, past, new
        self._masks: dict[int | None, np.ndarray] = {}
        # by the layer's frequencies (None: the model's)
        self._per_token: dict[tuple[float, ...] | None, tuple[np.ndarray, np.ndarray]] = {}
        self._tables: dict[tuple[float, ...] | None, dict[str, np.ndarray]] = {}

    def for_layer(self, layer: LayerSpec) -> dict[str, np.ndarray]:
        """What `layer`'s graph takes for positions (nothing, for a mixer other than attention)."""
        if layer.mixer != "attention":
            return {}
        bias = self._masks.get(layer.sliding_window)
        if bias is None:
            bias = self._masks[layer.sliding_window] = attention_bias(self.tables.spec, self.past, self.new,
                                                                      layer.sliding_window)
        own = None if layer.rope_inv_freq is None else tuple(layer.rope_inv_freq)
        if layer.positions == "tables":
            if own not in self._tables:
                total = self.past + self.new
                cos, sin = self.tables.upto(total, layer.rope_inv_freq)
                self._tables[own] = {IO.COS_CACHE: cos, IO.SIN_CACHE: sin, IO.TOTAL_LENGTH: np.array(total, np.int32),
                                     IO.SEQLENS: np.array([total - 1], np.int32)}
            return {**self._tables[own], IO.ATTN_BIAS: bias}
        if own not in self._per_token:
            self._per_token[own] = rope(self.tables.spec, np.arange(self.past, self.past + self.new), layer.rope_inv_freq)
        cos, sin = self._per_token[own]
        return {IO.COS: cos, IO.SIN: sin, IO.ATTN_BIAS: bias}
