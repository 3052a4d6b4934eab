"""Qwen1.5-MoE / Qwen2-MoE (Qwen2MoeForCausalLM): fine-grained experts, a shared expert scaled
by a sigmoid gate, q/k/v biases, optional top-k renormalization, and dense MLP layers chosen by
`decoder_sparse_step` and `mlp_only_layers`."""

from .base import (
    Attention,
    ATTENTION_BIASES,
    DENSE_MLP,
    LAYER as L,
    MLP_EXPERTS,
    STANDARD_SKIP,
    STANDARD_TENSORS,
    ArchConfig,
    Family,
    Role,
    common_fields,
    layer_set,
    optional,
    require,
)
from .base import Routing


def moe_layer_indices(cfg: dict, layers: int) -> frozenset[int]:
    """The rule of transformers' Qwen2MoeDecoderLayer."""
    step = optional(cfg, "decoder_sparse_step", 1) or 1
    dense = layer_set(cfg, "mlp_only_layers")
    experts = require(cfg, "num_experts")
    return frozenset(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)


def read_config(cfg: dict) -> ArchConfig:
    # transformers 5 may write the expert count as num_local_experts; hub checkpoints use num_experts
    cfg = {**cfg, "num_experts": cfg.get("num_experts", cfg.get("num_local_experts"))}
    common = common_fields(cfg)
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(cfg, "num_experts"), top_k=require(cfg, "num_experts_per_tok"),
                        normalize_top_k=bool(cfg.get("norm_topk_prob", False))),
        moe_intermediate_size=require(cfg, "moe_intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size"),
        shared_intermediate_size=optional(cfg, "shared_expert_intermediate_size", 0),
        moe_layers=moe_layer_indices(cfg, common["num_layers"]),
        attention=Attention(sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None),
    )


FAMILY = Family(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        **{role: name for role, name in ATTENTION_BIASES.items() if role != Role.O_BIAS},
        Role.ROUTER: L + ".mlp.gate.weight",
        **MLP_EXPERTS,
        Role.SHARED_GATE: L + ".mlp.shared_expert.gate_proj.weight",
        Role.SHARED_UP: L + ".mlp.shared_expert.up_proj.weight",
        Role.SHARED_DOWN: L + ".mlp.shared_expert.down_proj.weight",
        Role.SHARED_EXPERT_GATE: L + ".mlp.shared_expert_gate.weight",
        **DENSE_MLP,
    },
    skip=STANDARD_SKIP,
)
