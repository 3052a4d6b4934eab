"""The bundled trained model (examples/tiny-moe): compiled artifacts against transformers on
held-out text. Routing in a trained model is meaningful, so this is where quantization error
shows its real size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fate.compiler import CompileOptions, compile_checkpoint
from fate.runtime import Engine
from fate.runtime.evaluate import perplexity, windows

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe"
WINDOW = 128


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("example")
    compile_checkpoint(CompileOptions(EXAMPLE, root / "int4", bits=(4,)), log=lambda _m: None)
    compile_checkpoint(CompileOptions(EXAMPLE, root / "fp32", bits=(32,), dense_bits=32), log=lambda _m: None)
    hf = AutoModelForCausalLM.from_pretrained(EXAMPLE, dtype=torch.float32).eval()

    def hf_logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].numpy()

    int4, fp32 = Engine.load(root / "int4"), Engine.load(root / "fp32")
    ids = int4.encode((EXAMPLE / "heldout.txt").read_text(encoding="utf-8"))
    return dict(int4=int4, fp32=fp32, hf=hf_logits, ids=ids)


def test_fp32_perplexity_equals_transformers(example):
    ref = perplexity(example["hf"], example["ids"], WINDOW)
    got = perplexity(example["fp32"].logits, example["ids"], WINDOW)
    assert abs(got.value / ref.value - 1) < 1e-4


def test_int4_perplexity_within_3_percent(example):
    ref = perplexity(example["hf"], example["ids"], WINDOW)
    got = perplexity(example["int4"].logits, example["ids"], WINDOW)
    print(f"held-out perplexity: transformers fp32 {ref.value:.3f}, fate int4 {got.value:.3f}")
    assert got.value / ref.value < 1.03


def test_int4_next_token_agreement(example):
    """Teacher-forced argmax agreement with transformers fp32 on held-out windows."""
    agree = total = 0
    for chunk in list(windows(example["ids"], WINDOW))[:40]:
        ref, got = example["hf"](chunk).argmax(-1), example["int4"].logits(chunk).argmax(-1)
        agree += int((ref == got).sum())
        total += len(chunk)
    print(f"int4 next-token agreement: {agree / total:.3%}")
    assert agree / total > 0.9
