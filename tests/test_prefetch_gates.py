"""The per-layer prefetch gate (runtime.experts.gates), driven with made-up outcomes: no artifact."""

from __future__ import annotations

from fate.runtime.experts.gates import RECALL_GATE, RecallGate


def test_a_layers_prefetch_closes_when_its_reads_are_mostly_wrong_and_opens_when_they_pay():
    gate = RecallGate()
    assert gate.open(3)  # no evidence: prefetch
    for _ in range(20):
        gate.score(3, read={1, 2}, chosen={5, 6})
    assert not gate.open(3) and gate.open(4)
    for _ in range(3):
        gate.score(3, read=set(), chosen={5, 6})  # everything predicted was resident: no evidence either way
    assert not gate.open(3)
    for _ in range(20):
        gate.score(3, read={5}, chosen={5, 6})
    assert gate.open(3)


def test_a_layer_whose_reads_are_right_at_the_gates_share_keeps_prefetching():
    gate = RecallGate()
    for _ in range(50):
        gate.score(2, read={1, 2}, chosen={1, 7})
    assert RECALL_GATE == 0.5 and gate.open(2)
