"""The run plan (runtime.experts.plan) on synthetic numbers: slots at the run's own budget from the
profile's miss curves, as the compiler's policy allocates them, with no artifact."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from fate.artifacts.budget import Budget
from fate.compiler.policy import PlanTargets, plan
from fate.runtime.experts.plan import plan_run
from test_profile import synthetic

SLOT = 4096  # every expert file one page: slot counts and bytes agree


def manifest_of(profile, layers, policy, state_bytes: int = 0):
    return SimpleNamespace(moe_layers=layers, layers=layers, policy=policy, state_bytes=state_bytes,
                           graph_predicts=lambda index: index > 0 and layers[index - 1].predicts_next)


def run_plan(profile, layers, policy, share: float, prefetch: str = "policy", pool: str = "global"):
    return plan_run(manifest_of(profile, layers, policy), profile, Budget(share=share),
                    precision=lambda layer: "int4", file_bytes=lambda layer, precision: SLOT,
                    runs_native=lambda layer, precision: True, prefetch=prefetch, pool=pool)


@pytest.mark.parametrize("share", [0.25, 0.5, 0.75])
def test_slots_are_what_the_compiler_allocates_at_the_run_budget(share):
    """A policy planned for 50% run at another budget holds the allocation the profile gives that
    budget, not the 50% shares rescaled."""
    # the first layer has no predictor; miss curves differ so the greedy has choices to make
    profile, layers = synthetic([0.0, 0.95, 0.6, 0.97], miss=[max(0.0, 1 - s / 6) for s in range(9)])
    at_half = plan(profile, layers, PlanTargets(budget=0.5))
    at_run = plan(profile, layers, PlanTargets(budget=share))
    run = run_plan(profile, layers, at_half, share)
    granted = round(share * 32)
    want = [round(lp.cache_share * granted) for lp in at_run.layers]
    got = [run.layers[i].slots for i in range(4)]
    assert sum(got) * SLOT <= Budget(share=share).bytes_of(32 * SLOT)
    assert all(s >= 2 for s in got)  # top-k everywhere
    if share >= 0.5:  # room for every layer's prefetch width: the same minimums as the compiler's
        assert got == want, (got, want)
    assert got[0] == max(got)  # nothing predicts the first layer: it gains most from slots


def test_prefetch_keeps_room_for_its_width_where_the_budget_allows():
    profile, layers = synthetic([0.0, 0.97, 0.97, 0.97])
    policy = plan(profile, layers, PlanTargets(budget=0.5))
    run = run_plan(profile, layers, policy, 0.5)
    for i in (1, 2, 3):
        layer = run.layers[i]
        assert layer.predictor == "cross_layer" and layer.width == policy.layers[i].prefetch_width
        assert layer.slots >= 2 + layer.width


def test_a_tight_budget_falls_back_to_top_k_minimums():
    profile, layers = synthetic([0.0, 0.97, 0.97, 0.97])
    policy = plan(profile, layers, PlanTargets(budget=0.5))
    run = run_plan(profile, layers, policy, 0.25, pool="per-layer")  # 8 slots: top-k (2) in each of 4 layers
    assert [run.layers[i].slots for i in range(4)] == [2, 2, 2, 2]
    assert all(run.layers[i].width == 0 for i in range(4))  # no room in its own quota to prefetch into
    # one pool evicts from every layer, never the running layer's experts: the predicted layers still read ahead
    shared = run_plan(profile, layers, policy, 0.25)
    assert [shared.layers[i].slots for i in range(4)] == [2, 2, 2, 2]
    assert [shared.layers[i].width for i in range(4)] == [0] + [policy.layers[i].prefetch_width for i in (1, 2, 3)]
    assert all(shared.layers[i].width > 0 for i in (1, 2, 3))


def test_without_a_profile_the_policy_shares_are_used():
    profile, layers = synthetic([0.0, 0.97, 0.97, 0.97])
    policy = plan(profile, layers, PlanTargets(budget=0.5))
    run = plan_run(manifest_of(profile, layers, policy), None, Budget(share=0.5), precision=lambda layer: "int4",
                   file_bytes=lambda layer, precision: SLOT, runs_native=lambda layer, precision: True)
    assert [run.layers[i].slots for i in range(4)] == [round(lp.cache_share * 16) for lp in policy.layers]


def test_the_plan_is_a_function_of_its_inputs():
    profile, layers = synthetic([0.0, 0.95, 0.6, 0.97])
    policy = plan(profile, layers, PlanTargets(budget=0.5))
    first = run_plan(profile, layers, policy, 0.4)
    assert all(run_plan(profile, layers, policy, 0.4) == first for _ in range(3))
    assert dataclasses.asdict(first) == dataclasses.asdict(run_plan(profile, layers, policy, 0.4))


def test_a_budget_in_bytes_holds_the_layers_state_beside_the_slots():
    """A hybrid model's fixed-size state is memory the run holds whatever the experts do: a budget
    in bytes covers it, a share of the experts does not (it is a share of the experts)."""
    from fate.runtime.experts.residency import BudgetError

    profile, layers = synthetic([0.0, 0.97, 0.97, 0.97])
    policy = plan(profile, layers, PlanTargets(budget=0.5))

    def slots(budget: Budget, state: int) -> int:
        run = plan_run(manifest_of(profile, layers, policy, state), profile, budget, precision=lambda layer: "int4",
                       file_bytes=lambda layer, precision: SLOT, runs_native=lambda layer, precision: True)
        assert run.state_bytes == state
        return sum(p.slots for p in run.layers.values())

    cost = 2 * SLOT  # a slot holds its file plus the page an archive member may start into
    assert slots(Budget(bytes=16 * cost), 0) == 16
    assert slots(Budget(bytes=16 * cost), 3 * cost) == 13
    assert slots(Budget(share=0.5), 3 * cost) == 16
    with pytest.raises(BudgetError, match="state"):
        slots(Budget(bytes=8 * cost), 1)  # 8 slots are the top-k minimum; the state leaves less


def test_the_first_layer_predicted_from_the_embedding_is_planned_as_one_nothing_predicts():
    """Layer 0's prediction (the embedding's) comes only its attention ahead of need
    (allocation.planned_recall): the policy and the run plan give it the slots they give a layer nothing
    predicts, and in one pool those slots are its floor; it still reads ahead at its width."""
    profile, layers = synthetic([0.0, 0.95, 0.6, 0.97], miss=[max(0.0, 1 - s / 6) for s in range(9)])
    first = dataclasses.replace(profile.layers[0], predictors={"cross_layer": profile.layers[3].predictors["cross_layer"]})
    embedded = dataclasses.replace(profile, layers=[first, *profile.layers[1:]])
    unpredicted = plan(profile, layers, PlanTargets(budget=0.5))
    predicted = plan(embedded, layers, PlanTargets(budget=0.5))
    assert unpredicted.layers[0].predictor == "none" and predicted.layers[0].predictor == "cross_layer"
    assert predicted.layers[0].prefetch_width > 0
    for share in (0.25, 0.5):
        before = run_plan(profile, layers, unpredicted, share)
        manifest = manifest_of(embedded, layers, predicted)
        manifest.graph_predicts = lambda index: index == 0 or layers[index - 1].predicts_next
        after = plan_run(manifest, embedded, Budget(share=share), precision=lambda layer: "int4",
                         file_bytes=lambda layer, precision: SLOT, runs_native=lambda layer, precision: True)
        assert [p.slots for p in after.layers.values()] == [p.slots for p in before.layers.values()]
        assert after.layers[0].width > 0 and after.layers[0].stalls_on_misses
        assert not any(after.layers[i].stalls_on_misses for i in (1, 2, 3))
