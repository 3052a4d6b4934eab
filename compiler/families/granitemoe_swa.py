"""Granite-MoE with sliding windows (GraniteMoeSWAForCausalLM): granitemoeshared (Mixtral-like
routing, the four multipliers, a fused shared expert) with experts fused under `experts.*`, an
attention sink per head, and sliding-window layers from `layer_types` (by default every fourth
layer full, the others sliding). Per-layer RoPE bases (`layer_rope_theta`, where 0 means no
positions) are accepted only when they all equal the global base: the runtime feeds one RoPE table."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import LAYER as L
from .base import Family, Role, layer_windows, require
from .granitemoeshared import FAMILY as GRANITEMOESHARED
from .granitemoeshared import read_config as read_granitemoeshared_config


def read_config(cfg: dict):
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types") or ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(layers)]
    rope = cfg.get("rope_parameters") or {}
    base = rope.get("rope_theta", cfg.get("rope_theta"))
    thetas = cfg.get("layer_rope_theta")
    if thetas is not None and (not isinstance(thetas, list) or any(t != base for t in thetas)):
        raise ModelError("config.json: per-layer RoPE bases (layer_rope_theta other than the global rope_theta, "
                         "or NoPE layers) are not supported yet")
    return replace(read_granitemoeshared_config(cfg), layer_windows=layer_windows({**cfg, "layer_types": types}))


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
)
