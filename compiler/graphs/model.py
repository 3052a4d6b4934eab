"""The graphs outside the layers: one routed expert, the embedding, the final norm and LM head."""

from __future__ import annotations

import numpy as np
import onnx

from fate.artifacts.layout import GraphIO as IO

from ..families.base import ArchConfig
from ..onnx_builder import FLOAT, INT64, GraphBuilder, WeightFormat
from ..quantize import QuantizedWeight, matmul_nbits, quantize_rows_int8
from .blocks import Weight, linear, norm, silu
from .routing import NextRouter, predict_next


def expert_graph(gate: Weight | None, up: Weight, down: Weight, accuracy_level: int = 0,
                 biases: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 cfg: ArchConfig | None = None) -> onnx.ModelProto:
    """One routed expert, x [N, H] -> y [N, H] = down(act(gate(x), up(x))), with optional biases.

    act is SwiGLU, silu(g) * u, or for GPT-OSS (cfg.swiglu_limit set) the clamped form
    (clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(g, limit); without a gate
    (Nemotron-H) the squared ReLU, relu(u)².
    Each projection is float32 (MatMul), float16 (weights cast up once at session creation:
    onnxruntime folds the Cast) or a QuantizedWeight (MatMulNBits with constant weights)."""
    b = GraphBuilder("expert")
    hidden = up.k if isinstance(up, QuantizedWeight) else up.shape[1]
    x = b.input(IO.EXPERT_IN, FLOAT, ["N", hidden])

    def proj(inp: str, weight: Weight, bias: np.ndarray | None, role: str) -> str:
        if isinstance(weight, QuantizedWeight):
            y = matmul_nbits(b, inp, weight, accuracy_level, prefix=role)
        elif weight.dtype == np.float16:
            y = b.op("MatMul", inp, b.op("Cast", b.const(np.ascontiguousarray(weight.T), "weight"), to=FLOAT))
        else:
            y = linear(b, inp, weight)
        return y if bias is None else b.op("Add", y, b.const(bias.astype(np.float32), name=f"{role}.bias"))

    bg, bu, bd = biases if biases is not None else (None, None, None)
    u = proj(x, up, bu, "up")
    g = None if gate is None else proj(x, gate, bg, "gate")
    limit = cfg.swiglu_limit if cfg is not None else None
    if g is None:
        r = b.op("Relu", u)
        act = b.op("Mul", r, r)
    elif limit is None:
        act = b.op("Mul", silu(b, g), u)
    else:
        g = b.op("Min", g, b.scalar(limit, "limit"))
        u = b.op("Clip", u, b.scalar(-limit, "neg_limit"), b.scalar(limit, "limit"))
        glu = b.op("Mul", g, b.op("Sigmoid", b.op("Mul", g, b.scalar(cfg.swiglu_alpha, "alpha"))))
        act = b.op("Mul", b.op("Add", u, b.scalar(1.0, "one")), glu)
    y = proj(act, down, bd, "down")
    b.output(y, IO.EXPERT_OUT, FLOAT, ["N", hidden])
    return b.model()


def embed_graph(embed: np.ndarray, multiplier: float = 1.0, quantized: bool = False,
                first: tuple[ArchConfig, NextRouter] | None = None) -> onnx.ModelProto:
    """Token ids -> hidden [1, S, H]. With `first` (the model's config and layer 0's router, where layer 0
    is an MoE layer), also layer 0's predicted router scores from the token's embedding alone, as a layer
    graph predicts the next layer's (routing.predict_next): reads of layer 0's experts can then begin
    before its attention runs (Manifest.embed_predicts_next)."""
    b = GraphBuilder("embed")
    ids = b.input(IO.INPUT_IDS, INT64, ["S"])
    if quantized:  # a row is gathered, then scaled: INT8 per row, a quarter of the float32 table
        codes, scales = quantize_rows_int8(embed)
        h = b.op("Mul", b.op("Cast", b.op("Gather", b.const(codes, "embed_codes"), ids, axis=0), to=FLOAT),
                 b.op("Gather", b.const(scales, "embed_scales"), ids, axis=0))
    else:
        h = b.op("Gather", b.const(embed.astype(np.float32), "embed_tokens"), ids, axis=0)
    if multiplier != 1.0:
        h = b.op("Mul", h, b.scalar(multiplier, "embedding_multiplier"))
    b.output(b.op("Unsqueeze", h, b.ints([0])), IO.HIDDEN, FLOAT, [1, "S", embed.shape[1]])
    if first is not None:
        predict_next(b, *first, h, h)
    return b.model()


def head_graph(cfg: ArchConfig, final_norm: np.ndarray, final_norm_bias: np.ndarray | None, lm_head: np.ndarray,
               lm_head_bias: np.ndarray | None, weights: WeightFormat = WeightFormat()) -> onnx.ModelProto:
    b = GraphBuilder("head", weights)
    h = b.input(IO.HIDDEN, FLOAT, [1, "S", lm_head.shape[1]])
    with b.tagged("final_norm"):
        normed = norm(b, h, final_norm, final_norm_bias, cfg.norms.eps, cfg.norms.kind)
    with b.tagged("lm_head"):
        logits = linear(b, normed, lm_head, lm_head_bias)
    logits_scaling = cfg.logits_scaling
    if logits_scaling != 1.0:
        logits = b.op("Div", logits, b.scalar(logits_scaling, "logits_scaling"))
    b.output(logits, IO.LOGITS, FLOAT, [1, "S", lm_head.shape[0]])
    return b.model()
