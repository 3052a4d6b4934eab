"""GLM-4.5 / GLM-4.5-Air (Glm4MoeForCausalLM): grouped-query attention with q/k/v biases and
optional per-head q/k RMSNorm, RoPE on the first `partial_rotary_factor` of each head (the two
halves, as Llama), DeepSeek-V3's routing (sigmoid scores, a correction bias and expert groups
to choose, the plain scores renormalized and scaled to weigh), shared experts without a gate,
and the first `first_k_dense_replace` layers dense. The multi-token-prediction layers hub
checkpoints store after the last decoder layer (`num_nextn_predict_layers`) are not run: skipped."""

from .base import (
    Attention,
    ATTENTION_BIASES,
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
    require,
)
from .base import Routing


def read_config(cfg: dict) -> ArchConfig:
    layers = require(cfg, "num_hidden_layers")
    first_dense = optional(cfg, "first_k_dense_replace", 1)
    groups, kept = optional(cfg, "n_group", 1) or 1, optional(cfg, "topk_group", 1) or 1
    return ArchConfig(
        **common_fields(cfg),
        routing=Routing(num_experts=require(cfg, "n_routed_experts"), top_k=require(cfg, "num_experts_per_tok"),
                        normalize_top_k=bool(cfg.get("norm_topk_prob", True)), scoring="sigmoid",
                        routed_scaling=float(optional(cfg, "routed_scaling_factor", 1.0, (int, float)) or 1.0),
                        group_topk=(groups, kept) if groups > 1 else None),
        moe_intermediate_size=require(cfg, "moe_intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size"),
        shared_intermediate_size=require(cfg, "moe_intermediate_size") * optional(cfg, "n_shared_experts", 0),
        moe_layers=frozenset(range(first_dense, layers)),
        unused_trailing_layers=optional(cfg, "num_nextn_predict_layers", 0) or 0,
        attention=Attention(qk_norm="head" if cfg.get("use_qk_norm") else "none"),
    )


FAMILY = Family(
    model_type="glm4_moe",
    architecture="Glm4MoeForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        **{role: name for role, name in ATTENTION_BIASES.items() if role != Role.O_BIAS},
        Role.Q_NORM: L + ".self_attn.q_norm.weight",
        Role.K_NORM: L + ".self_attn.k_norm.weight",
        Role.ROUTER: L + ".mlp.gate.weight",
        Role.ROUTER_SCORE_BIAS: L + ".mlp.gate.e_score_correction_bias",
        **MLP_EXPERTS,
        **SHARED_EXPERTS,
        **DENSE_MLP,
    },
    skip=STANDARD_SKIP,
)
