"""Replaying routing: how many bytes each way of caching experts reads over the same routing, and
how many the optimal cache (Belady's MIN) reads. Pure Python over keys (layer, expert); the
eviction policies are runtime.experts.eviction's, the ones the runtime evicts with, and the compiler's profiler
draws its miss curves with `replay_miss_rate` here, so profile, runtime and `fate-replay` agree.

An access is one layer of one forward step: the union of the experts its tokens chose (they are
needed at once and cannot evict each other), and what was predicted for it before. The simulation
follows the runtime's order: once a layer's routing is known, the next layer's prediction is
prefetched (never evicting what this layer or the prediction needs), then this layer's missing
experts are loaded (evicting neither, unless nothing else is left: then a prediction). A prefetch is
assumed to arrive in time; its bytes count.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping

from .eviction import POLICIES

Key = tuple[int, int]


@dataclass(frozen=True)
class Access:
    phase: str
    layer: int
    needed: frozenset[int]
    predicted: tuple[int, ...] = ()


@dataclass
class ReplayResult:
    """What one way of caching read over a trace; bytes by phase."""

    name: str
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    bytes_read: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


def accesses_of(records) -> list[Access]:
    """TraceRecords (runtime.experts.trace) -> accesses: consecutive records of one step and layer joined."""
    out: list[Access] = []
    last = None
    for r in records:
        if last is not None and (r.step, r.layer) == last:
            prev = out[-1]
            out[-1] = Access(prev.phase, prev.layer, prev.needed | frozenset(r.experts), prev.predicted)
        else:
            out.append(Access(r.phase, r.layer, frozenset(r.experts), tuple(r.predicted or ())))
        last = (r.step, r.layer)
    return out


class _Protected:
    def __init__(self, keys: set[Key]):
        self.keys = keys

    def __contains__(self, key: Key) -> bool:
        return key in self.keys


def simulate(accesses: Iterable[Access], policy: str, capacity: Mapping[Hashable, int],
             group_of: Mapping[int, Hashable], cost: Mapping[int, int], prefetch: bool = True,
             name: str | None = None) -> ReplayResult:
    """Replay with `policy` in eviction groups (group_of: layer -> group; capacity: group -> slots);
    cost: layer -> bytes one of its experts reads. `prefetch`: load each access's prediction first."""
    caches = {g: POLICIES[policy](n) for g, n in capacity.items()}
    result = ReplayResult(name or policy)
    accesses = list(accesses)

    def room(group, kept: set[Key], demand: bool) -> bool:
        cache = caches[group]
        if capacity[group] <= 0:
            return False
        if len(cache) < capacity[group] or cache.victim(None, _Protected(kept)) is not None:
            return True
        return demand and cache.victim(None, _Protected(kept & demand)) is not None

    for i, access in enumerate(accesses):
        needed = {(access.layer, e) for e in access.needed}
        following = accesses[i + 1] if i + 1 < len(accesses) else None
        guessed = {(following.layer, e) for e in following.predicted} if prefetch and following else set()
        if guessed:  # the next layer's prediction, begun once this layer's routing is known
            group = group_of[following.layer]
            for key in [(following.layer, e) for e in following.predicted]:
                if key in caches[group]:
                    continue
                if not room(group, needed | guessed, False):
                    break  # every slot holds what this layer or the prediction needs
                caches[group].insert(key, cold=True)
                result.prefetched += 1
                result.bytes_read[following.phase] += cost[following.layer]
        cache = caches[group_of[access.layer]]
        for key in sorted(needed):
            if key in cache:
                cache.hit(key)
                result.hits += 1
                continue
            result.misses += 1
            result.bytes_read[access.phase] += cost[access.layer]
            if room(group_of[access.layer], needed | guessed, needed):
                cache.insert(key)
            # else: every slot holds a key this access needs: run it without keeping it
    return result


def belady(accesses: list[Access], capacity: Mapping[Hashable, int], group_of: Mapping[int, Hashable],
           cost: Mapping[int, int], name: str = "belady") -> ReplayResult:
    """Belady's MIN, demand only: on a miss with no room, evict the resident key (in the group)
    whose next use is farthest (never used again first). Optimal in misses for one slot size; the
    bound no online policy can beat at this capacity."""
    uses: dict[Key, list[int]] = defaultdict(list)
    for t, access in enumerate(accesses):
        for e in access.needed:
            uses[(access.layer, e)].append(t)
    pointer: dict[Key, int] = defaultdict(int)
    never = len(accesses) + 1
    resident: dict[Hashable, dict[Key, int]] = {g: {} for g in capacity}  # key -> its next use
    heaps: dict[Hashable, list[tuple[int, Key]]] = {g: [] for g in capacity}
    result = ReplayResult(name)

    def next_use(key: Key) -> int:
        times = uses[key]
        i = pointer[key]
        return times[i] if i < len(times) else never

    for t, access in enumerate(accesses):
        group = group_of[access.layer]
        held, heap = resident[group], heaps[group]
        needed = {(access.layer, e) for e in access.needed}
        for key in needed:
            pointer[key] += 1  # this use is now past
        for key in sorted(needed):
            if key in held:
                result.hits += 1
            else:
                result.misses += 1
                result.bytes_read[access.phase] += cost[access.layer]
                if capacity[group] <= 0:
                    continue
                if len(held) >= capacity[group]:
                    passed = []
                    victim = None
                    while heap:
                        entry = heapq.heappop(heap)
                        when, candidate = -entry[0], entry[1]
                        if held.get(candidate) != when:
                            continue  # stale
                        if candidate in needed:
                            passed.append(entry)
                            continue
                        victim = candidate
                        break
                    for entry in passed:
                        heapq.heappush(heap, entry)
                    if victim is None:
                        continue  # every slot holds a key this access needs
                    del held[victim]
            when = next_use(key)
            held[key] = when
            heapq.heappush(heap, (-when, key))
    return result


def optimal_miss_rate(steps: Iterable[Iterable[int]], capacity: int) -> float:
    """Belady's miss rate over one layer's steps (as replay_miss_rate): what no policy goes below."""
    result = belady([Access("decode", 0, frozenset(step)) for step in steps], {0: capacity}, {0: 0}, {0: 1})
    total = result.hits + result.misses
    return result.misses / total if total else 0.0


def replay_miss_rate(policy: str, steps: Iterable[Iterable[int]], capacity: int) -> float:
    """Miss rate of demand-only caching with `capacity` slots over one layer's steps (each the
    experts one token, or one step's tokens, need at once): the profiler's miss curves."""
    accesses = [Access("decode", 0, frozenset(step)) for step in steps]
    result = simulate(accesses, policy, {0: capacity}, {0: 0}, {0: 1}, prefetch=False)
    total = result.hits + result.misses
    return result.misses / total if total else 0.0
