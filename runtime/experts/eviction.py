"""Eviction policies over opaque keys (one instance per eviction group: the global pool, or a layer).

They know nothing of ONNX, tokens or bytes: the expert cache asks them which resident key to
give up, and tells them about hits and insertions. The compiler's profiler replays calibration
routing through the same classes to draw miss-rate curves, so profile and runtime agree.

ARC follows Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache" (FAST 2003):
T1 holds keys seen once recently, T2 keys seen at least twice; the ghost lists B1/B2 remember
recent evictions from each, and a ghost hit moves the target size p of T1 towards the list that
would have kept the key.

LFRU is LRFU (Lee et al., "LRFU: A Spectrum of Policies that Subsumes the LRU and LFU Policies",
IEEE Trans. Computers 2001): each key's combined recency and frequency is the sum over its uses of
2^(-age/half_life), ages counted in accesses; the key with the least is evicted. Ordering between
two keys does not change while neither is used, so a heap keyed by log2(score) + time/half_life
finds the least without rescoring.

S3-FIFO follows Yang et al., "FIFO queues are all you need for cache eviction" (SOSP 2023): a
small FIFO (a tenth of the capacity) filters keys used once; keys used again there move to the main
FIFO, which gives each key as many second chances as it was used (at most 3); a ghost FIFO of
recent evictions from the small queue sends a returning key straight to the main one.
"""

from __future__ import annotations

import heapq
import itertools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Container, Hashable

Key = Hashable


class EvictionPolicy(ABC):
    def __init__(self, capacity: int):
        self.capacity = capacity

    @abstractmethod
    def hit(self, key: Key) -> None:
        """A resident key was used."""

    @abstractmethod
    def insert(self, key: Key, cold: bool = False) -> None:
        """A key became resident (the caller made room first). `cold`: it was prefetched, not
        asked for, so it goes where eviction looks first until a real use promotes it; a wrong
        prediction then displaces other predictions, not the experts that keep hitting."""

    @abstractmethod
    def victim(self, incoming: Key | None, exclude: Container[Key]) -> Key | None:
        """The resident key to evict to make room for `incoming`, never one in `exclude`
        (None if every resident key is excluded). The victim is removed from the policy."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """Forget a resident key without counting it as an eviction (e.g. a failed load)."""

    @abstractmethod
    def __contains__(self, key: Key) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...


def _pop_oldest(order: OrderedDict, exclude: Container[Key]) -> Key | None:
    for key in order:
        if key not in exclude:
            del order[key]
            return key
    return None


class LRU(EvictionPolicy):
    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.order: OrderedDict[Key, None] = OrderedDict()

    def hit(self, key: Key) -> None:
        self.order.move_to_end(key)

    def insert(self, key: Key, cold: bool = False) -> None:
        self.order[key] = None
        if cold:
            self.order.move_to_end(key, last=False)

    def victim(self, incoming: Key | None, exclude: set[Key]) -> Key | None:
        return _pop_oldest(self.order, exclude)

    def remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self.order

    def __len__(self) -> int:
        return len(self.order)


class ARC(EvictionPolicy):
    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.t1: OrderedDict[Key, None] = OrderedDict()
        self.t2: OrderedDict[Key, None] = OrderedDict()
        self.b1: OrderedDict[Key, None] = OrderedDict()
        self.b2: OrderedDict[Key, None] = OrderedDict()
        self.p = 0.0  # target size of T1

    def hit(self, key: Key) -> None:
        self.t1.pop(key, None)
        self.t2[key] = None
        self.t2.move_to_end(key)

    def insert(self, key: Key, cold: bool = False) -> None:
        c = max(self.capacity, 1)
        if key in self.b1:  # evicted from T1 too early: grow T1's target
            self.p = min(c, self.p + max(len(self.b2) / max(len(self.b1), 1), 1))
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:  # evicted from T2 too early: shrink T1's target
            self.p = max(0.0, self.p - max(len(self.b1) / max(len(self.b2), 1), 1))
            del self.b2[key]
            self.t2[key] = None
        else:
            self.t1[key] = None
            if cold:
                self.t1.move_to_end(key, last=False)
        # ghosts remember at most one cache's worth of keys each
        while len(self.b1) > c:
            self.b1.popitem(last=False)
        while len(self.b2) > c:
            self.b2.popitem(last=False)

    def victim(self, incoming: Key | None, exclude: set[Key]) -> Key | None:
        prefer_t1 = self.t1 and (len(self.t1) > self.p or (incoming in self.b2 and len(self.t1) >= self.p))
        order = ((self.t1, self.b1), (self.t2, self.b2))
        for resident, ghost in (order if prefer_t1 else order[::-1]):
            key = _pop_oldest(resident, exclude)
            if key is not None:
                ghost[key] = None
                return key
        return None

    def remove(self, key: Key) -> None:
        self.t1.pop(key, None)
        self.t2.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self.t1 or key in self.t2

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)


class LFRU(EvictionPolicy):
    COLD = -30.0  # log2 of a prefetched key's score until it is used: below any key used once

    def __init__(self, capacity: int, half_life: float | None = None):
        super().__init__(capacity)
        self.half_life = half_life or max(capacity, 1)
        self.clock = 0
        self.score: dict[Key, float] = {}  # key -> log2(score) + time / half_life (time-independent)
        self.heap: list[tuple[float, int, Key]] = []
        # entries a search found held (`exclude`), off the heap until a search finds them free: a layer kept at
        # its floor holds its keys for the whole run, and popping and pushing them back at every search cost the
        # loop about twice S3-FIFO's search at Qwen3.5-MoE shapes (S3FIFO.small_parked)
        self.parked: list[tuple[float, int, Key]] = []
        self.seq = itertools.count()

    def _use(self, key: Key, log_score: float) -> None:
        self.clock += 1
        value = log_score + self.clock / self.half_life
        self.score[key] = value
        heapq.heappush(self.heap, (value, next(self.seq), key))

    def hit(self, key: Key) -> None:
        old = self.score.get(key)
        now = (self.clock + 1) / self.half_life
        # 1 + the old score decayed to now, in log2: log2(1 + 2^(old - now))
        self._use(key, 0.0 if old is None else math.log2(1.0 + 2.0 ** min(old - now, 60.0)))

    def insert(self, key: Key, cold: bool = False) -> None:
        self._use(key, self.COLD if cold else 0.0)

    def victim(self, incoming: Key | None, exclude: Container[Key]) -> Key | None:
        held = []  # the parked entries still valid: the free ones go back on the heap, the held stay parked
        for entry in self.parked:
            if self.score.get(entry[2]) == entry[0]:
                if entry[2] in exclude:
                    held.append(entry)
                else:
                    heapq.heappush(self.heap, entry)
        self.parked, found = held, None
        while self.heap:
            entry = heapq.heappop(self.heap)
            value, _, key = entry
            if self.score.get(key) != value:
                continue  # a stale entry: the key was used since, or is gone
            if key in exclude:
                self.parked.append(entry)
                continue
            del self.score[key]
            found = key
            break
        if len(self.heap) > 4 * len(self.score) + 64:  # drop stale entries now and then
            self.heap = [(v, n, k) for v, n, k in self.heap if self.score.get(k) == v]
            heapq.heapify(self.heap)
        return found

    def remove(self, key: Key) -> None:
        self.score.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self.score

    def __len__(self) -> int:
        return len(self.score)


class S3FIFO(EvictionPolicy):
    MAX_FREQ = 3

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.small: OrderedDict[Key, None] = OrderedDict()
        self.main: OrderedDict[Key, None] = OrderedDict()
        self.ghost: OrderedDict[Key, None] = OrderedDict()
        self.freq: dict[Key, int] = {}
        self.small_target = max(1, capacity // 10)
        # Keys a search found held (`exclude`) at a queue's head, in the queue's order: parked ahead of
        # their queue until a search finds them free. A layer kept at its floor holds its keys for the
        # whole run: set aside and put back at every search they cost the loop about 100 us a load (64
        # such keys a search at Qwen3.5-MoE shapes); parked, one question each.
        self.small_parked: list[Key] = []
        self.main_parked: list[Key] = []

    def order(self) -> tuple[list[Key], list[Key]]:
        """The small and main queues' keys in eviction order: each queue's parked keys, then the queue."""
        return self.small_parked + list(self.small), self.main_parked + list(self.main)

    def hit(self, key: Key) -> None:
        self.freq[key] = min(self.freq.get(key, 0) + 1, self.MAX_FREQ)

    def insert(self, key: Key, cold: bool = False) -> None:
        self.freq[key] = 0
        if key in self.ghost and not cold:
            del self.ghost[key]
            self.main[key] = None
        else:
            self.small[key] = None

    def victim(self, incoming: Key | None, exclude: Container[Key]) -> Key | None:
        # each pass either evicts, moves a key from small to main (once per key) or takes one of a
        # main key's second chances (at most MAX_FREQ): bounded. A key `exclude` holds is parked where a
        # pass meets it at a queue's head and asked about once per call (it stays held for the whole
        # call): the same victim as scanning each queue from its head on every pass.
        queues = ((self.small, self.small_parked, [0]), (self.main, self.main_parked, [0]))

        def first_allowed(queue: OrderedDict, parked: list[Key], known: list[int]) -> Key | None:
            """The first key of queue's order `exclude` does not hold; known[0]: how many of its parked
            keys this call found held."""
            for i in range(known[0], len(parked)):
                if parked[i] not in exclude:  # free again: back in its queue, whence the pass evicts or moves it
                    known[0] = i
                    key = parked.pop(i)
                    queue[key] = None
                    return key
            known[0] = len(parked)
            while queue:
                key = next(iter(queue))
                if key not in exclude:
                    return key
                del queue[key]
                parked.append(key)
                known[0] += 1
            return None

        for _ in range((self.MAX_FREQ + 2) * len(self.freq) + 1):
            small = len(self.small) + len(self.small_parked)
            from_small = small > 0 and (small >= self.small_target or not (self.main or self.main_parked))
            queue = key = None
            for candidate, parked, known in (queues if from_small else queues[::-1]):
                key = first_allowed(candidate, parked, known)
                if key is not None:
                    queue = candidate
                    break
            if key is None:
                return None
            if self.freq[key] > 0:  # used since it came in: kept, in main
                if queue is self.small:
                    del self.small[key]
                    self.freq[key] = 0
                    self.main[key] = None
                else:
                    self.freq[key] -= 1
                    self.main.move_to_end(key)
                continue
            del queue[key]
            del self.freq[key]
            if queue is self.small:
                self.ghost[key] = None
                while len(self.ghost) > max(self.capacity, 1):
                    self.ghost.popitem(last=False)
            return key
        return None

    def remove(self, key: Key) -> None:
        for queue, parked in ((self.small, self.small_parked), (self.main, self.main_parked)):
            if key in queue:
                del queue[key]
                break
            if key in parked:
                parked.remove(key)
                break
        self.freq.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self.freq

    def __len__(self) -> int:
        return len(self.freq)


POLICIES = {"arc": ARC, "lru": LRU, "lfru": LFRU, "s3fifo": S3FIFO}
# Chosen by replay and measured runs (BENCHMARKS.md, 2026-12-07): on the trained example S3-FIFO reads
# 0.80-0.82x the bytes ARC reads at 25-50%, and at qwen shapes it decodes 1.02-1.13x ARC's speed
DEFAULT_POLICY = "s3fifo"
