"""Where routed experts live while generating. The generation loop sees only `ExpertStore`:
`run(layer, expert, x)` computes one expert (loading it first if the store must), and
`hint(layer, scores)` tells the store which experts the cross-layer predictor expects next.
The budgeted cache with prefetching (runtime.experts.offload) is another implementation of the same
interface; the generation loop does not change."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
from fate.artifacts import Artifact, ArtifactError
from fate.artifacts.schema import PRECISION_BITS

from .executors import ExpertRunner, LoadedExpert, Work, assignments
from .loads import ExpertLoader
from .pool import SlotPool
from .report import OffloadReport, ResidentReport
from .trace import LayerSlots, TraceHeader


@dataclass
class ExpertStats:
    """Counters every store keeps; the stats of a run."""

    runs: int = 0
    loads: int = 0
    bytes_read: int = 0
    runs_per_layer: dict[int, int] = field(default_factory=dict)

    def count(self, layer: int, experts: int) -> None:
        self.runs += experts
        self.runs_per_layer[layer] = self.runs_per_layer.get(layer, 0) + experts


class RoutedExperts(NamedTuple):
    """A layer's experts as the native decode step takes them: the layout vector, the clamped SwiGLU's
    numbers, the layer's slots (one buffer) and, by expert id, where that expert's bytes begin in them
    or -1 where they are not there. The step runs the chosen experts when all of them are there; the
    store keeps `where` true, and its slots unchanged while a step runs (the loop's thread alone
    fills and evicts them between its steps)."""

    layout: np.ndarray
    limit: float
    alpha: float
    pool: memoryview
    where: np.ndarray  # int64 [experts]

    @classmethod
    def of(cls, runner: ExpertRunner, pool: SlotPool, layer: int, precision: str,
           where: np.ndarray) -> "RoutedExperts":
        """`layer`'s experts at `precision` in `pool`, placed by `where` (see slot_offset)."""
        layout, vector = runner.layout(layer, precision)
        return cls(vector, layout.swiglu_limit or 0.0, layout.swiglu_alpha or 0.0, pool.layer_buffer(layer), where)


def slot_offset(pool: SlotPool, loaded: LoadedExpert, precision: str) -> int:
    """Where a loaded expert's bytes begin in its layer's slots, for the decode step; -1 where the
    step's layout (the layer's `precision`) does not fit them: a copy read at another precision (a
    fallback) or a session expert."""
    if loaded.data is None or loaded.precision != precision:
        return -1
    return pool.offset_of(loaded.layer, loaded.data)


@dataclass(frozen=True)
class LayerOutputs:
    """What the forward pass hands the expert store after a layer's dense part (its graph or its native
    step): the routing of an MoE layer, and the next layer's predicted router scores."""

    router_input: np.ndarray | None = None  # [S, H]; None: not an MoE layer
    ids: np.ndarray | None = None  # [S, k], the router's choice in its order
    next_scores: dict[str, np.ndarray] = field(default_factory=dict)  # by graph output name, [S, E']
    experts_ran: bool = False  # the native step ran every chosen expert itself
    # a native decode step's output [1, 1, H] and the router's weights [1, k]: where the step could not run the
    # experts (some were not resident), the store may add them to this residual itself once they are (and
    # then hands back nothing to combine)
    residual: np.ndarray | None = None
    weights: np.ndarray | None = None
    # a native decode step run up to its routing (NativeDecodeStep.route): its rest (the shared expert, and the
    # routed experts where all are resident: then True), which the store runs once it has begun this layer's
    # reads and the next layer's prefetch, so that the reads overlap it; experts_ran is then its answer
    finish: Callable[[], bool] | None = None


# after_layer's `layer` for the embedding: it hands over only its predictions, which are layer 0's
EMBEDDING = -1


class ExpertStore(ABC):
    runner: ExpertRunner  # computes the experts (and says whether native code runs the decode steps)
    # whether experts are read while generating: a native decode step with a shared expert then hands its
    # routing over before computing it (LayerOutputs.finish), so that the reads begin first
    reads_while_generating = False

    def __init__(self) -> None:
        self.stats = ExpertStats()

    def after_layer(self, layer: int, out: LayerOutputs) -> np.ndarray | None:
        """The one hand-off per layer, in the order the store relies on: the layer's routing observed
        (its experts kept from prefetches until they have run); where the step stopped at its routing
        (`out.finish`), the misses' loads begun and the rest of the step run beside them; the next layer's
        prefetch requested; then the routed experts computed: y [S * k, H] (see compute), or None where
        there are none to compute (not an MoE layer, or the step ran them) or the store added them to the
        step's residual. `layer` EMBEDDING (-1): the embedding's predictions of layer 0's experts, before it runs."""
        ran, begun = out.experts_ran, None
        if out.ids is not None:
            self.observe(layer, out.ids)
            if out.finish is not None:
                begun = self.begin(layer, out.ids)
            elif ran:
                self.ran_in_step(layer, out.ids)
        try:
            if out.next_scores:
                self.hint(layer + 1, out.next_scores)
            if out.finish is not None:
                ran = self.finish_step(out.finish)
                if ran and out.ids is not None:
                    self.ran_in_step(layer, out.ids)  # never with loads begun: a miss is not where the step looks
        except BaseException:
            if begun is not None:
                self.abandon(begun)
            raise
        if out.ids is None or ran:
            return None
        return self.compute(layer, np.ascontiguousarray(out.router_input, dtype=np.float32), out.ids,
                            out if out.residual is not None else None, begun)

    def begin(self, layer: int, ids: np.ndarray) -> object | None:
        """Before a native step's rest runs (LayerOutputs.finish): the loads of `layer`'s chosen experts
        that are not at hand begun, what `compute` is then handed; None where there are none."""
        return None

    def abandon(self, begun: object) -> None:
        """What `begin` began, given up: the layer failed before `compute`."""

    def finish_step(self, finish: Callable[[], bool]) -> bool:
        """Run the rest of a native step (LayerOutputs.finish): whether it ran the routed experts."""
        return finish()

    @abstractmethod
    def compute(self, layer: int, x: np.ndarray, ids: np.ndarray, step: LayerOutputs | None = None,
                begun: object | None = None) -> np.ndarray | None:
        """Every routed expert of `layer` on its tokens: x [S, H] and the router's ids [S, k] ->
        y [S * k, H], row t * k + j being expert ids[t, j] applied to x[t]; or None where it added them
        to `step`'s residual itself (a native decode step's output, LayerOutputs.residual). `begun`: what
        `begin` began for them."""

    def begin_step(self, num_tokens: int, prefill: bool) -> None:
        """A forward pass over `num_tokens` new tokens starts, in prefill or decode."""

    def hint(self, layer: int, predictions: dict[str, np.ndarray]) -> None:
        """Cross-layer predictions of `layer`'s router logits [S, E], by graph output name,
        computed by the previous layer before `layer` runs."""

    def observe(self, layer: int, expert_ids: np.ndarray) -> None:
        """The experts `layer`'s router chose [S, k] (activation-path predictors use them)."""

    def native_layer(self, layer: int) -> RoutedExperts | None:
        """What a native decode step needs to run `layer`'s routed experts itself where they are
        resident and run natively, or None: the step hands its routing to `compute`."""
        return None

    def ran_in_step(self, layer: int, expert_ids: np.ndarray) -> None:
        """`layer`'s decode step ran the experts it chose ([1, k]) itself (see native_layer)."""
        self.stats.count(layer, expert_ids.size)

    def predicted(self, layer: int) -> set[int] | None:
        """The experts of `layer` the store was asked to prefetch before its routing was known (for
        traces), or None."""
        return None

    @abstractmethod
    def trace_header(self) -> TraceHeader:
        """The slots of each MoE layer as this store holds them (a trace's first line)."""

    @abstractmethod
    def report(self) -> ResidentReport | OffloadReport:
        """Statistics of the run so far, for --json and the summary line."""

    def ready(self) -> None:
        """The model is loaded: take the memory the store holds its experts in (runtime.experts.pool.SlotPool.populate)."""

    def close(self) -> None:
        """Stop background work, release memory."""


def resident_precision(artifact: Artifact, layer: int, wanted: str | None) -> str:
    """The precision a layer's experts run at: asked for, else the policy's, else the smallest
    stored of at least 4 bits (INT2 copies are for prefill transfers, not for residence)."""
    manifest = artifact.manifest
    stored = manifest.layers[layer].experts
    if wanted is not None:
        if wanted not in stored:
            raise ArtifactError(f"layer {layer} stores experts as {', '.join(stored)}, not {wanted}")
        return wanted
    decided = manifest.policy.layer(layer) if manifest.policy else None
    if decided is not None:
        return decided.precision
    usable = [p for p in stored if PRECISION_BITS[p] >= 4] or list(stored)
    return min(usable, key=lambda p: PRECISION_BITS[p])


def largest_file(artifact: Artifact, layer: int, precision: str) -> int:
    return max(artifact.entry(path).size for path in artifact.manifest.layers[layer].experts[precision])


# Loads begun ahead of the one being finished, so that reading the next experts overlaps checking
# (hashing) and preparing this one.
LOADS_AHEAD = 4


@dataclass(frozen=True)
class ExpertOptions:
    """How experts are read and run, whether all resident or offloaded (the engine's options give
    them: EngineOptions.experts)."""

    precision: str | None = None  # the stored precision to keep resident (None: the policy's per layer)
    executor: str = "auto"  # native, session or auto
    threads: int = 0  # the native kernel's threads (0: every core)
    verify: bool = True  # each file's SHA-256 checked on its first read
    verify_every_load: bool = False  # and on every read (files that may change under the run)


class ResidentExperts(ExpertStore):
    """Every expert read into a slot at start and kept: the all-resident reference."""

    def __init__(self, artifact: Artifact, options: ExpertOptions = ExpertOptions()):
        super().__init__()
        self.runner = ExpertRunner(artifact, options.executor, options.threads)
        self.loader = ExpertLoader(artifact, self.runner, options.verify, every_load=options.verify_every_load)
        layers = artifact.manifest.moe_layers
        self.precisions = {spec.index: resident_precision(artifact, spec.index, options.precision) for spec in layers}
        self.pool = SlotPool({spec.index: spec.routing.num_experts for spec in layers},
                             {spec.index: largest_file(artifact, spec.index, self.precisions[spec.index])
                              for spec in layers}, reused=False)
        self.experts: dict[tuple[int, int], LoadedExpert] = {}
        begun: deque = deque()  # reads (and hashes) under way ahead of the load being finished
        try:
            for spec in layers:
                for expert in range(spec.routing.num_experts):
                    begun.append(((spec.index, expert), self.loader.start(
                        spec.index, expert, self.precisions[spec.index], self.pool.buffer(spec.index, expert),
                        self.pool)))
                    if len(begun) > LOADS_AHEAD:
                        self._keep(*begun.popleft())
            while begun:
                self._keep(*begun.popleft())
        finally:
            for _, load in begun:  # a load failed: nothing may still read into the pool
                if not load.cancel():
                    try:
                        load.result()
                    except BaseException:  # noqa: BLE001 - the first failure is the one being raised
                        pass
            self.loader.close()

    def _keep(self, key: tuple[int, int], load) -> None:
        loaded = load.result()
        if loaded.session is not None:
            self.pool.release(*key)
        self.experts[key] = loaded
        self.stats.loads += 1
        self.stats.bytes_read += loaded.nbytes

    def native_layer(self, layer: int) -> RoutedExperts | None:
        precision = self.precisions[layer]
        if not self.runner.native_for(layer, precision):
            return None
        count = self.runner.artifact.manifest.layers[layer].routing.num_experts
        where = np.asarray([slot_offset(self.pool, self.experts[(layer, expert)], precision)
                            for expert in range(count)], np.int64)
        return RoutedExperts.of(self.runner, self.pool, layer, precision, where)

    def compute(self, layer: int, x: np.ndarray, ids: np.ndarray, step: LayerOutputs | None = None,
                begun: object | None = None) -> np.ndarray:
        y = np.empty((ids.size, x.shape[1]), np.float32)
        work = [Work(self.experts[(layer, e)], rows, dest) for e, (rows, dest) in assignments(ids).items()]
        self.stats.count(layer, len(work))
        self.runner.run(layer, work, x, y)
        return y

    def report(self) -> ResidentReport:
        return ResidentReport(self.runner.name())

    def trace_header(self) -> TraceHeader:
        manifest = self.runner.artifact.manifest
        return TraceHeader([LayerSlots(i, manifest.layers[i].routing.num_experts, manifest.layers[i].routing.top_k,
                                       self.pool.slots[i], self.pool.slot_bytes[i]) for i in self.precisions])
