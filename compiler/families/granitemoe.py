"""Granite-MoE (GraniteMoeForCausalLM): Mixtral-like routing (top-k of the logits, softmax over
those k), experts stored fused per layer, and four multipliers: embeddings, residual branches,
attention scores (replacing head_dim ** -0.5) and logits (divided by logits_scaling)."""

from dataclasses import replace

from .base import ATTENTION_BIASES, LAYER as L, STANDARD_SKIP, STANDARD_TENSORS, Family, Role
from .mixtral import read_config as read_mixtral_config


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
        **STANDARD_TENSORS,
        **ATTENTION_BIASES,
        Role.ROUTER: L + ".block_sparse_moe.router.layer.weight",
        Role.EXPERTS_GATE_UP: L + ".block_sparse_moe.input_linear.weight",
        Role.EXPERTS_DOWN: L + ".block_sparse_moe.output_linear.weight",
    },
    skip=STANDARD_SKIP,
)
