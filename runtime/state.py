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


def experts_input(out: dict[str, np.ndarray], layer: LayerSpec) -> np.ndarray:
    """What a MoE layer's routed experts read, from its graph's outputs: expert_input where they run in a
    latent space (LayerSpec.expert_input_size), else router_input."""
    return out[IO.EXPERT_INPUT] if layer.expert_input_size else out[IO.ROUTER_INPUT]


def initial_state(spec: ModelSpec, layer: LayerSpec) -> dict[str, np.ndarray]:
    """What a layer carries into its first step: no keys and values yet (attention), or its
    fixed-size state at zero (the manifest's shapes, validated when it was read)."""
    if layer.mixer == "attention":
        return {"key": np.zeros((1, spec.kv_heads(layer), 0, spec.key_dim), np.float32),
                "value": np.zeros((1, spec.kv_heads(layer), 0, spec.value_dim), np.float32)}
    return {state.name: np.zeros(state.shape, np.float32) for state in layer.state}


def layer_feeds(layer: LayerSpec, hidden: np.ndarray, state: dict[str, np.ndarray],
                positional: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A layer graph's inputs: the hidden states, the layer's state, and for attention its
    position inputs (runtime.positions.StepPositions.for_layer)."""
    feeds = {IO.HIDDEN: hidden, **{IO.past(name): value for name, value in state.items()}}
    if layer.mixer == "attention":
        feeds.update(positional)
    return feeds


# How far an in-place key/value buffer grows when it is full: a quarter more, at least this many
# positions (copies stay rare; at most a quarter of it is ever unused)
GROWTH_POSITIONS = 256
# Keys and values are kept in place once a layer's hold this many bytes. Binding the buffers to the
# run costs onnxruntime's Python API a fixed 40-180 us a layer; copying the cache costs about 1.5 us
# a position at qwen shapes (16 KB a position): in place won below 2 MB (measured: 32 positions
# 0.54 ms a token slower, 768 positions 3.75 ms faster, 4 layers), and at tiny-moe's 512 B a
# position not yet at 1,000 positions.
IN_PLACE_BYTES = 2 << 20


@dataclass
class KVCache:
    """What each layer carries from token to token, by state name: an attention layer's keys and
    values [1, KV, T, D] ("key", "value"), growing with the sequence, or another mixer's fixed-size
    state (a short convolution's window), replaced at every step.

    Layers whose fused attention takes position tables (LayerSpec.positions), once their keys and
    values reach IN_PLACE_BYTES, keep them in place: buffers [1, KV, capacity, D] whose first
    `length` positions hold the sequence, which the attention writes into (no copy of the whole
    cache per step). Such buffers belong to one sequence: `prefix` hands them over, and the cache
    cut from must not be extended again. Other steps replace arrays, never write into them."""

    layers: list[dict[str, np.ndarray]]
    length: int = 0
    in_place: tuple[bool, ...] = ()
    position_bytes: int = 0  # the largest attention layer's keys and values per position

    @classmethod
    def empty(cls, manifest: Manifest) -> "KVCache":
        spec = manifest.model
        return cls([initial_state(spec, layer) for layer in manifest.layers], 0,
                   tuple(layer.positions == "tables" for layer in manifest.layers),
                   max((4 * spec.kv_heads(layer) * (spec.key_dim + spec.value_dim) for layer in manifest.layers
                        if layer.mixer == "attention"), default=0))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for state in self.layers for a in state.values())

    @property
    def rewindable(self) -> bool:
        """Keys and values can be cut to any prefix; a fixed-size state has folded in every token."""
        return all(set(state) <= {"key", "value"} for state in self.layers)  # a layer without a mixer: {}

    def runs_in_place(self, index: int) -> bool:
        """Whether layer `index`'s next step writes its keys and values into place."""
        return self.length * self.position_bytes >= IN_PLACE_BYTES and index < len(self.in_place) \
            and self.in_place[index]

    def state(self, index: int) -> dict[str, np.ndarray]:
        """Layer `index`'s state as a step that replaces it reads it: keys and values of exactly
        `length` positions (views where a buffer or a longer sequence holds more)."""
        state = self.layers[index]
        if "key" in state and state["key"].shape[2] != self.length:
            return {name: a[:, :, :self.length] for name, a in state.items()}
        return state

    def reserve(self, index: int, total: int, limit: int) -> dict[str, np.ndarray]:
        """Layer `index`'s in-place buffers, grown (the sequence copied over) when they cannot hold
        `total` positions; never beyond `limit` (the model's context) unless `total` is."""
        state = self.layers[index]
        capacity = state["key"].shape[2]
        if capacity < total:
            capacity = max(total, min(limit, capacity + max(GROWTH_POSITIONS, capacity // 4)))
            for name, old in state.items():
                grown = np.zeros(old.shape[:2] + (capacity,) + old.shape[3:], old.dtype)
                grown[:, :, :self.length] = old[:, :, :self.length]
                state[name] = grown
        return state

    def prefix(self, length: int) -> "KVCache":
        """The cache of the first `length` tokens (views; in-place buffers handed over whole); needs
        `rewindable` unless nothing is cut."""
        if length == self.length:
            return KVCache([dict(state) for state in self.layers], length, self.in_place, self.position_bytes)
        if not 0 <= length < self.length or not self.rewindable:
            raise ValueError(f"cannot cut a cache of {self.length} tokens to {length}")
        return KVCache([dict(state) if self._buffered(i) else {name: a[:, :, :length] for name, a in state.items()}
                        for i, state in enumerate(self.layers)], length, self.in_place, self.position_bytes)

    def _buffered(self, index: int) -> bool:
        """Whether layer `index` holds its keys and values in buffers with room beyond `length`."""
        state = self.layers[index]
        return index < len(self.in_place) and self.in_place[index] and state["key"].shape[2] > self.length
