"""LFM2-MoE (Lfm2MoeForCausalLM, LiquidAI's LFM2-8B-A1B): a hybrid. Most layers mix tokens with a
gated short convolution (in_proj to B, C, x; a depthwise causal conv of width `conv_L_cache` over
B * x; C times that; out_proj), a few with grouped-query attention (RMSNorm on each q and k head).
The first `num_dense_layers` have a dense SwiGLU MLP, the rest a MoE block: sigmoid scores, experts
chosen by score + `expert_bias`, top-k weights renormalized with a 1e-6 guard and scaled by
`routed_scaling_factor`. The final norm is called `embedding_norm`."""

from fate.artifacts import ModelError

from .base import LAYER as L, Attention
from .base import ArchConfig, Family, Mixers, Role, common_fields, mixers_of_types, optional, require
from .base import Routing

MIXER_OF_TYPE = {"full_attention": "attention", "conv": "short_conv"}


def layer_mixers(cfg: dict) -> tuple[str, ...]:
    """transformers' `layer_types`, or LFM2's older `full_attn_idxs` (every layer attention if neither)."""
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None:
        attention = cfg.get("full_attn_idxs")
        attention = range(layers) if attention is None else attention
        if not isinstance(attention, (list, range)) or not all(isinstance(i, int) for i in attention):
            raise ModelError("config.json: full_attn_idxs must be a list of layer indices")
        return tuple("attention" if i in attention else "short_conv" for i in range(layers))
    return mixers_of_types(types, MIXER_OF_TYPE, layers)


def read_config(cfg: dict) -> ArchConfig:
    common = common_fields({**cfg, "rms_norm_eps": float(optional(cfg, "norm_eps", 1e-5, (int, float))),
                            "tie_word_embeddings": cfg.get("tie_word_embeddings", cfg.get("tie_embedding", True))})
    layers = common["num_layers"]
    dense = optional(cfg, "num_dense_layers", 2)
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(cfg, "num_experts"), top_k=require(cfg, "num_experts_per_tok"),
                        normalize_top_k=bool(cfg.get("norm_topk_prob", True)), scoring="sigmoid",
                        routed_scaling=optional(cfg, "routed_scaling_factor", 1.0, (int, float)),
                        topk_norm_eps=1e-6),
        moe_intermediate_size=require(cfg, "moe_intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size") if dense > 0 else 0,
        shared_intermediate_size=0,
        moe_layers=frozenset(range(min(dense, layers), layers)),
        mixers=Mixers(kinds=layer_mixers(cfg), conv_kernel=optional(cfg, "conv_L_cache", 3)),
        attention=Attention(sliding_window=None, qk_norm="head"),
    )


FAMILY = Family(
    model_type="lfm2_moe",
    architecture="Lfm2MoeForCausalLM",
    read_config=read_config,
    tensors={
        Role.EMBED: "model.embed_tokens.weight",
        Role.FINAL_NORM: "model.embedding_norm.weight",
        Role.LM_HEAD: "lm_head.weight",
        Role.ATTN_NORM: L + ".operator_norm.weight",
        Role.MLP_NORM: L + ".ffn_norm.weight",
        Role.Q: L + ".self_attn.q_proj.weight",
        Role.K: L + ".self_attn.k_proj.weight",
        Role.V: L + ".self_attn.v_proj.weight",
        Role.O: L + ".self_attn.out_proj.weight",
        Role.Q_NORM: L + ".self_attn.q_layernorm.weight",
        Role.K_NORM: L + ".self_attn.k_layernorm.weight",
        Role.CONV_IN: L + ".conv.in_proj.weight",
        Role.CONV_IN_BIAS: L + ".conv.in_proj.bias",
        Role.CONV: L + ".conv.conv.weight",
        Role.CONV_BIAS: L + ".conv.conv.bias",
        Role.CONV_OUT: L + ".conv.out_proj.weight",
        Role.CONV_OUT_BIAS: L + ".conv.out_proj.bias",
        Role.DENSE_GATE: L + ".feed_forward.w1.weight",
        Role.DENSE_UP: L + ".feed_forward.w3.weight",
        Role.DENSE_DOWN: L + ".feed_forward.w2.weight",
        Role.ROUTER: L + ".feed_forward.gate.weight",
        Role.ROUTER_SCORE_BIAS: L + ".feed_forward.expert_bias",
        # saved one expert at a time, as the hub checkpoints are (transformers fuses them on load)
        Role.EXPERT_GATE: L + ".feed_forward.experts.{expert}.w1.weight",
        Role.EXPERT_UP: L + ".feed_forward.experts.{expert}.w3.weight",
        Role.EXPERT_DOWN: L + ".feed_forward.experts.{expert}.w2.weight",
    },
)
