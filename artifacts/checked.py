"""The files of an artifact this machine has already checked against the manifest's SHA-256, so that a run
hashes only what no earlier run has (git's index trusts unchanged file stats the same way).

A file is trusted without hashing when its stat (device, inode, size, modification and change times) is
the one recorded when an earlier process hashed it and found it right. Writing to a file, replacing it or
copying it changes its change time or its inode, neither of which a user can set back, so a changed file is
hashed again. A file changed less than RACY_NS before this process opened the artifact is not recorded: a
write in the same clock tick as the one recorded could otherwise leave the same stat (git's "racily clean"
files). What this cannot see: the disk's own bit rot under an unchanged inode, which `fate-verify` (every
file hashed) and `--verify-every-load` (every expert read hashed) still find.

Records: CACHE_ENV or $XDG_CACHE_HOME/fate or ~/.cache/fate, then checked/<artifact digest>.json. A
directory that cannot be written only costs the hashing: nothing fails for it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable

CACHE_ENV = "FATE_CACHE_DIR"
RACY_NS = 2_000_000_000  # a file changed less than 2 s before the artifact was opened is hashed every time
SAVE_EVERY = 256  # new records kept before they are written (a server may run for days before it closes)

Stat = tuple[int, int, int, int, int]  # device, inode, size, modification and change times (ns)


def cache_dir() -> Path:
    """Where Fate keeps what one run leaves the next (CACHE_ENV, else the XDG cache directory)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fate"


def file_stat(path: str | os.PathLike) -> Stat | None:
    try:
        s = os.stat(path)
    except OSError:
        return None
    return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)


class CheckedFiles:
    """One artifact's record: `trusted(path)` before hashing a listed file, `passed(path)` once its hash
    matched, `save()` to leave the new ones to later runs. `stat_of(path)`: the stat of the file that holds
    a listed file's bytes (the archive, for a packed artifact); `opened`: those stats when the artifact was
    opened, at `opened_ns` (time.time_ns)."""

    def __init__(self, digest: str, stat_of: Callable[[str], Stat | None], opened: dict[str, Stat | None],
                 opened_ns: int):
        self._file = cache_dir() / "checked" / f"{digest}.json" if digest else None
        self._stat_of, self._opened, self._opened_ns = stat_of, opened, opened_ns
        self._records: dict[str, Stat] | None = None  # read at the first question
        self._new: dict[str, Stat] = {}
        self._lock = threading.Lock()

    def trusted(self, path: str) -> bool:
        """Whether an earlier run hashed this file as it is now."""
        with self._lock:
            if self._records is None:
                self._records = self._read()
            recorded = self._records.get(path) or self._new.get(path)
        return recorded is not None and recorded == self._stat_of(path)

    def passed(self, path: str) -> None:
        """The file's bytes matched the manifest's SHA-256: recorded if it has not changed since the artifact
        was opened and had not for RACY_NS before."""
        if self._file is None:
            return
        now = self._stat_of(path)
        if now is not None and now == self._opened.get(path) and now[4] <= self._opened_ns - RACY_NS:
            with self._lock:
                self._new[path] = now
                due = len(self._new) >= SAVE_EVERY
            if due:
                self.save()

    def save(self) -> None:
        """Add this run's new records to the file (merged with what other runs wrote meanwhile; replaced in
        one rename). Failing to write is not an error: the next run hashes again."""
        with self._lock:
            new, self._new = self._new, {}
            if self._records is not None:
                self._records.update(new)
        if not new or self._file is None:
            return
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            records = self._read()
            records.update(new)
            tmp = self._file.with_name(f".{self._file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                tmp.write_text(json.dumps({path: list(stat) for path, stat in sorted(records.items())}))
                os.replace(tmp, self._file)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass

    def _read(self) -> dict[str, Stat]:
        """The records on disk; anything unreadable or malformed counts as none."""
        if self._file is None:
            return {}
        try:
            data = json.loads(self._file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {path: tuple(stat) for path, stat in data.items()
                if isinstance(path, str) and isinstance(stat, list) and len(stat) == 5
                and all(type(v) is int for v in stat)}
