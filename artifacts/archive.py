"""One-file artifacts: an uncompressed POSIX tar with manifest.json first.

Uncompressed so that the runtime reads any member in place (one positioned read at the member's
data offset) without extracting anything. Deterministic: members in a fixed order (manifest,
then the manifest's files sorted), mtime 0, uid/gid 0, no user names, mode 0644.

Reading trusts nothing: every header is checked before anything is used (regular files only,
safe relative names, no duplicates, data inside the file, a bounded count and manifest size),
and the members must be exactly the files the manifest lists, with the listed sizes.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from . import layout
from .errors import ArtifactError
from .schema import safe_relpath

SUFFIX = ".fate"
MAX_MEMBERS = 1_000_000
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class Member:
    """Where one file's bytes are: a file on disk, an offset and a size."""

    file: Path
    offset: int
    size: int
    label: str  # how messages name it


def pack(artifact_dir: Path, manifest_bytes: bytes, files: list[str], out: Path) -> Path:
    """Write artifact_dir's manifest and `files` into the archive `out`, atomically."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, layout.MANIFEST, io.BytesIO(manifest_bytes), len(manifest_bytes))
            for rel in sorted(files):
                path = Path(artifact_dir) / rel
                with open(path, "rb") as f:
                    _add(tar, rel, f, path.stat().st_size)
        os.replace(tmp, out)
    except OSError as e:
        if e.filename:  # a file it could not read names itself
            raise
        raise ArtifactError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _add(tar: tarfile.TarFile, name: str, fileobj, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    tar.addfile(info, fileobj)


def scan(path: Path) -> tuple[bytes, dict[str, Member]]:
    """The manifest's bytes and every other member's location, after checking every header."""
    path = Path(path)
    size = path.stat().st_size
    members: dict[str, Member] = {}
    manifest = None
    try:
        with tarfile.open(path, "r:") as tar:
            for count, info in enumerate(_iter(tar, path)):
                if count >= MAX_MEMBERS:
                    raise ArtifactError(f"{path}: more than {MAX_MEMBERS} members")
                name = info.name
                if not info.isreg():
                    raise ArtifactError(f"{path}: member {name!r} is not a regular file (links and devices are refused)")
                if info.issparse() or any(key.startswith("GNU.sparse") for key in info.pax_headers):
                    # its bytes are not laid out in place: the runtime reads members where they lie
                    raise ArtifactError(f"{path}: member {name!r} is a sparse file, which archives never hold")
                try:
                    safe_relpath(name)
                except ArtifactError:
                    raise ArtifactError(f"{path}: member name {name!r} points outside the artifact") from None
                if name in members or (name == layout.MANIFEST and manifest is not None):
                    raise ArtifactError(f"{path}: member {name!r} appears twice")
                if info.size < 0 or info.offset_data + info.size > size:
                    raise ArtifactError(f"{path} is truncated: member {name!r} declares {info.size} bytes past the end")
                if count == 0 and name != layout.MANIFEST:
                    raise ArtifactError(f"{path}: the first member must be {layout.MANIFEST}, not {name!r}")
                if name == layout.MANIFEST:
                    if info.size > MAX_MANIFEST_BYTES:
                        raise ArtifactError(f"{path}: manifest is implausibly large")
                    manifest = tar.extractfile(info).read()
                else:
                    members[name] = Member(path, info.offset_data, info.size, f"{path}:{name}")
    except tarfile.TarError as e:
        raise ArtifactError(f"{path} is not a readable Fate archive: {e}") from None
    except EOFError:
        raise ArtifactError(f"{path} is truncated") from None
    if manifest is None:
        raise ArtifactError(f"{path} holds no {layout.MANIFEST}")
    return manifest, members


def _iter(tar: tarfile.TarFile, path: Path):
    """Members one at a time (tarfile's own list would read every header into memory first)."""
    while True:
        try:
            info = tar.next()
        except tarfile.ReadError as e:
            raise ArtifactError(f"{path} is truncated or corrupt: {e}") from None
        if info is None:
            return
        yield info
