"""Qwen3-MoE (Qwen3MoeForCausalLM): RMSNorm on each query and key head, no shared expert,
optional top-k renormalization, dense layers from `decoder_sparse_step` / `mlp_only_layers`."""

from dataclasses import replace

from .base import ATTENTION_BIASES, LAYER as L, Family, Role
from .qwen2_moe import FAMILY as QWEN2_MOE
from .qwen2_moe import read_config as read_qwen2_moe_config


def read_config(cfg: dict):
    # Same keys as Qwen2-MoE (no shared expert here); q/k norms per head.
    arch = read_qwen2_moe_config({"shared_expert_intermediate_size": 0, **cfg})
    return replace(arch, attention=replace(arch.attention, qk_norm="head"))


FAMILY = Family(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    read_config=read_config,
    tensors={
        **{role: name for role, name in QWEN2_MOE.tensors.items()
           if role not in (Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN, Role.SHARED_EXPERT_GATE)},
        **ATTENTION_BIASES,
        Role.Q_NORM: L + ".self_attn.q_norm.weight",
        Role.K_NORM: L + ".self_attn.k_norm.weight",
    },
    skip=QWEN2_MOE.skip,
)
