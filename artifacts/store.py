"""Reading and writing artifact directories.

Writing is atomic: files go into a hidden temporary directory beside the target, the manifest
is written last, and one rename makes the artifact appear. An interrupted compile leaves no
directory that looks like a valid artifact (the temporary one carries no manifest.json until
the very end and is removed on failure).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import layout
from .errors import ArtifactError
from .schema import FileEntry, Manifest, SCHEMA_VERSION, manifest_from_json, safe_relpath, to_json_dict

MAX_MANIFEST_BYTES = 64 << 20


def fate_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fate")
    except PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactWriter:
    """Collects files for a new artifact; `commit(manifest_without_files)` publishes it.

    Use as a context manager: leaving the block by an exception removes everything written.
    """

    def __init__(self, out_dir: Path, force: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not force:
            if not self.out_dir.is_dir() or any(self.out_dir.iterdir()):
                raise ArtifactError(f"{self.out_dir} already exists and is not empty (use --force to replace it)")
        self.force = force
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
        self.entries: dict[str, FileEntry] = {}

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_bytes(self, relpath: str, data: bytes) -> FileEntry:
        safe_relpath(relpath)
        if relpath in self.entries:
            raise ArtifactError(f"artifact writer: {relpath} written twice")
        target = self.tmp / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        entry = FileEntry(relpath, len(data), hashlib.sha256(data).hexdigest())
        self.entries[relpath] = entry
        return entry

    def copy_file(self, relpath: str, source: Path) -> FileEntry:
        return self.write_bytes(relpath, Path(source).read_bytes())

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest (with the file list filled in) last, then move into place."""
        files = [self.entries[p] for p in sorted(self.entries)]
        manifest = dataclasses.replace(manifest, files=files, schema_version=SCHEMA_VERSION, fate_version=fate_version())
        manifest.validate()
        text = json.dumps(to_json_dict(manifest), indent=1) + "\n"
        (self.tmp / layout.MANIFEST).write_text(text)
        if self.out_dir.exists():
            trash = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.rename(self.out_dir, trash)
            os.rename(self.tmp, self.out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out_dir)
        return self.out_dir


class Artifact:
    """An artifact directory opened for reading: a validated manifest plus checked file access."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self._entries = {f.path: f for f in manifest.files}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Artifact":
        root = Path(path)
        if not root.is_dir():
            raise ArtifactError(f"{root} is not an artifact directory")
        manifest_path = root / layout.MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{root} has no {layout.MANIFEST}: not a Fate artifact, or an unfinished compile")
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{manifest_path} is implausibly large")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{manifest_path} is not valid JSON: {e}") from None
        manifest = manifest_from_json(data)
        artifact = cls(root, manifest)
        for entry in manifest.files:
            artifact.path(entry.path)  # refuses paths outside the artifact
        return artifact

    def path(self, relpath: str) -> Path:
        """The on-disk path of a listed file, checked to exist with the listed size."""
        safe_relpath(relpath)
        entry = self._entries.get(relpath)
        if entry is None:
            raise ArtifactError(f"{relpath} is not listed in the manifest of {self.root}")
        full = self.root / relpath
        if full.is_symlink() or not full.is_file():
            raise ArtifactError(f"{full} is missing")
        size = full.stat().st_size
        if size != entry.size:
            raise ArtifactError(f"{full} has {size} bytes, the manifest says {entry.size} (truncated or changed)")
        return full

    def read_bytes(self, relpath: str, verify: bool = True) -> bytes:
        """A file's bytes; with `verify`, checked against the manifest's SHA-256."""
        data = self.path(relpath).read_bytes()
        entry = self._entries[relpath]
        if len(data) != entry.size:
            raise ArtifactError(f"{self.root / relpath} changed while being read")
        if verify and hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ArtifactError(f"{self.root / relpath} fails its SHA-256 check (corrupt or modified)")
        return data

    def replace_manifest(self, manifest: Manifest) -> None:
        """Swap in a new manifest (e.g. a re-planned policy) for the same files, atomically."""
        if manifest.files != self.manifest.files:
            raise ArtifactError("a replaced manifest must list the same files")
        manifest.validate()
        tmp = self.root / f".{layout.MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(to_json_dict(manifest), indent=1) + "\n")
        os.replace(tmp, self.root / layout.MANIFEST)
        self.manifest = manifest

    def verify(self) -> list[str]:
        """Every problem with the listed files, one line each; empty when all is well."""
        problems = []
        for entry in self.manifest.files:
            try:
                full = self.path(entry.path)
                if sha256_file(full) != entry.sha256:
                    problems.append(f"{entry.path}: SHA-256 mismatch")
            except ArtifactError as e:
                problems.append(str(e))
        return problems
