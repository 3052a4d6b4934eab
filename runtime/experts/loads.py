"""Loading one expert: one positioned read of its file into a slot (page cache bypassed), its
SHA-256 checked the first time this process reads it (unless an earlier run hashed the file as it is
now: artifacts.checked); the session executor then builds its
session. `load` does it all at once (prefetch threads); `start` begins the read on the native
I/O threads and `Load.result()` finishes it (the generation loop's own loads: no Python
thread is handed the work). A large file begun with `start` is hashed on a hashing thread as soon
as its read is over, beside the loop; the loop still runs no expert before its check has passed."""

from __future__ import annotations

import hashlib
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from fate.artifacts import Artifact, ArtifactError

from .executors import ExpertRunner, LoadedExpert
from .pool import SlotRead

# Files at least this large are hashed ahead, on a hashing thread (hashlib releases Python's lock):
# a 9 MB expert takes about 5 ms to hash, which the loop would otherwise spend before running it
# (checking every first read on the loop doubled a 25% run's prefill at qwen shapes). Smaller ones
# are hashed where they are waited for: handing them over costs more than hashing them.
HASH_AHEAD_BYTES = 1 << 20  # above pool.INLINE_READ_BYTES: a read hashed ahead is never made by its hasher


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
        self._hashers: ThreadPoolExecutor | None = None  # started with the first file hashed ahead

    def start(self, layer: int, expert: int, precision: str, buffer: memoryview, direct,
              urgent: bool = False, then: Callable[[LoadedExpert], object] | None = None,
              inline: bool = False) -> Load:
        """The expert's read begun (on native I/O threads where the extension has them; `urgent`:
        ahead of those queued; `inline`: a small one made when its result is asked for, SlotRead); its
        `result()` finishes what `load` does, falling back the same way on a failure, and gives
        `then(loaded)` where `then` is given."""
        path = self.artifact.manifest.layers[layer].experts[precision][expert]
        args = (layer, expert, precision, buffer, direct)
        try:
            read = self._begin(path, buffer, direct, precision, urgent, inline)
        except (ArtifactError, OSError):  # load() meets it again and falls back, or says so
            return Load(self, args, None, None, then)
        return Load(self, args, read, self._hash_ahead(path, read), then)

    def load(self, layer: int, expert: int, precision: str, buffer: memoryview, direct,
             started: SlotRead | None = None, digest: Future | None = None) -> LoadedExpert:
        """The expert read into `buffer` (a slot; `direct`: the pool, while O_DIRECT works);
        `started`: its read at `precision`, already begun; `digest`: that read's SHA-256, being
        computed on a hashing thread."""
        stored = self.artifact.manifest.layers[layer].experts
        order = [precision] + [p for p in stored if p != precision]
        first_error = None
        for candidate in order:
            path = stored[candidate][expert]
            try:
                if started is not None:  # waited for first: nothing else may write this buffer meanwhile
                    read, ahead, started, digest = started, digest, None, None
                else:
                    read, ahead = self._begin(path, buffer, direct, precision), None
                data = read.wait()
                member = self._member(path)
                self._check_first(path, data, ahead)
            except (ArtifactError, OSError) as e:  # a file removed or unreadable since the start is missing
                first_error = first_error or self._as_artifact_error(path, e)
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

    def _begin(self, path: str, buffer: memoryview, direct, precision: str, urgent: bool = False,
               inline: bool = False) -> SlotRead:
        member = self._member(path)
        if member.size + member.offset % 4096 > len(buffer):
            raise ArtifactError(f"{member.label} does not fit the slot planned for {precision}")
        return SlotRead(buffer, member.file, member.offset, member.size, direct, urgent, inline)

    def _as_artifact_error(self, path: str, error: Exception) -> ArtifactError:
        if isinstance(error, ArtifactError):
            return error
        reason = getattr(error, "strerror", None) or str(error)
        return ArtifactError(f"{self.artifact.root / path}: cannot be read ({reason})")

    def _member(self, path: str):
        """Where the file's bytes are: checked (listed, no link, the listed size) on its first load;
        a reload is then one open and one read (a file cut short since is refused by the read)."""
        member = self._members.get(path)
        if member is None:
            member = self._members[path] = self.artifact.member(path)
        return member

    def _needs_check(self, path: str) -> bool:
        """Whether this read is hashed: every one with `every_load`, else a file's first in this process,
        unless an earlier run hashed the file as it is now (artifacts.checked)."""
        if not self.verify:
            return False
        if self.every_load:
            return True
        if path in self._checked:
            return False
        if self.artifact.checked.trusted(path):
            with self._lock:
                self._checked.add(path)
            return False
        return True

    def _hash_ahead(self, path: str, read: SlotRead) -> Future | None:
        """The SHA-256 of a large file whose check is due, computed on a hashing thread once its
        read is over (None: it is hashed where it is waited for, if at all)."""
        if not self._needs_check(path) or self._member(path).size < HASH_AHEAD_BYTES:
            return None
        with self._lock:
            if self._hashers is None:
                # as many as reads can be under way at once, so that a hash never waits behind a read
                self._hashers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fate-hash")
        return self._hashers.submit(lambda: hashlib.sha256(read.wait()).hexdigest())

    def close(self) -> None:
        if self._hashers is not None:
            self._hashers.shutdown(wait=True, cancel_futures=True)

    def _check_first(self, path: str, data: memoryview, ahead: Future | None = None) -> None:
        """Hash a file the first time this process reads it (or take the hash `ahead` computed), unless an
        earlier run did (artifacts.checked); reloads after an eviction (the common case under a tight budget)
        skip the 4 ms a 5 MB expert costs to hash."""
        if not self._needs_check(path):
            return
        self.artifact.check_digest(path, ahead.result() if ahead is not None else hashlib.sha256(data).hexdigest())
        with self._lock:
            self._checked.add(path)

    def _warn(self, key: str, message: str) -> None:
        with self._lock:
            if key not in self._warned:
                self._warned.add(key)
                print(message, file=sys.stderr)


class Load:
    """An expert load under way (ExpertLoader.start): `done()` never blocks; `cancel()` gives up a read
    no I/O thread has begun; `result()` waits for the read without Python's lock, checks it and gives
    the LoadedExpert (or what the starter's `then` makes of it). A load run on a helper thread is a
    concurrent.futures.Future, which answers the same three."""

    def __init__(self, loader: ExpertLoader, args: tuple, read: SlotRead | None, digest: Future | None,
                 then: Callable[[LoadedExpert], object] | None = None):
        self._loader, self._args, self._read, self._digest, self._then = loader, args, read, digest, then

    def done(self) -> bool:
        return self._read is None or self._read.done()

    def cancel(self) -> bool:
        """Give up a load whose read no I/O thread has begun: True, and `result()` must not follow."""
        return self._read is not None and self._read.cancel()

    def result(self):
        loaded = self._loader.load(*self._args, started=self._read, digest=self._digest)
        return loaded if self._then is None else self._then(loaded)
