"""The per-layer prefetch gate (runtime.experts.gates), driven with made-up outcomes and times: no clock, no
artifact."""

from __future__ import annotations

from fate.runtime.experts.gates import COST_MARGIN, PROBE_FIRST, RECALL_GATE, PrefetchGate


def test_a_layers_prefetch_closes_when_its_reads_are_mostly_wrong_and_opens_when_they_pay():
    gate = PrefetchGate()
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
    gate = PrefetchGate()
    for _ in range(50):
        gate.score(2, read={1, 2}, chosen={1, 7})
    assert RECALL_GATE == 0.5 and gate.open(2)


def test_reads_shorter_than_the_loops_work_around_them_are_not_read_ahead():
    small = PrefetchGate()  # 32 KB experts: 85 us waited per read, 120 us of loop per load
    large = PrefetchGate()  # 4.6 MB experts: 1.4 ms waited per read, 150 us of loop per load
    for _ in range(40):
        small.token(loop_s=2 * 120e-6, loads=2, waited_s=85e-6, waits=1)
        large.token(loop_s=6 * 150e-6, loads=6, waited_s=4 * 1.4e-3, waits=4)
        for gate in (small, large):
            gate.score(1, read={3, 4}, chosen={3, 9})
    assert not small.open(1) and large.open(1)
    waited, loop = small.costs()
    assert abs(waited - 85e-6) < 1e-9 and abs(loop - 120e-6) < 1e-9


def test_costs_decide_only_once_measured_and_follow_a_change():
    gate = PrefetchGate()
    gate.token(loop_s=1.0, loads=1, waited_s=0.001, waits=1)  # one costly token: too little to decide on
    assert gate.open(0)
    for _ in range(10):  # a right read would save 40 us, where a load costs the loop 100
        gate.token(loop_s=4e-4, loads=4, waited_s=4e-5, waits=1)
    assert not gate.open(0)
    for _ in range(300):  # reads grew long (another disk, larger experts): reading ahead pays again
        gate.token(loop_s=4e-4, loads=4, waited_s=2e-3, waits=1)
    assert gate.open(0)


def test_a_read_must_save_the_margin_over_its_loop_work():
    gate = PrefetchGate()
    for _ in range(50):  # a read waits 100 us, a load costs the loop just over 100 / margin: not enough
        gate.token(loop_s=1.01e-4 / COST_MARGIN, loads=1, waited_s=1e-4, waits=1)
    assert not gate.open(0)
    for _ in range(500):
        gate.token(loop_s=0.9e-4 / COST_MARGIN, loads=1, waited_s=1e-4, waits=1)
    assert gate.open(0)


def test_loading_on_demand_does_not_make_reading_ahead_look_cheaper():
    gate = PrefetchGate()
    for _ in range(50):  # reading ahead: 100 us of loop a load against 150 us waited a read
        gate.token(loop_s=1e-4, loads=1, waited_s=1.5e-4, waits=1)
    assert not gate.open(0)
    for _ in range(PROBE_FIRST - 1):  # on demand the loop works 50 us a load: reading ahead would still cost 100
        gate.token(loop_s=5e-5, loads=1, waited_s=1.5e-4, waits=1, read_ahead=False)
    assert not gate.open(0) and abs(gate.costs()[1] - 1e-4) < 1e-9


def test_a_gate_a_busy_moment_closed_measures_again_and_opens():
    """The loop's work per load reading ahead is measured only while reading ahead: once closed by a dear
    moment (another process on the cores), the gate measures it afresh after PROBE_FIRST tokens closed."""
    gate = PrefetchGate()
    for _ in range(50):  # the cores shared: 1 ms of loop a load against 0.5 ms waited a read
        gate.token(loop_s=1e-3, loads=1, waited_s=5e-4, waits=1)
    assert not gate.open(0)
    for _ in range(PROBE_FIRST - 1):  # the cores free again, loading on demand
        gate.token(loop_s=5e-5, loads=1, waited_s=5e-4, waits=1, read_ahead=False)
    assert not gate.open(0)
    gate.token(loop_s=5e-5, loads=1, waited_s=5e-4, waits=1, read_ahead=False)
    assert gate.open(0) and gate.costs()[1] is None  # forgotten: reading ahead again, to measure it
    for _ in range(10):
        gate.token(loop_s=1e-4, loads=1, waited_s=5e-4, waits=1)
    assert gate.open(0)


def test_a_probe_that_finds_reading_ahead_dear_waits_twice_as_long_for_the_next():
    gate = PrefetchGate()

    def closed_until_probe() -> int:
        tokens = 0
        while not gate.open(0):
            gate.token(loop_s=5e-5, loads=1, waited_s=1e-4, waits=1, read_ahead=False)
            tokens += 1
        for _ in range(5):  # the probe: reading ahead still costs more than it saves
            gate.token(loop_s=1e-4, loads=1, waited_s=1e-4, waits=1)
        assert not gate.open(0)
        return tokens

    for _ in range(50):
        gate.token(loop_s=1e-4, loads=1, waited_s=1e-4, waits=1)
    assert [closed_until_probe() for _ in range(3)] == [PROBE_FIRST, 2 * PROBE_FIRST, 4 * PROBE_FIRST]
