"""Eviction policies over opaque keys (one instance per layer: one eviction group each).

They know nothing of ONNX, tokens or bytes: the expert cache asks them which resident key to
give up, and tells them about hits and insertions. The compiler's profiler replays calibration
routing through the same classes to draw miss-rate curves, so profile and runtime agree.

ARC follows Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache" (FAST 2003):
T1 holds keys seen once recently, T2 keys seen at least twice; the ghost lists B1/B2 remember
recent evictions from each, and a ghost hit moves the target size p of T1 towards the list that
would have kept the key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Hashable, Iterable

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
    def victim(self, incoming: Key | None, exclude: set[Key]) -> Key | None:
        """The resident key to evict to make room for `incoming`, never one in `exclude`
        (None if every resident key is excluded). The victim is removed from the policy."""

    @abstractmethod
    def remove(self, key: Key) -> None:
        """Forget a resident key without counting it as an eviction (e.g. a failed load)."""

    @abstractmethod
    def __contains__(self, key: Key) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...


def _pop_oldest(order: OrderedDict, exclude: set[Key]) -> Key | None:
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


POLICIES = {"arc": ARC, "lru": LRU}


def replay_miss_rate(policy: str, accesses: Iterable[Iterable[Key]], capacity: int) -> float:
    """Miss rate of demand-only caching (no prefetch) with `capacity` slots over a stream of
    steps, each the set of keys one token needs at once (they cannot evict each other)."""
    cache = POLICIES[policy](capacity)
    hits = total = 0
    for step in accesses:
        needed = set(step)
        for key in needed:
            total += 1
            if key in cache:
                cache.hit(key)
                hits += 1
                continue
            if capacity <= 0:
                continue
            if len(cache) >= capacity and cache.victim(key, needed) is None:
                continue  # every slot holds a key this step needs: run it without caching
            cache.insert(key)
    return 1.0 - hits / total if total else 0.0
