"""fate-compile: a Hugging Face MoE checkpoint -> a Fate artifact."""

from .export import CompileOptions, compile_checkpoint

__all__ = ["CompileOptions", "compile_checkpoint"]
