"""MatMulNBits as onnxruntime runs it against a numpy dequantize-then-matmul reference."""

from __future__ import annotations

import numpy as np
import pytest

from fate.compiler.onnx_builder import FLOAT, GraphBuilder
from fate.compiler.quantize import dequantize, matmul_nbits, quantize
from fate.runtime.sessions import make_session


def run_matmul_nbits(x: np.ndarray, w: np.ndarray, bits: int, block: int) -> np.ndarray:
    b = GraphBuilder("q")
    inp = b.input("x", FLOAT, ["M", w.shape[1]])
    b.output(matmul_nbits(b, inp, quantize(w, bits, block)), "y", FLOAT, ["M", w.shape[0]])
    return make_session(b.model().SerializeToString()).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n,k,block", [(48, 64, 32), (33, 80, 32), (16, 128, 64), (7, 40, 16)])
def test_onnxruntime_matches_numpy_dequantize_reference(bits, n, k, block):
    rng = np.random.default_rng(n * k + bits)
    w = rng.normal(size=(n, k)).astype(np.float32)
    x = rng.normal(size=(5, k)).astype(np.float32)
    q = quantize(w, bits, block)
    expected = x @ dequantize(q).T
    got = run_matmul_nbits(x, w, bits, block)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("bits,max_err", [(2, 0.5 / 3), (4, 0.5 / 15), (8, 0.5 / 255)])
def test_dequantized_error_within_half_a_step(bits, max_err):
    rng = np.random.default_rng(bits)
    w = rng.uniform(-1, 1, size=(8, 96)).astype(np.float32)
    err = np.abs(dequantize(quantize(w, bits, 32)) - w)
    # one step is (block max - block min) / levels <= 2 / levels
    assert err.max() <= 2 * max_err + 1e-6


def test_zero_is_exact_and_padding_is_ignored():
    w = np.zeros((4, 40), np.float32)
    w[0, 3] = 1.5
    assert dequantize(quantize(w, 4, 32))[1:].tolist() == np.zeros((3, 40)).tolist()


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        quantize(np.ones((2, 32), np.float32), 3, 32)  # MatMulNBits has no 3-bit layout
    with pytest.raises(ValueError):
        quantize(np.ones((2, 32), np.float32), 4, 24)


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_biased_clamped_expert_matches_numpy(bits):
    """GPT-OSS's expert (biases, clamped SwiGLU) through onnxruntime against the same function
    in numpy on the same (dequantized) weights."""
    from types import SimpleNamespace

    from fate.compiler import graphs
    from fate.compiler.profile import expert_forward

    rng = np.random.default_rng(bits)
    h, i = 64, 32
    weights = [rng.normal(size=s).astype(np.float32) * 0.3 for s in [(i, h), (i, h), (h, i)]]
    biases = tuple(rng.normal(size=n).astype(np.float32) * 0.1 for n in (i, i, h))
    x = rng.normal(size=(5, h)).astype(np.float32) * 3  # large enough to reach the clamps
    stored = weights if bits == 32 else [quantize(w, bits, 32) for w in weights]
    reference = weights if bits == 32 else [dequantize(q) for q in stored]
    cfg = SimpleNamespace(swiglu_limit=7.0, swiglu_alpha=1.702)
    model = graphs.expert_graph(*stored, biases=biases, cfg=cfg)
    got = make_session(model.SerializeToString()).run(["y"], {"x": x})[0]
    expected = expert_forward(x, *reference, biases=biases, limit=7.0, alpha=1.702)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_banded_quantization_equals_whole(monkeypatch):
    """Large weights (LM heads, embeddings) are quantized a band of rows at a time to bound memory;
    uneven bands give exactly what one band gives."""
    from fate.compiler import quantize as q

    w = np.random.default_rng(5).standard_normal((101, 300)).astype(np.float32)
    whole = {bits: q.quantize(w, bits, 32) for bits in (2, 4, 8)}
    whole_rows = q.quantize_rows_int8(w)
    monkeypatch.setattr(q, "ROWS_ELEMENTS", 300 * 7)
    for bits, expected in whole.items():
        banded = q.quantize(w, bits, 32)
        for field in ("packed", "scales", "zero_points"):
            assert np.array_equal(getattr(banded, field), getattr(expected, field)), (bits, field)
    codes, scales = q.quantize_rows_int8(w)
    assert np.array_equal(codes, whole_rows[0]) and np.array_equal(scales, whole_rows[1])
