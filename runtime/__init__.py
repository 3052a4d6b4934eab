"""fate-run: generation from a Fate artifact with onnxruntime and numpy (no torch).

Names load on first use (PEP 562), so that `import fate.runtime.entry` (every command's entry point)
and the light commands start without onnxruntime."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Completion": "api", "Engine": "api", "ExpertStore": "experts", "ResidentExperts": "experts",
    "GenerationResult": "generate", "GenerationStats": "generate", "SamplingConfig": "generate",
    "generate": "generate", "stream_tokens": "generate", "FateModel": "model", "KVCache": "model",
    "OffloadedExperts": "offload", "OffloadOptions": "offload",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
