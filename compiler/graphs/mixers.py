"""The mixers with a fixed-size state instead of a KV cache: short convolutions, gated DeltaNet, Mamba2 and
Mamba, each a step run as an ONNX Scan over the step's tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from ..families.base import ArchConfig, Role
from ..onnx_builder import FLOAT, GraphBuilder
from .blocks import W, l2_normalize, linear, negative_rates, rms_norm, silu


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
    conv, present = causal_conv(b, past, b.op("Mul", gate_b, u), w[Role.CONV].reshape(h, cfg.mixers.conv_kernel),
                                w.get(Role.CONV_BIAS))
    return linear(b, b.op("Mul", gate_c, conv), w[Role.CONV_OUT], w.get(Role.CONV_OUT_BIAS)), present


def delta_rule_step(hv: int, dk: int, dv: int, per_key: bool = False) -> onnx.GraphProto:
    """One token of the gated delta rule, the body of a Scan over the sequence:

        S     = S * decay                         S [Hv, Dk, Dv], decay = exp(g) [Hv] (per_key: [Hv, Dk], KDA)
        S     = S + k (beta (v - k^T S))^T        k [Hv, Dk], v [Hv, Dv], beta [Hv]
        o     = q^T S                             q [Hv, Dk] -> o [Hv, Dv]
    (transformers' torch_recurrent_gated_delta_rule, one step)."""
    b = GraphBuilder("delta_rule_step", prefix="step_")
    state = b.input("step_state", FLOAT, [hv, dk, dv])
    q, k = b.input("step_q", FLOAT, [hv, dk]), b.input("step_k", FLOAT, [hv, dk])
    v = b.input("step_v", FLOAT, [hv, dv])
    decay = b.input("step_decay", FLOAT, [hv, dk] if per_key else [hv])
    beta = b.input("step_beta", FLOAT, [hv])
    state = b.op("Mul", state, b.op("Unsqueeze", decay, b.ints([2] if per_key else [1, 2])))
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
    m = cfg.mixers.linear_attention
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
    normed = rms_norm(b, out, w[Role.LINEAR_NORM], cfg.norms.eps)  # [S, Hv, Dv]
    z = b.op("Reshape", linear(b, rows, w[Role.LINEAR_Z]), b.ints([-1, hv, dv]))
    gated = b.op("Mul", normed, silu(b, z))
    gated = b.op("Reshape", gated, b.ints([1, -1, m.value_dim]))
    return linear(b, gated, w[Role.LINEAR_OUT]), present_conv, present_state


def ssm_step(heads: int, head_dim: int, state_size: int) -> onnx.GraphProto:
    """One token of Mamba2's selective state space, the body of a Scan over the sequence:

        S = S * decay + (dt x) B^T      S [1, Hn, Dh, N], decay = exp(dt A) [Hn], dt x [Hn, Dh], B [Hn, N]
        y = S C                         C [Hn, N] -> y [Hn, Dh]
    (transformers' mamba2_selective_state_update, without the D skip, added outside). Lightning
    attention is the same step: S = S * exp(-slope) + v k^T, o = S q. The state keeps the shape the
    layer carries it in ([1, ...]): a reshape of the Scan's final state is a copy of it every token
    (onnxruntime copies a graph output it cannot alias; 60 of 990 us of a Mamba2 block at hidden 2688)."""
    b = GraphBuilder("ssm_step", prefix="step_")
    state = b.input("step_state", FLOAT, [1, heads, head_dim, state_size])
    xdt = b.input("step_xdt", FLOAT, [heads, head_dim])
    bb, cc = b.input("step_b", FLOAT, [heads, state_size]), b.input("step_c", FLOAT, [heads, state_size])
    decay = b.input("step_decay", FLOAT, [heads])
    state = b.op("Add", b.op("Mul", state, b.op("Unsqueeze", decay, b.ints([0, 2, 3]))),
                 b.op("MatMul", b.op("Unsqueeze", xdt, b.ints([0, 3])), b.op("Unsqueeze", bb, b.ints([0, 2]))))
    out = b.op("Reshape", b.op("MatMul", state, b.op("Unsqueeze", cc, b.ints([0, 3]))), b.ints([heads, head_dim]))
    b.output(state, "step_state_out", FLOAT, [1, heads, head_dim, state_size])
    b.output(out, "step_out", FLOAT, [heads, head_dim])
    return b.graph()


def mamba2(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, past_conv: str, past_state: str) -> tuple[str, str, str]:
    """A Mamba2 mixer (Bamba's, as Granite-4.0-H runs it); returns (output, present conv window,
    present SSM state).

    z | xBC | dt = in_proj(x);  x, B, C = silu(causal_conv(xBC)) (B and C per group of heads)
    dt = softplus(dt + dt_bias);  decay = exp(dt * -exp(A_log))
    y  = the selective scan from the past state (a Scan: one step per token) + D x
    out = out_proj(group_rmsnorm(y * silu(z)) * w)"""
    m = cfg.mixers.mamba
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

    present_state, y = b.op("Scan", past_state, xdt, per_head(bb), per_head(cc), decay, outputs=2,
                            body=ssm_step(n, hd, ds), num_scan_inputs=4)
    y = b.op("Add", y, b.op("Mul", xh, b.const(w[Role.MAMBA_D].astype(np.float32).reshape(n, 1), "d_skip")))
    z = b.op("Reshape", gate, b.ints([-1, n, hd]))
    gated = b.op("Reshape", b.op("Mul", y, silu(b, z)), b.ints([1, -1, g, inner // g]))
    normed = rms_norm(b, gated, w[Role.MAMBA_NORM].reshape(g, inner // g), cfg.norms.eps)
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
    m = cfg.mixers.mamba1
    i, n, r = m.intermediate, m.state_size, m.dt_rank
    u, gate = b.op("Split", linear(b, x, w[Role.MAMBA_IN], w.get(Role.MAMBA_IN_BIAS)), b.ints([i, i]), outputs=2,
                   axis=-1)
    conv, present_conv = causal_conv(b, past_conv, u, w[Role.MAMBA_CONV].reshape(i, m.conv_kernel),
                                     w.get(Role.MAMBA_CONV_BIAS))
    rows = b.op("Reshape", silu(b, conv), b.ints([-1, i]))
    dt_low, bb, cc = b.op("Split", linear(b, rows, w[Role.MAMBA_X]), b.ints([r, n, n]), outputs=3, axis=-1)

    def normed(t: str, role: Role) -> str:
        return rms_norm(b, t, w[role], cfg.norms.eps) if role in w else t

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


def lightning(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, past_state: str) -> tuple[str, str]:
    """MiniMax's lightning attention; returns (output [1,S,H], present state).

    q|k|v = silu(x Wqkv), q, k and v of each head side by side;  each head's state decays by
    exp(-slope) a token and adds v k^T;  o = S q over the sequence from the past state (a Scan);
    out = out_proj(rmsnorm(o over all heads) * sigmoid(x Wgate))"""
    m = cfg.mixers.lightning
    heads, d = m.num_heads, m.head_dim
    rows = b.op("Reshape", x, b.ints([-1, cfg.hidden_size]))
    qkv = b.op("Reshape", silu(b, linear(b, rows, w[Role.LIGHTNING_QKV])), b.ints([-1, heads, 3 * d]))
    q, k, v = b.op("Split", qkv, b.ints([d, d, d]), outputs=3, axis=-1)
    # Mamba2's step with the state [heads, D_v, D_k]: x dt = v, B = k, C = q, and a decay that is the
    # same every token (transformers' decode form; its block form in prefill computes the same sums)
    rate = np.exp(-w[Role.LIGHTNING_SLOPE].reshape(heads).astype(np.float32))
    decay = b.op("Expand", b.const(rate, "decay"), b.op("Slice", b.op("Shape", q), b.ints([0]), b.ints([2])))
    present_state, out = b.op("Scan", past_state, v, k, q, decay, outputs=2, body=ssm_step(heads, d, d),
                              num_scan_inputs=4)
    normed = rms_norm(b, b.op("Reshape", out, b.ints([1, -1, heads * d])), w[Role.LIGHTNING_NORM], m.norm_eps)
    gated = b.op("Mul", normed, b.op("Sigmoid", linear(b, x, w[Role.LIGHTNING_GATE])))
    return linear(b, gated, w[Role.LIGHTNING_OUT]), present_state


def kimi_delta(b: GraphBuilder, x: str, w: W, cfg: ArchConfig, past_conv: str,
               past_state: str) -> tuple[str, str, str]:
    """Kimi Delta Attention; returns (output [1,S,H], present conv window, present state).

    q|k|v = silu(causal_conv(x Wq | x Wk | x Wv));  q, k = l2norm per head (q also / sqrt(D));
    beta = sigmoid(x Wb);  g = -exp(A_log) softplus(f_b(f_a(x)) + dt_bias), one decay per key channel
    o = the delta rule over the sequence from the past state, each key row of the state decaying by its own
    exp(g) (a Scan: one step per token)
    out = out_proj(rmsnorm(o) * w * sigmoid(g_b(g_a(x)))) per head"""
    m = cfg.mixers.kda
    heads, d, inner = m.num_heads, m.head_dim, m.inner
    rows = b.op("Reshape", x, b.ints([-1, cfg.hidden_size]))
    projected = linear(b, x, np.concatenate([w[Role.KDA_Q], w[Role.KDA_K], w[Role.KDA_V]]))
    kernel = np.concatenate([w[r].reshape(inner, m.conv_kernel) for r in (Role.KDA_Q_CONV, Role.KDA_K_CONV,
                                                                           Role.KDA_V_CONV)])
    mixed, present_conv = causal_conv(b, past_conv, projected, kernel, None)
    q, k, v = b.op("Split", b.op("Reshape", silu(b, mixed), b.ints([-1, 3 * inner])), b.ints([inner] * 3),
                   outputs=3, axis=-1)
    q = b.op("Mul", l2_normalize(b, b.op("Reshape", q, b.ints([-1, heads, d]))), b.scalar(d ** -0.5, "query_scale"))
    k = l2_normalize(b, b.op("Reshape", k, b.ints([-1, heads, d])))
    v = b.op("Reshape", v, b.ints([-1, heads, d]))
    beta = b.op("Sigmoid", linear(b, rows, w[Role.KDA_B]))
    gate = b.op("Add", linear(b, linear(b, rows, w[Role.KDA_F_A]), w[Role.KDA_F_B]),
                b.const(w[Role.KDA_DT_BIAS].astype(np.float32), "dt_bias"))
    rates = negative_rates(w[Role.KDA_A_LOG].reshape(heads, 1))  # [heads, 1]: each head's rate on its channels
    decay = b.op("Exp", b.op("Mul", b.op("Softplus", b.op("Reshape", gate, b.ints([-1, heads, d]))),
                             b.const(rates, "a")))
    state = b.op("Reshape", past_state, b.ints([heads, d, d]))
    final, out = b.op("Scan", state, q, k, v, decay, beta, outputs=2, body=delta_rule_step(heads, d, d, per_key=True),
                      num_scan_inputs=5)
    present_state = b.op("Reshape", final, b.ints([1, heads, d, d]))
    normed = rms_norm(b, out, w[Role.KDA_NORM], cfg.norms.eps)  # [S, heads, D]
    gate_out = b.op("Reshape", linear(b, linear(b, rows, w[Role.KDA_G_A]), w[Role.KDA_G_B]), b.ints([-1, heads, d]))
    gated = b.op("Reshape", b.op("Mul", normed, b.op("Sigmoid", gate_out)), b.ints([1, -1, inner]))
    return linear(b, gated, w[Role.KDA_OUT]), present_conv, present_state



# ------------------------------------------------------------------ the mixers, each in one row


def short_conv_shapes(c: ArchConfig) -> dict[Role, tuple[int, ...]]:
    h = c.hidden_size
    return {Role.CONV_IN: (3 * h, h), Role.CONV_IN_BIAS: (3 * h,), Role.CONV: (h, 1, c.mixers.conv_kernel),
            Role.CONV_BIAS: (h,), Role.CONV_OUT: (h, h), Role.CONV_OUT_BIAS: (h,)}


def mamba1_shapes(c: ArchConfig) -> dict[Role, tuple[int, ...]]:
    if c.mixers.mamba1 is None:
        return {}
    m, h = c.mixers.mamba1, c.hidden_size
    i, n, r = m.intermediate, m.state_size, m.dt_rank
    return {Role.MAMBA_IN: (2 * i, h), Role.MAMBA_IN_BIAS: (2 * i,), Role.MAMBA_CONV: (i, 1, m.conv_kernel),
            Role.MAMBA_CONV_BIAS: (i,), Role.MAMBA_X: (r + 2 * n, i), Role.MAMBA_DT: (i, r),
            Role.MAMBA_DT_BIAS: (i,), Role.MAMBA_A_LOG: (i, n), Role.MAMBA_D: (i,), Role.MAMBA_DT_NORM: (r,),
            Role.MAMBA_B_NORM: (n,), Role.MAMBA_C_NORM: (n,), Role.MAMBA_OUT: (h, i), Role.MAMBA_OUT_BIAS: (h,)}


def mamba2_shapes(c: ArchConfig) -> dict[Role, tuple[int, ...]]:
    m = c.mixers.mamba
    if m is None:
        return {}
    h, i, n = c.hidden_size, m.intermediate, m.num_heads
    proj = i + m.conv_dim + n
    return {Role.MAMBA_IN: (proj, h), Role.MAMBA_IN_BIAS: (proj,), Role.MAMBA_CONV: (m.conv_dim, 1, m.conv_kernel),
            Role.MAMBA_CONV_BIAS: (m.conv_dim,), Role.MAMBA_DT_BIAS: (n,), Role.MAMBA_A_LOG: (n,), Role.MAMBA_D: (n,),
            Role.MAMBA_NORM: (i,), Role.MAMBA_OUT: (h, i), Role.MAMBA_OUT_BIAS: (h,)}


def lightning_shapes(c: ArchConfig) -> dict[Role, tuple[int, ...]]:
    m = c.mixers.lightning
    if m is None:
        return {}
    inner = m.num_heads * m.head_dim
    return {Role.LIGHTNING_QKV: (3 * inner, c.hidden_size), Role.LIGHTNING_GATE: (inner, c.hidden_size),
            Role.LIGHTNING_NORM: (inner,), Role.LIGHTNING_OUT: (c.hidden_size, inner),
            Role.LIGHTNING_SLOPE: (m.num_heads, 1, 1)}


def kda_shapes(c: ArchConfig) -> dict[Role, tuple[int, ...]]:
    m = c.mixers.kda
    if m is None:
        return {}
    h, d, inner = c.hidden_size, m.head_dim, m.inner
    conv = (inner, 1, m.conv_kernel)
    return {Role.KDA_Q: (inner, h), Role.KDA_K: (inner, h), Role.KDA_V: (inner, h), Role.KDA_Q_CONV: conv,
            Role.KDA_K_CONV: conv, Role.KDA_V_CONV: conv, Role.KDA_F_A: (d, h), Role.KDA_F_B: (inner, d),
            Role.KDA_DT_BIAS: (inner,), Role.KDA_A_LOG: (1, 1, m.num_heads, 1), Role.KDA_B: (m.num_heads, h),
            Role.KDA_G_A: (d, h), Role.KDA_G_B: (inner, d), Role.KDA_NORM: (d,), Role.KDA_OUT: (h, inner)}


def linear_shapes(c: ArchConfig) -> dict[Role, tuple[int, ...]]:
    """A gated DeltaNet's tensors, one each (layouts.FusedLinearAttention: fused by key head)."""
    m = c.mixers.linear_attention
    if m is None:
        return {}
    h = c.hidden_size
    qkv, z, b = (m.conv_dim, h), (m.value_dim, h), (m.num_value_heads, h)
    return {Role.LINEAR_QKV: qkv, Role.LINEAR_Z: z, Role.LINEAR_B: b, Role.LINEAR_A: b,
            Role.LINEAR_CONV: (m.conv_dim, 1, m.conv_kernel), Role.LINEAR_DT_BIAS: (m.num_value_heads,),
            Role.LINEAR_A_LOG: (m.num_value_heads,), Role.LINEAR_NORM: (m.value_head_dim,),
            Role.LINEAR_OUT: (h, m.value_dim)}


@dataclass(frozen=True)
class MixerKind:
    """A token mixer with a fixed-size state, in one place: the tensors a layer of it holds besides its
    MLP (norms included; optional biases are the exporter's OPTIONAL_LAYER_ROLES), their shapes from the
    config, the state it carries between steps, and its graph (b, x, w, cfg, *past) -> (out, *present)."""

    roles: tuple[Role, ...]
    shapes: Callable[[ArchConfig], dict[Role, tuple[int, ...]]]
    state: Callable[[ArchConfig], dict[str, list[int]]]
    build: Callable[..., tuple[str, ...]]


def _mamba2_state(c: ArchConfig) -> dict[str, list[int]]:
    m = c.mixers.mamba
    return {"conv": [1, m.conv_kernel - 1, m.conv_dim], "ssm": [1, m.num_heads, m.head_dim, m.state_size]}


def _mamba1_state(c: ArchConfig) -> dict[str, list[int]]:
    m = c.mixers.mamba1
    return {"conv": [1, m.conv_kernel - 1, m.intermediate], "ssm": [1, m.intermediate, m.state_size]}


def _deltanet_state(c: ArchConfig) -> dict[str, list[int]]:
    m = c.mixers.linear_attention
    return {"conv": [1, m.conv_kernel - 1, m.conv_dim], "recurrent": [1, m.num_value_heads, m.key_head_dim,
                                                                       m.value_head_dim]}


def _kda_state(c: ArchConfig) -> dict[str, list[int]]:
    m = c.mixers.kda
    return {"conv": [1, m.conv_kernel - 1, 3 * m.inner], "recurrent": [1, m.num_heads, m.head_dim, m.head_dim]}


def _lightning_state(c: ArchConfig) -> dict[str, list[int]]:
    m = c.mixers.lightning
    return {"state": [1, m.num_heads, m.head_dim, m.head_dim]}


# Every mixer besides attention (fate.artifacts.schema.MIXERS names them for the runtime)
MIXER_KINDS: dict[str, MixerKind] = {
    "short_conv": MixerKind(
        (Role.ATTN_NORM, Role.CONV_IN, Role.CONV, Role.CONV_OUT, Role.MLP_NORM), short_conv_shapes,
        lambda c: {"conv": [1, c.mixers.conv_kernel - 1, c.hidden_size]}, short_conv),
    "gated_deltanet": MixerKind(
        (Role.ATTN_NORM, Role.LINEAR_QKV, Role.LINEAR_Z, Role.LINEAR_B, Role.LINEAR_A, Role.LINEAR_CONV,
         Role.LINEAR_DT_BIAS, Role.LINEAR_A_LOG, Role.LINEAR_NORM, Role.LINEAR_OUT, Role.MLP_NORM),
        linear_shapes, _deltanet_state, gated_deltanet),
    "mamba2": MixerKind(
        (Role.ATTN_NORM, Role.MAMBA_IN, Role.MAMBA_CONV, Role.MAMBA_DT_BIAS, Role.MAMBA_A_LOG, Role.MAMBA_D,
         Role.MAMBA_NORM, Role.MAMBA_OUT, Role.MLP_NORM), mamba2_shapes, _mamba2_state, mamba2),
    "mamba": MixerKind(
        (Role.ATTN_NORM, Role.MAMBA_IN, Role.MAMBA_CONV, Role.MAMBA_X, Role.MAMBA_DT, Role.MAMBA_DT_BIAS,
         Role.MAMBA_A_LOG, Role.MAMBA_D, Role.MAMBA_OUT, Role.MLP_NORM), mamba1_shapes, _mamba1_state, mamba1),
    "lightning": MixerKind(
        (Role.ATTN_NORM, Role.LIGHTNING_QKV, Role.LIGHTNING_GATE, Role.LIGHTNING_NORM, Role.LIGHTNING_OUT,
         Role.LIGHTNING_SLOPE, Role.MLP_NORM), lightning_shapes, _lightning_state, lightning),
    "kda": MixerKind(
        (Role.ATTN_NORM, Role.KDA_Q, Role.KDA_K, Role.KDA_V, Role.KDA_Q_CONV, Role.KDA_K_CONV, Role.KDA_V_CONV,
         Role.KDA_F_A, Role.KDA_F_B, Role.KDA_DT_BIAS, Role.KDA_A_LOG, Role.KDA_B, Role.KDA_G_A, Role.KDA_G_B,
         Role.KDA_NORM, Role.KDA_OUT, Role.MLP_NORM), kda_shapes, _kda_state, kimi_delta),
}
