"""The registry of model families: one module per Hugging Face `model_type`, imported lazily."""

from __future__ import annotations

import importlib

from fate.artifacts import ModelError

from .base import ArchConfig, Family, Role

# model_type -> module name under fate.compiler.families
_MODULES = {
    "afmoe": "afmoe",
    "cohere2_moe": "cohere2_moe",
    "dbrx": "dbrx",
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "dots1": "dots1",
    "ernie4_5_moe": "ernie4_5_moe",
    "exaone_moe": "exaone_moe",
    "flex_olmo": "flex_olmo",
    "glm4_moe": "glm4_moe",
    "glm4_moe_lite": "glm4_moe_lite",
    "gpt_oss": "gpt_oss",
    "granitemoe": "granitemoe",
    "granitemoe_swa": "granitemoe_swa",
    "granitemoehybrid": "granitemoehybrid",
    "granitemoeshared": "granitemoeshared",
    "lfm2_moe": "lfm2_moe",
    "hunyuan_v1_moe": "hunyuan_v1_moe",
    "jamba": "jamba",
    "minimax_m2": "minimax_m2",
    "mixtral": "mixtral",
    "olmoe": "olmoe",
    "phimoe": "phimoe",
    "qwen2_moe": "qwen2_moe",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_5_moe_text": "qwen3_5_moe_text",
    "qwen3_moe": "qwen3_moe",
    "qwen3_next": "qwen3_next",
    "solar_open": "solar_open",
}


def supported() -> list[str]:
    return sorted(_MODULES)


# What a config names its expert count by, in the families transformers has: a config with none of
# them (itself or its text_config) is a dense model.
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
               "moe_intermediate_size", "expert_interval", "num_moe_experts")


def is_dense(config: dict) -> bool:
    inner = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return not any(k in config or k in inner for k in EXPERT_KEYS)


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in _MODULES:
        archs = config.get("architectures")
        archs = ", ".join(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ""
        archs = archs or "unknown architecture"
        if is_dense(config):
            raise ModelError(f"this is a dense model ({model_type!r}, {archs}): Fate is for Mixture-of-Experts models, "
                             "whose experts it keeps on disk; a dense model runs as it is in llama.cpp or transformers")
        raise ModelError(f"unsupported model type {model_type!r} ({archs}); supported: {', '.join(supported())}")
    return importlib.import_module(f"{__name__}.{_MODULES[model_type]}").FAMILY


__all__ = ["ArchConfig", "Family", "Role", "family_for", "supported"]
