"""Text files a user hands a command (prompts, calibration and evaluation text): read whole, as
UTF-8, or refused in one line. Shared by the compiler and the runtime."""

from __future__ import annotations

from pathlib import Path

from .errors import FateError


def read_text_file(path: Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FateError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise FateError(f"cannot read {what} {path}: {e.strerror or e}") from None
