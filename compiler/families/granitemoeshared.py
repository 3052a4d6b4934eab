"""Granite-MoE with a shared expert (GraniteMoeSharedForCausalLM, Granite 3.x MoE "shared"): Granite-MoE
(Mixtral-like routing, fused expert tensors, the four multipliers) plus a shared SwiGLU expert of
`shared_intermediate_size` whose gate and up projections are one tensor, gate rows first."""

from dataclasses import replace

from .base import LAYER as L
from .base import Family, Role, optional
from .granitemoe import FAMILY as GRANITEMOE
from .granitemoe import read_config as read_granitemoe_config
from .layouts import SharedGateUpRows


def read_config(cfg: dict):
    return replace(read_granitemoe_config(cfg), shared_intermediate_size=optional(cfg, "shared_intermediate_size", 0))


FAMILY = Family(
    model_type="granitemoeshared",
    architecture="GraniteMoeSharedForCausalLM",
    read_config=read_config,
    tensors={
        **GRANITEMOE.tensors,
        Role.SHARED_GATE: L + ".shared_mlp.input_linear.weight",
        Role.SHARED_UP: L + ".shared_mlp.input_linear.weight",
        Role.SHARED_DOWN: L + ".shared_mlp.output_linear.weight",
    },
    skip=GRANITEMOE.skip,
    layouts=(*GRANITEMOE.layouts, SharedGateUpRows()),
)
