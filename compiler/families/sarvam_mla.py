"""Sarvam-MLA (sarvamai/sarvam-105b): transformers loads `sarvam_mla` checkpoints with DeepSeek-V3's
classes (DeepseekV3ForCausalLM) and DeepSeek-V3's tensor names: latent attention, sigmoid grouped routing,
shared experts. Only the original config's own key names differ."""

from .deepseek_v3 import FAMILY as DEEPSEEK

FAMILY = DEEPSEEK.loaded_as(
    {"num_experts": "n_routed_experts", "num_local_experts": "n_routed_experts", "num_shared_experts": "n_shared_experts",
     "num_mtp_layers": "num_nextn_predict_layers"})
