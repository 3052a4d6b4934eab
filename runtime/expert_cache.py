"""The expert cache: per-layer groups of resident experts within a byte budget, fed by
background prefetch threads, with on-demand loading on a miss.

Keys are (layer, expert). Each layer is one eviction group with its own capacity in bytes and
its own eviction policy (ARC or LRU, from runtime.cache). The cache knows nothing of ONNX or
tokens: it stores whatever `load(layer, expert)` returns, with the byte size that came with it.

Requests:
- `prefetch(layer, experts, step)`: queue loads in priority order; a newer step for the same
  layer makes older queued requests stale (dropped when dequeued); a key already resident or in
  flight is not queued again.
- `get(layer, expert)`: resident -> hit; in flight -> wait for that load (never load twice);
  otherwise load it now in the caller's thread (an expert needed now jumps the queue).
An exception in a prefetch thread is kept and raised in the caller at its next `get`/`prefetch`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from fate.artifacts import FateError

from .cache import POLICIES, EvictionPolicy

Key = tuple[int, int]


class BudgetError(FateError):
    """The memory budget cannot hold what generation needs."""


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
    stall_s: float = 0.0  # time get() spent waiting for loads
    dropped_stale: int = 0
    layers: dict[int, LayerCounters] = field(default_factory=dict)

    def layer(self, index: int) -> LayerCounters:
        return self.layers.setdefault(index, LayerCounters())


@dataclass
class _Entry:
    value: object
    nbytes: int


class ExpertCache:
    def __init__(self, capacities: dict[int, int], load: Callable[[int, int], tuple[object, int, int]],
                 policy: str = "arc", threads: int = 2):
        """capacities: bytes per layer group; load(layer, expert) -> (value, nbytes it costs resident,
        bytes it read from storage)."""
        self.capacities = capacities
        self._load = load
        self._policies: dict[int, EvictionPolicy] = {layer: POLICIES[policy](1 << 30) for layer in capacities}
        self._resident: dict[Key, _Entry] = {}
        self._used = {layer: 0 for layer in capacities}
        self._inflight: dict[Key, Future] = {}
        self._wanted: set[Key] = set()  # in flight and already asked for
        self._pinned: dict[int, set[int]] = {layer: set() for layer in capacities}
        self._lock = threading.RLock()
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

    def get(self, layer: int, expert: int, count_stall: bool = True) -> object:
        """The expert's value, loaded here on a miss unless it is in flight. count_stall=False for
        calls from a helper thread: its waiting is not the generation loop's."""
        self._raise_background_error()
        key = (layer, expert)
        counters = self.counters.layer(layer)
        with self._lock:
            counters.gets += 1
            entry = self._resident.get(key)
            if entry is not None:
                counters.hits += 1
                self._policies[layer].hit(key)
                return entry.value
            future = self._inflight.get(key)
            if future is None:
                counters.misses += 1
                future = self._start(key)
                run_here = True
            else:
                counters.waits += 1
                self._wanted.add(key)
                run_here = False
        start = time.perf_counter()
        if run_here:
            self._complete(key, future)
        value = future.result()  # re-raises a failed load
        if count_stall:
            self.counters.stall_s += time.perf_counter() - start
        return value

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

    def pin(self, layer: int, experts: set[int]) -> None:
        """Experts of `layer` that eviction must spare until unpinned (the ones being run)."""
        with self._lock:
            self._pinned[layer] = set(experts)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(self._used.values())

    def resident(self, layer: int) -> set[int]:
        with self._lock:
            return {e for (l, e) in self._resident if l == layer}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._wake.notify_all()
        for w in self._workers:
            w.join(timeout=5)

    # ------------------------------------------------------------------ internals

    def _start(self, key: Key) -> Future:
        future: Future = Future()
        self._inflight[key] = future
        return future

    def _complete(self, key: Key, future: Future, prefetched: bool = False) -> None:
        """Load `key` (outside the lock), insert it, resolve its future."""
        try:
            value, nbytes, read = self._load(*key)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            with self._lock:
                self._inflight.pop(key, None)
            future.set_exception(e)
            return
        with self._lock:
            self.counters.loads += 1
            self.counters.bytes_read += read
            self._insert(key, value, nbytes, cold=prefetched and key not in self._wanted)
            self._inflight.pop(key, None)
            self._wanted.discard(key)
        future.set_result(value)

    def _insert(self, key: Key, value: object, nbytes: int, cold: bool = False) -> None:
        layer = key[0]
        policy = self._policies[layer]
        exclude = {(layer, e) for e in self._pinned[layer]}
        while self._used[layer] + nbytes > self.capacities[layer]:
            victim = policy.victim(key, exclude)
            if victim is None:
                # Nothing evictable: the value is used once and not kept (the budget holds).
                return
            self._used[layer] -= self._resident.pop(victim).nbytes
            self.counters.layer(layer).evictions += 1
        self._resident[key] = _Entry(value, nbytes)
        self._used[layer] += nbytes
        policy.insert(key, cold=cold)

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
                future = self._start(key)
                self.counters.layer(layer).prefetched += 1
            self._complete(key, future, prefetched=True)
            exc = future.exception()
            if exc is not None:
                with self._lock:
                    self._error = self._error or exc

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
