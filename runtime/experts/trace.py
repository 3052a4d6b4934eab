"""Routing traces: what a run's routers chose, one JSON line per (phase, token, layer), after one
header line that says what the run's slots were. `fate-run --trace FILE` writes one; `fate-replay`
(runtime.experts.replay) simulates every eviction policy and Belady's optimal cache over it.

    {"trace": 1, "pool": "global", "layers": [{"layer": 0, "experts": 60, "top_k": 4, "slots": 30, "slot_bytes": 4624384}, ...]}
    {"phase": "prefill", "step": 0, "token": 0, "layer": 0, "experts": [5, 12, 40, 41], "predicted": null}
    {"phase": "decode", "step": 3, "token": 17, "layer": 3, "experts": [5, 12, 40, 41], "predicted": [5, 9, 12, 40]}

`step` numbers the forward passes: the tokens of one prefill chunk run a layer's experts together
(their union is needed at once). `predicted`: the experts the store was asked to prefetch for that
layer before its routing was known (null where nothing predicted it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from fate.artifacts import FateError

TRACE_VERSION = 1
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class LayerSlots:
    """One MoE layer as the traced run held it."""

    layer: int
    experts: int
    top_k: int
    slots: int  # the plan's slots for the layer (its quota, or its share of the global pool)
    slot_bytes: int  # bytes one of its experts costs to read and hold


@dataclass(frozen=True)
class TraceHeader:
    layers: list[LayerSlots]
    pool: str = "per-layer"  # how the run shared its slots: global or per-layer

    def layer(self, index: int) -> LayerSlots:
        for slots in self.layers:
            if slots.layer == index:
                return slots
        raise FateError(f"the trace's header has no layer {index}")


@dataclass(frozen=True)
class TraceRecord:
    phase: str
    step: int
    token: int
    layer: int
    experts: tuple[int, ...]
    predicted: tuple[int, ...] | None = None


class TraceRecorder:
    """The routing of a run as it goes, kept in memory (one append per layer on the decode path, nothing
    serialized there); `records` for a replay in the same process, `save(path)` for fate-replay."""

    def __init__(self, header: TraceHeader):
        self.header = header
        self._rows: list[tuple] = []

    def record(self, phase: str, step: int, first_token: int, layer: int, ids, predicted) -> None:
        """ids [tokens, k]: the router's choice, in its order; predicted: the experts asked for before."""
        self._rows.append((phase, step, first_token, layer, ids.copy(), predicted))

    @property
    def records(self) -> list[TraceRecord]:
        """One record per (phase, token, layer)."""
        out = []
        for phase, step, first_token, layer, ids, predicted in self._rows:
            guess = None if predicted is None else tuple(sorted(int(e) for e in predicted))
            out += [TraceRecord(phase, step, first_token + t, layer, tuple(row), guess)
                    for t, row in enumerate(ids.tolist())]
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Written to FILE.part, renamed to FILE once whole: a trace that is there is whole."""
        path = Path(path)
        part = path.with_name(path.name + ".part")
        lines = [{"trace": TRACE_VERSION, "pool": self.header.pool, "layers": [asdict(l) for l in self.header.layers]}]
        lines += [{"phase": r.phase, "step": r.step, "token": r.token, "layer": r.layer, "experts": list(r.experts),
                   "predicted": None if r.predicted is None else list(r.predicted)} for r in self.records]
        try:
            with open(part, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
            os.replace(part, path)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise FateError(f"cannot write the trace {path}: {e.strerror}") from None


def read_trace(path: str | os.PathLike) -> tuple[TraceHeader, list[TraceRecord]]:
    """A trace file, checked line by line: a line that is not what fate-run writes is one error
    naming the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FateError(f"cannot read the trace {path}: {getattr(e, 'strerror', None) or e}") from None
    if not lines:
        raise FateError(f"{path} is empty: not a trace fate-run wrote")
    try:
        first = json.loads(lines[0])
        if not isinstance(first, dict) or first.get("trace") != TRACE_VERSION:
            raise ValueError(f"its first line is not a version {TRACE_VERSION} trace header")
        header = TraceHeader([LayerSlots(**{k: _count(v, k) for k, v in l.items()}) for l in first["layers"]],
                             str(first.get("pool", "per-layer")))
        known = {l.layer: l for l in header.layers}
        records = []
        for number, line in enumerate(lines[1:], start=2):
            try:
                records.append(_record(json.loads(line), known))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"line {number}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:
        raise FateError(f"{path} is not a trace fate-run wrote: {e}") from None
    return header, records


def _count(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    return value


def _record(value: dict, known: dict[int, LayerSlots]) -> TraceRecord:
    if value.get("phase") not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}")
    layer = _count(value["layer"], "layer")
    if layer not in known:
        raise ValueError(f"layer {layer} is not in the header")
    experts = tuple(_count(e, "an expert") for e in value["experts"])
    predicted = value.get("predicted")
    predicted = None if predicted is None else tuple(_count(e, "an expert") for e in predicted)
    if any(e >= known[layer].experts for e in experts + (predicted or ())):
        raise ValueError(f"an expert id is not below layer {layer}'s {known[layer].experts}")
    return TraceRecord(value["phase"], _count(value["step"], "step"), _count(value["token"], "token"), layer,
                       experts, predicted)
