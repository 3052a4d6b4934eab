"""The artifact format: manifest schema, file layout, atomic writing, checked reading."""

from .errors import ArtifactError, FateError, GenerationError, ModelError
from .schema import (
    SCHEMA_VERSION,
    FileEntry,
    GenerationDefaults,
    LayerSpec,
    Manifest,
    ModelSpec,
    RoutingSpec,
    TokenizerSpec,
)
from .store import Artifact, ArtifactWriter

__all__ = [
    "SCHEMA_VERSION", "Artifact", "ArtifactError", "ArtifactWriter", "FateError", "FileEntry",
    "GenerationDefaults", "GenerationError", "LayerSpec", "Manifest", "ModelError", "ModelSpec",
    "RoutingSpec", "TokenizerSpec",
]
