"""Loading one expert: read its file (without leaving a copy in the OS page cache), check it,
build its onnxruntime session. Runs in prefetch threads and, on a miss, in the caller."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from statistics import median

from fate.artifacts import Artifact, ArtifactError
from fate.artifacts.layout import GraphIO

from .memory import current_rss, release_freed_memory
from .sessions import make_expert_session


@dataclass
class LoadedExpert:
    layer: int
    expert: int
    precision: str
    nbytes: int
    session: object

    def run(self, x):
        return self.session.run([GraphIO.EXPERT_OUT], {GraphIO.EXPERT_IN: x})[0]


@dataclass(frozen=True)
class LoadCost:
    resident_per_file_byte: float
    seconds: float  # median wall time of a reload (read from storage, session creation)


class ExpertLoader:
    """Reads and builds expert sessions for one artifact, with fallback to another stored
    precision of the same expert when a file is missing or corrupt (warned once per file)."""

    def __init__(self, artifact: Artifact, verify: bool = True):
        self.artifact = artifact
        self.verify = verify
        self._sizes = {f.path: f.size for f in artifact.manifest.files}
        self._warned: set[str] = set()
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    def _read(self, path: str) -> bytes:
        # Each file is hashed and its graph checked the first time this process loads it; reloads
        # after an eviction (the common case under a tight budget) skip the 4 ms a 5 MB expert
        # costs to hash and the 0.3 ms the graph check costs in Python.
        first = path not in self._checked
        data = self.artifact.read_graph(path, verify=self.verify and first, uncached=True, check=first)
        if first:
            with self._lock:
                self._checked.add(path)
        return data

    def measure(self, layer: int, precision: str, samples: int = 3) -> LoadCost:
        """Load a few experts of `layer` at `precision` and measure what one costs: resident memory
        relative to its file size (onnxruntime keeps the initializers and their prepacked copy; the
        cache accounts experts at this cost so that the budget bounds real memory, not file bytes;
        1.0 where it cannot measure) and the seconds a reload takes on this device (read from
        storage and session creation; the hash and graph check of a first load are not counted)."""
        files = self.artifact.manifest.layers[layer].experts[precision]
        chosen = range(min(samples, len(files)))
        ratios = []
        keep = []
        for expert in chosen:
            release_freed_memory()
            before = current_rss()
            keep.append(self.load(layer, expert, precision))
            release_freed_memory()  # the file's bytes are gone once the session exists
            after = current_rss()
            if before is not None and after is not None:
                ratios.append((after - before) / self._sizes[files[expert]])
        seconds = []
        for expert in chosen:  # timed apart: trimming the heap above makes the next allocation fault
            start = time.perf_counter()
            keep.append(self.load(layer, expert, precision))
            seconds.append(time.perf_counter() - start)
        keep.clear()
        ratio = max(1.0, median(ratios)) if ratios else 1.0
        return LoadCost(resident_per_file_byte=ratio, seconds=median(seconds))

    def load(self, layer: int, expert: int, precision: str) -> LoadedExpert:
        stored = self.artifact.manifest.layers[layer].experts
        order = [precision] + [p for p in stored if p != precision]
        first_error = None
        for candidate in order:
            path = stored[candidate][expert]
            try:
                data = self._read(path)
            except ArtifactError as e:
                first_error = first_error or e
                continue
            if candidate != precision:
                self._warn(path, f"fate: warning: {first_error}; using the {candidate} copy of layer {layer} "
                                 f"expert {expert} instead")
            try:
                session = make_expert_session(data)
            except Exception as e:  # onnxruntime rejects the bytes: report the file, not a traceback
                raise ArtifactError(f"{self.artifact.member(path).label} is not a loadable ONNX graph: {e}") from None
            return LoadedExpert(layer, expert, candidate, len(data), session)
        raise first_error

    def _warn(self, key: str, message: str) -> None:
        with self._lock:
            if key not in self._warned:
                self._warned.add(key)
                print(message, file=sys.stderr)
