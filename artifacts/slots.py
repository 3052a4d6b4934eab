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

from .errors import ArtifactError
from .graph_check import WireError, field_spans
from .schema import ExpertLayout, TensorView

PROJECTIONS = ("gate", "up", "down")
QUANT_PARTS = ("qweight", "scales", "zero_points")
DTYPE_SIZES = {"uint8": 1, "float32": 4}
ACTIVATIONS = ("swiglu", "swiglu_clamped")

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
        blocks = -(-k // bs)
        shapes[f"{proj}.qweight"] = ("uint8", (n, blocks, bs * bits // 8))
        shapes[f"{proj}.scales"] = ("float32", (n * blocks,))
        shapes[f"{proj}.zero_points"] = ("uint8", (n * (-(-blocks * bits // 8)),))
        if layout.has_bias:
            shapes[f"{proj}.bias"] = ("float32", (n,))
    return shapes


def nbytes(view: TensorView) -> int:
    count = 1
    for d in view.shape:
        count *= d
    return count * DTYPE_SIZES[view.dtype]


def check_layout(layout: ExpertLayout, file_size: int, where: str) -> None:
    """Refuse a layout whose tensors are not exactly the expected ones, or do not lie inside a
    file of `file_size` bytes without overlapping."""
    if layout.bits not in (2, 4, 8) or layout.block_size < 16 or layout.block_size & (layout.block_size - 1) \
            or layout.block_size > MAX_BLOCK_SIZE:
        raise ArtifactError(f"{where}: unsupported bits {layout.bits} or block size {layout.block_size}")
    if layout.activation not in ACTIVATIONS or layout.accuracy_level not in (0, 1, 2, 3, 4):
        raise ArtifactError(f"{where}: unknown activation {layout.activation!r} or accuracy level")
    if layout.activation == "swiglu_clamped" and (layout.swiglu_limit is None or layout.swiglu_alpha is None):
        raise ArtifactError(f"{where}: a clamped SwiGLU needs its limit and alpha")
    want = expected_tensors(layout)
    views = {v.name: v for v in layout.tensors}
    if len(views) != len(layout.tensors) or set(views) != set(want):
        raise ArtifactError(f"{where}: the slot layout places {sorted(views)}, expected {sorted(want)}")
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


def layout_of(model: bytes, layout: ExpertLayout) -> ExpertLayout:
    """`layout` with the offsets found in serialized expert bytes (tensors placed by name)."""
    import dataclasses

    ranges = initializer_ranges(model)
    views = []
    for name, (dtype, shape) in expected_tensors(layout).items():
        if name not in ranges:
            raise ArtifactError(f"expert graph has no initializer {name!r} stored as raw data")
        views.append(TensorView(name, ranges[name][0], dtype, list(shape)))
    return dataclasses.replace(layout, tensors=views)
