"""Qwen3-Next (Qwen3NextForCausalLM): a hybrid. Three of every four layers (`layer_types`, or
`full_attention_interval`) mix tokens with a gated DeltaNet (a linear-attention recurrence with
a fixed-size state per value head, after a short causal convolution), the rest with gated
attention (q_proj also yields a sigmoid output gate per head; per-head q/k norms; a quarter of
each head rotated). Every RMSNorm but the DeltaNet's gated one stores zero-centred weights
(x * (1 + w)). MoE as Qwen2-MoE: softmax top-k, a shared expert with a sigmoid gate, dense
layers from `decoder_sparse_step` / `mlp_only_layers`."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import LAYER as L
from .base import Family, LinearAttention, Mixers, Role, mixers_of_types, optional, require, rope_params
from .layouts import FusedLinearAttention, QueryWithGate
from .qwen2_moe import FAMILY as QWEN2_MOE
from .qwen2_moe import read_config as read_qwen2_moe_config

MIXER_OF_TYPE = {"full_attention": "attention", "linear_attention": "gated_deltanet"}


def layer_mixers(cfg: dict) -> tuple[str, ...]:
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types")
    if types is None:
        interval = optional(cfg, "full_attention_interval", 4)
        if interval < 1:
            raise ModelError(f"config.json: full_attention_interval must be >= 1, got {interval}")
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    return mixers_of_types(types, MIXER_OF_TYPE, layers)


def linear_attention(cfg: dict) -> LinearAttention:
    return LinearAttention(num_key_heads=optional(cfg, "linear_num_key_heads", 16),
                           num_value_heads=optional(cfg, "linear_num_value_heads", 32),
                           key_head_dim=optional(cfg, "linear_key_head_dim", 128),
                           value_head_dim=optional(cfg, "linear_value_head_dim", 128),
                           conv_kernel=optional(cfg, "linear_conv_kernel_dim", 4))


def read_config(cfg: dict):
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelError(f"config.json: hidden_act = {cfg['hidden_act']!r} is not supported (only 'silu')")
    # transformers defaults a quarter of each head rotated when the config does not say
    params = rope_params(cfg)
    if "partial_rotary_factor" not in params and "partial_rotary_factor" not in cfg:
        cfg = {**cfg, "partial_rotary_factor": 0.25}
    arch = read_qwen2_moe_config({"head_dim": 256, "rms_norm_eps": 1e-6, **cfg})
    return replace(arch, norms=replace(arch.norms, weight_offset=1.0),
                   routing=replace(arch.routing, normalize_top_k=bool(cfg.get("norm_topk_prob", True))),
                   mixers=Mixers(kinds=layer_mixers(cfg), linear_attention=linear_attention(cfg)),
                   attention=replace(arch.attention, sliding_window=None, qk_norm="head", output_gate=True))


LINEAR = L + ".linear_attn"
FAMILY = Family(
    model_type="qwen3_next",
    architecture="Qwen3NextForCausalLM",
    read_config=read_config,
    tensors={
        **{role: name for role, name in QWEN2_MOE.tensors.items()
           if role not in (Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS)},
        Role.Q_GATE: L + ".self_attn.q_proj.weight",
        Role.Q_NORM: L + ".self_attn.q_norm.weight",
        Role.K_NORM: L + ".self_attn.k_norm.weight",
        # q, k, v, z and b, a fused by key head (reordered when read)
        Role.LINEAR_QKV: LINEAR + ".in_proj_qkvz.weight",
        Role.LINEAR_Z: LINEAR + ".in_proj_qkvz.weight",
        Role.LINEAR_B: LINEAR + ".in_proj_ba.weight",
        Role.LINEAR_A: LINEAR + ".in_proj_ba.weight",
        Role.LINEAR_CONV: LINEAR + ".conv1d.weight",
        Role.LINEAR_DT_BIAS: LINEAR + ".dt_bias",
        Role.LINEAR_A_LOG: LINEAR + ".A_log",
        Role.LINEAR_NORM: LINEAR + ".norm.weight",
        Role.LINEAR_OUT: LINEAR + ".out_proj.weight",
    },
    skip=QWEN2_MOE.skip,
    layouts=(QueryWithGate(), FusedLinearAttention()),
)
