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
import time
from pathlib import Path
from typing import Iterable

from . import archive, hints, layout
from .archive import Member
from .checked import CheckedFiles, file_stat
from .graph_check import check_graph
from .inputs import load_json
from .outputs import check_output, current_umask, partial_name, reclaim_stale, trash_path
from .errors import ArtifactError
from .schema import FileEntry, Manifest, SCHEMA_VERSION, manifest_from_json, safe_relpath, to_json_dict




def fate_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fate")
    except PackageNotFoundError:
        return "0+unknown"


class ArtifactWriter:
    """Collects files for a new artifact; `commit(manifest_without_files)` publishes it.

    Use as a context manager: leaving the block by an exception removes everything written.
    """

    def __init__(self, out_dir: Path, inputs: Iterable[Path] = (), force: bool = False):
        """`inputs`: what this write reads (never written over, see outputs.check_output)."""
        self.out_dir = Path(out_dir)
        check_output(self.out_dir, inputs, force, "artifact")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        reclaim_stale(self.out_dir)
        self.tmp = Path(tempfile.mkdtemp(prefix=partial_name(self.out_dir), dir=self.out_dir.parent))
        os.chmod(self.tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the artifact from other users
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
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError as e:  # a full disk says only "No space left on device": name what was being written
            raise ArtifactError(f"cannot write {self.out_dir / relpath}: {e.strerror or e}") from None
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
        return self.publish(manifest_json(manifest))

    def draft(self, manifest: Manifest) -> Path:
        """The artifact as commit would publish it, complete but still in its temporary folder (for the
        compiler to run it before it commits): the folder's path."""
        files = [self.entries[p] for p in sorted(self.entries)]
        manifest = dataclasses.replace(manifest, files=files, schema_version=SCHEMA_VERSION, fate_version=fate_version())
        manifest.validate()
        (self.tmp / layout.MANIFEST).write_bytes(manifest_json(manifest))
        return self.tmp

    def publish(self, manifest_bytes: bytes) -> Path:
        """Write the manifest as given, last, and move the artifact into place."""
        try:
            (self.tmp / layout.MANIFEST).write_bytes(manifest_bytes)
        except OSError as e:
            raise ArtifactError(f"cannot write {self.out_dir / layout.MANIFEST}: {e.strerror or e}") from None
        if self.out_dir.exists():
            trash = trash_path(self.out_dir)
            os.rename(self.out_dir, trash)
            os.rename(self.tmp, self.out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out_dir)
        return self.out_dir


class Artifact:
    """An artifact opened for reading, from a directory or a one-file archive (see archive.py):
    a validated manifest plus checked access to the files it lists."""

    def __init__(self, root: Path, manifest: Manifest, members: dict[str, Member] | None = None,
                 digest: str = ""):
        self.root = root
        self.manifest = manifest
        # The artifact's identity: the SHA-256 of its manifest, which lists every file's SHA-256, so
        # one digest from the publisher checks the whole artifact (the same packed or unpacked).
        self.digest = digest
        self.is_archive = members is not None
        self._members = members
        self._entries = {f.path: f for f in manifest.files}
        # which files earlier runs on this machine hashed as they are now (checked.py); opened: nothing trusted
        self.checked = CheckedFiles("", self._stat_of, {}, 0)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Artifact":
        hint = hints.for_artifact(str(path))
        if hint:
            raise ArtifactError(hint)
        root = Path(path)
        if root.is_file():
            return cls._open_archive(root)
        if not root.is_dir():
            raise ArtifactError(f"{root} is neither an artifact directory nor a {archive.SUFFIX} archive")
        manifest_path = root / layout.MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{root} has no {layout.MANIFEST}: not a Fate artifact, or an unfinished compile")
        if manifest_path.stat().st_size > archive.MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{manifest_path} is implausibly large")
        data = manifest_path.read_bytes()
        opened = time.time_ns()
        artifact = cls(root, _parse_manifest(data, manifest_path), digest=hashlib.sha256(data).hexdigest())
        for entry in artifact.manifest.files:
            artifact.member(entry.path)  # every listed file present, inside, of the listed size
        artifact._remember_checks(opened)
        return artifact

    @classmethod
    def _open_archive(cls, path: Path) -> "Artifact":
        opened = time.time_ns()
        manifest_bytes, members = archive.scan(path)
        artifact = cls(path, _parse_manifest(manifest_bytes, f"{path}:{layout.MANIFEST}"), members,
                       digest=hashlib.sha256(manifest_bytes).hexdigest())
        listed = set(artifact._entries)
        extra = sorted(set(members) - listed)
        if extra:
            raise ArtifactError(f"{path}: member {extra[0]!r} is not listed in the manifest")
        for entry in artifact.manifest.files:
            artifact.member(entry.path)
        artifact._remember_checks(opened)
        return artifact

    def _stat_of(self, relpath: str):
        return file_stat(self.root if self._members is not None else self.root / relpath)

    def _remember_checks(self, opened_ns: int) -> None:
        """Trust the files earlier runs hashed as they are now (checked.py); their stats taken now, after
        `opened_ns`, before any is read."""
        stats = {entry.path: self._stat_of(entry.path) for entry in self.manifest.files}
        self.checked = CheckedFiles(self.digest, self._stat_of, stats, opened_ns)

    def entry(self, relpath: str) -> FileEntry:
        """The manifest's record (size, SHA-256) of a listed file."""
        entry = self._entries.get(relpath)
        if entry is None:
            raise ArtifactError(f"{relpath} is not listed in the manifest of {self.root}")
        return entry

    def member(self, relpath: str) -> Member:
        """Where a listed file's bytes are, checked to exist with the listed size."""
        safe_relpath(relpath)
        entry = self._entries.get(relpath)
        if entry is None:
            raise ArtifactError(f"{relpath} is not listed in the manifest of {self.root}")
        if self._members is not None:
            found = self._members.get(relpath)
            if found is None:
                raise ArtifactError(f"{self.root}:{relpath} is missing from the archive")
            if found.size != entry.size:
                raise ArtifactError(f"{found.label} has {found.size} bytes, the manifest says {entry.size}")
            return found
        full = self.root / relpath
        if full.is_symlink() or not full.is_file() or any(p.is_symlink() for p in full.parents if self.root in p.parents):
            raise ArtifactError(f"{full} is missing (or a link, which is refused)")
        size = full.stat().st_size
        if size != entry.size:
            raise ArtifactError(f"{full} has {size} bytes, the manifest says {entry.size} (truncated or changed)")
        return Member(full, 0, size, str(full))

    def read_bytes(self, relpath: str, verify: bool = True, uncached: bool = False, recheck: bool = False) -> bytes:
        """A file's bytes; with `verify`, checked against the manifest's SHA-256 unless an earlier run hashed
        the file as it is now (`checked`; `recheck`: hashed all the same); with `uncached`, dropped from the
        OS page cache after reading (expert loads under a memory budget)."""
        m = self.member(relpath)
        data = read_range(m.file, m.offset, m.size, uncached)
        if len(data) != m.size:
            raise ArtifactError(f"{m.label} changed while being read")
        if verify and (recheck or not self.checked.trusted(relpath)):
            self.check_digest(relpath, hashlib.sha256(data).hexdigest())
        return data

    def check_digest(self, relpath: str, digest: str) -> None:
        """A listed file's SHA-256 as read, against the manifest's: recorded for later runs where it matches."""
        if digest != self._entries[relpath].sha256:
            raise ArtifactError(f"{self.member(relpath).label} fails its SHA-256 check (corrupt or modified)")
        self.checked.passed(relpath)

    def read_graph(self, relpath: str, verify: bool = True, uncached: bool = False, check: bool = True,
                   recheck: bool = False) -> bytes:
        """An ONNX graph's bytes, refused (with `check`) if it uses external data or operators the
        runtime does not expect (see graph_check.py)."""
        data = self.read_bytes(relpath, verify=verify, uncached=uncached, recheck=recheck)
        if check:
            check_graph(data, self.member(relpath).label)
        return data

    def replace_manifest(self, manifest: Manifest) -> None:
        """Swap in a new manifest (e.g. a re-planned policy) for the same files, atomically."""
        if self.is_archive:
            raise ArtifactError(f"{self.root} is an archive; unpack it to change its policy")
        if manifest.files != self.manifest.files:
            raise ArtifactError("a replaced manifest must list the same files")
        manifest.validate()
        tmp = self.root / f".{layout.MANIFEST}.{os.getpid()}.tmp"
        data = manifest_json(manifest)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / layout.MANIFEST)
        finally:  # a full disk leaves the old manifest in place and no half-written copy
            tmp.unlink(missing_ok=True)
        self.manifest = manifest
        self.digest = hashlib.sha256(data).hexdigest()

    def manifest_bytes(self) -> bytes:
        return manifest_json(self.manifest)

    def verify(self) -> list[str]:
        """Every problem with the listed files, one line each; empty when all is well."""
        problems = []
        for entry in self.manifest.files:
            try:
                if entry.path.endswith(".onnx"):
                    self.read_graph(entry.path, recheck=True)
                else:
                    self.read_bytes(entry.path, recheck=True)
            except ArtifactError as e:
                problems.append(str(e))
        self.checked.save()  # later runs need not hash what passed here
        return problems


def manifest_json(manifest: Manifest) -> bytes:
    """The manifest as written: what the runtime reads back, so never a NaN or an infinity."""
    try:
        return (json.dumps(to_json_dict(manifest), indent=1, allow_nan=False) + "\n").encode()
    except ValueError:
        raise ArtifactError("the manifest would hold a NaN or infinite number (refused: the runtime could "
                            "not read it back)") from None


def _parse_manifest(data: bytes, where) -> Manifest:
    return manifest_from_json(load_json(data, str(where), ArtifactError))


def read_range(file: Path, offset: int, size: int, uncached: bool = False) -> bytes:
    """`size` bytes at `offset`, by positioned reads; optionally dropped from the page cache."""
    fd = os.open(file, os.O_RDONLY)
    try:
        chunks, done = [], 0
        while done < size:
            chunk = os.pread(fd, size - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        if uncached and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return b"".join(chunks)


def pack_artifact(source: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Pack an artifact directory into one deterministic archive (manifest first)."""
    check_output(Path(out), [Path(source)], force, "archive")
    reclaim_stale(Path(out))
    artifact = Artifact.open(source)
    if artifact.is_archive:
        raise ArtifactError(f"{source} is already an archive")
    manifest_bytes = (artifact.root / layout.MANIFEST).read_bytes()
    return archive.pack(artifact.root, manifest_bytes, [f.path for f in artifact.manifest.files], Path(out))


def unpack_artifact(source: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Extract an archive into a new artifact directory: every member checked against the
    manifest first, written under a temporary name, published with one rename."""
    artifact = Artifact.open(source)
    if not artifact.is_archive:
        raise ArtifactError(f"{source} is a directory, not an archive")
    manifest_bytes = archive.scan(artifact.root)[0]
    with ArtifactWriter(Path(out_dir), inputs=[Path(source)], force=force) as writer:
        for entry in artifact.manifest.files:
            writer.write_bytes(entry.path, artifact.read_bytes(entry.path))
        return writer.publish(manifest_bytes)
