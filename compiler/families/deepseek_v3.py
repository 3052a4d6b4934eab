"""DeepSeek-V3 (DeepseekV3ForCausalLM): DeepSeek-V2's latent attention and layout, with sigmoid
routing: experts chosen by sigmoid score + a correction bias within the best groups, weighted
by the plain sigmoid score, renormalized when norm_topk_prob, times routed_scaling_factor."""

from dataclasses import replace

from .base import LAYER as L
from .base import Family, Role, optional
from .deepseek_v2 import FAMILY as DEEPSEEK_V2
from .deepseek_v2 import read_config as read_v2_config


def read_config(cfg: dict):
    groups = (optional(cfg, "n_group", 0), optional(cfg, "topk_group", 0))
    groups = groups if all(groups) else None
    arch = read_v2_config({**cfg, "topk_method": "greedy",
                           "n_routed_experts": cfg.get("n_routed_experts") or cfg.get("num_local_experts")})
    return replace(arch, routing=replace(arch.routing, scoring="sigmoid", group_topk=groups,
                                         normalize_top_k=bool(cfg.get("norm_topk_prob", True))),
                   # the multi-token-prediction layer stored after the last decoder layer: not run
                   unused_trailing_layers=optional(cfg, "num_nextn_predict_layers", 0) or 0,
                   ).with_positions(interleaved=bool(cfg.get("rope_interleave", True)))


FAMILY = Family(
    model_type="deepseek_v3",
    architecture="DeepseekV3ForCausalLM",
    read_config=read_config,
    tensors={**DEEPSEEK_V2.tensors, Role.ROUTER_SCORE_BIAS: L + ".mlp.gate.e_score_correction_bias"},
    skip=DEEPSEEK_V2.skip,
)
