"""Randomized tiny configs for every supported family: the shapes the project's fixtures never have.

`random_overrides(family, seed)` returns keyword overrides for tiny_models.CONFIGS[family], drawn
from a seeded generator so a failure names its seed. Each draw mixes the general shape knobs (head
sizes not a multiple of 8, odd ones where no RoPE rotates the whole head, hidden sizes off the
quantization block, one KV head or as many as heads, expert counts that are not powers of two,
top-1 and top-all routing, odd intermediate sizes and vocabularies, one layer, a dense first layer,
tied embeddings) with the family's own switches (shared experts, q/k norms, biases, sliding
windows, partial rotary, layer types of hybrids). Every draw is a config transformers runs.

`HEAD_20` is the case of December's regression for each family: 4 heads of 20 (hidden 80).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from tiny_models import VOCAB


@dataclass(frozen=True)
class Knobs:
    """A family's names for the general knobs, and its own switches."""

    experts: str = "num_local_experts"
    top_k: str = "num_experts_per_tok"
    expert_inter: str = "intermediate_size"
    head_dim: str | None = "head_dim"  # None: the head size is hidden / heads
    dense_inter: str | None = None  # a dense MLP's size, where the family has dense layers
    rope: bool = True  # some layers rotate q and k over the whole head (so the head size must be even)
    groups: bool = False  # DeepSeek-V3's grouped routing (n_group, topk_group)
    latent: bool = False  # latent attention: one key-value head per head, sizes of its own
    layers: Callable[[random.Random, int], dict] | None = None  # per-layer lists for a layer count
    extra: Callable[[random.Random], dict] = field(default=lambda r: {})
    max_layers: int = 3


def coin(r: random.Random) -> bool:
    return r.random() < 0.5


def hybrid_types(r: random.Random, n: int, attention: str, other: str) -> list[str]:
    """n layer types with at least one `attention` and one `other` where n allows."""
    types = [r.choice([attention, other]) for _ in range(n)]
    types[r.randrange(n)] = attention
    if n > 1 and other not in types:
        types[(types.index(attention) + 1) % n] = other
    return types


def first_dense(key: str) -> Callable[[random.Random, int], dict]:
    """A `key` count of dense layers before the MoE ones (0 or 1; never all of a one-layer model)."""
    return lambda r, n: {key: r.choice([0, 1]) if n > 1 else 0}


KNOBS: dict[str, Knobs] = {
    "mixtral": Knobs(),
    "phimoe": Knobs(head_dim=None, extra=lambda r: {"attention_bias": coin(r), "lm_head_bias": coin(r)}),  # top-2
    "minimax_m2": Knobs(),  # rotary_dim drawn within the head in random_overrides
    "granitemoe": Knobs(head_dim=None),
    "granitemoeshared": Knobs(head_dim=None, extra=lambda r: {"shared_intermediate_size": r.choice([0, 20, 36])}),
    "granitemoe_swa": Knobs(head_dim=None, extra=lambda r: {"shared_intermediate_size": r.choice([0, 20, 36]),
                                                           "sliding_window": r.choice([3, 6, 64])},
                            # per-layer RoPE bases: 0 (NoPE) or one of up to two, not always the global one
                            layers=lambda r, n: {"layer_rope_theta": [r.choice([0.0, *bases]) for _ in range(n)]}
                            if (bases := r.choice([None, (10000.0,), (5e5,), (500.0, 10000.0)])) else {}),
    "gpt_oss": Knobs(extra=lambda r: {"sliding_window": r.choice([3, 6, 64]), "attention_bias": coin(r)},
                     layers=lambda r, n: {"layer_types": [r.choice(["sliding_attention", "full_attention"])
                                                          for _ in range(n)]}),
    "qwen2_moe": Knobs(experts="num_experts", expert_inter="moe_intermediate_size", head_dim=None,
                       dense_inter="intermediate_size",
                       extra=lambda r: {"shared_expert_intermediate_size": r.choice([0, 20, 44]),
                                        "norm_topk_prob": coin(r), "qkv_bias": coin(r)},
                       layers=lambda r, n: {"mlp_only_layers": [0] if n > 1 and coin(r) else []}),
    "qwen3_moe": Knobs(experts="num_experts", expert_inter="moe_intermediate_size", dense_inter="intermediate_size",
                       extra=lambda r: {"norm_topk_prob": coin(r)},
                       layers=lambda r, n: {"mlp_only_layers": [0] if n > 1 and coin(r) else []}),
    "olmoe": Knobs(experts="num_experts", head_dim=None,
                   extra=lambda r: {"norm_topk_prob": coin(r), "clip_qkv": r.choice([None, 0.7])}),
    "flex_olmo": Knobs(experts="num_experts", head_dim=None, extra=lambda r: {"norm_topk_prob": coin(r)}),
    "hunyuan_v1_moe": Knobs(experts="num_experts", top_k="moe_topk", extra=lambda r: {"attention_bias": coin(r)}),
    "ernie4_5_moe": Knobs(experts="moe_num_experts", top_k="moe_k", expert_inter="moe_intermediate_size",
                          head_dim=None, dense_inter="intermediate_size",
                          extra=lambda r: {"moe_num_shared_experts": r.choice([0, 1, 2])},
                          layers=lambda r, n: {"moe_layer_start_index": r.choice([0, 1]) if n > 1 else 0}),
    "dots1": Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", dense_inter="intermediate_size",
                   groups=True, extra=lambda r: {"n_shared_experts": r.choice([0, 1]), "attention_bias": coin(r),
                                                 "norm_topk_prob": coin(r), "sliding_window": r.choice([3, 64]),
                                                 "max_window_layers": r.choice([0, 1, 2])},
                   layers=first_dense("first_k_dense_replace")),
    "glm4_moe": Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", dense_inter="intermediate_size",
                      groups=True, extra=lambda r: {"n_shared_experts": r.choice([0, 1]), "attention_bias": coin(r),
                                                    "use_qk_norm": coin(r), "norm_topk_prob": coin(r),
                                                    "partial_rotary_factor": r.choice([0.25, 0.5, 1.0])},
                      layers=first_dense("first_k_dense_replace")),
    "solar_open": Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", groups=True,
                        extra=lambda r: {"n_shared_experts": r.choice([0, 1]), "attention_bias": coin(r),
                                         "norm_topk_prob": coin(r)}),
    "exaone_moe": Knobs(experts="num_experts", expert_inter="moe_intermediate_size", dense_inter="intermediate_size",
                        groups=True, extra=lambda r: {"num_shared_experts": r.choice([0, 1]),
                                                      "sliding_window": r.choice([3, 64]),
                                                      "sliding_window_pattern": r.choice([1, 2, 3])},
                        layers=first_dense("first_k_dense_replace")),
    "cohere2_moe": Knobs(experts="num_experts", dense_inter="prefix_dense_intermediate_size",
                         extra=lambda r: {"num_shared_experts": r.choice([0, 1]), "sliding_window": r.choice([3, 64]),
                                          "sliding_window_pattern": r.choice([1, 2, 4]),
                                          "expert_selection_fn": r.choice(["softmax", "sigmoid"]),
                                          "shared_expert_combination_strategy": r.choice(["average", "sum"])},
                         layers=lambda r, n: {"mlp_layer_types": (["dense"] if n > 1 and coin(r) else ["sparse"])
                                              + ["sparse"] * (n - 1)}),
    "afmoe": Knobs(experts="num_experts", expert_inter="moe_intermediate_size", dense_inter="intermediate_size",
                   extra=lambda r: {"num_shared_experts": r.choice([0, 1]), "sliding_window": r.choice([3, 64]),
                                    "global_attn_every_n_layers": r.choice([1, 2, 3]), "mup_enabled": coin(r),
                                    "route_scale": r.choice([1.0, 2.5])},
                   layers=first_dense("num_dense_layers")),
    "lfm2_moe": Knobs(experts="num_experts", expert_inter="moe_intermediate_size", head_dim=None,
                      dense_inter="intermediate_size", max_layers=4,
                      extra=lambda r: {"conv_bias": coin(r), "norm_topk_prob": coin(r)},
                      layers=lambda r, n: {"layer_types": hybrid_types(r, n, "full_attention", "conv"),
                                           "num_dense_layers": r.choice([0, 1]) if n > 1 else 0}),
    "deepseek_v2": Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", head_dim=None,
                         dense_inter="intermediate_size", rope=False, latent=True,
                         extra=lambda r: {"n_shared_experts": r.choice([0, 1, 2]), "q_lora_rank": r.choice([None, 20]),
                                          "kv_lora_rank": r.choice([12, 20]), "qk_nope_head_dim": r.choice([6, 12]),
                                          "qk_rope_head_dim": r.choice([4, 6]), "v_head_dim": r.choice([5, 8, 12]),
                                          "routed_scaling_factor": r.choice([1.0, 1.5])},
                         layers=first_dense("first_k_dense_replace")),
    "deepseek_v3": Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", head_dim=None,
                         dense_inter="intermediate_size", rope=False, latent=True, groups=True,
                         extra=lambda r: {"n_shared_experts": r.choice([0, 1]), "q_lora_rank": r.choice([None, 20]),
                                          "kv_lora_rank": r.choice([12, 20]), "qk_nope_head_dim": r.choice([6, 9, 12]),
                                          "qk_rope_head_dim": r.choice([4, 6]), "v_head_dim": r.choice([5, 8, 12]),
                                          "norm_topk_prob": coin(r), "rope_interleave": coin(r)},
                         layers=first_dense("first_k_dense_replace")),
    "glm4_moe_lite": Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", head_dim=None,
                           dense_inter="intermediate_size", rope=False, latent=True, groups=True,
                           extra=lambda r: {"n_shared_experts": r.choice([0, 1]), "q_lora_rank": r.choice([None, 20]),
                                            "kv_lora_rank": r.choice([12, 20]),
                                            "qk_nope_head_dim": r.choice([6, 9, 12]),
                                            "qk_rope_head_dim": r.choice([4, 6]), "v_head_dim": r.choice([5, 8, 12])},
                           layers=lambda r, n: {"mlp_layer_types": (["dense"] if n > 1 and coin(r) else ["sparse"])
                                                + ["sparse"] * (n - 1)}),
    "qwen3_next": Knobs(experts="num_experts", expert_inter="moe_intermediate_size", max_layers=4,
                        extra=lambda r: {"shared_expert_intermediate_size": r.choice([20, 44]),
                                         "linear_num_key_heads": 1, "linear_num_value_heads": r.choice([1, 2, 3]),
                                         "linear_key_head_dim": r.choice([6, 12]),
                                         "linear_value_head_dim": r.choice([5, 8]),
                                         "linear_conv_kernel_dim": r.choice([2, 4]), "norm_topk_prob": coin(r),
                                         "partial_rotary_factor": r.choice([0.25, 0.5, 1.0])},
                        layers=lambda r, n: {"layer_types": hybrid_types(r, n, "full_attention", "linear_attention")}),
    "qwen3_5_moe_text": Knobs(experts="num_experts", expert_inter="moe_intermediate_size", max_layers=4,
                              extra=lambda r: {"shared_expert_intermediate_size": r.choice([20, 44]),
                                               "linear_num_key_heads": 1,
                                               "linear_num_value_heads": r.choice([1, 2, 3]),
                                               "linear_key_head_dim": r.choice([6, 12]),
                                               "linear_value_head_dim": r.choice([5, 8])},
                              layers=lambda r, n: {"layer_types": hybrid_types(r, n, "full_attention",
                                                                               "linear_attention")}),
    "granitemoehybrid": Knobs(head_dim=None, rope=False, max_layers=4,
                              extra=lambda r: {"shared_intermediate_size": r.choice([0, 20, 36]),
                                               "mamba_n_groups": r.choice([1, 2]), "mamba_d_state": r.choice([6, 16]),
                                               "mamba_d_conv": r.choice([2, 4])},  # heads: random_overrides
                              layers=lambda r, n: {"layer_types": hybrid_types(r, n, "attention", "mamba")}),
    "jamba": Knobs(experts="num_experts", head_dim=None, rope=False, max_layers=4,
                   extra=lambda r: {"mamba_d_state": r.choice([4, 8]), "mamba_d_conv": r.choice([2, 4]),
                                    "mamba_dt_rank": r.choice([3, 8])},
                   # an attention layer among the first two, so that even two layers hold one
                   layers=lambda r, n: {"attn_layer_period": 2 if n > 1 else 1,
                                        "attn_layer_offset": r.choice([0, 1]) if n > 1 else 0,
                                        "expert_layer_period": 2 if n > 1 else 1,
                                        "expert_layer_offset": r.choice([0, 1]) if n > 1 else 0}),
}
KNOBS["minicpm5_moe"] = Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size",
                              dense_inter="intermediate_size", groups=True,
                              extra=lambda r: {"n_shared_experts": r.choice([0, 1]), "norm_topk_prob": coin(r)},
                              layers=lambda r, n: {"mlp_layer_types": (["dense"] if n > 1 and coin(r) else ["sparse"])
                                                   + ["sparse"] * (n - 1)})
KNOBS["mistral4"] = Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", head_dim=None,
                          dense_inter="intermediate_size", rope=False, latent=True, groups=True,
                          extra=lambda r: {"n_shared_experts": r.choice([0, 1]), "q_lora_rank": r.choice([None, 20]),
                                           "kv_lora_rank": r.choice([12, 20]), "qk_nope_head_dim": r.choice([6, 9, 12]),
                                           "qk_rope_head_dim": r.choice([4, 6]), "v_head_dim": r.choice([5, 8, 12]),
                                           "norm_topk_prob": coin(r), "rope_interleave": coin(r),
                                           "routed_scaling_factor": r.choice([1.0, 1.5])},
                          layers=first_dense("first_k_dense_replace"))
KNOBS["deepseek_v32"] = Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", head_dim=None,
                              dense_inter="intermediate_size", rope=False, latent=True, groups=True,
                              extra=lambda r: {"n_shared_experts": r.choice([0, 1]), "q_lora_rank": r.choice([12, 20]),
                                               "kv_lora_rank": r.choice([12, 20]),
                                               "qk_nope_head_dim": r.choice([6, 9, 12]),
                                               "qk_rope_head_dim": r.choice([4, 6]), "v_head_dim": r.choice([5, 8, 12]),
                                               "index_topk": r.choice([32, 48]), "index_n_heads": r.choice([1, 2]),
                                               "index_head_dim": r.choice([8, 12])},
                              layers=lambda r, n: {"mlp_layer_types": (["dense"] if n > 1 and coin(r) else ["sparse"])
                                                   + ["sparse"] * (n - 1)})
KNOBS["glm_moe_dsa"] = KNOBS["deepseek_v32"]
KNOBS["llama4_text"] = Knobs(dense_inter="intermediate_size_mlp", max_layers=4,
                             # one expert a token: the only count Llama-4's scaled-input experts come in
                             extra=lambda r: {"num_experts_per_tok": 1, "use_qk_norm": coin(r),
                                              "attention_bias": coin(r), "attn_temperature_tuning": coin(r),
                                              "attention_chunk_size": r.choice([None, 24, 64]),
                                              "floor_scale": r.choice([16, 8192])},
                             layers=lambda r, n: {"interleave_moe_layer_step": r.choice([1, 2]) if n > 1 else 1,
                                                  "no_rope_layers": [r.choice([0, 1, 1]) for _ in range(n)]})
KNOBS["minimax"] = Knobs(max_layers=4,
                         extra=lambda r: {"block_size": r.choice([2, 3, 256]),
                                          **{key: r.choice([1.0, 0.5, 1.75]) for key in (
                                              "full_attn_alpha_factor", "full_attn_beta_factor",
                                              "linear_attn_alpha_factor", "linear_attn_beta_factor",
                                              "mlp_alpha_factor", "mlp_beta_factor")}},
                         layers=lambda r, n: {"layer_types": hybrid_types(r, n, "full_attention", "linear_attention")})
KNOBS["kimi_linear"] = Knobs(expert_inter="moe_intermediate_size", head_dim=None, dense_inter="intermediate_size",
                             rope=False, latent=True, groups=True, max_layers=4,
                             extra=lambda r: {"pad_token_id": None, "n_shared_experts": r.choice([0, 1]),
                                              "norm_topk_prob": coin(r), "q_lora_rank": r.choice([None, 20]),
                                              "kv_lora_rank": r.choice([12, 20]), "qk_nope_head_dim": r.choice([6, 9]),
                                              "qk_rope_head_dim": r.choice([4, 6]), "v_head_dim": r.choice([5, 8]),
                                              "linear_head_dim": r.choice([6, 9, 16]),
                                              "linear_num_heads": r.choice([1, 2, 3]),
                                              "linear_conv_kernel_dim": r.choice([2, 4])},
                             layers=lambda r, n: {"layer_types": hybrid_types(r, n, "full_attention", "linear_attention"),
                                                  "mlp_layer_types": (["dense"] if n > 1 and coin(r) else ["sparse"])
                                                  + ["sparse"] * (n - 1)})
KNOBS["mimo_v2_flash"] = Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", groups=True,
                               dense_inter="intermediate_size", max_layers=4,
                               extra=lambda r: {"v_head_dim": r.choice([5, 8, 12, 16]), "attention_bias": coin(r),
                                                "attention_value_scale": r.choice([0.707, 1.0, None]),
                                                "sliding_window": r.choice([3, 5, 64]), "norm_topk_prob": coin(r),
                                                "rope_parameters": {kind: {"rope_type": "default",
                                                                           "rope_theta": r.choice([1e4, 5e6]),
                                                                           "partial_rotary_factor": r.choice([0.334, 0.5, 1.0])}
                                                                    for kind in ("full_attention", "sliding_attention")}},
                               layers=lambda r, n: {"layer_types": hybrid_types(r, n, "sliding_attention", "full_attention"),
                                                    "mlp_layer_types": [r.choice(["dense", "sparse"]) for _ in range(n - 1)]
                                                    + ["sparse"]})
def nemotron_blocks(r: random.Random, n: int) -> list[str]:
    """n Nemotron-H block types: a mixer block first (as every released model; transformers 5.25's generate
    reads the cache's length from the first block, which an MLP block has none of), then at least one MoE,
    and an attention block somewhere."""
    n = max(n, 2)  # the block count is the list's (num_hidden_layers is ignored)
    types = [r.choice(["linear_attention", "full_attention"])]
    types += [r.choice(["linear_attention", "full_attention", "moe", "mlp"]) for _ in range(n - 1)]
    if "moe" not in types:
        types[r.randrange(1, n)] = "moe"
    if "full_attention" not in types:  # transformers' masks need an attention block (every released model has some)
        types[0] = "full_attention"
    return types


def nemotron_extra(r: random.Random) -> dict:
    heads = r.choice([1, 2, 3, 4])
    return {"mamba_num_heads": heads, "mamba_head_dim": r.choice([4, 6, 8]), "ssm_state_size": r.choice([4, 8, 16]),
            "n_groups": r.choice([g for g in (1, 2, 3, 4) if heads % g == 0]), "conv_kernel": r.choice([2, 3, 4]),
            "moe_shared_expert_intermediate_size": r.choice([0, 12, 20]), "norm_topk_prob": coin(r),
            "routed_scaling_factor": r.choice([1.0, 2.5]), "moe_latent_size": r.choice([None, None, 12, 20])}


KNOBS["nemotron_h"] = Knobs(experts="n_routed_experts", expert_inter="moe_intermediate_size", groups=True,
                            dense_inter="intermediate_size", rope=False, max_layers=5, extra=nemotron_extra,  # 1: a MoE
                            layers=lambda r, n: {"layers_block_type": nemotron_blocks(r, n)})
# Model types that load as another family: that family's knobs
KNOBS.update(param2moe=KNOBS["glm4_moe"], sarvam_moe=KNOBS["glm4_moe"], sarvam_mla=KNOBS["deepseek_v3"],
             llama4=KNOBS["llama4_text"], qwen3_5_moe=KNOBS["qwen3_5_moe_text"])
# Families left out of the sweep, with why (tested by their fixed cases in conftest.CASES):
# - qwen3_5_moe is qwen3_5_moe_text's language model inside the multimodal checkpoint: the same graphs.
# - dbrx keeps its sizes in nested attn_config / ffn_config: see dbrx_overrides.
# - deepseek_v2 rotates q's RoPE part as complex numbers: transformers needs an even qk_nope_head_dim.
SWEPT = sorted([*KNOBS, "dbrx"])


def head_shape(r: random.Random, knobs: Knobs) -> tuple[int, int, int]:
    """(heads, kv heads, head size): sizes off 8, odd where no RoPE rotates a whole head."""
    heads = r.choice([1, 2, 3, 4, 5, 6])
    kv = heads if knobs.latent else r.choice([1, heads, *(d for d in range(1, heads + 1) if heads % d == 0)])

    # off 8 (the fused attention's limit) and on 8 and 16 (the fused attention, its own RoPE, decode steps)
    sizes = [4, 6, 10, 12, 14, 18, 20, 22, 26, 8, 16, 24, 32, 48] + ([] if knobs.rope else [5, 7, 9, 11, 13])
    return heads, kv, r.choice(sizes)


def routing(r: random.Random, family: str, knobs: Knobs) -> tuple[int, int, dict]:
    """(experts, top-k, grouped-routing keys): counts that are not powers of two, top-1 and top-all."""
    if knobs.groups:
        groups, size = r.choice([1, 2, 3]), r.choice([2, 3])
        experts, kept = groups * size, r.randint(1, groups)
        top_k = r.choice([1, kept * size, r.randint(1, kept * size)])
        return experts, top_k, {"n_group": groups, "topk_group": kept}
    experts = r.choice([2, 3, 5, 6, 7, 9, 12])
    if family == "phimoe":  # sparsemixer is defined for top-2 only (transformers and Fate alike)
        return experts, 2, {}
    return experts, r.choice([1, experts, r.randint(1, experts)]), {}


def random_overrides(family: str, seed: int) -> dict:
    r = random.Random(f"{family}/{seed}")
    if family == "dbrx":
        return dbrx_overrides(r)
    knobs = KNOBS[family]
    heads, kv, d = head_shape(r, knobs)
    experts, top_k, groups = routing(r, family, knobs)
    layers = r.randint(1, knobs.max_layers)
    out = {"num_attention_heads": heads, "num_key_value_heads": kv, knobs.experts: experts, knobs.top_k: top_k,
           knobs.expert_inter: r.choice([6, 12, 20, 36, 44]), "num_hidden_layers": layers,
           "vocab_size": r.choice([VOCAB, VOCAB + 1, VOCAB + 37]), "tie_word_embeddings": coin(r), **groups}
    if knobs.head_dim:
        out[knobs.head_dim] = d
        out["hidden_size"] = r.choice([36, 44, 52, 60, 72, 80, 90])
    else:
        out["hidden_size"] = heads * d if heads * d >= 16 else heads * d * 4  # too small a model is not one
        if heads * d < 16:
            out["num_attention_heads"], out["num_key_value_heads"] = heads * 4, kv * 4 if kv < heads else heads * 4
    if knobs.dense_inter:
        out[knobs.dense_inter] = r.choice([20, 36, 52])
    if knobs.layers:
        out.update(knobs.layers(r, layers))
    out.update(knobs.extra(r))
    if family == "hunyuan_v1_moe" and layers > 1 and coin(r):  # a top-k per layer
        out["moe_topk"] = [r.randint(1, experts) for _ in range(layers)]
    if family == "minimax_m2":
        out["rotary_dim"] = r.choice([2, d // 2 * 2, max(2, d // 4 * 2)])
    if family == "mimo_v2_flash" and heads % (2 * kv):  # the sliding layers cache twice the key-value heads
        out["num_attention_heads"] = 2 * heads
    if family == "granitemoehybrid":
        out["mamba_expand"] = 2
        out["mamba_n_heads"] = r.choice([h for h in (1, 2, 3, 4, 6) if 2 * out["hidden_size"] % h == 0])
        out["mamba_d_head"] = 2 * out["hidden_size"] // out["mamba_n_heads"]
        if out["mamba_n_heads"] % out["mamba_n_groups"]:
            out["mamba_n_groups"] = 1
    return out


def dbrx_overrides(r: random.Random) -> dict:
    heads = r.choice([1, 2, 3, 4, 5])
    kv = r.choice([d for d in range(1, heads + 1) if heads % d == 0])
    d = r.choice([6, 10, 12, 20])
    experts = r.choice([3, 5, 6, 7])
    return {"d_model": heads * d, "n_heads": heads, "n_layers": r.randint(1, 3), "vocab_size": r.choice([VOCAB, 353]),
            "tie_word_embeddings": False,
            "attn_config": {"kv_n_heads": kv, "clip_qkv": r.choice([0.8, 8.0]), "rope_theta": 10000.0},
            "ffn_config": {"ffn_hidden_size": r.choice([12, 20, 36]), "moe_num_experts": experts,
                           "moe_top_k": r.choice([1, experts, r.randint(1, experts)])}}


# December's regression: four heads of 20 (hidden 80), which GroupQueryAttention refuses
def head_20(family: str) -> dict:
    if family == "dbrx":
        return {"d_model": 80}
    knobs = KNOBS[family]
    return {"hidden_size": 80, **({knobs.head_dim: 20} if knobs.head_dim else {})}
