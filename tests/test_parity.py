"""Compiled artifacts against transformers on the same weights and tokens: the ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fate.runtime import FateModel, SamplingConfig, generate

PROMPT = [5, 17, 99, 3, 250, 41, 7, 64, 128]
DECODE_STEPS = 8


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def hf_greedy(hf, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                          eos_token_id=None, pad_token_id=0, min_new_tokens=steps)
    return out[0, len(prompt):].tolist()


def hf_logits(hf, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def incremental_logits(model: FateModel, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """Prefill the prompt, then feed the continuation one token at a time through the KV cache."""
    cache = model.new_cache()
    rows = [model.head_logits(model.forward(np.asarray(prompt), cache))]
    for token in continuation:
        rows.append(model.head_logits(model.forward(np.asarray([token]), cache)))
    return np.concatenate(rows)


def test_fp32_logits_and_kv_cache_match_transformers(built):
    continuation = hf_greedy(built.hf, PROMPT, DECODE_STEPS)
    ref = hf_logits(built.hf, PROMPT + continuation)
    model = FateModel.load(built.artifact(32))
    got = incremental_logits(model, PROMPT, continuation)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4


def test_fp32_greedy_tokens_identical(built):
    model = FateModel.load(built.artifact(32))
    result = generate(model, PROMPT, max_new_tokens=DECODE_STEPS, sampling=SamplingConfig(), eos_ids=set())
    assert result.token_ids == hf_greedy(built.hf, PROMPT, DECODE_STEPS)


def test_one_token_prompt(built):
    model = FateModel.load(built.artifact(32))
    assert rel_err(model.logits([42]), hf_logits(built.hf, [42])) < 1e-4


@pytest.mark.parametrize("bits,bound", [(16, 5e-3), (8, 0.05), (4, 0.3)])
def test_quantized_logit_error_is_bounded(built, bits, bound, record_property):
    """Random weights are the worst case for quantization (near-tied routers flip experts); the
    trained model's INT4 perplexity is checked tightly in test_example_model. Here the bound only
    catches a broken quantizer (errors of order 1); the figure itself is recorded.

    GPT-OSS is left out at INT4: its random biased router flips experts under INT4 noise (its
    small logits move by about 50%; with another seed INT8 moved them by 26%), so the logits measure
    the routing, not the quantizer; test_quantize checks its quantized experts (biases, clamped
    SwiGLU) against numpy instead."""
    if built.family == "gpt_oss" and bits == 4:
        pytest.skip("routing flips dominate on random GPT-OSS weights at INT4; see test_quantize")
    ref = hf_logits(built.hf, PROMPT)
    err = rel_err(FateModel.load(built.artifact(bits)).logits(PROMPT), ref)
    record_property(f"int{bits}_rel_err", err)
    print(f"{bits}-bit relative logit error: {err:.4f}")
    assert err < bound
