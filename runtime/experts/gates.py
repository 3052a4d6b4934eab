"""When a layer prefetches in decode: while its prefetch reads pay, measured live.

Of the predicted experts that were not resident when predicted (the ones a prefetch reads), the share the
router then chose, an exponential average over the tokens that had any, must be at least RECALL_GATE.
Below it a wrong read (its bytes, its loop work, an expert evicted for it) costs more than a right one saves
(one read's wait). A prediction the cache already holds costs nothing and proves nothing: at a large budget
most right predictions are resident and the reads are mostly the wrong ones. Predictions are still scored
while a layer does not prefetch, so it starts again when they pay. The gate reads no clock: the store hands
it outcomes, so that tests drive it with made-up ones.
"""

from __future__ import annotations

RECALL_GATE = 0.5
RECALL_MEMORY = 0.2  # the weight of each new token in the exponential average


class RecallGate:
    """Per layer: whether its decode prediction is prefetched (see the module's docstring)."""

    def __init__(self) -> None:
        self._paying: dict[int, float] = {}  # layer -> recent share of its reads the router chose

    def open(self, layer: int) -> bool:
        return self._paying.get(layer, 1.0) >= RECALL_GATE

    def score(self, layer: int, read: set[int], chosen: set[int]) -> None:
        """`read`: the prediction's experts that were not resident when predicted; `chosen`: the router's."""
        if read:
            used = len(read & chosen) / len(read)
            self._paying[layer] = (1 - RECALL_MEMORY) * self._paying.get(layer, 1.0) + RECALL_MEMORY * used
