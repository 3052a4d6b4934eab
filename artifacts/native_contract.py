"""The vectors the native code reads (runtime/native/kernel.h), declared once: each field's name in the
order of its C enum, and the tensors whose offsets follow it. The runtime builds every vector from these
tables (`vector`), artifacts/slots.py checks the tensors by these names, and tests/test_native_kernel.py
holds kernel.h's enums to them, so Python and C cannot disagree on an order without a test failing.

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
ACTIVATIONS = ("swiglu", "swiglu_clamped")  # the kernel's ACT_ codes, in order
LAYOUT = Contract("L_", (
    ("hidden", "HIDDEN"), ("inter", "INTER"), ("bits", "BITS"), ("block", "BLOCK"), ("accuracy", "ACCURACY"),
    ("activation", "ACTIVATION"), ("has_bias", "HAS_BIAS"),
), "", tuple((f"{proj}.{part}", f"{proj}_{c}") for proj in PROJECTIONS for part, c in TENSOR_PARTS))
