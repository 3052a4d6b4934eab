"""Every supported family on randomized configs (tests/fuzz_configs.py) against transformers: float32
greedy tokens and logits; INT4 dense weights against transformers on the same dequantized weights, and
INT4 experts in the native kernel against onnxruntime on the same bytes.

`make test` runs FUZZ_SEEDS seeds per family and the head size of December's regression (4 heads of
20); `make fuzz` runs --fuzz-seeds more. A failure names its family and seed:
`pytest tests/test_fuzz_parity.py -k 'mixtral and seed3'` reruns it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import Built
from fate.artifacts import Artifact
from fate.artifacts.budget import Budget
from fate.runtime import FateModel, OffloadOptions, SamplingConfig, generate, native
from fate.runtime.decode_step import NativeDecodeStep
from fate.runtime.options import EngineOptions
from fuzz_configs import SWEPT, head_20, random_overrides
from step_checks import assert_steps_match_graphs
from test_parity import PROMPT, dequantized_dense_copy, hf_greedy, hf_logits, incremental_logits, rel_err

DECODE = 6


def test_every_supported_family_is_swept():
    """A family added to the compiler is in the sweep (its knobs in tests/fuzz_configs.py) from its first day."""
    from fate.compiler.families import supported

    assert sorted(supported()) == SWEPT


def cases(seeds: int) -> list:
    out = [pytest.param(family, "head20", id=f"{family}-head20") for family in SWEPT]
    out += [pytest.param(family, seed, id=f"{family}-seed{seed}") for family in SWEPT for seed in range(seeds)]
    return out


def pytest_generate_tests(metafunc):
    if "fuzz_case" in metafunc.fixturenames:
        seeds = metafunc.config.getoption("--fuzz-seeds")
        metafunc.parametrize("fuzz_case", [p.values for p in cases(seeds)], ids=[p.id for p in cases(seeds)])


def test_random_config_matches_transformers(fuzz_case, tmp_path, monkeypatch):
    family, seed = fuzz_case
    overrides = head_20(family) if seed == "head20" else random_overrides(family, seed)
    built = Built(tmp_path, family=family, seed=seed if isinstance(seed, int) else 0, eager_experts=True, **overrides)
    prompt = [t % built.hf.config.get_text_config().vocab_size for t in PROMPT]
    want = hf_greedy(built.hf, prompt, DECODE)
    model = FateModel.load(built.artifact(32))
    got = generate(model, prompt, max_new_tokens=DECODE, sampling=SamplingConfig(), eos_ids=set())
    assert got.token_ids == want, overrides
    ref = hf_logits(built.hf, prompt + want)
    logits = incremental_logits(model, prompt, want)
    assert rel_err(logits, ref) < 1e-4, overrides
    # INT4: random routers flip experts under quantization noise (test_parity.ROUTING_FLIPS_AT_INT4), so
    # the logit error against float32 transformers measures the routing. What is exact instead: dense
    # weights at INT4 computing in float32 against transformers on the same dequantized weights, and
    # INT4 experts run by the native kernel against onnxruntime's MatMulNBits on the same bytes.
    if family != "phimoe":  # sparsemixer's near-ties (test_quantized_dense_weights_compute_what_they_store)
        dense = FateModel.load(built.artifact(32, dense_bits=4, accuracy_level=0))
        assert rel_err(dense.logits(prompt), hf_logits(dequantized_dense_copy(built.hf, 4), prompt)) < 1e-4, overrides
    if native.available():
        # dense weights at INT4 give the layers their native decode steps (where the step computes
        # what the graph does): each held to its graph on the same input (int8 rounding: one
        # activation rounding the other way moves a small model's outputs by up to about 1e-3)
        with_steps = FateModel.load(built.artifact(4, dense_bits=4))
        try:
            assert_steps_match_graphs(with_steps, bound=1e-2)
            resident = generate(with_steps, prompt, DECODE, SamplingConfig(), eos_ids=set()).token_ids
        finally:
            with_steps.close()
        # offloaded, one slot beside a token's experts in each layer: the resident tokens, whatever the
        # reads (a step with a shared expert stops at its routing, the misses' reads begun before its rest)
        layers = Artifact.open(built.artifact(4, dense_bits=4)).manifest.moe_layers
        share = min(1.0, max((layer.routing.top_k + 1) / layer.routing.num_experts for layer in layers))
        finished = []
        finish = NativeDecodeStep.finish
        monkeypatch.setattr(NativeDecodeStep, "finish", lambda step, out: finished.append(1) or finish(step, out))
        offloaded = FateModel.load(built.artifact(4, dense_bits=4), EngineOptions(offload=OffloadOptions(
            Budget(share=share), low_bit_prefill="off")))
        try:
            assert generate(offloaded, prompt, DECODE, SamplingConfig(), eos_ids=set()).token_ids == resident, overrides
            assert bool(finished) == any(step.splits for step in offloaded.steps.values()), overrides
        finally:
            offloaded.close()
        runs = {}
        for executor in ("native", "session"):
            quantized = FateModel.load(built.artifact(4), EngineOptions(executor=executor))
            try:
                runs[executor] = incremental_logits(quantized, prompt, want[:3])
            finally:
                quantized.close()
        assert np.isfinite(runs["native"]).all()
        assert rel_err(runs["native"], runs["session"]) < 2e-2, overrides


CONFIG_VALUES = [0, -1, 1, 3, 7, 2**31, 2**63, 0.5, -0.0, float("nan"), float("inf"), True, None, "", "x", [], [1, 2],
                 {"a": 1}]


@pytest.mark.parametrize("family", SWEPT)
def test_hostile_configs_compile_or_are_one_clear_error(family, tmp_path_factory, fuzz_examples):
    """Any field of a checkpoint's config.json set to any JSON value (hostile, or a family's quirk
    Fate does not express): the compile either succeeds or raises a FateError (one line naming the
    problem), never a traceback from numpy, onnx, onnxruntime or torch."""
    import json as jsonlib

    from fate.artifacts import FateError
    from fate.compiler import CompileOptions, compile_checkpoint
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from tiny_models import make_model

    root = tmp_path_factory.mktemp("configs")
    ckpt = root / "ckpt"
    make_model(family, ckpt, seed=1)
    base = jsonlib.loads((ckpt / "config.json").read_text())

    @settings(max_examples=max(8, fuzz_examples // 6), deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(st.sampled_from(sorted(base)), st.sampled_from(CONFIG_VALUES)), min_size=1, max_size=3))
    def check(edits):
        config = dict(base)
        for key, value in edits:
            config[key] = value
        (ckpt / "config.json").write_text(jsonlib.dumps(config))
        try:
            compile_checkpoint(CompileOptions(ckpt, root / "out", bits=(32,), force=True), log=lambda _m: None)
        except FateError:
            pass

    check()
