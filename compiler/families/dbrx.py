"""DBRX (DbrxForCausalLM): LayerNorm without bias, q/k/v in one projection clamped to `clip_qkv`,
softmax top-k with the weights renormalized (`moe_normalize_expert_weights` = 1, the L1 norm),
and experts stacked per layer as w1 (gate), v1 (up) and w2 (down, transposed), each [E * I, H]."""

from dataclasses import replace
from typing import Any

from fate.artifacts import ModelError

from .base import ArchConfig, Attention, Family, Role, common_fields, optional, require
from .base import Routing
from .layouts import FusedExperts, QKVRows

L = "transformer.blocks.{layer}"


def sub(cfg: dict, key: str) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise ModelError(f"config.json: {key} must be an object")
    return value


def read_config(cfg: dict) -> ArchConfig:
    attn, ffn = sub(cfg, "attn_config"), sub(cfg, "ffn_config")
    act = ffn.get("ffn_act_fn") or {"name": "silu"}
    if not isinstance(act, dict) or act.get("name", "silu") != "silu":
        raise ModelError(f"config.json: ffn_act_fn {act!r} is not supported (only silu)")
    p = ffn.get("moe_normalize_expert_weights", 1)
    if p not in (None, 1, 1.0):
        raise ModelError(f"config.json: moe_normalize_expert_weights {p!r} is not supported (only 1 or none)")
    if ffn.get("moe_jitter_eps"):
        raise ModelError("config.json: moe_jitter_eps is a training-time setting that changes routing; not supported")
    heads = require(cfg, "n_heads")
    common = common_fields({
        **cfg, "hidden_size": require(cfg, "d_model"), "num_attention_heads": heads,
        "num_hidden_layers": require(cfg, "n_layers"), "max_position_embeddings": require(cfg, "max_seq_len"),
        "num_key_value_heads": optional(attn, "kv_n_heads", heads), "rms_norm_eps": 1e-5,
        "rope_theta": optional(attn, "rope_theta", 10000.0, (int, float))})
    common["norms"] = replace(common["norms"], kind="layer")
    clip = attn.get("clip_qkv")
    return ArchConfig(
        **common,
        routing=Routing(num_experts=require(ffn, "moe_num_experts"), top_k=require(ffn, "moe_top_k"),
                        normalize_top_k=p is not None),
        moe_intermediate_size=require(ffn, "ffn_hidden_size"),
        dense_intermediate_size=0,
        shared_intermediate_size=0,
        moe_layers=frozenset(range(common["num_layers"])),
        attention=Attention(sliding_window=None, clip_qkv=float(clip) if clip is not None else None),
    )


FAMILY = Family(
    model_type="dbrx",
    architecture="DbrxForCausalLM",
    read_config=read_config,
    tensors={
        Role.EMBED: "transformer.wte.weight",
        Role.FINAL_NORM: "transformer.norm_f.weight",
        Role.LM_HEAD: "lm_head.weight",
        Role.ATTN_NORM: L + ".norm_attn_norm.norm_1.weight",
        Role.MLP_NORM: L + ".norm_attn_norm.norm_2.weight",
        Role.Q: L + ".norm_attn_norm.attn.Wqkv.weight",
        Role.K: L + ".norm_attn_norm.attn.Wqkv.weight",
        Role.V: L + ".norm_attn_norm.attn.Wqkv.weight",
        Role.O: L + ".norm_attn_norm.attn.out_proj.weight",
        Role.ROUTER: L + ".ffn.router.layer.weight",
        Role.EXPERTS_GATE_UP: L + ".ffn.experts.mlp.w1",
        Role.EXPERTS_UP: L + ".ffn.experts.mlp.v1",
        Role.EXPERTS_DOWN: L + ".ffn.experts.mlp.w2",
    },
    layouts=(QKVRows(), FusedExperts("stacked")),
)
