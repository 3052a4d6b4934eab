"""MiniMax-M2 (MiniMaxM2ForCausalLM): Mixtral's layout with RMSNorm over the whole query and key
projections (as OLMoE), RoPE on the first `rotary_dim` dims of each head, and sigmoid routing:
experts chosen by sigmoid score + a correction bias, weighed by the sigmoid score renormalized
over the top-k."""

from dataclasses import replace

from .base import LAYER as L
from .base import Family, Role, optional, rope_params
from .mixtral import FAMILY as MIXTRAL
from .mixtral import read_config as read_mixtral_config


def read_config(cfg: dict):
    rotary_dim, head_dim = optional(cfg, "rotary_dim", None), optional(cfg, "head_dim", None)
    params = rope_params(cfg)
    if rotary_dim is not None and head_dim and "partial_rotary_factor" not in params:
        cfg = {**cfg, "partial_rotary_factor": rotary_dim / head_dim}  # released checkpoints' legacy key
    arch = read_mixtral_config(cfg)
    return replace(arch, routing=replace(arch.routing, scoring="sigmoid", normalize_top_k=True, topk_norm_eps=0.0),
                   attention=replace(arch.attention, qk_norm="projection"))


FAMILY = Family(
    model_type="minimax_m2",
    architecture="MiniMaxM2ForCausalLM",
    read_config=read_config,
    tensors={
        **MIXTRAL.tensors,
        Role.Q_NORM: L + ".self_attn.q_norm.weight",
        Role.K_NORM: L + ".self_attn.k_norm.weight",
        Role.ROUTER_SCORE_BIAS: L + ".block_sparse_moe.e_score_correction_bias",
    },
    skip=MIXTRAL.skip,
)
