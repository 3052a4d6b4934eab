"""What every model family file provides: a table from checkpoint tensor names to roles, and a
reading of config.json into the architecture numbers the exporter needs.

A family file is data plus one small function. The exporter never branches on the family: it
asks for roles, and a role that the table does not name is simply absent (no q bias, no shared
expert, ...).
"""

from __future__ import annotations

import enum
import math
import re
import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

from fate.artifacts import ModelError
from fate.artifacts.schema import MIXERS


class Role(enum.Enum):
    # model-level
    EMBED = "embed"
    FINAL_NORM = "final_norm"
    FINAL_NORM_BIAS = "final_norm_bias"
    LM_HEAD = "lm_head"
    LM_HEAD_BIAS = "lm_head_bias"
    # per layer ({layer})
    ATTN_NORM = "attn_norm"
    ATTN_NORM_BIAS = "attn_norm_bias"
    MLP_NORM_BIAS = "mlp_norm_bias"
    Q = "q"
    K = "k"
    V = "v"
    O = "o"
    Q_BIAS = "q_bias"
    K_BIAS = "k_bias"
    V_BIAS = "v_bias"
    O_BIAS = "o_bias"
    Q_NORM = "q_norm"
    K_NORM = "k_norm"
    Q_GATE = "q_gate"  # attention output gated per channel by sigmoid(x @ Q_GATE^T) (Qwen3-Next)
    # multi-head latent attention (DeepSeek): low-rank query and key/value projections
    Q_A = "q_a"
    Q_A_NORM = "q_a_norm"
    Q_B = "q_b"
    KV_A = "kv_a"
    KV_A_NORM = "kv_a_norm"
    KV_B = "kv_b"
    MLP_NORM = "mlp_norm"
    # norms of a sublayer's output before the residual add (OLMo-2 style post-norm families)
    POST_ATTN_NORM = "post_attn_norm"
    POST_MLP_NORM = "post_mlp_norm"
    ROUTER = "router"
    ROUTER_SCORE_BIAS = "router_score_bias"  # added to the scores only to choose experts (DeepSeek-V3)
    ROUTER_BIAS = "router_bias"  # added to the router logits (GPT-OSS)
    SINKS = "sinks"  # one learned attention logit per head (GPT-OSS)
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    SHARED_EXPERT_GATE = "shared_expert_gate"
    # the routed experts in a latent space (Nemotron-3 Super): their input projected down, their weighted
    # sum projected back up to the hidden size (in the combine graph)
    MOE_LATENT_IN = "moe_latent_in"
    MOE_LATENT_OUT = "moe_latent_out"
    # a short convolution mixer (LFM2): in_proj to B, C, x [3H, H]; a depthwise causal conv over
    # B * x [H, 1, L]; out_proj [H, H]; each with an optional bias
    CONV_IN = "conv_in"
    CONV_IN_BIAS = "conv_in_bias"
    CONV = "conv"
    CONV_BIAS = "conv_bias"
    CONV_OUT = "conv_out"
    CONV_OUT_BIAS = "conv_out_bias"
    # a gated DeltaNet mixer (Qwen3-Next, Qwen3.5): q|k|v rows [2 Kd + Vd, H], the output gate z
    # [Vd, H], the per-value-head b (write strength) and a (decay) [Hv, H]; a depthwise causal conv
    # over q|k|v [2 Kd + Vd, 1, L]; dt_bias and A_log [Hv]; a gated RMSNorm over each value head
    # [Dv]; out_proj [H, Vd]
    LINEAR_QKV = "linear_qkv"
    LINEAR_Z = "linear_z"
    LINEAR_B = "linear_b"
    LINEAR_A = "linear_a"
    LINEAR_CONV = "linear_conv"
    LINEAR_DT_BIAS = "linear_dt_bias"
    LINEAR_A_LOG = "linear_a_log"
    LINEAR_NORM = "linear_norm"
    LINEAR_OUT = "linear_out"
    # a Mamba2 mixer (Granite-4.0-H, Nemotron-H): in_proj to z | x B C | dt [I + conv + heads, H]; a
    # depthwise causal conv over x B C [conv, 1, L]; dt_bias, A_log, D [heads]; a gated RMSNorm per
    # group [I]; out_proj [H, I]; in/out/conv biases optional
    MAMBA_IN = "mamba_in"
    MAMBA_IN_BIAS = "mamba_in_bias"
    MAMBA_CONV = "mamba_conv"
    MAMBA_CONV_BIAS = "mamba_conv_bias"
    MAMBA_DT_BIAS = "mamba_dt_bias"
    MAMBA_A_LOG = "mamba_a_log"
    MAMBA_D = "mamba_d"
    MAMBA_NORM = "mamba_norm"
    MAMBA_OUT = "mamba_out"
    MAMBA_OUT_BIAS = "mamba_out_bias"
    # a Mamba (1) mixer (Jamba) has in_proj to x | z [2 I, H], conv, out_proj and their biases as above,
    # and a per-channel SSM: x_proj to dt_low | B | C [R + 2 N, I], dt_proj [I, R] with its bias
    # (MAMBA_DT_BIAS) [I], A_log [I, N], D [I]; Jamba also normalizes dt_low, B and C (RMSNorm)
    MAMBA_X = "mamba_x"
    MAMBA_DT = "mamba_dt"
    MAMBA_DT_NORM = "mamba_dt_norm"
    MAMBA_B_NORM = "mamba_b_norm"
    MAMBA_C_NORM = "mamba_c_norm"
    # a lightning attention mixer (MiniMax): q|k|v per head [H * 3D, H], silu'd; each head's state decays
    # by exp(-slope) a token; an RMSNorm over all heads [H * D]; an output gate [H * D, H]; out_proj [H, H * D]
    LIGHTNING_QKV = "lightning_qkv"
    LIGHTNING_GATE = "lightning_gate"
    LIGHTNING_NORM = "lightning_norm"
    LIGHTNING_OUT = "lightning_out"
    LIGHTNING_SLOPE = "lightning_slope"
    # Kimi Delta Attention (Kimi-Linear): q, k, v [H * D, H] each with its depthwise causal conv [H * D, 1, L];
    # the forget gate's low-rank f_a [D, H], f_b [H * D, D], dt_bias [H * D], A_log [1, 1, heads, 1]; the
    # write strength b [heads, H]; the output gate's low-rank g_a [D, H], g_b [H * D, D]; a gated RMSNorm
    # over each head [D]; out_proj [H, H * D]
    KDA_Q = "kda_q"
    KDA_K = "kda_k"
    KDA_V = "kda_v"
    KDA_Q_CONV = "kda_q_conv"
    KDA_K_CONV = "kda_k_conv"
    KDA_V_CONV = "kda_v_conv"
    KDA_F_A = "kda_f_a"
    KDA_F_B = "kda_f_b"
    KDA_DT_BIAS = "kda_dt_bias"
    KDA_A_LOG = "kda_a_log"
    KDA_B = "kda_b"
    KDA_G_A = "kda_g_a"
    KDA_G_B = "kda_g_b"
    KDA_NORM = "kda_norm"
    KDA_OUT = "kda_out"
    DENSE_GATE = "dense_gate"
    DENSE_UP = "dense_up"
    DENSE_DOWN = "dense_down"
    # per expert ({layer}, {expert})
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    # all experts of a layer in one tensor ({layer}): [E, 2I, H] gate rows then up rows; [E, H, I]
    EXPERTS_GATE_UP = "experts_gate_up"
    EXPERTS_DOWN = "experts_down"
    EXPERTS_UP = "experts_up"  # the up rows apart from the gate's (DBRX: w1, v1, w2 each [E * I, H])
    EXPERTS_GATE_UP_BIAS = "experts_gate_up_bias"
    EXPERTS_DOWN_BIAS = "experts_down_bias"
    # the same in MXFP4 ([E, out, in/32, 16] codes and [E, out, in/32] scales), decoded at compile time
    EXPERTS_GATE_UP_BLOCKS = "experts_gate_up_blocks"
    EXPERTS_GATE_UP_SCALES = "experts_gate_up_scales"
    EXPERTS_DOWN_BLOCKS = "experts_down_blocks"
    EXPERTS_DOWN_SCALES = "experts_down_scales"


MODEL_ROLES = (Role.EMBED, Role.FINAL_NORM, Role.LM_HEAD)
EXPERT_ROLES = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN)


def check_finite(optional: bool = False, **values: Any) -> None:
    """Each of `values` a finite number (or, where `optional`, None: a field left unset), else one line
    naming it. One check for every record's numbers."""
    for name, value in values.items():
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelError(f"config.json: {name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class LatentAttention:
    """DeepSeek's multi-head latent attention sizes (q_lora_rank None: a plain q projection)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MixerSizes:
    """A recurrent mixer's sizes, checked when read: every integer field > 0 and, where WHOLE names
    (whole, part, in words), one field a multiple of another."""

    WHOLE: ClassVar[tuple[str, str, str] | None] = None

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type == "int"}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes.values()):
            raise ModelError(f"config.json: {type(self).__name__} sizes {sizes} must be integers > 0")
        if self.WHOLE and sizes[self.WHOLE[0]] % sizes[self.WHOLE[1]]:
            raise ModelError(f"config.json: {type(self).__name__} sizes {sizes} must have {self.WHOLE[2]}")


@dataclass(frozen=True)
class KimiDelta(MixerSizes):
    """Kimi Delta Attention's sizes: heads of one size for q, k and v, and the short convolution's width."""

    num_heads: int
    head_dim: int
    conv_kernel: int

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class Lightning(MixerSizes):
    """A lightning attention's sizes: heads of one size for q, k and v, and its norm's epsilon."""

    num_heads: int
    head_dim: int
    norm_eps: float = 1e-6


@dataclass(frozen=True)
class LinearAttention(MixerSizes):
    """A gated DeltaNet's sizes: key heads (shared by groups of value heads), their head sizes,
    the short convolution's width (how a checkpoint stores the projections: layouts.py)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    WHOLE: ClassVar = ("num_value_heads", "num_key_heads", "the value heads a multiple of the key heads")

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class Mamba2(MixerSizes):
    """A Mamba2 mixer's sizes: heads of `head_dim` channels (intermediate = heads x head_dim), B and
    C shared by groups of heads, the SSM state size, the short convolution's width."""

    num_heads: int
    head_dim: int
    state_size: int
    groups: int
    conv_kernel: int
    WHOLE: ClassVar = ("num_heads", "groups", "the heads a multiple of the groups")

    @property
    def intermediate(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate + 2 * self.groups * self.state_size


@dataclass(frozen=True)
class Mamba1(MixerSizes):
    """A Mamba (1) mixer's sizes: channels, SSM state per channel, the rank of dt's projection, the
    short convolution's width."""

    intermediate: int
    state_size: int
    dt_rank: int
    conv_kernel: int


@dataclass(frozen=True)
class Positions:
    """How the attention layers rotate q and k: RoPE's frequencies (computed at compile time, so the runtime
    needs no knowledge of RoPE variants; empty: no positions), transformers' scaling of cos and sin, which
    dims pair up, and the attention layers that do not rotate at all."""

    inv_freq: list[float]
    attention_scaling: float = 1.0
    interleaved: bool = False  # rotary pairs are adjacent dims (DeepSeek), not the two halves
    nope_layers: frozenset[int] = frozenset()  # attention layers that do not rotate q and k (EXAONE's global ones)
    # each layer's frequencies where layers rotate with RoPE of their own (MiMo-V2-Flash's sliding and full
    # layers, Granite's per-layer bases): None for a layer that uses inv_freq
    layer_inv_freq: tuple[tuple[float, ...] | None, ...] | None = None

    def __post_init__(self) -> None:
        tables = [self.inv_freq, *(f for f in self.layer_inv_freq or () if f is not None)]
        if not all(isinstance(f, float) and math.isfinite(f) and f > 0 for freq in tables for f in freq):
            raise ModelError("config.json: the rotary frequencies are not finite positive numbers (rope_theta?)")
        check_finite(rope_attention_scaling=self.attention_scaling)

    @property
    def rotary_dims(self) -> int:
        return 2 * len(self.inv_freq)


@dataclass(frozen=True)
class Attention:
    """The attention layers' quirks (their sizes are the model's: heads, key-value heads, head size)."""

    sliding_window: int | None = None  # every layer's window (None: full attention)
    layer_windows: tuple[int | None, ...] | None = None  # per-layer windows (GPT-OSS's layer_types)
    # "head": RMSNorm over each head (Qwen3); "projection": over all of q/k (OLMoE); "unit": over each
    # head without a weight, after RoPE, on the layers that rotate (Llama-4)
    qk_norm: str = "none"
    qk_norm_after_rope: bool = False  # the per-head norm applied to the rotated q and k (HunYuan)
    clip_qkv: float | None = None  # q, k, v clamped to [-clip, clip] after the norms (OLMoE)
    latent: LatentAttention | None = None  # DeepSeek's multi-head latent attention
    scale: float | None = None  # the scores' scale (None: head size ** -0.5; Granite's attention_multiplier)
    output_gate: bool = False  # q_proj also yields a per-head output gate (Qwen3-Next)
    value_head_dim: int | None = None  # each value head's size where it is not the key heads' (MiMo-V2-Flash)
    value_scale: float = 1.0  # the values times this before they are cached (MiMo-V2-Flash)
    layer_kv_heads: tuple[int, ...] | None = None  # each layer's key-value heads where layers differ (MiMo)

    def __post_init__(self) -> None:
        check_finite(optional=True, clip_qkv=self.clip_qkv, attention_scale=self.scale, value_scale=self.value_scale)
        for name, sizes in (("v_head_dim", (self.value_head_dim,)), ("key-value heads", self.layer_kv_heads or ())):
            if any(n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1) for n in sizes):
                raise ModelError(f"config.json: {name} must be integers > 0, got {list(sizes)}")
        for window in (self.sliding_window, *(self.layer_windows or ())):
            if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
                raise ModelError(f"config.json: a sliding window must be an integer > 0, got {window!r}")


@dataclass(frozen=True)
class Norms:
    """The layers' normalization: RMSNorm or LayerNorm with a bias (Phi-3.5-MoE, DBRX), its epsilon, and
    an offset added to the stored weights (x * (offset + w): Qwen3-Next's zero-centred weights, 1; the gated
    norm of a DeltaNet excepted)."""

    eps: float
    kind: str = "rms"  # or "layer"
    weight_offset: float = 0.0

    def __post_init__(self) -> None:
        check_finite(rms_norm_eps=self.eps, norm_weight_offset=self.weight_offset)
        if self.kind not in ("rms", "layer"):
            raise ModelError(f"config.json: unknown norm {self.kind!r}")


@dataclass(frozen=True)
class Block:
    """How a decoder layer's mixer and MLP join the residual stream (the usual: x + mixer(norm(x)), then
    the same for the MLP)."""

    # attention and MLP side by side on the same normed input, both added to the residual (Cohere):
    # no norm before the MLP, the router reads the attention's input norm
    parallel: bool = False
    # the attention's and the MLP's outputs normalized before their residual adds (FlexOlmo); with
    # pre_norms False their inputs are not normalized at all
    post_norms: bool = False
    pre_norms: bool = True
    # each adds its output to its own normed input, not to the stream before the norm (MiniMax):
    # h = alpha * norm(x) + beta * f(norm(x)), (alpha, beta) per layer for the mixer (`mixer_factors`)
    # and for the MLP (`mlp_factors`; the routed experts' beta is their routed scaling)
    from_norm: bool = False
    mixer_factors: tuple[tuple[float, float], ...] | None = None
    mlp_factors: tuple[float, float] = (1.0, 1.0)
    # layers whose block is its token mixer alone, without an MLP (Nemotron-H's Mamba2 and attention
    # blocks; its MLP and MoE blocks are layers without a mixer: Mixers.kinds "none")
    no_mlp: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        for alpha, beta in (*(self.mixer_factors or ()), self.mlp_factors):
            check_finite(residual_alpha=alpha, residual_beta=beta)


@dataclass(frozen=True)
class Mixers:
    """What mixes tokens in each layer besides attention, and the sizes of those mixers."""

    kinds: tuple[str, ...] | None = None  # each layer's token mixer (fate.artifacts.schema.MIXERS); None: attention
    conv_kernel: int = 0  # a short convolution's width L (its state is the last L - 1 inputs)
    linear_attention: LinearAttention | None = None  # the gated DeltaNet layers' sizes
    mamba: Mamba2 | None = None  # the Mamba2 layers' sizes
    mamba1: Mamba1 | None = None  # the Mamba (1) layers' sizes
    lightning: Lightning | None = None  # the lightning attention layers' sizes
    kda: KimiDelta | None = None  # the Kimi Delta Attention layers' sizes

    def __post_init__(self) -> None:
        if isinstance(self.conv_kernel, bool) or not isinstance(self.conv_kernel, int) or self.conv_kernel < 0:
            raise ModelError(f"config.json: conv_kernel must be an integer >= 0, got {self.conv_kernel!r}")


@dataclass(frozen=True)
class Routing:
    """How a MoE layer's router picks its experts and weighs them."""

    num_experts: int
    top_k: int
    normalize_top_k: bool  # the top-k weights divided by their sum
    scoring: str = "softmax"  # or "sparsemixer" (Phi-3.5-MoE, top-2) or "sigmoid" (DeepSeek-V3)
    routed_scaling: float = 1.0  # top-k weights multiplied by this (DeepSeek)
    group_topk: tuple[int, int] | None = None  # (groups, groups kept) before top-k (DeepSeek)
    # what ranks the groups under softmax: "max", each group's best score (DeepSeek-V2); "top2", the sum of
    # its two best (Mistral-4; sigmoid routing always ranks by the top two)
    group_score: str = "max"
    router_jitter_eps: float = 0.0  # sparsemixer's mask threshold
    layer_top_k: tuple[int, ...] | None = None  # per-layer top-k (HunYuan's moe_topk list); top_k is their largest
    topk_norm_eps: float = 1e-20  # added to the sum of the top-k sigmoid weights before dividing (LFM2: 1e-6)
    # the experts run on their input times the router's weight and their output is not weighed again
    # (Llama-4); with one expert a token the layer graph hands the runtime that product as the input
    scaled_input: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"config.json: {name} must be an integer >= 1, got {value!r}")
        check_finite(routed_scaling=self.routed_scaling, router_jitter_eps=self.router_jitter_eps,
                     topk_norm_eps=self.topk_norm_eps)
        if self.top_k > self.num_experts:
            raise ModelError(f"config.json: top-{self.top_k} routing over {self.num_experts} experts")
        if self.scaled_input and (self.top_k != 1 or self.layer_top_k is not None):
            # each chosen expert would take its own scaled copy of the input: Fate hands one input a token
            raise ModelError(f"config.json: num_experts_per_tok = {self.top_k} with experts on the router-scaled "
                             f"input is not supported (only 1, as Llama-4 ships)")


@dataclass(frozen=True)
class ArchConfig:
    """config.json, read into the numbers the exporter needs (names differ across families)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    norms: Norms
    max_positions: int
    positions: Positions
    routing: Routing
    moe_intermediate_size: int
    dense_intermediate_size: int
    shared_intermediate_size: int
    moe_layers: frozenset[int]
    tie_word_embeddings: bool
    eos_token_ids: list[int] = field(default_factory=list)
    attention: "Attention" = field(default_factory=lambda: Attention())  # the attention layers' quirks
    # Granite's multipliers (1.0 elsewhere): embeddings x, each branch's output x before the residual
    # add, logits / logits_scaling (and attention scores: Attention.scale)
    # GPT-OSS's clamped SwiGLU: (clamp(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # the MLPs' (experts, shared, dense) activation: "swiglu", down(silu(gate(x)) * up(x)); "relu2", without a
    # gate, down(relu(up(x))²) (Nemotron-H)
    mlp_activation: str = "swiglu"
    moe_latent_size: int = 0  # the routed experts' width where they run in a latent space (0: the hidden size)
    block: "Block" = field(default_factory=lambda: Block())  # how the mixer and the MLP join the residual stream
    shared_scale: float = 1.0  # the shared experts' output times this (Cohere's "average": 0.5, routed too)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    bos_token_id: int | None = None
    # decoder layers stored after the last one that generation does not run: multi-token-prediction
    # modules (GLM-4.5's and DeepSeek-V3's `num_nextn_predict_layers`); their tensors are skipped
    unused_trailing_layers: int = 0
    mixers: "Mixers" = field(default_factory=lambda: Mixers())  # what mixes tokens besides attention

    # Whatever the family's table read, the numbers the exporter and the runtime rely on are checked
    # here, once for every family: a config with zero heads or a string sliding window is refused by
    # name instead of compiling into an artifact the runtime cannot run.
    POSITIVE = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_positions",
                "moe_intermediate_size")
    NON_NEGATIVE = ("dense_intermediate_size", "shared_intermediate_size", "unused_trailing_layers", "moe_latent_size")
    FINITE = ("swiglu_alpha", "embedding_multiplier", "residual_multiplier", "logits_scaling", "shared_scale")

    def __post_init__(self) -> None:
        for name in self.POSITIVE + self.NON_NEGATIVE:
            value = getattr(self, name)
            least = 1 if name in self.POSITIVE else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ModelError(f"config.json: {name} must be an integer >= {least}, got {value!r}")
        check_finite(optional=True, **{name: getattr(self, name) for name in self.FINITE + ("swiglu_limit",)})
        if self.mlp_activation not in ("swiglu", "relu2") or (self.mlp_activation == "relu2" and self.swiglu_limit):
            raise ModelError(f"config.json: MLP activation {self.mlp_activation!r} is not supported (silu or relu2)")
        for kv in {self.num_kv_heads, *(self.attention.layer_kv_heads or ())}:
            if self.num_heads % kv:
                raise ModelError(f"config.json: {self.num_heads} attention heads are not a multiple of "
                                 f"{kv} key/value heads")
        for name, per_layer in (("key-value heads", self.attention.layer_kv_heads),
                                ("RoPE tables", self.positions.layer_inv_freq)):
            if per_layer is not None and len(per_layer) != self.num_layers:
                raise ModelError(f"config.json: {len(per_layer)} layers' {name} for {self.num_layers} layers")
        r = self.routing
        if r.layer_top_k is not None and (len(r.layer_top_k) != self.num_layers or any(
                isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r.num_experts
                for k in r.layer_top_k)):
            raise ModelError(f"config.json: a per-layer top-k must give each of the {self.num_layers} layers a count "
                             f"from 1 to {r.num_experts}, got {list(r.layer_top_k)}")
        if not self.moe_layers:
            raise ModelError("config.json: no layer is a Mixture-of-Experts layer: a dense model, which Fate does not "
                             "compile (it runs as it is in llama.cpp or transformers)")
        if any(not 0 <= layer < self.num_layers for layer in self.moe_layers | self.block.no_mlp):
            raise ModelError("config.json: a MoE (or MLP-less) layer index is outside the model's layers")
        if self.moe_layers & self.block.no_mlp or any(self.mixer(i) == "none" for i in self.block.no_mlp):
            raise ModelError("config.json: a layer is listed both as MoE and without an MLP, or has neither a mixer "
                             "nor an MLP")
        m = self.mixers
        if m.kinds is not None:
            if len(m.kinds) != self.num_layers or not set(m.kinds) <= set(MIXERS):
                raise ModelError(f"config.json: layer types must name one of {', '.join(MIXERS)} per layer "
                                 f"({self.num_layers})")
            if "short_conv" in m.kinds and m.conv_kernel < 1:
                raise ModelError(f"config.json: a short convolution of width {m.conv_kernel}")
            for mixer, sizes in (("gated_deltanet", m.linear_attention), ("mamba", m.mamba1),
                                 ("mamba2", m.mamba), ("lightning", m.lightning), ("kda", m.kda)):
                if mixer in m.kinds and sizes is None:  # each is checked when read (MixerSizes)
                    raise ModelError(f"config.json: {mixer} layers without their sizes")

    def check_rotary(self) -> None:
        """RoPE rotates pairs of dims: refuse more of them than a head holds (checked once the family
        has set its positions, which families without any clear)."""
        rotary = max(2 * len(f) for f in (self.positions.inv_freq, *(self.positions.layer_inv_freq or ())) if f is not None)
        if self.attention.latent is None and rotary > self.head_dim:
            raise ModelError(f"config.json: RoPE rotates pairs of dims, {rotary} of a head of "
                             f"{self.head_dim} (an odd head size rotated in full: transformers cannot run it either)")

    def with_positions(self, **changes) -> "ArchConfig":
        return replace(self, positions=replace(self.positions, **changes))

    def top_k_at(self, layer: int) -> int:
        r = self.routing
        return r.layer_top_k[layer] if r.layer_top_k is not None else r.top_k

    def at_layer(self, layer: int) -> "ArchConfig":
        """The config as one layer sees it: its own top-k, key-value heads and RoPE where they differ by
        layer (in the record it returns, num_kv_heads and positions.inv_freq are that layer's)."""
        r, a, p = self.routing, self.attention, self.positions
        cfg = self if r.layer_top_k is None else replace(self, routing=replace(r, top_k=self.top_k_at(layer)))
        if a.layer_kv_heads is not None:
            cfg = replace(cfg, num_kv_heads=a.layer_kv_heads[layer], attention=replace(a, layer_kv_heads=None))
        if p.layer_inv_freq is not None:
            own = p.layer_inv_freq[layer]
            cfg = cfg.with_positions(inv_freq=p.inv_freq if own is None else list(own), layer_inv_freq=None)
        return cfg

    @property
    def expert_width(self) -> int:
        """What a routed expert reads and writes: the hidden size, or its latent space."""
        return self.moe_latent_size or self.hidden_size

    @property
    def gated(self) -> bool:
        """Whether the MLPs have a gate projection (SwiGLU), or only up and down (relu2)."""
        return self.mlp_activation == "swiglu"

    @property
    def expert_activation(self) -> str:
        """The experts' activation as the slot layout names it (native_contract.ACTIVATIONS)."""
        return "relu2" if not self.gated else "swiglu" if self.swiglu_limit is None else "swiglu_clamped"

    @property
    def value_dim(self) -> int:
        """What one value head holds (the key heads' size unless the family says otherwise)."""
        return self.attention.value_head_dim or self.head_dim

    def mixer(self, layer: int) -> str:
        return self.mixers.kinds[layer] if self.mixers.kinds else "attention"


# Names most families share (Llama-style layout), to start a family's table from.
LAYER = "model.layers.{layer}"
STANDARD_TENSORS = {
    Role.EMBED: "model.embed_tokens.weight",
    Role.FINAL_NORM: "model.norm.weight",
    Role.LM_HEAD: "lm_head.weight",
    Role.ATTN_NORM: LAYER + ".input_layernorm.weight",
    Role.Q: LAYER + ".self_attn.q_proj.weight",
    Role.K: LAYER + ".self_attn.k_proj.weight",
    Role.V: LAYER + ".self_attn.v_proj.weight",
    Role.O: LAYER + ".self_attn.o_proj.weight",
    Role.MLP_NORM: LAYER + ".post_attention_layernorm.weight",
}
# Attention biases, for the families whose projections may have them (used when present).
ATTENTION_BIASES = {
    Role.Q_BIAS: LAYER + ".self_attn.q_proj.bias",
    Role.K_BIAS: LAYER + ".self_attn.k_proj.bias",
    Role.V_BIAS: LAYER + ".self_attn.v_proj.bias",
    Role.O_BIAS: LAYER + ".self_attn.o_proj.bias",
}
# The MLP module names most families share: routed experts one by one, shared experts without a
# gate (DeepSeek's layout), and the dense MLP of layers that are not MoE.
MLP_EXPERTS = {
    Role.EXPERT_GATE: LAYER + ".mlp.experts.{expert}.gate_proj.weight",
    Role.EXPERT_UP: LAYER + ".mlp.experts.{expert}.up_proj.weight",
    Role.EXPERT_DOWN: LAYER + ".mlp.experts.{expert}.down_proj.weight",
}
SHARED_EXPERTS = {
    Role.SHARED_GATE: LAYER + ".mlp.shared_experts.gate_proj.weight",
    Role.SHARED_UP: LAYER + ".mlp.shared_experts.up_proj.weight",
    Role.SHARED_DOWN: LAYER + ".mlp.shared_experts.down_proj.weight",
}
DENSE_MLP = {
    Role.DENSE_GATE: LAYER + ".mlp.gate_proj.weight",
    Role.DENSE_UP: LAYER + ".mlp.up_proj.weight",
    Role.DENSE_DOWN: LAYER + ".mlp.down_proj.weight",
}
STANDARD_SKIP = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class this family matches
    tensors: dict[Role, str]  # name templates with {layer} and {expert}
    read_config: Callable[[dict[str, Any]], ArchConfig]
    skip: tuple[str, ...] = ()  # regexes of checkpoint tensors that carry nothing we need
    layouts: tuple = ()  # layouts.Layout: roles stored otherwise than one tensor each

    def layout_of(self, role: Role):
        """The layout that stores `role`, or None where the role is its own tensor."""
        return next((layout for layout in self.layouts if role in layout.roles), None)

    def name(self, role: Role, layer: int | None = None, expert: int | None = None) -> str | None:
        template = self.tensors.get(role)
        return None if template is None else template.format(layer=layer, expert=expert)

    def skipped(self, name: str) -> bool:
        return any(re.fullmatch(pattern, name) for pattern in self.skip)

    def loaded_as(self, config_names: dict[str, str], defaults: dict[str, Any] | None = None,
                  tensors: dict[Role, str] | None = None, layouts: tuple = ()) -> "Family":
        """This family for a model type that transformers loads with this family's classes, whose
        original configs name some keys otherwise (`config_names`: their name -> this family's), whose
        config class defaults some keys otherwise (`defaults`, used where a config is silent), and whose
        checkpoints keep their original tensor names (`tensors`, over this family's) and layouts
        (`layouts`, before this family's: what transformers' weight conversion undoes on load)."""
        def read(cfg: dict[str, Any]) -> ArchConfig:
            renamed = {config_names.get(k, k): v for k, v in cfg.items() if config_names.get(k, k) not in cfg
                       or k not in config_names}
            return self.read_config({**(defaults or {}), **renamed})
        return dataclasses.replace(self, read_config=read, tensors={**self.tensors, **(tensors or {})},
                                   layouts=(*layouts, *self.layouts))


# ------------------------------------------------------------------ config helpers for families


def require(cfg: dict[str, Any], key: str, kind: type | tuple = int) -> Any:
    """cfg[key], which must be set and of `kind` (never a bool)."""
    value = optional(cfg, key, None, kind)
    if value is None:
        raise ModelError(f"config.json: {key!r} is missing")
    return value


def optional(cfg: dict[str, Any], key: str, default: Any, kind: type | tuple = int) -> Any:
    """cfg[key] when set (None or absent: `default`), checked to be `kind` (never a bool)."""
    value = cfg.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ModelError(f"config.json: {key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def layer_set(cfg: dict[str, Any], key: str) -> set[int]:
    """A config's list of layer indices (`mlp_only_layers`), checked: integers, or none."""
    value = cfg.get(key) or []
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
        raise ModelError(f"config.json: {key} must list layer indices, got {value!r}")
    return set(value)


def check_activation(cfg: dict[str, Any], key: str = "hidden_act") -> None:
    if cfg.get(key, "silu") != "silu":
        raise ModelError(f"config.json: {key} = {cfg[key]!r} is not supported (only 'silu')")


# A config's sizes, by the ending of their key: a number past these is no real model's, and reading it
# on (RoPE tables, weight shapes) would allocate without bound. Checked before a family reads anything.
SIZE_KEYS = re.compile(r"(_size|_dim|_heads|_rank|^d_model|^n_heads|_experts|_k|topk|_top_k|_per_tok|_groups?)$")
LAYER_KEYS = re.compile(r"(_layers|^n_layers)$")


def check_sizes(cfg: Any, where: str = "config.json") -> None:
    """Refuse (one line naming the key) an integer size beyond any real model's anywhere in the config
    (nested objects too, such as DBRX's attn_config): hidden and head sizes, head, expert and top-k
    counts at most MAX_DIM, layer counts at most MAX_LAYERS."""
    from fate.artifacts.schema import MAX_DIM, MAX_LAYERS

    if not isinstance(cfg, dict):
        return
    for key, value in cfg.items():
        if isinstance(value, dict):
            check_sizes(value, f"{where}: {key}")
            continue
        most = MAX_LAYERS if LAYER_KEYS.search(str(key)) else MAX_DIM if SIZE_KEYS.search(str(key)) else None
        values = value if isinstance(value, list) else [value]
        for v in values:
            if most is not None and isinstance(v, int) and not isinstance(v, bool) and v > most:
                raise ModelError(f"{where}: {key} = {v} is beyond any model's (at most {most})")


def rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config's RoPE parameters: transformers 5's `rope_parameters`, else the older
    `rope_scaling`, else none; anything but an object is one line."""
    key = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    params = cfg.get(key) or {}
    if not isinstance(params, dict):
        raise ModelError(f"config.json: {key} must be an object, got {params!r}")
    return dict(params)


def rope_from_config(cfg: dict[str, Any], head_dim: int) -> tuple[list[float], float]:
    """(inv_freq, attention_scaling) for the config's RoPE, computed once at compile time so the
    runtime needs no knowledge of RoPE variants. transformers 5 keeps the parameters in
    `rope_parameters`; older configs use `rope_theta` and `rope_scaling`."""
    params = rope_params(cfg)
    theta = optional(params, "rope_theta", optional(cfg, "rope_theta", 10000.0, (int, float)), (int, float))
    rope_type = params.get("rope_type", params.get("type", "default"))
    # transformers 5 writes partial_rotary_factor into rope_parameters; hub configs keep it at the top
    partial = optional(params, "partial_rotary_factor", optional(cfg, "partial_rotary_factor", 1.0, (int, float)),
                       (int, float))
    if not (math.isfinite(theta) and theta > 0 and 0 < partial <= 1):
        raise ModelError(f"config.json: rope_theta {theta!r} and partial_rotary_factor {partial!r} must be a "
                         f"finite number > 0 and a share in (0, 1]")
    dim = int(head_dim * partial)
    if rope_type == "default":
        import numpy as np

        inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        return [float(v) for v in inv_freq], 1.0
    if rope_type in ("dynamic", "longrope"):  # a family that can pin longrope down does so itself
        raise ModelError(f"config.json: rope type {rope_type!r} changes with sequence length; not supported yet")
    return rope_from_transformers(cfg, rope_type)


def rope_from_transformers(cfg: dict[str, Any], rope_type: str) -> tuple[list[float], float]:
    """Static RoPE variants (linear, llama3, yarn, ...): transformers' own init functions."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelError(f"config.json: unknown rope type {rope_type!r}")
    try:  # transformers checks every field of the config as it builds it: a bad one is its message, in one line
        config = AutoConfig.for_model(**cfg)
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    except Exception as e:  # noqa: BLE001 - huggingface_hub's validation errors derive from Exception alone
        detail = " ".join(str(e).split())[:300]
        raise ModelError(f"config.json: transformers cannot read it for its {rope_type} RoPE: {detail}") from None
    return [float(v) for v in inv_freq.tolist()], float(scaling)


def common_fields(cfg: dict[str, Any], rope_dim: int | None = None) -> dict[str, Any]:
    """The ArchConfig fields every family reads from the same config keys (after checking the
    activation): sizes, norms, positions and RoPE (over `rope_dim`, default the head size),
    tied embeddings and special tokens. Families add their MoE fields and override the rest."""
    check_activation(cfg)
    hidden, heads = require(cfg, "hidden_size"), require(cfg, "num_attention_heads")
    if heads <= 0 or hidden <= 0:
        raise ModelError(f"config.json: hidden_size {hidden} and num_attention_heads {heads} must be > 0")
    head_dim = optional(cfg, "head_dim", 0) or hidden // heads
    inv_freq, scaling = rope_from_config(cfg, rope_dim or head_dim)
    return dict(
        hidden_size=hidden,
        num_layers=require(cfg, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=optional(cfg, "num_key_value_heads", 0) or heads,
        head_dim=head_dim,
        vocab_size=require(cfg, "vocab_size"),
        norms=Norms(eps=require(cfg, "rms_norm_eps", float)),
        max_positions=require(cfg, "max_position_embeddings"),
        positions=Positions(inv_freq, scaling),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=token_ids(cfg.get("eos_token_id")),
        bos_token_id=optional(cfg, "bos_token_id", None),
    )


def per_layer_types(types: Any, key: str, allowed, layers: int) -> list[str]:
    """A config's list of per-layer type names (`layer_types`, `mlp_layer_types`), checked: one of
    `allowed` for each layer."""
    if not isinstance(types, list) or len(types) != layers or any(
            not isinstance(t, str) or t not in allowed for t in types):
        raise ModelError(f"config.json: {key} must list one of {', '.join(allowed)} for each of the {layers} "
                         f"layers, got {types!r}")
    return types


def mixers_of_types(types: Any, mixer_of_type: dict[str, str], layers: int) -> tuple[str, ...]:
    """Each layer's token mixer from a config's list of layer types (hybrid families), one per layer."""
    return tuple(mixer_of_type[t] for t in per_layer_types(types, "layer_types", mixer_of_type, layers))


def layer_windows(cfg: dict[str, Any]) -> tuple[int | None, ...]:
    """Per-layer sliding windows from transformers' `layer_types` (None: full attention)."""
    layers = require(cfg, "num_hidden_layers")
    types = cfg.get("layer_types") or ["full_attention"] * layers
    if not isinstance(types, list) or len(types) != layers or not all(isinstance(t, str) for t in types):
        raise ModelError(f"config.json: layer_types must name a type for each of the {layers} layers, got {types!r}")
    window = cfg.get("sliding_window")
    return tuple(window if t == "sliding_attention" else None for t in types)


def token_ids(value: Any) -> list[int]:
    """A config's token id or list of ids (eos_token_id may be either); anything else is refused."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ModelError(f"a token id must be an integer >= 0 (or a list of them), got {value!r}")
    return list(values)
