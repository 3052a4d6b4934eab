"""AFMoE (AfmoeForCausalLM, Arcee's Trinity): norms before and after each sublayer (the MoE block's
output, shared experts included, normalized by a combine graph once the runtime has summed the
routed experts), attention gated per channel by its own `gate_proj`, per-head q/k norms, sliding
layers (every `global_attn_every_n_layers`-th layer global) that alone rotate q and k, sigmoid
routing with the expert bias, renormalized and scaled by `route_scale`, dense first layers, and
with `mup_enabled` embeddings scaled by sqrt(hidden_size)."""

import math

from fate.artifacts import ModelError

from .base import DENSE_MLP, LAYER as L, MLP_EXPERTS, STANDARD_SKIP, STANDARD_TENSORS, ArchConfig, Attention, Family
from .base import Role
from .base import common_fields, optional, per_layer_types, require
from .base import Block, Routing


def read_config(cfg: dict) -> ArchConfig:
    common = common_fields(cfg)
    layers, hidden = common["num_layers"], common["hidden_size"]
    types = cfg.get("layer_types")
    if types is None:
        every = optional(cfg, "global_attn_every_n_layers", 4)
        if every < 1:
            raise ModelError(f"config.json: global_attn_every_n_layers must be >= 1, got {every}")
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
    types = per_layer_types(types, "layer_types", ("sliding_attention", "full_attention"), layers)
    window = optional(cfg, "sliding_window", None)
    dense = optional(cfg, "num_dense_layers", 1)
    shared = optional(cfg, "num_shared_experts", 0)
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(cfg, "num_experts"), top_k=require(cfg, "num_experts_per_tok"),
                        normalize_top_k=True, scoring="sigmoid",
                        routed_scaling=float(optional(cfg, "route_scale", 1.0, (int, float)))),
        moe_intermediate_size=require(cfg, "moe_intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size"),
        shared_intermediate_size=require(cfg, "moe_intermediate_size") * shared,
        moe_layers=frozenset(range(min(dense, layers), layers)),
        block=Block(post_norms=True),
        embedding_multiplier=math.sqrt(hidden) if cfg.get("mup_enabled") else 1.0,
        # its own gate_proj: no layout (qwen3_next's q_proj holds both)
        attention=Attention(layer_windows=tuple(window if t == "sliding_attention" else None for t in types),
                            qk_norm="head", output_gate=True),
    ).with_positions(nope_layers=frozenset(i for i, t in enumerate(types) if t != "sliding_attention"))


FAMILY = Family(
    model_type="afmoe",
    architecture="AfmoeForCausalLM",
    read_config=read_config,
    tensors={
        **{role: name for role, name in STANDARD_TENSORS.items() if role != Role.MLP_NORM},
        Role.MLP_NORM: L + ".pre_mlp_layernorm.weight",
        Role.POST_ATTN_NORM: L + ".post_attention_layernorm.weight",
        Role.POST_MLP_NORM: L + ".post_mlp_layernorm.weight",
        Role.Q_GATE: L + ".self_attn.gate_proj.weight",
        Role.Q_NORM: L + ".self_attn.q_norm.weight",
        Role.K_NORM: L + ".self_attn.k_norm.weight",
        Role.ROUTER: L + ".mlp.router.gate.weight",
        Role.ROUTER_SCORE_BIAS: L + ".mlp.expert_bias",
        **MLP_EXPERTS,
        Role.SHARED_GATE: L + ".mlp.shared_experts.gate_proj.weight",
        Role.SHARED_UP: L + ".mlp.shared_experts.up_proj.weight",
        Role.SHARED_DOWN: L + ".mlp.shared_experts.down_proj.weight",
        **DENSE_MLP,
    },
    skip=STANDARD_SKIP,
)
