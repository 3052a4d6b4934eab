"""What a command may write over. One rule for every command that writes an artifact, an archive
or a report, so that no flag combination can lose a user's data:

- an output is never an input, never contains an input (its ancestor) and never lies inside an
  input directory;
- an existing output is replaced only with --force, and --force replaces only what Fate writes:
  an artifact directory holding nothing but the files its manifest lists (or an empty
  directory), a .fate archive, or a report file. Anything else is refused, with what would be
  lost, and left for the user to remove.

Temporary names of an unfinished write carry the writer's pid (`.NAME.partial-PID-...`,
`.NAME.old-PID`), so that a later write to the same output reclaims what a killed process left.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Iterable, Literal

from . import layout
from .archive import MAX_MANIFEST_BYTES
from .errors import ArtifactError, FateError
from .inputs import load_json

OutputKind = Literal["artifact", "archive", "report"]


def check_output(out: Path, inputs: Iterable[Path], force: bool, kind: OutputKind) -> None:
    """Refuse (ArtifactError, one line) any write to `out` that could lose data; see the module doc."""
    out = Path(out)
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            raise ArtifactError(f"{out} is the input {given}: refusing to write over it")
        if source.is_relative_to(target):
            raise ArtifactError(f"{out} contains the input {given}: writing it would delete the input")
        if target.is_relative_to(source) and source.is_dir():
            raise ArtifactError(f"{out} lies inside the input {given}: write it somewhere else")
    if kind == "report" and not out.parent.is_dir():
        raise ArtifactError(f"cannot write {out}: {out.parent} is not a directory")
    if not os.path.lexists(out):
        return
    if out.is_symlink():
        raise ArtifactError(f"{out} is a symbolic link: refusing to write through it")
    if kind == "artifact":
        _check_replaceable_artifact(out, force)
    elif out.is_dir():
        raise ArtifactError(f"{out} is a directory")
    elif kind == "archive":
        if not force:
            raise ArtifactError(f"{out} already exists (use --force to replace it)")
        if not is_fate_archive(out):
            raise ArtifactError(f"{out} is not a Fate archive; --force replaces only an archive Fate wrote "
                                f"(remove it yourself if it should go)")


def _check_replaceable_artifact(out: Path, force: bool) -> None:
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; --force replaces only an artifact Fate wrote")
    entries = list(out.iterdir())
    if not entries:
        return
    if not force:
        raise ArtifactError(f"{out} already exists and is not empty (use --force to replace it)")
    listed = _listed_files(out)
    if listed is None:
        raise ArtifactError(f"{out} is not a Fate artifact (no Fate {layout.MANIFEST}); --force replaces only an "
                            f"artifact Fate wrote (remove it yourself if it should go)")
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_symlink() or (path.is_file() and rel not in listed) or not (path.is_file() or path.is_dir()):
            raise ArtifactError(f"{out} holds {rel}, which its manifest does not list: --force would delete it "
                                f"(move it away or choose another output)")


def _listed_files(directory: Path) -> set[str] | None:
    """The files a Fate manifest in `directory` lists (with the manifest itself), or None when
    there is no readable Fate manifest. Lenient about the rest: an old or damaged artifact is
    still Fate's to replace."""
    manifest = directory / layout.MANIFEST
    try:
        if manifest.is_symlink() or not manifest.is_file() or manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = load_json(manifest.read_bytes(), str(manifest), finite=False)
    except (OSError, FateError):
        return None
    if not isinstance(data, dict) or "schema_version" not in data or not isinstance(data.get("files"), list):
        return None
    listed = {layout.MANIFEST}
    for entry in data["files"]:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            listed.add(entry["path"])
    return listed


def is_fate_archive(path: Path) -> bool:
    """A tar file whose first member is the manifest: what fate-pack writes."""
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
    except (OSError, tarfile.TarError, ValueError):
        return False
    return first is not None and first.name == layout.MANIFEST and first.isreg()


def current_umask() -> int:
    """The process's umask (read by setting it, then setting it back: done while one thread runs)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def partial_name(out: Path) -> str:
    """The prefix of a temporary sibling of `out` written by this process."""
    return f".{out.name}.partial-{os.getpid()}-"


def trash_path(out: Path) -> Path:
    """Where a replaced output waits, between two renames, until its successor is in place."""
    return out.with_name(f".{out.name}.old-{os.getpid()}")


def reclaim_stale(out: Path) -> None:
    """Remove what a killed writer of `out` left beside it; an old output that was moved aside
    but never replaced goes back into place."""
    parent = Path(out).parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-(\d+)(-.*)?$")
    for sibling in parent.iterdir():
        match = pattern.match(sibling.name)
        if match is None or _alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not os.path.lexists(out):
            os.rename(sibling, out)
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's live process, or a number we cannot ask about: leave it
    return True


def write_report(out: Path, text: str, inputs: Iterable[Path] = ()) -> None:
    """A report file (HTML, JSON, SVG) written whole or not at all, never over an input."""
    out = Path(out)
    check_output(out, inputs, True, "report")
    tmp = out.with_name(f"{partial_name(out)}tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        raise ArtifactError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
