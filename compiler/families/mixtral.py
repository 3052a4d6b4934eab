"""Mixtral (MixtralForCausalLM): every layer MoE, softmax top-k renormalized, no biases."""

from .base import (
    LAYER as L,
    STANDARD_SKIP,
    STANDARD_TENSORS,
    ArchConfig,
    Family,
    Role,
    check_activation,
    require,
    rope_from_config,
    token_ids,
)


def read_config(cfg: dict) -> ArchConfig:
    check_activation(cfg)
    hidden, heads = require(cfg, "hidden_size"), require(cfg, "num_attention_heads")
    head_dim = cfg.get("head_dim") or hidden // heads
    inv_freq, scaling = rope_from_config(cfg, head_dim)
    layers = require(cfg, "num_hidden_layers")
    return ArchConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=require(cfg, "vocab_size"),
        rms_norm_eps=require(cfg, "rms_norm_eps", float),
        max_positions=require(cfg, "max_position_embeddings"),
        rope_inv_freq=inv_freq,
        rope_attention_scaling=scaling,
        sliding_window=cfg.get("sliding_window"),
        num_experts=require(cfg, "num_local_experts"),
        top_k=require(cfg, "num_experts_per_tok"),
        normalize_top_k=True,
        moe_intermediate_size=require(cfg, "intermediate_size"),
        dense_intermediate_size=0,
        shared_intermediate_size=0,
        moe_layers=frozenset(range(layers)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=token_ids(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
    )


FAMILY = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        Role.ROUTER: L + ".block_sparse_moe.gate.weight",
        Role.EXPERT_GATE: L + ".block_sparse_moe.experts.{expert}.w1.weight",
        Role.EXPERT_DOWN: L + ".block_sparse_moe.experts.{expert}.w2.weight",
        Role.EXPERT_UP: L + ".block_sparse_moe.experts.{expert}.w3.weight",
    },
    skip=STANDARD_SKIP,
)
