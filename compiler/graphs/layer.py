"""One decoder layer's graph (its mixer, router, shared expert or dense MLP and the next layer's prediction),
the state shapes it carries, and the combine graph of post-norm layers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from fate.artifacts import DecodeStep
from fate.artifacts.layout import GraphIO as IO

from ..families.base import ArchConfig, Role
from ..onnx_builder import FLOAT, INT64, GraphBuilder, WeightFormat
from .attention import attention, latent_attention, position_inputs, takes_position_tables
from .blocks import W, linear, norm, swiglu
from .mixers import MIXER_KINDS
from .routing import NextRouter, choice_scores, predict_next, route, route_sigmoid, route_sparsemixer
from .steps import decode_step, step_refusal


def state_shapes(cfg: ArchConfig, layer: int) -> dict[str, list[int]]:
    """The fixed-size state a layer's mixer carries between steps (none for attention, whose keys
    and values the model's numbers size)."""
    kind = MIXER_KINDS.get(cfg.mixer(layer))
    return {} if kind is None else kind.state(cfg)


@dataclass(frozen=True)
class LayerGraphInfo:
    model: onnx.ModelProto
    predicts_next: bool
    positions: str = "per_token"  # an attention layer's position inputs (PositionInputs.kind)
    decode_step: DecodeStep | None = None  # its tensors placed once the graph is serialized (decode_step_views)
    graph_only: str | None = None  # why it has no decode step (step_refusal)


def scaled(b: GraphBuilder, x: str, factor: float) -> str:
    return x if factor == 1.0 else b.op("Mul", x, b.scalar(factor, "factor"))


def layer_graph(layer: int, cfg: ArchConfig, w: W, next_layer: NextRouter | None,
                weights: WeightFormat = WeightFormat()) -> LayerGraphInfo:
    """One decoder layer: its token mixer (attention, or a short convolution with its state), then
    either the dense MLP or the MoE front half (router, top-k, shared expert) with the routed
    experts left to the runtime (mlp_block). A block that is one of them alone (Nemotron-H) has no
    mixer (mixer "none") or no MLP (cfg.block.no_mlp).

    With `next_layer`, two cross-layer predictions of layer l+1's router logits:
      next_router_logits      = router_{l+1}(router input of l)           (the paper's predictor)
      next_router_logits_norm = router_{l+1}(rmsnorm(h_l) * norm_{l+1})   (l+1's own norm weights)
    (h_l: the stream between the mixer and the MLP, or the layer's output where the next block is its
    MoE alone: then the prediction is exact). The profile measures both; the policy picks one per layer."""
    b = GraphBuilder(f"layer_{layer}", weights)
    whole, cfg = cfg, cfg.at_layer(layer)  # the model's config, and as this layer sees it
    position_kind = "per_token"
    hidden = b.input(IO.HIDDEN, FLOAT, [1, "S", cfg.hidden_size])
    with b.tagged("attn_norm"):
        x = norm(b, hidden, w[Role.ATTN_NORM], w.get(Role.ATTN_NORM_BIAS), cfg.norms.eps, cfg.norms.kind) \
            if Role.ATTN_NORM in w else hidden
    mixed = None  # a block that is its MLP alone (Nemotron-H: mixer "none") passes its input on
    if cfg.mixer(layer) == "none":
        pass
    elif cfg.mixer(layer) != "attention":
        shapes = state_shapes(cfg, layer)
        past = [b.input(IO.past(name), FLOAT, shape) for name, shape in shapes.items()]
        mixer = MIXER_KINDS[cfg.mixer(layer)].build
        mixed, *present = mixer(b, x, w, cfg, *past)
        for value, (name, shape) in zip(present, shapes.items()):
            b.output(value, IO.present(name), FLOAT, shape)
    else:
        positions = position_inputs(b, cfg, takes_position_tables(cfg, w))
        position_kind = positions.kind
        m = cfg.attention.latent
        key_dim, value_dim = (m.kv_lora_rank, m.qk_rope_head_dim) if m else (cfg.head_dim, cfg.value_dim)
        past_k = b.input(IO.PAST_KEY, FLOAT, [1, cfg.num_kv_heads, "P", key_dim])
        past_v = b.input(IO.PAST_VALUE, FLOAT, [1, cfg.num_kv_heads, "P", value_dim])
        attend = latent_attention if cfg.attention.latent else attention
        # a layer without positions still takes them (every attention layer is fed alike)
        rotated = cfg.with_positions(inv_freq=[]) if layer in cfg.positions.nope_layers else cfg
        mixed, present_k, present_v = attend(b, x, w, rotated, positions, past_k, past_v)
        b.output(present_k, IO.PRESENT_KEY, FLOAT, [1, cfg.num_kv_heads, "T", key_dim])
        b.output(present_v, IO.PRESENT_VALUE, FLOAT, [1, cfg.num_kv_heads, "T", value_dim])
    if Role.POST_ATTN_NORM in w:
        mixed = norm(b, mixed, w[Role.POST_ATTN_NORM], None, cfg.norms.eps, cfg.norms.kind)
    if mixed is None:
        h = h_attn = hidden
    elif cfg.block.from_norm:  # MiniMax: the block's output joins its own normed input, each scaled
        alpha, beta = cfg.block.mixer_factors[layer] if cfg.block.mixer_factors else (1.0, 1.0)
        h = h_attn = b.op("Add", scaled(b, x, alpha), scaled(b, mixed, beta))
    else:
        h = h_attn = b.op("Add", hidden, mixed)
    if layer in cfg.block.no_mlp:  # the block is its mixer alone (Nemotron-H): it predicts from its normed input
        router_input, out = b.op("Reshape", x, b.ints([-1, cfg.hidden_size])), h
        b.output(router_input, IO.ROUTER_INPUT, FLOAT, ["S", cfg.hidden_size])
        b.output(h, IO.RESIDUAL, FLOAT, [1, "S", cfg.hidden_size])
    else:
        router_input, out = mlp_block(b, layer, cfg, w, x, h)
    if next_layer is not None and whole.mixer(layer + 1) == "none" and layer not in cfg.moe_layers:
        h_attn = out  # the next block is its MoE alone: its router reads this layer's output, whole (exact)
    if next_layer is not None:
        predict_next(b, cfg, next_layer, router_input, h_attn)
    model = b.model()
    if layer in cfg.moe_layers and (cfg.block.post_norms or Role.MOE_LATENT_IN in w):  # the routed sum goes
        # through the combine graph (normalized, or projected back from the experts' latent space)
        onnx.helper.set_model_props(model, {IO.ROUTED_SUM_META: "combine_graph"})
    refusal = step_refusal(layer, whole, w, next_layer, b.weights, position_kind)
    return LayerGraphInfo(model, next_layer is not None, position_kind,
                          decode_step(layer, cfg, w, next_layer, b.weights) if refusal is None else None, refusal)


def mlp_block(b: GraphBuilder, layer: int, cfg: ArchConfig, w: W, x: str, h: str) -> tuple[str, str]:
    """A layer's second half on its stream h (x: the mixer's normed input): the dense MLP, or the MoE
    front half (router, top-k, shared expert) with the routed experts left to the runtime; its outputs
    written, and (the router input, what the paper's cross-layer predictor reads; the residual output)
    returned."""
    if cfg.block.parallel:
        normed = x
    elif Role.MLP_NORM in w:
        with b.tagged("mlp_norm"):
            normed = norm(b, h, w[Role.MLP_NORM], w.get(Role.MLP_NORM_BIAS), cfg.norms.eps, cfg.norms.kind)
    else:  # post-norm families: the MLP reads the residual stream itself
        normed = h
    router_input = b.op("Reshape", normed, b.ints([-1, cfg.hidden_size]))
    if cfg.block.from_norm:  # the MLP's output (routed experts: their routed scaling) joins the normed input
        h = scaled(b, normed, cfg.block.mlp_factors[0])
    scaled_input = layer in cfg.moe_layers and cfg.routing.scaled_input
    if not scaled_input:
        b.output(router_input, IO.ROUTER_INPUT, FLOAT, ["S", cfg.hidden_size])
    if layer not in cfg.moe_layers:
        mlp = swiglu(b, normed, w.get(Role.DENSE_GATE), w[Role.DENSE_UP], w[Role.DENSE_DOWN])
        if Role.POST_MLP_NORM in w:
            mlp = norm(b, mlp, w[Role.POST_MLP_NORM], None, cfg.norms.eps, cfg.norms.kind)
        if cfg.block.from_norm:
            mlp = scaled(b, mlp, cfg.block.mlp_factors[1])
        h = b.op("Add", h, mlp)
        b.output(h, IO.RESIDUAL, FLOAT, [1, "S", cfg.hidden_size])
    else:
        with b.tagged("router"):
            logits = linear(b, router_input, w[Role.ROUTER], w.get(Role.ROUTER_BIAS), exact=True)
        b.output(choice_scores(b, logits, cfg, w.get(Role.ROUTER_SCORE_BIAS)), IO.ROUTER_LOGITS, FLOAT,
                 ["S", cfg.routing.num_experts])
        if cfg.routing.scoring == "sigmoid":
            with b.tagged("routing"):
                ids, weights = route_sigmoid(b, logits, cfg, w.get(Role.ROUTER_SCORE_BIAS))
        elif cfg.routing.scoring == "sparsemixer":
            ids, weights = route_sparsemixer(b, logits, cfg.routing.num_experts, cfg.routing.router_jitter_eps)
        else:
            ids, weights = route(b, logits, cfg, w.get(Role.ROUTER_SCORE_BIAS))
        if scaled_input:  # Llama-4, one expert a token: it runs on the input times its weight, unweighed after
            b.output(b.op("Mul", router_input, weights), IO.ROUTER_INPUT, FLOAT, ["S", cfg.hidden_size])
            weights = b.op("Expand", b.scalar(1.0, "one"), b.op("Shape", weights))
        if Role.MOE_LATENT_IN in w:  # the experts run in a latent space: their input projected down
            with b.tagged("moe_latent_in"):
                b.output(linear(b, router_input, w[Role.MOE_LATENT_IN]), IO.EXPERT_INPUT, FLOAT,
                         ["S", cfg.expert_width])
        b.output(ids, IO.EXPERT_IDS, INT64, ["S", cfg.routing.top_k])
        b.output(weights, IO.EXPERT_WEIGHTS, FLOAT, ["S", cfg.routing.top_k])
        if Role.SHARED_UP in w:
            shared = swiglu(b, normed, w.get(Role.SHARED_GATE), w[Role.SHARED_UP], w[Role.SHARED_DOWN], tag="shared")
            if Role.SHARED_EXPERT_GATE in w:
                with b.tagged("shared_expert_gate"):
                    gate = linear(b, normed, w[Role.SHARED_EXPERT_GATE], exact=True)
                shared = b.op("Mul", shared, b.op("Sigmoid", gate))
            if cfg.shared_scale != 1.0:
                shared = b.op("Mul", shared, b.scalar(cfg.shared_scale, "shared_scale"))
            if Role.POST_MLP_NORM in w:  # normalized with the routed experts, by the combine graph
                b.output(b.op("Reshape", shared, b.ints([-1, cfg.hidden_size])), IO.MOE_PARTIAL, FLOAT,
                         ["S", cfg.hidden_size])
            else:
                h = b.op("Add", h, shared)
        b.output(h, IO.RESIDUAL, FLOAT, [1, "S", cfg.hidden_size])
    return router_input, h


def combine_graph(cfg: ArchConfig, post_norm: np.ndarray | None, latent_out: np.ndarray | None = None,
                  weights: WeightFormat = WeightFormat()) -> onnx.ModelProto:
    """hidden = residual + norm(up(routed)): a MoE layer's output once the runtime has summed its routed
    experts (residual [1, S, H], routed [S, E]), where the sum is normalized (post-norm families) or
    projected back from the experts' latent space of width E (Nemotron-3 Super; else E = H)."""
    b = GraphBuilder("combine", weights)
    residual = b.input(IO.RESIDUAL, FLOAT, [1, "S", cfg.hidden_size])
    routed = b.input(IO.ROUTED, FLOAT, ["S", cfg.expert_width])
    if latent_out is not None:
        with b.tagged("moe_latent_out"):
            routed = linear(b, routed, latent_out)
    routed = b.op("Unsqueeze", routed, b.ints([0]))
    if post_norm is not None:
        routed = norm(b, routed, post_norm, None, cfg.norms.eps, cfg.norms.kind)
    b.output(b.op("Add", residual, routed), IO.HIDDEN, FLOAT, [1, "S", cfg.hidden_size])
    return b.model()
