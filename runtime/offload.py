"""Generation with only a budget of experts resident: the expert cache, the prefetcher's
requests from each layer's predictor, INT2 prefill transfers, and the statistics of a run.

Per MoE layer the policy names a predictor:
- cross_layer / cross_layer_norm: the previous layer's graph computed this layer's router on its
  own router input (`hint`), before this layer runs;
- eap: transition counts from the profile, applied to the previous MoE layer's actual experts
  (`observe`);
- none: load on demand.
Decode prefetches the top-`width` experts; prefill the union of every token's top-`width`,
most popular first, with the least popular tail moved at INT2 when the policy says so (those
copies serve this prefill only and are never cached).
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fate.artifacts import Artifact, ArtifactError, LayerPolicy
from fate.artifacts.budget import Budget
from fate.artifacts.profile import Profile, profile_from_bytes

from .expert_cache import BudgetError, CacheCounters, ExpertCache
from .experts import ExpertStore, resident_precision
from .loader import ExpertLoader, LoadCost, LoadedExpert
from .memory import current_rss, release_freed_memory

PREFETCH_MODES = ("none", "eap", "cross-layer")
GRAPH_OUTPUT_OF = {"cross_layer": "next_router_logits", "cross_layer_norm": "next_router_logits_norm"}


LOW_BIT_PREFILL_MODES = ("auto", "on", "off")
LOW_BIT_MIN_GAIN = 0.9  # INT2 loads must be this much faster: a few timed loads are noisy


@dataclass(frozen=True)
class OffloadOptions:
    """The flags of fate-run that shape offloading."""

    budget: Budget
    prefetch: str = "cross-layer"
    cache: str = "arc"
    allocation: str = "policy"  # or "uniform"
    # INT2 prefill copies where the policy says: "auto" also needs this device to load them faster
    # than the resident precision; "on" uses them whenever the policy says; "off" never.
    low_bit_prefill: str = "auto"
    threads: int = 2
    verify: bool = True
    precision: str | None = None


@dataclass
class PredictionCounters:
    predicted: int = 0
    actual: int = 0
    correct: int = 0


@dataclass
class PhaseStats:
    seconds: float = 0.0
    tokens: int = 0
    cache: CacheCounters = field(default_factory=CacheCounters)
    low_bit_loads: int = 0
    low_bit_bytes: int = 0
    prediction: dict[int, PredictionCounters] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer as this run executes it."""

    index: int
    precision: str
    expert_bytes: int  # size of one expert at `precision` (the largest, to be safe)
    slots: int
    predictor: str
    width: int
    low_share: float
    low_precision: str | None


def rank_by_popularity(experts: set[int], popularity: list[float] | None) -> list[int]:
    if popularity is None:
        return sorted(experts)
    return sorted(experts, key=lambda e: (-popularity[e], e))


class OffloadedExperts(ExpertStore):
    def __init__(self, artifact: Artifact, options: OffloadOptions):
        super().__init__()
        self.artifact = artifact
        self.options = options
        manifest = artifact.manifest
        self.profile: Profile | None = None
        if manifest.profile:
            self.profile = profile_from_bytes(artifact.read_bytes(manifest.profile, verify=options.verify))
        if options.prefetch not in PREFETCH_MODES:
            raise ArtifactError(f"unknown prefetch mode {options.prefetch!r}; choose from {', '.join(PREFETCH_MODES)}")
        if options.low_bit_prefill not in LOW_BIT_PREFILL_MODES:
            raise ArtifactError(f"unknown INT2 prefill mode {options.low_bit_prefill!r}; choose from "
                                f"{', '.join(LOW_BIT_PREFILL_MODES)}")
        if options.prefetch == "eap" and self.profile is None:
            raise ArtifactError("--prefetch eap needs the transition counts of a calibrated artifact")
        self.loader = ExpertLoader(artifact, verify=options.verify)
        self.total_expert_bytes = 0
        self.plans = self._plan_layers()
        # EAP tables, once: source layer -> {target layer: (transition counts, popularity tie-break)}
        self._eap: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        for plan in self.plans.values():
            if plan.predictor == "eap":
                measured = self.profile.layer(plan.index)
                self._eap.setdefault(measured.transitions_from, {})[plan.index] = (
                    np.asarray(measured.transitions, np.float64), np.asarray(measured.popularity) * 1e-6)
        self.cache = ExpertCache({p.index: p.slots * p.expert_bytes for p in self.plans.values()},
                                 self._load, policy=options.cache, threads=options.threads)
        self._low_pool = ThreadPoolExecutor(max_workers=max(1, options.threads), thread_name_prefix="fate-int2")
        self._low: dict[tuple[int, int], Future] = {}
        # Misses of the layer being run, loaded `threads` at a time while the loop runs the others
        self._demand_pool = ThreadPoolExecutor(max_workers=max(1, options.threads), thread_name_prefix="fate-demand")
        self._misses: list[int] = []
        self._ahead: dict[tuple[int, int], Future] = {}
        self._predicted: dict[int, set[int]] = {}
        self._step = 0
        self._phase = "prefill"
        self._phase_start = time.perf_counter()
        self.phases = {"prefill": PhaseStats(), "decode": PhaseStats()}
        self._snapshot = CacheCounters()
        self._memory_floor: int | None = None
        self._memory_margin = max(16 << 20, sum(self.cache.capacities.values()) // 8)
        self.heap_trims = 0

    # ------------------------------------------------------------------ planning the run

    def _policy(self, index: int) -> LayerPolicy | None:
        policy = self.artifact.manifest.policy
        return policy.layer(index) if policy else None

    def _plan_layers(self) -> dict[int, LayerPlan]:
        manifest, opts = self.artifact.manifest, self.options
        sizes = {f.path: f.size for f in manifest.files}
        layers = manifest.moe_layers
        precision = {l.index: resident_precision(self.artifact, l.index, opts.precision) for l in layers}
        # an expert costs its measured resident size, not its file size (see ExpertLoader.measure)
        self.load_costs: dict[str, LoadCost] = {}
        for l in layers:
            if precision[l.index] not in self.load_costs:
                self.load_costs[precision[l.index]] = self.loader.measure(l.index, precision[l.index])
        costs = {name: cost.resident_per_file_byte for name, cost in self.load_costs.items()}
        self.resident_cost = costs
        expert_bytes = {l.index: int(max(sizes[p] for p in l.experts[precision[l.index]]) * costs[precision[l.index]])
                        for l in layers}
        self.total_expert_bytes = sum(int(sizes[p] * costs[precision[l.index]])
                                      for l in layers for p in l.experts[precision[l.index]])
        budget = opts.budget.bytes_of(self.total_expert_bytes)
        minimum = sum(expert_bytes[l.index] * l.routing.top_k for l in layers)
        if budget < minimum:
            raise BudgetError(f"a budget of {budget / 1e6:.1f} MB cannot hold one token's experts in every layer; "
                              f"the minimum is {minimum / 1e6:.1f} MB ({minimum / self.total_expert_bytes:.1%} "
                              f"of the experts)")
        shares = {l.index: 1 / len(layers) for l in layers}
        if opts.allocation == "policy" and manifest.policy:
            shares = {l.index: self._policy(l.index).cache_share for l in layers}
        elif opts.allocation not in ("policy", "uniform"):
            raise ArtifactError(f"unknown allocation {opts.allocation!r}; choose policy or uniform")
        slots = self._slots(layers, shares, expert_bytes, budget)
        plans = {}
        for l in layers:
            decided = self._policy(l.index)
            predictor, width = self._predictor(l.index, decided, l.routing.top_k)
            # Prefetching into the slots the running experts need evicts them: with 5 slots, top-2 and
            # width 5, tiny-moe at 50% loaded 2.2x the bytes of load-on-demand for 4.6% more hits.
            width = min(width, max(0, slots[l.index] - l.routing.top_k))
            low = decided.prefill_precision if decided and opts.low_bit_prefill != "off" else None
            if low is not None and opts.low_bit_prefill == "auto" and not self._loads_faster(
                    l.index, low, precision[l.index]):
                low = None
            plans[l.index] = LayerPlan(l.index, precision[l.index], expert_bytes[l.index], slots[l.index],
                                       predictor, width, decided.prefill_low_share if low else 0.0, low)
        return plans

    def _loads_faster(self, layer: int, low: str, resident: str) -> bool:
        """INT2 prefill copies save transfer bytes (the paper's PCIe link); where a load is mostly
        session creation, as on a CPU, they can cost more than the resident precision (a 2048x1408
        INT2 expert at block 32 takes 11 ms to create against 4 ms at INT4 block 128), so they are
        used only where this device loads them faster."""
        if low not in self.load_costs:
            self.load_costs[low] = self.loader.measure(layer, low)
        return self.load_costs[low].seconds < LOW_BIT_MIN_GAIN * self.load_costs[resident].seconds

    @staticmethod
    def _slots(layers, shares: dict[int, float], expert_bytes: dict[int, int], budget: int) -> dict[int, int]:
        """Whole expert slots per layer from the shares, each at least top-k, within the budget."""
        slots = {l.index: l.routing.top_k for l in layers}
        left = budget - sum(slots[i] * expert_bytes[i] for i in slots)
        total_share = sum(shares.values()) or 1.0
        want = {l.index: max(0.0, shares[l.index] / total_share * budget / expert_bytes[l.index] - slots[l.index])
                for l in layers}
        for l in sorted(layers, key=lambda l: -want[l.index]):  # largest wishes first
            extra = min(int(want[l.index]), l.routing.num_experts - slots[l.index], left // expert_bytes[l.index])
            slots[l.index] += extra
            left -= extra * expert_bytes[l.index]
        for l in sorted(layers, key=lambda l: -(want[l.index] % 1)):  # then leftovers, one slot each
            if slots[l.index] < l.routing.num_experts and left >= expert_bytes[l.index]:
                slots[l.index] += 1
                left -= expert_bytes[l.index]
        return slots

    def _predictor(self, index: int, decided: LayerPolicy | None, top_k: int) -> tuple[str, int]:
        mode = self.options.prefetch
        if mode == "none":
            return "none", 0
        width = decided.prefetch_width if decided and decided.prefetch_width else top_k
        has_graph = index > 0 and self.artifact.manifest.layers[index - 1].predicts_next
        has_eap = self.profile is not None and self.profile.layer(index).transitions_from is not None
        if mode == "eap":
            return ("eap", width) if has_eap else ("none", 0)
        if decided is not None:  # the compiled policy, which may have measured "none" best
            return (decided.predictor, width) if decided.predictor != "none" else ("none", 0)
        return ("cross_layer", width) if has_graph else ("none", 0)

    # ------------------------------------------------------------------ ExpertStore

    def _load(self, layer: int, expert: int) -> tuple[LoadedExpert, int, int]:
        plan = self.plans[layer]
        loaded = self.loader.load(layer, expert, plan.precision)
        return loaded, int(loaded.nbytes * self.resident_cost.get(loaded.precision, 1.0)), loaded.nbytes

    def begin_step(self, num_tokens: int, prefill: bool) -> None:
        self._bound_heap()
        phase = "prefill" if prefill else "decode"
        self._switch_phase(phase)
        self._step += 1
        self.phases[phase].tokens += num_tokens

    def _bound_heap(self) -> None:
        """Keep resident memory within the budget plus a margin. Evicted sessions free their
        memory, but the C heap keeps it mapped for reuse: measured, 100 MB retained beside a
        59 MB cache on a 4-layer model at 50%. Returning every large block to the system at once
        instead (a fixed mmap threshold) doubled the time of a load, so the heap is trimmed only
        when the process outgrows what it had before any expert plus the budget and the margin;
        memory still above that after a trim (a growing KV cache) raises the floor."""
        rss = current_rss()
        if rss is None:
            return
        if self._memory_floor is None:
            self._memory_floor = rss - self.cache.resident_bytes()
        limit = self._memory_floor + sum(self.cache.capacities.values()) + self._memory_margin
        if rss > limit:
            release_freed_memory()
            self.heap_trims += 1
            rss = current_rss() or rss
            if rss > limit:
                self._memory_floor = rss - self.cache.resident_bytes() - self._memory_margin

    def _switch_phase(self, phase: str) -> None:
        now = time.perf_counter()
        current = self.phases[self._phase]
        current.seconds += now - self._phase_start
        self._fold_counters(current)
        self._phase, self._phase_start = phase, now

    def _fold_counters(self, into: PhaseStats) -> None:
        """Move what the cache counted since the last fold into a phase's stats."""
        c, s = self.cache.counters, self._snapshot
        into.cache.loads += c.loads - s.loads
        into.cache.bytes_read += c.bytes_read - s.bytes_read
        into.cache.stall_s += c.stall_s - s.stall_s
        into.cache.dropped_stale += c.dropped_stale - s.dropped_stale
        for index, layer in c.layers.items():
            before = s.layers.get(index)
            target = into.cache.layer(index)
            for name in ("gets", "hits", "waits", "misses", "prefetched", "evictions"):
                setattr(target, name, getattr(target, name) + getattr(layer, name) - (getattr(before, name) if before else 0))
        self._snapshot = copy.deepcopy(c)

    def hint(self, layer: int, predictions: dict[str, np.ndarray]) -> None:
        plan = self.plans.get(layer)
        if plan is None or plan.predictor not in GRAPH_OUTPUT_OF:
            return
        self._request(plan, predictions[GRAPH_OUTPUT_OF[plan.predictor]])

    def observe(self, layer: int, expert_ids: np.ndarray) -> None:
        """Actual routing of `layer`: in prefill its least popular non-resident experts start
        moving at INT2 now; EAP predicts the MoE layer whose transitions start here."""
        plan = self.plans.get(layer)
        if self._phase == "prefill" and plan is not None and plan.low_precision:
            needed = rank_by_popularity({int(e) for e in expert_ids.reshape(-1)},
                                        self.profile.layer(layer).popularity if self.profile else None)
            for expert in self._low_bit_tail(plan, needed) - self.cache.resident(layer):
                self._start_low(plan, expert)
        for target, (counts, prior) in self._eap.get(layer, {}).items():
            self._request(self.plans[target], counts[expert_ids].sum(axis=1) + prior)

    def _request(self, plan: LayerPlan, scores: np.ndarray) -> None:
        if plan.width <= 0:
            return
        top = np.argsort(-scores, axis=1, kind="stable")[:, : plan.width]
        if len(top) == 1:  # decode: the predictor's own order
            ranked = [int(e) for e in top[0]]
        else:  # prefill: the union, most popular first
            popularity = self.profile.layer(plan.index).popularity if self.profile else None
            ranked = rank_by_popularity({int(e) for e in top.reshape(-1)}, popularity)
        self._predicted[plan.index] = set(ranked)
        low = self._low_bit_tail(plan, ranked) if len(top) > 1 else set()
        self.cache.pin(plan.index, set(ranked) - low)
        self.cache.prefetch(plan.index, [e for e in ranked if e not in low][: plan.slots], self._step)
        resident = self.cache.resident(plan.index)
        for expert in low - resident:
            self._start_low(plan, expert)

    def _low_bit_tail(self, plan: LayerPlan, ranked: list[int]) -> set[int]:
        """The least popular experts of a prefill fetch set, up to the policy's share of assignments."""
        if not plan.low_precision or plan.low_share <= 0 or self.profile is None:
            return set()
        popularity = self.profile.layer(plan.index).popularity
        tail, share = set(), 0.0
        for expert in reversed(ranked):
            share += popularity[expert]
            if share > plan.low_share:
                break
            tail.add(expert)
        return tail

    def _start_low(self, plan: LayerPlan, expert: int) -> None:
        key = (plan.index, expert)
        if key not in self._low:
            self._low[key] = self._low_pool.submit(self.loader.load, plan.index, expert, plan.low_precision)

    def order(self, layer: int, experts: list[int]) -> list[int]:
        """Run resident experts first, while the misses load in helper threads (a few at a time,
        so that the memory held beyond the cache stays a few experts)."""
        resident = self.cache.resident(layer)
        ordered = sorted(experts, key=lambda e: (e not in resident, (layer, e) not in self._low))
        self.cache.pin(layer, set(experts))  # the router has spoken: keep these until they have run
        self._misses = [e for e in ordered if e not in resident and (layer, e) not in self._low]
        self._load_ahead(layer)
        return ordered

    def _load_ahead(self, layer: int) -> None:
        for expert in self._misses[: max(1, self.options.threads)]:
            key = (layer, expert)
            if key not in self._ahead:
                self._ahead[key] = self._demand_pool.submit(self.cache.get, layer, expert, False)

    def _take_ahead(self, layer: int, expert: int):
        """The expert loaded ahead for this run, or None; refills the window first."""
        future = self._ahead.pop((layer, expert), None)
        if future is None:
            return None
        self._misses.remove(expert)
        self._load_ahead(layer)
        start = time.perf_counter()
        try:
            return future.result()  # re-raises a failed load
        finally:
            self.phases[self._phase].cache.stall_s += time.perf_counter() - start

    def run(self, layer: int, expert: int, x: np.ndarray) -> np.ndarray:
        self.stats.runs += 1
        self.stats.runs_per_layer[layer] = self.stats.runs_per_layer.get(layer, 0) + 1
        low = self._low.get((layer, expert))
        if low is not None and expert not in self.cache.resident(layer):
            start = time.perf_counter()
            loaded = low.result()
            phase = self.phases[self._phase]
            phase.cache.stall_s += time.perf_counter() - start
            phase.low_bit_loads += 1
            phase.low_bit_bytes += loaded.nbytes
            return loaded.run(x)
        ahead = self._take_ahead(layer, expert)
        if ahead is not None:
            return ahead.run(x)
        return self.cache.get(layer, expert).run(x)

    def routed(self, layer: int, experts: set[int]) -> None:
        """After `layer` ran: score its prediction, release its pins and INT2 copies."""
        predicted = self._predicted.pop(layer, None)
        if predicted is not None:
            counters = self.phases[self._phase].prediction.setdefault(layer, PredictionCounters())
            counters.predicted += len(predicted)
            counters.actual += len(experts)
            counters.correct += len(predicted & experts)
        self.cache.pin(layer, set())
        for key in [k for k in self._low if k[0] == layer]:
            self._low.pop(key).cancel()
        self._misses = []
        for key in [k for k in self._ahead if k[0] == layer]:  # not run after all (an error upstream)
            self._ahead.pop(key).cancel()

    def finish(self) -> None:
        self._switch_phase(self._phase)

    def close(self) -> None:
        self._demand_pool.shutdown(wait=True, cancel_futures=True)
        self.cache.close()
        self._low_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ stats

    def report(self) -> dict:
        self.finish()
        self.stats.loads = sum(p.cache.loads + p.low_bit_loads for p in self.phases.values())
        self.stats.bytes_read = sum(p.cache.bytes_read + p.low_bit_bytes for p in self.phases.values())
        out = {"budget_bytes": sum(self.cache.capacities.values()), "total_expert_bytes": self.total_expert_bytes,
               "resident_cost_per_file_byte": self.resident_cost,
               "load_ms": {name: cost.seconds * 1e3 for name, cost in self.load_costs.items()},
               "heap_trims": self.heap_trims,
               "resident_bytes": self.cache.resident_bytes(), "prefetch": self.options.prefetch,
               "cache": self.options.cache, "allocation": self.options.allocation,
               "layers": {p.index: {"precision": p.precision, "slots": p.slots, "predictor": p.predictor,
                                    "width": p.width} for p in self.plans.values()}}
        for name, phase in self.phases.items():
            c = phase.cache
            gets = sum(l.gets for l in c.layers.values())
            hits = sum(l.hits for l in c.layers.values())
            waits = sum(l.waits for l in c.layers.values())
            out[name] = {
                "tokens": phase.tokens, "seconds": phase.seconds,
                "tokens_per_s": phase.tokens / phase.seconds if phase.seconds else 0.0,
                "stall_s": c.stall_s, "experts_loaded": c.loads + phase.low_bit_loads,
                "bytes_read": c.bytes_read + phase.low_bit_bytes, "int2_loads": phase.low_bit_loads,
                "hit_rate": hits / gets if gets else None,
                # resident, or already being loaded by the prefetcher, when asked for (the paper's "hit")
                "covered_rate": (hits + waits) / gets if gets else None,
                "late_prefetches": waits,
                "hit_rate_per_layer": {i: (l.hits / l.gets if l.gets else None) for i, l in sorted(c.layers.items())},
                "prefetch_recall_per_layer": {i: p.correct / p.actual if p.actual else None
                                              for i, p in sorted(phase.prediction.items())},
                "prefetch_precision_per_layer": {i: p.correct / p.predicted if p.predicted else None
                                                 for i, p in sorted(phase.prediction.items())},
            }
        return out
