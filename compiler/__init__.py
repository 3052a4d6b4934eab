"""fate-compile: a Hugging Face MoE checkpoint -> a Fate artifact.

Names load on first use (PEP 562): the command's entry point starts before torch is imported."""

from __future__ import annotations

import importlib

__all__ = ["CompileOptions", "compile_checkpoint"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.export"), name)
    globals()[name] = value
    return value
