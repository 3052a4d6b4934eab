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
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
from fate.artifacts import Artifact, ArtifactError
from fate.artifacts.budget import Budget
from fate.artifacts.predictors import GRAPH_OUTPUT_OF, Predictor
from fate.artifacts.profile import Profile, profile_from_bytes

from .. import native
from .eviction import DEFAULT_POLICY
from .executors import ExpertRunner, LoadedExpert, Work, assignments
from .gates import PrefetchGate
from .loads import ExpertLoader, Load
from .plan import POOLS, LayerPlan, plan_run
from .pool import INLINE_READ_BYTES, SlotPool, native_reads, scratch_buffer
from .predictors import eap_scores, top_experts
from .report import LayerReport, OffloadReport, PhaseReport
from .residency import CacheCounters, ExpertCache
from .store import ExpertOptions, ExpertStore, LayerOutputs, RoutedExperts, largest_file, resident_precision, slot_offset
from .trace import LayerSlots, TraceHeader


@dataclass(frozen=True)
class OffloadOptions:
    """The flags of fate-run that shape offloading."""

    budget: Budget
    prefetch: str = "policy"
    cache: str = DEFAULT_POLICY
    # "global": one pool of slots shared by every layer whose slots are the same size (the plan's
    # per-layer slots summed); "per-layer": each layer keeps the quota the plan gives it
    pool: str = "global"
    allocation: str = "policy"  # or "uniform"
    # INT2 prefill copies where the policy says: "auto" where they run from their bytes (native
    # executor: a load is a read, and an INT2 file is half an INT4 one); "on" wherever the policy
    # says; "off" never. They change prefill numbers by design.
    low_bit_prefill: str = "off"  # lossy: INT2 copies in prefill only when asked
    threads: int = 2  # prefetch and miss-loading threads


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
    in_step: int = 0  # MoE layer-steps whose decode step ran the experts (all resident)
    gated: int = 0  # decode predictions not prefetched: the layer's recent ones did not pay
    prediction: dict[int, PredictionCounters] = field(default_factory=dict)
    room_s: float = 0.0  # in the per-layer hand-off (after_layer): routing observed, prefetches asked, experts computed
    run_s: float = 0.0  # of which computing: the executor's calls, a split native step's rest (finish_step)
    waits: int = 0  # loads the loop waited for (misses, prefetches not yet in)


@dataclass(eq=False)
class _Batch:
    """One layer's chosen experts while OffloadedExperts computes them: by expert, its token and output rows;
    its INT2 copies; the resident ones pinned and not yet run; loads under way (load -> expert, in the order
    begun) and misses not yet begun, at most `window` under way."""

    layer: int
    todo: dict
    low: dict
    reads_itself: bool
    window: int
    held: dict = field(default_factory=dict)
    running: dict = field(default_factory=dict)
    misses: list = field(default_factory=list)
    gather: bool = False


def rank_by_popularity(experts: set[int], popularity: list[float] | None) -> list[int]:
    if popularity is None:
        return sorted(experts)
    return sorted(experts, key=lambda e: (-popularity[e], e))


class OffloadedExperts(ExpertStore):
    reads_while_generating = True

    def __init__(self, artifact: Artifact, options: OffloadOptions, experts: ExpertOptions = ExpertOptions()):
        super().__init__()
        self.artifact = artifact
        self.options = options
        manifest = artifact.manifest
        self.profile: Profile | None = None
        if manifest.profile:
            self.profile = profile_from_bytes(artifact.read_bytes(manifest.profile, verify=experts.verify)).check(
                manifest.experts_per_layer)
        if options.pool not in POOLS:
            raise ArtifactError(f"unknown pool {options.pool!r}; choose from {', '.join(POOLS)}")
        self.runner = ExpertRunner(artifact, experts.executor, experts.threads)
        self.loader = ExpertLoader(artifact, self.runner, verify=experts.verify, every_load=experts.verify_every_load)
        self.run_plan = plan_run(
            manifest, self.profile, options.budget,
            precision=lambda layer: resident_precision(artifact, layer, experts.precision),
            file_bytes=lambda layer, precision: largest_file(artifact, layer, precision),
            runs_native=self.runner.native_for, prefetch=options.prefetch, allocation=options.allocation,
            low_bit_prefill=options.low_bit_prefill, pool=options.pool)
        self.plans = self.run_plan.layers
        self.total_expert_bytes = self.run_plan.total_expert_bytes
        # EAP tables, once: source layer -> {target layer: (transition counts, popularity)}
        self._eap: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        for plan in self.plans.values():
            if plan.predictor == Predictor.EAP:
                measured = self.profile.layer(plan.index)
                self._eap.setdefault(measured.transitions_from, {})[plan.index] = (
                    np.asarray(measured.transitions, np.float64), np.asarray(measured.popularity))
        # layers whose loads the generation loop begins itself on native I/O threads (prefetches and
        # misses alike) and waits for without Python's lock (their experts run from the slot's bytes);
        # the others load in prefetch and helper threads. Only the loop's thread fills and evicts their
        # slots, so their decode steps may run the resident experts the cache locates in them (and
        # they share slots only with each other)
        self._reads_itself = {p.index for p in self.plans.values()
                              if native_reads() and self.runner.native_for(p.index, p.precision)}
        groups = None if options.pool == "per-layer" else {
            p.index: (p.slot_bytes, p.index in self._reads_itself) for p in self.plans.values()}
        slots = {p.index: p.slots for p in self.plans.values()}
        self.pool = SlotPool(slots, {p.index: largest_file(artifact, p.index, p.precision) for p in self.plans.values()},
                             groups=groups)
        located = {layer: np.full(manifest.layers[layer].routing.num_experts, -1, np.int64)
                   for layer in self._reads_itself}
        # in one pool, a layer whose misses nothing reads ahead of need (or, layer 0, only its attention ahead)
        # keeps the slots the plan gave it: its misses stall the loop, where another layer's are read in time
        predicted = any(p.width > 0 for p in self.plans.values())
        floors = {p.index: p.slots for p in self.plans.values() if p.stalls_on_misses} if groups and predicted else None
        self.cache = ExpertCache(slots, _Reads(self), policy=options.cache, threads=options.threads,
                                 located=located, groups=groups, floors=floors)
        self._floors = floors or {}
        self._low_pool = ThreadPoolExecutor(max_workers=max(1, options.threads), thread_name_prefix="fate-int2")
        self._low: dict[tuple[int, int], Future] = {}
        # Misses of the layer being run, loaded `threads` at a time while the kernel runs the others
        self._demand_pool = ThreadPoolExecutor(max_workers=max(1, options.threads), thread_name_prefix="fate-demand")
        self._predicted: dict[int, set[int]] = {}
        self._to_read: dict[int, set[int]] = {}  # layer -> its decode prediction's experts not resident then
        self._gate = PrefetchGate()
        self._routed_views: dict[int, RoutedExperts] = {}  # native_layer's
        self._inline_read = True  # whether the miss compute begins next may be read inline (_Reads.start)
        self._costs_at: tuple[float, int, float, int] | None = None  # at the last decode step (PrefetchGate.token)
        self._read_ahead = False  # whether this decode token made a prediction (PrefetchGate.token)
        self._predicting = True  # whether any read ahead could pay now (PrefetchGate.worth_reading, once a token)
        self._step = 0
        self._phase = "prefill"
        self._phase_start = time.perf_counter()
        self.phases = {"prefill": PhaseStats(), "decode": PhaseStats()}
        self._snapshot = CacheCounters()

    # ------------------------------------------------------------------ ExpertStore

    def native_layer(self, layer: int) -> RoutedExperts | None:
        """Built once a layer: the decode step holds it, and _add_to_residual runs the step's misses with it."""
        if layer not in self._reads_itself:
            return None
        if layer not in self._routed_views:
            self._routed_views[layer] = RoutedExperts.of(self.runner, self.pool, layer, self.plans[layer].precision,
                                                         self.cache.located[layer])
        return self._routed_views[layer]

    def ran_in_step(self, layer: int, expert_ids: np.ndarray) -> None:
        """Every expert the step chose was resident and ran there: the bookkeeping `compute` does for hits."""
        todo = sorted(set(expert_ids.reshape(-1).tolist()))
        self.stats.count(layer, len(todo))
        self.phases[self._phase].in_step += 1
        self.cache.retire(layer, todo)
        self.cache.harvest()
        self.cache.count_hits(layer, todo)
        self._routed(layer, set(todo))

    def ready(self) -> None:
        self.pool.populate()

    def predicted(self, layer: int) -> set[int] | None:
        return self._predicted.get(layer)

    def trace_header(self) -> TraceHeader:
        manifest = self.artifact.manifest
        return TraceHeader([LayerSlots(p.index, manifest.layers[p.index].routing.num_experts,
                                       manifest.layers[p.index].routing.top_k, p.slots, p.cost_bytes)
                            for p in self.plans.values()], self.options.pool)

    def begin_step(self, num_tokens: int, prefill: bool) -> None:
        phase = "prefill" if prefill else "decode"
        if self._step == 0:  # time counts from the first step, not from start-up
            self._phase, self._phase_start = phase, time.perf_counter()
        elif phase != self._phase:  # counters fold at phase changes only (a copy per step costs)
            self._switch_phase(phase)
        self._step += 1
        self.phases[phase].tokens += num_tokens
        self._measure_costs(prefill)

    def _measure_costs(self, prefill: bool) -> None:
        """Hand the gate the last decode token's costs (the loop's own time and loads, its waits)."""
        if prefill:
            self._costs_at, self._predicting = None, True
            return
        d = self.phases["decode"]
        now = (d.room_s - d.run_s - d.cache.stall_s, self.cache.counters.loads, d.cache.stall_s, d.waits)
        if self._costs_at is not None:
            self._gate.token(*(a - b for a, b in zip(now, self._costs_at)), read_ahead=self._read_ahead)
            # floors keep a layer that nothing prefetches its slots against the others' prefetches: not needed
            # while no read ahead could pay, when the others load on demand as it does
            self._predicting = self._gate.worth_reading()  # the gate's answer changes only here, once a token
            self.cache.floors = self._floors if self._predicting else {}
        self._costs_at, self._read_ahead = now, False

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

    def after_layer(self, layer: int, out: LayerOutputs) -> np.ndarray | None:
        """ExpertStore.after_layer, timed: what the loop costs beside its reads and experts (PhaseReport.loop_s)."""
        start = time.perf_counter()
        try:
            return super().after_layer(layer, out)
        finally:
            self.phases[self._phase].room_s += time.perf_counter() - start

    def hint(self, layer: int, predictions: dict[str, np.ndarray]) -> None:
        plan = self.plans.get(layer)
        if plan is None or plan.predictor not in GRAPH_OUTPUT_OF:
            return
        if not self._closed(plan):
            self._request(plan, predictions[GRAPH_OUTPUT_OF[plan.predictor]])

    def observe(self, layer: int, expert_ids: np.ndarray) -> None:
        """Actual routing of `layer`: in prefill its least popular non-resident experts start
        moving at INT2 now; EAP predicts the MoE layer whose transitions start here. Until they
        have run, its experts are protected from prefetches (for the next layers) as predictions are."""
        plan = self.plans.get(layer)
        if plan is not None:
            self.cache.protect(layer, set(expert_ids.reshape(-1).tolist()))
        if self._phase == "prefill" and plan is not None and plan.low_precision:
            needed = rank_by_popularity({int(e) for e in expert_ids.reshape(-1)},
                                        self.profile.layer(layer).popularity if self.profile else None)
            for expert in sorted(self._low_bit_tail(plan, needed) - self.cache.resident(layer)):
                self._start_low(plan, expert)
        for target, (counts, popularity) in self._eap.get(layer, {}).items():
            if not self._closed(self.plans[target]):
                self._request(self.plans[target], eap_scores(counts, popularity, expert_ids))

    def _closed(self, plan: LayerPlan) -> bool:
        """(decode) No read ahead could pay now (PrefetchGate.worth_reading): `plan`'s layer is neither predicted
        nor scored (its scores not even computed), and a prediction it would have made counts as gated."""
        if self._predicting:
            return False
        self.phases[self._phase].gated += plan.width > 0
        return True

    def _request(self, plan: LayerPlan, scores: np.ndarray) -> None:
        if plan.width <= 0:
            return
        top = top_experts(scores, plan.width)
        if len(top) == 1:  # decode: the predictor's own order; only what is not resident is read
            self._read_ahead = True
            ranked = top[0].tolist()
            predicted = self._predicted[plan.index] = set(ranked)
            to_read = self._to_read[plan.index] = self.cache.absent(plan.index, predicted)
            if not self._gate.open(plan.index):
                self.phases[self._phase].gated += 1  # scored all the same (_routed): it starts again when it pays
                return
            self.cache.protect(plan.index, predicted)
            if to_read:
                self._prefetch(plan, [e for e in ranked[: plan.slots] if e in to_read])
            return
        # prefill: the union, most popular first
        predicted = self._predicted[plan.index] = set(top.reshape(-1).tolist())
        ranked = rank_by_popularity(predicted, self.profile.layer(plan.index).popularity if self.profile else None)
        low = self._low_bit_tail(plan, ranked)
        self.cache.protect(plan.index, predicted - low)
        self._prefetch(plan, [e for e in ranked if e not in low][: plan.slots])
        if low:
            for expert in sorted(low - self.cache.resident(plan.index)):
                self._start_low(plan, expert)

    def _prefetch(self, plan: LayerPlan, wanted: list[int]) -> None:
        """Reads of `wanted` (best first) begun in this thread where the layer reads itself, else queued."""
        if plan.index in self._reads_itself:
            self.cache.start_prefetch(plan.index, wanted)
        else:
            self.cache.prefetch(plan.index, wanted, self._step)

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
            self._low[key] = self._low_pool.submit(self._load_low, plan, expert)

    def _load_low(self, plan: LayerPlan, expert: int) -> LoadedExpert:
        """An INT2 copy for this prefill only, in a buffer of its own (never a slot)."""
        size = self.artifact.entry(self.artifact.manifest.layers[plan.index].experts[plan.low_precision][expert]).size
        return self.loader.load(plan.index, expert, plan.low_precision, scratch_buffer(size), None)

    def begin(self, layer: int, ids: np.ndarray) -> _Batch | None:
        """The loads of the chosen experts not resident begun and the resident ones pinned, before a native
        step's rest (its shared expert) runs beside the reads (ExpertStore.after_layer); None, nothing
        pinned, where every one is resident (the step runs them)."""
        chosen = ids.reshape(-1).tolist()
        if layer in self._reads_itself:
            self.cache.retire(layer, chosen)
        self.cache.harvest()
        if not self.cache.absent(layer, set(chosen)):
            return None
        return self._begin_batch(layer, ids, retired=True)

    def abandon(self, batch: _Batch) -> None:
        """A batch `begin` made whose layer failed before `compute`: its loads settled, nothing left pinned."""
        self._settle(batch)

    def finish_step(self, finish) -> bool:
        """Timed as the experts' runs are: the step's own work, not the loop's (PhaseReport.loop_s, the gate)."""
        start = time.perf_counter()
        try:
            return finish()
        finally:
            self.phases[self._phase].run_s += time.perf_counter() - start

    def compute(self, layer: int, x: np.ndarray, ids: np.ndarray, step: LayerOutputs | None = None,
                begun: _Batch | None = None) -> np.ndarray | None:
        """Resident experts run at once, in one call, while the misses load `threads` at a time: read
        on the native I/O threads and waited for here without Python's lock where the experts run
        natively, else in helper threads (`begun`: by `begin`, earlier). Each batch that arrives runs as
        soon as it is in (pinned until then); small experts in decode, read as they are waited for, run with
        the hits once all are in, added to a native step's residual by the kernel where it gave one (`step`:
        then None). Whatever fails, nothing stays pinned."""
        batch = begun if begun is not None else self._begin_batch(layer, ids)
        y = np.empty((ids.size, x.shape[1]), np.float32)
        phase = self.phases[self._phase]
        running = batch.running
        try:
            if not batch.gather:
                self._run_held(batch, x, y)
            while running:
                start = time.perf_counter()
                # gathering, the last begun first: a read made here as it is waited for, beside the others
                first = next(reversed(running)) if batch.gather else next(iter(running))
                if batch.reads_itself:
                    first.result()  # waits without Python's lock (a native read, or a helper's load)
                    done = [load for load in running if load.done()]
                else:
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                phase.cache.stall_s += time.perf_counter() - start
                for load in done:
                    batch.held[running[load]] = load.result()  # re-raises a failed load (left in running)
                    del running[load]
                if not batch.gather:
                    self._refill(batch)
                    self._run_held(batch, x, y)
            if batch.gather and step is not None and self._add_to_residual(layer, x, step):
                self.cache.unpin(layer, batch.held)
                batch.held = {}
                return None
            self._run_held(batch, x, y)
            for expert, future in batch.low.items():
                start = time.perf_counter()
                loaded = future.result()
                phase.cache.stall_s += time.perf_counter() - start
                phase.low_bit_loads += 1
                phase.low_bit_bytes += loaded.nbytes
                start = time.perf_counter()
                self.runner.run(layer, [Work(loaded, *batch.todo[expert])], x, y)
                phase.run_s += time.perf_counter() - start
        finally:
            self._settle(batch)
        return y

    def _begin_batch(self, layer: int, ids: np.ndarray, retired: bool = False) -> _Batch:
        """The layer's chosen experts: the resident ones pinned, the first misses' loads begun (`retired`:
        the layer's unwanted prefetches already given up)."""
        todo = assignments(ids)
        self.stats.count(layer, len(todo))
        low = {e: self._low[(layer, e)] for e in todo if (layer, e) in self._low}
        if low:  # an INT2 copy serves only where the expert is not resident at its own precision
            resident = self.cache.resident(layer)
            low = {e: f for e, f in low.items() if e not in resident}
        pending = [e for e in todo if e not in low]
        batch = _Batch(layer, todo, low, layer in self._reads_itself,
                       max(1, min(self.options.threads, self.plans[layer].slots)))
        if not retired:
            if batch.reads_itself:  # prefetches this token does not need and no thread has begun reading: dropped
                self.cache.retire(layer, todo)
            self.cache.harvest()
        try:
            batch.held = self.cache.take_resident(layer, pending)
            batch.misses = [e for e in pending if e not in batch.held]
            self._refill(batch)
        except BaseException:
            self._settle(batch)
            raise
        # small experts in decode, every miss begun here: the last is read here as it is waited for, the
        # others on the I/O threads beside it (pool.INLINE_READ_BYTES); nothing else would overlap them, so
        # they run with the hits in one call
        batch.gather = (batch.reads_itself and self._phase == "decode" and not batch.misses
                        and self.plans[layer].slot_bytes <= INLINE_READ_BYTES
                        and not any(isinstance(load, Future) for load in batch.running))
        return batch

    def _refill(self, batch: _Batch) -> None:
        """Begin the batch's next misses, up to its window of loads under way."""
        layer, misses, running = batch.layer, batch.misses, batch.running
        while misses and len(running) < batch.window:
            expert = misses[0]
            # the last read of a batch may be made by this thread as it waits (a small expert in
            # decode: _Reads.start); those before it go to the I/O threads and run beside it
            self._inline_read = len(misses) == 1 or len(running) == batch.window - 1
            load = self.cache.start_fetch(layer, expert) if batch.reads_itself else None
            if load is None and batch.reads_itself and not running and self.cache.settle_begun(layer):
                load = self.cache.start_fetch(layer, expert)  # the slots were our own prefetches'
            if load is None:
                if batch.reads_itself and running:  # every slot pinned or filling: run what arrives first
                    return
                load = self._demand_pool.submit(self.cache.fetch, layer, expert)  # a helper waits for a slot
            running[load] = misses.pop(0)
            self.phases[self._phase].waits += 1

    def _run_held(self, batch: _Batch, x: np.ndarray, y: np.ndarray) -> None:
        ready, batch.held = batch.held, {}
        self._run(batch.layer, ready, batch.todo, x, y)

    def _settle(self, batch: _Batch) -> None:
        """The batch's end, whatever happened: loads a failure left begun settled, nothing left pinned,
        the layer's routing scored."""
        for load, expert in batch.running.items():
            try:
                load.result()
            except BaseException:  # noqa: BLE001 - the first failure is the one being raised
                continue
            batch.held[expert] = None
        batch.running.clear()
        if batch.held:
            self.cache.unpin(batch.layer, batch.held)
            batch.held = {}
        self._routed(batch.layer, set(batch.todo))

    def _add_to_residual(self, layer: int, x: np.ndarray, step: LayerOutputs) -> bool:
        """The layer's chosen experts, every one pinned in its slot, run by the kernel and added to the step's
        residual in the router's order (the bits the step would have had with them resident); False where one
        is not in the slots at the step's precision (a fallback copy): the executor then runs them."""
        start = time.perf_counter()
        try:
            return native.add_routed(self.native_layer(layer), step.ids.reshape(-1), step.weights.reshape(-1), x.reshape(-1),
                                     step.residual.reshape(-1), self.runner.threads)
        finally:
            self.phases[self._phase].run_s += time.perf_counter() - start

    def _run(self, layer: int, experts: dict[int, LoadedExpert], todo, x: np.ndarray, y: np.ndarray) -> None:
        """Run pinned experts in one executor call, then release them to eviction."""
        if not experts:
            return
        start = time.perf_counter()
        try:
            self.runner.run(layer, [Work(loaded, *todo[e]) for e, loaded in experts.items()], x, y)
        finally:
            self.phases[self._phase].run_s += time.perf_counter() - start
            self.cache.unpin(layer, experts)

    def _routed(self, layer: int, experts: set[int]) -> None:
        """After `layer` ran: score its prediction (and, in decode, how well the layer's recent ones
        paid), release its INT2 copies."""
        predicted = self._predicted.pop(layer, None)
        to_read = self._to_read.pop(layer, None)
        if to_read and self._phase == "decode":
            self._gate.score(layer, to_read, experts)
        if predicted is not None:
            counters = self.phases[self._phase].prediction.setdefault(layer, PredictionCounters())
            counters.predicted += len(predicted)
            counters.actual += len(experts)
            counters.correct += len(predicted & experts)
        self.cache.protect(layer, set())
        for key in [k for k in self._low if k[0] == layer]:
            self._low.pop(key).cancel()

    def finish(self) -> None:
        self._switch_phase(self._phase)

    def close(self) -> None:
        self._demand_pool.shutdown(wait=True, cancel_futures=True)
        self.cache.close()
        self._low_pool.shutdown(wait=True, cancel_futures=True)
        self.loader.close()
        self.pool.close()

    # ------------------------------------------------------------------ stats

    def report(self) -> OffloadReport:
        self.finish()
        self.stats.loads = sum(p.cache.loads + p.low_bit_loads for p in self.phases.values())
        self.stats.bytes_read = sum(p.cache.bytes_read + p.low_bit_bytes for p in self.phases.values())
        resident = sum(self.plans[layer].cost_bytes * len(self.cache.resident(layer)) for layer in self.plans)
        layers = {p.index: LayerReport(p.precision, p.slots, p.slot_bytes, p.predictor, p.width,
                                       p.low_precision is not None) for p in self.plans.values()}
        return OffloadReport(
            executor=self.runner.name(), budget_bytes=self.run_plan.budget_bytes,
            total_expert_bytes=self.total_expert_bytes, reads=self.pool.mode, resident_bytes=resident,
            prefetch=self.options.prefetch, cache=self.options.cache, pool=self.options.pool,
            allocation=self.options.allocation,
            layers=layers, prefill=phase_report(self.phases["prefill"]), decode=phase_report(self.phases["decode"]),
            state_bytes=self.run_plan.state_bytes)


def phase_report(phase: PhaseStats) -> PhaseReport:
    c = phase.cache
    gets = sum(l.gets for l in c.layers.values())
    hits = sum(l.hits for l in c.layers.values())
    waits = sum(l.waits for l in c.layers.values())
    return PhaseReport(
        tokens=phase.tokens, seconds=phase.seconds, tokens_per_s=phase.tokens / phase.seconds if phase.seconds else 0.0,
        stall_s=c.stall_s, experts_loaded=c.loads + phase.low_bit_loads, bytes_read=c.bytes_read + phase.low_bit_bytes,
        int2_loads=phase.low_bit_loads, hit_rate=hits / gets if gets else None,
        loop_s=max(0.0, phase.room_s - c.stall_s - phase.run_s), loads_waited=phase.waits,
        covered_rate=(hits + waits) / gets if gets else None, late_prefetches=waits, layers_run_in_step=phase.in_step,
        prefetches_gated=phase.gated,
        hit_rate_per_layer={i: (l.hits / l.gets if l.gets else None) for i, l in sorted(c.layers.items())},
        prefetch_recall_per_layer={i: p.correct / p.actual if p.actual else None
                                   for i, p in sorted(phase.prediction.items())},
        prefetch_precision_per_layer={i: p.correct / p.predicted if p.predicted else None
                                      for i, p in sorted(phase.prediction.items())})


class _Reads:
    """The store's loads as its cache asks for them (residency.SlotLoads): one read of the expert's file
    at the plan's precision into the slot (on the native I/O threads where they run), and where its
    bytes then lie."""

    def __init__(self, store: OffloadedExperts):
        self._store = store

    def start(self, layer: int, expert: int, slot: int, urgent: bool = False) -> Load:
        """The read begun; its result is (the loaded expert, bytes read), and a session expert's slot
        pages go back once its session holds its own copy."""
        store = self._store

        def arrived(loaded: LoadedExpert) -> tuple[LoadedExpert, int]:
            if loaded.session is not None:
                store.pool.release(layer, slot)
            return loaded, loaded.nbytes

        # the last miss of a decode batch is read by the loop itself as it waits, where small (pool.INLINE_READ_BYTES)
        inline = urgent and store._phase == "decode" and store._inline_read
        return store.loader.start(layer, expert, store.plans[layer].precision, store.pool.buffer(layer, slot),
                                  store.pool, urgent, then=arrived, inline=inline)

    def load(self, layer: int, expert: int, slot: int) -> tuple[LoadedExpert, int]:
        return self.start(layer, expert, slot).result()

    def locate(self, key: tuple[int, int], loaded: LoadedExpert) -> int:
        return slot_offset(self._store.pool, loaded, self._store.plans[key[0]].precision)
