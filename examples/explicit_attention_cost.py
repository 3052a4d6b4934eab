"""What a layer pays whose attention onnxruntime's fused kernel cannot take (a head size that is not a
multiple of 8): one checkpoint at Qwen1.5-MoE-A2.7B's dense shapes (hidden 2048, 16 heads of 128, a
shared expert of 5632; few small experts), compiled as the compiler does (fused attention, native
decode steps) and with the explicit attention forced, into OUT/fused and OUT/explicit. Then:

    python examples/explicit_attention_cost.py OUT
    python examples/layer_graph_bench.py OUT/fused OUT/explicit --threads 1 --past 200
    fate-run OUT/fused -p "The quick brown fox jumps over the lazy dog" -n 64 --greedy --ignore-eos --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import make_model  # noqa: E402

import fate.compiler.graphs as graphs  # noqa: E402
import fate.compiler.graphs.attention  # noqa: E402,F401 - patched below
import fate.compiler.graphs.steps  # noqa: E402,F401
from fate.compiler import CompileOptions, compile_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    ckpt = args.out / "ckpt"
    make_model("qwen2_moe", ckpt, hidden_size=2048, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
               intermediate_size=5632, num_experts=8, num_experts_per_tok=4, num_hidden_layers=args.layers,
               num_attention_heads=16, num_key_value_heads=16)
    compile_checkpoint(CompileOptions(ckpt, args.out / "fused", bits=(4,), force=True), log=print)
    forced = lambda cfg, w: "forced for a measurement"  # noqa: E731 - every layer takes the explicit form
    graphs.attention.fused_attention_refusal = graphs.steps.fused_attention_refusal = forced
    compile_checkpoint(CompileOptions(ckpt, args.out / "explicit", bits=(4,), force=True), log=print)


if __name__ == "__main__":
    main()
