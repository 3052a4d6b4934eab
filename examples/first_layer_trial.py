"""A trial, not a feature: what predicting the first layer's experts gains in offloaded decode, and what
any predictor of them could gain at most. One artifact compiled with the embedding's prediction of layer 0
(Manifest.embed_predicts_next), four ways in one process, alternating round after round:

- before: the artifact as if the embedding did not predict (layer 0 loads on demand; the run plan gives
  it the slots a layer nothing predicts gets, as artifacts before schema 1.9 were planned);
- before, plus an oracle at the token's start: the next token's true layer-0 experts (recorded from a
  first greedy run of the same prompt: every run gives the same tokens) read ahead when the token's step
  begins, the lead the embedding's prediction has;
- before, plus the oracle at the last layer's routing: a whole layer's lead, which no predictor that needs
  the next token has;
- the default: the embedding's prediction read ahead, layer 0 planned as one nothing predicts
  (runtime.experts.allocation.planned_recall).

It reaches into the offloaded store's internals, so it lives here.

    python examples/first_layer_trial.py ARTIFACT [--budget 25%] [--precision int4] [--rounds 8] [--tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np
from fate.artifacts import Artifact
from fate.artifacts.budget import parse_budget
from fate.artifacts.predictors import Predictor
from fate.runtime.experts.offload import OffloadedExperts, OffloadOptions
from fate.runtime.model import FateModel
from fate.runtime.options import EngineOptions
from offloaded_steps_bench import alternate, decode_rate  # examples/, beside this file


def load(path: str, options: EngineOptions, predicted: bool) -> FateModel:
    """The artifact offloaded; without `predicted`, as if its embedding did not predict layer 0."""
    if predicted:
        return FateModel.load(path, options)
    artifact = Artifact.open(path)
    manifest = artifact.manifest
    policy = manifest.policy and dataclasses.replace(manifest.policy, layers=[
        dataclasses.replace(p, predictor=Predictor.NONE.value, prefetch_width=0) if p.index == 0 else p
        for p in manifest.policy.layers])
    artifact.manifest = dataclasses.replace(manifest, embed_predicts_next=False, policy=policy)
    store = OffloadedExperts(artifact, options.offload, options.experts)
    model = FateModel(artifact, store, options.threads, options.verify, options.decode_steps)
    store.ready()
    return model


def count_steps(store: OffloadedExperts, step: dict) -> None:
    """step["i"]: the decode step under way in the current generation (-1 in prefill)."""
    begin_step = store.begin_step

    def counted(num_tokens: int, prefill: bool) -> None:
        step["i"] = -1 if prefill else step["i"] + 1
        begin_step(num_tokens, prefill)
    store.begin_step = counted


def record_first_layer(model: FateModel, truth: dict[int, list[int]]) -> None:
    store, step = model.experts, {"i": -1}
    count_steps(store, step)
    observe = store.observe

    def observed(layer: int, ids) -> None:
        if layer == 0 and step["i"] >= 0:
            truth.setdefault(step["i"], ids.reshape(-1).tolist())
        observe(layer, ids)
    store.observe = observed


def oracle(model: FateModel, truth: dict[int, list[int]], at_last_layer: bool) -> None:
    """Read the true layer-0 experts of a decode step ahead: at its start, or at the last layer's routing
    of the step before."""
    store, step = model.experts, {"i": -1}
    count_steps(store, step)
    first, last = min(store.plans), max(store.plans)

    def read_ahead(i: int) -> None:
        wanted = truth.get(i)
        absent = wanted and store.cache.absent(first, set(wanted))
        if absent:
            store.cache.protect(first, set(wanted))
            store._prefetch(store.plans[first], [e for e in wanted if e in absent])

    begin_step, after_layer = store.begin_step, store.after_layer

    def begun(num_tokens: int, prefill: bool) -> None:
        begin_step(num_tokens, prefill)
        if not prefill and not at_last_layer:
            read_ahead(step["i"])

    def after(layer: int, out):
        if at_last_layer and layer == last and out.ids is not None:
            read_ahead(step["i"] + 1)
        return after_layer(layer, out)
    store.begin_step, store.after_layer = begun, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--precision", default=None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    options = EngineOptions(precision=args.precision, offload=OffloadOptions(parse_budget(args.budget)))
    if not Artifact.open(args.artifact).manifest.embed_predicts_next:
        parser.error("the artifact's embedding does not predict layer 0 (compiled before schema 1.9, or layer 0 is dense)")
    names = ("before", "before + oracle at the token's start", "before + oracle at the last layer",
             "embedding predicts (default)")
    models = {name: load(args.artifact, options, predicted=name == names[3]) for name in names}
    truth: dict[int, list[int]] = {}
    record_first_layer(models[names[0]], truth)
    prompt = np.random.default_rng(0).integers(0, models[names[0]].spec.vocab_size, 32)  # alternate's
    decode_rate(models[names[0]], prompt, args.tokens)
    oracle(models[names[1]], truth, at_last_layer=False)
    oracle(models[names[2]], truth, at_last_layer=True)
    rates = alternate(models, args.rounds, args.tokens)
    base = statistics.median(rates[names[0]])
    for name, model in models.items():
        decode, plan = model.experts.report().decode, model.experts.plans[min(model.experts.plans)]
        median = statistics.median(rates[name])
        print(f"{name:38s} {median:7.1f} tok/s  x{median / base:.3f}  ({min(rates[name]):.1f}-{max(rates[name]):.1f})"
              f"  {decode.bytes_read / decode.tokens / 1e6:6.1f} MB a token  stall {decode.stall_s / decode.tokens * 1e3:5.2f} ms"
              f"  layer 0: {plan.slots} slots, width {plan.width}")
        model.close()


if __name__ == "__main__":
    main()
