"""Granite-MoE (GraniteMoeForCausalLM): Mixtral-like routing (top-k of the logits, softmax over
those k), experts stored fused per layer, and four multipliers: embeddings, residual branches,
attention scores (replacing head_dim ** -0.5) and logits (divided by logits_scaling)."""

from dataclasses import replace

from .base import ATTENTION_BIASES, LAYER as L, STANDARD_SKIP, STANDARD_TENSORS, Family, Role, optional
from .layouts import FusedExperts
from .mixtral import read_config as read_mixtral_config


def read_config(cfg: dict):
    arch = read_mixtral_config(cfg)
    return replace(
        arch,
        embedding_multiplier=float(optional(cfg, "embedding_multiplier", 1.0, (int, float))),
        residual_multiplier=float(optional(cfg, "residual_multiplier", 1.0, (int, float))),
        logits_scaling=float(optional(cfg, "logits_scaling", 1.0, (int, float))),
        attention=replace(arch.attention, scale=optional(cfg, "attention_multiplier", None, (int, float)),
                          sliding_window=None),  # Granite's mask does not slide
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
    layouts=(FusedExperts("rows"),),
)
