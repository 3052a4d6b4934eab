"""GLM-4.7-Flash and kin (Glm4MoeLiteForCausalLM): DeepSeek-V3's multi-head latent attention and
sigmoid routing (correction bias, groups, renormalization, routed scaling, shared experts) in
GLM's layout, whose dense and MoE layers are listed per layer in `mlp_layer_types` (by default
the first dense, the rest sparse)."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import Family, require
from .deepseek_v3 import FAMILY as DEEPSEEK_V3
from .deepseek_v3 import read_config as read_deepseek_v3_config


def read_config(cfg: dict):
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {"dense", "sparse"}:
        raise ModelError(f"config.json: mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers")
    arch = read_deepseek_v3_config({**cfg, "first_k_dense_replace": 0})
    return replace(arch, moe_layers=frozenset(i for i, t in enumerate(types) if t == "sparse"))


FAMILY = Family(
    model_type="glm4_moe_lite",
    architecture="Glm4MoeLiteForCausalLM",
    read_config=read_config,
    tensors=DEEPSEEK_V3.tensors,
    skip=DEEPSEEK_V3.skip,
)
