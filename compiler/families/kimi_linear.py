"""Kimi-Linear (KimiLinearForCausalLM): a hybrid of Kimi Delta Attention (the gated delta rule whose
state decays per key channel, by a low-rank forget gate; q, k and v each through a short causal
convolution; a low-rank sigmoid output gate on a per-head RMSNorm) and DeepSeek's multi-head latent
attention without positions, from `layer_types` (or the checkpoint's 1-indexed `linear_attn_config`
lists); DeepSeek-V3's sigmoid grouped routing with shared experts, dense and MoE layers from
`mlp_layer_types` (by default the first dense)."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import LAYER as L
from .base import Family, KimiDelta, Mixers, Role, mixers_of_types, optional
from .deepseek_v2 import FAMILY as DEEPSEEK_V2
from .glm4_moe_lite import read_config as read_lite_config

MIXER_OF_TYPE = {"full_attention": "attention", "linear_attention": "kda"}


def layer_types(cfg: dict, layers: int) -> list:
    if cfg.get("layer_types"):
        return cfg["layer_types"]
    linear = cfg.get("linear_attn_config") or {}
    if "full_attn_layers" in linear and "kda_layers" in linear:
        types = [None] * layers
        for kind, key in (("full_attention", "full_attn_layers"), ("linear_attention", "kda_layers")):
            for index in linear[key]:  # 1-indexed in the checkpoint
                if not isinstance(index, int) or not 1 <= index <= layers:
                    raise ModelError(f"config.json: linear_attn_config.{key} lists layer {index!r} of {layers}")
                types[index - 1] = kind
        return types
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]


# the names transformers writes Kimi-Linear's config with (its attribute_map) -> the names the readers take,
# renamed as for a model type loaded with another's classes (Family.loaded_as)
ORIGINAL_NAMES = {"model_max_length": "max_position_embeddings", "moe_renormalize": "norm_topk_prob",
                  "num_expert_group": "n_group", "num_experts": "num_local_experts",
                  "num_experts_per_token": "num_experts_per_tok", "num_shared_experts": "n_shared_experts"}


def read_config(cfg: dict):
    linear = cfg.get("linear_attn_config") or {}
    if not isinstance(linear, dict):
        raise ModelError(f"config.json: linear_attn_config must be an object, got {linear!r}")
    sizes = KimiDelta(num_heads=optional(linear, "num_heads", optional(cfg, "linear_num_heads", 32)),
                      head_dim=optional(linear, "head_dim", optional(cfg, "linear_head_dim", 128)),
                      conv_kernel=optional(linear, "short_conv_kernel_size", optional(cfg, "linear_conv_kernel_dim", 4)))
    arch = read_lite_config({**cfg, "n_group": cfg.get("n_group") or 1, "topk_group": cfg.get("topk_group") or 1})
    kinds = mixers_of_types(layer_types(cfg, arch.num_layers), MIXER_OF_TYPE, arch.num_layers)
    # its latent attention rotates nothing: the "rope" part of q and of the cached key stays as projected
    return replace(arch, mixers=Mixers(kinds=kinds, kda=sizes)).with_positions(inv_freq=[], attention_scaling=1.0)


ATTN, MOE = L + ".self_attn", L + ".block_sparse_moe"
FAMILY = Family(
    model_type="kimi_linear",
    architecture="KimiLinearForCausalLM",
    read_config=read_config,
    tensors={
        **{role: name for role, name in DEEPSEEK_V2.tensors.items() if not name.startswith(L + ".mlp.")},
        Role.ROUTER: MOE + ".gate.weight",
        Role.ROUTER_SCORE_BIAS: MOE + ".gate.e_score_correction_bias",
        Role.EXPERT_GATE: MOE + ".experts.{expert}.w1.weight",
        Role.EXPERT_DOWN: MOE + ".experts.{expert}.w2.weight",
        Role.EXPERT_UP: MOE + ".experts.{expert}.w3.weight",
        Role.SHARED_GATE: MOE + ".shared_experts.gate_proj.weight",
        Role.SHARED_UP: MOE + ".shared_experts.up_proj.weight",
        Role.SHARED_DOWN: MOE + ".shared_experts.down_proj.weight",
        Role.DENSE_GATE: MOE + ".gate_proj.weight",
        Role.DENSE_UP: MOE + ".up_proj.weight",
        Role.DENSE_DOWN: MOE + ".down_proj.weight",
        **{role: ATTN + suffix for role, suffix in (
            (Role.KDA_Q, ".q_proj.weight"), (Role.KDA_K, ".k_proj.weight"), (Role.KDA_V, ".v_proj.weight"),
            (Role.KDA_Q_CONV, ".q_conv1d.weight"), (Role.KDA_K_CONV, ".k_conv1d.weight"),
            (Role.KDA_V_CONV, ".v_conv1d.weight"), (Role.KDA_F_A, ".f_a_proj.weight"), (Role.KDA_F_B, ".f_b_proj.weight"),
            (Role.KDA_DT_BIAS, ".dt_bias"), (Role.KDA_A_LOG, ".A_log"), (Role.KDA_B, ".b_proj.weight"),
            (Role.KDA_G_A, ".g_a_proj.weight"), (Role.KDA_G_B, ".g_b_proj.weight"), (Role.KDA_NORM, ".o_norm.weight"),
            (Role.KDA_OUT, ".o_proj.weight"))},
    },
    skip=DEEPSEEK_V2.skip,
).loaded_as(ORIGINAL_NAMES)
