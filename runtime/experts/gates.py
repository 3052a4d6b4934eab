"""Whether a layer prefetches in decode: while its prefetch reads pay, measured live.

A prefetch read pays when the wait it saves is more than the loop's own work it costs:

- its layer's reads are mostly right: of the predicted experts that were not resident when predicted (the
  ones a prefetch reads), the share the router then chose, an exponential average over the tokens that had
  any, is at least RECALL_GATE. A prediction the cache already holds costs nothing and proves nothing: at a
  large budget most right predictions are resident and the reads are mostly the wrong ones;
- and that share of a read's wait is more than COST_MARGIN times the loop's work per load: the time the
  generation thread waits per load it waits for (a miss, or a prefetch not yet in), and its own time per load
  (bookkeeping, eviction, starting and finishing reads), both averaged over the recent decode tokens of every
  layer. Where experts are small, a read is short against the loop's work around it, and a wrong read costs
  more than a right one saves: tiny-moe's 32 KB experts wait 85-115 us a read against 35-130 us of loop a
  load, where Qwen-MoE-like 4.6 MB experts wait about 1.4 ms against 0.1-0.15 ms (BENCHMARKS.md 6b). The
  margin stands for what the sum leaves out (the expert a wrong read evicts, read again later; the reads' own
  CPU beside the kernel's threads), measured: at right-share x wait / loop of 1.0-1.5, tiny-moe's reads
  ahead lost 3-20% against loading on demand; at about 10, Qwen-MoE-like shapes gain 16-24%.

A layer whose share keeps it from reading ahead still has its predictions scored, so it starts again when they
pay. While no read ahead could pay at all (the waits short against the loop's work), none is even predicted;
the waits are still measured from the misses, so reading ahead starts again if they grow (another disk, a
busier one). The loop's work per load reading ahead, though, is measured only while reading ahead: a busy
moment (another process on the cores) that made it look dear would keep the gate closed for good. So after
PROBE_FIRST tokens closed it is forgotten and measured afresh by reading ahead again; each probe that closes
the gate again doubles the wait for the next (at most PROBE_MAX tokens), one that opens it resets it. The
gate reads no clock: the store hands it outcomes and times, so that tests drive it with
made-up ones.
"""

from __future__ import annotations

RECALL_GATE = 0.5
RECALL_MEMORY = 0.2  # the weight of each new token in a layer's exponential average
COST_MEMORY = 0.98  # each decode token's weight in the cost averages decays by this per token
COST_EVIDENCE = 4.0  # loads (and waits) the cost averages need before they decide
COST_MARGIN = 2.0  # a right read's saved wait must be this many times a load's loop work (see above)
PROBE_FIRST = 32  # decode tokens closed before the loop's work per load reading ahead is measured afresh
PROBE_MAX = 1024


class PrefetchGate:
    """Per layer: whether its decode prediction is read ahead (see the module's docstring)."""

    def __init__(self) -> None:
        self._paying: dict[int, float] = {}  # layer -> recent share of its reads the router chose
        # decayed sums over decode tokens: seconds waited and loads waited for; the loop's own seconds and its
        # loads, over the tokens that read ahead (their loop works more a load: the predictions, their reads),
        # so that loading on demand, cheaper, does not make reading ahead look cheaper than it is
        self._waited = self._waits = self._loop = self._loads = 0.0
        self._closed_for = 0  # decode tokens since one read ahead
        self._probe_after = PROBE_FIRST

    def open(self, layer: int) -> bool:
        share = self._paying.get(layer, 1.0)
        return share >= RECALL_GATE and self.worth_reading(share)

    def worth_reading(self, share: float = 1.0) -> bool:
        """Whether reads right `share` of the time save more waiting than they cost the loop (True until
        measured). At share 1: whether any layer's prediction could pay (else none is even made)."""
        if not self._measured():
            return True
        return share * (self._waited / self._waits) >= COST_MARGIN * (self._loop / self._loads)

    def _measured(self) -> bool:
        return self._loads >= COST_EVIDENCE and self._waits >= COST_EVIDENCE

    def score(self, layer: int, read: set[int], chosen: set[int]) -> None:
        """`read`: the prediction's experts that were not resident when predicted; `chosen`: the router's."""
        if read:
            used = len(read & chosen) / len(read)
            self._paying[layer] = (1 - RECALL_MEMORY) * self._paying.get(layer, 1.0) + RECALL_MEMORY * used

    def token(self, loop_s: float, loads: int, waited_s: float, waits: int, read_ahead: bool = True) -> None:
        """One decode token's costs: the loop's own seconds and the loads it made, the seconds it waited for
        loads and how many it waited for; `read_ahead`: whether it predicted and read ahead (only such
        tokens' loop work counts)."""
        self._waited = COST_MEMORY * self._waited + waited_s
        self._waits = COST_MEMORY * self._waits + waits
        if read_ahead:
            self._loop = COST_MEMORY * self._loop + loop_s
            self._loads = COST_MEMORY * self._loads + loads
            self._closed_for = 0
            if self._measured() and self.worth_reading():
                self._probe_after = PROBE_FIRST
            return
        self._closed_for += 1
        if self._closed_for >= self._probe_after:  # measure the loop's work reading ahead afresh (see above)
            self._loop = self._loads = 0.0
            self._closed_for = 0
            self._probe_after = min(2 * self._probe_after, PROBE_MAX)

    def costs(self) -> tuple[float | None, float | None]:
        """(seconds waited per load waited for, the loop's seconds per load reading ahead), recently; None where
        unmeasured."""
        return (self._waited / self._waits if self._waits else None, self._loop / self._loads if self._loads else None)
