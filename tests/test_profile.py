"""Calibration profile against an independent computation from transformers' own router outputs,
the planner on synthetic measurements, --policy-only and fate-inspect."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fate.artifacts import Artifact
from fate.artifacts.budget import Budget
from fate.artifacts.profile import LayerProfile, Profile, RecallCurve, profile_from_bytes
from fate.compiler import CompileOptions, compile_checkpoint
from fate.compiler.policy import PlanTargets, plan, slot_demand
from fate.compiler.profile import CalibrationOptions, calibration_ids, recall_curve
from fate.runtime.experts.allocation import allocate_slots
from tiny_models import CONFIGS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe"
BIN = Path(sys.executable).parent
CALIB = CalibrationOptions(tokens=1024)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibrated") / "art"
    # float32 dense weights: the recall checks below compare with transformers' own routing
    compile_checkpoint(CompileOptions(EXAMPLE, out, bits=(4,), dense_bits=32, calibration=CALIB), log=lambda _m: None)
    return out


def decoder_layers(hf):
    if hasattr(hf, "transformer"):
        return hf.transformer.blocks  # DBRX
    return hf.language_model.model.layers if hasattr(hf, "language_model") else hf.model.layers  # Llama-4


def one_thing(layer) -> bool:
    """A block that holds a mixer or an MLP, not both (Nemotron-H): x + mixer(norm(x))."""
    return hasattr(layer, "mixer") and hasattr(layer, "norm")


def moe_block(layer):
    for name in ("mlp", "block_sparse_moe", "feed_forward", "ffn", "mixer"):
        if hasattr(layer, name):
            return getattr(layer, name)


def mlp_norm(layer):
    """The norm before the MLP, whatever the family calls it."""
    if hasattr(layer, "pre_mlp_layernorm"):
        return layer.pre_mlp_layernorm  # pre and post norms (AFMoE)
    if hasattr(layer, "post_feedforward_layernorm"):
        return None  # post-norm (FlexOlmo): its post_attention_layernorm norms the attention's output
    for name in ("post_attention_layernorm", "ffn_norm", "pre_ff_layernorm"):
        if hasattr(layer, name):
            return getattr(layer, name)
    if hasattr(layer, "norm_attn_norm"):
        return layer.norm_attn_norm.norm_2  # DBRX
    if one_thing(layer):
        return layer.norm  # its MLP's norm, where it is an MLP
    return None  # a parallel block (Cohere): the MLP reads the attention's input norm


def router_of(layer):
    """The router module of an MoE layer; None for a dense layer."""
    block = moe_block(layer)
    router = getattr(block, "gate", None) or getattr(block, "router", None)
    return router if router_weight(router) is not None else None


def router_weight(router):
    """The router's [experts, hidden] weight: its own, or its Linear's (HunYuan's `wg`, DBRX's `layer`,
    AFMoE's `gate`)."""
    weight = getattr(router, "weight", None)
    for name in ("wg", "layer", "gate"):
        if not isinstance(weight, torch.Tensor) and isinstance(getattr(router, name, None), torch.nn.Linear):
            weight = getattr(router, name).weight
    return weight if isinstance(weight, torch.Tensor) else None


def chosen_experts(out, top_k: int) -> np.ndarray:
    """What a router module chose: the indices it returns, or the top-k of its logits, which softmax
    keeps in order (DBRX's router returns only logits), or of its scores (Llama-4's returns scores, 0
    for the experts it did not choose, and logits)."""
    if isinstance(out, tuple) and len(out) == 3:
        indices = out[2]
    else:
        indices = (out[0] if isinstance(out, tuple) else out).topk(top_k, dim=-1).indices
    return indices.reshape(-1, indices.shape[-1]).numpy()


def transformers_routing(hf, ids: np.ndarray, top_k: int):
    """Per layer, from transformers itself: router input (the MoE block's input), pre-norm hidden,
    and the experts the router chose (hooked on the router module)."""
    layers = decoder_layers(hf)
    captured: dict[str, list] = {"x": [[] for _ in layers], "h": [[] for _ in layers], "chosen": [[] for _ in layers],
                                 "embedded": [[]]}
    hooks = [layers[0].register_forward_pre_hook(  # what the first layer reads: the (scaled) embedding
        lambda m, a, kw: captured["embedded"][0].append((a[0] if a else kw["hidden_states"])[0].numpy()),
        with_kwargs=True)]
    for i, layer in enumerate(layers):
        moe = moe_block(layer)
        hooks.append(moe.register_forward_pre_hook(  # its input, passed by position or (Nemotron-H's attention) name
            lambda m, a, kw, i=i: captured["x"][i].append((a[0] if a else kw["hidden_states"])[0].numpy()),
            with_kwargs=True))
        if one_thing(layer) and router_of(layer) is None:  # what a MoE block after it reads: its output
            hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: captured["h"][i].append(
                (out[0] if isinstance(out, tuple) else out)[0].numpy())))
        elif one_thing(layer):  # a MoE block: the stream before it (the routed sum is not in its graph)
            hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: captured["h"][i].append(a[0][0].numpy())))
        elif mlp_norm(layer) is not None:
            hooks.append(mlp_norm(layer).register_forward_pre_hook(
                lambda m, a, i=i: captured["h"][i].append(a[0][0].numpy())))
        if router_of(layer) is not None:
            hooks.append(router_of(layer).register_forward_hook(
                lambda m, a, out, i=i: captured["chosen"][i].append(chosen_experts(out, top_k))))
    with torch.no_grad():
        for row in ids:
            hf(torch.tensor(row[None]))
    for h in hooks:
        h.remove()
    return [[np.concatenate(parts) if parts else None for parts in captured[key]]
            for key in ("x", "h", "chosen", "embedded")]


def check_recall_against_transformers(hf, artifact: Path, encode) -> None:
    art = Artifact.open(artifact)
    profile = profile_from_bytes(art.read_bytes(art.manifest.profile))
    # the sequences the profiler ran (no longer than the model's context)
    ids = calibration_ids(dataclasses.replace(CALIB, sequence_length=profile.sequence_length), encode)
    xs, hs, chosen, (embedded,) = transformers_routing(hf, ids, profile.layers[0].top_k)
    eval_from = profile.calibration_tokens - profile.eval_tokens
    # layer 0 is predicted from the embedding (Manifest.embed_predicts_next): the stream before it is the embedding
    first_moe = art.manifest.layers[0].kind == "moe"
    assert art.manifest.embed_predicts_next == first_moe
    if first_moe:
        assert {"cross_layer", "cross_layer_norm"} <= set(profile.layer(0).predictors)
    for layer in [p.index for p in profile.layers if p.index > 0 or first_moe]:
        before = (embedded, embedded) if layer == 0 else (xs[layer - 1], hs[layer - 1])
        module = router_of(decoder_layers(hf)[layer])
        router = router_weight(module).detach().numpy()
        actual = np.zeros((len(chosen[layer]), router.shape[0]), bool)
        np.put_along_axis(actual, chosen[layer].astype(np.int64), True, axis=1)

        def rank_scores(logits: np.ndarray) -> np.ndarray:
            """What the router ranks by: logits (+ its bias, GPT-OSS), or sigmoid + correction bias
            (DeepSeek-V3; LFM2 and MiniMax-M2 keep it on the MoE block)."""
            if getattr(module, "bias", None) is not None:
                logits = logits + module.bias.detach().numpy()
            block = moe_block(decoder_layers(hf)[layer])
            bias = next((b for b in (getattr(module, "e_score_correction_bias", None),
                                     getattr(block, "e_score_correction_bias", None), getattr(block, "expert_bias", None))
                         if b is not None), None)
            return logits if bias is None else 1 / (1 + np.exp(-logits)) + bias.numpy()

        measured = profile.layer(layer).predictors
        variants = [("cross_layer", rank_scores(before[0] @ router.T))]
        # the renormalized variant reads the hidden state between attention and MLP, which a parallel
        # block (Cohere) never forms in transformers: checked where it exists
        if mlp_norm(decoder_layers(hf)[layer]) is not None:
            with torch.no_grad():  # the next layer's own norm module, whatever its kind
                renormed = mlp_norm(decoder_layers(hf)[layer])(torch.from_numpy(before[1])).numpy()
            variants.append(("cross_layer_norm", rank_scores(renormed @ router.T)))
        for name, scores in variants:
            independent = recall_curve(scores[eval_from:], actual[eval_from:], measured[name].widths,
                                       profile.prefill_window)
            np.testing.assert_allclose(measured[name].decode, independent.decode, atol=0.01)
            np.testing.assert_allclose(measured[name].prefill, independent.prefill, atol=0.01)
        if layer == 0:  # similarity is between adjacent layers' router inputs
            assert profile.layer(0).similarity_mean is None
            continue
        x0, x1 = xs[layer - 1], xs[layer]
        sim = (x0 * x1).sum(1) / np.linalg.norm(x0, axis=1) / np.linalg.norm(x1, axis=1)
        assert abs(profile.layer(layer).similarity_mean - sim.mean()) < 1e-3


def test_profiler_recall_matches_transformers_router_outputs(calibrated):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(EXAMPLE, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(EXAMPLE / "tokenizer.json"))
    check_recall_against_transformers(hf, calibrated, lambda text: tok.encode(text).ids)


# every family with a tiny config; mixtral's routing is checked on the trained example model above
@pytest.mark.parametrize("family", sorted(set(CONFIGS) - {"mixtral"}))
def test_profiler_recall_per_family(family, tmp_path):
    """The same independent check on every other family's routing semantics (random weights)."""
    from tiny_models import make_model
    from tokenizers import Tokenizer

    hf = make_model(family, tmp_path / "ckpt", seed=7)
    out = tmp_path / "art"
    compile_checkpoint(CompileOptions(tmp_path / "ckpt", out, bits=(4,), dense_bits=32, calibration=CALIB),
                       log=lambda _m: None)
    tok = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    check_recall_against_transformers(hf, out, lambda text: tok.encode(text).ids)


def synthetic_layer(index: int, recall_at_k: float, miss_curve: list[float], e: int = 8, k: int = 2) -> LayerProfile:
    widths = list(range(k, 2 * k + 1))
    decode = [min(1.0, recall_at_k + 0.02 * i) for i in range(len(widths))]
    curve = RecallCurve(widths, decode, decode, [float(w) for w in widths])
    return LayerProfile(index=index, num_experts=e, top_k=k, similarity_mean=0.9, similarity_std=0.05,
                        predictors={} if index == 0 else {"cross_layer": curve},
                        popularity=[1 / e] * e, miss_curve_slots=list(range(e + 1)), miss_curve=miss_curve,
                        quant_error={"int8": 0.003, "int4": 0.05, "int2": 0.3},
                        low_bit_shares=[0.0, 0.1, 0.2, 0.3], low_bit_error=[0.0, 0.02, 0.04, 0.09],
                        transitions_from=None, transitions=[])


def synthetic(recalls: list[float], miss: list[float] | None = None):
    from fate.artifacts import LayerSpec, RoutingSpec

    miss = miss or [max(0.0, 1 - s / 8) for s in range(9)]
    profiles = [synthetic_layer(i, r, miss) for i, r in enumerate(recalls)]
    routing = RoutingSpec("softmax", 8, 2, True)
    layers = [LayerSpec(i, "moe", f"g{i}", routing, {"int4": [""] * 8, "int8": [""] * 8, "int2": [""] * 8}, True)
              for i in range(len(recalls))]
    return Profile("1.0", "test", 1024, 128, 32, 256, profiles), layers


def test_first_layer_fully_cached_when_nothing_predicts_it():
    """After every layer's top-k and prefetch room (2 + 2 slots in the predicted layers), the
    slots left go to the layer nothing predicts."""
    profile, layers = synthetic([0.0, 0.97, 0.97, 0.97])
    policy = plan(profile, layers, PlanTargets(budget=0.75))
    slots = [round(lp.cache_share * 24) for lp in policy.layers]
    assert slots[0] == 8 and policy.layers[0].predictor == "none"
    assert all(s >= 2 + lp.prefetch_width for s, lp in zip(slots, policy.layers))


def test_uniform_measurements_give_no_shallow_preference():
    """(Layers after the first: the first is planned as one nothing predicts, allocation.planned_recall.)"""
    slots = allocate_slots([slot_demand(synthetic_layer(i, 0.5, [max(0.0, 1 - s / 8) for s in range(9)]), 0.5, 0)
                            for i in range(1, 5)], 16)
    assert slots == [4, 4, 4, 4]


def test_width_is_the_smallest_reaching_the_target_and_shortfall_is_reported():
    profile, layers = synthetic([0.0, 0.90, 0.99])
    policy = plan(profile, layers, PlanTargets(target_recall=0.97))
    assert policy.layers[2].prefetch_width == 2
    # recall 0.90, 0.92, 0.94 at widths 2, 3, 4: one more expert is used 4% of the time: stay at k
    assert policy.layers[1].prefetch_width == 2 and "no predictor reaches" in policy.layers[1].reasons["prefetch"]
    weak, layers = synthetic([0.0, 0.3])
    assert plan(weak, layers).layers[1].predictor == "none"


def test_width_stops_where_one_more_expert_is_rarely_used():
    # recall 0.95, 0.97, 0.99 at widths 2, 3, 4: the target is reached at 3, but the third expert
    # would be used 4% of the time, so each token would pay a load for it in vain
    profile, layers = synthetic([0.0, 0.95])
    policy = plan(profile, layers, PlanTargets(target_recall=0.97))
    assert policy.layers[1].prefetch_width == 2 and "needs width 3" in policy.layers[1].reasons["prefetch"]


def test_precision_and_int2_share_follow_the_error_bounds():
    profile, layers = synthetic([0.0, 0.99])
    tight = plan(profile, layers, PlanTargets(max_quant_error=0.01, max_low_bit_error=0.05))
    assert tight.layers[0].precision == "int8"
    assert tight.layers[0].prefill_precision == "int2" and tight.layers[0].prefill_low_share == 0.2
    loose = plan(profile, layers, PlanTargets(max_quant_error=0.1, max_low_bit_error=0.01))
    assert loose.layers[0].precision == "int4" and loose.layers[0].prefill_precision is None


def test_policy_only_replans_without_touching_files(calibrated, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(calibrated, art)
    before = Artifact.open(art).manifest
    proc = subprocess.run([str(BIN / "fate-compile"), "--policy-only", str(art), "--budget", "20%"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    after = Artifact.open(art)
    assert after.manifest.policy.budget == pytest.approx(0.2) and before.policy.budget == pytest.approx(0.5)
    assert after.manifest.files == before.files and after.verify() == []
    assert dataclasses.replace(after.manifest, policy=before.policy) == before


def test_policy_only_needs_a_profile(mixtral):
    proc = subprocess.run([str(BIN / "fate-compile"), "--policy-only", str(mixtral.artifact(4))],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no profile" in proc.stderr


def test_inspect_prints_table_and_writes_self_contained_html(calibrated, tmp_path):
    report = tmp_path / "report.html"
    proc = subprocess.run([str(BIN / "fate-inspect"), str(calibrated), "--html", str(report)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "cross@k" in proc.stdout and "eap@k" in proc.stdout
    text = report.read_text()
    assert text.count("<svg") == 3 * 6 and "http" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in text


def test_budget_parsing():
    from fate.artifacts import FateError
    from fate.artifacts.budget import parse_budget

    assert parse_budget("25%") == Budget(share=0.25)
    assert parse_budget("300MB") == Budget(bytes=300_000_000)
    assert parse_budget("2GiB") == Budget(bytes=2 * 2**30)
    for bad in ("lots", "150%", "-1MB"):
        with pytest.raises(FateError):
            parse_budget(bad)


def test_the_profile_stores_the_optimal_miss_curve_under_the_policys(calibrated):
    from fate.artifacts import Artifact
    from fate.artifacts.profile import profile_from_bytes

    art = Artifact.open(calibrated)
    profile = profile_from_bytes(art.read_bytes(art.manifest.profile))
    for layer in profile.layers:
        assert layer.optimal_miss_curve is not None and len(layer.optimal_miss_curve) == len(layer.miss_curve)
        assert all(best <= policy + 1e-12 for best, policy in zip(layer.optimal_miss_curve, layer.miss_curve))
        assert layer.optimal_miss_curve[-1] <= layer.optimal_miss_curve[0]
