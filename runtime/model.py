"""A loaded artifact that computes logits: the dense graphs through onnxruntime, the routed
experts through an ExpertStore. Imports no torch and no transformers."""

from __future__ import annotations

import dataclasses
import os
from functools import partial

import numpy as np
from fate.artifacts import Artifact, ArtifactError, GenerationError, LayerSpec
from fate.artifacts.budget import Budget
from fate.artifacts.graph_check import float_attributes
from fate.artifacts.layout import GraphIO as IO
from fate.artifacts.predictors import PREDICTION_OUTPUTS

from . import native
from .decode_step import NativeDecodeStep, NativeHead
from .experts.offload import OffloadedExperts, OffloadOptions
from .experts.plan import plan_run
from .experts.pool import slot_size
from .experts.residency import BudgetError
from .experts.store import EMBEDDING, ExpertStore, LayerOutputs, ResidentExperts, largest_file, resident_precision
from .experts.trace import TraceRecorder
from .interface import check_interface, combine_interface, embed_interface, head_interface, layer_interface
from .memory import PREFILL_CHUNK, MemoryPlan, current_rss, plan_memory, release_freed_memory
from .options import EngineOptions
from .positions import PositionTables
from .sessions import NamedSession, graph_threads, make_session
from .state import KVCache, experts_input, hands_on_partial, layer_feeds, state_names

# The context a memory limit plans its KV cache for unless told (the model's, where that is smaller)
DEFAULT_CONTEXT = 4096


class FateModel:
    """`FateModel.load(path)`, then `logits(ids)`, or the generation API in fate.runtime.generate."""

    def __init__(self, artifact: Artifact, experts: ExpertStore, threads: int = 0, verify: bool = True,
                 decode_steps: bool = True):
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.spec = artifact.manifest.model
        self.experts = experts
        self.dense_bytes = 0  # the non-expert graphs' files
        def load(path: str, interface: tuple[dict, dict], layer: LayerSpec | None = None, head: bool = False):
            data, label = artifact.read_graph(path, verify=verify), artifact.member(path).label
            try:
                session = make_session(data, graph_threads(threads, len(data)), label=label)
            except Exception as e:  # noqa: BLE001 - onnxruntime's own error types; the file is what is wrong
                raise ArtifactError(f"{label}: onnxruntime cannot load it: {str(e).splitlines()[0][:300]}") from None
            check_interface(session, label, *interface)
            self.dense_bytes += len(data)
            native_steps = decode_steps and experts.runner.native_steps()
            if native_steps and head and self.manifest.head_step is not None:
                self.native_head = NativeHead(self.spec, self.manifest.head_step, data, experts.runner.threads, label)
            if native_steps and layer is not None and layer.decode_step is not None:
                following = self.manifest.layers[layer.index + 1] if layer.predicts_next else None
                self.steps[layer.index] = NativeDecodeStep(self.spec, layer, following.routing.num_experts
                                                           if following else 0, data, experts.runner.threads, label,
                                                           experts.native_layer(layer.index))
            return session

        self.steps: dict[int, NativeDecodeStep] = {}
        self.native_head: NativeHead | None = None
        self.positions = PositionTables(self.spec)
        self.embed = load(self.manifest.embed_graph, embed_interface(self.manifest))
        # the embedding's prediction of layer 0's experts is asked for only where they are read while generating
        self._embed_predicts = self.manifest.embed_predicts_next and experts.reads_while_generating
        self.head = load(self.manifest.head_graph, head_interface(self.manifest), head=True)
        if self.native_head is not None:  # the head step computes every row from now on: its weights held once
            self._check_head_step(probes=verify)
            self.head = None
        self.combines = {layer.index: load(layer.combine_graph, combine_interface(self.manifest, layer))
                         for layer in self.manifest.layers if layer.combine_graph}
        self.layers: list[NamedSession | None] = []
        self._outputs: list[list[str]] = []
        for layer in self.manifest.layers:  # one at a time: a layer with a step lets its session go at once
            session = load(layer.graph, layer_interface(self.manifest, layer), layer)
            meta = session.session.get_modelmeta().custom_metadata_map
            if meta.get(IO.ROUTED_SUM_META) == "combine_graph" and not layer.combine_graph:
                raise ArtifactError(f"{artifact.member(layer.graph).label}: its routed experts join the residual "
                                    f"through a combine graph, which the manifest does not list for layer {layer.index}")
            names = self._output_names(layer)
            if hands_on_partial(layer, session):
                names.append(IO.MOE_PARTIAL)
            self.layers.append(session)
            self._outputs.append(names)
            if layer.index in self.steps:  # the step runs every token of the layer: its weights held once
                self._check_step(layer.index, probes=verify)
                self.layers[-1] = session = None
                release_freed_memory()  # the session's memory, before the next layer's is made
        release_freed_memory()  # what loading read and let go (graph bytes, onnxruntime's transients)
        self.trace: TraceRecorder | None = None  # start_trace
        self._trace_path: str | os.PathLike | None = None
        self.memory_plan: MemoryPlan | None = None  # load(memory_limit=...)
        self.context = self.spec.max_positions  # tokens a sequence may hold
        self._steps_run = 0

    def _check_step(self, index: int, probes: bool = True, probe: int = 4, tokens: int = 3,
                    bound: float = 2e-2) -> None:
        """A native step takes its numbers (scales, epsilons, clamps, routing constants) from the
        manifest, and its graph holds the same numbers as the graph computes them: the two must not
        disagree (the step runs the layer from now on). Each step runs beside its graph at load on a
        probe (`probe` random states, first through the graph then through the step's prefill, in
        caches of their own; then `tokens` more, one at a time), refused where every token differs by
        more than `bound`. One token may differ by about 1e-3 where an int8 activation rounds the other
        way (their sums come in another order); a wrong number moves them all. The probes cost a few graph
        runs per layer (25 ms at hidden 2048 on a 2-core machine); `probes` False (--no-verify: an artifact
        trusted as it is) skips them (the attention scale is held to the graph's exactly in any case)."""
        rng = np.random.default_rng(index)
        h = self.spec.hidden_size
        step, spec = self.steps[index], self.manifest.layers[index]
        label = self.artifact.member(spec.graph).label
        scales = float_attributes(step.graph, "GroupQueryAttention", "scale")
        if scales != [np.float32(spec.decode_step.attention_scale)]:
            raise ArtifactError(f"{label}: the manifest's decode step has attention scale "
                                f"{spec.decode_step.attention_scale:g}, the graph {', '.join(map(str, scales)) or 'none'}")
        if not probes:
            return
        x = rng.standard_normal((1, probe, h)).astype(np.float32)
        by_graph, by_step = self.new_cache(), self.new_cache()
        want = self.run_layer(spec, x, by_graph, self.positions.step(0, probe).for_layer(spec), probe)
        got = step.prefill(x, by_step, *self.positions.upto(probe))
        by_graph.length = by_step.length = probe
        errors: dict[str, float] = {}
        self._compare(got, want, errors)
        routed, step.routed = step.routed, None  # the layer alone, not its experts
        try:
            for _ in range(tokens):
                x = rng.standard_normal((1, 1, h)).astype(np.float32)
                position = by_graph.length
                want = self.run_layer(spec, x, by_graph, self.positions.step(position, 1).for_layer(spec), 1)
                got, _ = step.run(x, by_step, *self.positions.upto(position + 1))
                by_graph.length = by_step.length = position + 1
                self._compare(got, want, errors)
        finally:
            step.routed = routed
        for name, error in errors.items():
            if error > bound:
                raise ArtifactError(f"{label}: the manifest's decode step computes {name} otherwise than the "
                                    f"graph (relative error {error:.2g}: a number of its decode_step disagrees "
                                    f"with the graph's)")

    @staticmethod
    def _compare(got: dict[str, np.ndarray], want: dict[str, np.ndarray], errors: dict[str, float]) -> None:
        """The least relative error so far of each output the step and the graph both give (the weights
        only where both chose the same experts: a near tie may pick otherwise)."""
        names = [IO.RESIDUAL, IO.ROUTER_INPUT, *(n for n in PREDICTION_OUTPUTS if n in got)]
        if np.array_equal(got[IO.EXPERT_IDS], want[IO.EXPERT_IDS]):
            names.append(IO.EXPERT_WEIGHTS)
        for name in names:
            errors[name] = min(errors.get(name, np.inf), relative_error(got[name], want[name]))

    def _check_head_step(self, probes: bool = True, bound: float = 2e-2) -> None:
        """The head step beside the head graph on a probe, as _check_step holds a layer's."""
        if not probes:
            return
        x = np.random.default_rng(0).standard_normal((1, 1, self.spec.hidden_size)).astype(np.float32)
        error = relative_error(self.native_head.run(x), self.head.run([IO.LOGITS], {IO.HIDDEN: x})[0][0])
        if error > bound:
            raise ArtifactError(f"{self.artifact.member(self.manifest.head_graph).label}: the manifest's head "
                                f"step computes otherwise than the graph (relative error {error:.2g}: a number "
                                f"of its head_step disagrees)")

    @classmethod
    def load(cls, path: str | os.PathLike, options: EngineOptions | None = None) -> "FateModel":
        """Open an artifact as `options` say (runtime.options): every expert resident, or, with
        `options.offload`, a budgeted expert cache; with `options.memory_limit`, the whole process
        planned within it (plan_limit), for `options.context` tokens, which generation then stops at."""
        options = options or EngineOptions()
        artifact = Artifact.open(path)
        plan, offload = None, options.offload
        if options.memory_limit is not None:
            plan, offload = plan_limit(artifact, options)
        store = ResidentExperts(artifact, options.experts) if offload is None \
            else OffloadedExperts(artifact, offload, options.experts)
        try:
            model = cls(artifact, store, options.threads, options.verify, options.decode_steps)
            store.ready()  # the pool's memory, once the dense graphs' load has let its transient go
        except BaseException:
            store.close()
            raise
        model.memory_plan = plan
        artifact.checked.save()  # the files this load hashed need not be hashed by the next run
        if plan is not None:
            model.context = plan.context
            held = current_rss()
            if held + plan.kv_cache > plan.limit:
                model.close()
                raise BudgetError(f"after loading, this process holds {held / 1e6:.0f} MB, and the keys and values of "
                                  f"{plan.context} tokens need {plan.kv_cache / 1e6:.0f} MB more: a memory limit of "
                                  f"{plan.limit / 1e6:.0f} MB is too small (give more, or a smaller --context)")
        return model

    def _output_names(self, layer: LayerSpec) -> list[str]:
        names = [IO.present(name) for name in state_names(layer)] + [IO.RESIDUAL]
        if layer.kind == "moe":
            names += [IO.ROUTER_INPUT, IO.EXPERT_IDS, IO.EXPERT_WEIGHTS]
            names += [IO.EXPERT_INPUT] if layer.expert_input_size else []
        if layer.predicts_next:
            names += list(PREDICTION_OUTPUTS)
        return names

    @property
    def step_bytes(self) -> int:
        """The graph bytes the native steps keep beside onnxruntime's sessions."""
        held = sum(len(step.graph) for step in self.steps.values())
        return held + (len(self.native_head.graph) if self.native_head is not None else 0)

    def start_trace(self, path: str | os.PathLike | None = None) -> None:
        """Record the routing of every forward pass from now on (runtime.experts.trace): in `trace.records`, and
        with `path`, written there when `close()` is called."""
        self.trace, self._trace_path = TraceRecorder(self.experts.trace_header()), path

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.manifest)

    # ------------------------------------------------------------------ one forward pass

    def forward(self, ids: np.ndarray, cache: KVCache) -> np.ndarray:
        """Run new token ids through every layer, extending `cache`; returns hidden [1, S, H]. More
        than PREFILL_CHUNK tokens run as consecutive steps of that many."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise GenerationError("no tokens to run")
        if cache.length + ids.size > self.context:
            raise GenerationError(f"{cache.length + ids.size} tokens exceed the context of {self.context}"
                                  f"{'' if self.context == self.spec.max_positions else ' this run planned its memory for'}")
        if ids.min() < 0 or ids.max() >= self.spec.vocab_size:
            raise GenerationError(f"token id out of range [0, {self.spec.vocab_size})")
        prefill = cache.length == 0 or ids.size > 1
        chunks = [self._step(ids[i:i + PREFILL_CHUNK], cache, prefill) for i in range(0, ids.size, PREFILL_CHUNK)]
        if ids.size > 1:  # a prefill's scratch goes back to the system, not kept at its peak
            release_freed_memory()
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=1)

    def _step(self, ids: np.ndarray, cache: KVCache, prefill: bool) -> np.ndarray:
        positions = self.positions.step(cache.length, ids.size)
        self.experts.begin_step(ids.size, prefill=prefill)
        if self._embed_predicts:  # layer 0's reads begin before it runs
            hidden, *predicted = self.embed.run([IO.HIDDEN, *PREDICTION_OUTPUTS], {IO.INPUT_IDS: ids})
            self.experts.after_layer(EMBEDDING, LayerOutputs(next_scores=dict(zip(PREDICTION_OUTPUTS, predicted))))
        else:
            hidden = self.embed.run([IO.HIDDEN], {IO.INPUT_IDS: ids})[0]
        cos, sin = self.positions.upto(cache.length + ids.size) if self.steps else (None, None)
        for spec in self.manifest.layers:
            step = self.steps.get(spec.index)
            stepped = step is not None and ids.size == 1  # a decode step: its residual can take the experts
            finish = None
            if stepped and step.splits and self.experts.reads_while_generating:
                out, ran_experts = step.route(hidden, cache, cos, sin), False
                finish = partial(step.finish, out)  # the store runs it once this layer's reads are begun
            elif stepped:
                out, ran_experts = step.run(hidden, cache, cos, sin)
            elif step is not None:
                out, ran_experts = step.prefill(hidden, cache, cos, sin), False
            else:
                out, ran_experts = self.run_layer(spec, hidden, cache, positions.for_layer(spec), ids.size), False
            hidden, moe = out[IO.RESIDUAL], spec.kind == "moe"
            if moe and self.trace is not None:
                self.trace.record("prefill" if prefill else "decode", self._steps_run, cache.length, spec.index,
                                  out[IO.EXPERT_IDS], self.experts.predicted(spec.index))
            routed = self.experts.after_layer(spec.index, LayerOutputs(
                experts_input(out, spec) if moe else None, out[IO.EXPERT_IDS] if moe else None,
                {name: out[name] for name in PREDICTION_OUTPUTS} if spec.predicts_next else {}, ran_experts,
                out[IO.RESIDUAL] if stepped else None, out[IO.EXPERT_WEIGHTS] if stepped else None, finish))
            if routed is not None:  # else none, or the store added them to the step's residual
                hidden = self.combine(spec.index, out, routed)
        cache.length += ids.size
        self._steps_run += 1
        return hidden

    def run_layer(self, spec: LayerSpec, hidden: np.ndarray, cache: KVCache, positional: dict[str, np.ndarray],
                  new_tokens: int) -> dict[str, np.ndarray]:
        """One layer graph on `new_tokens` hidden states after the cache's `length`: its outputs by
        name, the layer's state in `cache` replaced (or, kept in place, written into)."""
        session, names = self.layers[spec.index] or self.graph_session(spec.graph), self._outputs[spec.index]
        if cache.runs_in_place(spec.index):
            state = cache.reserve(spec.index, cache.length + new_tokens, self.spec.max_positions)
            shared = {IO.present(name): IO.past(name) for name in state}
            return dict(zip(names, session.run_in_place(names, layer_feeds(spec, hidden, state, positional), shared)))
        state = cache.state(spec.index)
        out = dict(zip(names, session.run(names, layer_feeds(spec, hidden, state, positional))))
        cache.layers[spec.index] = {name: out[IO.present(name)] for name in state}
        return out

    def combine(self, layer: int, out: dict[str, np.ndarray], routed: np.ndarray) -> np.ndarray:
        """The layer's output: residual + sum over each token's top-k experts of weight x expert(router
        input) (routed: those expert outputs, ExpertStore.compute's), summed in the router's order whatever
        order the experts ran in (tokens never depend on residency)."""
        ids, weights, hidden = out[IO.EXPERT_IDS], out[IO.EXPERT_WEIGHTS], out[IO.RESIDUAL]
        shape = experts_input(out, self.manifest.layers[layer]).shape
        y = routed.reshape(*ids.shape, -1)
        combine = self.combines.get(layer)
        total = np.zeros(shape, np.float32) if combine is not None else hidden.reshape(shape).copy()
        y *= weights[:, :, None]
        for j in range(ids.shape[1]):
            total += y[:, j]
        if combine is not None:  # the routed sum (with any shared experts) is normalized before it joins the residual
            if IO.MOE_PARTIAL in out:
                total += out[IO.MOE_PARTIAL]
            return combine.run([IO.HIDDEN], {IO.RESIDUAL: hidden, IO.ROUTED: total})[0]
        return total.reshape(hidden.shape)

    def graph_session(self, path: str) -> NamedSession:
        """A new onnxruntime session of one of the artifact's graphs: the reference a native step is held
        to (the load-time probes, tests). The model keeps none for the layers and head its steps run."""
        data = self.artifact.read_graph(path, verify=False)
        return make_session(data, graph_threads(0, len(data)), label=self.artifact.member(path).label)

    def head_logits(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [S, V] for hidden states [1, S, H]; never NaN or infinite: whatever made them so (a
        damaged weight in a graph or an expert, a manifest number) is refused, not sampled from."""
        if self.native_head is not None:
            logits = np.concatenate([self.native_head.run(hidden[:, t:t + 1]) for t in range(hidden.shape[1])])
        else:
            logits = self.head.run([IO.LOGITS], {IO.HIDDEN: hidden})[0][0]
        if not np.isfinite(logits).all():
            raise GenerationError("the model computed NaN or infinite logits: a weight or a number in this "
                                  "artifact is damaged")
        return logits

    def logits(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Logits [len(ids), vocab] for a whole sequence, from an empty cache."""
        return self.head_logits(self.forward(np.asarray(ids), self.new_cache()))

    def close(self) -> None:
        try:
            if self.trace is not None and self._trace_path is not None:
                self.trace.save(self._trace_path)
                self._trace_path = None
        finally:
            self.experts.close()
            self.artifact.checked.save()


@dataclasses.dataclass(frozen=True)
class MemoryNeeds:
    """What a run of an artifact needs: `plan` (runtime.memory.plan_memory at `limit`), the experts'
    least (one token's in every layer: the least --memory-budget) and all of them resident."""

    plan: MemoryPlan
    fewest: int
    resident: int

    @property
    def least_limit(self) -> int:
        return max(self.plan.floor + self.fewest, self.plan.loading)

    @property
    def all_resident(self) -> int:
        """The whole process with every expert in memory."""
        return max(self.plan.floor + self.resident, self.plan.loading)


def memory_needs(artifact: Artifact, limit: int, options: EngineOptions) -> MemoryNeeds:
    manifest = artifact.manifest
    context = min(options.context or DEFAULT_CONTEXT, manifest.model.max_positions)
    graphs = [manifest.embed_graph, manifest.head_graph, *(l.graph for l in manifest.layers),
              *(l.combine_graph for l in manifest.layers if l.combine_graph)]
    steps = options.decode_steps and options.executor != "session" and native.available()
    plan = plan_memory(manifest, {g: artifact.member(g).size for g in graphs}, limit, context, steps,
                       reserved=options.reserved)
    resident = sum(slot_size(largest_file(artifact, l.index, resident_precision(artifact, l.index, options.precision)))
                   * l.routing.num_experts for l in manifest.moe_layers) + manifest.state_bytes
    try:  # the least the experts need: one token's in every layer (and the layers' state)
        plan_run(manifest, None, Budget(bytes=0), lambda l: resident_precision(artifact, l, options.precision),
                 lambda l, p: largest_file(artifact, l, p), lambda l, p: True, allocation="uniform")
        fewest = 0
    except BudgetError as e:
        fewest = e.needed or 0
    return MemoryNeeds(plan, fewest, resident)


def plan_limit(artifact: Artifact, options: EngineOptions) -> tuple[MemoryPlan, OffloadOptions | None]:
    """What the whole-process `options.memory_limit` leaves for the experts (runtime.memory.plan_memory),
    as the offload options' budget (the rest of them `options.offload`'s, or the defaults); None
    (every expert resident) where all of them fit in it."""
    limit = options.memory_limit
    needs = memory_needs(artifact, limit, options)
    plan, least = needs.plan, needs.least_limit
    if limit < least:
        raise BudgetError(f"a memory limit of {limit / 1e6:.0f} MB cannot hold this model: the process needs "
                          f"{plan.floor / 1e6:.0f} MB besides the experts ({describe(plan)}), one token's experts "
                          f"in every layer {needs.fewest / 1e6:.0f} MB, and loading peaks at "
                          f"{plan.loading / 1e6:.0f} MB; the least limit is {least / 1e6:.0f} MB", needed=least)
    if plan.pool >= needs.resident:
        return plan, None
    return plan, dataclasses.replace(options.offload or OffloadOptions(Budget(bytes=0)), budget=Budget(bytes=plan.pool))


def describe(plan: MemoryPlan) -> str:
    parts = [("libraries", plan.baseline), ("dense graphs", plan.dense), ("native steps' graphs", plan.steps),
             (f"KV cache at {plan.context} tokens", plan.kv_cache), ("prefill scratch", plan.scratch),
             ("headroom", plan.headroom), ("conversation cache", plan.reserved)]
    return ", ".join(f"{name} {size / 1e6:.0f}" for name, size in parts if size)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (NaN anywhere: infinite)."""
    scale = float(np.abs(want).max(initial=0.0))
    err = float(np.abs(got - want).max(initial=0.0)) / max(scale, 1e-30)
    return err if np.isfinite(err) else float("inf")
