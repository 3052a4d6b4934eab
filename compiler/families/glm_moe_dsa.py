"""GLM-5 and kin (GlmMoeDsaForCausalLM): DeepSeek-V3.2's latent attention, routing and sparse-attention
indexer (some layers reuse the previous layer's choice: `indexer_types`) in GLM's layout. As for
DeepSeek-V3.2, the indexer keeps every key while a sequence holds at most `index_topk` tokens: the context
is capped there, where the attention is the dense one Fate computes exactly. Dense first layers from
`mlp_layer_types`, else `first_k_dense_replace`."""

from .base import Family, optional, require
from .deepseek_v32 import FAMILY as DEEPSEEK_V32
from .deepseek_v32 import read_config as read_v32_config


def read_config(cfg: dict):
    if not cfg.get("mlp_layer_types"):
        layers, dense = require(cfg, "num_hidden_layers"), optional(cfg, "first_k_dense_replace", 3)
        cfg = {**cfg, "mlp_layer_types": ["dense" if i < dense else "sparse" for i in range(layers)]}
    return read_v32_config(cfg)


FAMILY = Family(
    model_type="glm_moe_dsa",
    architecture="GlmMoeDsaForCausalLM",
    read_config=read_config,
    tensors=DEEPSEEK_V32.tensors,
    skip=DEEPSEEK_V32.skip,
)
