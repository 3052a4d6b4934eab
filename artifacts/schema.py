"""The manifest as typed, frozen dataclasses, and the strict conversion from and to JSON.

FORMAT.md beside this file states the same thing in prose; a test keeps the two equal.
Reading is strict: every field is type-checked, unknown fields are refused (unless the
manifest comes from a newer minor version of the schema, which may add fields), and a newer
major version is refused with a message saying what to install.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from . import precisions
from .errors import ArtifactError
from .native_contract import DecodeStep, ExpertLayout, HeadStep, RoutingSpec, TensorView  # noqa: F401 - manifest records
from .predictors import RUNTIME_PREDICTORS, Predictor
from .slots import check_decode_step, check_head_step, check_layout

SCHEMA_VERSION = "1.9"  # 1.1: expert slot layouts (LayerSpec.expert_layouts); 1.2: layer mixers and their state;
# 1.3: attention graphs may use com.microsoft.GroupQueryAttention (a runtime before it refuses the op by name);
# 1.4: attention layers may take position tables (LayerSpec.positions; a runtime before it names the inputs)
# 1.5: a layer may say where its decode step's tensors lie in its graph file (LayerSpec.decode_step; a
# runtime before it ignores it and runs the graph); 1.6: why a layer has no decode step (LayerSpec.graph_only);
# 1.7: what the lossy INT2 prefill costs, measured (Policy.int2_prefill_perplexity_ratio); 1.8: an attention
# layer's own key-value heads and RoPE frequencies (LayerSpec.num_kv_heads, LayerSpec.rope_inv_freq), layers
# without a token mixer (mixer "none"), experts without a gate (ExpertLayout.activation "relu2"); 1.9: the
# embedding graph may predict layer 0's experts (Manifest.embed_predicts_next; a runtime before it refuses a
# policy that uses it)

# Expert precisions an artifact may store, with the bits the compiler quantized them to (precisions.py).
PRECISION_BITS = precisions.PRECISION_BITS
DENSE_PRECISIONS = ("fp32", "int8", "int4")

LAYER_KINDS = ("moe", "dense")
# What an attention layer graph takes for positions: "per_token", cos and sin of the step's new tokens;
# "tables", cos and sin of every position up to the step's last with the sequence lengths, which the fused
# attention rotates q and k with itself (fate.artifacts.layout.GraphIO)
POSITION_INPUTS = ("per_token", "tables")
# What mixes tokens in a layer: attention caches keys and values that grow with the sequence; "none"
# (schema 1.8: a block that is its MLP alone, Nemotron-H's) carries nothing; the others carry a
# fixed-size state from token to token, listed in LayerSpec.state.
MIXERS = ("attention", "short_conv", "gated_deltanet", "mamba", "mamba2", "lightning", "kda", "none")
STATELESS_MIXERS = ("attention", "none")  # what they carry is not LayerSpec.state
MAX_STATE_BYTES = 1 << 32  # one layer's state; far above any real model's, below a hostile allocation
# Model families whose graphs this runtime version knows to run (the compiler's registry must
# stay within this list; a test checks it).
KNOWN_FAMILIES = ("afmoe", "cohere2_moe", "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt_oss",
                  "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "jamba", "kimi_linear", "llama4", "llama4_text", "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2", "lfm2_moe", "mistral4", "mixtral", "nemotron_h", "olmoe", "phimoe", "qwen2_moe",
                  "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next", "solar_open")
SCORING_FUNCTIONS = ("softmax", "sparsemixer", "sigmoid")

# Generous bounds that no real model reaches: they catch corrupt or hostile manifests
# before anything allocates memory from their numbers.
MAX_DIM = 1 << 20
MAX_LAYERS = 4096
MAX_EXPERTS = 4096


@dataclass(frozen=True)
class FileEntry:
    """One file of the artifact: its relative path, size in bytes and SHA-256 (hex)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StateSpec:
    """One tensor a non-attention layer carries from token to token (float32, fixed shape): the
    graph reads it as `past_<name>` and writes the next one as `present_<name>`."""

    name: str
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: its dense graph and, for an MoE layer, its routing and expert files.

    `experts` maps a precision name (a key of PRECISION_BITS) to one file per expert.
    `predicts_next` says the layer graph has the cross-layer output `next_router_logits`:
    the next MoE layer's router applied to this layer's router input.
    """

    index: int
    kind: str
    graph: str
    routing: RoutingSpec | None = None
    experts: dict[str, list[str]] = field(default_factory=dict)
    predicts_next: bool = False
    sliding_window: int | None = None  # this layer's window, when layers differ (else the model's)
    # precision -> slot layout, for the quantized precisions (absent: the experts run as sessions)
    expert_layouts: dict[str, ExpertLayout] = field(default_factory=dict)
    # schema 1.2: what mixes tokens (MIXERS); attention's keys and values are sized by the model,
    # every other mixer lists its fixed-size state
    mixer: str = "attention"
    state: list[StateSpec] = field(default_factory=list)
    # schema 1.2: a MoE layer whose routed experts' sum is normalized before it joins the residual
    # (post-norm families): the graph that does it (residual, routed -> hidden); absent: a plain add
    combine_graph: str | None = None
    # schema 1.4: an attention layer's position inputs (POSITION_INPUTS)
    positions: str = "per_token"
    # schema 1.5: the layer's decode step, for the native kernel (absent: the graph runs every step)
    decode_step: DecodeStep | None = None
    # schema 1.6: why a MoE layer has no decode step (informational, for fate-inspect)
    graph_only: str | None = None
    # schema 1.8: an attention layer's key-value heads and RoPE frequencies where they are not the model's
    # (MiMo-V2-Flash's sliding layers)
    num_kv_heads: int | None = None
    rope_inv_freq: list[float] | None = None
    # schema 1.8: the routed experts' width where they run in a latent space (Nemotron-3 Super): the graph
    # outputs expert_input [S, W] and the combine graph projects the routed sum back
    expert_input_size: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """The architecture numbers the runtime needs (everything else is inside the graphs)."""

    family: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rope_inv_freq: list[float]
    rope_attention_scaling: float = 1.0
    sliding_window: int | None = None
    # What each layer caches per token and KV head when it is not head_dim for keys and values
    # (multi-head latent attention caches a compressed latent and a shared rotary key)
    cache_key_dim: int | None = None
    cache_value_dim: int | None = None
    # How the layer and head graphs store their linear weights (routers stay fp32): fp32, int8, int4;
    # when not fp32 the embedding table is INT8 per row
    dense_precision: str = "fp32"

    def kv_heads(self, layer: "LayerSpec") -> int:
        """The key-value heads `layer` caches."""
        return layer.num_kv_heads or self.num_kv_heads

    def inv_freq(self, layer: "LayerSpec") -> list[float]:
        """The RoPE frequencies `layer` rotates with."""
        return self.rope_inv_freq if layer.rope_inv_freq is None else layer.rope_inv_freq

    @property
    def key_dim(self) -> int:
        """What one cached key holds per token and KV head."""
        return self.cache_key_dim or self.head_dim

    @property
    def value_dim(self) -> int:
        """What one cached value holds per token and KV head."""
        return self.cache_value_dim or self.head_dim


@dataclass(frozen=True)
class TokenizerSpec:
    """Tokenizer files (relative paths) and the special tokens generation needs."""

    files: list[str]
    eos_token_ids: list[int]
    bos_token_id: int | None = None
    chat_template: str | None = None


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from the checkpoint's generation_config.json, when it had one."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:  # what the sampler will be given: checked when read and when written
        problem = sampling_problem(self.temperature, self.top_p, self.top_k, "_")
        if problem:
            raise ArtifactError(f"generation: {problem}")


def sampling_problem(temperature: Any, top_p: Any, top_k: Any, sep: str = "-") -> str | None:
    """What is wrong with sampling numbers, or None: one rule for the manifest's generation defaults
    and the runtime's sampler. `sep` joins the names as their source spells them (top_p, --top-p)."""
    def real(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if not (real(temperature) and math.isfinite(temperature) and temperature > 0):  # NaN fails every comparison
        return f"temperature must be a finite number > 0 (greedy decoding for 0), got {temperature!r}"
    if not (real(top_p) and 0 < top_p <= 1):
        return f"top{sep}p must be in (0, 1], got {top_p!r}"
    if not (isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool) and top_k >= 0):
        return f"top{sep}k must be an integer >= 0, got {top_k!r}"
    return None


@dataclass(frozen=True)
class LayerPolicy:
    """What the compiler decided for one MoE layer, and from which measurement (`reasons`)."""

    index: int
    precision: str  # precision of resident experts
    cache_share: float  # share of the budget's expert slots given to this layer
    prefetch_width: int  # experts prefetched per decode token
    predictor: str  # cross_layer, cross_layer_norm (graph outputs), eap (profile transitions) or none
    prefill_precision: str | None  # precision for the least popular tail during prefill
    prefill_low_share: float  # share of token-expert assignments moved at prefill_precision
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    budget: float  # share of all experts resident that the cache shares were planned for
    target_recall: float
    max_quant_error: float
    max_low_bit_error: float
    layers: list[LayerPolicy]
    # the lossy INT2 prefill's end-to-end cost: perplexity on calibration text with it on, divided by
    # with it off, at `budget` (None: no INT2 copies stored, or the policy moves none)
    int2_prefill_perplexity_ratio: float | None = None

    def layer(self, index: int) -> LayerPolicy | None:
        return next((p for p in self.layers if p.index == index), None)


@dataclass(frozen=True)
class Manifest:
    schema_version: str
    fate_version: str
    model: ModelSpec
    embed_graph: str
    head_graph: str
    layers: list[LayerSpec]
    tokenizer: TokenizerSpec
    generation: GenerationDefaults
    files: list[FileEntry]
    profile: str | None = None
    policy: Policy | None = None
    # schema 1.5: the head's decode step, for the native kernel (absent: the head graph runs every step)
    head_step: HeadStep | None = None
    # schema 1.9: the embedding graph has the outputs next_router_logits(_norm): layer 0's experts predicted from
    # the token's embedding, before layer 0 runs (layer 0 is then an MoE layer)
    embed_predicts_next: bool = False

    def graph_predicts(self, index: int) -> bool:
        """Whether a graph computes the cross-layer predictions of layer `index`'s experts: the layer before's,
        or for layer 0 the embedding's."""
        return self.embed_predicts_next if index == 0 else self.layers[index - 1].predicts_next

    @property
    def moe_layers(self) -> list[LayerSpec]:
        return [layer for layer in self.layers if layer.kind == "moe"]

    @property
    def precisions(self) -> list[str]:
        found = {p for layer in self.layers for p in layer.experts}
        return sorted(found, key=lambda p: -PRECISION_BITS[p])

    @property
    def state_bytes(self) -> int:
        """The fixed-size state one sequence carries (every layer's but attention's keys and values)."""
        return sum(state.nbytes for layer in self.layers for state in layer.state)

    @property
    def experts_per_layer(self) -> dict[int, int]:
        """MoE layer index -> its number of routed experts."""
        return {layer.index: layer.routing.num_experts for layer in self.moe_layers}

    def validate(self) -> None:
        """Checks across fields that types alone cannot express."""
        m = self.model
        if m.family not in KNOWN_FAMILIES:
            raise ArtifactError(f"manifest: unknown model family {m.family!r}; this runtime knows "
                                f"{', '.join(KNOWN_FAMILIES)} (a newer Fate may support it)")
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_positions"):
            value = getattr(m, name)
            if not 0 < value <= MAX_DIM:
                raise ArtifactError(f"manifest: model.{name} = {value} is out of range")
        if not 0 < m.num_layers <= MAX_LAYERS or len(self.layers) != m.num_layers:
            raise ArtifactError(f"manifest: {len(self.layers)} layers listed, model.num_layers = {m.num_layers}")
        if m.dense_precision not in DENSE_PRECISIONS:
            raise ArtifactError(f"manifest: model.dense_precision {m.dense_precision!r} is not one of "
                                f"{', '.join(DENSE_PRECISIONS)}")
        if m.num_heads % m.num_kv_heads:
            raise ArtifactError("manifest: model.num_heads is not a multiple of model.num_kv_heads")
        if len(m.rope_inv_freq) * 2 > m.head_dim:
            raise ArtifactError("manifest: model.rope_inv_freq is longer than head_dim / 2")
        sizes = {f.path: f.size for f in self.files}
        for i, layer in enumerate(self.layers):
            self._validate_layer(i, layer)
            self._validate_layouts(layer, sizes)
        for layer in self.layers:  # after every layer's own checks: a step reads the next layer's routing
            self._validate_decode_step(layer, sizes)
        if self.embed_predicts_next and self.layers[0].kind != "moe":
            raise ArtifactError("manifest: the embedding predicts layer 0's experts, but layer 0 is not an MoE layer")
        if self.head_step is not None:
    
            check_head_step(self.head_step, m.hidden_size, m.vocab_size, sizes.get(self.head_graph, 0),
                            "manifest: head step")
        if not self.tokenizer.eos_token_ids:
            raise ArtifactError("manifest: tokenizer.eos_token_ids is empty")
        listed = {f.path for f in self.files}
        if len(listed) != len(self.files):
            raise ArtifactError("manifest: a file is listed twice")
        for f in self.files:
            safe_relpath(f.path)
            if f.size < 0 or len(f.sha256) != 64:
                raise ArtifactError(f"manifest: bad size or sha256 for {f.path}")
        for path in self.referenced_files():
            if path not in listed:
                raise ArtifactError(f"manifest: {path} is used but not listed in files")
        if self.policy is not None:
            self._validate_policy(self.policy)

    def _validate_policy(self, policy: Policy) -> None:
        moe = {layer.index: layer for layer in self.moe_layers}
        for name in ("budget", "target_recall", "max_quant_error", "max_low_bit_error"):
            value = getattr(policy, name)
            if not 0 <= value <= (1 if name in ("budget", "target_recall") else math.inf):
                raise ArtifactError(f"manifest: policy.{name} = {value} is out of range")
        if sorted(p.index for p in policy.layers) != sorted(moe):
            raise ArtifactError("manifest: the policy does not cover exactly the MoE layers")
        for p in policy.layers:
            layer = moe[p.index]
            if p.precision not in layer.experts or (p.prefill_precision and p.prefill_precision not in layer.experts):
                raise ArtifactError(f"manifest: policy of layer {p.index} names a precision the layer does not store")
            if not 0 <= p.cache_share <= 1 or not 0 <= p.prefill_low_share <= 1 or \
                    not 0 <= p.prefetch_width <= layer.routing.num_experts:
                raise ArtifactError(f"manifest: policy of layer {p.index} has out-of-range numbers")
            if p.predictor not in (*RUNTIME_PREDICTORS, "none"):
                raise ArtifactError(f"manifest: policy of layer {p.index} has unknown predictor {p.predictor!r}")
            if p.predictor in (Predictor.CROSS_LAYER, Predictor.CROSS_LAYER_NORM) and not self.graph_predicts(p.index):
                raise ArtifactError(f"manifest: layer {p.index} has no cross-layer prediction to use")
            if p.predictor == Predictor.EAP and not self.profile:
                raise ArtifactError(f"manifest: layer {p.index} uses EAP but the artifact has no profile")

    def _validate_layer(self, i: int, layer: LayerSpec) -> None:
        if layer.index != i or layer.kind not in LAYER_KINDS:
            raise ArtifactError(f"manifest: layer {i} has index {layer.index} and kind {layer.kind!r}")
        self._validate_state(i, layer)
        self._validate_attention(i, layer)
        if layer.predicts_next and (i + 1 >= len(self.layers) or self.layers[i + 1].kind != "moe"):
            raise ArtifactError(f"manifest: layer {i} predicts the next layer's experts, but no MoE layer follows")
        if layer.kind == "dense":
            if layer.routing is not None or layer.experts or layer.combine_graph or layer.expert_input_size:
                raise ArtifactError(f"manifest: dense layer {i} has routing, experts or a combine graph")
            return
        if layer.expert_input_size is not None and not (0 < layer.expert_input_size <= MAX_DIM and layer.combine_graph):
            raise ArtifactError(f"manifest: layer {i}'s experts are {layer.expert_input_size} wide without a combine "
                                f"graph to bring their sum back to the hidden size")
        r = layer.routing
        if r is None or r.scoring not in SCORING_FUNCTIONS or not 0 < r.top_k <= r.num_experts <= MAX_EXPERTS:
            raise ArtifactError(f"manifest: MoE layer {i} has no valid routing")
        if not layer.experts:
            raise ArtifactError(f"manifest: MoE layer {i} stores no experts")
        for precision, files in layer.experts.items():
            if precision not in PRECISION_BITS:
                raise ArtifactError(f"manifest: layer {i} has unknown precision {precision!r}")
            if len(files) != r.num_experts:
                raise ArtifactError(f"manifest: layer {i} lists {len(files)} {precision} experts, "
                                    f"routing says {r.num_experts}")

    def _validate_attention(self, i: int, layer: LayerSpec) -> None:
        """A layer's own key-value heads and RoPE: for attention, in the model's bounds."""
        m = self.model
        if layer.num_kv_heads is None and layer.rope_inv_freq is None:
            return
        if layer.mixer != "attention":
            raise ArtifactError(f"manifest: layer {i} ({layer.mixer}) has key-value heads or RoPE of its own")
        kv = layer.num_kv_heads
        if kv is not None and not (0 < kv <= MAX_DIM and m.num_heads % kv == 0):
            raise ArtifactError(f"manifest: layer {i} has {kv} key-value heads for {m.num_heads} heads")
        freq = layer.rope_inv_freq
        if freq is not None and (len(freq) * 2 > m.head_dim or not all(
                isinstance(f, float) and math.isfinite(f) and f > 0 for f in freq)):
            raise ArtifactError(f"manifest: layer {i} has RoPE frequencies that are not finite positive numbers "
                                f"for at most head_dim / 2 pairs")

    def _validate_state(self, i: int, layer: LayerSpec) -> None:
        """The runtime allocates each state tensor from these numbers and feeds it under its name:
        a name that is not a plain identifier, a negative or huge shape is refused here."""
        if layer.mixer not in MIXERS:
            raise ArtifactError(f"manifest: layer {i} has unknown mixer {layer.mixer!r}; this runtime knows "
                                f"{', '.join(MIXERS)}")
        if (layer.mixer in STATELESS_MIXERS) != (not layer.state):
            raise ArtifactError(f"manifest: layer {i} is {layer.mixer} but lists "
                                f"{'a' if layer.state else 'no'} fixed-size state")
        names = set()
        for state in layer.state:
            if not state.name.isidentifier() or not state.name.islower() or state.name in ("key", "value") \
                    or state.name in names:
                raise ArtifactError(f"manifest: layer {i} has a state named {state.name!r}")
            names.add(state.name)
            if not state.shape or any(not 0 <= d <= MAX_DIM for d in state.shape) \
                    or state.nbytes > MAX_STATE_BYTES:
                raise ArtifactError(f"manifest: layer {i} state {state.name} has shape {state.shape}")
        if layer.positions not in POSITION_INPUTS or (layer.positions != "per_token" and layer.mixer != "attention"):
            raise ArtifactError(f"manifest: layer {i} ({layer.mixer}) has position inputs {layer.positions!r}; "
                                f"this runtime knows {', '.join(POSITION_INPUTS)} (tables for attention only)")

    def _validate_layouts(self, layer: LayerSpec, sizes: dict[str, int]) -> None:

        for precision, layout in layer.expert_layouts.items():
            where = f"manifest: layer {layer.index} {precision} slot layout"
            if precision not in layer.experts or PRECISION_BITS[precision] != layout.bits:
                raise ArtifactError(f"{where} does not match a stored quantized precision")
            if layout.hidden_size != (layer.expert_input_size or self.model.hidden_size) \
                    or not 0 < layout.intermediate_size <= MAX_DIM:
                raise ArtifactError(f"{where} has sizes that do not match the model")
            for path in layer.experts[precision]:
                if path in sizes:  # unlisted files are refused below
                    check_layout(layout, sizes[path], f"{where} ({path})")

    def _validate_decode_step(self, layer: LayerSpec, sizes: dict[str, int]) -> None:

        step = layer.decode_step
        if step is None:
            return
        where = f"manifest: layer {layer.index} decode step"
        if layer.kind != "moe" or layer.mixer != "attention" or layer.positions != "tables" \
                or layer.routing.scoring not in ("softmax", "sigmoid") or layer.combine_graph \
                or layer.rope_inv_freq is not None \
                or self.model.key_dim != self.model.head_dim \
                or self.model.value_dim != self.model.head_dim:
            raise ArtifactError(f"{where}: only a softmax- or sigmoid-routed MoE layer with fused attention and the model's RoPE has one")
        following = self.layers[layer.index + 1] if layer.predicts_next else None
        m = self.model
        check_decode_step(step, (m.hidden_size, m.num_heads, m.kv_heads(layer), m.head_dim), layer.routing,
                          following.routing.num_experts if following else 0, sizes.get(layer.graph, 0), where)

    def referenced_files(self) -> list[str]:
        paths = [self.embed_graph, self.head_graph, *self.tokenizer.files]
        if self.profile:
            paths.append(self.profile)
        for layer in self.layers:
            paths.append(layer.graph)
            if layer.combine_graph:
                paths.append(layer.combine_graph)
            for files in layer.experts.values():
                paths.extend(files)
        return paths


def safe_relpath(path: str) -> PurePosixPath:
    """A manifest path must stay inside the artifact: relative, no '..', no backslashes."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or any(part in ("..", "") for part in path.split("/")):
        raise ArtifactError(f"manifest names a file outside the artifact: {path!r}")
    return p


# --------------------------------------------------------------------------- JSON conversion


def to_json_dict(obj: Any) -> Any:
    """Dataclasses to plain JSON values (dicts keep their declared field order)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_json_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_json_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json_dict(v) for k, v in obj.items()}
    return obj


def from_json_dict(cls: type, data: Any, where: str = "manifest", allow_unknown: bool = False) -> Any:
    """Build dataclass `cls` from JSON data, checking every type; errors name the field path."""
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown and not allow_unknown:
        raise ArtifactError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ArtifactError(f"{where}: missing field {f.name!r}")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}", allow_unknown)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str, allow_unknown: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, allow_unknown)
    if dataclasses.is_dataclass(tp):
        return from_json_dict(tp, value, where, allow_unknown)
    if origin is list:
        if not isinstance(value, list):
            raise ArtifactError(f"{where}: expected a list, got {type(value).__name__}")
        (inner,) = typing.get_args(tp)
        return [_convert(inner, v, f"{where}[{i}]", allow_unknown) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ArtifactError(f"{where}: expected an object, got {type(value).__name__}")
        _, inner = typing.get_args(tp)
        return {str(k): _convert(inner, v, f"{where}.{k}", allow_unknown) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArtifactError(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ArtifactError(f"{where}: expected an integer, got {type(value).__name__}")
    if tp in (str, bool) and not isinstance(value, tp):
        raise ArtifactError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def parse_version(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in text.split("."))
    except (ValueError, AttributeError):
        raise ArtifactError(f"manifest: schema_version {text!r} is not MAJOR.MINOR") from None
    return major, minor


def manifest_from_json(data: Any) -> Manifest:
    if not isinstance(data, dict) or not isinstance(data.get("schema_version"), str):
        raise ArtifactError("manifest: no schema_version; this is not a Fate artifact")
    major, minor = parse_version(data["schema_version"])
    our_major, our_minor = parse_version(SCHEMA_VERSION)
    if major > our_major:
        raise ArtifactError(
            f"artifact schema {data['schema_version']} is newer than this runtime reads ({SCHEMA_VERSION}); "
            f"install the Fate version that wrote it ({data.get('fate_version', 'unknown')}) or newer")
    if major < our_major:
        raise ArtifactError(f"artifact schema {data['schema_version']} is too old for this runtime; recompile it")
    manifest = from_json_dict(Manifest, data, allow_unknown=minor > our_minor)
    manifest.validate()
    return manifest
