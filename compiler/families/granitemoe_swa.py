"""Granite-MoE with sliding windows (GraniteMoeSWAForCausalLM): granitemoeshared (Mixtral-like
routing, the four multipliers, a fused shared expert) with experts fused under `experts.*`, an
attention sink per head, and sliding-window layers from `layer_types` (by default every fourth
layer full, the others sliding). Per-layer RoPE bases (`layer_rope_theta`): 0 is a layer without
positions (NoPE); the smallest base is the model's RoPE (the global rope_theta is then unused, as in
transformers), and a layer with another base rotates with tables of its own."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import LAYER as L
from .base import Family, Role, layer_windows, require, rope_from_config, rope_params
from .granitemoeshared import FAMILY as GRANITEMOESHARED
from .granitemoeshared import read_config as read_granitemoeshared_config


def read_config(cfg: dict):
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types") or ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(layers)]
    thetas = cfg.get("layer_rope_theta")
    nope: frozenset[int] = frozenset()
    own: tuple[tuple[float, ...] | None, ...] | None = None
    if thetas is not None:
        if not isinstance(thetas, list) or len(thetas) != layers or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0 for t in thetas):
            raise ModelError(f"config.json: layer_rope_theta must give each of the {layers} layers a RoPE base "
                             f"(0: no positions), got {thetas!r}")
        bases = sorted({t for t in thetas if t})
        nope = frozenset(i for i, t in enumerate(thetas) if not t)

        def with_base(theta: float) -> dict:
            return {**cfg, "rope_parameters": {**rope_params(cfg), "rope_theta": theta}, "rope_theta": theta}

        if len(bases) > 1:  # every other base: its layers' own tables (with the same scaling: one rope type)
            head_dim = cfg.get("head_dim") or require(cfg, "hidden_size") // require(cfg, "num_attention_heads")
            tables = {t: tuple(rope_from_config(with_base(t), head_dim)[0]) for t in bases[1:]}
            own = tuple(tables.get(t) for t in thetas)
        if bases:  # the model's base, whatever the global rope_theta says
            cfg = with_base(bases[0])
    arch = read_granitemoeshared_config(cfg)
    windows = layer_windows({**cfg, "layer_types": types})
    return replace(arch, attention=replace(arch.attention, layer_windows=windows)).with_positions(
        nope_layers=nope, layer_inv_freq=own)


FAMILY = Family(
    model_type="granitemoe_swa",
    architecture="GraniteMoeSWAForCausalLM",
    read_config=read_config,
    tensors={
        **GRANITEMOESHARED.tensors,
        Role.ROUTER: L + ".block_sparse_moe.router.weight",
        Role.EXPERTS_GATE_UP: L + ".block_sparse_moe.experts.gate_up_proj",
        Role.EXPERTS_DOWN: L + ".block_sparse_moe.experts.down_proj",
        Role.SINKS: L + ".self_attn.sinks",
    },
    skip=GRANITEMOESHARED.skip,
    layouts=GRANITEMOESHARED.layouts,
)
