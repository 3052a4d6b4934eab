"""OLMoE (OlmoeForCausalLM): RMSNorm over the whole query and key projections (before heads
are split), optional clamping of q/k/v (`clip_qkv`), every layer MoE, no shared expert."""

from dataclasses import replace

from .base import Family, Role
from .mixtral import read_config as read_mixtral_config

L = "model.layers.{layer}"


def read_config(cfg: dict):
    # Mixtral's reading with OLMoE's key names for the experts and top-k normalization.
    renamed = {**cfg, "num_local_experts": cfg.get("num_experts")}
    return replace(read_mixtral_config(renamed), normalize_top_k=bool(cfg.get("norm_topk_prob", False)),
                   qk_norm="projection", clip_qkv=cfg.get("clip_qkv"))


FAMILY = Family(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
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
        Role.Q_NORM: L + ".self_attn.q_norm.weight",
        Role.K_NORM: L + ".self_attn.k_norm.weight",
        Role.MLP_NORM: L + ".post_attention_layernorm.weight",
        Role.ROUTER: L + ".mlp.gate.weight",
        Role.EXPERT_GATE: L + ".mlp.experts.{expert}.gate_proj.weight",
        Role.EXPERT_UP: L + ".mlp.experts.{expert}.up_proj.weight",
        Role.EXPERT_DOWN: L + ".mlp.experts.{expert}.down_proj.weight",
    },
    skip=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)
