"""Where the time of one expert load goes, on this machine: read from storage (page cache dropped),
SHA-256 check, graph check, onnxruntime session creation, first run for one token.

    python examples/load_cost.py ARTIFACT [--layer 1] [--experts 12] [--precision int4]

Medians over the experts measured; every step is the one the runtime's loader performs.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import numpy as np

from fate.artifacts import Artifact
from fate.artifacts.graph_check import check_graph
from fate.artifacts.layout import GraphIO
from fate.artifacts.store import read_range
from fate.runtime.sessions import make_expert_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--layer", type=int, default=None, help="default: the second MoE layer")
    parser.add_argument("--experts", type=int, default=12)
    parser.add_argument("--precision", default=None, help="default: the first stored")
    args = parser.parse_args()

    artifact = Artifact.open(args.artifact)
    moe = artifact.manifest.moe_layers
    spec = moe[min(1, len(moe) - 1)] if args.layer is None else artifact.manifest.layers[args.layer]
    precision = args.precision or next(iter(spec.experts))
    files = spec.experts[precision][: args.experts]
    x = np.random.default_rng(0).standard_normal((1, artifact.manifest.model.hidden_size)).astype(np.float32)
    steps: dict[str, list[float]] = {"read": [], "sha256": [], "graph check": [], "session": [], "first run": [],
                                     "run": []}
    keep = []  # sessions stay alive, as in a cache, so each creation allocates afresh
    for path in files:
        member = artifact.member(path)
        t0 = time.perf_counter()
        data = read_range(member.file, member.offset, member.size, uncached=True)
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        check_graph(data, path)
        t3 = time.perf_counter()
        session = make_expert_session(data)
        t4 = time.perf_counter()
        session.run([GraphIO.EXPERT_OUT], {GraphIO.EXPERT_IN: x})
        t5 = time.perf_counter()
        session.run([GraphIO.EXPERT_OUT], {GraphIO.EXPERT_IN: x})
        t6 = time.perf_counter()
        for name, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            steps[name].append(seconds)
        keep.append(session)
    size = statistics.median(artifact.member(p).size for p in files)
    print(f"{args.artifact}: layer {spec.index}, {precision}, {len(files)} experts of {size / 1e6:.2f} MB (median ms)")
    for name, values in steps.items():
        print(f"  {name:12s} {statistics.median(values) * 1e3:8.3f}")
    load = sum(statistics.median(steps[n]) for n in ("read", "session"))
    print(f"  a reload (read + session): {load * 1e3:.2f} ms = {load / statistics.median(steps['run']):.0f} runs "
          f"of the expert for one token")


if __name__ == "__main__":
    main()
