"""Mixtral (MixtralForCausalLM): every layer MoE, softmax top-k renormalized, no biases."""

from .base import (
    Attention,
    LAYER as L,
    STANDARD_SKIP,
    STANDARD_TENSORS,
    ArchConfig,
    Family,
    Role,
    common_fields,
    require,
)
from .base import Routing


def read_config(cfg: dict) -> ArchConfig:
    common = common_fields(cfg)
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(cfg, "num_local_experts"), top_k=require(cfg, "num_experts_per_tok"),
                        normalize_top_k=True),
        moe_intermediate_size=require(cfg, "intermediate_size"),
        dense_intermediate_size=0,
        shared_intermediate_size=0,
        moe_layers=frozenset(range(common["num_layers"])),
        attention=Attention(sliding_window=cfg.get("sliding_window")),
    )


FAMILY = Family(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        Role.ROUTER: L + ".block_sparse_moe.gate.weight",
        Role.EXPERT_GATE: L + ".block_sparse_moe.experts.{expert}.w1.weight",
        Role.EXPERT_DOWN: L + ".block_sparse_moe.experts.{expert}.w2.weight",
        Role.EXPERT_UP: L + ".block_sparse_moe.experts.{expert}.w3.weight",
    },
    skip=STANDARD_SKIP,
)
