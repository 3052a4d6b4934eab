"""plan(profile, layers, budget) -> Policy: every per-layer decision as a pure function of the
measurements, so it can be re-run for another budget without calibrating again.

- precision: the smallest stored precision (of at least 4 bits) whose measured error on the
  routed-experts output is within `max_quant_error`; else the most precise stored.
- predictor and decode prefetch width: the predictor (cross-layer, cross-layer with the next
  norm, or EAP) that reaches `target_recall` with the fewest experts (if none does, the best at
  top-k), widened only while one more prefetched expert is used at least
  `min_prefetch_precision` of the time, or no prefetch if its top-k is mostly wrong.
- cache shares: runtime.experts.allocation's greedy marginal gain over the miss curves, after each
  layer's top-k and prefetch room (the run plan re-runs it at the run's own budget).
- prefill INT2 share: the largest measured share of token-expert assignments (least popular
  experts first) whose error stays within `max_low_bit_error`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fate.artifacts import Artifact, ArtifactError, LayerSpec
from fate.artifacts.budget import Budget
from fate.artifacts.predictors import Predictor
from fate.artifacts.profile import RUNTIME_PREDICTORS, LayerProfile, Profile, profile_from_bytes
from fate.artifacts.schema import PRECISION_BITS, LayerPolicy, Policy
from fate.runtime.experts.allocation import SlotDemand, allocate_slots, miss_at, planned_recall


@dataclass(frozen=True)
class PlanTargets:
    budget: float = 0.5  # share of all experts that fits in memory
    target_recall: float = 0.97
    max_quant_error: float = 0.10
    max_low_bit_error: float = 0.05
    min_prefetch_precision: float = 0.5  # a prefetched expert must be used at least this often


def choose_precision(p: LayerProfile, stored: list[str], targets: PlanTargets) -> tuple[str, str]:
    usable = sorted((s for s in stored if PRECISION_BITS[s] >= 4), key=lambda s: PRECISION_BITS[s])
    if not usable:
        return stored[0], "only precision stored"
    for precision in usable:
        error = p.quant_error.get(precision, 0.0)  # fp16/fp32: not measured, taken as exact
        if error <= targets.max_quant_error:
            return precision, f"{precision} error {error:.4f} <= {targets.max_quant_error} on calibration"
    best = usable[-1]
    return best, f"every stored precision exceeds {targets.max_quant_error}; most precise stored"


def choose_predictor(p: LayerProfile, targets: PlanTargets) -> tuple[str, int, float, str]:
    """(predictor, width, decode recall at that width, reason).

    The smallest width reaching the target recall, but never wider than where one more expert
    would be used less than `min_prefetch_precision` of the time: each prefetch costs a load
    whether used or not (on tiny-moe, widths 4-5 for top-2 read 41% more bytes than load on
    demand for 2% more hits)."""
    candidates = [(name, p.predictors[name]) for name in RUNTIME_PREDICTORS if name in p.predictors]
    if not candidates:
        return Predictor.NONE, 0, 0.0, "no previous layer to predict from"
    reaching = [(curve.widths[i], -curve.decode[i], name, i)
                for name, curve in candidates
                for i in range(len(curve.widths)) if curve.decode[i] >= targets.target_recall]
    if reaching:
        target_width, _, name, target_index = min(reaching)
        curve = dict(candidates)[name]
    else:
        name, curve = max(candidates, key=lambda nc: nc[1].decode[0])
        target_width, target_index = None, len(curve.widths) - 1
    k = curve.widths[0]
    if curve.decode[0] < targets.min_prefetch_precision:
        return Predictor.NONE, 0, 0.0, (f"no predictor reaches {targets.target_recall}; the best, {name}, is right for "
                                f"{curve.decode[0]:.3f} of its top-{k} (< {targets.min_prefetch_precision}): load on demand")
    i = 0
    while i < target_index and (curve.decode[i + 1] - curve.decode[i]) * k >= targets.min_prefetch_precision:
        i += 1
    width, recall = curve.widths[i], curve.decode[i]
    if i == target_index and target_width is not None:
        return name, width, recall, f"{name} decode recall {recall:.3f} >= {targets.target_recall} at width {width}"
    short = (f"{targets.target_recall} needs width {target_width}" if target_width is not None
             else f"no predictor reaches {targets.target_recall}")
    return name, width, recall, (
        f"{short}; {name} to width {width} ({recall:.3f}), where one more expert would be used less than "
        f"{targets.min_prefetch_precision:.0%} of the time")


def slot_demand(p: LayerProfile, recall: float, width: int) -> SlotDemand:
    return SlotDemand(p.miss_curve_slots, p.miss_curve, planned_recall(p.index, recall), p.top_k, width, p.num_experts)


def choose_low_bit_share(p: LayerProfile, stored: list[str], targets: PlanTargets) -> tuple[str | None, float, str]:
    if "int2" not in stored:
        return None, 0.0, "no int2 copies stored"
    allowed = [(s, e) for s, e in zip(p.low_bit_shares, p.low_bit_error) if e <= targets.max_low_bit_error]
    share, error = max(allowed, default=(0.0, 0.0))
    if share == 0:
        return None, 0.0, f"even the smallest int2 share exceeds error {targets.max_low_bit_error}"
    return "int2", share, f"int2 for {share:.0%} of assignments: error {error:.4f} <= {targets.max_low_bit_error}"


def plan(profile: Profile, layers: list[LayerSpec], targets: PlanTargets = PlanTargets()) -> Policy:
    moe = [layer for layer in layers if layer.kind == "moe"]
    profiles = [profile.layer(layer.index) for layer in moe]
    decided = []
    for layer, p in zip(moe, profiles):
        stored = list(layer.experts)
        precision, why_precision = choose_precision(p, stored, targets)
        predictor, width, recall, why_predictor = choose_predictor(p, targets)
        low, share, why_low = choose_low_bit_share(p, stored, targets)
        decided.append((layer, p, precision, predictor, width, recall, low, share,
                        {"precision": why_precision, "prefetch": why_predictor, "prefill": why_low}))

    total = round(targets.budget * sum(p.num_experts for p in profiles))
    slots = allocate_slots([slot_demand(p, recall, width)
                            for p, (_, _, _, _, width, recall, *_) in zip(profiles, decided)], total)
    granted = max(sum(slots), 1)
    policies = []
    for (layer, p, precision, predictor, width, recall, low, share, reasons), s in zip(decided, slots):
        reasons["cache"] = (f"{s} of {p.num_experts} slots: demand miss rate "
                            f"{miss_at(p.miss_curve_slots, p.miss_curve, s):.3f} there, "
                            f"prefetch recall {recall:.3f}")
        policies.append(LayerPolicy(index=layer.index, precision=precision, cache_share=s / granted,
                                    prefetch_width=width, predictor=predictor, prefill_precision=low,
                                    prefill_low_share=share, reasons=reasons))
    return Policy(budget=targets.budget, target_recall=targets.target_recall,
                  max_quant_error=targets.max_quant_error, max_low_bit_error=targets.max_low_bit_error,
                  layers=policies)


def expert_bytes(layers: list[LayerSpec], policy: Policy, sizes: dict[str, int]) -> int:
    """Bytes of all routed experts at the precisions the policy keeps resident."""
    total = 0
    for lp in policy.layers:
        total += sum(sizes[path] for path in layers[lp.index].experts[lp.precision])
    return total


def plan_for_budget(profile: Profile, layers: list[LayerSpec], sizes: dict[str, int], budget: Budget,
                    targets: PlanTargets) -> Policy:
    """plan() for a budget given in bytes or as a share: bytes become a share of the experts at
    the precisions the plan itself chooses (precision does not depend on the budget)."""
    first = plan(profile, layers, dataclasses.replace(targets, budget=budget.share or 1.0))
    share = budget.share_of(expert_bytes(layers, first, sizes))
    return plan(profile, layers, dataclasses.replace(targets, budget=share))


def replan(artifact_path, budget: Budget, targets: PlanTargets) -> Policy:
    """Recompute an artifact's policy from its saved profile (no calibration) and store it."""
    artifact = Artifact.open(artifact_path)
    manifest = artifact.manifest
    if not manifest.profile:
        raise ArtifactError(f"{artifact.root} has no profile; compile it with calibration first")
    profile = profile_from_bytes(artifact.read_bytes(manifest.profile)).check(manifest.experts_per_layer)
    sizes = {f.path: f.size for f in manifest.files}
    policy = plan_for_budget(profile, manifest.layers, sizes, budget, targets)
    artifact.replace_manifest(dataclasses.replace(manifest, policy=policy))
    return policy
