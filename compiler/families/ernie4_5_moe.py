"""ERNIE-4.5 MoE (Ernie4_5_MoeForCausalLM, e.g. ERNIE-4.5-21B-A3B): grouped-query attention with RoPE
on adjacent pairs, softmax routing whose experts are chosen by probability plus a correction bias
and weighed by the probability alone, always renormalized (the clamp at `moe_norm_min` never binds
on a sum of softmax probabilities), shared experts without a gate, and MoE layers from
`moe_layer_start_index` to `moe_layer_end_index` every `moe_layer_interval`, the others dense.
Checkpoints with `use_bias` (biases on every projection) are refused."""

from fate.artifacts import ModelError

from .base import LAYER as L
from .base import (
    DENSE_MLP,
    MLP_EXPERTS,
    SHARED_EXPERTS,
    STANDARD_SKIP,
    STANDARD_TENSORS,
    ArchConfig,
    Family,
    Role,
    common_fields,
    optional,
    require,
)
from .base import Routing


def moe_layer_indices(cfg: dict, layers: int) -> frozenset[int]:
    """The rule of transformers' Ernie4_5_MoeDecoderLayer."""
    start, interval = optional(cfg, "moe_layer_start_index", 1), optional(cfg, "moe_layer_interval", 1) or 1
    end = optional(cfg, "moe_layer_end_index", -1)
    end = layers - 1 if end == -1 else end
    return frozenset(i for i in range(layers) if (i + 1) % interval == 0 and start <= i <= end)


def read_config(cfg: dict) -> ArchConfig:
    if cfg.get("use_bias"):
        raise ModelError("config.json: use_bias = true (biases on every projection) is not supported for ernie4_5_moe")
    common = common_fields(cfg)
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(cfg, "moe_num_experts"), top_k=require(cfg, "moe_k"),
                        normalize_top_k=True),
        moe_intermediate_size=require(cfg, "moe_intermediate_size"),
        dense_intermediate_size=require(cfg, "intermediate_size"),
        shared_intermediate_size=require(cfg, "moe_intermediate_size") * optional(cfg, "moe_num_shared_experts", 0),
        moe_layers=moe_layer_indices(cfg, common["num_layers"]),
    ).with_positions(interleaved=True)


FAMILY = Family(
    model_type="ernie4_5_moe",
    architecture="Ernie4_5_MoeForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        Role.ROUTER: L + ".mlp.gate.weight",
        Role.ROUTER_SCORE_BIAS: L + ".mlp.moe_statics.e_score_correction_bias",
        **MLP_EXPERTS,
        **SHARED_EXPERTS,
        **DENSE_MLP,
    },
    skip=STANDARD_SKIP,
)
