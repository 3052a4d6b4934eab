"""Quality of an artifact on text: perplexity over fixed windows (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np



@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int

    @property
    def value(self) -> float:
        return float(np.exp(self.nll))


def windows(ids: list[int], size: int) -> Iterator[list[int]]:
    """Consecutive non-overlapping windows of `size` tokens (the last partial one dropped)."""
    for start in range(0, len(ids) - size + 1, size):
        yield ids[start : start + size]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def perplexity(logits_of: Callable[[list[int]], np.ndarray], ids: list[int], window: int) -> Perplexity:
    """Perplexity of any logits function (a Fate model, or a reference) on the same windows:
    each window starts from an empty context, every token after its first is predicted."""
    total, count = 0.0, 0
    for chunk in windows(ids, window):
        logp = log_softmax(logits_of(chunk))
        total -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    if not count:
        raise ValueError(f"text too short: fewer than {window} tokens")
    return Perplexity(total / count, count)
