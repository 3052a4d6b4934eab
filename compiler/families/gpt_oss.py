"""GPT-OSS (GptOssForCausalLM): attention sinks (one learned logit per head), sliding-window and
full attention alternating by `layer_types`, biases on q/k/v/o, the router and the experts,
experts fused per layer with gate and up interleaved by column, and a clamped SwiGLU.

Checkpoints with MXFP4 experts (as published: `*_blocks` / `*_scales`) are decoded at compile
time, one expert at a time."""

from dataclasses import replace

from .base import ATTENTION_BIASES, STANDARD_SKIP, STANDARD_TENSORS, Family, Role, layer_windows, optional
from .base import LAYER as L
from .layouts import FusedExperts
from .mixtral import read_config as read_mixtral_config


def read_config(cfg: dict):
    arch = read_mixtral_config({**cfg, "sliding_window": None})
    return replace(arch, swiglu_limit=float(optional(cfg, "swiglu_limit", 7.0, (int, float))),
                   swiglu_alpha=float(optional(cfg, "swiglu_alpha", 1.702, (int, float))),
                   attention=replace(arch.attention, layer_windows=layer_windows(cfg)))


FAMILY = Family(
    model_type="gpt_oss",
    architecture="GptOssForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        **ATTENTION_BIASES,
        Role.SINKS: L + ".self_attn.sinks",
        Role.ROUTER: L + ".mlp.router.weight",
        Role.ROUTER_BIAS: L + ".mlp.router.bias",
        Role.EXPERTS_GATE_UP: L + ".mlp.experts.gate_up_proj",
        Role.EXPERTS_GATE_UP_BIAS: L + ".mlp.experts.gate_up_proj_bias",
        Role.EXPERTS_DOWN: L + ".mlp.experts.down_proj",
        Role.EXPERTS_DOWN_BIAS: L + ".mlp.experts.down_proj_bias",
        Role.EXPERTS_GATE_UP_BLOCKS: L + ".mlp.experts.gate_up_proj_blocks",
        Role.EXPERTS_GATE_UP_SCALES: L + ".mlp.experts.gate_up_proj_scales",
        Role.EXPERTS_DOWN_BLOCKS: L + ".mlp.experts.down_proj_blocks",
        Role.EXPERTS_DOWN_SCALES: L + ".mlp.experts.down_proj_scales",
    },
    skip=STANDARD_SKIP,
    layouts=(FusedExperts("interleaved"),),
)
