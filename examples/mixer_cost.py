"""Per-token cost of each decoder layer graph, by token mixer (attention, short convolution, gated
DeltaNet, Mamba2), in a prefill of S tokens and in decode steps; the routed experts excluded.

    python examples/mixer_cost.py ARTIFACT [--prompt-len 128] [--steps 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
from fate.runtime.model import FateModel
from fate.runtime.options import EngineOptions


class Timed:
    """A session whose run() time is added to `totals[label]`."""

    def __init__(self, session, label: str, totals: dict[str, float]):
        self.session, self.label, self.totals = session, label, totals

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.session.run(*args, **kwargs)
        self.totals[self.label] += time.perf_counter() - start
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = FateModel.load(args.artifact, EngineOptions(threads=args.threads))
    totals: dict[str, float] = collections.defaultdict(float)
    layers = model.manifest.layers
    model.layers = [Timed(session, layer.mixer, totals) for session, layer in zip(model.layers, layers)]
    count = collections.Counter(layer.mixer for layer in layers)
    vocab = model.spec.vocab_size
    for _ in range(2):  # the first pass warms up
        totals.clear()
        cache = model.new_cache()
        model.forward(np.arange(1, args.prompt_len + 1) % vocab, cache)
        prefill = dict(totals)
        totals.clear()
        for i in range(args.steps):
            model.forward(np.array([(5 + i) % vocab]), cache)
        decode = dict(totals)
    for mixer in sorted(count):
        print(f"{mixer:15s} x{count[mixer]}: prefill {prefill[mixer] / args.prompt_len / count[mixer] * 1e3:.3f} ms, "
              f"decode {decode[mixer] / args.steps / count[mixer] * 1e3:.3f} ms per token and layer")


if __name__ == "__main__":
    main()
