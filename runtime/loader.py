"""Loading one expert: one positioned read of its file into a slot (page cache bypassed), its
SHA-256 checked the first time this process reads it; the session executor then builds its
session. `load` does it all at once (prefetch threads); `start` begins the read on the native
I/O threads and `PendingLoad.result()` finishes it (the generation loop's own misses: no Python
thread is handed the work)."""

from __future__ import annotations

import hashlib
import sys
import threading

from fate.artifacts import Artifact, ArtifactError

from .executors import ExpertRunner, LoadedExpert
from .slots import SlotRead


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

    def start(self, layer: int, expert: int, precision: str, buffer: memoryview, direct,
              urgent: bool = False) -> PendingLoad:
        """The expert's read begun (on native I/O threads where the extension has them; `urgent`:
        ahead of those queued); its `result()` finishes what `load` does, falling back the same
        way on a failure."""
        try:
            read = self._begin(self.artifact.manifest.layers[layer].experts[precision][expert], buffer, direct,
                               precision, urgent)
        except ArtifactError:  # load() meets it again and falls back, or says so
            read = None
        return PendingLoad(self, (layer, expert, precision, buffer, direct), read)

    def load(self, layer: int, expert: int, precision: str, buffer: memoryview, direct,
             started: SlotRead | None = None) -> LoadedExpert:
        """The expert read into `buffer` (a slot; `direct`: the pool, while O_DIRECT works);
        `started`: its read at `precision`, already begun."""
        stored = self.artifact.manifest.layers[layer].experts
        order = [precision] + [p for p in stored if p != precision]
        first_error = None
        for candidate in order:
            path = stored[candidate][expert]
            try:
                if started is not None:  # waited for first: nothing else may write this buffer meanwhile
                    read, started = started, None
                else:
                    read = self._begin(path, buffer, direct, precision)
                data = read.wait()
                member = self._member(path)
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

    def _begin(self, path: str, buffer: memoryview, direct, precision: str, urgent: bool = False) -> SlotRead:
        member = self._member(path)
        if member.size + member.offset % 4096 > len(buffer):
            raise ArtifactError(f"{member.label} does not fit the slot planned for {precision}")
        return SlotRead(buffer, member.file, member.offset, member.size, direct, urgent)

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


class PendingLoad:
    """An expert load under way (ExpertLoader.start): `done()` never blocks; `result()` waits for
    the read without Python's lock, checks it and gives the LoadedExpert."""

    def __init__(self, loader: ExpertLoader, args: tuple, read: SlotRead | None):
        self._loader, self._args, self._read = loader, args, read

    def done(self) -> bool:
        return self._read is None or self._read.done()

    def cancel(self) -> bool:
        """Give up a load whose read no I/O thread has begun: True, and `result()` must not follow."""
        return self._read is not None and self._read.cancel()

    def result(self) -> LoadedExpert:
        return self._loader.load(*self._args, started=self._read)
