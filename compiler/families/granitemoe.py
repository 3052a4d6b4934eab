"""Granite-MoE (GraniteMoeForCausalLM): Mixtral-like routing (top-k of the logits, softmax over
those k), experts stored fused per layer, and four multipliers: embeddings, residual branches,
attention scores (replacing head_dim ** -0.5) and logits (divided by logits_scaling)."""

from dataclasses import replace

from .base import Family, Role
from .mixtral import read_config as read_mixtral_config

L = "model.layers.{layer}"


def read_config(cfg: dict):
    return replace(
        read_mixtral_config(cfg),
        embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
        attention_scale=cfg.get("attention_multiplier"),
        logits_scaling=float(cfg.get("logits_scaling", 1.0)),
        sliding_window=None,  # Granite's mask does not slide
    )


FAMILY = Family(
    model_type="granitemoe",
    architecture="GraniteMoeForCausalLM",
    read_config=read_config,
    tensors={
        Role.EMBED: "model.embed_tokens.weight",
        Role.FINAL_NORM: "model.norm.weight",
        Role.LM_HEAD: "lm_head.weight",
        Role.ATTN_NORM: L + ".input_layernorm.weight",
        Role.Q: L + ".self_attn.q_proj.weight",
        Role.K: L + ".self_attn.k_proj.weight",
        Role.V: L + ".self_attn.v_proj.weight",
        Role.O: L + ".self_attn.o_proj.weight",
        Role.Q_BIAS: L + ".self_attn.q_proj.bias",
        Role.K_BIAS: L + ".self_attn.k_proj.bias",
        Role.V_BIAS: L + ".self_attn.v_proj.bias",
        Role.O_BIAS: L + ".self_attn.o_proj.bias",
        Role.MLP_NORM: L + ".post_attention_layernorm.weight",
        Role.ROUTER: L + ".block_sparse_moe.router.layer.weight",
        Role.EXPERTS_GATE_UP: L + ".block_sparse_moe.input_linear.weight",
        Role.EXPERTS_DOWN: L + ".block_sparse_moe.output_linear.weight",
    },
    skip=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)
