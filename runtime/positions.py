"""Position inputs of the layer graphs: RoPE cos/sin and the additive attention mask."""

from __future__ import annotations

import numpy as np

from fate.artifacts import ModelSpec


def rope(spec: ModelSpec, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [S, rotary dims] as transformers computes them (float32, halves duplicated)."""
    inv_freq = np.asarray(spec.rope_inv_freq, np.float32)
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
