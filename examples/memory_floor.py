"""What a loaded model holds besides its experts, measured: the process's resident memory before
loading (interpreter, libraries), after loading with a small pool of experts, and its peak while
generating, against the non-expert graphs' bytes.

    python examples/memory_floor.py ARTIFACT [--budget 10%] [--prompt-len 163] [--decode-steps on|off]
"""

from __future__ import annotations

import argparse

import numpy as np
from fate.artifacts.budget import parse_budget
from fate.runtime import FateModel, OffloadOptions, SamplingConfig, generate
from fate.runtime.memory import current_rss, peak_rss
from fate.runtime.options import EngineOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--prompt-len", type=int, default=163)
    ap.add_argument("--decode-steps", choices=("on", "off"), default="on")
    args = ap.parse_args()
    start = current_rss()
    model = FateModel.load(args.artifact, EngineOptions(offload=OffloadOptions(parse_budget(args.budget), low_bit_prefill="off"),
                           decode_steps=args.decode_steps == "on"))
    loaded, load_peak = current_rss(), peak_rss()
    pool = model.experts.pool.total_bytes
    ids = np.random.default_rng(1).integers(0, model.spec.vocab_size, args.prompt_len).tolist()
    result = generate(model, ids, 16, SamplingConfig(greedy=True), eos_ids=set())
    mb = lambda b: f"{b / 1e6:.0f} MB"  # noqa: E731
    print(f"before loading {mb(start)}; after loading {mb(loaded)} (pool {mb(pool)}, so {mb(loaded - pool)} besides "
          f"it; non-expert graphs {mb(model.dense_bytes)}, of them run by native steps {mb(model.step_bytes)}); "
          f"peak while loading {mb(load_peak)}; peak while generating {mb(peak_rss())}, KV cache "
          f"{mb(result.stats.cache_bytes)}")
    model.close()


if __name__ == "__main__":
    main()
