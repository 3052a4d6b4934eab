"""fate-run: generation from a Fate artifact with onnxruntime and numpy (no torch)."""

from .api import Completion, Engine
from .experts.offload import OffloadedExperts, OffloadOptions
from .experts.store import ExpertStore, ResidentExperts
from .generate import GenerationResult, GenerationStats, SamplingConfig, generate, stream_tokens
from .model import FateModel
from .options import EngineOptions
from .sessions import ort  # noqa: F401 - first: onnxruntime loaded before anything else imports it, quietly
from .state import KVCache

__all__ = ["Completion", "Engine", "EngineOptions", "ExpertStore", "FateModel", "GenerationResult", "GenerationStats",
           "KVCache", "OffloadOptions", "OffloadedExperts", "ResidentExperts", "SamplingConfig", "generate", "stream_tokens"]
