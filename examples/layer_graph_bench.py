"""The dense layer graphs alone, artifacts side by side: what a change to the compiler's graphs buys.

Each artifact's layer graphs run on the same state (a prompt of --past tokens already in the cache),
for one decode token or a --prefill-tokens prompt from an empty cache; the artifacts alternate in one
process, round after round, so the machine's noise falls on all of them alike. Reports per step the
wall time and the process's CPU time (the steadier of the two on a shared machine), medians over rounds.

    python examples/layer_graph_bench.py ART_A ART_B [--threads 1] [--past 32] [--prefill-tokens 0]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
from fate.artifacts.layout import GraphIO as IO
from fate.runtime.model import FateModel
from fate.runtime.options import EngineOptions


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def layer_step(model: FateModel, past: int, prefill: int):
    """A function that runs every layer graph once as the generation loop does (FateModel.run_layer),
    always on the same state: a prompt of `past` tokens, or an empty cache for a prefill."""
    cache = model.new_cache()
    if prefill:
        hidden = model.embed.run([IO.HIDDEN], {IO.INPUT_IDS: np.arange(1, prefill + 1) % model.spec.vocab_size})[0]
        start, new = 0, prefill
    else:
        hidden = model.forward(np.arange(1, past + 1) % model.spec.vocab_size, cache)[:, -1:]
        start, new = past, 1
    positions = model.positions.step(start, new)
    for index in range(len(cache.layers)):  # in-place buffers with room for the step: never grown while timed
        if cache.runs_in_place(index):
            cache.reserve(index, start + new, model.spec.max_positions)
    fixed = [dict(state) for state in cache.layers]

    def step() -> None:
        for spec in model.manifest.layers:
            model.run_layer(spec, hidden, cache, positions.for_layer(spec), new)
        cache.layers[:] = [dict(state) for state in fixed]  # what the step replaced, back as it was

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--past", type=int, default=32, help="tokens already in the cache (decode)")
    parser.add_argument("--prefill-tokens", type=int, default=0, help="time a prefill of this many tokens instead")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=4, help="steps timed together per round")
    args = parser.parse_args()
    work = {}
    for path in args.artifacts:
        model = FateModel.load(path, EngineOptions(threads=args.threads))
        work[path] = layer_step(model, args.past, args.prefill_tokens)
    wall = {path: [] for path in work}
    cpu = {path: [] for path in work}
    for _ in range(args.rounds):
        for path, step in work.items():
            start, start_cpu = time.perf_counter(), process_cpu()
            for _ in range(args.steps):
                step()
            wall[path].append((time.perf_counter() - start) / args.steps)
            cpu[path].append((process_cpu() - start_cpu) / args.steps)
    what = f"prefill of {args.prefill_tokens}" if args.prefill_tokens else f"decode at {args.past} past"
    print(f"layer graphs per step ({what}, {args.threads} thread(s), medians of {args.rounds} rounds):")
    for path in work:
        print(f"  {path}: wall {statistics.median(wall[path]) * 1e3:.3f} ms, "
              f"CPU {statistics.median(cpu[path]) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
