"""The native code's contract (runtime/native/kernel.h), declared once: the records a manifest keeps of
what it runs (an expert's slot layout, a layer's decode step, the head's; the routing they follow), and
the vectors it reads: each field's name in the order of its C enum, and the tensors whose offsets follow
it. The runtime builds every vector from these tables (`vector`), artifacts/slots.py checks the tensors
by these names, and tests/test_native_kernel.py holds kernel.h's enums to them, so Python and C cannot
disagree on an order without a test failing.

A table is (python name, C name) pairs; the C names are the enum's without its prefix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Contract:
    """One int64 vector: `fields` then, where `tensors` is not empty, one byte offset per tensor (-1: absent)."""

    prefix: str  # the C enum's prefix for fields (S_, L_, H_)
    fields: tuple[tuple[str, str], ...]
    tensor_prefix: str = ""  # the C enum's prefix for tensors (T_), where they have their own enum
    tensors: tuple[tuple[str, str], ...] = ()

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.tensors)

    def vector(self, values: dict[str, int], offsets: dict[str, int]) -> list[int]:
        """The vector for `values` (every field, by name) and tensor `offsets` (by name; missing: -1)."""
        if set(values) != set(self.field_names):
            wrong = sorted(set(values) ^ set(self.field_names))
            raise ValueError(f"{self.prefix} vector: fields {wrong} missing or unknown")
        unknown = set(offsets) - set(self.tensor_names)
        if unknown:
            raise ValueError(f"{self.prefix} vector: tensors {sorted(unknown)} are not in the contract")
        return [int(values[name]) for name in self.field_names] + [offsets.get(name, -1) for name in self.tensor_names]


# What a decode step normalizes q and k with before RoPE (its `qk_norm` field's values, in order)
QK_NORMS = ("none", "head", "projection")
# How its router scores experts (its `scoring` field's values, in order)
STEP_SCORINGS = ("softmax", "sigmoid")

# One decoder layer's decode step (fate_step.v): sizes and routing, then the tensors of its graph file.
STEP = Contract("S_", (
    ("hidden", "HIDDEN"), ("heads", "HEADS"), ("kv_heads", "KV_HEADS"), ("head_dim", "HEAD_DIM"),
    ("rot_half", "ROT_HALF"), ("experts", "EXPERTS"), ("top_k", "TOP_K"), ("next_experts", "NEXT_EXPERTS"),
    ("shared_inter", "SHARED_INTER"), ("bits", "BITS"), ("block", "BLOCK"), ("int8", "INT8"),
    ("normalize", "NORMALIZE"), ("window", "WINDOW"), ("qk_norm", "QK_NORM"), ("scoring", "SCORING"),
    ("groups", "GROUPS"), ("kept", "KEPT"),
), "T_", (
    ("attn_norm", "ATTN_NORM"), ("qkv.qweight", "QKV_W"), ("qkv.scales", "QKV_S"), ("qkv.zero_points", "QKV_Z"),
    ("qkv.bias", "QKV_B"), ("o.qweight", "O_W"), ("o.scales", "O_S"), ("o.zero_points", "O_Z"),
    ("mlp_norm", "MLP_NORM"), ("router", "ROUTER"), ("shared_gate_up.qweight", "GU_W"),
    ("shared_gate_up.scales", "GU_S"), ("shared_gate_up.zero_points", "GU_Z"), ("shared_down.qweight", "DOWN_W"),
    ("shared_down.scales", "DOWN_S"), ("shared_down.zero_points", "DOWN_Z"), ("shared_expert_gate", "SHARED_GATE"),
    ("next_router", "NEXT_ROUTER"), ("next_norm", "NEXT_NORM"), ("q_norm", "Q_NORM"), ("k_norm", "K_NORM"),
    ("score_bias", "SCORE_BIAS"), ("next_score_bias", "NEXT_SCORE_BIAS"), ("o.bias", "O_B"),
))

# The LM head's step (fate_run_head's v): sizes, then its tensors' offsets in the same enum.
HEAD = Contract("H_", (
    ("hidden", "HIDDEN"), ("vocab", "VOCAB"), ("bits", "BITS"), ("block", "BLOCK"), ("int8", "INT8"),
), "H_", (
    ("final_norm", "NORM"), ("lm_head.qweight", "QWEIGHT"), ("lm_head.scales", "SCALES"),
    ("lm_head.zero_points", "ZEROS"), ("lm_head.bias", "BIAS"),
))

# An expert's layout (fate_layout, from the L_ vector): sizes, then each projection's tensors.
PROJECTIONS = ("gate", "up", "down")
TENSOR_PARTS = (("qweight", "QWEIGHT"), ("scales", "SCALES"), ("zero_points", "ZEROS"), ("bias", "BIAS"))
ACTIVATIONS = ("swiglu", "swiglu_clamped", "relu2")  # the kernel's ACT_ codes, in order
GATED = frozenset({"swiglu", "swiglu_clamped"})  # the activations that read a gate projection (relu2: none)
LAYOUT = Contract("L_", (
    ("hidden", "HIDDEN"), ("inter", "INTER"), ("bits", "BITS"), ("block", "BLOCK"), ("accuracy", "ACCURACY"),
    ("activation", "ACTIVATION"), ("has_bias", "HAS_BIAS"),
), "", tuple((f"{proj}.{part}", f"{proj}_{c}") for proj in PROJECTIONS for part, c in TENSOR_PARTS))


# ---------------------------------------------------------------------- the manifest's records of it
# (artifacts/schema.py reads and writes them; artifacts/slots.py checks them against the files)

@dataclass(frozen=True)
class RoutingSpec:
    """How a layer's router turns logits into (expert ids, weights); the layer graph computes it."""

    scoring: str
    num_experts: int
    top_k: int
    normalize_top_k: bool


@dataclass(frozen=True)
class TensorView:
    """Where one weight tensor's raw bytes lie inside an expert file (little-endian, C order)."""

    name: str  # "{gate|up|down}.{qweight|scales|zero_points|bias}"
    offset: int
    dtype: str  # uint8 or float32
    shape: list[int]


@dataclass(frozen=True)
class ExpertLayout:
    """The slot image of a layer's experts at one quantized precision: what an expert computes
    and where its tensors lie in its file, so that the file read whole is the expert, viewed in
    place (see slots.py). y = down(act(gate(x), up(x))), each projection MatMulNBits-quantized; a
    non-gated activation (relu2: relu(up(x))², Nemotron-H) has no gate projection."""

    hidden_size: int
    intermediate_size: int
    bits: int
    block_size: int
    accuracy_level: int  # 4: activations quantized to int8 per block; 0: float32
    activation: str  # swiglu: silu(g) * u; swiglu_clamped: GPT-OSS's form with limit and alpha; relu2: relu(u)²
    has_bias: bool
    tensors: list[TensorView]
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None


@dataclass(frozen=True)
class DecodeStep:
    """A layer the native step computes for one token straight from the bytes of its graph file: RMSNorm,
    q|k|v (+ bias, + a norm per head of q and k), RoPE in two halves from the position tables, grouped-query attention over the keys
    and values (within the layer's window), o, the residual; RMSNorm, a float32 softmax router and its
    top-k; the shared expert (SwiGLU, optional sigmoid gate); the next layer's router (cross-layer
    prediction). The same numbers as the graph to float32 rounding (the graph is the reference, and
    what prefill runs). `tensors` place slots.STEP_TENSORS in the graph file; the compiler writes a
    step only where the graph computes exactly this."""

    bits: int
    block_size: int
    accuracy_level: int  # 4: activations quantized to int8 per block, as MatMulNBits does
    attention_scale: float
    norm_eps: float
    shared_intermediate_size: int  # 0: no shared expert
    shared_scale: float
    routed_scaling: float
    qkv_bias: bool
    shared_expert_gate: bool
    next_norm: bool  # the next router reads this layer's stream through the next layer's own norm
    tensors: list[TensorView]
    qk_norm: str = "none"  # RMSNorm of q and k before RoPE: over each "head" (Qwen3-MoE), or the whole "projection"
    clip_qkv: float | None = None  # q, k, v clamped to [-clip, clip] after the projection norms (OLMoE)
    # sigmoid routing (RoutingSpec.scoring): experts chosen by score + correction bias (`score_bias`) within
    # the best groups [groups, kept] (a group's score: the sum of its two best), weighted by the plain
    # score, renormalized with `topk_norm_eps`; the next layer's prediction is its sigmoid score + its bias
    score_bias: bool = False
    next_score_bias: bool = False
    o_bias: bool = False  # the output projection's bias
    group_topk: list[int] | None = None
    topk_norm_eps: float = 0.0


@dataclass(frozen=True)
class HeadStep:
    """The LM head the native step computes for one token from the bytes of the head graph: logits =
    RMSNorm(hidden) @ lm_head^T (+ bias) / logits_scaling. `tensors` place `final_norm`, `lm_head.*`
    (MatMulNBits' layout) and `lm_head.bias` in the head graph file."""

    bits: int
    block_size: int
    accuracy_level: int
    norm_eps: float
    logits_scaling: float
    has_bias: bool
    tensors: list[TensorView]
