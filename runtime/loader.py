"""Loading one expert: one positioned read of its file into a slot (page cache bypassed), its
SHA-256 checked the first time this process reads it; the session executor then builds its
session. Runs in prefetch threads and, on a miss, in the generation loop's helpers."""

from __future__ import annotations

import hashlib
import sys
import threading

from fate.artifacts import Artifact, ArtifactError

from .executors import ExpertRunner, LoadedExpert
from .slots import read_aligned


class ExpertLoader:
    """Reads experts of one artifact into buffers, with fallback to another stored precision of
    the same expert when a file is missing or corrupt and its copy fits (warned once per file)."""

    def __init__(self, artifact: Artifact, runner: ExpertRunner, verify: bool = True, every_load: bool = False):
        self.artifact = artifact
        self.runner = runner
        self.verify = verify
        self.every_load = every_load
        self._warned: set[str] = set()
        self._checked: set[str] = set()
        self._members: dict = {}
        self._lock = threading.Lock()

    def load(self, layer: int, expert: int, precision: str, buffer: memoryview, direct) -> LoadedExpert:
        """The expert read into `buffer` (a slot; `direct`: the pool, while O_DIRECT works)."""
        stored = self.artifact.manifest.layers[layer].experts
        order = [precision] + [p for p in stored if p != precision]
        first_error = None
        for candidate in order:
            path = stored[candidate][expert]
            try:
                member = self._member(path)
                if member.size + member.offset % 4096 > len(buffer):
                    raise ArtifactError(f"{member.label} does not fit the slot planned for {precision}")
                data = read_aligned(buffer, member.file, member.offset, member.size, direct)
                self._check_first(path, data, member.label)
            except ArtifactError as e:
                first_error = first_error or e
                continue
            if candidate != precision:
                self._warn(path, f"fate: warning: {first_error}; using the {candidate} copy of layer {layer} "
                                 f"expert {expert} instead")
            loaded = LoadedExpert(layer, expert, candidate, member.size, data)
            try:
                self.runner.prepare(loaded, member.label)
            except ArtifactError as e:
                raise ArtifactError(f"{member.label}: {e}") from None
            return loaded
        raise first_error

    def _member(self, path: str):
        """Where the file's bytes are: checked (listed, no link, the listed size) on its first load;
        a reload is then one open and one read (a file cut short since is refused by the read)."""
        member = self._members.get(path)
        if member is None:
            member = self._members[path] = self.artifact.member(path)
        return member

    def _check_first(self, path: str, data: memoryview, label: str) -> None:
        """Hash a file the first time this process reads it; reloads after an eviction (the common
        case under a tight budget) skip the 4 ms a 5 MB expert costs to hash."""
        if not self.verify or (path in self._checked and not self.every_load):
            return
        if hashlib.sha256(data).hexdigest() != self.artifact.entry(path).sha256:
            raise ArtifactError(f"{label} fails its SHA-256 check (corrupt or modified)")
        with self._lock:
            self._checked.add(path)

    def _warn(self, key: str, message: str) -> None:
        with self._lock:
            if key not in self._warned:
                self._warned.add(key)
                print(message, file=sys.stderr)
