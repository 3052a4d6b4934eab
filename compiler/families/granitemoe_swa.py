"""Granite-MoE with sliding windows (GraniteMoeSWAForCausalLM): granitemoeshared (Mixtral-like
routing, the four multipliers, a fused shared expert) with experts fused under `experts.*`, an
attention sink per head, and sliding-window layers from `layer_types` (by default every fourth
layer full, the others sliding). Per-layer RoPE bases (`layer_rope_theta`): 0 is a layer without
positions (NoPE), and the other layers must share one base (it need not be the global rope_theta,
which transformers then leaves unused): the runtime feeds every layer one set of RoPE tables."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import LAYER as L
from .base import Family, Role, layer_windows, require, rope_params
from .granitemoeshared import FAMILY as GRANITEMOESHARED
from .granitemoeshared import read_config as read_granitemoeshared_config


def read_config(cfg: dict):
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types") or ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(layers)]
    thetas = cfg.get("layer_rope_theta")
    nope: frozenset[int] = frozenset()
    if thetas is not None:
        if not isinstance(thetas, list) or len(thetas) != layers or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0 for t in thetas):
            raise ModelError(f"config.json: layer_rope_theta must give each of the {layers} layers a RoPE base "
                             f"(0: no positions), got {thetas!r}")
        bases = sorted({t for t in thetas if t})
        if len(bases) > 1:
            raise ModelError(f"config.json: layer_rope_theta uses {len(bases)} RoPE bases "
                             f"({', '.join(map(str, bases))}); Fate feeds every layer one set of RoPE tables, so "
                             f"one base (and 0 for NoPE layers)")
        nope = frozenset(i for i, t in enumerate(thetas) if not t)
        if bases:  # the one base the rotating layers use, whatever the global rope_theta says
            cfg = {**cfg, "rope_parameters": {**rope_params(cfg), "rope_theta": bases[0]},
                   "rope_theta": bases[0]}
    arch = read_granitemoeshared_config(cfg)
    windows = layer_windows({**cfg, "layer_types": types})
    return replace(arch, attention=replace(arch.attention, layer_windows=windows)).with_positions(nope_layers=nope)


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
