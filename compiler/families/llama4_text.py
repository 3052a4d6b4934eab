"""Llama-4's text model (Llama4ForCausalLM): Llama attention with RoPE on adjacent pairs, a weightless
RMSNorm over each head of the rotated q and k, and every `no_rope_layer_interval`-th layer without
positions (`no_rope_layers` lists 1 for the layers that rotate: transformers' name says the opposite);
MoE layers (`moe_layers`, else every `interleave_moe_layer_step`-th) whose one expert a token runs on the
input times the sigmoid of its router logit, unweighed after, beside a shared expert; the other layers a
dense MLP of `intermediate_size_mlp`. Experts stored fused as gate_up [E, H, 2I] and down [E, I, H].

Two position rules Fate does not compute are exact identities within a context, which is capped there:
the rotating layers attend within chunks of `attention_chunk_size` tokens (one chunk: plain causal
attention), and with `attn_temperature_tuning` the other layers scale each query by
1 + attn_scale * log(1 + floor((position + 1) / floor_scale)), which is 1 below position floor_scale - 1."""

from .base import (
    Attention,
    ATTENTION_BIASES,
    LAYER as L,
    STANDARD_SKIP,
    STANDARD_TENSORS,
    ArchConfig,
    Family,
    Role,
    Routing,
    common_fields,
    layer_set,
    optional,
    require,
)
from .layouts import FusedExperts
from fate.artifacts import ModelError


def read_config(cfg: dict) -> ArchConfig:
    common = common_fields(cfg)
    layers = common["num_layers"]
    interval = optional(cfg, "no_rope_layer_interval", 4)
    rotates = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
    if not isinstance(rotates, list) or len(rotates) != layers or any(r not in (0, 1) for r in rotates):
        raise ModelError(f"config.json: no_rope_layers must give 0 or 1 for each of the {layers} layers, got {rotates!r}")
    step = optional(cfg, "interleave_moe_layer_step", 1)
    if step < 1:
        raise ModelError(f"config.json: interleave_moe_layer_step must be >= 1, got {step}")
    moe = layer_set(cfg, "moe_layers") if cfg.get("moe_layers") is not None else set(range(step - 1, layers, step))
    context = common["max_positions"]
    chunk = optional(cfg, "attention_chunk_size", None)
    if chunk is not None and any(rotates):  # one chunk: every token attends to all before it
        context = min(context, chunk)
    if cfg.get("attn_temperature_tuning", True) and not all(rotates):  # the query scale is 1 below there
        context = min(context, optional(cfg, "floor_scale", 8192) - 1)
    if context < 1:
        raise ModelError(f"config.json: attention_chunk_size {chunk} and floor_scale leave no context")
    common["max_positions"] = context
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(cfg, "num_local_experts"), top_k=require(cfg, "num_experts_per_tok"),
                        normalize_top_k=False, scoring="sigmoid", scaled_input=True),
        moe_intermediate_size=require(cfg, "intermediate_size"),
        dense_intermediate_size=optional(cfg, "intermediate_size_mlp", 0) if len(moe) < layers else 0,
        shared_intermediate_size=require(cfg, "intermediate_size"),
        moe_layers=frozenset(moe),
        attention=Attention(qk_norm="unit" if cfg.get("use_qk_norm", True) else "none",
                            qk_norm_after_rope=bool(cfg.get("use_qk_norm", True))),
    ).with_positions(interleaved=True, nope_layers=frozenset(i for i, r in enumerate(rotates) if not r))


FF = L + ".feed_forward"
FAMILY = Family(
    model_type="llama4_text",
    architecture="Llama4ForCausalLM",
    read_config=read_config,
    tensors={
        **STANDARD_TENSORS,
        **ATTENTION_BIASES,
        Role.ROUTER: FF + ".router.weight",
        Role.EXPERTS_GATE_UP: FF + ".experts.gate_up_proj",
        Role.EXPERTS_DOWN: FF + ".experts.down_proj",
        Role.SHARED_GATE: FF + ".shared_expert.gate_proj.weight",
        Role.SHARED_UP: FF + ".shared_expert.up_proj.weight",
        Role.SHARED_DOWN: FF + ".shared_expert.down_proj.weight",
        Role.DENSE_GATE: FF + ".gate_proj.weight",
        Role.DENSE_UP: FF + ".up_proj.weight",
        Role.DENSE_DOWN: FF + ".down_proj.weight",
    },
    skip=STANDARD_SKIP,
    layouts=(FusedExperts("columns"),),
)
