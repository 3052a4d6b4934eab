"""Held-out perplexity of compiled artifacts next to transformers (float32) on the same windows.

    python examples/perplexity.py examples/tiny-moe out/tiny-moe [more artifacts...]

Prints one line per model and the ratio to transformers. The reference needs the `compile`
extra (torch, transformers); the artifacts run through the runtime alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from fate.runtime import Engine
from fate.runtime.evaluate import perplexity


def transformers_logits(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    return logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, help="Hugging Face checkpoint (holds heldout.txt)")
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--text", type=Path, default=None, help="default: MODEL_DIR/heldout.txt")
    ap.add_argument("--window", type=int, default=128)
    args = ap.parse_args()

    text = (args.text or args.model_dir / "heldout.txt").read_text(encoding="utf-8")
    engines = [Engine.load(a) for a in args.artifacts]
    ids = engines[0].encode(text)
    ref = perplexity(transformers_logits(args.model_dir), ids, args.window)
    print(f"{'transformers fp32':28s} perplexity {ref.value:8.3f}  ({ref.tokens} tokens)")
    for path, engine in zip(args.artifacts, engines):
        precision = ",".join(sorted(set(engine.model.experts.precisions.values())))
        got = perplexity(engine.logits, ids, args.window)
        print(f"{f'fate {path.name} ({precision})':28s} perplexity {got.value:8.3f}  "
              f"ratio {got.value / ref.value:.4f}")


if __name__ == "__main__":
    main()
