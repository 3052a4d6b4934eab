"""GPT-OSS checkpoints as published, with MXFP4 experts: decoded at compile time exactly as
transformers decodes them."""

from __future__ import annotations

import shutil

import numpy as np
import torch

from fate.compiler import CompileOptions, compile_checkpoint
from fate.compiler.checkpoint import decode_mxfp4
from fate.runtime import FateModel


def random_mxfp4(rng, experts: int, rows: int, cols: int):
    blocks = rng.integers(0, 256, size=(experts, rows, cols // 32, 16), dtype=np.uint8)
    scales = rng.integers(115, 122, size=(experts, rows, cols // 32), dtype=np.uint8)  # 2^-12 .. 2^-6
    return blocks, scales


def transformers_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32).numpy()


def test_decode_matches_transformers():
    blocks, scales = random_mxfp4(np.random.default_rng(0), 3, 8, 64)
    ours = np.stack([decode_mxfp4(blocks[e], scales[e]) for e in range(3)])  # [E, out, in]
    np.testing.assert_array_equal(ours.transpose(0, 2, 1), transformers_decode(blocks, scales))


def test_mxfp4_checkpoint_matches_transformers(tmp_path):
    from safetensors.torch import load_file, save_file
    from tiny_models import make_model

    hf = make_model("gpt_oss", tmp_path / "bf16", seed=16)
    cfg = hf.config
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    rng = np.random.default_rng(1)
    for i, layer in enumerate(hf.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        for name, rows, cols in (("gate_up_proj", 2 * cfg.intermediate_size, cfg.hidden_size),
                                 ("down_proj", cfg.hidden_size, cfg.intermediate_size)):
            blocks, scales = random_mxfp4(rng, cfg.num_local_experts, rows, cols)
            with torch.no_grad():  # the reference holds what transformers decodes
                getattr(layer.mlp.experts, name).copy_(torch.from_numpy(transformers_decode(blocks, scales)))
            del weights[prefix + name]
            weights[prefix + name + "_blocks"] = torch.from_numpy(blocks)
            weights[prefix + name + "_scales"] = torch.from_numpy(scales)
    ckpt = tmp_path / "mxfp4"
    shutil.copytree(tmp_path / "bf16", ckpt)
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    compile_checkpoint(CompileOptions(ckpt, tmp_path / "art", bits=(32,), dense_bits=32), log=lambda _m: None)
    ids = [5, 17, 99, 3, 250, 41, 7]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = FateModel.load(tmp_path / "art").logits(ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
