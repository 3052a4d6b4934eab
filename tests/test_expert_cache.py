"""The expert cache and its eviction policies with fake blobs: no ONNX, no tokens."""

from __future__ import annotations

import threading
import time

import pytest

from fate.runtime.cache import ARC, LRU, replay_miss_rate
from fate.runtime.expert_cache import ExpertCache


class FakeLoader:
    def __init__(self, nbytes: int = 10, delay: float = 0.0, fail: set | None = None):
        self.nbytes, self.delay, self.fail = nbytes, delay, fail or set()
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, layer: int, expert: int):
        with self.lock:
            self.calls.append((layer, expert))
        time.sleep(self.delay)
        if (layer, expert) in self.fail:
            raise OSError(f"cannot read expert {expert} of layer {layer}")
        return f"blob-{layer}-{expert}", self.nbytes, self.nbytes


@pytest.mark.parametrize("policy", ["arc", "lru"])
def test_resident_bytes_never_exceed_capacity(policy):
    loader = FakeLoader(nbytes=10)
    cache = ExpertCache({0: 35, 1: 20}, loader, policy=policy, threads=2)
    try:
        for step in range(50):
            cache.prefetch(0, [step % 7, (step * 3) % 7], step)
            assert cache.get(0, (step * 5) % 7) == f"blob-0-{(step * 5) % 7}"
            cache.get(1, step % 4)
            assert cache.resident_bytes() <= 55
            assert len(cache.resident(0)) <= 3 and len(cache.resident(1)) <= 2
    finally:
        cache.close()


def test_in_flight_load_is_waited_for_not_repeated():
    loader = FakeLoader(delay=0.2)
    cache = ExpertCache({0: 100}, loader, threads=1)
    try:
        cache.prefetch(0, [3], step=1)
        time.sleep(0.05)  # the worker has started loading expert 3
        assert cache.get(0, 3) == "blob-0-3"
        assert loader.calls == [(0, 3)]
        assert cache.counters.layer(0).waits == 1 and cache.counters.layer(0).misses == 0
    finally:
        cache.close()


def test_stale_requests_are_dropped():
    loader = FakeLoader(delay=0.05)
    cache = ExpertCache({0: 1000}, loader, threads=1)
    try:
        cache.prefetch(0, [1, 2, 3, 4], step=1)
        cache.prefetch(0, [5], step=2)  # a newer prediction for the same layer
        time.sleep(0.5)
        assert (0, 5) in loader.calls and len(loader.calls) < 5
        assert cache.counters.dropped_stale >= 1
    finally:
        cache.close()


def test_pinned_experts_are_not_evicted():
    cache = ExpertCache({0: 20}, FakeLoader(nbytes=10), threads=1)
    try:
        cache.get(0, 1)
        cache.get(0, 2)
        cache.pin(0, {1, 2})
        cache.get(0, 3)  # no room without evicting a pinned expert: used once, not kept
        assert cache.resident(0) == {1, 2}
        cache.pin(0, set())
        cache.get(0, 3)
        assert 3 in cache.resident(0)
    finally:
        cache.close()


def test_prefetch_failure_reaches_the_caller():
    cache = ExpertCache({0: 100}, FakeLoader(fail={(0, 7)}), threads=1)
    try:
        cache.prefetch(0, [7], step=1)
        time.sleep(0.2)
        with pytest.raises(OSError, match="expert 7"):
            cache.get(0, 1)
    finally:
        cache.close()


def test_demand_failure_raises_and_does_not_hang():
    cache = ExpertCache({0: 100}, FakeLoader(fail={(0, 2)}), threads=1)
    try:
        with pytest.raises(OSError):
            cache.get(0, 2)
        with pytest.raises(OSError):  # tried again, not stuck on a dead in-flight entry
            cache.get(0, 2)
    finally:
        cache.close()


def test_arc_keeps_frequent_keys_through_a_scan():
    """A one-off scan evicts the hot set from LRU but not from ARC."""
    hot = [[k] for k in (1, 2, 3) for _ in range(3)]
    stream = hot * 4 + [[k] for k in range(100, 104)] + hot
    assert replay_miss_rate("arc", stream, 4) < replay_miss_rate("lru", stream, 4)


def test_miss_rate_curve_ends():
    stream = [[1, 2], [3, 4], [1, 3], [2, 4]] * 5
    assert replay_miss_rate("arc", stream, 0) == 1.0
    assert replay_miss_rate("arc", stream, 4) == pytest.approx(4 / 40)


@pytest.mark.parametrize("cls", [ARC, LRU])
def test_victim_respects_exclusions(cls):
    policy = cls(3)
    for k in (1, 2, 3):
        policy.insert(k)
    assert policy.victim(4, {1, 2, 3}) is None
    assert policy.victim(4, {1, 2}) == 3 and len(policy) == 2
