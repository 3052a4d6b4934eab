"""MiMo-V2-Flash (MiMoV2FlashForCausalLM): full and sliding-window attention layers by `layer_types`
(by default the first and every sixth full) that differ in more than their window: the sliding ones
cache twice the key-value heads, learn an attention sink per head and rotate with their own RoPE base;
value heads smaller than the key heads (`v_head_dim`), the values scaled before they are cached
(`attention_value_scale`), RoPE on the first `partial_rotary_factor` of each head (default 0.334, the
two halves), dense or MoE MLPs by `mlp_layer_types` (by default the first dense), and DeepSeek-V3's
routing (sigmoid scores, a correction bias and expert groups to choose, the plain scores weighed)
without a shared expert. The multi-token-prediction layers (`model.mtp.*`) are not run: skipped."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import (
    ATTENTION_BIASES,
    DENSE_MLP,
    LAYER as L,
    MLP_EXPERTS,
    STANDARD_SKIP,
    STANDARD_TENSORS,
    ArchConfig,
    Attention,
    Family,
    Role,
    layer_windows,
    optional,
    per_layer_types,
    require,
    rope_from_config,
)
from .glm4_moe import read_config as read_glm4_moe_config

LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_rope(cfg: dict, kind: str, head_dim: int) -> list[float]:
    """The RoPE frequencies of one layer type: its entry of `rope_parameters` (transformers' defaults
    where the config has none), the rotated share 0.334 of the head unless it says otherwise."""
    params = cfg.get("rope_parameters")
    if params is None:
        params = {"full_attention": {"rope_theta": 5_000_000.0}, "sliding_attention": {"rope_theta": 10_000.0}}
    own = params.get(kind) if isinstance(params, dict) else None
    if not isinstance(own, dict):
        raise ModelError(f"config.json: rope_parameters must hold the RoPE of each layer type ({kind!r} missing)")
    if own.get("rope_type", "default") != "default":  # transformers computes them per layer type
        raise ModelError(f"config.json: {kind} RoPE of type {own['rope_type']!r} is not supported yet (default only)")
    inv_freq, _ = rope_from_config({"rope_parameters": {"partial_rotary_factor": 0.334, **own}}, head_dim)
    return inv_freq


def read_config(cfg: dict) -> ArchConfig:
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types") or ["full_attention" if i == 0 or not (i + 1) % 6 else "sliding_attention"
                                       for i in range(layers)]
    types = per_layer_types(types, "layer_types", LAYER_TYPES, layers)
    mlps = per_layer_types(cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1), "mlp_layer_types",
                           ("dense", "sparse"), layers)
    window = optional(cfg, "sliding_window", 129)
    if optional(cfg, "sliding_window_size", None) is not None:  # SGLang's count: the previous tokens, not the query
        window = cfg["sliding_window_size"] + 1
    head_dim = optional(cfg, "head_dim", 192)
    kv = optional(cfg, "num_key_value_heads", 0) or require(cfg, "num_attention_heads")
    scale = cfg.get("attention_value_scale", 0.707)  # written as null: no scaling
    scale = 1.0 if scale is None else optional(cfg, "attention_value_scale", 1.0, (int, float))
    arch = read_glm4_moe_config({**cfg, "head_dim": head_dim, "first_k_dense_replace": 0, "n_shared_experts": 0,
                                 "use_qk_norm": False, "num_nextn_predict_layers": 0, "rope_parameters": {}})
    full, sliding = (layer_rope(cfg, kind, head_dim) for kind in LAYER_TYPES)
    sliding_layer = [t == "sliding_attention" for t in types]
    return replace(
        arch, moe_layers=frozenset(i for i, m in enumerate(mlps) if m == "sparse"),
        attention=Attention(layer_windows=layer_windows({**cfg, "layer_types": types, "sliding_window": window}),
                            value_head_dim=optional(cfg, "v_head_dim", 128), value_scale=float(scale),
                            layer_kv_heads=tuple(2 * kv if s else kv for s in sliding_layer)),
    ).with_positions(inv_freq=full, layer_inv_freq=tuple(tuple(sliding) if s else None for s in sliding_layer))


FAMILY = Family(
    model_type="mimo_v2_flash",
    architecture="MiMoV2FlashForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        **{role: name for role, name in ATTENTION_BIASES.items() if role != Role.O_BIAS},
        Role.SINKS: L + ".self_attn.attention_sink_bias",
        Role.ROUTER: L + ".mlp.gate.weight",
        Role.ROUTER_SCORE_BIAS: L + ".mlp.gate.e_score_correction_bias",
        **MLP_EXPERTS,
        **DENSE_MLP,
    },
    skip=(*STANDARD_SKIP, r"model\.mtp\..*"),
)
