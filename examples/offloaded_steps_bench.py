"""Offloaded decode with the resident experts run inside each layer's decode step, against the same
budget with the step handing every token's experts to the expert cache's load path (as before they
could run in the step), and against all-resident: one artifact, the models alternating in one process
round after round, so the machine's noise falls on all of them alike. Greedy decode from a random
prompt; decode tokens/s, medians over rounds, and each one's share of all-resident speed.

    python examples/offloaded_steps_bench.py ART [--budgets 25%,50%] [--rounds 7] [--tokens 150]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from fate.artifacts.budget import parse_budget
from fate.runtime.experts.offload import OffloadOptions
from fate.runtime.model import FateModel
from fate.runtime.options import EngineOptions


def decode_rate(model: FateModel, prompt: np.ndarray, tokens: int) -> float:
    cache = model.new_cache()
    token = int(model.head_logits(model.forward(prompt, cache))[-1].argmax())
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(model.head_logits(model.forward(np.asarray([token]), cache))[-1].argmax())
    return tokens / (time.perf_counter() - start)


def alternate(models: dict[str, FateModel], rounds: int, tokens: int) -> dict[str, list[float]]:
    """Decode tokens/s of each model, round after round in turn (after a warm-up), from one prompt."""
    prompt = np.random.default_rng(0).integers(0, next(iter(models.values())).spec.vocab_size, 32)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        decode_rate(model, prompt, 8)
    for _ in range(rounds):
        for name, model in models.items():
            rates[name].append(decode_rate(model, prompt, tokens))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--budgets", default="25%,50%")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=150)
    args = parser.parse_args()
    models = {"all-resident": FateModel.load(args.artifact)}
    for budget in args.budgets.split(","):
        models[f"{budget} experts in the step"] = FateModel.load(
            args.artifact, EngineOptions(offload=OffloadOptions(parse_budget(budget))))
        handing = models[f"{budget} experts handed to the cache"] = FateModel.load(
            args.artifact, EngineOptions(offload=OffloadOptions(parse_budget(budget))))
        for step in handing.steps.values():
            step.routed = None
    rates = alternate(models, args.rounds, args.tokens)
    resident = statistics.median(rates["all-resident"])
    for name, got in rates.items():
        median = statistics.median(got)
        print(f"{name:34s} {median:8.1f} tok/s  x all-resident {median / resident:.2f}  "
              f"({min(got):.1f}-{max(got):.1f})")
    for model in models.values():
        model.close()


if __name__ == "__main__":
    main()
