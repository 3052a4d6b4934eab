"""Typed errors for users. The CLIs print any FateError or OSError as one line and exit non-zero
(`exit_with`); anything else is a bug and keeps its traceback."""

import os
import sys
from typing import NoReturn


class FateError(Exception):
    """Base of every error a user can cause (bad input, bad artifact, bad budget)."""


class ArtifactError(FateError):
    """An artifact (directory or archive) is missing, incomplete, corrupt or of an unknown format."""


class ModelError(FateError):
    """A Hugging Face checkpoint cannot be compiled: unsupported, incomplete or inconsistent."""


class GenerationError(FateError):
    """A generation request cannot be served (prompt too long, no chat template, ...)."""


# What a command may end with on bad input or a failing system (a full disk, a read-only folder, a
# file deleted under it): one line, never a traceback.
USER_ERRORS = (FateError, OSError)


def exit_with(command: str, error: BaseException) -> NoReturn:
    """Print `command: error: ...` (a FateError's message, or an OSError's file and reason) and exit 1."""
    if isinstance(error, BrokenPipeError):  # the reader went away (`| head`): nothing to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        message = f"{where}{error.strerror or error}"
    else:
        message = str(error)
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
