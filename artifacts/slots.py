"""The slot image of an expert: where each of its weight tensors lies inside its ONNX file.

A runtime that reads an expert's file whole into a buffer (a slot) computes the expert from the
bytes in place, with no protobuf parse: the manifest says, per MoE layer and quantized precision,
at which offset each tensor's raw bytes start. Every expert file of one layer and precision has
the same graph with same-sized tensors, so one layout serves them all (the compiler checks it).

Offsets are untrusted input: `check_layout` holds them against the shapes the layout implies and
the sizes of the files, before native code reads a byte.

The ONNX wire format (protobuf, onnx.proto3): ModelProto.graph is field 7; GraphProto.initializer
is field 5 (repeated TensorProto); TensorProto.name is field 8, raw_data field 9.
"""

from __future__ import annotations

import math

from .errors import ArtifactError
from .graph_check import WireError, field_spans
from .native_contract import (ACTIVATIONS, GATED, PROJECTIONS, QK_NORMS, STEP, DecodeStep, ExpertLayout, HeadStep, RoutingSpec,
                              TensorView)
from .precisions import QUANTIZED_BITS

QUANT_PARTS = ("qweight", "scales", "zero_points")
DTYPE_SIZES = {"uint8": 1, "float32": 4}

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_NAME, _TENSOR_RAW_DATA = 7, 5, 8, 9

MAX_BLOCK_SIZE = 1 << 16  # quantization groups along K that a reader accepts (and the compiler writes)


def initializer_ranges(model: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset, length) of each initializer's raw_data inside serialized ONNX bytes."""
    found = {}
    try:
        for number, wire, start, end, _ in field_spans(model, 0, len(model)):
            if number != _MODEL_GRAPH or wire != 2:
                continue
            for g_number, g_wire, t_start, t_end, _ in field_spans(model, start, end):
                if g_number != _GRAPH_INITIALIZER or g_wire != 2:
                    continue
                name, raw = None, None
                for t_number, t_wire, v_start, v_end, _ in field_spans(model, t_start, t_end):
                    if t_number == _TENSOR_NAME and t_wire == 2:
                        name = model[v_start:v_end].decode("utf-8", "replace")
                    elif t_number == _TENSOR_RAW_DATA and t_wire == 2:
                        raw = (v_start, v_end - v_start)
                if name is not None and raw is not None:
                    found[name] = raw
    except WireError as e:
        raise ArtifactError(f"expert graph is not a well-formed ONNX model: {e}") from None
    return found


def expected_tensors(layout: ExpertLayout) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor a layout must place, from its numbers alone
    (MatMulNBits' layout: see compiler/quantize.py)."""
    h, i, bits, bs = layout.hidden_size, layout.intermediate_size, layout.bits, layout.block_size
    shapes = {}
    for proj, (n, k) in zip(PROJECTIONS, ((i, h), (i, h), (h, i))):
        if proj == "gate" and layout.activation not in GATED:
            continue
        shapes.update(quantized_tensors(proj, n, k, bits, bs))
        if layout.has_bias:
            shapes[f"{proj}.bias"] = ("float32", (n,))
    return shapes


def quantized_tensors(name: str, n: int, k: int, bits: int, bs: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The three tensors of an [n, k] weight in MatMulNBits' layout (compiler/quantize.py)."""
    blocks = -(-k // bs)
    return {f"{name}.qweight": ("uint8", (n, blocks, bs * bits // 8)),
            f"{name}.scales": ("float32", (n * blocks,)),
            f"{name}.zero_points": ("uint8", (n * (-(-blocks * bits // 8)),))}


# The ONNX initializer each decode-step tensor is, where the names differ (a writer MUST use these names;
# the compiler's layer graphs name them by role: compiler/graphs/layer.py layer_graph)
STEP_INITIALIZERS = {"attn_norm": "attn_norm.norm_weight", "mlp_norm": "mlp_norm.norm_weight",
                     "router": "router.weight", "shared_expert_gate": "shared_expert_gate.weight",
                     "next_router": "next_router.weight", "next_norm": "next_norm.norm_weight",
                     "q_norm": "q_norm.norm_weight", "k_norm": "k_norm.norm_weight",
                     "final_norm": "final_norm.norm_weight", "score_bias": "routing.score_bias",
                     "next_score_bias": "next_scores.score_bias"}


# (hidden size, query heads, key/value heads, head dim): the attention sizes a decode step's tensors follow
Heads = tuple[int, int, int, int]

# A decode step's tensors, in the order the native step reads their offsets (native_contract.STEP).
STEP_TENSORS = STEP.tensor_names


def expected_step_tensors(step: DecodeStep, heads: Heads, experts: int,
                          next_experts: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor a layer's decode step reads, from its numbers alone:
    `experts` routed experts, and the next layer's `next_experts` (0: no cross-layer prediction)."""
    h, q, kv, d = heads
    bits, bs, inter = step.bits, step.block_size, step.shared_intermediate_size
    want = {"attn_norm": ("float32", (h,)),
            **quantized_tensors("qkv", (q + 2 * kv) * d, h, bits, bs),
            **quantized_tensors("o", h, q * d, bits, bs),
            "mlp_norm": ("float32", (h,)), "router": ("float32", (h, experts))}
    if step.qkv_bias:
        want["qkv.bias"] = ("float32", ((q + 2 * kv) * d,))
    if step.qk_norm != "none":  # one weight per head dim, or per channel of the whole projection
        per_head = step.qk_norm == "head"
        want["q_norm"] = ("float32", (d if per_head else q * d,))
        want["k_norm"] = ("float32", (d if per_head else kv * d,))
    if inter:
        want.update(quantized_tensors("shared_gate_up", 2 * inter, h, bits, bs))
        want.update(quantized_tensors("shared_down", h, inter, bits, bs))
        if step.shared_expert_gate:
            want["shared_expert_gate"] = ("float32", (h, 1))
    if step.score_bias:
        want["score_bias"] = ("float32", (experts,))
    if step.o_bias:
        want["o.bias"] = ("float32", (h,))
    if next_experts:
        want["next_router"] = ("float32", (h, next_experts))
        if step.next_norm:
            want["next_norm"] = ("float32", (h,))
        if step.next_score_bias:
            want["next_score_bias"] = ("float32", (next_experts,))
    return want


def expected_head_tensors(step: HeadStep, hidden: int, vocab: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor the head's decode step reads."""
    want = {"final_norm": ("float32", (hidden,)),
            **quantized_tensors("lm_head", vocab, hidden, step.bits, step.block_size)}
    if step.has_bias:
        want["lm_head.bias"] = ("float32", (vocab,))
    return want


def check_head_step(step: HeadStep, hidden: int, vocab: int, file_size: int, where: str) -> None:
    """Refuse a head step the native step does not compute, or whose tensors are not exactly the
    expected ones inside the head graph file."""
    check_quantized_numbers(step, where)
    if not math.isfinite(step.norm_eps) or not math.isfinite(step.logits_scaling) or step.logits_scaling == 0:
        raise ArtifactError(f"{where}: numbers out of range")
    check_views(step.tensors, expected_head_tensors(step, hidden, vocab), file_size, where)


def check_quantized_numbers(step: DecodeStep | HeadStep, where: str) -> None:
    if step.bits not in QUANTIZED_BITS or step.block_size < 16 or step.block_size & (step.block_size - 1) \
            or step.block_size > MAX_BLOCK_SIZE or step.accuracy_level not in (0, 1, 2, 3, 4):
        raise ArtifactError(f"{where}: unsupported bits {step.bits}, block size {step.block_size} or accuracy level")


def check_decode_step(step: DecodeStep, heads: Heads, routing: RoutingSpec, next_experts: int, file_size: int,
                      where: str) -> None:
    """Refuse a decode step whose numbers the native step does not compute, or whose tensors are not
    exactly the expected ones inside its graph file."""
    experts = routing.num_experts
    sigmoid = routing.scoring == "sigmoid"
    if step.group_topk is not None:
        groups, kept = step.group_topk if len(step.group_topk) == 2 else (0, 0)
        if not sigmoid or groups < 1 or experts % groups or experts // groups < 2 or not 1 <= kept <= groups \
                or kept * (experts // groups) < routing.top_k:  # the kept groups hold the top-k
            raise ArtifactError(f"{where}: expert groups {step.group_topk} do not fit {experts} experts, "
                                f"top-{routing.top_k}")
    if (step.score_bias or step.next_score_bias) and not sigmoid or not 0 <= step.topk_norm_eps < math.inf \
            or (step.next_score_bias and not next_experts):
        raise ArtifactError(f"{where}: a score bias without sigmoid routing, or numbers out of range")
    check_quantized_numbers(step, where)
    numbers = (step.attention_scale, step.norm_eps, step.shared_scale, step.routed_scaling)
    if not all(math.isfinite(x) for x in numbers) or not 0 <= step.shared_intermediate_size <= (1 << 20):
        raise ArtifactError(f"{where}: numbers out of range")
    if step.qk_norm not in QK_NORMS or (step.clip_qkv is not None and not 0 < step.clip_qkv < math.inf):
        raise ArtifactError(f"{where}: unknown q/k norm {step.qk_norm!r} or a clamp out of range")
    if (step.shared_expert_gate and not step.shared_intermediate_size) or (step.next_norm and not next_experts):
        raise ArtifactError(f"{where}: a gate without a shared expert, or a norm without a prediction")
    check_views(step.tensors, expected_step_tensors(step, heads, experts, next_experts), file_size, where)


def nbytes(view: TensorView) -> int:
    count = 1
    for d in view.shape:
        count *= d
    return count * DTYPE_SIZES[view.dtype]


def check_layout(layout: ExpertLayout, file_size: int, where: str) -> None:
    """Refuse a layout whose tensors are not exactly the expected ones, or do not lie inside a
    file of `file_size` bytes without overlapping."""
    if layout.bits not in QUANTIZED_BITS or layout.block_size < 16 or layout.block_size & (layout.block_size - 1) \
            or layout.block_size > MAX_BLOCK_SIZE:
        raise ArtifactError(f"{where}: unsupported bits {layout.bits} or block size {layout.block_size}")
    if layout.activation not in ACTIVATIONS or layout.accuracy_level not in (0, 1, 2, 3, 4):
        raise ArtifactError(f"{where}: unknown activation {layout.activation!r} or accuracy level")
    if layout.activation == "swiglu_clamped" and (layout.swiglu_limit is None or layout.swiglu_alpha is None):
        raise ArtifactError(f"{where}: a clamped SwiGLU needs its limit and alpha")
    check_views(layout.tensors, expected_tensors(layout), file_size, where)


def check_views(tensors: list[TensorView], want: dict[str, tuple[str, tuple[int, ...]]], file_size: int,
                where: str) -> None:
    """Refuse views that are not exactly the tensors `want` names with their dtypes and shapes, or
    that do not lie inside a file of `file_size` bytes without overlapping."""
    views = {v.name: v for v in tensors}
    if len(views) != len(tensors) or set(views) != set(want):
        raise ArtifactError(f"{where}: places {sorted(views)}, expected {sorted(want)}")
    spans = []
    for name, (dtype, shape) in want.items():
        view = views[name]
        if view.dtype != dtype or tuple(view.shape) != shape:
            raise ArtifactError(f"{where}: {name} is {view.dtype} {view.shape}, expected {dtype} {list(shape)}")
        end = view.offset + nbytes(view)
        if view.offset < 0 or end > file_size:
            raise ArtifactError(f"{where}: {name} at bytes {view.offset}..{end} lies outside the "
                                f"{file_size}-byte file")
        spans.append((view.offset, end, name))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ArtifactError(f"{where}: {name} and {other} overlap")


def views_of(model: bytes, want: dict[str, tuple[str, tuple[int, ...]]],
             stored: dict[str, str] | None = None) -> list[TensorView]:
    """Where each tensor of `want` lies in serialized ONNX bytes: the initializer of its name, or of
    the name `stored` gives it."""
    ranges = initializer_ranges(model)
    views = []
    for name, (dtype, shape) in want.items():
        initializer = (stored or {}).get(name, name)
        if initializer not in ranges:
            raise ArtifactError(f"graph has no initializer {initializer!r} stored as raw data")
        view = TensorView(name, ranges[initializer][0], dtype, list(shape))
        if ranges[initializer][1] != nbytes(view):
            raise ArtifactError(f"graph initializer {initializer!r} has {ranges[initializer][1]} bytes, "
                                f"expected {dtype} {list(shape)}")
        views.append(view)
    return views


def layout_of(model: bytes, layout: ExpertLayout) -> ExpertLayout:
    """`layout` with the offsets found in serialized expert bytes (tensors placed by name)."""
    import dataclasses

    return dataclasses.replace(layout, tensors=views_of(model, expected_tensors(layout)))


def check_step_in_graph(step: DecodeStep | HeadStep, graph: bytes, where: str) -> None:
    """Refuse a decode step whose tensors are not exactly where the graph keeps the initializers they
    name: the step then computes what the graph computes, from the same bytes."""
    ranges = initializer_ranges(graph)
    for view in step.tensors:
        if ranges.get(STEP_INITIALIZERS.get(view.name, view.name)) != (view.offset, nbytes(view)):
            raise ArtifactError(f"{where}: {view.name} at byte {view.offset} is not the graph's "
                                f"{STEP_INITIALIZERS.get(view.name, view.name)!r}")
