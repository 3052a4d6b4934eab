"""What a run reports about its experts: typed, so that the summary line, fate-bench and --json
read fields, not string keys. `to_json()` gives the --json form (the same field names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ResidentReport:
    """Every expert resident: nothing to count but which executor ran them."""

    executor: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LayerReport:
    """One MoE layer as the run plan set it up."""

    precision: str
    slots: int
    slot_bytes: int
    predictor: str
    width: int
    int2_prefill: bool


@dataclass(frozen=True)
class PhaseReport:
    """Prefill or decode of an offloaded run."""

    tokens: int
    seconds: float
    tokens_per_s: float
    stall_s: float
    # the expert room's own time on the generation thread: the per-layer hand-off less its waits for reads
    # and its expert runs (bookkeeping, eviction, starting reads, prefetch requests)
    loop_s: float
    loads_waited: int  # loads the loop waited for (misses, prefetches not yet in): stall_s is their wait
    experts_loaded: int
    bytes_read: int
    int2_loads: int
    hit_rate: float | None  # resident when asked for
    covered_rate: float | None  # resident, or already being loaded by the prefetcher (the paper's "hit")
    late_prefetches: int
    layers_run_in_step: int  # MoE layer-steps whose native decode step ran every chosen expert itself
    # decode predictions not prefetched (runtime.experts.gates): their layer's recent reads were mostly wrong,
    # or reads wait less than the loop works per load, so that no read ahead could pay
    prefetches_gated: int
    hit_rate_per_layer: dict[int, float | None]
    prefetch_recall_per_layer: dict[int, float | None]
    prefetch_precision_per_layer: dict[int, float | None]

    @property
    def bytes_per_token(self) -> float | None:
        return self.bytes_read / self.tokens if self.tokens else None

    @property
    def loop_us_per_load(self) -> float | None:
        """The loop's own time per expert loaded (microseconds): what the offloading costs the generation
        thread beside the reads themselves."""
        return self.loop_s / self.experts_loaded * 1e6 if self.experts_loaded else None

    @property
    def wait_us_per_load(self) -> float | None:
        """The loop's wait per load it waited for (microseconds): what a read ahead of need could save."""
        return self.stall_s / self.loads_waited * 1e6 if self.loads_waited else None

    def mean_recall(self) -> float | None:
        recalls = [r for r in self.prefetch_recall_per_layer.values() if r is not None]
        return sum(recalls) / len(recalls) if recalls else None


@dataclass(frozen=True)
class OffloadReport:
    executor: str
    budget_bytes: int
    total_expert_bytes: int
    reads: str  # how loads read: O_DIRECT or buffered
    resident_bytes: int
    prefetch: str
    cache: str
    pool: str  # global (slots shared by the layers of one slot size) or per-layer
    allocation: str
    layers: dict[int, LayerReport]
    prefill: PhaseReport
    decode: PhaseReport
    state_bytes: int = 0  # a sequence's fixed-size layer state, held beside the expert slots

    @property
    def stall_s(self) -> float:
        return self.prefill.stall_s + self.decode.stall_s

    @property
    def bytes_read(self) -> int:
        return self.prefill.bytes_read + self.decode.bytes_read

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
