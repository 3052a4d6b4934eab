"""Each dense graph's declared inputs and outputs checked against what the runtime will feed it and
read from it, at load, so that a manifest whose numbers contradict its graphs (KV heads, head or
rotary sizes, hidden size, expert counts, top-k, a prediction output the next layer expects) is
refused in one line naming the graph, instead of failing inside onnxruntime mid-generation or
routing to an expert that does not exist.

A declared dimension that is a name (a dynamic axis: sequence, past, total length) matches any
size; a number must equal the runtime's."""

from __future__ import annotations

import onnxruntime as ort

from fate.artifacts import ArtifactError, LayerSpec, Manifest
from fate.artifacts.layout import GraphIO as IO
from fate.artifacts.predictors import PREDICTION_OUTPUTS

Shape = tuple  # ints, or None where the size varies from step to step
FLOAT, INT32, INT64 = "tensor(float)", "tensor(int32)", "tensor(int64)"


def check_interface(session: ort.InferenceSession, label: str, inputs: dict[str, tuple[Shape, str]],
                    outputs: dict[str, tuple[Shape, str]]) -> None:
    """inputs: exactly what the runtime feeds; outputs: what it reads (the graph may have more)."""
    declared_in = {i.name: i for i in session.get_inputs()}
    extra = sorted(set(declared_in) - set(inputs))
    if extra:
        raise ArtifactError(f"{label} wants inputs the runtime does not feed: {', '.join(extra)}")
    declared_out = {o.name: o for o in session.get_outputs()}
    for kind, wanted, declared in (("input", inputs, declared_in), ("output", outputs, declared_out)):
        for name, (shape, dtype) in wanted.items():
            arg = declared.get(name)
            if arg is None:
                raise ArtifactError(f"{label} has no {kind} {name!r}")
            if arg.type != dtype:
                raise ArtifactError(f"{label}: {kind} {name} is {arg.type}, the runtime uses {dtype}")
            if not fits(arg.shape, shape):
                raise ArtifactError(f"{label}: {kind} {name} is declared {list(arg.shape)}, but the manifest "
                                    f"says {[d if d is not None else '*' for d in shape]}")


def fits(declared, expected: Shape) -> bool:
    if declared is None:  # no shape information at all: nothing to compare
        return True
    if len(declared) != len(expected):
        return False
    return all(not isinstance(d, int) or e is None or d == e for d, e in zip(declared, expected))


def layer_interface(manifest: Manifest, layer: LayerSpec) -> tuple[dict, dict]:
    """What the runtime feeds one decoder layer graph and reads from it (runtime.model.forward)."""
    spec = manifest.model
    h, kv = spec.hidden_size, spec.kv_heads(layer)
    inputs = {IO.HIDDEN: ((1, None, h), FLOAT)}
    outputs = {IO.RESIDUAL: ((1, None, h), FLOAT)}
    if layer.mixer == "attention":
        rotary = 2 * len(spec.inv_freq(layer))
        state = {"key": (1, kv, None, spec.key_dim), "value": (1, kv, None, spec.value_dim)}
        inputs[IO.ATTN_BIAS] = ((None, None), FLOAT)
        if layer.positions == "tables":
            inputs.update({IO.COS_CACHE: ((None, rotary // 2), FLOAT), IO.SIN_CACHE: ((None, rotary // 2), FLOAT),
                           IO.SEQLENS: ((1,), INT32), IO.TOTAL_LENGTH: ((), INT32)})
        else:
            inputs.update({IO.COS: ((None, rotary), FLOAT), IO.SIN: ((None, rotary), FLOAT)})
    else:
        state = {s.name: tuple(s.shape) for s in layer.state}
    inputs.update({IO.past(name): (shape, FLOAT) for name, shape in state.items()})
    outputs.update({IO.present(name): (shape, FLOAT) for name, shape in state.items()})
    if layer.kind == "moe":
        experts, k = layer.routing.num_experts, layer.routing.top_k
        if layer.expert_input_size:  # the experts' input in their latent space
            outputs[IO.EXPERT_INPUT] = ((None, layer.expert_input_size), FLOAT)
        outputs.update({IO.ROUTER_INPUT: ((None, h), FLOAT), IO.ROUTER_LOGITS: ((None, experts), FLOAT),
                        IO.EXPERT_IDS: ((None, k), INT64), IO.EXPERT_WEIGHTS: ((None, k), FLOAT)})
    if layer.predicts_next:
        outputs.update(prediction_outputs(manifest.layers[layer.index + 1]))
    return inputs, outputs


def prediction_outputs(following: LayerSpec) -> dict[str, tuple[Shape, str]]:
    """The cross-layer predictions of `following`'s router scores a graph before it computes."""
    return {name: ((None, following.routing.num_experts), FLOAT)
            for name in PREDICTION_OUTPUTS}


def combine_interface(manifest: Manifest, layer: LayerSpec) -> tuple[dict, dict]:
    h = manifest.model.hidden_size
    return ({IO.RESIDUAL: ((1, None, h), FLOAT), IO.ROUTED: ((None, layer.expert_input_size or h), FLOAT)},
            {IO.HIDDEN: ((1, None, h), FLOAT)})


def embed_interface(manifest: Manifest) -> tuple[dict, dict]:
    outputs = {IO.HIDDEN: ((1, None, manifest.model.hidden_size), FLOAT)}
    if manifest.embed_predicts_next:
        outputs.update(prediction_outputs(manifest.layers[0]))
    return {IO.INPUT_IDS: ((None,), INT64)}, outputs


def head_interface(manifest: Manifest) -> tuple[dict, dict]:
    h, vocab = manifest.model.hidden_size, manifest.model.vocab_size
    return {IO.HIDDEN: ((1, None, h), FLOAT)}, {IO.LOGITS: ((1, None, vocab), FLOAT)}
