"""A small helper to write ONNX graphs by hand: named inputs, constant weights, ops, outputs.

Graphs are written directly (not traced) so that the compiler needs only one layer's weights
in memory at a time and every op is one we chose: standard ONNX at opset 17 plus
`com.microsoft.MatMulNBits` for quantized weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MS_DOMAIN = "com.microsoft"

FLOAT = TensorProto.FLOAT
INT32 = TensorProto.INT32
INT64 = TensorProto.INT64


@dataclass(frozen=True)
class WeightFormat:
    """How a graph's linear layers store their weights (see graphs.linear): float32 MatMul
    (bits 32), or block-wise quantized for MatMulNBits (bits 8 or 4) at `block_size` (None: the
    quantizer's default), computing at `accuracy_level`."""

    bits: int = 32
    block_size: int | None = None
    accuracy_level: int = 4


class GraphBuilder:
    def __init__(self, name: str, weights: WeightFormat = WeightFormat(), prefix: str = ""):
        """`prefix` starts every generated name: a subgraph's names must not repeat its outer graph's."""
        self.name = name
        self.prefix = prefix
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._renamed: dict[str, str] = {}  # values renamed to the graph output they became
        self._tag: str | None = None
        self._named: set[str] = set()
        self.uses_ms_domain = False

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        """Expose `value` as graph output `name`: the node computing it writes `name` directly (an
        Identity per output would be an op per step, and a copy of the KV cache for present_key),
        or through Identity where `value` is an input, a constant or already another output."""
        value = self._renamed.get(value, value)
        taken = {o.name for o in self.outputs} | {i.name for i in self.inputs}
        producer = next((n for n in self.nodes if value in n.output), None)
        if value != name and (producer is None or value in taken):
            self.nodes.append(helper.make_node("Identity", [value], [name]))
        elif value != name:
            for node in self.nodes:
                node.input[:] = [name if v == value else v for v in node.input]
                node.output[:] = [name if v == value else v for v in node.output]
            self._renamed[value] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def const(self, array: np.ndarray, hint: str = "const", name: str | None = None) -> str:
        """A constant initializer; `name` fixes its name (expert weights, which the manifest's slot
        layout finds by name), else a fresh one from `hint`."""
        if name is None and self._tag is not None and f"{self._tag}.{hint}" not in self._named:
            name = f"{self._tag}.{hint}"
        name = name or self.fresh(hint)
        self._named.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    @contextlib.contextmanager
    def tagged(self, tag: str):
        """Constants made inside are named `{tag}.{hint}` (the first of each hint): a reader finds a
        weight by role in the serialized graph (the decode step's tensors, artifacts/slots.py)."""
        outer, self._tag = self._tag, tag
        try:
            yield
        finally:
            self._tag = outer

    def ints(self, values: list[int], hint: str = "shape") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def scalar(self, value: float, hint: str = "scalar") -> str:
        return self.const(np.asarray(value, dtype=np.float32), hint)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        names = [self.fresh(op_type.lower()) for _ in range(outputs)]
        inputs = [self._renamed.get(i, i) for i in inputs]
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain or None, **attrs))
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        return names[0] if outputs == 1 else names

    def graph(self) -> onnx.GraphProto:
        """The graph alone, with its initializers: the body of a Scan (which must use only the
        default domain)."""
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.initializers)

    def model(self) -> onnx.ModelProto:
        """The model. Initializers are moved in one at a time (helper.make_graph/make_model
        would copy all of them twice: hundreds of MB for a large layer)."""
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(helper.make_graph(self.nodes, self.name, self.inputs, self.outputs),
                                  opset_imports=opsets, producer_name="fate-compile")
        model.ir_version = 9  # readable by onnxruntime >= 1.15
        while self.initializers:
            model.graph.initializer.append(self.initializers.pop(0))
        return model
