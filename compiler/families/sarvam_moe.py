"""Sarvam-MoE (sarvamai/sarvam-30b): transformers loads `sarvam_moe` checkpoints with GLM-4.5's classes
(Glm4MoeForCausalLM), undoing on load what differs in the checkpoint, which this table reads as it is:
the original tensor names (`word_embeddings`, `attention.dense`, `query_layernorm`/`key_layernorm`, the
router's `expert_bias`) and q, k and v in one `query_key_value` tensor (and bias), rows [q | k | v]. Its
config class turns on q/k norms and rotates the whole head by default, and the original config's own key
names read as GLM's."""

from .base import LAYER as L, Role
from .glm4_moe import FAMILY as GLM
from .layouts import QKVRows

QKV = L + ".attention.query_key_value"

FAMILY = GLM.loaded_as(
    {"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts",
     "use_qkv_bias": "attention_bias", "num_mtp_layers": "num_nextn_predict_layers"},
    defaults={"use_qk_norm": True, "partial_rotary_factor": 1.0},
    tensors={Role.EMBED: "model.word_embeddings.weight",
             Role.Q: QKV + ".weight", Role.K: QKV + ".weight", Role.V: QKV + ".weight",
             Role.Q_BIAS: QKV + ".bias", Role.K_BIAS: QKV + ".bias", Role.V_BIAS: QKV + ".bias",
             Role.O: L + ".attention.dense.weight",
             Role.Q_NORM: L + ".attention.query_layernorm.weight", Role.K_NORM: L + ".attention.key_layernorm.weight",
             Role.ROUTER_SCORE_BIAS: L + ".mlp.gate.expert_bias"},
    layouts=(QKVRows(),))
