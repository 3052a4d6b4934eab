"""DeepSeek-V3.2 (DeepseekV32ForCausalLM): GLM-4.7-Flash's layout of DeepSeek-V3's latent attention and
sigmoid grouped routing (dense and MoE layers from `mlp_layer_types`), plus the sparse-attention indexer
(DSA), which keeps each query's best `index_topk` keys and masks the rest. While a sequence holds no more
than `index_topk` tokens the indexer keeps every key, and the attention is the dense one Fate computes
exactly: the context is capped there and the indexer's tensors are not needed. Beyond it the attention
would depend on the indexer's choice, which Fate does not compute."""

from dataclasses import replace

from .base import Family, optional
from .glm4_moe_lite import FAMILY as LITE
from .glm4_moe_lite import read_config as read_lite_config


def read_config(cfg: dict):
    arch = read_lite_config(cfg)
    keep = optional(cfg, "index_topk", 2048)
    return replace(arch, max_positions=min(arch.max_positions, keep)).with_positions(interleaved=True)


FAMILY = Family(
    model_type="deepseek_v32",
    architecture="DeepseekV32ForCausalLM",
    read_config=read_config,
    tensors=LITE.tensors,
    skip=LITE.skip + (r"model\.layers\.\d+\.self_attn\.indexer\..*",),
)
