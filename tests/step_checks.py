"""A model's native decode steps held against its layer graphs, layer by layer (test_decode_step for
chosen cases, test_parity for every family)."""

from __future__ import annotations

import copy

import numpy as np

from fate.artifacts.layout import GraphIO as IO


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_steps_match_graphs(model, prompt: int = 11, bound: float = 1e-5) -> None:
    """Every layer with a step, on the same hidden state and cache (`prompt` tokens in): the graph's
    outputs within `bound`, the same experts chosen, the same key and value added; and with the layer's
    experts inside (all resident), its residual plus the routed experts' sum exactly as the runtime
    adds them after a graph: the same bits."""
    cache = model.new_cache()
    model.forward(np.arange(1, prompt + 1), cache)
    hidden = np.random.default_rng(0).standard_normal((1, 1, model.spec.hidden_size)).astype(np.float32)
    tables = model.positions.upto(cache.length + 1)
    for index, step in model.steps.items():
        spec = model.manifest.layers[index]
        by_graph, by_step, routing = copy.deepcopy(cache), copy.deepcopy(cache), copy.deepcopy(cache)
        want = model.run_layer(spec, hidden, by_graph, model.positions.step(cache.length, 1).for_layer(spec), 1)
        with_experts, ran = step.run(hidden, routing, *tables) if step.routed is not None else (None, False)
        assert ran == (step.routed is not None)
        routed, step.routed = step.routed, None
        got, ran = step.run(hidden, by_step, *tables)
        step.routed = routed
        assert not ran
        assert set(got) == {name for name in want if not name.startswith("present")}
        np.testing.assert_array_equal(got[IO.EXPERT_IDS], want[IO.EXPERT_IDS])
        for name in got:
            assert rel_err(got[name], want[name]) < bound, (index, name)
        for name in ("key", "value"):
            added = by_step.layers[index][name][:, :, :cache.length + 1]
            assert rel_err(added, by_graph.layers[index][name]) < bound, (index, name)
        if with_experts is not None:
            routed = model.experts.compute(index, np.ascontiguousarray(got[IO.ROUTER_INPUT]), got[IO.EXPERT_IDS])
            np.testing.assert_array_equal(with_experts[IO.RESIDUAL], model.combine(index, got, routed))
    assert_prefill_matches_graphs(model, cache, bound=bound)


def assert_prefill_matches_graphs(model, cache, tokens: int = 19, bound: float = 1e-5) -> None:
    """Every layer with a step, on `tokens` new hidden states after `cache` (more than two of the kernel's
    tiles, and past a sliding window where the fixtures have one): the step's prefill gives the graph's
    outputs within `bound`, the same experts, and the same keys and values."""
    hidden = np.random.default_rng(1).standard_normal((1, tokens, model.spec.hidden_size)).astype(np.float32)
    tables = model.positions.upto(cache.length + tokens)
    for index, step in model.steps.items():
        spec = model.manifest.layers[index]
        by_graph, by_step = copy.deepcopy(cache), copy.deepcopy(cache)
        want = model.run_layer(spec, hidden, by_graph, model.positions.step(cache.length, tokens).for_layer(spec),
                               tokens)
        got = step.prefill(hidden, by_step, *tables)
        assert set(got) == {name for name in want if not name.startswith("present")}
        np.testing.assert_array_equal(got[IO.EXPERT_IDS], want[IO.EXPERT_IDS])
        for name in got:
            assert got[name].shape == want[name].shape, (index, name)
            assert rel_err(got[name], want[name]) < bound, (index, name)
        for name in ("key", "value"):
            added = by_step.layers[index][name][:, :, :cache.length + tokens]
            assert rel_err(added, by_graph.layers[index][name]) < bound, (index, name)
