"""Jamba (JambaForCausalLM): a hybrid. Layers mix tokens with Mamba (a selective state space per
channel, its dt, B and C RMS-normalized, after a short causal convolution) except one in
`attn_layer_period` (at `attn_layer_offset`), which uses attention without positions; one layer in
`expert_layer_period` (at `expert_layer_offset`) is MoE (softmax top-k, not renormalized), the
others a dense SwiGLU MLP."""

import math

from fate.artifacts import ModelError

from .base import DENSE_MLP, LAYER as L, STANDARD_SKIP, STANDARD_TENSORS, ArchConfig, Family, Mamba1, Mixers, Role
from .base import common_fields, optional, require
from .base import Routing


def every(cfg: dict, period_key: str, offset_key: str, period: int, offset: int, layers: int) -> set[int]:
    period, offset = optional(cfg, period_key, period), optional(cfg, offset_key, offset)
    if period < 1 or not 0 <= offset < period:
        raise ModelError(f"config.json: {offset_key} must be in [0, {period_key}), got {offset} of {period}")
    return {i for i in range(layers) if i % period == offset}


def read_config(cfg: dict) -> ArchConfig:
    common = common_fields(cfg)
    layers, hidden = common["num_layers"], common["hidden_size"]
    attention = every(cfg, "attn_layer_period", "attn_layer_offset", 8, 4, layers)
    experts = optional(cfg, "num_experts", 16)
    moe = every(cfg, "expert_layer_period", "expert_layer_offset", 2, 1, layers) if experts > 1 else set()
    if not moe:
        raise ModelError("config.json: no MoE layer (num_experts <= 1): a dense model, which Fate does not compile")
    rank = cfg.get("mamba_dt_rank", "auto")
    rank = math.ceil(hidden / 16) if rank in ("auto", None) else rank
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ModelError(f"config.json: mamba_dt_rank must be an integer or 'auto', got {rank!r}")
    mamba = Mamba1(intermediate=optional(cfg, "mamba_expand", 2) * hidden, state_size=optional(cfg, "mamba_d_state", 16),
                   dt_rank=rank, conv_kernel=optional(cfg, "mamba_d_conv", 4))
    arch = ArchConfig(
        **common,
        routing=Routing(num_experts=experts, top_k=require(cfg, "num_experts_per_tok"), normalize_top_k=False),
        moe_intermediate_size=require(cfg, "intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size"),
        shared_intermediate_size=0,
        moe_layers=frozenset(moe),
        mixers=Mixers(kinds=tuple("attention" if i in attention else "mamba" for i in range(layers)), mamba1=mamba),
    )
    return arch.with_positions(inv_freq=[], attention_scaling=1.0)  # Jamba's attention has no positions


MAMBA = L + ".mamba"
FAMILY = Family(
    model_type="jamba",
    architecture="JambaForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        Role.FINAL_NORM: "model.final_layernorm.weight",
        Role.MLP_NORM: L + ".pre_ff_layernorm.weight",
        Role.ROUTER: L + ".feed_forward.router.weight",
        Role.EXPERT_GATE: L + ".feed_forward.experts.{expert}.gate_proj.weight",
        Role.EXPERT_UP: L + ".feed_forward.experts.{expert}.up_proj.weight",
        Role.EXPERT_DOWN: L + ".feed_forward.experts.{expert}.down_proj.weight",
        **{role: name.replace(".mlp.", ".feed_forward.") for role, name in DENSE_MLP.items()},
        Role.MAMBA_IN: MAMBA + ".in_proj.weight",
        Role.MAMBA_IN_BIAS: MAMBA + ".in_proj.bias",
        Role.MAMBA_CONV: MAMBA + ".conv1d.weight",
        Role.MAMBA_CONV_BIAS: MAMBA + ".conv1d.bias",
        Role.MAMBA_X: MAMBA + ".x_proj.weight",
        Role.MAMBA_DT: MAMBA + ".dt_proj.weight",
        Role.MAMBA_DT_BIAS: MAMBA + ".dt_proj.bias",
        Role.MAMBA_A_LOG: MAMBA + ".A_log",
        Role.MAMBA_D: MAMBA + ".D",
        Role.MAMBA_DT_NORM: MAMBA + ".dt_layernorm.weight",
        Role.MAMBA_B_NORM: MAMBA + ".b_layernorm.weight",
        Role.MAMBA_C_NORM: MAMBA + ".c_layernorm.weight",
        Role.MAMBA_OUT: MAMBA + ".out_proj.weight",
        Role.MAMBA_OUT_BIAS: MAMBA + ".out_proj.bias",
    },
    skip=STANDARD_SKIP,
)
