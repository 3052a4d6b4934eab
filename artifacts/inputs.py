"""What Fate reads that it did not write: text files a user hands a command (prompts, calibration
and evaluation text) and JSON from checkpoints and artifacts. Read whole, checked, or refused in one
line. Shared by the compiler and the runtime."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import FateError


def read_text_file(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FateError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise FateError(f"cannot read {what} {path}: {e.strerror or e}") from None


def load_json(data: bytes, where: str, error: type[FateError] = FateError, finite: bool = True) -> Any:
    """JSON from a file Fate did not write itself, or one clear `error`: not UTF-8, malformed,
    nested too deep, integers too long to convert, and (with `finite`) NaN, Infinity or a number
    that overflows to infinity (1e999), which no field of an artifact may hold."""

    def refuse(text: str):
        raise error(f"{where} holds {text}, which is not a finite number")

    def number(text: str) -> float:
        value = float(text)
        if finite and not math.isfinite(value):
            refuse(text)
        return value

    try:
        return json.loads(data.decode("utf-8"), parse_float=number,
                          parse_constant=refuse if finite else None)
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply") from None
    except ValueError as e:  # malformed JSON, or an integer past Python's conversion limit
        raise error(f"{where} is not valid JSON: {e}") from None
