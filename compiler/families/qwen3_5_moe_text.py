"""Qwen3.5-MoE's language model as Qwen3_5MoeForCausalLM saves it (`qwen3_5_moe_text`): Qwen3-Next's
hybrid of gated DeltaNet and gated attention layers, with the DeltaNet's projections stored apart
(in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), every layer MoE and its top-k always renormalized.
Its multimodal RoPE gives text (the same position on every axis) plain RoPE over the rotated
quarter of each head. The multimodal checkpoint is `qwen3_5_moe`."""

from dataclasses import replace

from .base import LAYER as L
from .base import Family, Role
from .layouts import QueryWithGate
from .qwen3_next import FAMILY as QWEN3_NEXT
from .qwen3_next import LINEAR, linear_attention
from .qwen3_next import read_config as read_qwen3_next_config


def read_config(cfg: dict):
    arch = read_qwen3_next_config({**cfg, "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                                   "intermediate_size": 0})
    return replace(arch, mixers=replace(arch.mixers, linear_attention=linear_attention(cfg)))


def tensors(prefix: str = "model.") -> dict[Role, str]:
    """The table under `prefix` (the multimodal checkpoint keeps the language model under
    `model.language_model.`)."""
    table = {role: name for role, name in QWEN3_NEXT.tensors.items()
             if role not in (Role.DENSE_GATE, Role.DENSE_UP, Role.DENSE_DOWN)}
    table.update({Role.LINEAR_QKV: LINEAR + ".in_proj_qkv.weight", Role.LINEAR_Z: LINEAR + ".in_proj_z.weight",
                  Role.LINEAR_B: LINEAR + ".in_proj_b.weight", Role.LINEAR_A: LINEAR + ".in_proj_a.weight"})
    return {role: name.replace("model.", prefix, 1) if name.startswith("model.") else name
            for role, name in table.items()}


assert L.startswith("model.")
FAMILY = Family(
    model_type="qwen3_5_moe_text",
    architecture="Qwen3_5MoeForCausalLM",
    read_config=read_config,
    tensors=tensors(),
    skip=QWEN3_NEXT.skip + (r"mtp\..*",),
    layouts=(QueryWithGate(),),  # the DeltaNet's projections stored apart
)
