"""The artifact format: manifest schema, file layout, atomic writing, checked reading."""

from .errors import ArtifactError, FateError, GenerationError, ModelError
from .schema import (
    SCHEMA_VERSION,
    DecodeStep,
    ExpertLayout,
    FileEntry,
    GenerationDefaults,
    HeadStep,
    LayerPolicy,
    LayerSpec,
    Manifest,
    ModelSpec,
    Policy,
    RoutingSpec,
    StateSpec,
    TensorView,
    TokenizerSpec,
)
from .store import Artifact, ArtifactWriter, pack_artifact, unpack_artifact

__all__ = [
    "SCHEMA_VERSION", "Artifact", "ArtifactError", "ArtifactWriter", "DecodeStep", "ExpertLayout", "FateError", "FileEntry",
    "GenerationDefaults", "GenerationError", "HeadStep", "LayerPolicy", "LayerSpec", "Manifest", "ModelError", "ModelSpec",
    "Policy", "RoutingSpec", "StateSpec", "TensorView", "TokenizerSpec", "pack_artifact", "unpack_artifact",
]
