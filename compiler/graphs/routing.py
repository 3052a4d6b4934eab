"""Routers inside the layer graphs (softmax top-k, sparsemixer, sigmoid with correction bias and groups),
and the next layer's router a layer graph (or the embedding graph, for layer 0) applies to predict its
experts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fate.artifacts import ModelError
from fate.artifacts.layout import GraphIO as IO

from ..families.base import ArchConfig
from ..onnx_builder import FLOAT, GraphBuilder
from .blocks import linear, norm


def sparsemixer_pick(b: GraphBuilder, scores: str, original: str, eps: float) -> tuple[str, str]:
    """One step of sparsemixer at inference (transformers' `sparsemixer`, eval branch):

        top   = argmax(scores);  m = max(scores)
        keep  = (m - original) / max(|original|, m) <= 2 * eps     (others masked to -inf)
        weight = softmax(scores where keep)[top]
    """
    top = b.op("ArgMax", scores, axis=-1, keepdims=1)
    peak = b.op("ReduceMax", scores, axes=[-1], keepdims=1)
    factor = b.op("Max", b.op("Abs", original), peak)
    drop = b.op("Greater", b.op("Div", b.op("Sub", peak, original), factor), b.scalar(2 * eps, "jitter"))
    masked = b.op("Where", drop, b.scalar(-np.inf, "neg_inf"), scores)
    weight = b.op("GatherElements", b.op("Softmax", masked, axis=-1), top, axis=-1)
    return top, weight


def route_sparsemixer(b: GraphBuilder, logits: str, num_experts: int, eps: float) -> tuple[str, str]:
    """Phi-3.5-MoE's top-2: the best expert, then the best of the rest, each weighted by a softmax
    over the experts within its relative threshold; the two weights are not renormalized."""
    first, w1 = sparsemixer_pick(b, logits, logits, eps)
    is_first = b.op("Equal", b.const(np.arange(num_experts, dtype=np.int64), "expert_index"), first)
    rest = b.op("Where", is_first, b.scalar(-np.inf, "neg_inf"), logits)
    second, w2 = sparsemixer_pick(b, rest, logits, eps)
    return b.op("Concat", first, second, axis=-1), b.op("Concat", w1, w2, axis=-1)


def choice_scores(b: GraphBuilder, logits: str, cfg: ArchConfig, score_bias: np.ndarray | None) -> str:
    """The scores a router ranks experts by: its logits (softmax keeps their order), or with a
    correction bias the probabilities (sigmoid, or softmax: ERNIE-4.5) plus the bias. Predictions
    are ranked the same way."""
    if cfg.routing.scoring == "sigmoid":
        scores = b.op("Sigmoid", logits)
    elif score_bias is not None and cfg.routing.scoring == "softmax":
        scores = b.op("Softmax", logits, axis=-1)
    else:
        return logits
    return scores if score_bias is None else b.op("Add", scores, b.const(score_bias.astype(np.float32), "score_bias"))


def route_sigmoid(b: GraphBuilder, logits: str, cfg: ArchConfig, score_bias: np.ndarray | None) -> tuple[str, str]:
    """DeepSeek-V3: experts chosen by sigmoid score + bias within the best groups (a group's
    score is the sum of its two best), weighted by the plain sigmoid score, optionally
    renormalized, times the routed scaling factor."""
    scores = b.op("Sigmoid", logits)
    choice = choice_scores(b, logits, cfg, score_bias)
    if cfg.routing.group_topk is not None:
        groups, kept = cfg.routing.group_topk
        grouped = b.op("Reshape", choice, b.ints([0, groups, -1]))
        per_group = b.op("ReduceSum", b.op("TopK", grouped, b.ints([2]), outputs=2, axis=-1)[0], b.ints([-1]),
                         keepdims=0)
        threshold = b.op("ReduceMin", b.op("TopK", per_group, b.ints([kept]), outputs=2, axis=-1)[0],
                         axes=[-1], keepdims=1)
        keep_group = b.op("Unsqueeze", b.op("GreaterOrEqual", per_group, threshold), b.ints([-1]))
        keep = b.op("Reshape", b.op("Expand", keep_group, b.ints([1, groups, cfg.routing.num_experts // groups])),
                    b.ints([0, cfg.routing.num_experts]))
        choice = b.op("Where", keep, choice, b.scalar(-np.inf, "neg_inf"))
    ids = b.op("TopK", choice, b.ints([cfg.routing.top_k]), outputs=2, axis=-1, largest=1, sorted=1)[1]
    weights = b.op("GatherElements", scores, ids, axis=-1)
    if cfg.routing.normalize_top_k:
        total = b.op("Add", b.op("ReduceSum", weights, b.ints([-1]), keepdims=1), b.scalar(cfg.routing.topk_norm_eps, "tiny"))
        weights = b.op("Div", weights, total)
    if cfg.routing.routed_scaling != 1.0:
        weights = b.op("Mul", weights, b.scalar(cfg.routing.routed_scaling, "routed_scaling"))
    return ids, weights


def route(b: GraphBuilder, logits: str, cfg: ArchConfig, score_bias: np.ndarray | None = None) -> tuple[str, str]:
    """Softmax over experts, (group-limited) top-k, optional renormalization, routed scaling.

    group-limited: each group's best score (DeepSeek-V2) or the sum of its two best (Mistral-4) ranks
    the groups; experts outside the best `kept` groups are zeroed before the top-k. With a correction bias (ERNIE-4.5) the experts
    are chosen by probability + bias and weighed by the probability alone."""
    probs = b.op("Softmax", logits, axis=-1)
    if score_bias is not None:
        if cfg.routing.group_topk is not None:
            raise ModelError("a router with a score correction bias and expert groups under softmax is not supported")
        ids = b.op("TopK", choice_scores(b, logits, cfg, score_bias), b.ints([cfg.routing.top_k]), outputs=2, axis=-1,
                   largest=1, sorted=1)[1]
        weights = b.op("GatherElements", probs, ids, axis=-1)
        if cfg.routing.normalize_top_k:
            weights = b.op("Div", weights, b.op("ReduceSum", weights, b.ints([-1]), keepdims=1))
        if cfg.routing.routed_scaling != 1.0:
            weights = b.op("Mul", weights, b.scalar(cfg.routing.routed_scaling, "routed_scaling"))
        return ids, weights
    if cfg.routing.group_topk is not None:
        groups, kept = cfg.routing.group_topk
        grouped = b.op("Reshape", probs, b.ints([0, groups, -1]))
        per_group = b.op("ReduceMax", grouped, axes=[-1], keepdims=0) if cfg.routing.group_score == "max" else \
            b.op("ReduceSum", b.op("TopK", grouped, b.ints([2]), outputs=2, axis=-1)[0], b.ints([-1]), keepdims=0)
        threshold = b.op("ReduceMin", b.op("TopK", per_group, b.ints([kept]), outputs=2, axis=-1)[0],
                         axes=[-1], keepdims=1)
        keep_group = b.op("Unsqueeze", b.op("GreaterOrEqual", per_group, threshold), b.ints([-1]))
        keep = b.op("Reshape", b.op("Expand", keep_group, b.ints([1, groups, cfg.routing.num_experts // groups])),
                    b.ints([0, cfg.routing.num_experts]))
        probs = b.op("Where", keep, probs, b.scalar(0.0, "zero"))
    weights, ids = b.op("TopK", probs, b.ints([cfg.routing.top_k]), outputs=2, axis=-1, largest=1, sorted=1)
    if cfg.routing.normalize_top_k:
        weights = b.op("Div", weights, b.op("ReduceSum", weights, b.ints([-1]), keepdims=1))
    if cfg.routing.routed_scaling != 1.0:
        weights = b.op("Mul", weights, b.scalar(cfg.routing.routed_scaling, "routed_scaling"))
    return ids, weights


@dataclass(frozen=True)
class NextRouter:
    """What layer l needs of layer l+1 to predict its experts: its router and MLP-norm weights."""

    router: np.ndarray
    norm: np.ndarray | None  # None: the next layer's router reads the stream without a norm
    norm_bias: np.ndarray | None = None
    score_bias: np.ndarray | None = None
    router_bias: np.ndarray | None = None


def predict_next(b: GraphBuilder, cfg: ArchConfig, following: NextRouter, router_input: str, stream: str) -> None:
    """The two cross-layer predictions of the following layer's router scores, written as outputs:
      next_router_logits      = router(router_input)              (the paper's predictor)
      next_router_logits_norm = router(norm(stream) * its weights)  (the following layer's own norm)
    router_input [S, H]; stream [1, S, H] or [S, H], the residual stream the following layer will read."""
    experts = following.router.shape[0]
    with b.tagged("next_router"):
        logits = linear(b, router_input, following.router, following.router_bias, exact=True)
    with b.tagged("next_scores"):
        b.output(choice_scores(b, logits, cfg, following.score_bias), IO.NEXT_ROUTER_LOGITS, FLOAT, ["S", experts])
    with b.tagged("next_norm"):  # none in post-norm families
        renormed = stream if following.norm is None else norm(b, stream, following.norm, following.norm_bias,
                                                              cfg.norms.eps, cfg.norms.kind)
    renormed = b.op("Reshape", renormed, b.ints([-1, cfg.hidden_size]))
    b.output(choice_scores(b, linear(b, renormed, following.router, following.router_bias, exact=True), cfg,
                           following.score_bias),
             IO.NEXT_ROUTER_LOGITS_NORM, FLOAT, ["S", experts])
