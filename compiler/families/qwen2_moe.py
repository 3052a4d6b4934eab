"""Qwen1.5-MoE / Qwen2-MoE (Qwen2MoeForCausalLM): fine-grained experts, a shared expert scaled
by a sigmoid gate, q/k/v biases, optional top-k renormalization, and dense MLP layers chosen by
`decoder_sparse_step` and `mlp_only_layers`."""

from .base import (
    ATTENTION_BIASES,
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


def moe_layer_indices(cfg: dict, layers: int) -> frozenset[int]:
    """The rule of transformers' Qwen2MoeDecoderLayer."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    dense = set(cfg.get("mlp_only_layers") or [])
    experts = require(cfg, "num_experts")
    return frozenset(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)


def read_config(cfg: dict) -> ArchConfig:
    # transformers 5 may write the expert count as num_local_experts; hub checkpoints use num_experts
    cfg = {**cfg, "num_experts": cfg.get("num_experts", cfg.get("num_local_experts"))}
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
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
        num_experts=require(cfg, "num_experts"),
        top_k=require(cfg, "num_experts_per_tok"),
        normalize_top_k=bool(cfg.get("norm_topk_prob", False)),
        moe_intermediate_size=require(cfg, "moe_intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size"),
        shared_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
        moe_layers=moe_layer_indices(cfg, layers),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=token_ids(cfg.get("eos_token_id")),
        bos_token_id=cfg.get("bos_token_id"),
    )


FAMILY = Family(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        **{role: name for role, name in ATTENTION_BIASES.items() if role != Role.O_BIAS},
        Role.ROUTER: L + ".mlp.gate.weight",
        Role.EXPERT_GATE: L + ".mlp.experts.{expert}.gate_proj.weight",
        Role.EXPERT_UP: L + ".mlp.experts.{expert}.up_proj.weight",
        Role.EXPERT_DOWN: L + ".mlp.experts.{expert}.down_proj.weight",
        Role.SHARED_GATE: L + ".mlp.shared_expert.gate_proj.weight",
        Role.SHARED_UP: L + ".mlp.shared_expert.up_proj.weight",
        Role.SHARED_DOWN: L + ".mlp.shared_expert.down_proj.weight",
        Role.SHARED_EXPERT_GATE: L + ".mlp.shared_expert_gate.weight",
        Role.DENSE_GATE: L + ".mlp.gate_proj.weight",
        Role.DENSE_UP: L + ".mlp.up_proj.weight",
        Role.DENSE_DOWN: L + ".mlp.down_proj.weight",
    },
    skip=STANDARD_SKIP,
)
