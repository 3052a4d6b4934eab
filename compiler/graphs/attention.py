"""Attention: positions, the fused GroupQueryAttention where its constraints hold (checked here, when the
graph is built) and the explicit form that is exact everywhere, sinks, and latent attention (MLA)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from fate.artifacts import ModelError
from fate.artifacts.layout import GraphIO as IO

from ..families.base import ArchConfig, Role
from ..onnx_builder import FLOAT, INT32, MS_DOMAIN, GraphBuilder
from .blocks import W, linear, linears, rms_norm, rotary


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
    rot = cfg.positions.rotary_dims
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
    if cfg.value_dim != cfg.head_dim:
        return f"value heads of {cfg.value_dim} beside key heads of {cfg.head_dim}"
    return None


def takes_position_tables(cfg: ArchConfig, w: W) -> bool:
    """Whether a layer's attention can rotate q and k inside GroupQueryAttention: RoPE right before
    the fused kernel (not after a q/k norm, no sinks, no latent attention), in sizes the kernel takes
    (onnxruntime: rotary dims a multiple of 16 within a head that is a multiple of 16). Fewer nodes:
    tiny-moe's layer attention 24-29 -> 15-18 us a decode step, qwen shapes 127-146 -> 76-90 us."""
    rot, d = cfg.positions.rotary_dims, cfg.head_dim
    if cfg.attention.latent or cfg.attention.qk_norm_after_rope or fused_attention_refusal(cfg, w) is not None:
        return False
    if rot == 0 or rot % 16 or d % 16 or rot > d:
        return False
    return not cfg.positions.interleaved or rot == d


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
    rot = cfg.positions.rotary_dims

    gated = Role.Q_GATE in w
    roles = [Role.Q, Role.K, Role.V] + ([Role.Q_GATE] if gated else [])
    biases = {Role.Q: Role.Q_BIAS, Role.K: Role.K_BIAS, Role.V: Role.V_BIAS}
    with b.tagged("qkv"):
        projected = linears(b, x, [w[r] for r in roles], [w.get(biases.get(r)) for r in roles])

    tables = positions.kind == "tables"

    def project(y: str, n_heads: int, norm_role: Role | None = None, d: int = d) -> str:
        """A projection -> [1, S, heads, d] (with position tables: [1, S, heads * d], as the fused
        kernel takes it), with the family's q/k norm (whole projection or per head) and clamp, in
        the order transformers applies them."""
        if norm_role is not None and cfg.attention.qk_norm == "projection":
            with b.tagged("q_norm" if norm_role == Role.Q_NORM else "k_norm"):
                y = rms_norm(b, y, w[norm_role], cfg.norms.eps)
        if cfg.attention.clip_qkv is not None:
            y = b.op("Clip", y, b.scalar(-cfg.attention.clip_qkv, "clip_min"), b.scalar(cfg.attention.clip_qkv, "clip_max"))
        per_head = norm_role is not None and cfg.attention.qk_norm == "head" and not cfg.attention.qk_norm_after_rope
        if tables and not per_head:
            return y
        y = b.op("Reshape", y, b.ints([1, -1, n_heads, d]))
        if per_head:
            with b.tagged("q_norm" if norm_role == Role.Q_NORM else "k_norm"):
                y = rms_norm(b, y, w[norm_role], cfg.norms.eps)
        return b.op("Reshape", y, b.ints([1, -1, n_heads * d])) if tables else y

    if cfg.positions.interleaved and rot not in (0, d):
        raise ModelError("RoPE on adjacent pairs over part of each head is not supported")
    if tables:  # GroupQueryAttention rotates q and k itself
        q, k = project(projected[0], heads, Role.Q_NORM), project(projected[1], kv, Role.K_NORM)
    else:
        # cos, sin [S, rot] -> [S, 1, rot]: one row per position, the same for every head
        cos_s, sin_s = (b.op("Unsqueeze", t, b.ints([1])) for t in (positions.cos, positions.sin)) if rot \
            else (positions.cos, positions.sin)
        # adjacent pairs (ERNIE-4.5) leave q and k in another order than the two halves; both get the
        # same one, so their dot products (and the cached keys, used only in them) are unchanged
        rotate = (lambda t: rotary_interleaved(b, t, cos_s, sin_s, rot)) if cfg.positions.interleaved \
            else (lambda t: rotary(b, t, cos_s, sin_s, d, rot))
        if rot == 0:  # no positions in the attention at all (Granite-4.0-H): order comes from the other layers
            rotate = lambda t: t  # noqa: E731
        q = rotate(project(projected[0], heads, Role.Q_NORM))
        k = rotate(project(projected[1], kv, Role.K_NORM))
        if cfg.attention.qk_norm_after_rope and (cfg.attention.qk_norm != "unit" or rot):  # each head of the rotated q and k
            # (HunYuan, with weights; Llama-4 without, and only where the layer rotates)
            q, k = (rms_norm(b, t, w.get(role), cfg.norms.eps) for t, role in ((q, Role.Q_NORM), (k, Role.K_NORM)))
    v = project(projected[2], kv, d=cfg.value_dim)
    if cfg.attention.value_scale != 1.0:  # MiMo-V2-Flash: the values scaled before they are cached
        v = b.op("Mul", v, b.scalar(cfg.attention.value_scale, "value_scale"))
    scale = d ** -0.5 if cfg.attention.scale is None else cfg.attention.scale
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
        rotary = {"do_rotary": 1, "rotary_interleaved": int(cfg.positions.interleaved)} if cfg.positions.inv_freq else {}
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
    q [1,S,H,D] -> [1,KV,G,S,D] against the caches [1,KV,T,D] (values [1,KV,T,Dv])."""
    heads, kv, d, dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.value_dim
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
    context = b.op("Reshape", context, b.ints([1, heads, -1, dv]))
    context = b.op("Reshape", b.op("Transpose", context, perm=[0, 2, 1, 3]), b.ints([1, -1, heads * dv]))
    return context, present_k, present_v


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
    m = cfg.attention.latent
    heads, nope, rope, vd = cfg.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    if m.q_lora_rank:
        q = linear(b, rms_norm(b, linear(b, x, w[Role.Q_A]), w[Role.Q_A_NORM], cfg.norms.eps), w[Role.Q_B])
    else:
        q = linear(b, x, w[Role.Q])
    q = b.op("Transpose", b.op("Reshape", q, b.ints([1, -1, heads, nope + rope])), perm=[0, 2, 1, 3])
    q_nope, q_pe = b.op("Split", q, b.ints([nope, rope]), outputs=2, axis=-1)
    cos, sin, bias = positions.cos, positions.sin, positions.bias
    rotate = (lambda t: rotary_interleaved(b, t, cos, sin, rope)) if cfg.positions.interleaved \
        else (lambda t: rotary(b, t, cos, sin, rope, rope))
    if not cfg.positions.inv_freq:  # the "rope" part unrotated (Kimi-Linear's latent attention has no positions)
        rotate = lambda t: t  # noqa: E731
    q = b.op("Concat", q_nope, rotate(q_pe), axis=-1)

    latent, k_pe = b.op("Split", linear(b, x, w[Role.KV_A]), b.ints([m.kv_lora_rank, rope]), outputs=2, axis=-1)
    latent = b.op("Unsqueeze", rms_norm(b, latent, w[Role.KV_A_NORM], cfg.norms.eps), b.ints([1]))
    k_pe = rotate(b.op("Unsqueeze", k_pe, b.ints([1])))
    present_k = b.op("Concat", past_k, latent, axis=2)
    present_v = b.op("Concat", past_v, k_pe, axis=2)

    kv = b.op("Reshape", linear(b, present_k, w[Role.KV_B]), b.ints([1, -1, heads, nope + vd]))
    k_nope, v = b.op("Split", b.op("Transpose", kv, perm=[0, 2, 1, 3]), b.ints([nope, vd]), outputs=2, axis=-1)
    k = b.op("Concat", k_nope, b.op("Tile", present_v, b.ints([1, heads, 1, 1])), axis=-1)
    scale = cfg.attention.scale if cfg.attention.scale is not None else (nope + rope) ** -0.5
    scores = b.op("Add", b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])),
                              b.scalar(scale, "scale")), bias)
    context = b.op("MatMul", b.op("Softmax", scores, axis=-1), v)
    context = b.op("Reshape", b.op("Transpose", context, perm=[0, 2, 1, 3]), b.ints([1, -1, heads * vd]))
    with b.tagged("o"):
        return linear(b, context, w[Role.O], w.get(Role.O_BIAS)), present_k, present_v


def softmax_with_sinks(b: GraphBuilder, scores: str, sinks: np.ndarray, kv: int) -> str:
    """Softmax over keys plus one learned "sink" logit per head whose probability is dropped
    (GPT-OSS): exp(s - m) / (sum exp(s - m) + exp(sink - m)), m the max of both.
    scores [1, KV, G, S, T]; sinks [heads] reshaped to [1, KV, G, 1, 1] (head h = kv * G + g)."""
    sink = b.const(sinks.astype(np.float32).reshape(1, kv, -1, 1, 1), "sinks")
    peak = b.op("Max", b.op("ReduceMax", scores, axes=[-1], keepdims=1), sink)
    e = b.op("Exp", b.op("Sub", scores, peak))
    total = b.op("Add", b.op("ReduceSum", e, b.ints([-1]), keepdims=1), b.op("Exp", b.op("Sub", sink, peak)))
    return b.op("Div", e, total)
