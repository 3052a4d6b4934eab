"""The registry of model families: one module per Hugging Face `model_type`, imported lazily."""

from __future__ import annotations

import importlib
import pkgutil

from fate.artifacts import ModelError

from .base import ArchConfig, Family, Role

# One module per Hugging Face `model_type`, named as it: the registry is the package's files. A module
# whose checkpoints transformers loads as another family's classes holds that family's FAMILY with what
# differs (its config's own names), and nothing else.
_NOT_FAMILIES = {"base", "layouts"}


def _model_types() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_FAMILIES)


def supported() -> list[str]:
    return _model_types()


# What a config names its expert count by, in the families transformers has: a config with none of
# them (itself or its text_config) is a dense model.
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
               "moe_intermediate_size", "expert_interval", "num_moe_experts")


def is_dense(config: dict) -> bool:
    inner = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return not any(k in config or k in inner for k in EXPERT_KEYS)


def family_for(config: dict) -> Family:
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in _model_types():
        archs = config.get("architectures")
        archs = ", ".join(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ""
        archs = archs or "unknown architecture"
        if is_dense(config):
            raise ModelError(f"this is a dense model ({model_type!r}, {archs}): Fate is for Mixture-of-Experts models, "
                             "whose experts it keeps on disk; a dense model runs as it is in llama.cpp or transformers")
        raise ModelError(f"unsupported model type {model_type!r} ({archs}); supported: {', '.join(supported())} "
                         f"(docs/models.md: what the MoE types not yet supported would take)")
    return importlib.import_module(f"{__name__}.{model_type}").FAMILY


__all__ = ["ArchConfig", "Family", "Role", "family_for", "supported"]
