"""The building blocks every graph is made of: norms, linear layers (float or MatMulNBits), SwiGLU, RoPE."""

from __future__ import annotations

import numpy as np

from ..families.base import Role
from ..onnx_builder import GraphBuilder
from ..quantize import QuantizedWeight, matmul_nbits, quantize


W = dict[Role, np.ndarray]


Weight = np.ndarray | QuantizedWeight


def rms_norm(b: GraphBuilder, x: str, weight: np.ndarray | None, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * weight (none: a norm without a weight), over the last axis. Written
    as Pow, ReduceMean, Add, Sqrt, Div, Mul: the pattern onnxruntime fuses into one
    SimplifiedLayerNormalization kernel (seven ops per norm per step otherwise)."""
    mean_sq = b.op("ReduceMean", b.op("Pow", x, b.scalar(2.0, "two")), axes=[-1], keepdims=1)
    normed = b.op("Div", x, b.op("Sqrt", b.op("Add", mean_sq, b.scalar(eps, "eps"))))
    return normed if weight is None else b.op("Mul", normed, b.const(weight.astype(np.float32), "norm_weight"))


def norm(b: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray | None, eps: float, kind: str) -> str:
    """The family's normalization: RMSNorm, or LayerNorm with a bias."""
    if kind == "layer":
        bias = np.zeros_like(weight) if bias is None else bias
        return b.op("LayerNormalization", x, b.const(weight.astype(np.float32), "ln_weight"),
                    b.const(bias.astype(np.float32), "ln_bias"), axis=-1, epsilon=eps)
    return rms_norm(b, x, weight, eps)


def linear(b: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray | None = None, exact: bool = False) -> str:
    """x @ weight^T (+ bias), weight in the checkpoint's [out, in] layout, stored as the builder
    says (float32, or quantized for MatMulNBits). `exact` keeps float32 whatever the builder says:
    routers, whose logits pick the experts, and gates too small to be worth quantizing."""
    fmt = b.weights
    if exact or fmt.bits == 32:
        y = b.op("MatMul", x, b.const(np.ascontiguousarray(weight.T, dtype=np.float32), "weight"))
    else:
        q = quantize(weight, fmt.bits, fmt.block_size)  # converts to float32 a band at a time
        y = matmul_nbits(b, x, q, fmt.accuracy_level)
    return y if bias is None else b.op("Add", y, b.const(bias.astype(np.float32), "bias"))


def linears(b: GraphBuilder, x: str, weights: list[np.ndarray], biases: list[np.ndarray | None]) -> list[str]:
    """[linear(x, w, bias) for each w], as one matrix product split after: one MatMulNBits call
    instead of several on the same input (the fixed cost of each is a few tens of microseconds a
    step at decode). Each weight is quantized on its own, as `linear` would: the numbers are the
    same, the rows of a block-wise quantized weight being independent."""
    if len(weights) == 1:
        return [linear(b, x, weights[0], biases[0])]
    fmt = b.weights
    widths = [w.shape[0] for w in weights]
    if fmt.bits == 32:
        stacked = np.concatenate([np.asarray(w, np.float32).T for w in weights], axis=1)
        y = b.op("MatMul", x, b.const(np.ascontiguousarray(stacked), "weight"))
    else:
        parts = [quantize(w, fmt.bits, fmt.block_size) for w in weights]
        y = matmul_nbits(b, x, QuantizedWeight.stack(parts), fmt.accuracy_level)
    if any(bias is not None for bias in biases):
        full = [np.zeros(n, np.float32) if bias is None else bias.astype(np.float32) for n, bias in zip(widths, biases)]
        y = b.op("Add", y, b.const(np.concatenate(full), "bias"))
    return list(b.op("Split", y, b.ints(widths), outputs=len(widths), axis=-1))


def silu(b: GraphBuilder, x: str) -> str:
    """x * sigmoid(x)."""
    return b.op("Mul", x, b.op("Sigmoid", x))


def negative_rates(a_log: np.ndarray) -> np.ndarray:
    """-exp(A_log) in float32, computed in float64: a state space's decay rates (A)."""
    return -np.exp(a_log.astype(np.float64)).astype(np.float32)


def swiglu(b: GraphBuilder, x: str, gate: np.ndarray | None, up: np.ndarray, down: np.ndarray,
           tag: str = "mlp") -> str:
    """down(silu(gate(x)) * up(x)), or without a gate down(relu(up(x))²) (Nemotron-H's squared ReLU),
    weights stored as the builder says (named `{tag}_gate_up.*` and `{tag}_down.*`)."""
    if gate is None:
        with b.tagged(f"{tag}_gate_up"):
            r = b.op("Relu", linear(b, x, up))
        with b.tagged(f"{tag}_down"):
            return linear(b, b.op("Mul", r, r), down)
    with b.tagged(f"{tag}_gate_up"):
        gated, upped = linears(b, x, [gate, up], [None, None])
    with b.tagged(f"{tag}_down"):
        return linear(b, b.op("Mul", silu(b, gated), upped), down)


def rotary(b: GraphBuilder, x: str, cos: str, sin: str, head_dim: int, rot_dim: int) -> str:
    """RoPE on x [..., head_dim] over its first rot_dim dims (transformers' rotate_half), cos and
    sin broadcasting against x:

        x_rot, x_pass = x[..., :rot], x[..., rot:]
        x1, x2 = halves of x_rot
        out = concat(x_rot * cos + concat(-x2, x1) * sin, x_pass)

    concat(-x2, x1) is one MatMul with a signed permutation (each output is one input times +-1 plus
    exact zeros, so the same numbers) where Split, Neg and Concat were three nodes: onnxruntime
    spends 7-10 us on every node however small, which is most of a small model's layer.
    """
    x_rot, x_pass = x, None
    if rot_dim < head_dim:
        x_rot, x_pass = b.op("Split", x, b.ints([rot_dim, head_dim - rot_dim]), outputs=2, axis=-1)
    rotated = b.op("MatMul", x_rot, b.const(rotate_half_matrix(rot_dim), "rotate_half"))
    out = b.op("Add", b.op("Mul", x_rot, cos), b.op("Mul", rotated, sin))
    return out if x_pass is None else b.op("Concat", out, x_pass, axis=-1)


def rotate_half_matrix(rot_dim: int) -> np.ndarray:
    """R [rot, rot] with x @ R = concat(-x2, x1) for the halves x1, x2 of x."""
    half = rot_dim // 2
    r = np.zeros((rot_dim, rot_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def l2_normalize(b: GraphBuilder, x: str, eps: float = 1e-6) -> str:
    """x / sqrt(sum(x^2) + eps) over the last axis (transformers' and FLA's l2norm)."""
    total = b.op("ReduceSum", b.op("Mul", x, x), b.ints([-1]), keepdims=1)
    return b.op("Mul", x, b.op("Reciprocal", b.op("Sqrt", b.op("Add", total, b.scalar(eps, "eps")))))
