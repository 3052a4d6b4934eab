"""Hybrid models: layers whose mixer carries a fixed-size state beside the attention layers' keys
and values (the layer-state contract of schema 1.2), on a tiny LFM2-MoE (short convolutions) and a
tiny Qwen3-Next (gated DeltaNet: a convolution window and a recurrent state), a tiny Granite-4.0-H
(Mamba2: a convolution window and an SSM state), a tiny Jamba (Mamba per channel) and a tiny MiniMax
(lightning attention: a decaying linear state per head) and a tiny Kimi-Linear (Kimi Delta Attention: a
convolution window and a delta-rule state decaying per key channel) and a tiny Nemotron-H (Mamba2 blocks
beside blocks without a token mixer). Parity with
transformers is in test_parity.py; these check what the runtime does with the state."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import CASES, Built
from fate.artifacts import ArtifactError
from fate.artifacts.budget import parse_budget
from fate.compiler import CompileOptions, compile_checkpoint
from fate.compiler.profile import CalibrationOptions
from fate.runtime import FateModel, OffloadOptions, SamplingConfig, generate, stream_tokens
from fate.runtime.options import EngineOptions

PROMPT = [5, 17, 99, 3, 250, 41, 7, 64, 128]
GREEDY = SamplingConfig()


MIXERS = {"lfm2_moe": ["short_conv", "attention", "short_conv", "short_conv"],
          "qwen3_next": ["gated_deltanet", "gated_deltanet", "attention", "gated_deltanet"],
          "granitemoehybrid": ["mamba2", "attention", "mamba2", "mamba2"],
          "jamba": ["mamba", "attention", "mamba", "mamba"],
          "minimax": ["lightning", "attention", "lightning", "lightning"],
          "kimi_linear": ["kda", "attention", "kda"],
          # blocks of one thing each: MoE and MLP blocks mix no tokens and carry nothing
          "nemotron_h": ["mamba2", "none", "attention", "none", "none"]}


@pytest.fixture(scope="module", params=sorted(MIXERS))
def hybrid(request, tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp(request.param), **CASES[request.param])


@pytest.fixture(scope="module")
def calibrated(hybrid, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"{hybrid.family}-calibrated") / "art"
    compile_checkpoint(CompileOptions(hybrid.ckpt, out, bits=(4,), calibration=CalibrationOptions(tokens=512)),
                       log=lambda _m: None)
    return out


def test_each_layer_carries_what_the_manifest_lists(hybrid):
    model = FateModel.load(hybrid.artifact(32))
    layers = model.manifest.layers
    assert [layer.mixer for layer in layers] == MIXERS[hybrid.family]
    attention = MIXERS[hybrid.family].index("attention")
    cache = model.new_cache()
    model.forward(np.asarray(PROMPT), cache)
    assert cache.layers[attention]["key"].shape[2] == len(PROMPT)
    for layer in layers:
        if layer.mixer != "attention":
            assert {s.name: tuple(s.shape) for s in layer.state} == {
                name: a.shape for name, a in cache.layers[layer.index].items()}
            assert all(np.abs(a).max() > 0 for a in cache.layers[layer.index].values())
    assert not cache.rewindable
    assert model.manifest.state_bytes == sum(s.nbytes for layer in layers for s in layer.state) > 0
    # the attention layers' keys and values grow by the same bytes a token, whatever attention they are
    per_token = sum(a.nbytes for i, m in enumerate(MIXERS[hybrid.family]) if m == "attention"
                    for a in cache.layers[i].values()) // len(PROMPT)
    result = generate(model, PROMPT, max_new_tokens=3, sampling=GREEDY, eos_ids=set())
    kv = per_token * (len(PROMPT) + 2)
    assert result.stats.state_bytes == model.manifest.state_bytes
    assert result.stats.cache_bytes == model.manifest.state_bytes + kv


def test_prefill_in_pieces_equals_prefill_at_once(hybrid):
    """The state carries the convolution window across steps of any size."""
    model = FateModel.load(hybrid.artifact(32))
    whole = model.logits(PROMPT)[-1]
    cache = model.new_cache()
    for piece in (PROMPT[:1], PROMPT[1:3], PROMPT[3:4], PROMPT[4:]):
        last = model.head_logits(model.forward(np.asarray(piece), cache))[-1]
    np.testing.assert_allclose(last, whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())


@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_offloaded_runs_give_the_all_resident_tokens(calibrated, budget):
    resident = generate(FateModel.load(calibrated), PROMPT, max_new_tokens=12, sampling=GREEDY, eos_ids=set())
    model = FateModel.load(calibrated, EngineOptions(offload=OffloadOptions(parse_budget(budget), low_bit_prefill="off")))
    try:
        tokens = generate(model, PROMPT, max_new_tokens=12, sampling=GREEDY, eos_ids=set()).token_ids
        assert tokens == resident.token_ids
        assert model.experts.report().state_bytes == model.manifest.state_bytes
    finally:
        model.close()


def test_inspect_names_each_mixer_and_the_state_a_sequence_carries(hybrid, calibrated):
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([str(Path(sys.executable).parent / "fate-inspect"), str(calibrated)], capture_output=True,
                         text=True, check=True).stdout
    attention = MIXERS[hybrid.family].count("attention")
    line = next(line for line in out.splitlines() if line.startswith("mixers:"))
    assert line.startswith(f"mixers: {attention} attention, ")
    for kind in set(MIXERS[hybrid.family]) - {"attention"}:  # each other kind, counted ("none": said in words)
        assert f"{MIXERS[hybrid.family].count(kind)} {'without a mixer' if kind == 'none' else kind}" in line
    assert "MB of fixed-size layer state" in out


def test_a_follow_up_turn_on_the_kept_state_equals_a_fresh_run(hybrid):
    model = FateModel.load(hybrid.artifact(32))
    cache = model.new_cache()
    reply = list(stream_tokens(model, PROMPT, 4, GREEDY, set(), cache=cache))
    follow = PROMPT + reply + [7, 9]  # the cache holds all but the reply's last token
    assert cache.length == len(PROMPT) + len(reply) - 1
    again = list(stream_tokens(model, follow, 3, GREEDY, set(), cache=cache))
    fresh = list(stream_tokens(model, follow, 3, GREEDY, set()))
    assert again == fresh


def test_a_state_shape_that_contradicts_the_graph_is_one_line(hybrid, tmp_path):
    target = tmp_path / "art"
    shutil.copytree(hybrid.artifact(4), target)
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    state = manifest["layers"][0]["state"][0]
    state["shape"] = [1, 5, 64]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"past_{state['name']} is declared"):
        FateModel.load(target)


def test_an_artifact_written_before_layer_state_still_runs(tmp_path):
    """Schema 1.1 manifests have no `mixer` or `state`: every layer is attention, as before."""
    built = Built(tmp_path / "mixtral", **CASES["mixtral"])
    target = tmp_path / "old"
    shutil.copytree(built.artifact(4), target)
    path = target / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = "1.1"
    for layer in manifest["layers"]:
        del layer["mixer"], layer["state"], layer["combine_graph"]
    path.write_text(json.dumps(manifest))
    np.testing.assert_array_equal(FateModel.load(target).logits(PROMPT), FateModel.load(built.artifact(4)).logits(PROMPT))


@pytest.mark.parametrize("family, edit, fragment", [
    ("lfm2_moe", {"layer_types": ["conv", "sliding_attention", "conv", "conv"]}, "layer_types must list"),
    ("lfm2_moe", {"layer_types": ["conv", "full_attention"]}, "for each of the 4 layers"),
    ("qwen3_next", {"linear_num_value_heads": 3}, "multiple of the key heads"),
    ("qwen3_next", {"layer_types": None, "full_attention_interval": 0}, "full_attention_interval"),
    ("granitemoehybrid", {"mamba_n_heads": 7}, "mamba_d_head"),
    ("granitemoehybrid", {"time_step_limit": [0.0, 1.0]}, "time_step_limit"),
    ("jamba", {"attn_layer_offset": 9}, "attn_layer_offset"),
    ("jamba", {"num_experts": 1}, "dense model"),
    # Nemotron-H's dense releases: no MoE block at all
    ("nemotron_h", {"layers_block_type": ["linear_attention", "mlp", "full_attention", "mlp", "mlp"]}, "dense model"),
    ("nemotron_h", {"layers_block_type": None, "hybrid_override_pattern": "ME*Q"}, "hybrid_override_pattern"),
    ("nemotron_h", {"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
    ("nemotron_h", {"mamba_dt_limit": [0.0, 2.0]}, "time_step_limit"),  # an older config's name for it
])
def test_hybrid_configs_that_cannot_be_run_are_one_line(tmp_path, family, edit, fragment):
    """A config Fate cannot run exactly is refused in one line naming the key (None: the key removed)."""
    from fate.artifacts import ModelError
    from tiny_models import make_model

    ckpt = tmp_path / "ckpt"
    make_model(family, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(edit)
    config = {key: value for key, value in config.items() if value is not None}
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=fragment):
        compile_checkpoint(CompileOptions(ckpt, tmp_path / "art", bits=(4,)), log=lambda _m: None)


def test_layers_without_a_mixer_carry_nothing_and_can_be_cut_back(tmp_path):
    """Nemotron-H with attention as its only mixer: its MLP and MoE blocks carry no state, so a cache
    can be cut to a prefix (a conversation's next turn) as an attention-only model's, and a turn from
    the cut equals a fresh run."""
    built = Built(tmp_path, family="nemotron_h", seed=2,
                  layers_block_type=["full_attention", "moe", "full_attention", "mlp", "moe"])
    model = FateModel.load(built.artifact(32))
    assert [layer.mixer for layer in model.manifest.layers] == ["attention", "none", "attention", "none", "none"]
    cache = model.new_cache()
    list(stream_tokens(model, PROMPT, 4, GREEDY, set(), cache=cache))
    assert cache.rewindable and cache.layers[1] == {} and model.manifest.state_bytes == 0
    follow = PROMPT[:-2] + [9, 9]
    again = list(stream_tokens(model, follow, 3, GREEDY, set(), cache=cache.prefix(len(PROMPT) - 2)))
    assert again == list(stream_tokens(model, follow, 3, GREEDY, set()))
