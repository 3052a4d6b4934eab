"""What to do with the files people already have: one line each, for a path that is not what a
command takes (a GGUF file, a Hugging Face repo id, a checkpoint given where an artifact goes, an
artifact given where a checkpoint goes). Fate itself downloads nothing."""

from __future__ import annotations

import re
from pathlib import Path

DOWNLOAD = "huggingface-cli download {repo} --local-dir {folder}"


def _folder(repo: str) -> str:
    return repo.rsplit("/", 1)[-1]


def gguf(path: Path) -> str | None:
    if path.suffix.lower() != ".gguf":
        return None
    return (f"{path} is a GGUF file (llama.cpp's format); Fate compiles Hugging Face safetensors checkpoints: "
            f"download the original model ({DOWNLOAD.format(repo='ORG/NAME', folder='NAME')}), then fate-compile "
            "NAME -o NAME.fate")


def repo_id(path: Path, text: str) -> str | None:
    if path.exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) or text.startswith(("./", "../")):
        return None
    return (f"{text} is not a local path; if it is a Hugging Face repo id, download it first (Fate downloads "
            f"nothing): {DOWNLOAD.format(repo=text, folder=_folder(text))}, then fate-compile {_folder(text)} "
            f"-o {_folder(text)}.fate")


def for_artifact(text: str) -> str | None:
    """Why `text` is not an artifact, when what it is can be told; None otherwise."""
    path = Path(text)
    hint = gguf(path) or repo_id(path, text)
    if hint:
        return hint
    if path.is_dir() and (path / "config.json").is_file() and not (path / "manifest.json").exists():
        return (f"{path} is a Hugging Face checkpoint, not a Fate artifact: compile it first: "
                f"fate-compile {path} -o {path.name}.fate")
    return None


def for_checkpoint(text: str) -> str | None:
    """Why `text` is not a checkpoint fate-compile takes, when what it is can be told."""
    path = Path(text)
    hint = gguf(path) or repo_id(path, text)
    if hint:
        return hint
    if path.is_dir() and (path / "manifest.json").is_file() and not (path / "config.json").exists():
        return f"{path} is already a Fate artifact: run it (fate-run {path}) or look at it (fate-inspect {path})"
    return None
