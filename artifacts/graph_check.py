"""Refuse ONNX graphs that could reach outside the artifact or run code the runtime does not
expect: external-data tensors (their location is a path), functions, subgraphs except a Scan's
body (which is checked by the same rules; a Scan runs once per element of its inputs, so it cannot
loop without end as a Loop could), and any operator outside the set Fate's compiler emits. Reads the protobuf wire format directly, so the
runtime needs no `onnx` package: a model is a few hundred fields around its weight bytes.

Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto,
TensorProto).
"""

from __future__ import annotations

import struct

from .errors import ArtifactError

ALLOWED_OPS = {
    "": {"Abs", "Add", "ArgMax", "Cast", "Clip", "Concat", "Div", "Equal", "Exp", "Expand", "Gather", "GatherElements",
         "Greater", "GreaterOrEqual", "Identity", "LayerNormalization", "MatMul", "Max", "Min", "Mul", "Neg", "Pow", "Reciprocal", "ReduceMax",
         "ReduceMean", "ReduceMin", "ReduceSum", "Reshape", "Scan", "Shape", "Relu", "Sigmoid", "Slice", "Softmax", "Softplus", "Split",
         "Sqrt", "Sub", "Tile", "TopK", "Transpose", "Unsqueeze", "Where"},
    "ai.onnx": set(),  # filled below: the same operators under their explicit domain name
    "com.microsoft": {"GroupQueryAttention", "MatMulNBits"},
}
ALLOWED_OPS["ai.onnx"] = ALLOWED_OPS[""]

# (message, field) pairs that are refused outright
MODEL_REFUSED = {20: "training_info", 25: "functions"}
GRAPH_REFUSED = {15: "sparse_initializer"}
ATTRIBUTE_REFUSED = {11: "subgraphs"}
ATTRIBUTE_GRAPH = 6  # one subgraph: only a Scan's body
SUBGRAPH_OPS = {"Scan"}
MAX_NESTING = 2
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14


class WireError(Exception):
    """Malformed or refused protobuf bytes; callers turn it into an ArtifactError naming the file."""


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def field_spans(buf, start: int, end: int):
    """(field number, wire type, value start, value end, varint value or None) of each field of the
    message in buf[start:end], positions absolute (the slot layout records them as offsets)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        number = None
        if wire == 0:
            number, after = _varint(buf, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 5:
            after = pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            after = pos + length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if after > end:
            raise WireError("truncated field")
        yield field, wire, pos, after, number
        pos = after


def _fields(buf: memoryview):
    """(field number, wire type, value): an int for varints, a memoryview for bytes."""
    for field, wire, start, end, number in field_spans(buf, 0, len(buf)):
        yield field, wire, number if wire == 0 else (buf[start:end] if wire == 2 else None)


def _text(value) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("a name is not UTF-8") from None


def _tensor(buf: memoryview) -> None:
    for field, wire, value in _fields(buf):
        if field == TENSOR_EXTERNAL_DATA or (field == TENSOR_DATA_LOCATION and wire == 0 and value == 1):
            raise WireError("a tensor uses external data (a file path), which artifacts never do")


def _node(buf: memoryview, depth: int) -> None:
    op_type, domain, subgraphs = "", "", []
    for field, wire, value in _fields(buf):
        if field == 4 and wire == 2:
            op_type = _text(value)
        elif field == 7 and wire == 2:
            domain = _text(value)
        elif field == 5 and wire == 2:
            for a_field, a_wire, a_value in _fields(value):
                if a_field in ATTRIBUTE_REFUSED:
                    raise WireError(f"operator {op_type or '?'} carries {ATTRIBUTE_REFUSED[a_field]}")
                if a_field == ATTRIBUTE_GRAPH:
                    subgraphs.append(a_value)
                if a_field == 5 and a_wire == 2:
                    _tensor(a_value)
    if domain not in ALLOWED_OPS:
        raise WireError(f"operator domain {domain!r} is not one the runtime knows")
    if op_type not in ALLOWED_OPS[domain]:
        raise WireError(f"operator {domain + '.' if domain else ''}{op_type} is not one Fate's graphs use")
    if subgraphs:  # judged once the whole node is read: its fields may come in any order
        if domain or op_type not in SUBGRAPH_OPS or len(subgraphs) != 1 or depth >= MAX_NESTING:
            raise WireError(f"operator {op_type or '?'} carries a subgraph")
        if not isinstance(subgraphs[0], memoryview):
            raise WireError("a subgraph attribute is not a message")
        _graph(subgraphs[0], depth + 1)


def _graph(buf: memoryview, depth: int = 0) -> None:
    for field, wire, value in _fields(buf):
        if field in GRAPH_REFUSED:
            raise WireError(f"the graph has {GRAPH_REFUSED[field]}")
        if field == 1 and wire == 2:
            _node(value, depth)
        elif field == 5 and wire == 2:
            _tensor(value)


def check_graph(data: bytes, label: str) -> None:
    """Raise ArtifactError naming `label` if the serialized ModelProto is not acceptable."""
    try:
        graphs = 0
        for field, wire, value in _fields(memoryview(data)):
            if field in MODEL_REFUSED:
                raise WireError(f"the model has {MODEL_REFUSED[field]}")
            if field == 8 and wire == 2:  # opset_import: its domain must be known
                for o_field, o_wire, o_value in _fields(value):
                    if o_field == 1 and o_wire == 2 and _text(o_value) not in ALLOWED_OPS:
                        raise WireError(f"it imports unknown operator domain {_text(o_value)!r}")
            elif field == 7 and wire == 2:
                graphs += 1
                _graph(value)
        if graphs != 1:
            raise WireError("it holds no graph")
    except WireError as e:
        raise ArtifactError(f"{label} is refused: {e}") from None


def float_attributes(data: bytes, op_type: str, name: str) -> list[float]:
    """The float attribute `name` of every node of `op_type` in the model's main graph (e.g. the
    attention scale of GroupQueryAttention), read from the wire format: a number the manifest
    repeats can be held to the graph's own."""
    values = []
    try:
        for field, wire, value in _fields(memoryview(data)):
            if field != 7 or wire != 2:
                continue
            for g_field, g_wire, node in _fields(value):
                if g_field != 1 or g_wire != 2:
                    continue
                fields = list(_fields(node))
                if not any(f == 4 and w == 2 and _text(v) == op_type for f, w, v in fields):
                    continue
                for f, w, attribute in fields:
                    if f != 5 or w != 2:
                        continue
                    parts = list(field_spans(attribute, 0, len(attribute)))
                    named = any(a == 1 and aw == 2 and _text(attribute[s:e]) == name for a, aw, s, e, _ in parts)
                    for a, aw, s, e, _ in parts:
                        if named and a == 2 and aw == 5:  # AttributeProto.f, a fixed32 float
                            values.append(struct.unpack("<f", bytes(attribute[s:e]))[0])
    except WireError:
        return []
    return values

