"""A layer's decode step in native code (runtime.decode_step): the same numbers as the layer graph it
is read from, layer by layer and over a generation; where it runs and where the graph does; and a
manifest that places its tensors anywhere but where the graph keeps them is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import Built
from fate.artifacts import Artifact, ArtifactError
from fate.artifacts.budget import parse_budget
from fate.artifacts.layout import GraphIO as IO
from fate.runtime import native
from fate.runtime.experts.offload import OffloadOptions
from fate.runtime.model import FateModel
from fate.runtime.options import EngineOptions
from step_checks import assert_steps_match_graphs, rel_err

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel not built")

# (family, dense bits, accuracy level, config overrides): a shared expert with its gate, q|k|v biases
# and cross-layer predictions (qwen2_moe), float32 activations, a window shorter than the context, and
# q and k normalized per head (qwen3_moe, whose head_dim is not hidden / heads) or over the whole
# projection, then clamped (olmoe)
CASES = {
    "qwen2_moe-int4": ("qwen2_moe", 4, 4, {}),
    "qwen2_moe-int8-float": ("qwen2_moe", 8, 0, {}),
    "mixtral-window": ("mixtral", 4, 4, {"sliding_window": 5}),
    "qwen3_moe-qk-norms": ("qwen3_moe", 4, 4, {}),
    "olmoe-projection-norms-clamp": ("olmoe", 4, 4, {"clip_qkv": 0.8}),
    # sigmoid routing over expert groups with a correction bias, half the head rotated, a dense first layer
    "glm4_moe-sigmoid-groups": ("glm4_moe", 4, 4, {"head_dim": 32}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, dense_bits, level, overrides = CASES[request.param]
    built = Built(tmp_path_factory.mktemp(request.param), family=family, seed=21, **overrides)
    return built, built.artifact(4, dense_bits=dense_bits, accuracy_level=level)


def test_each_step_computes_what_its_graph_computes(case):
    """Every layer with a step, on the same hidden state and cache (a prompt longer than the window):
    the graph's outputs to float32 rounding, the same experts chosen, the same key and value added.
    Run with the layer's experts (all resident), the step's output is its residual plus the routed
    experts' sum exactly as the runtime adds them after a graph: the same bits."""
    _, path = case
    model = FateModel.load(path)
    assert set(model.steps) == {layer.index for layer in model.manifest.layers if layer.kind == "moe"} != set()
    assert all(step.routed is not None for step in model.steps.values())
    assert_steps_match_graphs(model)


def test_the_head_step_computes_what_the_head_graph_computes(case):
    """Logits from the head graph's bytes, one token or a whole sequence's (row by row: the model keeps
    no head session): the graph's to float32 rounding."""
    _, path = case
    model = FateModel.load(path)
    assert model.native_head is not None and model.head is None
    hidden = np.random.default_rng(2).standard_normal((1, 3, model.spec.hidden_size)).astype(np.float32)
    want = model.graph_session(model.manifest.head_graph).run([IO.LOGITS], {IO.HIDDEN: hidden})[0][0]
    got = model.head_logits(hidden)
    assert got.shape == want.shape == (3, model.spec.vocab_size)
    assert rel_err(got, want) < 1e-5 and (got.argmax(axis=1) == want.argmax(axis=1)).all()


def test_generation_with_steps_follows_the_graphs(case):
    """Prefill, then decode through the steps (keys and values in place), a cut as a conversation's
    next turn, and decode again: the logits of the graphs alone to the int8 math's rounding (a last-bit
    difference in an activation can move its int8 code by one, about 1% of a block: the bound of the
    native-against-session check in test_parity; a wrong head, window or weight moves logits by their
    own size)."""
    _, path = case
    ids = np.random.default_rng(1).integers(1, 300, 30)

    def run(model):
        cache = model.new_cache()
        rows = [model.head_logits(model.forward(ids[:10], cache))]
        rows += [model.head_logits(model.forward(ids[i:i + 1], cache)) for i in range(10, 22)]
        cut = cache.prefix(16)
        rows += [model.head_logits(model.forward(ids[22:26], cut))]
        rows += [model.head_logits(model.forward(ids[i:i + 1], cut)) for i in range(26, 30)]
        return np.concatenate(rows)

    with_steps = FateModel.load(path)
    graphs = FateModel.load(path, EngineOptions(decode_steps=False))
    assert with_steps.steps and with_steps.native_head and not graphs.steps and graphs.native_head is None
    assert rel_err(run(with_steps), run(graphs)) < 2e-2


def test_steps_off_the_session_executor_and_a_missing_kernel_run_the_graphs(case, monkeypatch):
    _, path = case
    assert FateModel.load(path, EngineOptions(executor="session")).steps == {}
    off = FateModel.load(path, EngineOptions(decode_steps=False))  # --decode-steps off
    assert off.steps == {} and off.native_head is None
    offloaded = FateModel.load(path, EngineOptions(executor="session", offload=OffloadOptions(parse_budget("50%"))))
    assert offloaded.steps == {}
    offloaded.close()
    monkeypatch.setattr(native, "KERNEL", None)
    model = FateModel.load(path)
    assert model.steps == {} and model.native_head is None
    assert np.isfinite(model.logits([3, 4, 5])).all()


def edited(path, tmp_path, edit) -> str:
    art = tmp_path / "art"
    shutil.copytree(path, art)
    data = json.loads((art / "manifest.json").read_text())
    edit(next(layer for layer in data["layers"] if layer.get("decode_step")))
    (art / "manifest.json").write_text(json.dumps(data))
    return str(art)


def views(layer) -> dict:
    return {view["name"]: view for view in layer["decode_step"]["tensors"]}


@pytest.mark.parametrize("edit,message", [
    (lambda layer: views(layer)["qkv.scales"].update(offset=10**9), "lies outside"),
    (lambda layer: views(layer)["router"].update(shape=[1, 1]), "router is float32"),
    (lambda layer: layer["decode_step"].update(bits=3), "unsupported bits"),
    (lambda layer: layer["decode_step"].update(group_topk=[3, 1]), "expert groups"),
    (lambda layer: layer["decode_step"].update(qk_norm="every other"), "unknown q/k norm"),
    (lambda layer: layer["decode_step"]["tensors"].pop(), "places"),
    (lambda layer: layer.update(positions="per_token"), "routed MoE layer with fused attention"),
])
def test_a_step_that_does_not_fit_its_numbers_is_refused(case, tmp_path, edit, message):
    _, path = case
    with pytest.raises(ArtifactError, match=message):
        Artifact.open(edited(path, tmp_path, edit))


@pytest.mark.parametrize("edit,message", [
    (lambda step: step["tensors"][0].update(offset=10**9), "lies outside"),
    (lambda step: step.update(logits_scaling=0), "out of range"),
    (lambda step: step.update(has_bias=True), "places"),
])
def test_a_head_step_that_does_not_fit_is_refused(case, tmp_path, edit, message):
    _, path = case
    art = tmp_path / "art"
    shutil.copytree(path, art)
    data = json.loads((art / "manifest.json").read_text())
    edit(data["head_step"])
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        Artifact.open(str(art))


def test_a_head_step_off_its_initializers_is_refused_before_it_runs(case, tmp_path):
    _, path = case
    art = tmp_path / "art"
    shutil.copytree(path, art)
    data = json.loads((art / "manifest.json").read_text())
    norm = next(view for view in data["head_step"]["tensors"] if view["name"] == "final_norm")
    norm["offset"] -= 4
    (art / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="head step: final_norm"):
        FateModel.load(str(art))


def test_a_step_pointing_at_other_bytes_of_the_graph_is_refused_before_it_runs(case, tmp_path):
    """Two tensors of one shape swapped: the manifest alone cannot tell, the graph can."""
    _, path = case

    def swap(layer):
        found = views(layer)
        found["attn_norm"]["offset"], found["mlp_norm"]["offset"] = \
            found["mlp_norm"]["offset"], found["attn_norm"]["offset"]

    with pytest.raises(ArtifactError, match="decode step: attn_norm"):
        FateModel.load(edited(path, tmp_path, swap))


def test_a_step_in_two_calls_has_the_bits_of_the_step_in_one(case):
    """route, then finish (an offloaded decode step, the reads of its misses begun between the two): every
    output, key and value of run, bit for bit, with the layer's experts all there (run by the step) or none;
    finish checks what it is given."""
    _, path = case
    model = FateModel.load(path)
    rng = np.random.default_rng(5)
    cache = model.new_cache()
    model.forward(rng.integers(1, 300, 6), cache)
    cos, sin = model.positions.upto(cache.length + 1)
    h = model.spec.hidden_size
    for step in model.steps.values():
        present = step.routed
        hidden = rng.standard_normal((1, 1, h)).astype(np.float32)
        for routed in (present, present._replace(where=np.full_like(present.where, -1))):
            step.routed = routed
            whole, ran = step.run(hidden, cache, cos, sin)
            state = {name: array[..., cache.length, :].copy() for name, array in cache.reserve(
                step.index, cache.length + 1, model.spec.max_positions).items()}
            parts = step.route(hidden, cache, cos, sin)
            assert step.finish(parts) is ran is (routed is present)
            assert whole.keys() == parts.keys()
            for name in whole:
                np.testing.assert_array_equal(parts[name], whole[name], err_msg=name)
            for name, array in cache.reserve(step.index, cache.length + 1, model.spec.max_positions).items():
                np.testing.assert_array_equal(array[..., cache.length, :], state[name], err_msg=name)
        step.routed = present
    step = next(iter(model.steps.values()))
    out = step.route(np.zeros((1, 1, h), np.float32), cache, cos, sin)
    args = [step.vector, step.numbers, step.graph, out[IO.RESIDUAL], out[IO.ROUTER_INPUT], out[IO.EXPERT_IDS],
            out[IO.EXPERT_WEIGHTS], 2, step.routed]
    for index, bad in ((3, out[IO.RESIDUAL][..., :-1]), (5, out[IO.EXPERT_IDS][:, :-1]), (2, step.graph[:100])):
        with pytest.raises(ValueError):
            native.KERNEL.finish_step(*args[:index], bad, *args[index + 1:])
    with pytest.raises(IndexError):
        native.KERNEL.finish_step(*args[:5], np.full_like(out[IO.EXPERT_IDS], len(step.routed.where)), *args[6:])


def test_the_native_call_checks_what_it_is_given(case):
    """Wrong sizes, a position outside the caches, a vector with an offset past the graph, experts that
    do not fit: an exception, never a read or write out of bounds."""
    _, path = case
    model = FateModel.load(path)
    step = next(iter(model.steps.values()))
    h, k = model.spec.hidden_size, step.top_k
    kv, d = model.spec.num_kv_heads, model.spec.head_dim
    cos, sin = model.positions.upto(8)

    def call(vector=step.vector, graph=step.graph, x=np.zeros(h, np.float32), cache=4, pos=2, ids=k, routed=None):
        key = np.zeros((1, kv, cache, d), np.float32)
        predicted = [np.empty(step.next_experts, np.float32)] * 2 if step.next_experts else [None, None]
        return native.KERNEL.run_step(vector, step.numbers, graph, x, key, key.copy(), pos, cos[pos % 8],
                                      sin[pos % 8], np.empty(h, np.float32), np.empty(h, np.float32),
                                      np.empty(ids, np.int64), np.empty(ids, np.float32), *predicted, 2, routed)

    assert call() is False
    where = step.routed.where
    assert call(routed=step.routed) is True
    assert call(routed=step.routed._replace(where=np.full_like(where, -1))) is False  # none there: the caller runs them
    pool = len(step.routed.pool)
    for bad in (where[:-1], np.append(where, 0), where.astype(np.int32), np.full_like(where, -2),
                np.full_like(where, pool), np.full_like(where, pool - 64), np.full_like(where, 2**62)):
        with pytest.raises(ValueError):  # an expert missing, outside the pool, or too short for its layout
            call(routed=step.routed._replace(where=bad))
    with pytest.raises(ValueError):
        call(routed=step.routed._replace(pool=step.routed.pool[:int(where.max())]))
    with pytest.raises(ValueError):
        call(x=np.zeros(h + 1, np.float32))
    with pytest.raises(ValueError):
        call(ids=k + 1)
    with pytest.raises(IndexError):
        call(pos=4)
    with pytest.raises(ValueError):
        call(graph=step.graph[:len(step.graph) // 2])
    bad = step.vector.copy()
    bad[-5] = 10**12
    with pytest.raises(ValueError):
        call(vector=bad)
    head = model.native_head
    logits = np.empty(model.spec.vocab_size, np.float32)
    native.KERNEL.run_head(head.vector, head.numbers, head.graph, np.zeros(h, np.float32), logits, 2)
    with pytest.raises(ValueError):
        native.KERNEL.run_head(head.vector, head.numbers, head.graph, np.zeros(h, np.float32), logits[:-1], 2)
    with pytest.raises(ValueError):
        native.KERNEL.run_head(head.vector, head.numbers, head.graph[:100], np.zeros(h, np.float32), logits, 2)
    with pytest.raises(ValueError):
        native.KERNEL.run_head(head.vector, (1e-6, 0.0), head.graph, np.zeros(h, np.float32), logits, 2)


@pytest.mark.parametrize("family, reason", [("deepseek_v3", "latent attention"), ("hunyuan_v1_moe", "q/k norms after RoPE"),
                                            ("llama4_text", "q/k norms after RoPE"),
                                            ("mimo_v2_flash", "RoPE of its own (the step rotates with the model's tables)"),
                                            ("mimo_v2_flash", "attention the fused kernel cannot take (value heads of 12 "
                                                              "beside key heads of 16)"),
                                            ("nemotron_h", "a layer without a token mixer"), ("lfm2_moe", "a short_conv layer")])
def test_a_layer_without_a_step_says_why(family, reason, tmp_path):
    """The manifest (and fate-inspect) names what the step cannot compute, not a symptom of it."""
    built = Built(tmp_path, family=family, seed=21)
    layers = Artifact.open(built.artifact(4)).manifest.layers
    assert any(layer.graph_only == reason for layer in layers if layer.kind == "moe"), \
        [layer.graph_only for layer in layers]
