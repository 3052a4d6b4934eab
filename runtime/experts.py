"""Where routed experts live while generating. The generation loop sees only `ExpertStore`:
`run(layer, expert, x)` computes one expert (loading it first if the store must), and
`hint(layer, scores)` tells the store which experts the cross-layer predictor expects next.
The budgeted cache with prefetching (runtime.offload) is another implementation of the same
interface; the generation loop does not change."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from fate.artifacts import Artifact, ArtifactError
from fate.artifacts.layout import GraphIO
from fate.artifacts.schema import PRECISION_BITS

from .memory import release_freed_memory
from .sessions import make_expert_session


@dataclass
class ExpertStats:
    """Counters every store keeps; the stats of a run."""

    runs: int = 0
    loads: int = 0
    bytes_read: int = 0
    runs_per_layer: dict[int, int] = field(default_factory=dict)


class ExpertStore(ABC):
    def __init__(self) -> None:
        self.stats = ExpertStats()

    @abstractmethod
    def run(self, layer: int, expert: int, x: np.ndarray) -> np.ndarray:
        """y = expert(x) for x [N, H]."""

    def begin_step(self, num_tokens: int, prefill: bool) -> None:
        """A forward pass over `num_tokens` new tokens starts, in prefill or decode."""

    def hint(self, layer: int, predictions: dict[str, np.ndarray]) -> None:
        """Cross-layer predictions of `layer`'s router logits [S, E], by graph output name,
        computed by the previous layer before `layer` runs."""

    def observe(self, layer: int, expert_ids: np.ndarray) -> None:
        """The experts `layer`'s router chose [S, k] (activation-path predictors use them)."""

    def order(self, layer: int, experts: list[int]) -> list[int]:
        """The order to run a layer's experts in (a cache runs resident ones first)."""
        return experts

    def routed(self, layer: int, experts: set[int]) -> None:
        """`layer` has run these experts."""

    def report(self) -> dict:
        """Statistics of the run so far, for --json and the summary line."""
        return {}

    def close(self) -> None:
        """Stop background work, release memory."""


def resident_precision(artifact: Artifact, layer: int, wanted: str | None) -> str:
    """The precision a layer's experts run at: asked for, else the policy's, else the smallest
    stored of at least 4 bits (INT2 copies are for prefill transfers, not for residence)."""
    manifest = artifact.manifest
    stored = manifest.layers[layer].experts
    if wanted is not None:
        if wanted not in stored:
            raise ArtifactError(f"layer {layer} stores experts as {', '.join(stored)}, not {wanted}")
        return wanted
    decided = manifest.policy.layer(layer) if manifest.policy else None
    if decided is not None:
        return decided.precision
    usable = [p for p in stored if PRECISION_BITS[p] >= 4] or list(stored)
    return min(usable, key=lambda p: PRECISION_BITS[p])


class ResidentExperts(ExpertStore):
    """Every expert loaded at start and kept: the all-resident reference."""

    def __init__(self, artifact: Artifact, precision: str | None = None, verify: bool = True):
        super().__init__()
        self.sessions: dict[tuple[int, int], object] = {}
        self.precisions = {spec.index: resident_precision(artifact, spec.index, precision)
                           for spec in artifact.manifest.moe_layers}
        for spec in artifact.manifest.moe_layers:
            files = spec.experts[self.precisions[spec.index]]
            for expert, path in enumerate(files):
                data = artifact.read_graph(path, verify=verify)
                self.sessions[(spec.index, expert)] = make_expert_session(data)
                self.stats.loads += 1
                self.stats.bytes_read += len(data)
            # Each load's transient copies of the file (Python's, onnxruntime's, the parsed graph)
            # leave holes the next, equally large ones do not fit in: measured, 736 MB of freed heap
            # still mapped after loading 240 experts of 4.6 MB. Hand it back once per layer.
            release_freed_memory()

    def run(self, layer: int, expert: int, x: np.ndarray) -> np.ndarray:
        self.stats.runs += 1
        self.stats.runs_per_layer[layer] = self.stats.runs_per_layer.get(layer, 0) + 1
        return self.sessions[(layer, expert)].run([GraphIO.EXPERT_OUT], {GraphIO.EXPERT_IN: x})[0]
