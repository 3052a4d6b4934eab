"""Generate a Qwen2-MoE checkpoint at the expert shapes of Qwen1.5-MoE-A2.7B (hidden 2048, 60 experts
of intermediate 1408, top-4, a shared expert of 5632, 16 heads) with fewer layers, in bfloat16,
with the bundled example tokenizer (so the vocabulary is small and the experts dominate).

    python examples/make_realistic_moe.py --layers 4 --out /tmp/qwen-moe-a2.7b-4l

`--family nemotron_h` makes Nemotron-H blocks at shapes after Nemotron-3-Nano-30B-A3B's (hidden 2688; Mamba2
blocks of 64 heads of 64, state 128, 8 groups; attention with 32 heads of 128 and 2 KV heads; MoE blocks of
`--experts` non-gated squared-ReLU experts of intermediate 1856, top-6, a shared expert of 3712): `--layers`
MoE blocks, each after a Mamba2 block, the second Mamba2 block replaced by attention.

`--family qwen3_5_moe_text` makes a hybrid instead, at the layer shapes of Qwen3.5-35B-A3B (hidden
2048; gated DeltaNet layers with 16 key and 32 value heads of 128, every fourth layer gated attention
with 16 heads of 256 and 2 KV heads; experts of intermediate 512, top-8, a shared expert of 512) with
`--experts` routed experts per layer (256 in the real model).

Random weights (transformers' own init): for speed and memory measurements, not for text.
With transformers' init each layer's update is as large as the residual stream it adds to, so adjacent
router inputs are far apart (cosine 0.33-0.78) and routing cannot be predicted across layers; trained
models have a stream large against each update (the Fate paper measures similarities near 0.9 on real
checkpoints). `--embedding-scale 100` builds that regime synthetically: the embedding is scaled up, so
the stream starts large and every router input stays close to the previous layer's.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import (
    NemotronHConfig,
    NemotronHForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeTextConfig,
)

EXAMPLE = Path(__file__).parent / "tiny-moe"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embedding-scale", type=float, default=1.0,
                    help="multiply the embedding by this (1: transformers' init; 100: trained-like similarity)")
    ap.add_argument("--family", choices=("qwen2_moe", "qwen3_5_moe_text", "nemotron_h"), default="qwen2_moe")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per layer (default 60 / 64 / 32)")
    ap.add_argument("--low-memory", action="store_true",
                    help="build the weights in bfloat16 directly, not float32 first: a 12-layer qwen2_moe model "
                         "peaks at 22 GB of RSS this way and is killed on a 24 GB machine the default way (other "
                         "random weights than the default's)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.low_memory:
        torch.set_default_dtype(torch.bfloat16)
    if args.family == "qwen2_moe":
        config = Qwen2MoeConfig(
            vocab_size=2048, hidden_size=2048, num_hidden_layers=args.layers, num_attention_heads=16,
            num_key_value_heads=16, intermediate_size=5632, moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632, num_experts=args.experts or 60, num_experts_per_tok=4,
            norm_topk_prob=False, max_position_embeddings=8192, rope_theta=1000000.0, tie_word_embeddings=False,
            eos_token_id=0, bos_token_id=0, dtype="bfloat16",
        )
        model = Qwen2MoeForCausalLM(config)
    elif args.family == "nemotron_h":
        blocks = [t for i in range(args.layers) for t in (("full_attention" if i == 1 else "linear_attention"), "moe")]
        config = NemotronHConfig(
            vocab_size=2048, hidden_size=2688, layers_block_type=blocks, num_attention_heads=32,
            num_key_value_heads=2, head_dim=128, mamba_num_heads=64, mamba_head_dim=64, ssm_state_size=128,
            n_groups=8, conv_kernel=4, moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
            n_routed_experts=args.experts or 32, num_experts_per_tok=6, routed_scaling_factor=2.5,
            max_position_embeddings=8192, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
            dtype="bfloat16",
        )
        model = NemotronHForCausalLM(config)
    else:
        config = Qwen3_5MoeTextConfig(
            vocab_size=2048, hidden_size=2048, num_hidden_layers=args.layers, num_attention_heads=16,
            num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
            linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
            moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=args.experts or 64,
            num_experts_per_tok=8, max_position_embeddings=8192, tie_word_embeddings=False,
            eos_token_id=0, bos_token_id=0, dtype="bfloat16",
        )
        model = Qwen3_5MoeForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(args.embedding_scale)
    model.save_pretrained(args.out, max_shard_size="2GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EXAMPLE / name, args.out / name)
    size = sum(p.stat().st_size for p in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {size / 1e9:.2f} GB of safetensors")


if __name__ == "__main__":
    main()
