"""Executors compute routed experts from loaded bytes; the slot pool and the cache are theirs to
read, never to manage (the GPU executor will bind the same slots later).

- native: the C kernel (runtime/native/experts.c) runs every expert of a layer in one call,
  straight from the bytes in their slots, as the manifest's slot layout places them;
- session: an onnxruntime session per resident expert, built from the same bytes: the reference,
  and the fallback where the kernel was not built or a precision has no slot layout (fp32, fp16).

Both write each (token, k) result into its own row, so the generation loop sums a token's experts
in the router's order whatever order they ran in: tokens do not depend on what was resident.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from fate.artifacts import Artifact, ArtifactError, ExpertLayout
from fate.artifacts.graph_check import check_graph
from fate.artifacts.layout import GraphIO

from .. import native
from ..sessions import make_expert_session, usable_cores

EXECUTORS = ("auto", "native", "session")
# Resident memory of an expert's session per byte of its file (onnxruntime keeps the initializers
# and their prepacked copy; measured 1.25 for INT4 experts, see sessions._without_model_bytes):
# the session executor's slots are planned at this cost so that a budget bounds real memory.
SESSION_RESIDENT_FACTOR = 1.25


@dataclass
class LoadedExpert:
    layer: int
    expert: int
    precision: str
    nbytes: int
    data: memoryview | None  # the file's bytes in their slot (native)
    session: object = None  # (session executor)


@dataclass
class Work:
    """The assignments of one expert: x rows in, y rows out."""

    expert: LoadedExpert
    rows: np.ndarray  # int32 token indices
    dest: np.ndarray  # int32 output rows (token * top_k + position in the router's choice)


@dataclass
class ExpertRunner:
    """Chooses the executor per layer and precision, and runs a batch of experts."""

    artifact: Artifact
    mode: str = "auto"
    threads: int = 0
    _vectors: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in EXECUTORS:
            raise ArtifactError(f"unknown executor {self.mode!r}; choose from {', '.join(EXECUTORS)}")
        if self.mode == "native" and not native.available():
            raise ArtifactError("--executor native: the native expert kernel is not built in this installation")
        if self.mode == "auto" and not native.available():
            native.warn_unavailable()
        self.threads = min(self.threads, usable_cores()) if self.threads > 0 else usable_cores()

    def native_for(self, layer: int, precision: str) -> bool:
        """Whether experts of `layer` at `precision` run natively (they need a slot layout)."""
        if self.mode == "session" or not native.available():
            return False
        has_layout = precision in self.artifact.manifest.layers[layer].expert_layouts
        if self.mode == "native" and not has_layout:
            raise ArtifactError(f"--executor native: layer {layer} has no slot layout for {precision} "
                                f"(recompile with this Fate; float experts run as sessions)")
        return has_layout

    def layout(self, layer: int, precision: str) -> tuple[ExpertLayout, np.ndarray]:
        """The slot layout of `layer`'s experts at `precision`, and the vector the kernel reads of it."""
        layout = self.artifact.manifest.layers[layer].expert_layouts[precision]
        key = (layer, precision)
        if key not in self._vectors:
            self._vectors[key] = native.layout_vector(layout)
        return layout, self._vectors[key]

    def native_steps(self) -> bool:
        """Whether layers with a decode step run it natively (the session executor is the reference
        path: graphs and sessions only)."""
        return self.mode != "session" and native.available()

    def name(self) -> str:
        if self.mode == "session" or not native.available():
            return "session"
        return f"native ({native.kernel_name()})"

    def prepare(self, loaded: LoadedExpert, label: str) -> None:
        """After a load: a session expert gets its session (and its bytes may go); `label` names
        its file in what is refused."""
        if not self.native_for(loaded.layer, loaded.precision):
            data = bytes(loaded.data)
            check_graph(data, label)
            try:
                loaded.session = make_expert_session(data, label=label)
            except Exception as e:  # onnxruntime rejects the bytes: the caller names the file
                raise ArtifactError(f"not a loadable ONNX graph: {e}") from None
            loaded.data = None

    def run(self, layer: int, work: list[Work], x: np.ndarray, y: np.ndarray) -> None:
        """y[w.dest] = expert(x[w.rows]) for every w; native experts in one call per precision."""
        groups: dict[str, list[Work]] = {}
        for w in work:
            if w.expert.session is not None:
                y[w.dest] = w.expert.session.run([GraphIO.EXPERT_OUT], {GraphIO.EXPERT_IN: x[w.rows]})[0]
            else:
                groups.setdefault(w.expert.precision, []).append(w)
        for precision, batch in groups.items():
            layout, vector = self.layout(layer, precision)
            if len(x) == 1 and all(len(w.dest) == 1 for w in batch):  # decode: each expert once, on the one token
                starts = np.arange(len(batch) + 1, dtype=np.int32)
                rows = np.zeros(len(batch), np.int32)
                dest = np.array([w.dest[0] for w in batch], np.int32)
            else:
                starts = np.fromiter(itertools.accumulate((len(w.rows) for w in batch), initial=0), np.int32,
                                     len(batch) + 1)
                rows = np.concatenate([w.rows for w in batch]).astype(np.int32, copy=False)
                dest = np.concatenate([w.dest for w in batch]).astype(np.int32, copy=False)
            native.run_experts(layout, vector, [w.expert.data for w in batch], x, starts, rows, dest, y, self.threads)


def assignments(ids: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """expert -> (token rows, output rows) of a layer's routing ids [S, k], experts in id order."""
    top_k = ids.shape[1]
    if ids.shape[0] == 1 and len(set(ids[0].tolist())) == top_k:  # decode: one row per expert
        row = np.zeros(1, np.int32)
        return {expert: (row, np.array([j], np.int32)) for j, expert in sorted(enumerate(ids[0].tolist()),
                                                                                key=lambda p: p[1])}
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    experts, starts = np.unique(flat[order], return_index=True)
    bounds = list(starts[1:]) + [len(flat)]
    out = {}
    for expert, lo, hi in zip(experts, starts, bounds):
        dest = order[lo:hi].astype(np.int32)
        out[int(expert)] = ((dest // top_k).astype(np.int32), dest)
    return out
