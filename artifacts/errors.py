"""Typed errors for users. The CLIs print any FateError as one line and exit non-zero;
anything else is a bug and keeps its traceback."""


class FateError(Exception):
    """Base of every error a user can cause (bad input, bad artifact, bad budget)."""


class ArtifactError(FateError):
    """An artifact (directory or archive) is missing, incomplete, corrupt or of an unknown format."""


class ModelError(FateError):
    """A Hugging Face checkpoint cannot be compiled: unsupported, incomplete or inconsistent."""


class GenerationError(FateError):
    """A generation request cannot be served (prompt too long, no chat template, ...)."""
