"""DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM): multi-head latent attention (low-rank keys and
values, a shared rotary key, RoPE on adjacent pairs), softmax routing with greedy or
group-limited top-k and a routed scaling factor, shared experts without a gate, and the first
`first_k_dense_replace` layers dense."""


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
    LatentAttention,
    Role,
    common_fields,
    optional,
    require,
    rope_params,
)
from .base import Routing


def read_config(cfg: dict) -> ArchConfig:
    method = cfg.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ModelError(f"config.json: topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    latent = LatentAttention(q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=require(cfg, "kv_lora_rank"),
                             qk_nope_head_dim=require(cfg, "qk_nope_head_dim"),
                             qk_rope_head_dim=require(cfg, "qk_rope_head_dim"), v_head_dim=require(cfg, "v_head_dim"))
    layers = require(cfg, "num_hidden_layers")
    first_dense = optional(cfg, "first_k_dense_replace", 0)
    freq = optional(cfg, "moe_layer_freq", 1) or 1
    experts = cfg.get("n_routed_experts") or cfg.get("num_experts")
    scale = (latent.qk_nope_head_dim + latent.qk_rope_head_dim) ** -0.5
    rope = rope_params(cfg)
    if rope.get("rope_type", rope.get("type", "default")) != "default" and rope.get("mscale_all_dim"):
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale

        scale = yarn_apply_mscale(rope, scale)
    return ArchConfig(
        **{**common_fields(cfg, rope_dim=latent.qk_rope_head_dim),
           "num_kv_heads": 1,  # one latent and one rotary key per token, shared by all heads
           "head_dim": latent.qk_nope_head_dim + latent.qk_rope_head_dim},
        routing=Routing(num_experts=experts if isinstance(experts, int) else require(cfg, "n_routed_experts"),
                        top_k=require(cfg, "num_experts_per_tok"), normalize_top_k=False,
                        routed_scaling=float(optional(cfg, "routed_scaling_factor", 1.0, (int, float)) or 1.0),
                        group_topk=(require(cfg, "n_group"), require(cfg, "topk_group")) if method == "group_limited_greedy" else None),
        moe_intermediate_size=require(cfg, "moe_intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size"),
        shared_intermediate_size=require(cfg, "moe_intermediate_size") * optional(cfg, "n_shared_experts", 0),
        moe_layers=frozenset(i for i in range(layers) if i >= first_dense and i % freq == 0),
        attention=Attention(sliding_window=None, latent=latent, scale=scale),
    ).with_positions(interleaved=True)


FAMILY = Family(
    model_type="deepseek_v2",
    architecture="DeepseekV2ForCausalLM",
    read_config=read_config,
    tensors={
        **{role: name for role, name in STANDARD_TENSORS.items() if role not in (Role.K, Role.V)},
        Role.O_BIAS: L + ".self_attn.o_proj.bias",
        Role.Q_A: L + ".self_attn.q_a_proj.weight",
        Role.Q_A_NORM: L + ".self_attn.q_a_layernorm.weight",
        Role.Q_B: L + ".self_attn.q_b_proj.weight",
        Role.KV_A: L + ".self_attn.kv_a_proj_with_mqa.weight",
        Role.KV_A_NORM: L + ".self_attn.kv_a_layernorm.weight",
        Role.KV_B: L + ".self_attn.kv_b_proj.weight",
        Role.ROUTER: L + ".mlp.gate.weight",
        **MLP_EXPERTS,
        **SHARED_EXPERTS,
        **DENSE_MLP,
    },
    skip=STANDARD_SKIP,
)
