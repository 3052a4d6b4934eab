"""The native decode step and head step: which layers the C step can compute (and why not, where not), and
where each tensor it reads lies in the graph file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fate.artifacts import DecodeStep, HeadStep
from fate.artifacts.native_contract import QK_NORMS
from fate.artifacts.precisions import QUANTIZED_BITS
from fate.artifacts.slots import STEP_INITIALIZERS, expected_head_tensors, expected_step_tensors, views_of

from ..families.base import ArchConfig, Role
from ..onnx_builder import WeightFormat
from ..quantize import DEFAULT_BLOCK_SIZE
from .attention import fused_attention_refusal
from .blocks import W
from .routing import NextRouter


# What a layer graph may hold for the native decode step to compute it (DecodeStep); any other role
# (q/k norms, sinks, output gates, post-norms, router biases, ...) leaves the layer to its graph.
STEP_ROLES = frozenset({Role.ATTN_NORM, Role.Q, Role.K, Role.V, Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS, Role.O, Role.O_BIAS,
                        Role.MLP_NORM, Role.ROUTER, Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN,
                        Role.SHARED_EXPERT_GATE, Role.Q_NORM, Role.K_NORM, Role.ROUTER_SCORE_BIAS})


def step_refusal(layer: int, model: ArchConfig, w: W, next_layer: NextRouter | None, fmt: WeightFormat,
                 positions: str) -> str | None:
    """Why a layer's graph runs every decode token instead of a native decode step (what its graph
    computes that the step does not), or None where the step can compute it. `model`: the whole
    model's config (the step rotates with the model's RoPE tables)."""
    dense_roles = {role for role in w if not role.value.startswith("expert")}
    if model.positions.layer_inv_freq is not None and model.positions.layer_inv_freq[layer] is not None:
        return "RoPE of its own (the step rotates with the model's tables)"
    cfg = model.at_layer(layer)
    if cfg.mixer(layer) == "none":
        return "a layer without a token mixer"
    if cfg.mixer(layer) != "attention":
        return f"a {cfg.mixer(layer)} layer"
    if layer not in cfg.moe_layers:
        return "a dense MLP layer"
    if cfg.attention.latent is not None:
        return "latent attention"
    if layer in cfg.positions.nope_layers or not cfg.positions.inv_freq:
        return "attention without positions"
    if cfg.attention.qk_norm_after_rope:
        return "q/k norms after RoPE"
    if positions != "tables":
        reason = fused_attention_refusal(cfg, w)
        return f"attention the fused kernel cannot take ({reason})" if reason else \
            "RoPE in sizes or an order the fused kernel cannot take"
    if fmt.bits not in QUANTIZED_BITS:
        return f"float{fmt.bits} dense weights (the step runs INT8, INT4 or INT2 ones)"
    for what, unsupported in (("LayerNorm", cfg.norms.kind != "rms"), ("routing other than softmax or sigmoid",
                              cfg.routing.scoring not in ("softmax", "sigmoid")), ("RoPE on adjacent pairs", cfg.positions.interleaved),
                              ("a parallel block", cfg.block.parallel), ("post-norms", cfg.block.post_norms),
                              ("no pre-norms", not cfg.block.pre_norms),
                              ("experts on the router-scaled input", cfg.routing.scaled_input),
                              ("blocks added to their normed input", cfg.block.from_norm),
                              ("values scaled before they are cached", cfg.attention.value_scale != 1.0),
                              ("squared-ReLU MLPs", not cfg.gated), ("experts in a latent space", cfg.moe_latent_size)):
        if unsupported:
            return what
    extra = sorted(role.value for role in dense_roles - STEP_ROLES)
    if extra:
        return f"weights the step does not compute ({', '.join(extra)})"
    if not {Role.ATTN_NORM, Role.MLP_NORM} <= dense_roles:
        return "a layer without its norms"
    if Role.SHARED_GATE in w and not {Role.SHARED_UP, Role.SHARED_DOWN} <= dense_roles:
        return "a shared expert without its up and down projections"
    qk_norm = cfg.attention.qk_norm if Role.Q_NORM in w else "none"
    if (Role.Q_NORM in w) != (Role.K_NORM in w) or qk_norm not in QK_NORMS or cfg.attention.qk_norm_after_rope:
        return "q/k norms the step does not compute (after RoPE, or on one of q and k)"
    if cfg.routing.scoring == "softmax" and (cfg.routing.group_topk is not None or Role.ROUTER_SCORE_BIAS in w):
        return "softmax routing with expert groups or a correction bias"
    if cfg.routing.group_topk is not None:
        groups, kept = cfg.routing.group_topk
        size = cfg.routing.num_experts // groups if groups > 0 else 0
        if size < 2 or cfg.routing.num_experts % groups or not 1 <= kept <= groups or kept * size < cfg.routing.top_k:
            return "expert groups the step cannot pick from"
    if next_layer is not None and (next_layer.router_bias is not None or next_layer.norm_bias is not None
                                   or (next_layer.score_bias is not None and cfg.routing.scoring != "sigmoid")):
        return "a next-layer predictor with biases the step does not compute"
    return None


def decode_step(layer: int, cfg: ArchConfig, w: W, next_layer: NextRouter | None,
                fmt: WeightFormat) -> DecodeStep:
    """The numbers of a layer's native decode step (its tensors are placed after serialization:
    decode_step_views), for a layer step_refusal takes."""
    shared = Role.SHARED_GATE in w
    qk_norm = cfg.attention.qk_norm if Role.Q_NORM in w else "none"
    return DecodeStep(
        bits=fmt.bits, block_size=fmt.block_size or DEFAULT_BLOCK_SIZE[fmt.bits], accuracy_level=fmt.accuracy_level,
        attention_scale=cfg.head_dim ** -0.5 if cfg.attention.scale is None else cfg.attention.scale,
        norm_eps=cfg.norms.eps, shared_intermediate_size=w[Role.SHARED_GATE].shape[0] if shared else 0,
        shared_scale=cfg.shared_scale, routed_scaling=cfg.routing.routed_scaling,
        qkv_bias=any(role in w for role in (Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS)), o_bias=Role.O_BIAS in w,
        shared_expert_gate=shared and Role.SHARED_EXPERT_GATE in w,
        next_norm=next_layer is not None and next_layer.norm is not None, qk_norm=qk_norm, clip_qkv=cfg.attention.clip_qkv,
        score_bias=Role.ROUTER_SCORE_BIAS in w,
        next_score_bias=next_layer is not None and next_layer.score_bias is not None,
        group_topk=list(cfg.routing.group_topk) if cfg.routing.group_topk else None, topk_norm_eps=cfg.routing.topk_norm_eps, tensors=[])


def head_step(cfg: ArchConfig, lm_head_rows: int, final_norm_bias: np.ndarray | None, lm_head_bias: np.ndarray | None,
              fmt: WeightFormat) -> HeadStep | None:
    """The numbers of the head's native decode step (RMSNorm and a quantized LM head), or None."""
    if cfg.norms.kind != "rms" or final_norm_bias is not None or fmt.bits not in QUANTIZED_BITS \
            or lm_head_rows != cfg.vocab_size:
        return None
    return HeadStep(bits=fmt.bits, block_size=fmt.block_size or DEFAULT_BLOCK_SIZE[fmt.bits],
                    accuracy_level=fmt.accuracy_level, norm_eps=cfg.norms.eps, logits_scaling=cfg.logits_scaling,
                    has_bias=lm_head_bias is not None, tensors=[])


def head_step_views(step: HeadStep, data: bytes, cfg: ArchConfig) -> HeadStep:
    """`step` with its tensors placed in the serialized head graph `data`."""
    return replace(step, tensors=views_of(data, expected_head_tensors(step, cfg.hidden_size, cfg.vocab_size),
                                          STEP_INITIALIZERS))


def decode_step_views(step: DecodeStep, data: bytes, cfg: ArchConfig, next_experts: int) -> DecodeStep:
    """`step` with its tensors placed in the serialized layer graph `data` (`cfg`: as its layer sees it)."""
    heads = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    want = expected_step_tensors(step, heads, cfg.routing.num_experts, next_experts)
    return replace(step, tensors=views_of(data, want, STEP_INITIALIZERS))
