"""EXAONE-MoE (ExaoneMoeForCausalLM, K-EXAONE): EXAONE-4 attention (per-head q/k norms; sliding
layers from `layer_types` or `sliding_window_pattern` rotate q and k, global layers use no
positions at all) with DeepSeek-V3's MoE (sigmoid scores, a correction bias and expert groups to
choose, renormalized, routed scaling, shared experts) after dense first layers (`mlp_layer_types`
or `first_k_dense_replace`)."""

from fate.artifacts import ModelError

from .base import (
    Attention,
    DENSE_MLP,
    LAYER as L,
    MLP_EXPERTS,
    SHARED_EXPERTS,
    STANDARD_SKIP,
    STANDARD_TENSORS,
    ArchConfig,
    Family,
    Role,
    common_fields,
    optional,
    per_layer_types,
    require,
)
from .base import Routing


def layer_types(cfg: dict, layers: int) -> list[str]:
    """transformers' rule: `layer_types`, else every `sliding_window_pattern`-th layer global and
    the others sliding (all global without a window)."""
    types = cfg.get("layer_types")
    if types is None:
        pattern, window = cfg.get("sliding_window_pattern", 4), cfg.get("sliding_window")
        if window is None or pattern is None:
            types = ["full_attention"] * layers
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        else:
            raise ModelError(f"config.json: sliding_window_pattern {pattern!r} is not an integer > 0")
    return per_layer_types(types, "layer_types", ("sliding_attention", "full_attention"), layers)


def read_config(cfg: dict) -> ArchConfig:
    common = common_fields(cfg)
    layers = common["num_layers"]
    types = layer_types(cfg, layers)
    window = optional(cfg, "sliding_window", None)
    mlp_types = cfg.get("mlp_layer_types") or ["dense" if i < optional(cfg, "first_k_dense_replace", 1) else "sparse"
                                               for i in range(layers)]
    mlp_types = per_layer_types(mlp_types, "mlp_layer_types", ("dense", "sparse"), layers)
    groups, kept = optional(cfg, "n_group", 1) or 1, optional(cfg, "topk_group", 1) or 1
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(cfg, "num_experts"), top_k=require(cfg, "num_experts_per_tok"),
                        normalize_top_k=bool(cfg.get("norm_topk_prob", True)), scoring="sigmoid",
                        routed_scaling=float(optional(cfg, "routed_scaling_factor", 1.0, (int, float)) or 1.0),
                        group_topk=(groups, kept) if groups > 1 else None),
        moe_intermediate_size=require(cfg, "moe_intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size"),
        shared_intermediate_size=require(cfg, "moe_intermediate_size") * optional(cfg, "num_shared_experts", 0),
        moe_layers=frozenset(i for i, t in enumerate(mlp_types) if t == "sparse"),
        attention=Attention(layer_windows=tuple(window if t == "sliding_attention" else None for t in types),
                            qk_norm="head"),
        # with a window, only the sliding layers rotate (transformers' Exaone4Attention)
    ).with_positions(
        nope_layers=frozenset(i for i, t in enumerate(types) if t == "full_attention") if window else frozenset())


FAMILY = Family(
    model_type="exaone_moe",
    architecture="ExaoneMoeForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        Role.Q_NORM: L + ".self_attn.q_norm.weight",
        Role.K_NORM: L + ".self_attn.k_norm.weight",
        Role.ROUTER: L + ".mlp.gate.weight",
        Role.ROUTER_SCORE_BIAS: L + ".mlp.e_score_correction_bias",
        **MLP_EXPERTS,
        **SHARED_EXPERTS,
        **DENSE_MLP,
    },
    skip=STANDARD_SKIP,
)
