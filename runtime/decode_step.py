"""A layer's decode step in native code: one call per layer per token instead of an onnxruntime run
of its graph (and, where every expert the router chose is resident in a slot, instead of a second call
for the routed experts), computed from the bytes of that same graph file (the tensors the manifest's
DecodeStep places in it). The same step runs a prefill's tokens too (`prefill`: a tile of tokens per
pass over the weights), so a layer with a step needs no onnxruntime session once it is loaded: its
dense weights are held once, in the graph file's bytes. The graph stays the reference: it runs beside
the step at load (FateModel._check_native_steps) and wherever there is no step. The step runs where
the compiler wrote one, the native kernel is built and the experts are not held to the session
executor. Numbers equal the graph's to float32 rounding (the same int8 activation math for the
quantized products; sums in another order)."""

from __future__ import annotations

import numpy as np
from fate.artifacts import HeadStep, LayerSpec, ModelSpec
from fate.artifacts.layout import GraphIO as IO
from fate.artifacts.predictors import PREDICTION_OUTPUTS
from fate.artifacts.native_contract import HEAD, QK_NORMS, STEP, STEP_SCORINGS
from fate.artifacts.slots import check_step_in_graph

from . import native
from .experts.store import RoutedExperts
from .state import KVCache


class NativeHead:
    """The LM head's decode step over the head graph's bytes: logits of one token."""

    def __init__(self, spec: ModelSpec, step: HeadStep, data: bytes, threads: int, label: str):
        check_step_in_graph(step, data, f"{label}: head step")
        offsets = {view.name: view.offset for view in step.tensors}
        self.vector = np.asarray(HEAD.vector(dict(hidden=spec.hidden_size, vocab=spec.vocab_size, bits=step.bits,
                                                  block=step.block_size, int8=step.accuracy_level == 4), offsets),
                                 np.int64)
        self.numbers = (step.norm_eps, step.logits_scaling)
        self.graph, self.threads, self.vocab = data, threads, spec.vocab_size

    def run(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [1, V] of hidden [1, 1, H]."""
        logits = np.empty((1, self.vocab), np.float32)
        native.KERNEL.run_head(self.vector, self.numbers, self.graph, np.ascontiguousarray(hidden, np.float32),
                               logits, self.threads)
        return logits


def step_vector(spec: ModelSpec, layer: LayerSpec, next_experts: int) -> np.ndarray:
    """The int64 vector the native step reads (native_contract.STEP, kernel.h's S_ and T_): sizes, routing,
    the layer's window, and the offset of every tensor (-1 where absent)."""
    step, routing = layer.decode_step, layer.routing
    groups, kept = step.group_topk or (0, 0)
    values = dict(hidden=spec.hidden_size, heads=spec.num_heads, kv_heads=spec.kv_heads(layer), head_dim=spec.head_dim,
                  rot_half=len(spec.rope_inv_freq), experts=routing.num_experts, top_k=routing.top_k,
                  next_experts=next_experts, shared_inter=step.shared_intermediate_size, bits=step.bits,
                  block=step.block_size, int8=step.accuracy_level == 4, normalize=routing.normalize_top_k,
                  window=layer.sliding_window or spec.sliding_window or 0, qk_norm=QK_NORMS.index(step.qk_norm),
                  scoring=STEP_SCORINGS.index(routing.scoring), groups=groups, kept=kept)
    return np.asarray(STEP.vector(values, {view.name: view.offset for view in step.tensors}), dtype=np.int64)


class NativeDecodeStep:
    """One layer's decode step over its graph file's bytes (`data`, kept for the model's life). With
    `routed` (the layer's slots), the step runs the chosen experts too where all of them are resident
    there, and its residual is the layer's output; else the caller runs them from the routing it returns."""

    def __init__(self, spec: ModelSpec, layer: LayerSpec, next_experts: int, data: bytes, threads: int, label: str,
                 routed: RoutedExperts | None = None):
        step = layer.decode_step
        check_step_in_graph(step, data, f"{label}: decode step")
        self.spec, self.index, self.graph, self.threads, self.routed = spec, layer.index, data, threads, routed
        self.vector = step_vector(spec, layer, next_experts)
        self.numbers = (step.norm_eps, step.attention_scale, step.shared_scale, step.routed_scaling, step.clip_qkv or 0.0,
                        step.topk_norm_eps)
        self.top_k, self.next_experts = layer.routing.top_k, next_experts if layer.predicts_next else 0
        # worth running in two parts (`route`, then `finish`): a shared expert to compute after the routing,
        # beside the reads of the chosen experts not at hand
        self.splits = step.shared_intermediate_size > 0

    def prefill(self, hidden: np.ndarray, cache: KVCache, cos: np.ndarray, sin: np.ndarray) -> dict[str, np.ndarray]:
        """The layer's outputs for the tokens of hidden [1, S, H] after the cache's `length`, named and
        shaped as its graph's; their keys and values written into the cache's buffers in place; cos, sin:
        the position tables so far. The routed experts are the caller's to run."""
        position, tokens, h = cache.length, hidden.shape[1], self.spec.hidden_size
        state = cache.reserve(self.index, position + tokens, self.spec.max_positions)
        out = {IO.RESIDUAL: np.empty((1, tokens, h), np.float32), IO.ROUTER_INPUT: np.empty((tokens, h), np.float32),
               IO.EXPERT_IDS: np.empty((tokens, self.top_k), np.int64),
               IO.EXPERT_WEIGHTS: np.empty((tokens, self.top_k), np.float32)}
        predicted = [np.empty((tokens, self.next_experts), np.float32) for _ in range(2)] if self.next_experts else []
        out.update(zip(PREDICTION_OUTPUTS, predicted))
        native.KERNEL.run_prefill(self.vector, self.numbers, self.graph, np.ascontiguousarray(hidden, np.float32),
                                  state["key"], state["value"], position, cos, sin, out[IO.RESIDUAL],
                                  out[IO.ROUTER_INPUT], out[IO.EXPERT_IDS], out[IO.EXPERT_WEIGHTS],
                                  *(predicted or (None, None)), self.threads)
        return out

    def run(self, hidden: np.ndarray, cache: KVCache, cos: np.ndarray,
            sin: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        """The layer's outputs for one token after the cache's `length` (the graph's names), its key and
        value written into the cache's buffers in place; cos, sin: the position tables so far. And
        whether it ran the routed experts (every chosen one in `routed`): the residual then includes them."""
        out, args = self._outputs(hidden, cache, cos, sin)
        return out, native.KERNEL.run_step(*args, self.threads, self.routed)

    def route(self, hidden: np.ndarray, cache: KVCache, cos: np.ndarray, sin: np.ndarray) -> dict[str, np.ndarray]:
        """`run` up to the routing and the next layer's prediction: the residual holds the stream after
        attention until `finish` (the same bits as `run` once it has)."""
        out, args = self._outputs(hidden, cache, cos, sin)
        native.KERNEL.route_step(*args, self.threads)
        return out

    def finish(self, out: dict[str, np.ndarray]) -> bool:
        """The rest of the step `route` began, on its outputs: the shared expert added to the residual, and the
        routed experts where every chosen one is in `routed` (then True)."""
        return native.KERNEL.finish_step(self.vector, self.numbers, self.graph, out[IO.RESIDUAL], out[IO.ROUTER_INPUT],
                                         out[IO.EXPERT_IDS], out[IO.EXPERT_WEIGHTS], self.threads, self.routed)

    def _outputs(self, hidden: np.ndarray, cache: KVCache, cos: np.ndarray, sin: np.ndarray) -> tuple[dict, tuple]:
        """One token's output arrays, and the step's arguments before its threads."""
        position, h = cache.length, self.spec.hidden_size
        state = cache.reserve(self.index, position + 1, self.spec.max_positions)
        out = {IO.RESIDUAL: np.empty((1, 1, h), np.float32), IO.ROUTER_INPUT: np.empty((1, h), np.float32),
               IO.EXPERT_IDS: np.empty((1, self.top_k), np.int64),
               IO.EXPERT_WEIGHTS: np.empty((1, self.top_k), np.float32)}
        predicted = [np.empty((1, self.next_experts), np.float32) for _ in range(2)] if self.next_experts else []
        out.update(zip(PREDICTION_OUTPUTS, predicted))
        return out, (self.vector, self.numbers, self.graph, np.ascontiguousarray(hidden, np.float32),
                     state["key"], state["value"], position, cos[position], sin[position],
                     out[IO.RESIDUAL], out[IO.ROUTER_INPUT], out[IO.EXPERT_IDS], out[IO.EXPERT_WEIGHTS],
                     *(predicted or (None, None)))
