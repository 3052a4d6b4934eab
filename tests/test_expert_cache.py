"""The expert cache and its eviction policies with fake blobs: no ONNX, no tokens."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

import numpy as np
import pytest
from fate.runtime.experts.eviction import ARC, LFRU, LRU, POLICIES, S3FIFO
from fate.runtime.experts.replay import replay_miss_rate
from fate.runtime.experts.residency import ExpertCache


class FakeLoader:
    """Fills a slot with a blob naming its key and slot; can block until released, or fail."""

    def __init__(self, nbytes: int = 10, fail: set | None = None, gate: threading.Event | None = None):
        self.nbytes, self.fail, self.gate = nbytes, fail or set(), gate
        self.calls: list[tuple[int, int]] = []
        self.started = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, layer: int, expert: int, slot: int):
        with self.lock:
            self.calls.append((layer, expert))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if (layer, expert) in self.fail:
            raise OSError(f"cannot read expert {expert} of layer {layer}")
        return f"blob-{layer}-{expert}@{slot}", self.nbytes


class Slots:
    """The cache's SlotLoads from the fakes: a loader, the starts it asks for urgent (`demand`) and queued
    (`background`) loads, and where a value lies (`locate`)."""

    def __init__(self, load, demand=None, background=None, locate=None):
        self._load, self._demand, self._background, self._locate = load, demand, background, locate

    def load(self, layer: int, expert: int, slot: int):
        return self._load(layer, expert, slot)

    def start(self, layer: int, expert: int, slot: int, urgent: bool):
        start = self._demand if urgent else self._background
        assert start is not None, "this test gives the cache no such start"
        return start(layer, expert, slot)

    def locate(self, key, value) -> int:
        return self._locate(key, value)


def until(condition, timeout: float = 30.0) -> None:
    """Wait for something the cache's threads do (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_slots_are_never_shared_or_exceeded(policy):
    cache = ExpertCache({0: 3, 1: 2}, Slots(FakeLoader()), policy=policy, threads=2)
    try:
        for step in range(50):
            cache.prefetch(0, [step % 7, (step * 3) % 7], step)
            value = cache.fetch(0, (step * 5) % 7)
            assert value.startswith(f"blob-0-{(step * 5) % 7}@")
            cache.unpin(0, [(step * 5) % 7])
            cache.fetch(1, step % 4)
            cache.unpin(1, [step % 4])
            assert len(cache.resident(0)) <= 3 and len(cache.resident(1)) <= 2
            with cache._lock:
                used = [slot for (layer, _), (_, slot) in cache._resident.items() if layer == 0]
            assert len(used) == len(set(used)) and all(0 <= s < 3 for s in used)
    finally:
        cache.close()


def test_in_flight_load_is_waited_for_not_repeated():
    gate = threading.Event()
    loader = FakeLoader(gate=gate)
    cache = ExpertCache({0: 4}, Slots(loader), threads=1)
    try:
        cache.prefetch(0, [3], step=1)
        assert loader.started.wait(30)  # the worker is loading expert 3
        result = []
        waiter = threading.Thread(target=lambda: result.append(cache.fetch(0, 3)))
        waiter.start()
        until(lambda: cache.counters.layer(0).waits == 1)
        gate.set()
        waiter.join(30)
        assert result == ["blob-0-3@0"] and loader.calls == [(0, 3)]
        assert cache.counters.layer(0).misses == 0
    finally:
        gate.set()
        cache.close()


def test_stale_requests_are_dropped():
    gate = threading.Event()
    loader = FakeLoader(gate=gate)
    cache = ExpertCache({0: 8}, Slots(loader), threads=1)
    try:
        cache.prefetch(0, [1, 2, 3, 4], step=1)
        assert loader.started.wait(30)  # expert 1 is loading; 2, 3, 4 wait in the queue
        cache.prefetch(0, [5], step=2)  # a newer prediction for the same layer
        gate.set()
        until(lambda: 5 in cache.resident(0))
        assert (0, 5) in loader.calls and len(loader.calls) == 2
        until(lambda: cache.counters.dropped_stale == 3)
    finally:
        gate.set()
        cache.close()


def test_pinned_experts_are_not_evicted():
    cache = ExpertCache({0: 2}, Slots(FakeLoader()), threads=1)
    try:
        cache.fetch(0, 1)
        cache.fetch(0, 2)
        cache.unpin(0, [1])
        cache.fetch(0, 3)  # two slots, 2 pinned: 3 takes the slot of 1
        assert cache.resident(0) == {2, 3}
        cache.prefetch(0, [4], step=1)  # every slot pinned: the prefetch is dropped, not waited for
        until(lambda: cache.counters.dropped_stale == 1)
        assert cache.resident(0) == {2, 3}
        done = []
        waiter = threading.Thread(target=lambda: done.append(cache.fetch(0, 5)))
        waiter.start()  # a demand load waits for a slot...
        cache.unpin(0, [2])  # ...until a pin is released
        waiter.join(30)
        assert done and cache.resident(0) == {3, 5}
    finally:
        cache.close()


def test_prefetch_never_evicts_protected_predictions():
    cache = ExpertCache({0: 2}, Slots(FakeLoader()), threads=1)
    try:
        for expert in (1, 2):
            cache.fetch(0, expert)
            cache.unpin(0, [expert])
        cache.protect(0, {1, 2})
        cache.prefetch(0, [9], step=1)
        until(lambda: cache.counters.dropped_stale == 1)
        assert cache.resident(0) == {1, 2}
        cache.protect(0, {1})
        cache.prefetch(0, [9], step=2)
        until(lambda: 9 in cache.resident(0))
        assert cache.resident(0) == {1, 9}
    finally:
        cache.close()


def test_prefetch_failure_reaches_the_caller():
    loader = FakeLoader(fail={(0, 7)})
    cache = ExpertCache({0: 4}, Slots(loader), threads=1)
    try:
        cache.prefetch(0, [7], step=1)
        until(lambda: cache._error is not None)
        with pytest.raises(OSError, match="expert 7"):
            cache.fetch(0, 1)
    finally:
        cache.close()


def test_demand_failure_raises_and_does_not_hang():
    cache = ExpertCache({0: 1}, Slots(FakeLoader(fail={(0, 2)})), threads=1)
    try:
        with pytest.raises(OSError):
            cache.fetch(0, 2)
        with pytest.raises(OSError):  # tried again, not stuck on a dead in-flight entry or a lost slot
            cache.fetch(0, 2)
        assert cache.fetch(0, 3) == "blob-0-3@0"
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


class FakeStart:
    """start(layer, expert, slot) for ExpertCache.start_fetch: a load begun, finished by result()."""

    def __init__(self, loader: FakeLoader, queued: set | None = None):
        """queued: (layer, expert) whose reads no I/O thread has begun: they can be cancelled."""
        self.loader = loader
        self.queued = queued if queued is not None else set()
        self.begun: list[tuple[int, int, int]] = []  # (layer, expert, slot)
        self.cancelled: list[tuple[int, int]] = []

    def __call__(self, layer: int, expert: int, slot: int):
        self.begun.append((layer, expert, slot))
        owner, loader, key = self, self.loader, (layer, expert)

        class Pending:
            def done(self) -> bool:
                return key not in owner.queued and (loader.gate is None or loader.gate.is_set())

            def cancel(self) -> bool:
                if key not in owner.queued:
                    return False
                owner.queued.discard(key)
                owner.cancelled.append(key)
                return True

            def result(self):
                return loader(layer, expert, slot)

        return Pending()


def test_start_fetch_begins_a_load_the_caller_finishes_and_never_blocks():
    loader = FakeLoader()
    start = FakeStart(loader)
    cache = ExpertCache({0: 2}, Slots(loader, demand=start), threads=1)
    try:
        first, second = cache.start_fetch(0, 1), cache.start_fetch(0, 2)
        assert start.begun == [(0, 1, 0), (0, 2, 1)] and not cache.resident(0)  # begun, not yet resident
        assert cache.start_fetch(0, 3) is None  # both slots are being filled: no waiting here
        again = cache.start_fetch(0, 1)  # the same expert again: its load, not a new one
        assert len(start.begun) == 2 and cache.counters.layer(0).waits == 1
        assert first.result() == "blob-0-1@0" and second.result() == "blob-0-2@1" and again.result() == "blob-0-1@0"
        assert cache.resident(0) == {1, 2} and cache.start_fetch(0, 3) is None  # pinned: 1 twice, 2 once
        cache.unpin(0, [2])
        third = cache.start_fetch(0, 3)  # 2 is evicted for it; 1 stays pinned
        assert third.result() == "blob-0-3@1" and cache.resident(0) == {1, 3}
        assert cache.counters.layer(0).misses == 3 and cache.counters.loads == 3
    finally:
        cache.close()


def test_start_fetch_failure_frees_the_slot_and_reaches_the_caller():
    loader = FakeLoader(fail={(0, 5)})
    cache = ExpertCache({0: 1}, Slots(loader, demand=FakeStart(loader)), threads=1)
    try:
        with pytest.raises(OSError, match="expert 5"):
            cache.start_fetch(0, 5).result()
        assert cache.start_fetch(0, 6).result() == "blob-0-6@0"  # the slot came back
    finally:
        cache.close()


def test_begun_prefetches_are_finished_by_whoever_asks_or_by_harvest():
    """start_prefetch begins loads at once (no prefetch thread); the loop that asks for one finishes
    it (a hit when its read is over), harvest() finishes the others, and close() leaves none."""
    loader = FakeLoader()
    demand, background = FakeStart(loader), FakeStart(loader)
    cache = ExpertCache({0: 4}, Slots(loader, demand=demand, background=background), threads=1)
    try:
        cache.start_prefetch(0, [1, 2, 3])
        assert [b[:2] for b in background.begun] == [(0, 1), (0, 2), (0, 3)] and not cache.resident(0)
        assert cache.start_fetch(0, 1).result() == "blob-0-1@0" and not demand.begun  # its load, finished here
        cache.harvest()
        assert cache.resident(0) == {1, 2, 3}
        cache.start_prefetch(0, [2, 4])  # resident ones are not read again
        assert [b[:2] for b in background.begun][3:] == [(0, 4)]
        counters = cache.counters.layer(0)
        assert (counters.prefetched, counters.hits, counters.misses, cache.counters.loads) == (4, 1, 0, 3)
    finally:
        cache.close()
    assert cache.resident(0) == {1, 2, 3, 4}  # close() finished the begun one before the slots go


def test_retire_gives_up_the_prefetches_the_router_did_not_choose_whose_reads_are_queued():
    loader = FakeLoader()
    background = FakeStart(loader, queued={(0, 2), (0, 3)})
    cache = ExpertCache({0: 3}, Slots(loader, demand=FakeStart(loader), background=background), threads=1)
    try:
        cache.start_prefetch(0, [1, 2, 3])
        cache.retire(0, {1, 3})  # the router chose 1 and 3: 2 is given up, its slot free again
        assert background.cancelled == [(0, 2)] and cache.counters.dropped_stale == 1
        cache.harvest()
        assert cache.resident(0) == {1}  # 3's read is still queued: neither finished nor given up
        cache.start_fetch(0, 5).result()  # 2's slot serves a demand load, without evicting 1
        assert cache.resident(0) == {1, 5} and cache.counters.layer(0).evictions == 0
    finally:
        cache.close()
    assert (0, 3) in background.cancelled  # close() gives up what no thread began


def test_asking_for_a_queued_prefetch_reads_it_as_urgent_into_its_slot():
    loader = FakeLoader()
    demand, background = FakeStart(loader), FakeStart(loader, queued={(0, 7)})
    cache = ExpertCache({0: 2}, Slots(loader, demand=demand, background=background), threads=1)
    try:
        cache.start_prefetch(0, [7])
        load = cache.start_fetch(0, 7)
        assert background.cancelled == [(0, 7)] and demand.begun == [(0, 7, background.begun[0][2])]
        assert load.result() == "blob-0-7@0" and cache.counters.layer(0).waits == 1
    finally:
        cache.close()


def test_slots_held_by_begun_prefetches_come_back_when_the_loop_settles_them():
    loader = FakeLoader()
    cache = ExpertCache({0: 2}, Slots(loader, demand=FakeStart(loader), background=FakeStart(loader)), threads=1)
    try:
        cache.protect(0, {1, 2})
        cache.start_prefetch(0, [1, 2])
        assert cache.start_fetch(0, 3) is None  # both slots filling
        assert cache.settle_begun(0) and not cache.settle_begun(0)
        assert cache.start_fetch(0, 3).result() in ("blob-0-3@0", "blob-0-3@1")  # a demand load may evict a prediction
        assert 3 in cache.resident(0) and len(cache.resident(0) & {1, 2}) == 1
    finally:
        cache.close()


def test_a_load_that_cannot_even_begin_leaves_no_slot_or_key_behind():
    loader = FakeLoader()
    working = FakeStart(loader)
    failures = iter([MemoryError("no memory for the read"), MemoryError("no memory for the read")])

    def start(layer, expert, slot):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return working(layer, expert, slot)

    cache = ExpertCache({0: 1}, Slots(loader, demand=start, background=start), threads=1)
    try:
        with pytest.raises(MemoryError):
            cache.start_prefetch(0, [4])
        with pytest.raises(MemoryError):
            cache.start_fetch(0, 4)
        assert cache.start_fetch(0, 4).result() == "blob-0-4@0"  # the one slot came back both times
    finally:
        cache.close()


def test_located_follows_residence_through_loads_evictions_and_failures():
    """The array a native step reads: locate(value) for each resident expert, -1 for the rest, true
    after every demand load, begun prefetch, eviction, failure and count_hits (which evicts nothing)."""
    import numpy as np

    loader = FakeLoader(fail={(0, 6)})
    located = {0: np.full(8, -1, np.int64)}
    slots = Slots(loader, demand=FakeStart(loader), background=FakeStart(loader),
                  locate=lambda key, value: 100 * int(value.rsplit("@", 1)[1]) + key[1])
    cache = ExpertCache({0: 3}, slots, threads=1, located=located)

    def check():
        with cache._lock:
            want = np.full(8, -1, np.int64)
            for (layer, expert), (_, slot) in cache._resident.items():
                want[expert] = 100 * slot + expert
        np.testing.assert_array_equal(located[0], want)

    try:
        for step in range(40):
            wanted = [(step * 3) % 8, (step * 5 + 1) % 8]
            cache.start_prefetch(0, [e for e in [(step * 7 + 2) % 8] if e != 6])  # a failed prefetch is raised later
            check()
            for expert in dict.fromkeys(wanted):
                load = cache.start_fetch(0, expert)
                if load is None:
                    cache.settle_begun(0)
                    load = cache.start_fetch(0, expert)
                try:
                    load.result()
                except OSError:
                    assert expert == 6
                    continue
                finally:
                    check()
                cache.unpin(0, [expert])
            cache.harvest()
            resident = sorted(cache.resident(0))
            cache.count_hits(0, resident[:2])
            check()
        assert cache.counters.layer(0).evictions > 0 and located[0][6] == -1
    finally:
        cache.close()


def test_a_load_whose_bytes_cannot_be_located_fails_like_a_load_and_frees_its_slot():
    """Whoever waits on it gets the error (never a hang), the slot comes back, nothing is resident."""
    import numpy as np

    def locate(key, value):
        if key[1] == 2:
            raise ValueError("these bytes are not in a slot of layer 0")
        return 0

    loader = FakeLoader()
    located = {0: np.full(4, -1, np.int64)}
    cache = ExpertCache({0: 1}, Slots(loader, demand=FakeStart(loader), locate=locate), threads=1, located=located)
    try:
        with pytest.raises(ValueError, match="not in a slot"):
            cache.start_fetch(0, 2).result()
        assert not cache.resident(0) and located[0][2] == -1
        cache.count_hits(0, [2])  # not resident: not counted, not made recent
        assert cache.counters.layer(0).hits == 0
        assert cache.start_fetch(0, 1).result() == "blob-0-1@0" and located[0][1] == 0
    finally:
        cache.close()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_global_pool_slots_are_shared_by_layers_and_never_exceeded(policy):
    """Two layers of 2 slots each in one group: 4 slots either may fill, numbered within the group."""
    cache = ExpertCache({0: 2, 1: 2}, Slots(FakeLoader()), policy=policy, threads=1, groups={0: "g", 1: "g"})
    try:
        for expert in range(4):  # layer 0 alone may take all four
            cache.fetch(0, expert)
            cache.unpin(0, [expert])
        assert cache.resident(0) == {0, 1, 2, 3} and cache.resident(1) == set()
        for step in range(60):
            layer, expert = step % 2, (step * 7) % 5
            cache.fetch(layer, expert)
            cache.unpin(layer, [expert])
            with cache._lock:
                slots = [slot for _, slot in cache._resident.values()]
            assert len(slots) == len(set(slots)) <= 4 and all(0 <= s < 4 for s in slots)
    finally:
        cache.close()


def test_global_pool_never_evicts_a_pinned_expert_of_another_layer():
    cache = ExpertCache({0: 1, 1: 1}, Slots(FakeLoader()), threads=1, groups={0: "g", 1: "g"})
    try:
        cache.fetch(0, 5)  # pinned: being run
        cache.fetch(1, 1)
        cache.unpin(1, [1])
        cache.fetch(1, 2)  # must evict layer 1's expert 1, never layer 0's pinned 5
        assert 5 in cache.resident(0) and cache.resident(1) == {2}
        cache.unpin(0, [5])
        cache.unpin(1, [2])
    finally:
        cache.close()


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_passes_over_excluded_keys_and_keeps_its_count(policy):
    cache = POLICIES[policy](4)
    for key in "abcd":
        cache.insert(key)
    cache.hit("a")
    assert cache.victim(None, set("abcd")) is None and len(cache) == 4
    gone = cache.victim(None, {"a", "b"})
    assert gone in {"c", "d"} and gone not in cache and len(cache) == 3
    cache.remove("a")
    assert "a" not in cache and len(cache) == 2


def test_lfru_keeps_a_frequent_key_through_a_scan_and_evicts_cold_prefetches_first():
    cache = LFRU(3)
    cache.insert("hot")
    for _ in range(4):
        cache.hit("hot")
    for key in "xyzuvw":  # a scan of keys used once
        if len(cache) >= 3:
            assert cache.victim(key, set()) != "hot"
        cache.insert(key)
    assert "hot" in cache
    cache.insert("guess", cold=True)
    assert cache.victim(None, set()) == "guess"


def test_s3fifo_filters_keys_used_once_and_sends_ghosts_to_main():
    cache = S3FIFO(10)
    cache.insert("kept")
    cache.hit("kept")  # used again while in the small queue: moves to main when its turn comes
    for key in "abc":
        cache.insert(key)
    assert cache.victim(None, set()) == "a"  # used once: evicted from the small queue, remembered
    assert "kept" in cache and "kept" in cache.main
    cache.insert("a")  # a ghost comes back: straight to main
    assert "a" in cache.main


def test_s3fifo_asks_about_an_excluded_key_once_a_call_and_keeps_its_place():
    """Keys held from eviction at a queue's head are asked about once per victim call, not once per
    pass (the calls it took were the loop's largest cost on small experts), and stay where they were."""
    cache = S3FIFO(8)
    for key in "abcdefgh":
        cache.insert(key)
    for key in "defgh":
        cache.hit(key)  # second chances: each pass that gives one starts again from the head
    asked = Counter()

    class Held:
        def __contains__(self, key):
            asked[key] += 1
            return key in "abc"

    assert cache.victim(None, Held()) not in set("abc")
    assert [asked[key] for key in "abc"] == [1, 1, 1]
    assert cache.order()[0][:3] == ["a", "b", "c"]


class PlainS3FIFO:
    """S3-FIFO with held keys written as plainly as it can be: every pass scans each queue from its head."""

    def __init__(self, capacity: int):
        self.small, self.main, self.ghost, self.freq = [], [], [], {}
        self.capacity, self.small_target = capacity, max(1, capacity // 10)

    def insert(self, key, cold=False):
        self.freq[key] = 0
        if key in self.ghost and not cold:
            self.ghost.remove(key)
            self.main.append(key)
        else:
            self.small.append(key)

    def hit(self, key):
        self.freq[key] = min(self.freq[key] + 1, S3FIFO.MAX_FREQ)

    def remove(self, key):
        self.small = [k for k in self.small if k != key]
        self.main = [k for k in self.main if k != key]
        del self.freq[key]

    def victim(self, exclude):
        for _ in range(5 * len(self.freq) + 1):
            from_small = self.small and (len(self.small) >= self.small_target or not self.main)
            for queue in ((self.small, self.main) if from_small else (self.main, self.small)):
                key = next((k for k in queue if k not in exclude), None)
                if key is not None:
                    break
            else:
                return None
            queue.remove(key)
            if self.freq[key] > 0:
                self.freq[key] = 0 if queue is self.small else self.freq[key] - 1
                self.main.append(key)
                continue
            del self.freq[key]
            if queue is self.small and key not in self.ghost:  # a ghost already remembered keeps its place
                self.ghost = (self.ghost + [key])[-max(self.capacity, 1):]
            return key
        return None


def against_plain(fast, plain, resident, seed: int, check=lambda: None) -> None:
    """Random hits, removals, inserts (some cold) and searches with random held keys (a layer at its floor's
    among them in most searches, pins) on a policy and its plain version: the same victims, and `check()` after
    every step. `resident()`: the plain version's keys."""
    rng = np.random.default_rng(seed)
    held_layer = set(range(0, 40, 5))
    for _ in range(3000):
        keys = list(resident())
        op = rng.random()
        if op < 0.35 and keys:
            key = keys[rng.integers(len(keys))]
            fast.hit(key)
            plain.hit(key)
        elif op < 0.38 and keys:
            key = keys[rng.integers(len(keys))]
            fast.remove(key)
            plain.remove(key)
        else:
            if len(keys) >= 12:
                exclude = {k for k in keys if rng.random() < 0.3} | (held_layer if rng.random() < 0.8 else set())
                assert fast.victim(None, exclude) == plain.victim(exclude)
            key = int(rng.integers(40))
            if key not in resident() and len(resident()) < 12:
                cold = bool(rng.random() < 0.2)
                fast.insert(key, cold)
                plain.insert(key, cold)
        assert len(fast) == len(resident())
        check()


@pytest.mark.parametrize("seed", range(6))
def test_s3fifo_evicts_as_the_plain_scan_does_whatever_is_held(seed):
    """Parking held keys (S3FIFO.small_parked, main_parked) changes what a search costs, never its answer: the
    victims, queue orders and ghosts of the plain S3-FIFO."""
    fast, plain = S3FIFO(12), PlainS3FIFO(12)

    def same_queues():
        assert fast.order() == (plain.small, plain.main) and list(fast.ghost) == plain.ghost

    against_plain(fast, plain, lambda: plain.freq, seed, same_queues)


class PlainLFRU:
    """LFRU's scores kept in a dict, the victim the least (score, use) among the keys not held: no heap."""

    def __init__(self, capacity: int):
        self.half_life, self.clock, self.uses, self.score = max(capacity, 1), 0, 0, {}

    def use(self, key, log_score):
        self.clock += 1
        self.uses += 1
        self.score[key] = (log_score + self.clock / self.half_life, self.uses)

    def hit(self, key):
        old = self.score[key][0]
        self.use(key, math.log2(1.0 + 2.0 ** min(old - (self.clock + 1) / self.half_life, 60.0)))

    def insert(self, key, cold=False):
        self.use(key, LFRU.COLD if cold else 0.0)

    def remove(self, key):
        del self.score[key]

    def victim(self, exclude):
        free = [(v, key) for key, v in self.score.items() if key not in exclude]
        if not free:
            return None
        key = min(free)[1]
        del self.score[key]
        return key


@pytest.mark.parametrize("seed", range(4))
def test_lfru_evicts_the_least_score_whatever_is_held(seed):
    """Parking held entries (LFRU.parked) changes what a search costs, never its answer."""
    plain = PlainLFRU(12)
    against_plain(LFRU(12), plain, lambda: plain.score, seed)


def test_a_layer_keeps_its_floor_in_a_shared_pool_and_grows_to_it_from_the_others():
    cache = ExpertCache({0: 2, 1: 2}, Slots(FakeLoader()), policy="lru", threads=1, groups={0: "g", 1: "g"}, floors={0: 2})
    try:
        def use(layer, expert):
            cache.fetch(layer, expert)
            cache.unpin(layer, [expert])

        for expert in range(4):  # layer 1 fills the whole pool first
            use(1, expert)
        assert cache.resident(1) == {0, 1, 2, 3}
        use(0, 10)
        use(0, 11)  # under its floor, layer 0 takes from layer 1 (its own 10 is the oldest, yet kept)
        assert cache.resident(0) == {10, 11} and len(cache.resident(1)) == 2
        for expert in range(4, 12):  # layer 1's loads never take layer 0 below its floor
            use(1, expert)
            assert cache.resident(0) == {10, 11}
        use(0, 12)  # at its floor, layer 0 evicts its own oldest
        assert cache.resident(0) == {11, 12}
    finally:
        cache.close()
