"""Nemotron-H (NemotronHForCausalLM: Nemotron-H, Nemotron-3-Nano): a hybrid whose blocks each hold one
thing, from `layers_block_type` (or the older `hybrid_override_pattern`, "M" "*" "E" "-"): a Mamba2
mixer ("linear_attention"), attention without positions ("full_attention"), a MoE ("moe") or a dense
MLP ("mlp"), each x + f(norm(x)). A Fate layer is one block: a mixer block has no MLP
(Block.no_mlp), an MLP or MoE block no token mixer (mixer "none"); the block before a MoE block then
predicts its experts from the very norm and router that choose them. Every MLP is non-gated,
down(relu(up(x))²): the routed experts, the shared expert beside them and the dense blocks. DeepSeek-V3's
routing (sigmoid scores, a correction bias, expert groups, renormalized, routed scaling). Where
`moe_latent_size` is set (Nemotron-3 Super) the routed experts run in that latent space: the layer graph
projects their input down (`fc1_latent_proj`) and the combine graph their weighted sum back up
(`fc2_latent_proj`). MLP biases are refused."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import (
    Attention,
    Block,
    Family,
    Mamba2,
    Mixers,
    Role,
    optional,
    require,
)
from .glm4_moe import read_config as read_glm4_moe_config
from .granitemoehybrid import check_time_step_limit, mamba2_tensors

PATTERN = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
# the Mamba keys older configs name otherwise, as transformers' config class renames them
LEGACY_KEYS = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_dt_limit": "time_step_limit",
               "mamba_conv_bias": "use_conv_bias"}
LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}  # transformers' older names
MIXER_OF_TYPE = {"linear_attention": "mamba2", "full_attention": "attention", "moe": "none", "mlp": "none"}


def block_types(cfg: dict) -> list[str]:
    """Each block's type: `layers_block_type`, else the pattern string, else transformers' default."""
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    pattern = cfg.get("hybrid_override_pattern")
    if types is None and isinstance(pattern, str) and pattern and set(pattern) <= set(PATTERN):
        types = [PATTERN[c] for c in pattern]
    elif types is None and pattern is not None:
        raise ModelError(f"config.json: hybrid_override_pattern must be letters of {''.join(PATTERN)}, got {pattern!r}")
    types = types if types is not None else ["linear_attention", "moe", "full_attention", "mlp"]
    if not isinstance(types, list) or not types or any(LEGACY.get(t, t) not in MIXER_OF_TYPE for t in types
                                                       if isinstance(t, str)) or not all(isinstance(t, str) for t in types):
        raise ModelError(f"config.json: layers_block_type must list one of {', '.join(MIXER_OF_TYPE)} per block, "
                         f"got {types!r}")
    return [LEGACY.get(t, t) for t in types]


def mamba(cfg: dict) -> Mamba2:
    if cfg.get("mamba_hidden_act", "silu") != "silu":
        raise ModelError(f"config.json: mamba_hidden_act {cfg['mamba_hidden_act']!r} is not supported (only 'silu')")
    check_time_step_limit(cfg)
    return Mamba2(num_heads=optional(cfg, "mamba_num_heads", 128), head_dim=optional(cfg, "mamba_head_dim", 64),
                  state_size=optional(cfg, "ssm_state_size", 128), groups=optional(cfg, "n_groups", 8),
                  conv_kernel=optional(cfg, "conv_kernel", 4))


def read_config(cfg: dict):
    cfg = {**cfg, **{new: cfg[old] for old, new in LEGACY_KEYS.items() if old in cfg}}
    types = block_types(cfg)
    if cfg.get("mlp_hidden_act", "relu2") != "relu2":
        raise ModelError(f"config.json: mlp_hidden_act {cfg['mlp_hidden_act']!r} is not supported (only 'relu2')")
    if cfg.get("mlp_bias"):
        raise ModelError("config.json: mlp_bias is not supported (biases on the MLPs and experts)")
    if cfg.get("attention_bias"):
        raise ModelError("config.json: attention_bias is not supported (transformers' Nemotron-H has none)")
    layers = len(types)
    arch = read_glm4_moe_config({
        **cfg, "num_hidden_layers": layers, "rms_norm_eps": require(cfg, "layer_norm_epsilon", float),
        "head_dim": optional(cfg, "head_dim", 128), "num_key_value_heads": optional(cfg, "num_key_value_heads", 8),
        "first_k_dense_replace": 0, "n_shared_experts": 0, "use_qk_norm": False, "num_nextn_predict_layers": 0,
        "hidden_act": "silu", "rope_parameters": {}})
    return replace(
        arch, moe_layers=frozenset(i for i, t in enumerate(types) if t == "moe"),
        # 0 falls back to the dense MLPs' size, as transformers builds it
        shared_intermediate_size=optional(cfg, "moe_shared_expert_intermediate_size", 7688) or arch.dense_intermediate_size,
        mlp_activation="relu2", attention=Attention(), moe_latent_size=optional(cfg, "moe_latent_size", 0),
        block=Block(no_mlp=frozenset(i for i, t in enumerate(types) if t in ("linear_attention", "full_attention"))),
        mixers=Mixers(kinds=tuple(MIXER_OF_TYPE[t] for t in types), mamba=mamba(cfg)),
    ).with_positions(inv_freq=[], attention_scaling=1.0)


L = "backbone.layers.{layer}"
MIXER = L + ".mixer"
FAMILY = Family(
    model_type="nemotron_h",
    architecture="NemotronHForCausalLM",
    read_config=read_config,
    tensors={
        Role.EMBED: "backbone.embeddings.weight",
        Role.FINAL_NORM: "backbone.norm_f.weight",
        Role.LM_HEAD: "lm_head.weight",
        # one norm a block: before its mixer, or before its MLP
        Role.ATTN_NORM: L + ".norm.weight",
        Role.MLP_NORM: L + ".norm.weight",
        Role.Q: MIXER + ".q_proj.weight",
        Role.K: MIXER + ".k_proj.weight",
        Role.V: MIXER + ".v_proj.weight",
        Role.O: MIXER + ".o_proj.weight",
        **mamba2_tensors(MIXER),
        Role.ROUTER: MIXER + ".gate.weight",
        Role.ROUTER_SCORE_BIAS: MIXER + ".gate.e_score_correction_bias",
        Role.EXPERT_UP: MIXER + ".experts.{expert}.up_proj.weight",
        Role.EXPERT_DOWN: MIXER + ".experts.{expert}.down_proj.weight",
        Role.MOE_LATENT_IN: MIXER + ".fc1_latent_proj.weight",
        Role.MOE_LATENT_OUT: MIXER + ".fc2_latent_proj.weight",
        Role.SHARED_UP: MIXER + ".shared_experts.up_proj.weight",
        Role.SHARED_DOWN: MIXER + ".shared_experts.down_proj.weight",
        Role.DENSE_UP: MIXER + ".up_proj.weight",
        Role.DENSE_DOWN: MIXER + ".down_proj.weight",
    },
    skip=(r"(backbone\.)?mtp\..*",),
)
