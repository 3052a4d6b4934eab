"""The ONNX graphs of an artifact, built from one layer's weights at a time.

Input and output names are the contract in `fate.artifacts.layout.GraphIO`. All activations are
float32; dense weights are stored float32; routed experts at the requested precision.
Numeric conventions follow transformers' Llama-style modules (RMSNorm in float32, RoPE with
rotate_half over the first rotary dims, softmax router scores in float32).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from fate.artifacts import DecodeStep, HeadStep, ModelError
from fate.artifacts.layout import GraphIO as IO
from fate.artifacts.native_contract import QK_NORMS
from fate.artifacts.precisions import QUANTIZED_BITS
from fate.artifacts.slots import STEP_INITIALIZERS, expected_head_tensors, expected_step_tensors, views_of

from .families.base import ArchConfig, Role
from .onnx_builder import FLOAT, INT32, INT64, MS_DOMAIN, GraphBuilder, WeightFormat
from .quantize import DEFAULT_BLOCK_SIZE, QuantizedWeight, matmul_nbits, quantize, quantize_rows_int8

W = dict[Role, np.ndarray]
Weight = np.ndarray | QuantizedWeight


# ----------------------------------------------------------------------------- building blocks


def rms_norm(b: GraphBuilder, x: str, weight: np.ndarray, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis. Written as Pow, ReduceMean, Add,
    Sqrt, Div, Mul: the pattern onnxruntime fuses into one SimplifiedLayerNormalization kernel
    (seven ops per norm per step otherwise)."""
    mean_sq = b.op("ReduceMean", b.op("Pow", x, b.scalar(2.0, "two")), axes=[-1], keepdims=1)
    normed = b.op("Div", x, b.op("Sqrt", b.op("Add", mean_sq, b.scalar(eps, "eps"))))
    return b.op("Mul", normed, b.const(weight.astype(np.float32), "norm_weight"))


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


def swiglu(b: GraphBuilder, x: str, gate: np.ndarray, up: np.ndarray, down: np.ndarray, tag: str = "mlp") -> str:
    """down(silu(gate(x)) * up(x)), weights stored as the builder says (named `{tag}_gate_up.*` and
    `{tag}_down.*`)."""
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


@dataclass(frozen=True)
class PositionInputs:
    """An attention layer graph's position inputs (the manifest's LayerSpec.positions): per_token,
    cos and sin [S, rot] of the step's tokens; tables, cos and sin [T, rot / 2] of every position up
    to the step's last, with seqlens_k [1] (T - 1) and total_sequence_length [] (T), which
    GroupQueryAttention rotates q and k with itself. attn_bias [S, T] either way."""

    kind: str
    cos: str
    sin: str
    bias: str
    seqlens: str | None = None
    total: str | None = None


def position_inputs(b: GraphBuilder, cfg: ArchConfig, tables: bool) -> PositionInputs:
    rot = 2 * len(cfg.rope_inv_freq)
    bias = b.input(IO.ATTN_BIAS, FLOAT, ["S", "T"])
    if not tables:
        return PositionInputs("per_token", b.input(IO.COS, FLOAT, ["S", rot]), b.input(IO.SIN, FLOAT, ["S", rot]), bias)
    return PositionInputs("tables", b.input(IO.COS_CACHE, FLOAT, ["T", rot // 2]),
                          b.input(IO.SIN_CACHE, FLOAT, ["T", rot // 2]), bias,
                          b.input(IO.SEQLENS, INT32, [1]), b.input(IO.TOTAL_LENGTH, INT32, []))


def fused_attention_refusal(cfg: ArchConfig, w: W) -> str | None:
    """Why onnxruntime's GroupQueryAttention cannot compute a layer's attention exactly, or None where
    it can. Its CPU kernel checks these only when it runs (onnxruntime 1.22-1.32: "head_size must be a
    multiple of 8", "num_heads must be a multiple of kv_num_heads"), so they are checked here, when the
    graph is built, and a layer that fails one takes the explicit form, which computes the same."""
    if Role.SINKS in w:
        return "attention sinks"
    if cfg.head_dim % 8:
        return f"head size {cfg.head_dim} is not a multiple of 8"
    if cfg.num_heads % cfg.num_kv_heads:
        return f"{cfg.num_heads} heads are not a multiple of {cfg.num_kv_heads} key-value heads"
    return None


def takes_position_tables(cfg: ArchConfig, w: W) -> bool:
    """Whether a layer's attention can rotate q and k inside GroupQueryAttention: RoPE right before
    the fused kernel (not after a q/k norm, no sinks, no latent attention), in sizes the kernel takes
    (onnxruntime: rotary dims a multiple of 16 within a head that is a multiple of 16). Fewer nodes:
    tiny-moe's layer attention 24-29 -> 15-18 us a decode step, qwen shapes 127-146 -> 76-90 us."""
    rot, d = 2 * len(cfg.rope_inv_freq), cfg.head_dim
    if cfg.latent_attention or cfg.qk_norm_after_rope or fused_attention_refusal(cfg, w) is not None:
        return False
    if rot == 0 or rot % 16 or d % 16 or rot > d:
        return False
    return not cfg.rope_interleaved or rot == d


def attention(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, positions: PositionInputs,
              past_k: str, past_v: str) -> tuple[str, str, str]:
    """Grouped-query attention with a KV cache; returns (output [1,S,H], present_k, present_v).

    q, k, v [1,S,heads,D] (projection, the family's q/k norms and clamp, RoPE: inside the fused
    kernel with position tables), then
    scores = q @ k^T * scale + attn_bias [S,T] -> softmax -> @ v -> [1,S,H*D] -> o_proj,
    query head h reading KV head h // (H / KV) as transformers' repeat_kv. The core is
    onnxruntime's fused GroupQueryAttention where it computes exactly this (one kernel instead of
    some twenty nodes of transposes, concatenations and matmuls per layer; the caches keep their
    [1,KV,T,D] layout); what it cannot compute (fused_attention_refusal) takes the explicit form.
    """
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rot = 2 * len(cfg.rope_inv_freq)

    gated = Role.Q_GATE in w
    roles = [Role.Q, Role.K, Role.V] + ([Role.Q_GATE] if gated else [])
    biases = {Role.Q: Role.Q_BIAS, Role.K: Role.K_BIAS, Role.V: Role.V_BIAS}
    with b.tagged("qkv"):
        projected = linears(b, x, [w[r] for r in roles], [w.get(biases.get(r)) for r in roles])

    tables = positions.kind == "tables"

    def project(y: str, n_heads: int, norm_role: Role | None = None) -> str:
        """A projection -> [1, S, heads, d] (with position tables: [1, S, heads * d], as the fused
        kernel takes it), with the family's q/k norm (whole projection or per head) and clamp, in
        the order transformers applies them."""
        if norm_role is not None and cfg.qk_norm == "projection":
            with b.tagged("q_norm" if norm_role == Role.Q_NORM else "k_norm"):
                y = rms_norm(b, y, w[norm_role], cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            y = b.op("Clip", y, b.scalar(-cfg.clip_qkv, "clip_min"), b.scalar(cfg.clip_qkv, "clip_max"))
        per_head = norm_role is not None and cfg.qk_norm == "head" and not cfg.qk_norm_after_rope
        if tables and not per_head:
            return y
        y = b.op("Reshape", y, b.ints([1, -1, n_heads, d]))
        if per_head:
            with b.tagged("q_norm" if norm_role == Role.Q_NORM else "k_norm"):
                y = rms_norm(b, y, w[norm_role], cfg.rms_norm_eps)
        return b.op("Reshape", y, b.ints([1, -1, n_heads * d])) if tables else y

    if cfg.rope_interleaved and rot not in (0, d):
        raise ModelError("RoPE on adjacent pairs over part of each head is not supported")
    if tables:  # GroupQueryAttention rotates q and k itself
        q, k = project(projected[0], heads, Role.Q_NORM), project(projected[1], kv, Role.K_NORM)
    else:
        # cos, sin [S, rot] -> [S, 1, rot]: one row per position, the same for every head
        cos_s, sin_s = (b.op("Unsqueeze", t, b.ints([1])) for t in (positions.cos, positions.sin)) if rot \
            else (positions.cos, positions.sin)
        # adjacent pairs (ERNIE-4.5) leave q and k in another order than the two halves; both get the
        # same one, so their dot products (and the cached keys, used only in them) are unchanged
        rotate = (lambda t: rotary_interleaved(b, t, cos_s, sin_s, rot)) if cfg.rope_interleaved \
            else (lambda t: rotary(b, t, cos_s, sin_s, d, rot))
        if rot == 0:  # no positions in the attention at all (Granite-4.0-H): order comes from the other layers
            rotate = lambda t: t  # noqa: E731
        q = rotate(project(projected[0], heads, Role.Q_NORM))
        k = rotate(project(projected[1], kv, Role.K_NORM))
        if cfg.qk_norm_after_rope:  # HunYuan normalizes each head of the rotated q and k
            q, k = (rms_norm(b, t, w[role], cfg.rms_norm_eps) for t, role in ((q, Role.Q_NORM), (k, Role.K_NORM)))
    v = project(projected[2], kv)
    scale = d ** -0.5 if cfg.attention_scale is None else cfg.attention_scale
    core = attention_fused if fused_attention_refusal(cfg, w) is None else attention_explicit
    context, present_k, present_v = core(b, q, k, v, past_k, past_v, positions, cfg, scale, w.get(Role.SINKS))
    if gated:  # Qwen3-Next: each output channel gated by the query projection's second half
        context = b.op("Mul", context, b.op("Sigmoid", projected[3]))
    with b.tagged("o"):
        return linear(b, context, w[Role.O], w.get(Role.O_BIAS)), present_k, present_v


def attention_fused(b: GraphBuilder, q: str, k: str, v: str, past_k: str, past_v: str, positions: PositionInputs,
                    cfg: ArchConfig, scale: float, sinks: np.ndarray | None) -> tuple[str, str, str]:
    """onnxruntime's GroupQueryAttention with Fate's additive mask, which carries the causal and
    sliding-window limits. Per-token positions: q, k, v [1,S,heads,D], already rotated (its own RoPE
    is off), the lengths it asks for computed from the shapes (past P + new S). Position tables:
    q, k, v [1,S,heads*D], rotated inside with the tables, lengths as fed."""
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    mask = b.op("Unsqueeze", positions.bias, b.ints([0, 1]))  # [1, 1, S, T]
    if positions.kind == "tables":
        rotary = {"do_rotary": 1, "rotary_interleaved": int(cfg.rope_interleaved)} if cfg.rope_inv_freq else {}
        tables = (positions.cos, positions.sin) if rotary else ("", "")
        context, present_k, present_v = b.op(
            "GroupQueryAttention", q, k, v, past_k, past_v, positions.seqlens, positions.total, *tables, "", mask,
            outputs=3, domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv, scale=float(scale), **rotary)
        return context, present_k, present_v
    flat = [b.op("Reshape", t, b.ints([1, -1, n * d])) for t, n in ((q, heads), (k, kv), (v, kv))]
    total = b.op("Cast", b.op("Add", b.op("Shape", past_k, start=2, end=3), b.op("Shape", q, start=1, end=2)),
                 to=onnx.TensorProto.INT32)  # [T]
    seqlens = b.op("Sub", total, b.const(np.ones(1, np.int32), "one"))  # [batch]: last key index
    total = b.op("Reshape", total, b.ints([]))  # a scalar
    context, present_k, present_v = b.op(
        "GroupQueryAttention", *flat, past_k, past_v, seqlens, total, "", "", "", mask, outputs=3,
        domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv, scale=float(scale))
    return context, present_k, present_v


def attention_explicit(b: GraphBuilder, q: str, k: str, v: str, past_k: str, past_v: str, positions: PositionInputs,
                       cfg: ArchConfig, scale: float, sinks: np.ndarray | None) -> tuple[str, str, str]:
    """The same attention in plain ONNX nodes, for what the fused kernel cannot do (fused_attention_refusal):
    q [1,S,H,D] -> [1,KV,G,S,D] against the caches [1,KV,T,D]."""
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = positions.bias
    q, k, v = (b.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))
    present_k = b.op("Concat", past_k, k, axis=2)
    present_v = b.op("Concat", past_v, v, axis=2)
    q5 = b.op("Reshape", q, b.ints([1, kv, heads // kv, -1, d]))
    k5 = b.op("Unsqueeze", b.op("Transpose", present_k, perm=[0, 1, 3, 2]), b.ints([2]))
    v5 = b.op("Unsqueeze", present_v, b.ints([2]))
    scores = b.op("Add", b.op("Mul", b.op("MatMul", q5, k5), b.scalar(scale, "scale")), bias)
    probs = b.op("Softmax", scores, axis=-1) if sinks is None else softmax_with_sinks(b, scores, sinks, kv)
    context = b.op("MatMul", probs, v5)
    context = b.op("Reshape", context, b.ints([1, heads, -1, d]))
    context = b.op("Reshape", b.op("Transpose", context, perm=[0, 2, 1, 3]), b.ints([1, -1, heads * d]))
    return context, present_k, present_v


def causal_conv(b: GraphBuilder, past: str, x: str, kernel: np.ndarray, bias: np.ndarray | None) -> tuple[str, str]:
    """A depthwise causal convolution over the sequence of x [1, S, C] with kernel [C, L], the
    past's last L - 1 inputs [1, L - 1, C] before it; returns (conv [1, S, C], present [1, L - 1, C]).

        window = concat(past, x);  conv_t = sum_j kernel[:, j] * window[t + j] (+ bias)
    Slices with negative ends keep the sequence length dynamic."""
    width = kernel.shape[1]
    window = b.op("Concat", past, x, axis=1)
    end = np.iinfo(np.int64).max
    conv = None
    for j in range(width):
        tap = b.op("Slice", window, b.ints([j]), b.ints([j - (width - 1) if j < width - 1 else end]), b.ints([1]))
        term = b.op("Mul", tap, b.const(np.ascontiguousarray(kernel[:, j], dtype=np.float32), "conv_tap"))
        conv = term if conv is None else b.op("Add", conv, term)
    if bias is not None:
        conv = b.op("Add", conv, b.const(bias.astype(np.float32), "conv_bias"))
    # the last L - 1 inputs (none when L = 1: a start past the end selects nothing)
    present = b.op("Slice", window, b.ints([-(width - 1) if width > 1 else end]), b.ints([end]), b.ints([1]))
    return conv, present


def short_conv(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, past: str) -> tuple[str, str]:
    """LFM2's gated short convolution; returns (output [1,S,H], present window [1, L-1, H]).

    B, C, u = split(in_proj(x));  out = out_proj(C * causal_conv(B * u))"""
    h = cfg.hidden_size
    gate_b, gate_c, u = b.op("Split", linear(b, x, w[Role.CONV_IN], w.get(Role.CONV_IN_BIAS)),
                             b.ints([h, h, h]), outputs=3, axis=-1)
    conv, present = causal_conv(b, past, b.op("Mul", gate_b, u), w[Role.CONV].reshape(h, cfg.conv_kernel),
                                w.get(Role.CONV_BIAS))
    return linear(b, b.op("Mul", gate_c, conv), w[Role.CONV_OUT], w.get(Role.CONV_OUT_BIAS)), present


def l2_normalize(b: GraphBuilder, x: str, eps: float = 1e-6) -> str:
    """x / sqrt(sum(x^2) + eps) over the last axis (transformers' and FLA's l2norm)."""
    total = b.op("ReduceSum", b.op("Mul", x, x), b.ints([-1]), keepdims=1)
    return b.op("Mul", x, b.op("Reciprocal", b.op("Sqrt", b.op("Add", total, b.scalar(eps, "eps")))))


def delta_rule_step(hv: int, dk: int, dv: int) -> onnx.GraphProto:
    """One token of the gated delta rule, the body of a Scan over the sequence:

        S     = S * decay                         S [Hv, Dk, Dv], decay = exp(g) [Hv]
        S     = S + k (beta (v - k^T S))^T        k [Hv, Dk], v [Hv, Dv], beta [Hv]
        o     = q^T S                             q [Hv, Dk] -> o [Hv, Dv]
    (transformers' torch_recurrent_gated_delta_rule, one step)."""
    b = GraphBuilder("delta_rule_step", prefix="step_")
    state = b.input("step_state", FLOAT, [hv, dk, dv])
    q, k = b.input("step_q", FLOAT, [hv, dk]), b.input("step_k", FLOAT, [hv, dk])
    v = b.input("step_v", FLOAT, [hv, dv])
    decay, beta = b.input("step_decay", FLOAT, [hv]), b.input("step_beta", FLOAT, [hv])
    state = b.op("Mul", state, b.op("Unsqueeze", decay, b.ints([1, 2])))
    row_k = b.op("Unsqueeze", k, b.ints([1]))  # [Hv, 1, Dk]
    remembered = b.op("MatMul", row_k, state)  # [Hv, 1, Dv]
    delta = b.op("Mul", b.op("Sub", b.op("Unsqueeze", v, b.ints([1])), remembered), b.op("Unsqueeze", beta, b.ints([1, 2])))
    state = b.op("Add", state, b.op("MatMul", b.op("Unsqueeze", k, b.ints([2])), delta))
    out = b.op("Reshape", b.op("MatMul", b.op("Unsqueeze", q, b.ints([1])), state), b.ints([hv, dv]))
    b.output(state, "step_state_out", FLOAT, [hv, dk, dv])
    b.output(out, "step_out", FLOAT, [hv, dv])
    return b.graph()


def gated_deltanet(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, past_conv: str,
                   past_state: str) -> tuple[str, str, str]:
    """Qwen3-Next's gated DeltaNet; returns (output [1,S,H], present conv window, present state).

    q|k|v = silu(causal_conv(x Wqkv));  q, k = l2norm per head (q also / sqrt(Dk)), each key head
    repeated for its group of value heads;  beta = sigmoid(x Wb);  g = -exp(A_log) softplus(x Wa + dt_bias)
    o = the delta rule over the sequence from the past state (a Scan: one step per token)
    out = out_proj(rmsnorm(o) * w * silu(x Wz)) per value head"""
    m = cfg.linear_attention
    hk, hv, dk, dv = m.num_key_heads, m.num_value_heads, m.key_head_dim, m.value_head_dim
    mixed, present_conv = causal_conv(b, past_conv, linear(b, x, w[Role.LINEAR_QKV]),
                                      w[Role.LINEAR_CONV].reshape(m.conv_dim, m.conv_kernel), None)
    mixed = silu(b, mixed)
    q, k, v = b.op("Split", b.op("Reshape", mixed, b.ints([-1, m.conv_dim])),
                   b.ints([m.key_dim, m.key_dim, m.value_dim]), outputs=3, axis=-1)

    def heads(t: str, scale: float | None) -> str:
        """[S, Hk * Dk] -> l2-normalized [S, Hv, Dk], each key head repeated for its value heads."""
        t = l2_normalize(b, b.op("Reshape", t, b.ints([-1, hk, 1, dk])))
        if scale is not None:
            t = b.op("Mul", t, b.scalar(scale, "query_scale"))
        t = b.op("Expand", t, b.ints([1, hk, hv // hk, dk]))
        return b.op("Reshape", t, b.ints([-1, hv, dk]))

    q, k = heads(q, dk ** -0.5), heads(k, None)
    v = b.op("Reshape", v, b.ints([-1, hv, dv]))
    rows = b.op("Reshape", x, b.ints([-1, cfg.hidden_size]))
    beta = b.op("Sigmoid", linear(b, rows, w[Role.LINEAR_B]))
    a = b.op("Add", linear(b, rows, w[Role.LINEAR_A]), b.const(w[Role.LINEAR_DT_BIAS].astype(np.float32), "dt_bias"))
    decay = b.op("Exp", b.op("Mul", b.op("Softplus", a), b.const(negative_rates(w[Role.LINEAR_A_LOG]), "a")))
    state = b.op("Reshape", past_state, b.ints([hv, dk, dv]))
    final, out = b.op("Scan", state, q, k, v, decay, beta, outputs=2, body=delta_rule_step(hv, dk, dv),
                      num_scan_inputs=5)
    present_state = b.op("Reshape", final, b.ints([1, hv, dk, dv]))
    normed = rms_norm(b, out, w[Role.LINEAR_NORM], cfg.rms_norm_eps)  # [S, Hv, Dv]
    z = b.op("Reshape", linear(b, rows, w[Role.LINEAR_Z]), b.ints([-1, hv, dv]))
    gated = b.op("Mul", normed, silu(b, z))
    gated = b.op("Reshape", gated, b.ints([1, -1, m.value_dim]))
    return linear(b, gated, w[Role.LINEAR_OUT]), present_conv, present_state


def ssm_step(heads: int, head_dim: int, state_size: int) -> onnx.GraphProto:
    """One token of Mamba2's selective state space, the body of a Scan over the sequence:

        S = S * decay + (dt x) B^T      S [Hn, Dh, N], decay = exp(dt A) [Hn], dt x [Hn, Dh], B [Hn, N]
        y = S C                         C [Hn, N] -> y [Hn, Dh]
    (transformers' mamba2_selective_state_update, without the D skip, added outside)."""
    b = GraphBuilder("ssm_step", prefix="step_")
    state = b.input("step_state", FLOAT, [heads, head_dim, state_size])
    xdt = b.input("step_xdt", FLOAT, [heads, head_dim])
    bb, cc = b.input("step_b", FLOAT, [heads, state_size]), b.input("step_c", FLOAT, [heads, state_size])
    decay = b.input("step_decay", FLOAT, [heads])
    state = b.op("Add", b.op("Mul", state, b.op("Unsqueeze", decay, b.ints([1, 2]))),
                 b.op("MatMul", b.op("Unsqueeze", xdt, b.ints([2])), b.op("Unsqueeze", bb, b.ints([1]))))
    out = b.op("Reshape", b.op("MatMul", state, b.op("Unsqueeze", cc, b.ints([2]))), b.ints([heads, head_dim]))
    b.output(state, "step_state_out", FLOAT, [heads, head_dim, state_size])
    b.output(out, "step_out", FLOAT, [heads, head_dim])
    return b.graph()


def mamba2(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, past_conv: str, past_state: str) -> tuple[str, str, str]:
    """A Mamba2 mixer (Bamba's, as Granite-4.0-H runs it); returns (output, present conv window,
    present SSM state).

    z | xBC | dt = in_proj(x);  x, B, C = silu(causal_conv(xBC)) (B and C per group of heads)
    dt = softplus(dt + dt_bias);  decay = exp(dt * -exp(A_log))
    y  = the selective scan from the past state (a Scan: one step per token) + D x
    out = out_proj(group_rmsnorm(y * silu(z)) * w)"""
    m = cfg.mamba
    n, hd, ds, g, inner = m.num_heads, m.head_dim, m.state_size, m.groups, m.intermediate
    proj = linear(b, x, w[Role.MAMBA_IN], w.get(Role.MAMBA_IN_BIAS))
    gate, xbc, dt = b.op("Split", proj, b.ints([inner, m.conv_dim, n]), outputs=3, axis=-1)
    conv, present_conv = causal_conv(b, past_conv, xbc, w[Role.MAMBA_CONV].reshape(m.conv_dim, m.conv_kernel),
                                     w.get(Role.MAMBA_CONV_BIAS))
    conv = silu(b, conv)
    xs, bb, cc = b.op("Split", b.op("Reshape", conv, b.ints([-1, m.conv_dim])), b.ints([inner, g * ds, g * ds]),
                      outputs=3, axis=-1)
    dt = b.op("Softplus", b.op("Add", b.op("Reshape", dt, b.ints([-1, n])),
                               b.const(w[Role.MAMBA_DT_BIAS].astype(np.float32), "dt_bias")))
    decay = b.op("Exp", b.op("Mul", dt, b.const(negative_rates(w[Role.MAMBA_A_LOG]), "a")))
    xh = b.op("Reshape", xs, b.ints([-1, n, hd]))
    xdt = b.op("Mul", xh, b.op("Unsqueeze", dt, b.ints([-1])))

    def per_head(t: str) -> str:  # [S, G * N] -> [S, Hn, N]: each group's B (or C) for its heads
        t = b.op("Expand", b.op("Reshape", t, b.ints([-1, g, 1, ds])), b.ints([1, g, n // g, ds]))
        return b.op("Reshape", t, b.ints([-1, n, ds]))

    state = b.op("Reshape", past_state, b.ints([n, hd, ds]))
    final, y = b.op("Scan", state, xdt, per_head(bb), per_head(cc), decay, outputs=2, body=ssm_step(n, hd, ds),
                    num_scan_inputs=4)
    present_state = b.op("Reshape", final, b.ints([1, n, hd, ds]))
    y = b.op("Add", y, b.op("Mul", xh, b.const(w[Role.MAMBA_D].astype(np.float32).reshape(n, 1), "d_skip")))
    z = b.op("Reshape", gate, b.ints([-1, n, hd]))
    gated = b.op("Reshape", b.op("Mul", y, silu(b, z)), b.ints([1, -1, g, inner // g]))
    normed = rms_norm(b, gated, w[Role.MAMBA_NORM].reshape(g, inner // g), cfg.rms_norm_eps)
    out = linear(b, b.op("Reshape", normed, b.ints([1, -1, inner])), w[Role.MAMBA_OUT], w.get(Role.MAMBA_OUT_BIAS))
    return out, present_conv, present_state


def selective_step(channels: int, state_size: int, neg_rate: np.ndarray) -> onnx.GraphProto:
    """One token of Mamba's selective scan, per channel, the body of a Scan over the sequence:

        S = S * exp(dt A) + (dt x) B^T      S [I, N], A = -exp(A_log) [I, N], dt and dt x [I], B [N]
        y = S C                             C [N] -> y [I]
    (transformers' Jamba mamba_selective_state_update, without the D skip and the gate)."""
    b = GraphBuilder("selective_step", prefix="step_")
    state = b.input("step_state", FLOAT, [channels, state_size])
    dt, xdt = b.input("step_dt", FLOAT, [channels]), b.input("step_xdt", FLOAT, [channels])
    bb, cc = b.input("step_b", FLOAT, [state_size]), b.input("step_c", FLOAT, [state_size])
    decay = b.op("Exp", b.op("Mul", b.op("Unsqueeze", dt, b.ints([1])), b.const(neg_rate, "a")))
    state = b.op("Add", b.op("Mul", state, decay),
                 b.op("MatMul", b.op("Unsqueeze", xdt, b.ints([1])), b.op("Unsqueeze", bb, b.ints([0]))))
    out = b.op("Reshape", b.op("MatMul", state, b.op("Unsqueeze", cc, b.ints([1]))), b.ints([channels]))
    b.output(state, "step_state_out", FLOAT, [channels, state_size])
    b.output(out, "step_out", FLOAT, [channels])
    return b.graph()


def mamba1(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, past_conv: str, past_state: str) -> tuple[str, str, str]:
    """A Mamba (1) mixer as Jamba runs it; returns (output, present conv window, present SSM state).

    u | z = in_proj(x);  u = silu(causal_conv(u));  dt_low | B | C = x_proj(u) (each RMS-normalized in Jamba)
    dt = softplus(dt_proj(dt_low) + bias);  y = the selective scan from the past state + D u
    out = out_proj(y * silu(z))"""
    m = cfg.mamba1
    i, n, r = m.intermediate, m.state_size, m.dt_rank
    u, gate = b.op("Split", linear(b, x, w[Role.MAMBA_IN], w.get(Role.MAMBA_IN_BIAS)), b.ints([i, i]), outputs=2,
                   axis=-1)
    conv, present_conv = causal_conv(b, past_conv, u, w[Role.MAMBA_CONV].reshape(i, m.conv_kernel),
                                     w.get(Role.MAMBA_CONV_BIAS))
    rows = b.op("Reshape", silu(b, conv), b.ints([-1, i]))
    dt_low, bb, cc = b.op("Split", linear(b, rows, w[Role.MAMBA_X]), b.ints([r, n, n]), outputs=3, axis=-1)

    def normed(t: str, role: Role) -> str:
        return rms_norm(b, t, w[role], cfg.rms_norm_eps) if role in w else t

    dt_low, bb, cc = normed(dt_low, Role.MAMBA_DT_NORM), normed(bb, Role.MAMBA_B_NORM), normed(cc, Role.MAMBA_C_NORM)
    dt = b.op("Softplus", linear(b, dt_low, w[Role.MAMBA_DT], w[Role.MAMBA_DT_BIAS]))
    state = b.op("Reshape", past_state, b.ints([i, n]))
    final, y = b.op("Scan", state, dt, b.op("Mul", rows, dt), bb, cc, outputs=2,
                    body=selective_step(i, n, negative_rates(w[Role.MAMBA_A_LOG])),
                    num_scan_inputs=4)
    present_state = b.op("Reshape", final, b.ints([1, i, n]))
    y = b.op("Add", y, b.op("Mul", rows, b.const(w[Role.MAMBA_D].astype(np.float32), "d_skip")))
    z = b.op("Reshape", gate, b.ints([-1, i]))
    y = b.op("Reshape", b.op("Mul", y, silu(b, z)), b.ints([1, -1, i]))
    return linear(b, y, w[Role.MAMBA_OUT], w.get(Role.MAMBA_OUT_BIAS)), present_conv, present_state


def sparsemixer_pick(b: GraphBuilder, scores: str, original: str, eps: float) -> tuple[str, str]:
    """One step of sparsemixer at inference (transformers' `sparsemixer`, eval branch):

        top   = argmax(scores);  m = max(scores)
        keep  = (m - original) / max(|original|, m) <= 2 * eps     (others masked to -inf)
        weight = softmax(scores where keep)[top]
    """
    top = b.op("ArgMax", scores, axis=-1, keepdims=1)
    peak = b.op("ReduceMax", scores, axes=[-1], keepdims=1)
    factor = b.op("Max", b.op("Abs", original), peak)
    drop = b.op("Greater", b.op("Div", b.op("Sub", peak, original), factor), b.scalar(2 * eps, "jitter"))
    masked = b.op("Where", drop, b.scalar(-np.inf, "neg_inf"), scores)
    weight = b.op("GatherElements", b.op("Softmax", masked, axis=-1), top, axis=-1)
    return top, weight


def route_sparsemixer(b: GraphBuilder, logits: str, num_experts: int, eps: float) -> tuple[str, str]:
    """Phi-3.5-MoE's top-2: the best expert, then the best of the rest, each weighted by a softmax
    over the experts within its relative threshold; the two weights are not renormalized."""
    first, w1 = sparsemixer_pick(b, logits, logits, eps)
    is_first = b.op("Equal", b.const(np.arange(num_experts, dtype=np.int64), "expert_index"), first)
    rest = b.op("Where", is_first, b.scalar(-np.inf, "neg_inf"), logits)
    second, w2 = sparsemixer_pick(b, rest, logits, eps)
    return b.op("Concat", first, second, axis=-1), b.op("Concat", w1, w2, axis=-1)


def rotary_interleaved(b: GraphBuilder, x: str, cos: str, sin: str, rot: int) -> str:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ... of x [..., rot], as DeepSeek's complex form:
    (x0 + i x1) * (cos + i sin). cos/sin come in with their halves duplicated; one half is used.

        pairs = reshape(x, [..., rot/2, 2]) -> a, b
        out   = reshape(concat(a cos - b sin, a sin + b cos), [..., rot])
    """
    half = b.ints([rot // 2])
    c = b.op("Unsqueeze", b.op("Slice", cos, b.ints([0]), half, b.ints([-1])), b.ints([-1]))
    s_ = b.op("Unsqueeze", b.op("Slice", sin, b.ints([0]), half, b.ints([-1])), b.ints([-1]))
    pairs = b.op("Reshape", x, b.ints([0, 0, 0, rot // 2, 2]))
    a, bb = b.op("Split", pairs, b.ints([1, 1]), outputs=2, axis=-1)
    real = b.op("Sub", b.op("Mul", a, c), b.op("Mul", bb, s_))
    imag = b.op("Add", b.op("Mul", a, s_), b.op("Mul", bb, c))
    return b.op("Reshape", b.op("Concat", real, imag, axis=-1), b.ints([0, 0, 0, rot]))


def latent_attention(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, positions: PositionInputs,
                     past_k: str, past_v: str) -> tuple[str, str, str]:
    """DeepSeek's multi-head latent attention, caching what transformers caches: the normalized
    latent c [1, 1, T, kv_lora] (as "key") and the shared rotary key [1, 1, T, rope] (as "value").

    q = q_proj(x) or q_b(norm(q_a(x)))  -> [1,H,S,nope+rope] -> q_nope | rope(q_pe)
    c, k_pe = split(kv_a(x));  c = norm(c);  k_pe = rope(k_pe)          (appended to the cache)
    k_nope | v = split(kv_b(c over all T)) per head;  k = k_nope | k_pe broadcast to every head
    softmax(q k^T * scale + mask) v -> o_proj
    """
    m = cfg.latent_attention
    heads, nope, rope, vd = cfg.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    if m.q_lora_rank:
        q = linear(b, rms_norm(b, linear(b, x, w[Role.Q_A]), w[Role.Q_A_NORM], cfg.rms_norm_eps), w[Role.Q_B])
    else:
        q = linear(b, x, w[Role.Q])
    q = b.op("Transpose", b.op("Reshape", q, b.ints([1, -1, heads, nope + rope])), perm=[0, 2, 1, 3])
    q_nope, q_pe = b.op("Split", q, b.ints([nope, rope]), outputs=2, axis=-1)
    cos, sin, bias = positions.cos, positions.sin, positions.bias
    rotate = (lambda t: rotary_interleaved(b, t, cos, sin, rope)) if cfg.rope_interleaved \
        else (lambda t: rotary(b, t, cos, sin, rope, rope))
    q = b.op("Concat", q_nope, rotate(q_pe), axis=-1)

    latent, k_pe = b.op("Split", linear(b, x, w[Role.KV_A]), b.ints([m.kv_lora_rank, rope]), outputs=2, axis=-1)
    latent = b.op("Unsqueeze", rms_norm(b, latent, w[Role.KV_A_NORM], cfg.rms_norm_eps), b.ints([1]))
    k_pe = rotate(b.op("Unsqueeze", k_pe, b.ints([1])))
    present_k = b.op("Concat", past_k, latent, axis=2)
    present_v = b.op("Concat", past_v, k_pe, axis=2)

    kv = b.op("Reshape", linear(b, present_k, w[Role.KV_B]), b.ints([1, -1, heads, nope + vd]))
    k_nope, v = b.op("Split", b.op("Transpose", kv, perm=[0, 2, 1, 3]), b.ints([nope, vd]), outputs=2, axis=-1)
    k = b.op("Concat", k_nope, b.op("Tile", present_v, b.ints([1, heads, 1, 1])), axis=-1)
    scale = cfg.attention_scale if cfg.attention_scale is not None else (nope + rope) ** -0.5
    scores = b.op("Add", b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])),
                              b.scalar(scale, "scale")), bias)
    context = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    context = b.op("Reshape", b.op("Transpose", context, perm=[0, 2, 1, 3]), b.ints([1, -1, heads * vd]))
    with b.tagged("o"):
        return linear(b, context, w[Role.O], w.get(Role.O_BIAS)), present_k, present_v


def choice_scores(b: GraphBuilder, logits: str, cfg: ArchConfig, score_bias: np.ndarray | None) -> str:
    """The scores a router ranks experts by: its logits (softmax keeps their order), or with a
    correction bias the probabilities (sigmoid, or softmax: ERNIE-4.5) plus the bias. Predictions
    are ranked the same way."""
    if cfg.scoring == "sigmoid":
        scores = b.op("Sigmoid", logits)
    elif score_bias is not None and cfg.scoring == "softmax":
        scores = b.op("Softmax", logits, axis=-1)
    else:
        return logits
    return scores if score_bias is None else b.op("Add", scores, b.const(score_bias.astype(np.float32), "score_bias"))


def route_sigmoid(b: GraphBuilder, logits: str, cfg: ArchConfig, score_bias: np.ndarray | None) -> tuple[str, str]:
    """DeepSeek-V3: experts chosen by sigmoid score + bias within the best groups (a group's
    score is the sum of its two best), weighted by the plain sigmoid score, optionally
    renormalized, times the routed scaling factor."""
    scores = b.op("Sigmoid", logits)
    choice = choice_scores(b, logits, cfg, score_bias)
    if cfg.group_topk is not None:
        groups, kept = cfg.group_topk
        grouped = b.op("Reshape", choice, b.ints([0, groups, -1]))
        per_group = b.op("ReduceSum", b.op("TopK", grouped, b.ints([2]), outputs=2, axis=-1)[0], b.ints([-1]),
                         keepdims=0)
        threshold = b.op("ReduceMin", b.op("TopK", per_group, b.ints([kept]), outputs=2, axis=-1)[0],
                         axes=[-1], keepdims=1)
        keep_group = b.op("Unsqueeze", b.op("GreaterOrEqual", per_group, threshold), b.ints([-1]))
        keep = b.op("Reshape", b.op("Expand", keep_group, b.ints([1, groups, cfg.num_experts // groups])),
                    b.ints([0, cfg.num_experts]))
        choice = b.op("Where", keep, choice, b.scalar(-np.inf, "neg_inf"))
    ids = b.op("TopK", choice, b.ints([cfg.top_k]), outputs=2, axis=-1, largest=1, sorted=1)[1]
    weights = b.op("GatherElements", scores, ids, axis=-1)
    if cfg.normalize_top_k:
        total = b.op("Add", b.op("ReduceSum", weights, b.ints([-1]), keepdims=1), b.scalar(cfg.topk_norm_eps, "tiny"))
        weights = b.op("Div", weights, total)
    if cfg.routed_scaling != 1.0:
        weights = b.op("Mul", weights, b.scalar(cfg.routed_scaling, "routed_scaling"))
    return ids, weights


def softmax_with_sinks(b: GraphBuilder, scores: str, sinks: np.ndarray, kv: int) -> str:
    """Softmax over keys plus one learned "sink" logit per head whose probability is dropped
    (GPT-OSS): exp(s - m) / (sum exp(s - m) + exp(sink - m)), m the max of both.
    scores [1, KV, G, S, T]; sinks [heads] reshaped to [1, KV, G, 1, 1] (head h = kv * G + g)."""
    sink = b.const(sinks.astype(np.float32).reshape(1, kv, -1, 1, 1), "sinks")
    peak = b.op("Max", b.op("ReduceMax", scores, axes=[-1], keepdims=1), sink)
    e = b.op("Exp", b.op("Sub", scores, peak))
    total = b.op("Add", b.op("ReduceSum", e, b.ints([-1]), keepdims=1), b.op("Exp", b.op("Sub", sink, peak)))
    return b.op("Div", e, total)


def route(b: GraphBuilder, logits: str, cfg: ArchConfig, score_bias: np.ndarray | None = None) -> tuple[str, str]:
    """Softmax over experts, (group-limited) top-k, optional renormalization, routed scaling.

    group-limited (DeepSeek-V2): each group's best score ranks the groups; experts outside the
    best `kept` groups are zeroed before the top-k. With a correction bias (ERNIE-4.5) the experts
    are chosen by probability + bias and weighed by the probability alone."""
    probs = b.op("Softmax", logits, axis=-1)
    if score_bias is not None:
        if cfg.group_topk is not None:
            raise ModelError("a router with a score correction bias and expert groups under softmax is not supported")
        ids = b.op("TopK", choice_scores(b, logits, cfg, score_bias), b.ints([cfg.top_k]), outputs=2, axis=-1,
                   largest=1, sorted=1)[1]
        weights = b.op("GatherElements", probs, ids, axis=-1)
        if cfg.normalize_top_k:
            weights = b.op("Div", weights, b.op("ReduceSum", weights, b.ints([-1]), keepdims=1))
        if cfg.routed_scaling != 1.0:
            weights = b.op("Mul", weights, b.scalar(cfg.routed_scaling, "routed_scaling"))
        return ids, weights
    if cfg.group_topk is not None:
        groups, kept = cfg.group_topk
        per_group = b.op("ReduceMax", b.op("Reshape", probs, b.ints([0, groups, -1])), axes=[-1], keepdims=0)
        threshold = b.op("ReduceMin", b.op("TopK", per_group, b.ints([kept]), outputs=2, axis=-1)[0],
                         axes=[-1], keepdims=1)
        keep_group = b.op("Unsqueeze", b.op("GreaterOrEqual", per_group, threshold), b.ints([-1]))
        keep = b.op("Reshape", b.op("Expand", keep_group, b.ints([1, groups, cfg.num_experts // groups])),
                    b.ints([0, cfg.num_experts]))
        probs = b.op("Where", keep, probs, b.scalar(0.0, "zero"))
    weights, ids = b.op("TopK", probs, b.ints([cfg.top_k]), outputs=2, axis=-1, largest=1, sorted=1)
    if cfg.normalize_top_k:
        weights = b.op("Div", weights, b.op("ReduceSum", weights, b.ints([-1]), keepdims=1))
    if cfg.routed_scaling != 1.0:
        weights = b.op("Mul", weights, b.scalar(cfg.routed_scaling, "routed_scaling"))
    return ids, weights


# ----------------------------------------------------------------------------- whole graphs


def state_shapes(cfg: ArchConfig, layer: int) -> dict[str, list[int]]:
    """The fixed-size state a layer's mixer carries between steps (none for attention, whose keys
    and values the model's numbers size)."""
    if cfg.mixer(layer) == "short_conv":
        return {"conv": [1, cfg.conv_kernel - 1, cfg.hidden_size]}
    if cfg.mixer(layer) == "gated_deltanet":
        m = cfg.linear_attention
        return {"conv": [1, m.conv_kernel - 1, m.conv_dim],
                "recurrent": [1, m.num_value_heads, m.key_head_dim, m.value_head_dim]}
    if cfg.mixer(layer) == "mamba2":
        m = cfg.mamba
        return {"conv": [1, m.conv_kernel - 1, m.conv_dim], "ssm": [1, m.num_heads, m.head_dim, m.state_size]}
    if cfg.mixer(layer) == "mamba":
        m = cfg.mamba1
        return {"conv": [1, m.conv_kernel - 1, m.intermediate], "ssm": [1, m.intermediate, m.state_size]}
    return {}


@dataclass(frozen=True)
class LayerGraphInfo:
    model: onnx.ModelProto
    predicts_next: bool
    positions: str = "per_token"  # an attention layer's position inputs (PositionInputs.kind)
    decode_step: DecodeStep | None = None  # its tensors placed once the graph is serialized (decode_step_views)
    graph_only: str | None = None  # why it has no decode step (step_refusal)


@dataclass(frozen=True)
class NextRouter:
    """What layer l needs of layer l+1 to predict its experts: its router and MLP-norm weights."""

    router: np.ndarray
    norm: np.ndarray | None  # None: the next layer's router reads the stream without a norm
    norm_bias: np.ndarray | None = None
    score_bias: np.ndarray | None = None
    router_bias: np.ndarray | None = None


def layer_graph(layer: int, cfg: ArchConfig, w: W, next_layer: NextRouter | None,
                weights: WeightFormat = WeightFormat()) -> LayerGraphInfo:
    """One decoder layer: its token mixer (attention, or a short convolution with its state), then
    either the dense MLP or the MoE front half (router, top-k, shared expert) with the routed
    experts left to the runtime.

    With `next_layer`, two cross-layer predictions of layer l+1's router logits:
      next_router_logits      = router_{l+1}(router input of l)           (the paper's predictor)
      next_router_logits_norm = router_{l+1}(rmsnorm(h_l) * norm_{l+1})   (l+1's own norm weights)
    The profile measures both; the policy picks one per layer."""
    b = GraphBuilder(f"layer_{layer}", weights)
    cfg = cfg.at_layer(layer)
    position_kind = "per_token"
    hidden = b.input(IO.HIDDEN, FLOAT, [1, "S", cfg.hidden_size])
    with b.tagged("attn_norm"):
        x = norm(b, hidden, w[Role.ATTN_NORM], w.get(Role.ATTN_NORM_BIAS), cfg.rms_norm_eps, cfg.norm) \
            if Role.ATTN_NORM in w else hidden
    if cfg.mixer(layer) != "attention":
        shapes = state_shapes(cfg, layer)
        past = [b.input(IO.past(name), FLOAT, shape) for name, shape in shapes.items()]
        mixer = {"short_conv": short_conv, "gated_deltanet": gated_deltanet, "mamba": mamba1,
                 "mamba2": mamba2}[cfg.mixer(layer)]
        mixed, *present = mixer(b, x, w, cfg, *past)
        for value, (name, shape) in zip(present, shapes.items()):
            b.output(value, IO.present(name), FLOAT, shape)
    else:
        positions = position_inputs(b, cfg, takes_position_tables(cfg, w))
        position_kind = positions.kind
        m = cfg.latent_attention
        key_dim, value_dim = (m.kv_lora_rank, m.qk_rope_head_dim) if m else (cfg.head_dim, cfg.head_dim)
        past_k = b.input(IO.PAST_KEY, FLOAT, [1, cfg.num_kv_heads, "P", key_dim])
        past_v = b.input(IO.PAST_VALUE, FLOAT, [1, cfg.num_kv_heads, "P", value_dim])
        attend = latent_attention if cfg.latent_attention else attention
        # a layer without positions still takes them (every attention layer is fed alike)
        rotated = replace(cfg, rope_inv_freq=[]) if layer in cfg.nope_layers else cfg
        mixed, present_k, present_v = attend(b, x, w, rotated, positions, past_k, past_v)
        b.output(present_k, IO.PRESENT_KEY, FLOAT, [1, cfg.num_kv_heads, "T", key_dim])
        b.output(present_v, IO.PRESENT_VALUE, FLOAT, [1, cfg.num_kv_heads, "T", value_dim])
    if Role.POST_ATTN_NORM in w:
        mixed = norm(b, mixed, w[Role.POST_ATTN_NORM], None, cfg.rms_norm_eps, cfg.norm)
    h = h_attn = b.op("Add", hidden, mixed)

    if cfg.parallel_block:
        normed = x
    elif Role.MLP_NORM in w:
        with b.tagged("mlp_norm"):
            normed = norm(b, h, w[Role.MLP_NORM], w.get(Role.MLP_NORM_BIAS), cfg.rms_norm_eps, cfg.norm)
    else:  # post-norm families: the MLP reads the residual stream itself
        normed = h
    router_input = b.op("Reshape", normed, b.ints([-1, cfg.hidden_size]))
    b.output(router_input, IO.ROUTER_INPUT, FLOAT, ["S", cfg.hidden_size])
    if layer not in cfg.moe_layers:
        mlp = swiglu(b, normed, w[Role.DENSE_GATE], w[Role.DENSE_UP], w[Role.DENSE_DOWN])
        if Role.POST_MLP_NORM in w:
            mlp = norm(b, mlp, w[Role.POST_MLP_NORM], None, cfg.rms_norm_eps, cfg.norm)
        out = b.op("Add", h, mlp)
        b.output(out, IO.RESIDUAL, FLOAT, [1, "S", cfg.hidden_size])
    else:
        with b.tagged("router"):
            logits = linear(b, router_input, w[Role.ROUTER], w.get(Role.ROUTER_BIAS), exact=True)
        b.output(choice_scores(b, logits, cfg, w.get(Role.ROUTER_SCORE_BIAS)), IO.ROUTER_LOGITS, FLOAT,
                 ["S", cfg.num_experts])
        if cfg.scoring == "sigmoid":
            with b.tagged("routing"):
                ids, weights = route_sigmoid(b, logits, cfg, w.get(Role.ROUTER_SCORE_BIAS))
        elif cfg.scoring == "sparsemixer":
            ids, weights = route_sparsemixer(b, logits, cfg.num_experts, cfg.router_jitter_eps)
        else:
            ids, weights = route(b, logits, cfg, w.get(Role.ROUTER_SCORE_BIAS))
        b.output(ids, IO.EXPERT_IDS, INT64, ["S", cfg.top_k])
        b.output(weights, IO.EXPERT_WEIGHTS, FLOAT, ["S", cfg.top_k])
        if Role.SHARED_GATE in w:
            shared = swiglu(b, normed, w[Role.SHARED_GATE], w[Role.SHARED_UP], w[Role.SHARED_DOWN], tag="shared")
            if Role.SHARED_EXPERT_GATE in w:
                with b.tagged("shared_expert_gate"):
                    gate = linear(b, normed, w[Role.SHARED_EXPERT_GATE], exact=True)
                shared = b.op("Mul", shared, b.op("Sigmoid", gate))
            if cfg.shared_scale != 1.0:
                shared = b.op("Mul", shared, b.scalar(cfg.shared_scale, "shared_scale"))
            if Role.POST_MLP_NORM in w:  # normalized with the routed experts, by the combine graph
                b.output(b.op("Reshape", shared, b.ints([-1, cfg.hidden_size])), IO.MOE_PARTIAL, FLOAT,
                         ["S", cfg.hidden_size])
            else:
                h = b.op("Add", h, shared)
        b.output(h, IO.RESIDUAL, FLOAT, [1, "S", cfg.hidden_size])
    if next_layer is not None:
        experts = next_layer.router.shape[0]
        with b.tagged("next_router"):
            next_logits = linear(b, router_input, next_layer.router, next_layer.router_bias, exact=True)
        with b.tagged("next_scores"):
            predicted = choice_scores(b, next_logits, cfg, next_layer.score_bias)
        b.output(predicted, IO.NEXT_ROUTER_LOGITS, FLOAT, ["S", experts])
        # the next router's input norm applied to this layer's stream (none in post-norm families)
        with b.tagged("next_norm"):
            renormed = h_attn if next_layer.norm is None else norm(b, h_attn, next_layer.norm, next_layer.norm_bias,
                                                                    cfg.rms_norm_eps, cfg.norm)
        renormed = b.op("Reshape", renormed, b.ints([-1, cfg.hidden_size]))
        b.output(choice_scores(b, linear(b, renormed, next_layer.router, next_layer.router_bias, exact=True), cfg,
                               next_layer.score_bias),
                 IO.NEXT_ROUTER_LOGITS_NORM, FLOAT, ["S", experts])
    model = b.model()
    if layer in cfg.moe_layers and cfg.post_norms:  # the routed sum goes through the combine graph
        onnx.helper.set_model_props(model, {IO.ROUTED_SUM_META: "combine_graph"})
    refusal = step_refusal(layer, cfg, w, next_layer, b.weights, position_kind)
    return LayerGraphInfo(model, next_layer is not None, position_kind,
                          decode_step(layer, cfg, w, next_layer, b.weights) if refusal is None else None, refusal)


def expert_graph(gate: Weight, up: Weight, down: Weight, accuracy_level: int = 0,
                 biases: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                 cfg: ArchConfig | None = None) -> onnx.ModelProto:
    """One routed expert, x [N, H] -> y [N, H] = down(act(gate(x), up(x))), with optional biases.

    act is SwiGLU, silu(g) * u, or for GPT-OSS (cfg.swiglu_limit set) the clamped form
    (clamp(u, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(g, limit).
    Each projection is float32 (MatMul), float16 (weights cast up once at session creation:
    onnxruntime folds the Cast) or a QuantizedWeight (MatMulNBits with constant weights)."""
    b = GraphBuilder("expert")
    hidden = gate.k if isinstance(gate, QuantizedWeight) else gate.shape[1]
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
    g, u = proj(x, gate, bg, "gate"), proj(x, up, bu, "up")
    limit = cfg.swiglu_limit if cfg is not None else None
    if limit is None:
        act = b.op("Mul", silu(b, g), u)
    else:
        g = b.op("Min", g, b.scalar(limit, "limit"))
        u = b.op("Clip", u, b.scalar(-limit, "neg_limit"), b.scalar(limit, "limit"))
        glu = b.op("Mul", g, b.op("Sigmoid", b.op("Mul", g, b.scalar(cfg.swiglu_alpha, "alpha"))))
        act = b.op("Mul", b.op("Add", u, b.scalar(1.0, "one")), glu)
    y = proj(act, down, bd, "down")
    b.output(y, IO.EXPERT_OUT, FLOAT, ["N", hidden])
    return b.model()


def combine_graph(cfg: ArchConfig, post_norm: np.ndarray) -> onnx.ModelProto:
    """hidden = residual + norm(routed): a post-norm MoE layer's output, once the runtime has summed
    its routed experts (residual [1, S, H], routed [S, H])."""
    b = GraphBuilder("combine")
    residual = b.input(IO.RESIDUAL, FLOAT, [1, "S", cfg.hidden_size])
    routed = b.input(IO.ROUTED, FLOAT, ["S", cfg.hidden_size])
    normed = norm(b, b.op("Unsqueeze", routed, b.ints([0])), post_norm, None, cfg.rms_norm_eps, cfg.norm)
    b.output(b.op("Add", residual, normed), IO.HIDDEN, FLOAT, [1, "S", cfg.hidden_size])
    return b.model()


def embed_graph(embed: np.ndarray, multiplier: float = 1.0, quantized: bool = False) -> onnx.ModelProto:
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
    return b.model()


def head_graph(cfg: ArchConfig, final_norm: np.ndarray, final_norm_bias: np.ndarray | None, lm_head: np.ndarray,
               lm_head_bias: np.ndarray | None, weights: WeightFormat = WeightFormat()) -> onnx.ModelProto:
    b = GraphBuilder("head", weights)
    h = b.input(IO.HIDDEN, FLOAT, [1, "S", lm_head.shape[1]])
    with b.tagged("final_norm"):
        normed = norm(b, h, final_norm, final_norm_bias, cfg.rms_norm_eps, cfg.norm)
    with b.tagged("lm_head"):
        logits = linear(b, normed, lm_head, lm_head_bias)
    logits_scaling = cfg.logits_scaling
    if logits_scaling != 1.0:
        logits = b.op("Div", logits, b.scalar(logits_scaling, "logits_scaling"))
    b.output(logits, IO.LOGITS, FLOAT, [1, "S", lm_head.shape[0]])
    return b.model()


# ----------------------------------------------------------------------------- the native decode step

# What a layer graph may hold for the native decode step to compute it (DecodeStep); any other role
# (q/k norms, sinks, output gates, post-norms, router biases, ...) leaves the layer to its graph.
STEP_ROLES = frozenset({Role.ATTN_NORM, Role.Q, Role.K, Role.V, Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS, Role.O, Role.O_BIAS,
                        Role.MLP_NORM, Role.ROUTER, Role.SHARED_GATE, Role.SHARED_UP, Role.SHARED_DOWN,
                        Role.SHARED_EXPERT_GATE, Role.Q_NORM, Role.K_NORM, Role.ROUTER_SCORE_BIAS})


def step_refusal(layer: int, cfg: ArchConfig, w: W, next_layer: NextRouter | None, fmt: WeightFormat,
                 positions: str) -> str | None:
    """Why a layer's graph runs every decode token instead of a native decode step (what its graph
    computes that the step does not), or None where the step can compute it."""
    dense_roles = {role for role in w if not role.value.startswith("expert")}
    if cfg.mixer(layer) != "attention":
        return f"a {cfg.mixer(layer)} layer"
    if layer not in cfg.moe_layers:
        return "a dense MLP layer"
    if positions != "tables":
        reason = fused_attention_refusal(cfg, w)
        return f"attention the fused kernel cannot take ({reason})" if reason else \
            "RoPE in sizes or an order the fused kernel cannot take"
    if layer in cfg.nope_layers:
        return "attention without positions"
    if fmt.bits not in QUANTIZED_BITS:
        return f"float{fmt.bits} dense weights (the step runs INT8, INT4 or INT2 ones)"
    for what, unsupported in (("LayerNorm", cfg.norm != "rms"), ("routing other than softmax or sigmoid",
                              cfg.scoring not in ("softmax", "sigmoid")), ("RoPE on adjacent pairs", cfg.rope_interleaved),
                              ("a parallel block", cfg.parallel_block), ("post-norms", cfg.post_norms),
                              ("no pre-norms", not cfg.pre_norms)):
        if unsupported:
            return what
    extra = sorted(role.value for role in dense_roles - STEP_ROLES)
    if extra:
        return f"weights the step does not compute ({', '.join(extra)})"
    if not {Role.ATTN_NORM, Role.MLP_NORM} <= dense_roles:
        return "a layer without its norms"
    if Role.SHARED_GATE in w and not {Role.SHARED_UP, Role.SHARED_DOWN} <= dense_roles:
        return "a shared expert without its up and down projections"
    qk_norm = cfg.qk_norm if Role.Q_NORM in w else "none"
    if (Role.Q_NORM in w) != (Role.K_NORM in w) or qk_norm not in QK_NORMS or cfg.qk_norm_after_rope:
        return "q/k norms the step does not compute (after RoPE, or on one of q and k)"
    if cfg.scoring == "softmax" and (cfg.group_topk is not None or Role.ROUTER_SCORE_BIAS in w):
        return "softmax routing with expert groups or a correction bias"
    if cfg.group_topk is not None:
        groups, kept = cfg.group_topk
        size = cfg.num_experts // groups if groups > 0 else 0
        if size < 2 or cfg.num_experts % groups or not 1 <= kept <= groups or kept * size < cfg.top_k:
            return "expert groups the step cannot pick from"
    if next_layer is not None and (next_layer.router_bias is not None or next_layer.norm_bias is not None
                                   or (next_layer.score_bias is not None and cfg.scoring != "sigmoid")):
        return "a next-layer predictor with biases the step does not compute"
    return None


def decode_step(layer: int, cfg: ArchConfig, w: W, next_layer: NextRouter | None,
                fmt: WeightFormat) -> DecodeStep:
    """The numbers of a layer's native decode step (its tensors are placed after serialization:
    decode_step_views), for a layer step_refusal takes."""
    shared = Role.SHARED_GATE in w
    qk_norm = cfg.qk_norm if Role.Q_NORM in w else "none"
    return DecodeStep(
        bits=fmt.bits, block_size=fmt.block_size or DEFAULT_BLOCK_SIZE[fmt.bits], accuracy_level=fmt.accuracy_level,
        attention_scale=cfg.head_dim ** -0.5 if cfg.attention_scale is None else cfg.attention_scale,
        norm_eps=cfg.rms_norm_eps, shared_intermediate_size=w[Role.SHARED_GATE].shape[0] if shared else 0,
        shared_scale=cfg.shared_scale, routed_scaling=cfg.routed_scaling,
        qkv_bias=any(role in w for role in (Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS)), o_bias=Role.O_BIAS in w,
        shared_expert_gate=shared and Role.SHARED_EXPERT_GATE in w,
        next_norm=next_layer is not None and next_layer.norm is not None, qk_norm=qk_norm, clip_qkv=cfg.clip_qkv,
        score_bias=Role.ROUTER_SCORE_BIAS in w,
        next_score_bias=next_layer is not None and next_layer.score_bias is not None,
        group_topk=list(cfg.group_topk) if cfg.group_topk else None, topk_norm_eps=cfg.topk_norm_eps, tensors=[])


def head_step(cfg: ArchConfig, lm_head_rows: int, final_norm_bias: np.ndarray | None, lm_head_bias: np.ndarray | None,
              fmt: WeightFormat) -> HeadStep | None:
    """The numbers of the head's native decode step (RMSNorm and a quantized LM head), or None."""
    if cfg.norm != "rms" or final_norm_bias is not None or fmt.bits not in QUANTIZED_BITS \
            or lm_head_rows != cfg.vocab_size:
        return None
    return HeadStep(bits=fmt.bits, block_size=fmt.block_size or DEFAULT_BLOCK_SIZE[fmt.bits],
                    accuracy_level=fmt.accuracy_level, norm_eps=cfg.rms_norm_eps, logits_scaling=cfg.logits_scaling,
                    has_bias=lm_head_bias is not None, tensors=[])


def head_step_views(step: HeadStep, data: bytes, cfg: ArchConfig) -> HeadStep:
    """`step` with its tensors placed in the serialized head graph `data`."""
    return replace(step, tensors=views_of(data, expected_head_tensors(step, cfg.hidden_size, cfg.vocab_size),
                                          STEP_INITIALIZERS))


def decode_step_views(step: DecodeStep, data: bytes, cfg: ArchConfig, next_experts: int) -> DecodeStep:
    """`step` with its tensors placed in the serialized layer graph `data`."""
    heads = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    want = expected_step_tensors(step, heads, cfg.num_experts, next_experts)
    return replace(step, tensors=views_of(data, want, STEP_INITIALIZERS))
