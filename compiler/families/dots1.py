"""dots.llm1 (Dots1ForCausalLM): GLM-4.5's MoE block (sigmoid scores with a correction bias and
expert groups, routed scaling, shared experts, dense first layers) under Qwen3-style attention:
RMSNorm on each query and key head, biases on q/k/v/o when `attention_bias`, full rotary, and
sliding-window layers from `layer_types` (those from `max_window_layers` on, by transformers'
default)."""

from dataclasses import replace

from .base import ATTENTION_BIASES, Family, layer_windows
from .glm4_moe import FAMILY as GLM4_MOE
from .glm4_moe import read_config as read_glm4_moe_config


def read_config(cfg: dict):
    # dots.llm1's defaults differ from GLM-4.5's where a config leaves them out
    arch = read_glm4_moe_config({"first_k_dense_replace": 0, "norm_topk_prob": False, **cfg})
    return replace(arch, attention=replace(arch.attention, qk_norm="head", layer_windows=layer_windows(cfg)))


FAMILY = Family(
    model_type="dots1",
    architecture="Dots1ForCausalLM",
    read_config=read_config,
    tensors={**GLM4_MOE.tensors, **ATTENTION_BIASES},
    skip=GLM4_MOE.skip,
)
