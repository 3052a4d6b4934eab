"""The position inputs the runtime feeds attention layer graphs (runtime.positions), and their keys and
values kept in place (runtime.state)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fate.artifacts import LayerSpec, ModelSpec
from fate.artifacts.layout import GraphIO as IO
from fate.runtime.positions import FIRST_TABLE_ROWS, PositionTables, attention_bias, rope


def spec(max_positions: int = 4096) -> ModelSpec:
    fields = {f.name: None for f in dataclasses.fields(ModelSpec)}
    inv_freq = (1.0 / 10000 ** (np.arange(0, 16, 2) / 16)).tolist()
    fields.update(rope_inv_freq=inv_freq, rope_attention_scaling=1.25, max_positions=max_positions,
                  sliding_window=None)
    return ModelSpec(**fields)


def layer(positions: str, window: int | None = None) -> LayerSpec:
    return LayerSpec(index=0, kind="dense", graph="g", sliding_window=window, positions=positions)


def rows(tables: PositionTables) -> int:
    """How many positions the model's tables hold."""
    return len(tables.tables[tuple(tables.spec.rope_inv_freq)][0])


def test_tables_hold_what_rope_gives_and_grow_by_doubling():
    model = spec()
    tables = PositionTables(model)
    cos, sin = tables.upto(3)
    assert cos.shape == (3, 8) and rows(tables) == FIRST_TABLE_ROWS
    full_cos, full_sin = rope(model, np.arange(700))
    cos, sin = tables.upto(700)
    assert rows(tables) == 700  # more than double what it had: exactly what is asked
    cos, sin = tables.upto(701)
    assert rows(tables) == 1400 and cos.shape == (701, 8)
    np.testing.assert_array_equal(cos[:700], full_cos[:, :8])
    np.testing.assert_array_equal(sin[:700], full_sin[:, :8])
    assert cos.flags.c_contiguous


def test_tables_stop_at_the_model_context():
    tables = PositionTables(spec(max_positions=300))
    tables.upto(280)
    tables.upto(290)
    assert rows(tables) == 300


def test_a_step_feeds_each_layer_its_kind():
    model = spec()
    step = PositionTables(model).step(10, 3)
    per_token = step.for_layer(layer("per_token"))
    cos, sin = rope(model, np.arange(10, 13))
    np.testing.assert_array_equal(per_token[IO.COS], cos)
    np.testing.assert_array_equal(per_token[IO.SIN], sin)
    tables = step.for_layer(layer("tables", window=4))
    assert set(tables) == {IO.COS_CACHE, IO.SIN_CACHE, IO.SEQLENS, IO.TOTAL_LENGTH, IO.ATTN_BIAS}
    assert tables[IO.COS_CACHE].shape == (13, 8)
    assert tables[IO.SEQLENS].tolist() == [12] and tables[IO.SEQLENS].dtype == np.int32
    assert int(tables[IO.TOTAL_LENGTH]) == 13 and tables[IO.TOTAL_LENGTH].shape == ()
    np.testing.assert_array_equal(tables[IO.ATTN_BIAS], attention_bias(model, 10, 3, 4))
    np.testing.assert_array_equal(per_token[IO.ATTN_BIAS], attention_bias(model, 10, 3))


def test_a_layer_with_its_own_rope_gets_its_own_tables():
    """MiMo-V2-Flash's sliding layers rotate with another base than its full ones: each layer is fed
    its own frequencies' cos and sin, the model's layers the model's, whatever order they are asked in."""
    model = spec()
    own = (1.0 / 500 ** (np.arange(0, 6, 2) / 6)).tolist()
    step = PositionTables(model).step(5, 2)
    for kind in ("per_token", "tables"):
        theirs = step.for_layer(dataclasses.replace(layer(kind), rope_inv_freq=own))
        ours = step.for_layer(layer(kind))
        cos, sin = rope(model, np.arange(5, 7), own)
        if kind == "per_token":
            np.testing.assert_array_equal(theirs[IO.COS], cos)
            np.testing.assert_array_equal(theirs[IO.SIN], sin)
            np.testing.assert_array_equal(ours[IO.COS], rope(model, np.arange(5, 7))[0])
        else:
            np.testing.assert_array_equal(theirs[IO.COS_CACHE][5:], cos[:, :3])
            assert theirs[IO.COS_CACHE].shape == (7, 3) and ours[IO.COS_CACHE].shape == (7, 8)


def test_keys_and_values_kept_in_place_give_the_same_numbers(mixtral, monkeypatch):
    """A prefill, decode steps, and a follow-up cut from an earlier point of the sequence (as a
    conversation's next turn): the same hidden states bit for bit whether the fused attention
    writes into the cache's buffers or the cache is copied each step."""
    from fate.runtime import state
    from fate.runtime.model import FateModel

    model = FateModel.load(mixtral.artifact(4))
    assert any(model.new_cache().in_place)
    ids = np.random.default_rng(0).integers(1, model.spec.vocab_size, 40)

    def run():
        cache = model.new_cache()
        hidden = [model.forward(ids[:20], cache)]
        hidden += [model.forward(ids[i:i + 1], cache) for i in range(20, 30)]
        cut = cache.prefix(25)
        hidden += [model.forward(ids[30:34], cut), model.forward(ids[34:35], cut)]
        return hidden, cut

    copied, cut = run()
    assert not any(cut._buffered(i) for i in range(len(cut.layers)))
    monkeypatch.setattr(state, "IN_PLACE_BYTES", 1)
    in_place, cut = run()
    assert all(cut._buffered(i) == cut.in_place[i] for i in range(len(cut.layers)))
    for a, b in zip(copied, in_place):
        np.testing.assert_array_equal(a, b)


def test_a_long_prompt_runs_in_steps_with_the_numbers_of_one(mixtral, monkeypatch):
    """A prompt longer than PREFILL_CHUNK runs as consecutive steps (bounded memory), with the logits
    of running it whole to float32 rounding, and greedy decoding goes on from either alike."""
    from fate.runtime import model as model_module
    from fate.runtime.model import FateModel

    model = FateModel.load(mixtral.artifact(4))
    ids = np.random.default_rng(1).integers(1, model.spec.vocab_size, 45)
    whole = model.logits(ids)
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 8)
    steps = []
    original = model._step
    monkeypatch.setattr(model, "_step", lambda chunk, cache, prefill: steps.append((chunk.size, prefill)) or
                        original(chunk, cache, prefill))
    cache = model.new_cache()
    chunked = model.head_logits(model.forward(ids, cache))
    assert steps == [(8, True)] * 5 + [(5, True)] and cache.length == 45
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-4)


def test_a_graph_that_cannot_write_in_place_is_one_error(tmp_path):
    """A graph whose output does not fit the buffer it is bound to (here: it grows the sequence,
    as a copying attention does) is refused by onnxruntime: one error naming the file."""
    from onnx import TensorProto, helper

    from fate.artifacts import ArtifactError
    from fate.runtime.sessions import make_session

    graph = helper.make_graph(
        [helper.make_node("Concat", ["past", "new"], ["present"], axis=2)], "g",
        [helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, 2, "P", 4]),
         helper.make_tensor_value_info("new", TensorProto.FLOAT, [1, 2, 1, 4])],
        [helper.make_tensor_value_info("present", TensorProto.FLOAT, [1, 2, "T", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = make_session(model.SerializeToString(), threads=1, label="graphs/layer_007.onnx")
    past = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(ArtifactError, match="graphs/layer_007.onnx: onnxruntime could not run it"):
        session.run_in_place(["present"], {"past": past, "new": np.ones((1, 2, 1, 4), np.float32)}, {"present": "past"})
    assert not past.any()  # nothing written into the buffer
