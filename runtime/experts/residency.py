"""The expert cache: slots fed by background prefetch threads, with on-demand loading on a miss.

Keys are (layer, expert). Slots belong to eviction groups, each with its own eviction policy (from
runtime.experts.eviction) built with the group's real capacity, the one the profiler replays. By default one
group per slot size holds every layer of that size (one global pool: a layer whose experts are
needed now takes slots from one whose experts are not); with `groups` mapping each layer to itself,
each layer keeps its own quota (`--pool per-layer`). The cache knows nothing of ONNX or tokens: `load(layer, expert, slot)` fills a
slot and returns whatever the executor needs, with the bytes it read.

- `prefetch(layer, experts, step)`: queue loads in priority order for the prefetch threads; a newer
  step for the same layer makes older queued requests stale (dropped when dequeued). A prefetch
  never evicts a pinned or protected expert, and is dropped when no slot can be had.
- `start_prefetch(layer, experts)`: the same loads begun at once in the caller's thread (reads on
  the native I/O threads, no prefetch thread involved); finished by whoever asks for the expert, or
  by `harvest()` once their reads are over; `retire(layer, wanted)` gives up those whose reads have
  not begun once the layer's routing is known.
- `fetch(layer, expert)`: the expert, pinned: resident -> hit; in flight -> wait for that load
  (never load twice); otherwise load it now in the caller's thread into a free or evicted slot,
  waiting for one if every slot is pinned or being filled. The caller unpins it after running it.
- `take_resident(layer, experts)`: those resident now, pinned (hits).
A slot being filled or run is never evicted. An exception in a prefetch thread is kept and raised
in the caller at its next `fetch`/`prefetch`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
from fate.artifacts import FateError

from .eviction import DEFAULT_POLICY, POLICIES, EvictionPolicy

Key = tuple[int, int]


class SlotLoads(Protocol):
    """What fills the cache's slots: the offloaded store's reads (OffloadedExperts), or a test's fakes."""

    def load(self, layer: int, expert: int, slot: int) -> tuple[object, int]:
        """The expert read into the slot now, on the calling thread: (its value, bytes read from storage)."""

    def start(self, layer: int, expert: int, slot: int, urgent: bool):
        """The same load begun: an object with `done()`, `cancel()` (True when its read had not begun: it is
        given up) and `result()` (load's). `urgent` (a miss the loop is stalled on: start_fetch) goes
        before those queued (prefetches: start_prefetch)."""

    def locate(self, key: Key, value: object) -> int:
        """Where a loaded expert's bytes lie in its slot memory (the cache's `located` arrays)."""


class BudgetError(FateError):
    """The memory budget cannot hold what generation needs; `needed`: the least budget that would."""

    def __init__(self, message: str, needed: int | None = None):
        super().__init__(message)
        self.needed = needed


@dataclass
class LayerCounters:
    gets: int = 0
    hits: int = 0  # resident when asked for
    waits: int = 0  # in flight when asked for (a late prefetch)
    misses: int = 0  # loaded on demand
    prefetched: int = 0  # loads started by the prefetcher
    evictions: int = 0


@dataclass
class CacheCounters:
    loads: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0  # time the generation loop spent waiting for loads
    dropped_stale: int = 0
    layers: dict[int, LayerCounters] = field(default_factory=dict)

    def layer(self, index: int) -> LayerCounters:
        return self.layers.setdefault(index, LayerCounters())


class ExpertCache:
    def __init__(self, slots: dict[int, int], loads: "SlotLoads", policy: str = DEFAULT_POLICY, threads: int = 2,
                 located: dict[int, np.ndarray] | None = None, groups: dict[int, object] | None = None,
                 floors: dict[int, int] | None = None):
        """slots: layer -> slot count; loads: what fills a slot (SlotLoads); located: layer -> an array
        by expert id that the cache keeps equal to `loads.locate(key, value)` of each resident expert
        and -1 for the others (set when it becomes resident, -1 before its slot is reused);
        groups: layer -> its eviction group (default: its own), whose slots are the sum of its layers'
        and are numbered within the group; floors: layer -> how many of its experts other layers' loads
        never evict (in a shared group: a layer whose misses nothing prefetches keeps its share)."""
        self.slots = dict(slots)
        self.group_of = {layer: layer for layer in slots} if groups is None else {layer: groups[layer] for layer in slots}
        self.group_slots: dict[object, int] = Counter()
        for layer, n in slots.items():
            self.group_slots[self.group_of[layer]] += n
        self.located = located or {}
        self._loads = loads
        self._policies: dict[object, EvictionPolicy] = {g: POLICIES[policy](n) for g, n in self.group_slots.items()}
        self._resident: dict[Key, tuple[object, int]] = {}  # key -> (value, slot)
        self._free: dict[object, list[int]] = {g: list(range(n - 1, -1, -1)) for g, n in self.group_slots.items()}
        self._inflight: dict[Key, Future] = {}
        self._begun: dict[Key, _Loading] = {}  # start_prefetch's loads nobody has asked for yet
        self._wanted: Counter = Counter()  # in flight: how many callers wait for it (pinned on arrival)
        self._pins: Counter = Counter()  # (layer, expert) -> how many callers run it now
        self.floors = floors or {}
        self._held: Counter = Counter()  # layer -> experts resident
        self._protected: dict[int, set[int]] = {layer: set() for layer in slots}
        self._lock = threading.RLock()
        self._slot_freed = threading.Condition(self._lock)
        self._queue: list = []
        self._seq = itertools.count()
        self._latest_step: dict[int, int] = {}
        self._wake = threading.Condition(self._lock)
        self._error: BaseException | None = None
        self._closed = False
        self.counters = CacheCounters()
        self._workers = [threading.Thread(target=self._work, name=f"fate-prefetch-{i}", daemon=True)
                         for i in range(threads)]
        for w in self._workers:
            w.start()

    # ------------------------------------------------------------------ public

    def take_resident(self, layer: int, experts: list[int]) -> dict[int, object]:
        """The experts of `layer` resident now, each pinned and counted as a hit."""
        counters = self.counters.layer(layer)
        found = {}
        with self._lock:
            for expert in experts:
                entry = self._pin_resident((layer, expert), counters)
                if entry is not None:
                    found[expert] = entry[0]
        return found

    def count_hits(self, layer: int, experts: list[int]) -> None:
        """`experts` of `layer`, resident, were used without being taken (pinned): counted as hits
        and made recent, as take_resident would."""
        counters = self.counters.layer(layer)
        with self._lock:
            for expert in experts:
                if (layer, expert) in self._resident:  # the eviction policy must never hold another key
                    counters.gets += 1
                    counters.hits += 1
                    self._policies[self.group_of[layer]].hit((layer, expert))

    def fetch(self, layer: int, expert: int) -> object:
        """The expert's value, pinned; loaded here on a miss unless it is in flight."""
        self._raise_background_error()
        key = (layer, expert)
        counters = self.counters.layer(layer)
        with self._lock:
            entry = self._pin_resident(key, counters)
            if entry is not None:
                return entry[0]
            begun = self._claim_begun(key, counters)
            if begun is None:
                counters.gets += 1
                future = self._inflight.get(key)
                run_here = future is None
                if run_here:
                    counters.misses += 1
                    future = self._inflight[key] = Future()
                else:
                    counters.waits += 1
            self._wanted[key] += 1  # pinned the moment it arrives, before anyone can evict it
        if begun is not None:
            return begun.result()
        if run_here:
            slot = self._acquire_slot(layer, demand=True)
            self._complete(key, future, slot)
        return future.result()  # re-raises a failed load

    def start_fetch(self, layer: int, expert: int):
        """A demand load the caller waits for itself, never blocking here: an object with `done()`
        and `result()` (the value, pinned), or None when no slot of `layer` can be had now (every
        one pinned or being filled: the caller runs what it has, unpins, and asks again). Needs
        `start` (see __init__); loads happen as in `fetch`, counted the same."""
        self._raise_background_error()
        key = (layer, expert)
        counters = self.counters.layer(layer)
        with self._lock:
            entry = self._pin_resident(key, counters)
            if entry is not None:
                return _Ready(entry[0])
            begun = self._claim_begun(key, counters)
            if begun is not None:
                self._wanted[key] += 1
                return begun
            future = self._inflight.get(key)
            if future is None:
                slot = self._take_slot(layer, demand=True)
                if slot is None:
                    return None
                pending = self._begin(layer, expert, slot, urgent=True)
                future = self._inflight[key] = Future()
                counters.misses += 1
            else:
                counters.waits += 1
                pending = None
            counters.gets += 1
            self._wanted[key] += 1  # pinned the moment it arrives, before anyone can evict it
        if pending is None:
            return future
        return _Loading(self, key, future, slot, pending)

    def start_prefetch(self, layer: int, experts: list[int]) -> None:
        """Begin loads of `experts` (best first) of `layer` now, never waiting: into free slots or
        evicted ones (never a pinned or protected expert's), stopping at the first no slot can be
        had for. Needs `start_background` (see __init__)."""
        self._raise_background_error()
        counters = self.counters.layer(layer)
        with self._lock:
            for expert in experts:
                key = (layer, expert)
                if key in self._resident or key in self._inflight:
                    continue
                slot = self._take_slot(layer, demand=False)
                if slot is None:  # every slot pinned, protected or being filled
                    self.counters.dropped_stale += 1
                    return
                pending = self._begin(layer, expert, slot, urgent=False)
                future = self._inflight[key] = Future()
                counters.prefetched += 1
                self._begun[key] = _Loading(self, key, future, slot, pending, prefetched=True)

    def retire(self, layer: int, wanted) -> None:
        """`layer`'s routing is known: its begun prefetches of other experts whose reads no I/O
        thread has started are given up, and their slots come back (the storage reads what
        this token needs instead)."""
        if not self._begun:  # added to by the caller's thread alone (start_prefetch): empty stays empty
            return
        with self._lock:
            for key in [k for k in self._begun if k[0] == layer and k[1] not in wanted]:
                loading = self._begun[key]
                if loading.cancel():
                    del self._begun[key]
                    self._inflight.pop(key, None)
                    self._free[self.group_of[layer]].append(loading.slot)
                    self.counters.dropped_stale += 1
                    loading.future.cancel()  # unclaimed: nobody waits on it
                    self._slot_freed.notify_all()

    def harvest(self) -> None:
        """Finish the begun prefetches whose reads are over (never waits): resident, evictable."""
        if self._begun:
            self._finish_begun(lambda key, loading: loading.done())

    def settle_begun(self, layer: int) -> bool:
        """Wait for `layer`'s begun prefetches and finish them, so that their slots can be had;
        whether there were any."""
        return self._finish_begun(lambda key, loading: key[0] == layer)

    def unpin(self, layer: int, experts) -> None:
        with self._lock:
            pins = self._pins
            for expert in experts:
                key = (layer, expert)
                pins[key] -= 1
                if pins[key] <= 0:
                    del pins[key]
            self._slot_freed.notify_all()

    def protect(self, layer: int, experts: set[int]) -> None:
        """Experts of `layer` that prefetches must not evict (this step's predictions)."""
        with self._lock:
            self._protected[layer] = set(experts)

    def prefetch(self, layer: int, experts: list[int], step: int) -> None:
        """Queue loads of `experts` (best first) for `layer`; older requests for it go stale."""
        self._raise_background_error()
        with self._lock:
            self._latest_step[layer] = step
            for rank, expert in enumerate(experts):
                key = (layer, expert)
                if key in self._resident or key in self._inflight:
                    continue
                heapq.heappush(self._queue, (step, layer, rank, next(self._seq), key))
            self._wake.notify_all()

    def resident(self, layer: int) -> set[int]:
        with self._lock:
            return {e for (l, e) in self._resident if l == layer}

    def absent(self, layer: int, experts: set[int]) -> set[int]:
        """Those of `experts` that are not resident (loading counts as not)."""
        with self._lock:
            return {e for e in experts if (layer, e) not in self._resident}

    def resident_count(self) -> int:
        with self._lock:
            return len(self._resident)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._wake.notify_all()
            self._slot_freed.notify_all()
            begun = list(self._begun.values())
            self._begun.clear()
        for loading in begun:  # no read may still write into the slots once the pool goes
            if not loading.cancel():
                loading.settle_quietly()
        for w in self._workers:
            w.join(timeout=5)

    # ------------------------------------------------------------------ internals

    def _acquire_slot(self, layer: int, demand: bool) -> int | None:
        """A free slot of `layer`, or the slot of an evicted expert. Demand waits until one can be
        had (a load in flight finishes, a pin is released); a prefetch takes None instead."""
        with self._lock:
            while True:
                slot = self._take_slot(layer, demand)
                if slot is not None or not demand or self._closed:
                    return slot
                self._slot_freed.wait()

    def _take_slot(self, layer: int, demand: bool) -> int | None:
        """A free slot, or an evicted expert's: never a pinned one, nor a protected one (a running
        layer's experts, a prediction for the next layers: in one pool, a layer's misses would otherwise
        evict the prefetches just begun for the next); a demand load that finds every unpinned expert
        protected takes a protected one rather than wait. None when nothing can be had now. Under the lock."""
        group = self.group_of[layer]
        if self._free[group]:
            return self._free[group].pop()
        policy = self._policies[group]
        victim = policy.victim(None, _Kept(self._pins, self._protected, self.floors, self._held, layer))
        if victim is None and demand:
            victim = policy.victim(None, _Kept(self._pins, None))
        if victim is None:
            return None
        _, slot = self._resident.pop(victim)
        self._held[victim[0]] -= 1
        if victim[0] in self.located:
            self.located[victim[0]][victim[1]] = -1
        self.counters.layer(victim[0]).evictions += 1
        return slot

    def _complete(self, key: Key, future: Future, slot: int | None, prefetched: bool = False) -> None:
        """Load `key` into `slot` (outside the lock), make it resident, resolve its future."""
        def load():
            if slot is None:
                raise BudgetError(f"no slot of layer {key[0]} could be had (closing)")
            return self._loads.load(key[0], key[1], slot)
        self._settle(key, future, slot, load, prefetched)

    def _settle(self, key: Key, future: Future, slot: int | None, load, prefetched: bool = False) -> None:
        """Run `load` (outside the lock): make `key` resident in `slot` and resolve its future, or
        free the slot and hand the failure to whoever waits."""
        layer = key[0]
        try:
            value, read = load()
            where = self._loads.locate(key, value) if layer in self.located else None
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            with self._lock:
                self._inflight.pop(key, None)
                self._wanted.pop(key, None)
                if slot is not None:
                    self._free[self.group_of[layer]].append(slot)
                self._slot_freed.notify_all()
            future.set_exception(e)
            return
        with self._lock:
            self.counters.loads += 1
            self.counters.bytes_read += read
            self._resident[key] = (value, slot)
            self._held[layer] += 1
            if where is not None:
                self.located[layer][key[1]] = where
            waiting = self._wanted.pop(key, 0)
            self._policies[self.group_of[layer]].insert(key, cold=prefetched and not waiting)
            if waiting:
                self._pins[key] += waiting
            self._inflight.pop(key, None)
            self._slot_freed.notify_all()
        future.set_result(value)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                step, layer, _, _, key = heapq.heappop(self._queue)
                if step < self._latest_step.get(layer, step):
                    self.counters.dropped_stale += 1
                    continue
                if key in self._resident or key in self._inflight:
                    continue
                slot = self._acquire_slot(layer, demand=False)
                if slot is None:  # every slot pinned, protected or being filled: not worth waiting for
                    self.counters.dropped_stale += 1
                    continue
                future = self._inflight[key] = Future()
                self.counters.layer(layer).prefetched += 1
            self._complete(key, future, slot, prefetched=True)
            exc = future.exception()
            if exc is not None:
                with self._lock:
                    self._error = self._error or exc

    def _pin_resident(self, key: Key, counters: LayerCounters) -> tuple[object, int] | None:
        """`key`'s entry if resident, pinned and counted as a hit. Under the lock."""
        entry = self._resident.get(key)
        if entry is not None:
            counters.gets += 1
            counters.hits += 1
            self._policies[self.group_of[key[0]]].hit(key)
            self._pins[key] += 1
        return entry

    def _begin(self, layer: int, expert: int, slot: int, urgent: bool):
        """loads.start(layer, expert, slot, urgent), giving the slot back if it fails. Under the lock."""
        try:
            return self._loads.start(layer, expert, slot, urgent)
        except BaseException:
            self._free[self.group_of[layer]].append(slot)
            raise

    def _claim_begun(self, key: Key, counters: LayerCounters) -> _Loading | None:
        """A begun prefetch of `key`, now the caller's to finish (counted as a hit when its read is
        over, else as a late prefetch); a read still queued is begun again as urgent. Under the lock."""
        loading = self._begun.pop(key, None)
        if loading is None:
            return None
        counters.gets += 1
        if loading.done():
            counters.hits += 1
        else:
            counters.waits += 1
            if loading.cancel():
                try:
                    loading.pending = self._begin(key[0], key[1], loading.slot, urgent=True)
                except BaseException:
                    self._inflight.pop(key, None)
                    loading.future.cancel()
                    raise
        return loading

    def _finish_begun(self, which: Callable[[Key, _Loading], bool]) -> bool:
        """Finish (waiting where need be) the begun prefetches nobody asked for that `which` picks;
        a failure is raised at the next fetch, as a prefetch thread's is. Whether there were any."""
        with self._lock:
            picked = [self._begun.pop(key) for key, loading in list(self._begun.items()) if which(key, loading)]
        for loading in picked:
            error = loading.settle_quietly()
            if error is not None:
                with self._lock:
                    self._error = self._error or error
        return bool(picked)

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _Kept:
    """The keys eviction must pass over, answered per key without building a set: pinned ones (being
    run or filled); protected ones (a running layer's experts, predictions); and, in a shared pool, those
    of a layer other than `asker` that holds no more than its floor, and the asker's own while it holds
    fewer than its floor (it grows to its floor by taking from the others)."""

    def __init__(self, pins: Counter, protected: dict[int, set[int]] | None, floors: dict[int, int] | None = None,
                 held: Counter | None = None, asker: int | None = None):
        self._pins, self._protected = pins, protected
        # the layers held at their floor, every key of which is kept: asked once per search, not per key
        self._floored = {layer for layer, floor in (floors or {}).items()
                         if (held[layer] < floor if layer == asker else held[layer] <= floor)}

    def __contains__(self, key: Key) -> bool:
        if key[0] in self._floored or self._pins.get(key, 0) > 0:
            return True
        return self._protected is not None and key[1] in self._protected.get(key[0], ())


class _Ready:
    """start_fetch's answer for an expert already resident (pinned)."""

    def __init__(self, value: object):
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> object:
        return self.value


class _Loading:
    """A load the cache began (start_fetch, start_prefetch): finished (made resident, pinned for
    those who asked) by whoever asks for the result, once; others waiting on the same expert wait
    on its future."""

    def __init__(self, cache: ExpertCache, key: Key, future: Future, slot: int, pending, prefetched: bool = False):
        self._cache, self._key, self.future, self.slot, self.pending = cache, key, future, slot, pending
        self._prefetched = prefetched
        self._settled = False

    def done(self) -> bool:
        return self._settled or self.pending.done()

    def cancel(self) -> bool:
        """Give up the read if it has not begun (the caller then owns the slot again)."""
        return not self._settled and self.pending.cancel()

    def result(self) -> object:
        if not self._settled:
            self._settled = True
            self._cache._settle(self._key, self.future, self.slot, self.pending.result, self._prefetched)
        return self.future.result()  # re-raises a failed load

    def settle_quietly(self) -> BaseException | None:
        """Finish it, giving the failure back instead of raising it."""
        try:
            self.result()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            return e
        return None
