"""profile.json: what calibration measured, per MoE layer. Written by the compiler's profiler,
read by the planner (`fate-compile --policy-only`), fate-inspect and the runtime's EAP baseline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import ArtifactError
from .inputs import load_json
from .predictors import GRAPH_PREDICTORS, PREDICTORS, RUNTIME_PREDICTORS, Predictor  # noqa: F401 - re-exported
from .schema import from_json_dict, parse_version, to_json_dict

PROFILE_VERSION = "1.1"  # 1.1: optimal_miss_curve


@dataclass(frozen=True)
class RecallCurve:
    """Recall of one predictor at fetch widths (experts fetched per token).

    decode[i]:        mean over tokens of |top-widths[i] predicted ∩ actual top-k| / k
    prefill[i]:       mean over prompt windows of |∪ predicted ∩ ∪ actual| / |∪ actual|
    prefill_fetch[i]: mean number of distinct experts in ∪ predicted per window
    """

    widths: list[int]
    decode: list[float]
    prefill: list[float]
    prefill_fetch: list[float]

    def decode_at(self, width: int) -> float:
        return self.decode[self.widths.index(width)]


@dataclass(frozen=True)
class LayerProfile:
    index: int
    num_experts: int
    top_k: int
    similarity_mean: float | None  # cosine(router input of layer index-1, router input of this layer)
    similarity_std: float | None
    predictors: dict[str, RecallCurve]
    popularity: list[float]  # share of this layer's token-expert assignments per expert
    miss_curve_slots: list[int]
    miss_curve: list[float]  # demand-only miss rate of the runtime's default eviction policy at each slot count
    quant_error: dict[str, float]  # relative error of the routed-experts output per precision
    low_bit_shares: list[float]  # share of assignments (least popular experts first) moved at INT2
    low_bit_error: list[float]  # error that share at INT2 adds to the all-INT4 routed output (relative)
    transitions_from: int | None  # the previous MoE layer, for EAP
    transitions: list[list[int]]  # counts [expert there][expert here] over all calibration tokens
    # Belady's MIN at the same slot counts: the least any cache of that size misses (absent before 1.1)
    optimal_miss_curve: list[float] | None = None


@dataclass(frozen=True)
class Profile:
    profile_version: str
    calibration: str
    calibration_tokens: int
    sequence_length: int
    prefill_window: int
    eval_tokens: int  # tokens the recall figures are measured on (EAP is fitted on the others)
    layers: list[LayerProfile]

    def check(self, experts_per_layer: dict[int, int]) -> "Profile":
        """Refuse a profile whose numbers do not fit the manifest's MoE layers (layer index -> expert
        count): every list the runtime indexes by expert, every table by (expert, expert)."""
        indices = [layer.index for layer in self.layers]
        if sorted(indices) != sorted(experts_per_layer):
            raise ArtifactError(f"profile.json covers layers {sorted(indices)}, the manifest's MoE layers are "
                                f"{sorted(experts_per_layer)}")
        for layer in self.layers:
            n = experts_per_layer[layer.index]
            where = f"profile.json layer {layer.index}"
            if layer.num_experts != n or len(layer.popularity) != n:
                raise ArtifactError(f"{where}: {layer.num_experts} experts and {len(layer.popularity)} popularity "
                                    f"figures for a layer of {n} experts")
            if len(layer.miss_curve) != len(layer.miss_curve_slots):
                raise ArtifactError(f"{where}: the miss curve's lists differ in length")
            check_curve(f"{where}: the miss curve", layer.miss_curve_slots, layer.miss_curve, n)
            if layer.optimal_miss_curve is not None:
                if len(layer.optimal_miss_curve) != len(layer.miss_curve_slots):
                    raise ArtifactError(f"{where}: the optimal miss curve's lists differ in length")
                check_curve(f"{where}: the optimal miss curve", layer.miss_curve_slots, layer.optimal_miss_curve, n)
            for name, curve in layer.predictors.items():
                if not (len(curve.widths) == len(curve.decode) == len(curve.prefill) == len(curve.prefill_fetch)):
                    raise ArtifactError(f"{where}: predictor {name}'s recall lists differ in length")
                for values in (curve.decode, curve.prefill):
                    check_curve(f"{where}: predictor {name}'s recall", curve.widths, values, n)
                check_curve(f"{where}: predictor {name}'s prefill fetches", curve.widths, curve.prefill_fetch, n, n)
            if layer.transitions_from is not None:
                source = experts_per_layer.get(layer.transitions_from)
                if source is None or layer.transitions_from >= layer.index:
                    raise ArtifactError(f"{where}: transitions from layer {layer.transitions_from}, not an earlier "
                                        f"MoE layer")
                if len(layer.transitions) != source or any(len(row) != n for row in layer.transitions):
                    raise ArtifactError(f"{where}: the transition table is not {source} x {n}")
        return self

    def layer(self, index: int) -> LayerProfile:
        for layer in self.layers:
            if layer.index == index:
                return layer
        raise ArtifactError(f"profile has no MoE layer {index}")


def check_curve(what: str, xs: list[int], ys: list[float], experts: int, most: float = 1.0) -> None:
    """A curve the runtime interpolates: points at increasing counts within [0, experts], each value
    in [0, most] (a share, or a count of experts)."""
    if not xs:
        raise ArtifactError(f"{what} has no points")
    if any(b <= a for a, b in zip(xs, xs[1:])) or xs[0] < 0 or xs[-1] > experts:
        raise ArtifactError(f"{what} is not at increasing counts within 0..{experts}")
    if not all(0.0 <= y <= most for y in ys):  # also NaN
        raise ArtifactError(f"{what} holds a value outside [0, {most:g}]")


def profile_to_bytes(profile: Profile) -> bytes:
    try:
        return (json.dumps(to_json_dict(profile), separators=(",", ":"), allow_nan=False) + "\n").encode()
    except ValueError:  # what the runtime cannot read back is refused when written
        raise ArtifactError("the calibration profile holds a NaN or infinite number") from None


def profile_from_bytes(data: bytes) -> Profile:
    raw: Any = load_json(data, "profile.json", ArtifactError)
    if not isinstance(raw, dict) or not isinstance(raw.get("profile_version"), str):
        raise ArtifactError("profile.json has no profile_version")
    if parse_version(raw["profile_version"])[0] != parse_version(PROFILE_VERSION)[0]:
        raise ArtifactError(f"profile.json version {raw['profile_version']} is not readable here")
    return from_json_dict(Profile, raw, where="profile")
