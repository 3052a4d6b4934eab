"""FlexOlmo (FlexOlmoForCausalLM): OLMo-2's post-norm layers around an OLMoE-style MoE. Attention
and MoE read the residual stream without a norm; their outputs are normalized before the residual
add (the MoE's routed sum by a combine graph, once the runtime has summed it). RMSNorm over the
whole query and key projections; softmax top-k, renormalized when `norm_topk_prob`."""

from dataclasses import replace

from .base import LAYER as L
from .base import Block, Family, Role
from .olmoe import FAMILY as OLMOE
from .olmoe import read_config as read_olmoe_config


def read_config(cfg: dict):
    return replace(read_olmoe_config(cfg), block=Block(pre_norms=False, post_norms=True))


FAMILY = Family(
    model_type="flex_olmo",
    architecture="FlexOlmoForCausalLM",
    read_config=read_config,
    tensors={
        **{role: name for role, name in OLMOE.tensors.items() if role not in (Role.ATTN_NORM, Role.MLP_NORM)},
        Role.POST_ATTN_NORM: L + ".post_attention_layernorm.weight",
        Role.POST_MLP_NORM: L + ".post_feedforward_layernorm.weight",
    },
    skip=OLMOE.skip,
)
