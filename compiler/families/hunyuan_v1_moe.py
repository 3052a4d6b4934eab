"""HunYuan-MoE (HunYuanMoEV1ForCausalLM, Hunyuan-A13B): grouped-query attention whose per-head
query and key norms come after RoPE, RoPE as checkpoints ship it ("dynamic" with a fixed `alpha`:
NTK-scaled static frequencies, base x alpha^(d / (d - 2))), softmax top-k renormalized, and a
shared MLP of `intermediate_size` beside the routed experts (of the same size) in every layer."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import ATTENTION_BIASES, LAYER as L, MLP_EXPERTS, STANDARD_SKIP, STANDARD_TENSORS, ArchConfig, Family, Role
from .base import common_fields, optional, require, rope_params
from .base import Positions, Routing


def uniform(cfg: dict, key: str) -> int:
    """A per-model number that HunYuan configs may also give per layer (a list): all alike here."""
    value = cfg.get(key)
    if isinstance(value, list) and value and all(v == value[0] for v in value):
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"config.json: {key} must be one integer (or the same for every layer), got {value!r}")
    return value


def ntk_alpha(cfg: dict, head_dim: int) -> list[float] | None:
    """Static NTK-alpha frequencies when the config asks for them; None for any other RoPE."""
    params = rope_params(cfg)
    alpha = params.get("alpha")
    if params.get("rope_type", params.get("type")) != "dynamic" or alpha is None:
        return None
    theta = optional(params, "rope_theta", optional(cfg, "rope_theta", 10000.0, (int, float)), (int, float))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0 or head_dim <= 2:
        raise ModelError(f"config.json: rope alpha {alpha!r} must be a number > 0")
    import numpy as np

    base = theta * alpha ** (head_dim / (head_dim - 2))
    return [float(v) for v in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))]


def per_layer_top_k(cfg: dict) -> tuple[int, ...] | None:
    """`moe_topk` given per layer with differing counts (transformers takes each layer's); None where
    it is one number, or a list of one number."""
    value = cfg.get("moe_topk")
    if not isinstance(value, list) or len(set(map(repr, value))) <= 1:
        return None
    if any(isinstance(k, bool) or not isinstance(k, int) for k in value):
        raise ModelError(f"config.json: moe_topk must list an integer per layer, got {value!r}")
    return tuple(value)


def read_config(cfg: dict) -> ArchConfig:
    head_dim = optional(cfg, "head_dim", 0) or require(cfg, "hidden_size") // max(1, require(cfg, "num_attention_heads"))
    frequencies = ntk_alpha(cfg, head_dim)
    # common_fields reads any other RoPE; the NTK-alpha one is computed here
    common = common_fields({**cfg, "rope_parameters": None, "rope_scaling": None} if frequencies else cfg)
    if frequencies:
        common.update(positions=Positions(frequencies, 1.0))
    intermediate = require(cfg, "intermediate_size")
    per_layer = per_layer_top_k(cfg)
    arch = ArchConfig(
        **common,
        routing=Routing(num_experts=uniform(cfg, "num_experts"),
                        top_k=max(per_layer) if per_layer else uniform(cfg, "moe_topk"), normalize_top_k=True),
        moe_intermediate_size=intermediate,
        dense_intermediate_size=0,
        shared_intermediate_size=intermediate,
        moe_layers=frozenset(range(common["num_layers"])),
    )
    if per_layer:  # each layer its own top-k (checked against the layers and experts by ArchConfig)
        arch = replace(arch, routing=replace(arch.routing, layer_top_k=per_layer), )
    return replace(arch, attention=replace(arch.attention, qk_norm="head", qk_norm_after_rope=True))


FAMILY = Family(
    model_type="hunyuan_v1_moe",
    architecture="HunYuanMoEV1ForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        **ATTENTION_BIASES,
        Role.Q_NORM: L + ".self_attn.query_layernorm.weight",
        Role.K_NORM: L + ".self_attn.key_layernorm.weight",
        Role.ROUTER: L + ".mlp.gate.wg.weight",
        **MLP_EXPERTS,
        Role.SHARED_GATE: L + ".mlp.shared_mlp.gate_proj.weight",
        Role.SHARED_UP: L + ".mlp.shared_mlp.up_proj.weight",
        Role.SHARED_DOWN: L + ".mlp.shared_mlp.down_proj.weight",
    },
    skip=STANDARD_SKIP,
)
