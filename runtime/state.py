"""What a sequence carries from step to step, layer by layer: the contract between the layer
graphs and the generation loop (and the calibration run, which feeds the same graphs).

An attention layer carries keys and values that grow with the sequence; any other mixer (a short
convolution, ...) a fixed-size state the manifest lists. Every layer alike: state in as
`past_<name>`, state out as `present_<name>`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fate.artifacts import LayerSpec, Manifest, ModelSpec
from fate.artifacts.layout import GraphIO as IO


def state_names(layer: LayerSpec) -> list[str]:
    """The names of what a layer carries: "key" and "value" for attention, else its listed state."""
    return ["key", "value"] if layer.mixer == "attention" else [state.name for state in layer.state]


def hands_on_partial(layer: LayerSpec, session) -> bool:
    """Whether a post-norm MoE layer's graph outputs its shared experts' sum (`moe_partial`), which
    joins the routed sum before the combine graph normalizes both."""
    return bool(layer.combine_graph) and IO.MOE_PARTIAL in {o.name for o in session.get_outputs()}


def initial_state(spec: ModelSpec, layer: LayerSpec) -> dict[str, np.ndarray]:
    """What a layer carries into its first step: no keys and values yet (attention), or its
    fixed-size state at zero (the manifest's shapes, validated when it was read)."""
    if layer.mixer == "attention":
        return {"key": np.zeros((1, spec.num_kv_heads, 0, spec.key_dim), np.float32),
                "value": np.zeros((1, spec.num_kv_heads, 0, spec.value_dim), np.float32)}
    return {state.name: np.zeros(state.shape, np.float32) for state in layer.state}


def layer_feeds(layer: LayerSpec, hidden: np.ndarray, state: dict[str, np.ndarray],
                positional: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A layer graph's inputs: the hidden states, the layer's state, and for attention its
    position inputs (runtime.positions.StepPositions.for_layer)."""
    feeds = {IO.HIDDEN: hidden, **{IO.past(name): value for name, value in state.items()}}
    if layer.mixer == "attention":
        feeds.update(positional)
    return feeds


@dataclass
class KVCache:
    """What each layer carries from token to token, by state name: an attention layer's keys and
    values [1, KV, T, D] ("key", "value"), growing with the sequence, or another mixer's fixed-size
    state (a short convolution's window), replaced at every step. Steps replace arrays, never
    write into them, so a cache may share arrays with another."""

    layers: list[dict[str, np.ndarray]]
    length: int = 0

    @classmethod
    def empty(cls, manifest: Manifest) -> "KVCache":
        return cls([initial_state(manifest.model, layer) for layer in manifest.layers])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for state in self.layers for a in state.values())

    @property
    def rewindable(self) -> bool:
        """Keys and values can be cut to any prefix; a fixed-size state has folded in every token."""
        return all(set(state) == {"key", "value"} for state in self.layers)

    def prefix(self, length: int) -> "KVCache":
        """The cache of the first `length` tokens (views); needs `rewindable` unless nothing is cut."""
        if length == self.length:
            return KVCache([dict(state) for state in self.layers], length)
        if not 0 <= length < self.length or not self.rewindable:
            raise ValueError(f"cannot cut a cache of {self.length} tokens to {length}")
        return KVCache([{name: a[:, :, :length] for name, a in state.items()} for state in self.layers], length)
