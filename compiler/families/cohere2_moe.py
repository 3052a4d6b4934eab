"""Cohere2-MoE (Cohere2MoeForCausalLM): parallel blocks (attention and the MLP read the same normed
input and both add to the residual), LayerNorm without bias (or RMSNorm when `rms_norm_eps` is
set), RoPE on adjacent pairs for sliding layers and, with `prefix_dense_sliding_window_pattern` 1,
the dense prefix layers (the other layers use no positions), logits times `logit_scale`, routing by
the top-k logits (softmax over them, or sigmoid, optionally renormalized), shared experts summed
or averaged with the routed ones."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import DENSE_MLP, LAYER as L, MLP_EXPERTS, SHARED_EXPERTS, STANDARD_SKIP, STANDARD_TENSORS, ArchConfig
from .base import Attention
from .base import Family, Role, common_fields, optional, per_layer_types, require
from .base import Block, Routing


def read_config(cfg: dict) -> ArchConfig:
    rms = optional(cfg, "rms_norm_eps", None, (int, float))
    common = common_fields({**cfg, "rms_norm_eps": float(rms if rms is not None else
                                                         optional(cfg, "layer_norm_eps", 1e-5, (int, float)))})
    common["norms"] = replace(common["norms"], kind="rms" if rms is not None else "layer")
    layers = common["num_layers"]
    types = per_layer_types(cfg.get("layer_types"), "layer_types", ("sliding_attention", "full_attention"), layers)
    mlp = per_layer_types(cfg.get("mlp_layer_types"), "mlp_layer_types", ("dense", "sparse"), layers)
    window = optional(cfg, "sliding_window", None)
    force = optional(cfg, "prefix_dense_sliding_window_pattern", 1) == 1
    rotated = {i for i in range(layers) if (window is not None and types[i] == "sliding_attention")
               or (force and mlp[i] == "dense")}
    selection = cfg.get("expert_selection_fn", "softmax")
    if selection not in ("softmax", "sigmoid"):
        raise ModelError(f"config.json: expert_selection_fn {selection!r} is not softmax or sigmoid")
    strategy = cfg.get("shared_expert_combination_strategy", "average")
    if strategy not in ("sum", "average"):
        raise ModelError(f"config.json: shared_expert_combination_strategy {strategy!r} is not sum or average")
    shared = optional(cfg, "num_shared_experts", 0)
    halve = strategy == "average" and shared > 0
    scale = optional(cfg, "logit_scale", 1.0, (int, float))
    if scale == 0:
        raise ModelError("config.json: logit_scale 0 would make every logit 0")
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(cfg, "num_experts"), top_k=require(cfg, "num_experts_per_tok"),
                        normalize_top_k=selection == "softmax" or bool(cfg.get("norm_topk_prob", True)),
                        scoring=selection, topk_norm_eps=0.0, routed_scaling=0.5 if halve else 1.0),
        # softmax over the k best logits is Fate's softmax top-k renormalized
        shared_scale=0.5 if halve else 1.0,
        moe_intermediate_size=require(cfg, "intermediate_size"),
        dense_intermediate_size=optional(cfg, "prefix_dense_intermediate_size", None) or require(cfg, "intermediate_size"),
        shared_intermediate_size=require(cfg, "intermediate_size") * shared,
        moe_layers=frozenset(i for i, t in enumerate(mlp) if t == "sparse"),
        logits_scaling=1.0 / scale,
        block=Block(parallel=True),
        attention=Attention(layer_windows=tuple(window if t == "sliding_attention" else None for t in types)),
    ).with_positions(interleaved=True, nope_layers=frozenset(set(range(layers)) - rotated))


FAMILY = Family(
    model_type="cohere2_moe",
    architecture="Cohere2MoeForCausalLM",
    read_config=read_config,
    tensors={
        **{role: name for role, name in STANDARD_TENSORS.items() if role != Role.MLP_NORM},
        Role.ROUTER: L + ".mlp.gate.weight",
        **MLP_EXPERTS,
        **SHARED_EXPERTS,
        **DENSE_MLP,
    },
    skip=STANDARD_SKIP,
)
