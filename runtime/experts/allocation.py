"""Expert slots per MoE layer from the miss curves calibration measured: one implementation,
used by the compiler's policy (at the budget it plans for) and by the run plan (at the budget of
the run), so that a run holds the allocation the profile measured for its own budget rather than
another budget's shares rescaled.

Every layer first holds its top-k plus room for its prefetch width (a prefetch into fewer slots
evicts what the running token needs), or only its top-k where the budget cannot hold that. Then
slots go one at a time to the layer where one more removes the most
expected stalls per byte: (miss(s) - miss(s + 1)) x (1 - prefetch recall) / slot bytes. A layer
nothing predicts gains most, so shallow layers are favoured exactly as far as the measurements say.
The first layer is planned as one nothing predicts even where the embedding predicts it
(planned_recall): that prediction comes only the layer's attention ahead of need, so its misses
still stall. Ties go to the layer holding fewer slots, then to the shallower one.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlotDemand:
    """What one layer's slots are worth: its demand miss rate at each measured slot count (linear
    in between, as calibration replayed it), the share of its experts the prefetcher covers at its
    width, its top-k and expert count, and the byte cost of a slot."""

    miss_slots: list[int]
    miss: list[float]
    recall: float
    top_k: int
    width: int
    num_experts: int
    cost: int = 1


def predicted_in_time(index: int) -> bool:
    """Whether a predicted layer's prediction comes a layer ahead of need: every layer's but layer 0's, whose
    prediction (the embedding graph's, Manifest.embed_predicts_next) is made only its attention before the
    layer needs it, so that its misses still stall."""
    return index != 0


def planned_recall(index: int, recall: float) -> float:
    """The prefetch recall a layer's slots are planned with: its predictor's where that comes in time, else
    none. So planned, layer 0's slots are those it had before it was predicted; planned as predicted, the
    other layers took them, for no gain measured (BENCHMARKS.md 6d)."""
    return recall if predicted_in_time(index) else 0.0


def miss_at(curve_slots: list[int], curve: list[float], slots: float) -> float:
    return float(np.interp(slots, curve_slots, curve))


def allocate_slots(layers: list[SlotDemand], budget: int) -> list[int]:
    """Whole slots per layer within `budget` (in the units of `cost`): the minimums, then the
    greedy marginal gain; every slot the budget can still pay for is given out."""
    slots = [min(d.top_k + d.width, d.num_experts) for d in layers]
    if sum(s * d.cost for s, d in zip(slots, layers)) > budget:
        slots = [min(d.top_k, d.num_experts) for d in layers]
    left = budget - sum(s * d.cost for s, d in zip(slots, layers))
    unit = min((d.cost for d in layers), default=1)

    def entry(i: int) -> tuple:
        d, s = layers[i], slots[i]
        gain = (miss_at(d.miss_slots, d.miss, s) - miss_at(d.miss_slots, d.miss, s + 1)) * (1 - d.recall)
        return -round(gain * unit / d.cost, 12), s, i

    heap = [entry(i) for i, d in enumerate(layers) if slots[i] < d.num_experts]
    heapq.heapify(heap)
    while heap:
        _, _, i = heapq.heappop(heap)
        if layers[i].cost > left:
            continue  # this layer's slot no longer fits; a cheaper layer's may
        slots[i] += 1
        left -= layers[i].cost
        if slots[i] < layers[i].num_experts:
            heapq.heappush(heap, entry(i))
    return slots
