"""Granite-4.0-H (GraniteMoeHybridForCausalLM): a hybrid. Most layers mix tokens with Mamba2 (a
selective state space with a fixed-size state per head, after a short causal convolution), a few
with attention, from `layer_types` ("mamba"/"linear_attention", "attention"/"full_attention").
Attention has no positions at all unless `position_embedding_type` is "rope" (the released
checkpoints use none). Granite-MoE's routing, fused experts and four multipliers, plus the shared
expert of granitemoeshared."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import LAYER as L
from .base import Family, Mamba2, Mixers, Role, mixers_of_types, optional, require
from .granitemoeshared import FAMILY as GRANITEMOESHARED
from .granitemoeshared import read_config as read_granitemoeshared_config

MIXER_OF_TYPE = {"mamba": "mamba2", "linear_attention": "mamba2", "attention": "attention",
                 "full_attention": "attention"}


def layer_mixers(cfg: dict) -> tuple[str, ...]:
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * layers
    return mixers_of_types(types, MIXER_OF_TYPE, layers)


def number(value) -> float | None:
    """A JSON number, or infinity as transformers writes it ({"__float__": "Infinity"})."""
    if isinstance(value, dict) and value.get("__float__") in ("Infinity", "inf"):
        return float("inf")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_time_step_limit(cfg: dict) -> None:
    """Mamba2's dt clamp: only the default (none) is supported."""
    limit = cfg.get("time_step_limit")
    if limit is not None and (not isinstance(limit, list | tuple) or len(limit) != 2
                              or [number(v) for v in limit] != [0.0, float("inf")]):
        raise ModelError(f"config.json: time_step_limit {limit!r} is not supported (only the default, no limit)")


def mamba(cfg: dict) -> Mamba2:
    hidden, heads = require(cfg, "hidden_size"), optional(cfg, "mamba_n_heads", 128)
    inner = optional(cfg, "mamba_expand", 2) * hidden
    head_dim = cfg.get("mamba_d_head", "auto")
    if head_dim == "auto" or head_dim is None:
        head_dim = inner // heads if heads > 0 else 0
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim * heads != inner:
        raise ModelError(f"config.json: mamba_d_head {head_dim!r} x mamba_n_heads {heads} must be mamba_expand x "
                         f"hidden_size ({inner})")
    check_time_step_limit(cfg)
    return Mamba2(num_heads=heads, head_dim=head_dim, state_size=optional(cfg, "mamba_d_state", 256),
                  groups=optional(cfg, "mamba_n_groups", 1), conv_kernel=optional(cfg, "mamba_d_conv", 4))


def read_config(cfg: dict):
    if not optional(cfg, "num_local_experts", 8):
        raise ModelError("config.json: num_local_experts is 0: a dense model, which Fate does not compile")
    arch = read_granitemoeshared_config(cfg)
    if cfg.get("position_embedding_type") != "rope":
        arch = arch.with_positions(inv_freq=[], attention_scaling=1.0)
    return replace(arch, mixers=Mixers(kinds=layer_mixers(cfg), mamba=mamba(cfg)))


def mamba2_tensors(mixer: str) -> dict[Role, str]:
    """A Mamba2 mixer's tensors under `mixer` (a layer's name for it), as transformers' Mamba2 mixer names them
    (Granite-4.0-H, Nemotron-H)."""
    return {
        Role.MAMBA_IN: mixer + ".in_proj.weight",
        Role.MAMBA_IN_BIAS: mixer + ".in_proj.bias",
        Role.MAMBA_CONV: mixer + ".conv1d.weight",
        Role.MAMBA_CONV_BIAS: mixer + ".conv1d.bias",
        Role.MAMBA_DT_BIAS: mixer + ".dt_bias",
        Role.MAMBA_A_LOG: mixer + ".A_log",
        Role.MAMBA_D: mixer + ".D",
        Role.MAMBA_NORM: mixer + ".norm.weight",
        Role.MAMBA_OUT: mixer + ".out_proj.weight",
        Role.MAMBA_OUT_BIAS: mixer + ".out_proj.bias",
    }


FAMILY = Family(
    model_type="granitemoehybrid",
    architecture="GraniteMoeHybridForCausalLM",
    read_config=read_config,
    tensors={
        **GRANITEMOESHARED.tensors,
        **mamba2_tensors(L + ".mamba"),
    },
    skip=GRANITEMOESHARED.skip,
    layouts=GRANITEMOESHARED.layouts,
)
