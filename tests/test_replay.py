"""Routing traces and their replay: Belady's optimal cache against every policy, on synthetic traces
(no artifact), and a trace written by a real run."""

from __future__ import annotations

import random

import pytest
from fate.artifacts import FateError
from fate.runtime.experts.eviction import POLICIES
from fate.runtime.experts.replay import Access, accesses_of, belady, replay_miss_rate, simulate
from fate.runtime.experts.trace import LayerSlots, TraceHeader, TraceRecord, TraceRecorder, read_trace


def synthetic(seed: int, layers: int = 4, experts: int = 12, top_k: int = 2, tokens: int = 120) -> list[Access]:
    """Skewed routing with drift: each layer prefers a few experts, which change now and then."""
    rng = random.Random(seed)
    favourite = {l: rng.sample(range(experts), 4) for l in range(layers)}
    out = []
    for t in range(tokens):
        if t % 40 == 39:
            favourite = {l: rng.sample(range(experts), 4) for l in range(layers)}
        for l in range(layers):
            pool = favourite[l] if rng.random() < 0.7 else list(range(experts))
            chosen = frozenset(rng.sample(pool, top_k))
            guess = tuple(sorted(chosen)) if rng.random() < 0.6 else tuple(rng.sample(range(experts), top_k))
            out.append(Access("decode", l, chosen, guess))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_belady_never_misses_more_than_any_policy(seed):
    accesses = synthetic(seed)
    cost = {l: 1 for l in range(4)}
    for capacity in (2, 5, 9):
        per_layer = ({l: capacity for l in range(4)}, {l: l for l in range(4)})
        shared = ({"g": 4 * capacity}, {l: "g" for l in range(4)})
        for groups, group_of in (per_layer, shared):
            best = belady(accesses, groups, group_of, cost)
            for policy in POLICIES:
                online = simulate(accesses, policy, groups, group_of, cost, prefetch=False)
                assert best.misses <= online.misses, (policy, capacity)
                assert best.hits + best.misses == online.hits + online.misses


def test_belady_on_a_hand_worked_trace():
    # one layer, 2 slots: a b c a b -> MIN keeps a when c comes (a is used before b... both reused;
    # evicts the one used later: b), so misses are a, b, c, b = 4; LRU misses all 5
    steps = [{"a"}, {"b"}, {"c"}, {"a"}, {"b"}]
    accesses = [Access("decode", 0, frozenset(s)) for s in steps]
    assert belady(accesses, {0: 2}, {0: 0}, {0: 1}).misses == 4
    assert simulate(accesses, "lru", {0: 2}, {0: 0}, {0: 1}, prefetch=False).misses == 5


def test_a_global_pool_is_never_worse_than_quotas_for_belady():
    accesses = synthetic(3)
    cost = {l: 1 for l in range(4)}
    quotas = belady(accesses, {l: 3 for l in range(4)}, {l: l for l in range(4)}, cost)
    shared = belady(accesses, {"g": 12}, {l: "g" for l in range(4)}, cost)
    assert shared.misses <= quotas.misses


def test_replay_miss_rate_counts_misses_of_one_layer():
    stream = [[1, 2], [1, 2], [3, 4], [1, 2]]
    assert replay_miss_rate("lru", stream, 4) == pytest.approx(4 / 8)
    assert replay_miss_rate("lru", stream, 0) == 1.0


def test_a_prediction_is_prefetched_once_the_access_before_it_is_routed_and_its_bytes_count():
    accesses = [Access("decode", 0, frozenset({1})), Access("decode", 1, frozenset({2}), (2, 3)),
                Access("decode", 0, frozenset({3}), (3,))]
    result = simulate(accesses, "arc", {"g": 4}, {0: "g", 1: "g"}, {0: 10, 1: 10}, prefetch=True)
    # during access 0: layer 1's 2 and 3 prefetched; 1 missed. Then 2 hits; layer 0's 3 is a miss
    # (the prediction (3,) named layer 0's expert 3, prefetched during access 1)
    assert (result.prefetched, result.misses, result.hits) == (3, 1, 2) and result.bytes_read["decode"] == 40


def test_a_miss_never_evicts_the_next_layers_prefetch_while_anything_else_can_go():
    # two slots: 7 resident; then access 1's routing is known, the next layer's 5 is prefetched (cold: first
    # in LRU's eviction order), and access 1's miss must evict 7, not the prefetch
    accesses = [Access("decode", 0, frozenset({7})), Access("decode", 0, frozenset({1})),
                Access("decode", 1, frozenset({5}), (5,))]
    result = simulate(accesses, "lru", {"g": 2}, {0: "g", 1: "g"}, {0: 1, 1: 1}, prefetch=True)
    assert (result.hits, result.misses, result.prefetched) == (1, 2, 1)


def header() -> TraceHeader:
    return TraceHeader([LayerSlots(0, 8, 2, 3, 4096), LayerSlots(2, 8, 2, 3, 4096)], "global")


def test_a_trace_reads_back_as_written(tmp_path):
    import numpy as np

    path = tmp_path / "t.jsonl"
    recorder = TraceRecorder(header())
    recorder.record("prefill", 0, 0, 0, np.array([[1, 2], [3, 4]]), None)
    ids = np.array([[5, 0]])
    recorder.record("decode", 1, 2, 2, ids, {5, 7})
    ids[0, 0] = 6  # the recorder keeps what the router chose, not the caller's buffer
    expected = [TraceRecord("prefill", 0, 0, 0, (1, 2)), TraceRecord("prefill", 0, 1, 0, (3, 4)),
                TraceRecord("decode", 1, 2, 2, (5, 0), (5, 7))]
    assert recorder.records == expected
    assert not path.exists()  # nothing written until saved
    recorder.save(path)
    assert not path.with_name(path.name + ".part").exists()  # written beside, renamed when whole
    read, records = read_trace(path)
    assert read == header() and records == expected
    joined = accesses_of(records)
    assert [a.needed for a in joined] == [frozenset({1, 2, 3, 4}), frozenset({5, 0})]


@pytest.mark.parametrize("line, says", [
    ('{"phase": "decode", "step": 1, "token": 0, "layer": 9, "experts": [1]}', "layer 9"),
    ('{"phase": "decode", "step": 1, "token": 0, "layer": 0, "experts": [8]}', "expert id"),
    ('{"phase": "later", "step": 1, "token": 0, "layer": 0, "experts": [1]}', "phase"),
    ('{"phase": "decode", "step": -1, "token": 0, "layer": 0, "experts": [1]}', "step"),
    ('not json', "line 2"),
])
def test_a_damaged_trace_is_one_error_naming_the_line(tmp_path, line, says):
    path = tmp_path / "t.jsonl"
    TraceRecorder(header()).save(path)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(FateError, match=says):
        read_trace(path)


def test_a_trace_that_cannot_be_written_is_one_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "missing" / "t.jsonl"
    with pytest.raises(FateError, match="cannot write the trace"):
        TraceRecorder(header()).save(target)
    assert not target.parent.exists()
