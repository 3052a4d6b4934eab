"""MiniMax-Text-01 (MiniMaxForCausalLM): a hybrid of lightning attention (linear attention whose state
decays by a fixed rate per head: `slope_rate`, stored with the checkpoint) and softmax attention with RoPE
over the whole head (transformers ignores a partial factor here), from `layer_types`; Mixtral's MoE in every
layer. Each block adds its output to its own normed input, not to the stream: h = alpha * norm(x) +
beta * block(norm(x)), with alpha and beta per kind of mixer (`full_attn_*`, `linear_attn_*`) and for the
MoE (`mlp_*`; the routed experts' beta is their routed scaling)."""

from dataclasses import replace


from .base import LAYER as L, Block, Family, Lightning, Mixers, Role, check_finite, mixers_of_types, optional
from .mixtral import FAMILY as MIXTRAL
from .mixtral import read_config as read_mixtral_config

MIXER_OF_TYPE = {"full_attention": "attention", "linear_attention": "lightning"}


def factor(cfg: dict, key: str) -> float:
    value = float(optional(cfg, key, 1.0, (int, float)))
    check_finite(**{key: value})  # named by its key (Block checks the factors again, by their place)
    return value


def read_config(cfg: dict):
    params = {k: v for k, v in (cfg.get("rope_parameters") or {}).items() if k != "partial_rotary_factor"} \
        if isinstance(cfg.get("rope_parameters"), dict) else cfg.get("rope_parameters")
    whole_head = {k: v for k, v in cfg.items() if k not in ("partial_rotary_factor", "rotary_dim")}
    arch = read_mixtral_config({**whole_head, "rope_parameters": params} if params is not None else whole_head)
    layers = arch.num_layers
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(layers)]
    mixers = mixers_of_types(types, MIXER_OF_TYPE, layers)
    kinds = {"attention": (factor(cfg, "full_attn_alpha_factor"), factor(cfg, "full_attn_beta_factor")),
             "lightning": (factor(cfg, "linear_attn_alpha_factor"), factor(cfg, "linear_attn_beta_factor"))}
    alpha, beta = factor(cfg, "mlp_alpha_factor"), factor(cfg, "mlp_beta_factor")
    return replace(arch, mixers=Mixers(kinds=mixers, lightning=Lightning(arch.num_heads, arch.head_dim)),
                   block=Block(from_norm=True, mixer_factors=tuple(kinds[m] for m in mixers), mlp_factors=(alpha, beta)),
                   routing=replace(arch.routing, routed_scaling=arch.routing.routed_scaling * beta))


ATTN = L + ".self_attn"
FAMILY = Family(
    model_type="minimax",
    architecture="MiniMaxForCausalLM",
    read_config=read_config,
    tensors={
        **MIXTRAL.tensors,
        Role.LIGHTNING_QKV: ATTN + ".qkv_proj.weight",
        Role.LIGHTNING_GATE: ATTN + ".output_gate.weight",
        Role.LIGHTNING_NORM: ATTN + ".norm.weight",
        Role.LIGHTNING_OUT: ATTN + ".out_proj.weight",
        Role.LIGHTNING_SLOPE: ATTN + ".slope_rate",
    },
    # the block form's decay tables, derived from slope_rate (the recurrence Fate runs needs only it)
    skip=MIXTRAL.skip + (ATTN.replace("{layer}", r"\d+").replace(".", r"\.") + r"\.(query|key|diagonal)_decay",),
)
