"""What Fate reads that it did not write: text files a user hands a command (prompts, calibration
and evaluation text) and JSON from checkpoints and artifacts. Read whole, checked, or refused in one
line. Shared by the compiler and the runtime."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import FateError

T = TypeVar("T")
_STDERR = threading.RLock()


def with_stderr_held(call: Callable[[], T], keep: bool = True) -> T:
    """call() with file descriptor 2 written to a temporary file, not the terminal: libraries that
    print from native code (a Rust panic's message and backtrace, onnxruntime's warnings) cannot be
    reached otherwise. What they wrote goes on to stderr afterwards when the call returned and `keep`
    says so; when it raised, the caller reports the error in one line, and their lines are dropped.
    Calls are serialized (file descriptor 2 is the process's); what other threads write meanwhile
    shares the fate of the call's own lines (delayed, or dropped)."""
    with _STDERR:
        try:
            sys.stderr.flush()
            held = tempfile.TemporaryFile()
        except (OSError, ValueError):  # no stderr to flush, or nowhere to hold it: run the call as it is
            return call()
        try:
            saved = os.dup(2)
        except OSError:  # stderr closed: nothing can reach it either
            held.close()
            return call()
        with held:
            os.dup2(held.fileno(), 2)
            try:
                result = call()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            if keep:
                held.seek(0)
                written = held.read()
                if written:
                    sys.stderr.buffer.write(written) if hasattr(sys.stderr, "buffer") else \
                        sys.stderr.write(written.decode("utf-8", "replace"))
                    sys.stderr.flush()
    return result


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

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        """An object whose keys repeat is refused: readers disagree on which value wins (Python's
        keeps the last, others the first), so what one tool checks another may not run."""
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise error(f"{where} repeats the key {repeated[:80]!r} in one object")
        return out

    try:
        return json.loads(data.decode("utf-8"), parse_float=number,
                          parse_constant=refuse if finite else None, object_pairs_hook=unique)
    except UnicodeDecodeError as e:
        raise error(f"{where} is not UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply") from None
    except ValueError as e:  # malformed JSON, or an integer past Python's conversion limit
        raise error(f"{where} is not valid JSON: {e}") from None
