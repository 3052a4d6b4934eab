"""Mistral-4 (Mistral4ForCausalLM): DeepSeek-V3's latent attention (low-rank q and kv, the rotary part of
each head on adjacent pairs, YaRN with its attention scale) and layout, shared experts, dense first layers,
the routed experts stored a layer per tensor;
softmax routing limited to the best groups, a group ranked by the sum of its two best probabilities,
renormalized and times routed_scaling_factor. Llama-4's query scaling by position (1 + beta * log(1 +
floor(pos / original_max_position_embeddings))) is 1 below original_max_position_embeddings: the context
is capped there, where Fate computes exactly what transformers does."""

from dataclasses import replace

from .base import LAYER as L
from .base import Family, Role, optional, rope_params
from .deepseek_v2 import FAMILY as DEEPSEEK_V2
from .deepseek_v3 import read_config as read_v3_config
from .layouts import FusedExperts


def read_config(cfg: dict):
    arch = read_v3_config(cfg)
    groups = arch.routing.group_topk if arch.routing.group_topk and arch.routing.group_topk[0] > 1 else None
    rope = rope_params(cfg)
    original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
    capped = arch.max_positions
    if rope.get("llama_4_scaling_beta") and isinstance(original, int) and not isinstance(original, bool) and original > 0:
        capped = min(capped, original)
    return replace(arch, routing=replace(arch.routing, scoring="softmax", group_topk=groups, group_score="top2",
                                         normalize_top_k=bool(cfg.get("norm_topk_prob", True))),    max_positions=capped,
                   unused_trailing_layers=optional(cfg, "num_nextn_predict_layers", 0) or 0)


FAMILY = Family(
    model_type="mistral4",
    architecture="Mistral4ForCausalLM",
    read_config=read_config,
    tensors={**{role: name for role, name in DEEPSEEK_V2.tensors.items()
                if role not in (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)},
             Role.EXPERTS_GATE_UP: L + ".mlp.experts.gate_up_proj", Role.EXPERTS_DOWN: L + ".mlp.experts.down_proj"},
    skip=DEEPSEEK_V2.skip,
    layouts=(FusedExperts("rows"),),  # as transformers 5 saves it: gate_up [E, 2I, H], down [E, H, I]
)
