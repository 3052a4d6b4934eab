"""How well layer l's router input predicts the experts of layer l+1 and of layer l+2: the measurement
behind "prediction two layers ahead" (BENCHMARKS.md). A prediction two layers ahead would give a
prefetch twice the lead time, at some recall. For checkpoints whose transformers layers have the router
at `mlp.gate` and its input from `post_attention_layernorm` (Qwen2-MoE, Qwen3-MoE, Mixtral); random token
ids, transformers in float32.

    python examples/two_layers_ahead.py CHECKPOINT [--tokens 512]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def top(x: torch.Tensor, router: torch.nn.Module, width: int) -> torch.Tensor:
    return torch.topk(x.reshape(-1, x.shape[-1]) @ router.weight.T, width, dim=-1).indices


def recall(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    return float(np.mean([len(set(p.tolist()) & set(a.tolist())) / len(a) for p, a in zip(predicted, actual)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    layers = model.model.layers
    router_inputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out, i=i: router_inputs.__setitem__(i, out.detach()))
    ids = torch.randint(0, model.config.vocab_size, (max(1, args.tokens // 128), 128),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    k = model.config.num_experts_per_tok
    actual = {i: top(x, layers[i].mlp.gate, k) for i, x in router_inputs.items()}
    for ahead in (1, 2):
        for source in range(len(layers) - ahead):
            target = source + ahead
            found = [recall(top(router_inputs[source], layers[target].mlp.gate, width), actual[target])
                     for width in (k, 2 * k)]
            print(f"layer {source} -> {target} ({ahead} ahead): recall {found[0]:.2f} at width {k}, "
                  f"{found[1]:.2f} at width {2 * k}")


if __name__ == "__main__":
    main()
