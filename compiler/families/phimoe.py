"""Phi-3.5-MoE (PhimoeForCausalLM): LayerNorm with biases, sparsemixer top-2 routing (computed
in the layer graph exactly as transformers' inference branch), optional attention and LM-head
biases, LongRoPE as transformers' Phi-MoE applies it (contexts beyond
original_max_position_embeddings, where another cos/sin scale applies, are refused by capping the
context there)."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import ATTENTION_BIASES, LAYER as L, Family, Role, optional, rope_from_transformers, rope_params
from .mixtral import FAMILY as MIXTRAL
from .mixtral import read_config as read_mixtral_config


def read_config(cfg: dict):
    if cfg.get("num_experts_per_tok") != 2:
        raise ModelError("config.json: sparsemixer routing is defined for top-2 only "
                         f"(num_experts_per_tok = {cfg.get('num_experts_per_tok')})")
    rope = rope_params(cfg)
    longrope = rope.get("rope_type", rope.get("type")) == "longrope"
    arch = read_mixtral_config({**cfg, "rope_parameters": {"rope_type": "default",
                                                           "rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 1e4))}}
                               if longrope else cfg)
    if longrope:
        # transformers' PhimoeRotaryEmbedding: inv_freq from the longrope init (fixed), cos/sin scaled by
        # short_mscale up to original_max_position_embeddings and long_mscale beyond; Fate caps the
        # context there, so the short scale is the only one needed.
        original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        if not original or rope.get("short_mscale") is None:
            raise ModelError("config.json: longrope without original_max_position_embeddings or short_mscale")
        inv_freq, _ = rope_from_transformers(cfg, "longrope")
        arch = replace(arch, max_positions=min(arch.max_positions, int(original))).with_positions(
            inv_freq=inv_freq, attention_scaling=float(rope["short_mscale"]))
    jitter = float(optional(cfg, "router_jitter_noise", 0.01, (int, float)))
    return replace(arch, norms=replace(arch.norms, kind="layer"), routing=replace(arch.routing, scoring="sparsemixer", normalize_top_k=False,
                                                       router_jitter_eps=jitter))


FAMILY = Family(
    model_type="phimoe",
    architecture="PhimoeForCausalLM",
    read_config=read_config,
    tensors={
        **MIXTRAL.tensors,
        **ATTENTION_BIASES,
        Role.ATTN_NORM_BIAS: L + ".input_layernorm.bias",
        Role.MLP_NORM_BIAS: L + ".post_attention_layernorm.bias",
        Role.FINAL_NORM_BIAS: "model.norm.bias",
        Role.LM_HEAD_BIAS: "lm_head.bias",
    },
    skip=MIXTRAL.skip,
)
