"""OLMoE (OlmoeForCausalLM): RMSNorm over the whole query and key projections (before heads
are split), optional clamping of q/k/v (`clip_qkv`), every layer MoE, no shared expert."""

from dataclasses import replace

from .base import ATTENTION_BIASES, LAYER as L, MLP_EXPERTS, STANDARD_SKIP, STANDARD_TENSORS, Family, Role
from .mixtral import read_config as read_mixtral_config


def read_config(cfg: dict):
    # Mixtral's reading with OLMoE's key names for the experts and top-k normalization.
    renamed = {**cfg, "num_local_experts": cfg.get("num_experts")}
    arch = read_mixtral_config(renamed)
    return replace(arch, routing=replace(arch.routing, normalize_top_k=bool(cfg.get("norm_topk_prob", False))),
                   attention=replace(arch.attention, qk_norm="projection", clip_qkv=cfg.get("clip_qkv")))


FAMILY = Family(
    model_type="olmoe",
    architecture="OlmoeForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        **ATTENTION_BIASES,
        Role.Q_NORM: L + ".self_attn.q_norm.weight",
        Role.K_NORM: L + ".self_attn.k_norm.weight",
        Role.ROUTER: L + ".mlp.gate.weight",
        **MLP_EXPERTS,
    },
    skip=STANDARD_SKIP,
)
