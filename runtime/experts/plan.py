"""The run plan: what a budget becomes on this run, as a pure function of the artifact's manifest
and profile, the flags, and which precisions the native executor runs (a property of the build
and the artifact, not a timing), so the same command always plans the same run.

Per MoE layer: the resident precision, a fixed number of slots (allocated at this run's budget
from the profile's miss curves and prediction recall, as the compiler plans; without a profile,
the policy's cache shares, or uniform), at least top-k each, the predictor and its width, and
whether the least popular tail of a prefill moves at INT2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from fate.artifacts import ArtifactError, LayerPolicy, Manifest
from fate.artifacts.budget import Budget
from fate.artifacts.predictors import GRAPH_PREDICTORS, Predictor
from fate.artifacts.profile import Profile

from .allocation import SlotDemand, allocate_slots, planned_recall, predicted_in_time
from .executors import SESSION_RESIDENT_FACTOR
from .pool import slot_size
from .residency import BudgetError

PREFETCH_MODES = ("policy", "cross-layer", "eap", "none")
LOW_BIT_PREFILL_MODES = ("auto", "on", "off")
ALLOCATIONS = ("policy", "uniform")
POOLS = ("global", "per-layer")


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer as this run executes it."""

    index: int
    precision: str
    slot_bytes: int  # one slot: the layer's largest expert file at `precision`, in whole pages
    cost_bytes: int  # what one resident expert costs (the slot, or its session)
    slots: int
    predictor: str  # cross_layer, cross_layer_norm, eap or none
    width: int
    low_share: float
    low_precision: str | None

    @property
    def stalls_on_misses(self) -> bool:
        """Its misses are read only once they are needed, or (layer 0, predicted from the embedding) only its
        attention before: planned as a layer nothing predicts (allocation.planned_recall)."""
        return self.width <= 0 or not predicted_in_time(self.index)


@dataclass(frozen=True)
class RunPlan:
    layers: dict[int, LayerPlan]
    budget_bytes: int  # what the slots hold: sum of slots x cost
    total_expert_bytes: int  # every expert resident, at the same cost
    # a sequence's fixed-size layer state (hybrid models), held beside the slots: a budget in bytes
    # covers both, a share of the experts covers the slots only
    state_bytes: int = 0


def plan_run(manifest: Manifest, profile: Profile | None, budget: Budget, precision: Callable[[int], str],
             file_bytes: Callable[[int, str], int], runs_native: Callable[[int, str], bool],
             prefetch: str = "policy", allocation: str = "policy", low_bit_prefill: str = "off",
             pool: str = "global") -> RunPlan:
    """precision(layer): its resident precision; file_bytes(layer, precision): its largest expert
    file; runs_native(layer, precision): whether the native executor computes it from its slot;
    pool: one pool shared by the layers, or per-layer quotas (POOLS)."""
    if prefetch not in PREFETCH_MODES:
        raise ArtifactError(f"unknown prefetch mode {prefetch!r}; choose from {', '.join(PREFETCH_MODES)}")
    if low_bit_prefill not in LOW_BIT_PREFILL_MODES:
        raise ArtifactError(f"unknown INT2 prefill mode {low_bit_prefill!r}; choose from "
                            f"{', '.join(LOW_BIT_PREFILL_MODES)}")
    if allocation not in ALLOCATIONS:
        raise ArtifactError(f"unknown allocation {allocation!r}; choose from {', '.join(ALLOCATIONS)}")
    if prefetch == "eap" and profile is None:
        raise ArtifactError("--prefetch eap needs the transition counts of a calibrated artifact")
    layers = manifest.moe_layers
    decided = {l.index: manifest.policy.layer(l.index) if manifest.policy else None for l in layers}
    chosen = {l.index: precision(l.index) for l in layers}
    slot = {i: slot_size(file_bytes(i, p)) for i, p in chosen.items()}
    cost = {i: slot[i] if runs_native(i, chosen[i]) else int(file_bytes(i, chosen[i]) * SESSION_RESIDENT_FACTOR)
            for i in chosen}
    total = sum(cost[l.index] * l.routing.num_experts for l in layers)
    state = manifest.state_bytes
    limit = budget.bytes_of(total) - (state if budget.bytes is not None else 0)
    minimum = sum(cost[l.index] * l.routing.top_k for l in layers)
    if limit < minimum:
        beside = f" beside the layers' state of {state / 1e6:.1f} MB" if budget.bytes is not None and state else ""
        raise BudgetError(f"a budget of {budget.bytes_of(total) / 1e6:.1f} MB cannot hold one token's experts in "
                          f"every layer{beside}; the minimum is {minimum / 1e6:.1f} MB ({minimum / total:.1%} of "
                          "the experts)", needed=minimum + (state if budget.bytes is not None else 0))
    predictors = {l.index: predictor_for(manifest, profile, l.index, decided[l.index], l.routing.top_k, prefetch)
                  for l in layers}
    if allocation == "policy" and profile is not None:
        slots = measured_slots(layers, profile, predictors, cost, limit)
    else:
        shares = {l.index: 1 / len(layers) for l in layers}
        if allocation == "policy" and manifest.policy:
            shares = {i: decided[i].cache_share for i in shares}
        slots = whole_slots(layers, shares, cost, limit)
    plans = {}
    for l in layers:
        predictor, width = predictors[l.index]
        # Within a layer's own quota, prefetching into the slots the running experts need evicts them: with 5
        # slots, top-2 and width 5, tiny-moe at 50% loaded 2.2x the bytes of load-on-demand for 4.6% more hits.
        # One pool evicts from every layer and never the running layer's experts or another's predictions
        # (residency.ExpertCache): a layer with no more slots than its top-k still reads ahead there.
        if pool == "per-layer":
            width = min(width, max(0, slots[l.index] - l.routing.top_k))
        low = decided[l.index].prefill_precision if decided[l.index] and low_bit_prefill != "off" else None
        # INT2 copies save transfer bytes; where a load builds a session (CPU work), a smaller file
        # does not load faster (INT2 block 32 creates slower than INT4 block 128), so "auto" uses
        # them only where they run from their bytes
        if low is not None and low_bit_prefill == "auto" and not runs_native(l.index, low):
            low = None
        plans[l.index] = LayerPlan(l.index, chosen[l.index], slot[l.index], cost[l.index], slots[l.index], predictor,
                                   width, decided[l.index].prefill_low_share if low else 0.0, low)
    return RunPlan(plans, sum(p.slots * p.cost_bytes for p in plans.values()), total, state)


def measured_slots(layers, profile: Profile, predictors: dict[int, tuple[str, int]], cost: dict[int, int],
                   budget: int) -> dict[int, int]:
    """Slots at this run's budget from the profile's miss curves and each predictor's recall at
    its width (runtime.experts.allocation, as the compiler plans)."""
    demands = []
    for l in layers:
        measured = profile.layer(l.index)
        name, width = predictors[l.index]
        curve = measured.predictors.get(name)
        recall = float(np.interp(width, curve.widths, curve.decode)) if curve is not None and width > 0 else 0.0
        demands.append(SlotDemand(measured.miss_curve_slots, measured.miss_curve, planned_recall(l.index, recall),
                                  l.routing.top_k, width,
                                  l.routing.num_experts, cost[l.index]))
    return dict(zip((l.index for l in layers), allocate_slots(demands, budget)))


def whole_slots(layers, shares: dict[int, float], cost: dict[int, int], budget: int) -> dict[int, int]:
    """Whole expert slots per layer from the shares, each at least top-k, within the budget."""
    slots = {l.index: l.routing.top_k for l in layers}
    left = budget - sum(slots[i] * cost[i] for i in slots)
    total_share = sum(shares.values()) or 1.0
    want = {l.index: max(0.0, shares[l.index] / total_share * budget / cost[l.index] - slots[l.index])
            for l in layers}
    for l in sorted(layers, key=lambda l: (-want[l.index], l.index)):  # largest wishes first
        extra = min(int(want[l.index]), l.routing.num_experts - slots[l.index], left // cost[l.index])
        slots[l.index] += extra
        left -= extra * cost[l.index]
    for l in sorted(layers, key=lambda l: (-(want[l.index] % 1), l.index)):  # then leftovers, one slot each
        if slots[l.index] < l.routing.num_experts and left >= cost[l.index]:
            slots[l.index] += 1
            left -= cost[l.index]
    return slots


def predictor_for(manifest: Manifest, profile: Profile | None, index: int, decided: LayerPolicy | None, top_k: int,
                  mode: str) -> tuple[str, int]:
    """(predictor, width) of a layer. `policy`: what the compiler measured best (which may be EAP or
    none); `cross-layer`: the cross-layer predictor wherever the previous layer computes it (the
    policy's normalized variant where it chose that one); `eap`: transition counts; `none`."""
    if mode == "none":
        return Predictor.NONE, 0
    width = decided.prefetch_width if decided and decided.prefetch_width else top_k
    has_graph = manifest.graph_predicts(index)
    if mode == "eap":
        has_eap = profile is not None and profile.layer(index).transitions_from is not None
        return (Predictor.EAP, width) if has_eap else (Predictor.NONE, 0)
    if mode == "cross-layer":
        if not has_graph:
            return Predictor.NONE, 0
        variant = decided.predictor if decided and decided.predictor in GRAPH_PREDICTORS else Predictor.CROSS_LAYER
        return Predictor(variant), width
    if decided is not None:
        return (Predictor(decided.predictor), width) if decided.predictor != Predictor.NONE else (Predictor.NONE, 0)
    return (Predictor.CROSS_LAYER, width) if has_graph else (Predictor.NONE, 0)
