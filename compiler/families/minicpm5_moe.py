"""MiniCPM-5-MoE (MiniCPM5MoeForCausalLM): Llama attention whose q_proj yields, per head, the query and
an output gate (the attention's output times the gate's sigmoid before o_proj, as Qwen3-Next's gated
attention), RoPE over the whole head, no q/k norms; DeepSeek-V3's sigmoid routing (correction bias,
groups, renormalized, routed scaling) with shared experts, in GLM's layout; dense and MoE layers listed
per layer in `mlp_layer_types` (by default the first dense)."""

from dataclasses import replace

from fate.artifacts import ModelError

from .base import Family, Role, require
from .glm4_moe import FAMILY as GLM
from .glm4_moe import read_config as read_glm_config
from .layouts import QueryWithGate


def read_config(cfg: dict):
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1)
    if not isinstance(types, list) or len(types) != layers or not set(types) <= {"dense", "sparse"}:
        raise ModelError(f"config.json: mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers")
    if cfg.get("attention_bias"):  # a bias over the query and gate rows: not in Fate's layout of q_proj
        raise ModelError("config.json: attention_bias = true is not supported for minicpm5_moe (its q_proj also "
                         "yields the output gate)")
    if cfg.get("use_gated_attention") is False:  # transformers refuses it as well
        raise ModelError("config.json: use_gated_attention = false is not a MiniCPM-5-MoE checkpoint")
    arch = read_glm_config({**cfg, "first_k_dense_replace": 0, "use_qk_norm": False, "num_nextn_predict_layers": 0})
    return replace(arch, moe_layers=frozenset(i for i, t in enumerate(types) if t == "sparse"),
                   attention=replace(arch.attention, output_gate=True))


FAMILY = Family(
    model_type="minicpm5_moe",
    architecture="MiniCPM5MoeForCausalLM",
    read_config=read_config,
    tensors={**{role: name for role, name in GLM.tensors.items()
                if role not in (Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS, Role.Q_NORM, Role.K_NORM)},
             Role.Q_GATE: GLM.tensors[Role.Q]},
    skip=GLM.skip,
    layouts=(QueryWithGate(),),
)
