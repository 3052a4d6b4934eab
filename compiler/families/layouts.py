"""How a family's checkpoint stores the tensors that are not one per role: objects a family's table
lists (`Family.layouts`), each owning some roles, the shapes config.json implies for them as stored,
and how one role's tensor is read out of what is stored. The reader (compiler/export.py WeightReader)
asks the layout that owns a role, and otherwise reads the role's own tensor: no family's layout is a
branch in the shared reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .base import EXPERT_ROLES, ArchConfig, Role

if TYPE_CHECKING:  # the reader calls the layouts; they read through it
    from ..export import WeightReader


class Layout:
    """One way of storing some roles. `roles`: those it owns; `shapes`: theirs as stored."""

    roles: frozenset[Role] = frozenset()

    def shapes(self, c: ArchConfig) -> dict[Role, tuple[int, ...]]:
        return {}

    def read(self, r: "WeightReader", role: Role, layer: int | None, expert: int | None) -> np.ndarray:
        raise NotImplementedError


@dataclass(frozen=True)
class QKVRows(Layout):
    """q, k and v (and their biases) in one tensor, rows [q | k | v] (DBRX's Wqkv, Sarvam's query_key_value)."""

    roles = frozenset({Role.Q, Role.K, Role.V, Role.Q_BIAS, Role.K_BIAS, Role.V_BIAS})
    _PART = {Role.Q: "q", Role.K: "k", Role.V: "v", Role.Q_BIAS: "q", Role.K_BIAS: "k", Role.V_BIAS: "v"}

    def shapes(self, c: ArchConfig) -> dict[Role, tuple[int, ...]]:
        rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        return {role: (rows, c.hidden_size) if role in (Role.Q, Role.K, Role.V) else (rows,) for role in self.roles}

    def read(self, r, role, layer, expert):
        c = r.cfg
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[self._PART[role]]
        return r.ckpt.get(r.check(role, layer))[start:start + size]


@dataclass(frozen=True)
class SharedGateUpRows(Layout):
    """The shared expert's gate and up in one tensor, gate rows first (Granite)."""

    roles = frozenset({Role.SHARED_GATE, Role.SHARED_UP})

    def shapes(self, c: ArchConfig) -> dict[Role, tuple[int, ...]]:
        return {role: (2 * c.shared_intermediate_size, c.hidden_size) for role in self.roles}

    def read(self, r, role, layer, expert):
        gate_up = r.ckpt.get(r.check(role, layer))
        half = gate_up.shape[0] // 2
        return gate_up[:half] if role == Role.SHARED_GATE else gate_up[half:]


@dataclass(frozen=True)
class QueryWithGate(Layout):
    """q_proj yielding each head's query rows, then its output gate's ([heads, 2 D, H]: Qwen3-Next)."""

    roles = frozenset({Role.Q, Role.Q_GATE})

    def shapes(self, c: ArchConfig) -> dict[Role, tuple[int, ...]]:
        return {role: (2 * c.num_heads * c.head_dim, c.hidden_size) for role in self.roles}

    def read(self, r, role, layer, expert):
        c = r.cfg
        both = r.ckpt.get(r.check(role, layer)).reshape(c.num_heads, 2, c.head_dim, -1)
        return both[:, 0 if role == Role.Q else 1].reshape(c.num_heads * c.head_dim, -1)


@dataclass(frozen=True)
class FusedLinearAttention(Layout):
    """Qwen3-Next's in_proj_qkvz ([key heads, q | k | v | z of the group, H]) and in_proj_ba ([key heads,
    b | a of the group, H]), read as whole q|k|v, z, b and a rows; value heads keep their order
    (group-major, as transformers reshapes them)."""

    roles = frozenset({Role.LINEAR_QKV, Role.LINEAR_Z, Role.LINEAR_B, Role.LINEAR_A})

    def shapes(self, c: ArchConfig) -> dict[Role, tuple[int, ...]]:
        m, h = c.mixers.linear_attention, c.hidden_size
        both = (m.conv_dim + m.value_dim, h)
        return {Role.LINEAR_QKV: both, Role.LINEAR_Z: both, Role.LINEAR_B: (2 * m.num_value_heads, h),
                Role.LINEAR_A: (2 * m.num_value_heads, h)}

    def read(self, r, role, layer, expert):
        m = r.cfg.mixers.linear_attention
        group = m.num_value_heads // m.num_key_heads
        if role in (Role.LINEAR_B, Role.LINEAR_A):
            ba = r.ckpt.get(r.check(role, layer)).reshape(m.num_key_heads, 2 * group, -1)
            return np.ascontiguousarray(ba[:, :group] if role == Role.LINEAR_B else ba[:, group:]).reshape(
                m.num_value_heads, -1)
        qkvz = r.ckpt.get(r.check(role, layer)).reshape(m.num_key_heads, -1, r.cfg.hidden_size)
        dk, v = m.key_head_dim, group * m.value_head_dim
        if role == Role.LINEAR_Z:
            return np.ascontiguousarray(qkvz[:, 2 * dk + v:]).reshape(m.value_dim, -1)
        parts = (qkvz[:, :dk], qkvz[:, dk:2 * dk], qkvz[:, 2 * dk:2 * dk + v])
        return np.concatenate([p.reshape(-1, r.cfg.hidden_size) for p in parts])


@dataclass(frozen=True)
class FusedExperts(Layout):
    """A layer's routed experts in a few tensors, one expert's block read at a time: "rows", gate_up
    [E, 2I, H] gate rows then up rows and down [E, H, I] (Granite); "columns", gate_up [E, H, 2I] gate
    columns then up columns and down [E, I, H] (Llama-4); "interleaved", gate_up [E, H, 2I] with gate and
    up alternating by column and down [E, I, H], with biases, or as MXFP4 blocks and scales (GPT-OSS);
    "stacked", gate, up and down transposed each [E * I, H] (DBRX's w1, v1, w2)."""

    kind: str = "rows"
    roles = frozenset(EXPERT_ROLES)

    def shapes(self, c: ArchConfig) -> dict[Role, tuple[int, ...]]:
        e, h, i = c.routing.num_experts, c.hidden_size, c.moe_intermediate_size
        if self.kind == "stacked":
            return {Role.EXPERTS_GATE_UP: (e * i, h), Role.EXPERTS_UP: (e * i, h), Role.EXPERTS_DOWN: (e * i, h)}
        rows = self.kind == "rows"
        return {Role.EXPERTS_GATE_UP: (e, 2 * i, h) if rows else (e, h, 2 * i),
                Role.EXPERTS_DOWN: (e, h, i) if rows else (e, i, h)}

    def stored(self, r: "WeightReader", layer: int) -> tuple[Role, ...]:
        """The roles a MoE layer's experts are read from."""
        if r.mxfp4(layer):
            return (Role.EXPERTS_GATE_UP_BLOCKS, Role.EXPERTS_GATE_UP_SCALES, Role.EXPERTS_DOWN_BLOCKS,
                    Role.EXPERTS_DOWN_SCALES)
        return (Role.EXPERTS_GATE_UP, Role.EXPERTS_DOWN) + ((Role.EXPERTS_UP,) if self.kind == "stacked" else ())

    def read(self, r, role, layer, expert):
        if r.mxfp4(layer):
            return r.mxfp4_expert(role, layer, expert)
        if self.kind == "stacked":  # [E * I, H] each; down stored transposed
            source = {Role.EXPERT_GATE: Role.EXPERTS_GATE_UP, Role.EXPERT_UP: Role.EXPERTS_UP,
                      Role.EXPERT_DOWN: Role.EXPERTS_DOWN}[role]
            block = r.ckpt.get(r.check(source, layer), index=expert, parts=r.cfg.routing.num_experts)
            return np.ascontiguousarray(block.T) if role == Role.EXPERT_DOWN else block
        by_column = self.kind in ("interleaved", "columns")
        if role == Role.EXPERT_DOWN:
            down = r.ckpt.get(r.check(Role.EXPERTS_DOWN, layer), index=expert)
            return np.ascontiguousarray(down.T) if by_column else down
        gate_up = r.ckpt.get(r.check(Role.EXPERTS_GATE_UP, layer), index=expert)
        if self.kind == "interleaved":  # [H, 2I], gate and up alternating by column
            return np.ascontiguousarray((gate_up[:, 0::2] if role == Role.EXPERT_GATE else gate_up[:, 1::2]).T)
        if self.kind == "columns":  # [H, 2I], the gate's columns then the up's
            half = gate_up.shape[1] // 2
            return np.ascontiguousarray((gate_up[:, :half] if role == Role.EXPERT_GATE else gate_up[:, half:]).T)
        half = gate_up.shape[0] // 2
        return gate_up[:half] if role == Role.EXPERT_GATE else gate_up[half:]

    def split_bias(self, gate_up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One expert's gate_up bias as (gate, up)."""
        if self.kind == "interleaved":
            return gate_up[0::2], gate_up[1::2]
        half = gate_up.shape[0] // 2
        return gate_up[:half], gate_up[half:]
