"""A trial, not a feature: offloaded decode that also begins prefetches two layers ahead, against the
compiled policy alone, in one process, alternating round after round.

At layer l the runtime predicts layer l+1's experts (the policy's cross-layer predictor). The trial
also ranks layer l+2's experts by that layer's own router applied to layer l's router input (the
router's float32 bytes from l+2's decode step view) and begins reads of the best `--width` of them
into l+2's slots, where the policy gives l+2 a prediction at all. Nothing else changes: slots, widths,
the one-ahead prefetches. It reaches into the offloaded store's internals, so it lives here; if it
pays, the profiler should measure the two-ahead recall and the plan split the slots between horizons.
examples/two_layers_ahead.py measures the recall itself.

    python examples/two_ahead_trial.py ARTIFACT [--budget 25%] [--width 2] [--rounds 5] [--tokens 24]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from fate.artifacts.budget import parse_budget
from fate.artifacts.layout import GraphIO as IO
from fate.runtime.experts.offload import OffloadOptions
from fate.runtime.model import FateModel
from fate.runtime.options import EngineOptions
from offloaded_steps_bench import alternate  # examples/, beside this file


def routers(model: FateModel) -> dict[int, np.ndarray]:
    """Layer -> its router's float32 weights [H, E], viewed in its decode step's graph bytes."""
    found = {}
    for index, step in model.steps.items():
        view = next(v for v in model.manifest.layers[index].decode_step.tensors if v.name == "router")
        if view.dtype == "float32" and model.manifest.layers[index].routing.scoring == "softmax":
            found[index] = np.frombuffer(step.graph, np.float32, int(np.prod(view.shape)), view.offset).reshape(view.shape)
    return found


def prefetch_two_ahead(model: FateModel, width: int) -> None:
    store, weights, seen = model.experts, routers(model), {}
    for index, step in model.steps.items():
        def run(*args, run=step.run, index=index):
            out, ran = run(*args)
            seen["layer"], seen["x"] = index, out[IO.ROUTER_INPUT]
            return out, ran
        step.run = run
    hint = store.hint

    def hint_and_two_ahead(layer: int, predictions) -> None:
        hint(layer, predictions)
        target = layer + 1
        plan = store.plans.get(target)
        if seen.get("layer") != layer - 1 or target not in weights or plan is None or plan.width <= 0:
            return
        w = weights[target]
        scores = seen["x"] @ (w if w.shape[0] == seen["x"].shape[-1] else w.T)
        if target in store._reads_itself:
            store.cache.start_prefetch(target, np.argsort(-scores[0], kind="stable")[:min(width, plan.slots)].tolist())
    store.hint = hint_and_two_ahead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--budget", default="25%")
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    models = {name: FateModel.load(args.artifact, EngineOptions(offload=OffloadOptions(parse_budget(args.budget))))
              for name in ("policy", f"policy + two ahead (width {args.width})")}
    prefetch_two_ahead(models[f"policy + two ahead (width {args.width})"], args.width)
    rates = alternate(models, args.rounds, args.tokens)
    for name, model in models.items():
        decode = model.experts.report().decode
        print(f"{name:30s} {statistics.median(rates[name]):7.2f} tok/s ({min(rates[name]):.2f}-{max(rates[name]):.2f})"
              f"  hit {decode.hit_rate:.3f}  {decode.bytes_read / decode.tokens / 1e6:.1f} MB a token"
              f"  stall {decode.stall_s / decode.tokens * 1e3:.1f} ms a token")
        model.close()


if __name__ == "__main__":
    main()
