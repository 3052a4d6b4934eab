"""Solar Open (SolarOpenForCausalLM): GLM-4.5's MoE block in every layer (sigmoid grouped routing
with a correction bias, renormalization, routed scaling, shared experts) under Llama attention
(q/k/v biases when `attention_bias`, no q/k norms, RoPE over the whole head unless the rope
parameters say otherwise); no dense layers, no multi-token-prediction layers."""

from fate.artifacts import ModelError

from .base import Family
from .glm4_moe import FAMILY as GLM4_MOE
from .glm4_moe import read_config as read_glm4_moe_config


def read_config(cfg: dict):
    for key in ("first_k_dense_replace", "use_qk_norm"):
        if cfg.get(key):
            raise ModelError(f"config.json: {key} = {cfg[key]!r}; Solar Open has no such layers")
    return read_glm4_moe_config({**cfg, "first_k_dense_replace": 0, "intermediate_size": 0, "use_qk_norm": False,
                                 "num_nextn_predict_layers": 0})


FAMILY = Family(
    model_type="solar_open",
    architecture="SolarOpenForCausalLM",
    read_config=read_config,
    tensors=GLM4_MOE.tensors,
    skip=GLM4_MOE.skip,
)
