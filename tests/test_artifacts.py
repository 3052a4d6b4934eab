"""The artifact format: strict manifest reading, atomic writing, checked file access."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from fate.artifacts import Artifact, ArtifactError, ArtifactWriter, Manifest, SCHEMA_VERSION
from fate.artifacts import profile, schema
from fate.artifacts.schema import manifest_from_json


def manifest_json(artifact: Path) -> dict:
    return json.loads((artifact / "manifest.json").read_text())


def test_format_md_lists_every_field():
    text = (Path(schema.__file__).parent / "FORMAT.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+)`", text))
    for cls in (schema.Manifest, schema.ModelSpec, schema.LayerSpec, schema.StateSpec, schema.RoutingSpec,
                schema.TokenizerSpec, schema.GenerationDefaults, schema.FileEntry, schema.Policy,
                schema.LayerPolicy, schema.DecodeStep, schema.HeadStep, profile.Profile, profile.LayerProfile,
                profile.RecallCurve):
        missing = {f.name for f in dataclasses.fields(cls)} - documented
        assert not missing, f"FORMAT.md does not describe {cls.__name__}.{missing}"


def test_roundtrip_and_file_list(mixtral):
    art = Artifact.open(mixtral.artifact(4))
    assert art.manifest.schema_version == SCHEMA_VERSION
    assert art.verify() == []
    on_disk = {str(p.relative_to(art.root)) for p in art.root.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == {f.path for f in art.manifest.files}


@pytest.mark.parametrize("mutate,message", [
    (lambda m: m.update(extra=1), "unknown field"),
    (lambda m: m["model"].update(hidden_size="64"), "expected an integer"),
    (lambda m: m["model"].pop("vocab_size"), "missing field 'vocab_size'"),
    (lambda m: m["model"].update(num_layers=-1), "layers"),
    (lambda m: m["layers"][0].update(kind="sparse"), "kind"),
    (lambda m: m.update(schema_version="2.0"), "newer than this runtime"),
    (lambda m: m["files"].append(dict(m["files"][0])), "listed twice"),
    (lambda m: m["files"][0].update(path="../../etc/passwd"), "outside the artifact"),
    (lambda m: m["files"][0].update(path="/etc/passwd"), "outside the artifact"),
    (lambda m: m.update(layers=[]), "layers"),
    (lambda m: m["model"].update(family="llama5"), "unknown model family"),
    (lambda m: m["model"].update(head_dim=10**9), "out of range"),
    (lambda m: m["layers"][0]["routing"].update(top_k=-3), "routing"),
    # the layer-state contract (schema 1.2): shapes the runtime would allocate, names it would feed
    (lambda m: m["layers"][0].update(mixer="mamba9"), "unknown mixer"),
    (lambda m: m["layers"][0].update(state=[{"name": "conv", "shape": [1, 2, 64]}]), "attention but lists a"),
    (lambda m: m["layers"][0].update(mixer="short_conv"), "short_conv but lists no"),
    (lambda m: m["layers"][0].update(mixer="short_conv", state=[{"name": "conv", "shape": [1, -2, 64]}]), "shape"),
    (lambda m: m["layers"][0].update(mixer="short_conv", state=[{"name": "conv", "shape": [1 << 20, 1 << 20]}]),
     "shape"),
    (lambda m: m["layers"][0].update(mixer="short_conv", state=[{"name": "key", "shape": [1]}]), "named"),
    (lambda m: m["layers"][0].update(mixer="short_conv", state=[{"name": "a-b", "shape": [1]}]), "named"),
    # position inputs (schema 1.4): a kind the runtime knows, and tables for attention only
    (lambda m: m["layers"][0].update(positions="rows"), "position inputs 'rows'"),
    (lambda m: m["layers"][0].update(mixer="short_conv", state=[{"name": "conv", "shape": [1, 2, 64]}],
                                     positions="tables"), "position inputs 'tables'"),
    # a layer's own attention (schema 1.8): key-value heads that divide the heads, RoPE that fits a head
    (lambda m: m["layers"][0].update(num_kv_heads=3), "3 key-value heads for 4 heads"),
    (lambda m: m["layers"][0].update(num_kv_heads=0), "0 key-value heads"),
    (lambda m: m["layers"][0].update(rope_inv_freq=[1.0] * 64), "RoPE frequencies"),
    (lambda m: m["layers"][0].update(rope_inv_freq=[-1.0]), "RoPE frequencies"),
    # latent experts (schema 1.8): their sum needs a combine graph to come back to the hidden size
    (lambda m: m["layers"][0].update(expert_input_size=24), "without a combine graph"),
    (lambda m: m["layers"][0].update(mixer="short_conv", state=[{"name": "conv", "shape": [1, 2, 64]}],
                                     positions="per_token", num_kv_heads=2), "heads or RoPE of its own"),
])
def test_bad_manifests_are_refused(mixtral, tmp_path, mutate, message):
    target = tmp_path / "art"
    shutil.copytree(mixtral.artifact(4), target)
    data = manifest_json(target)
    mutate(data)
    (target / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        Artifact.open(target)


def test_newer_minor_version_with_new_fields_is_read(mixtral):
    data = manifest_json(mixtral.artifact(4))
    major, minor = schema.parse_version(SCHEMA_VERSION)
    data.update(schema_version=f"{major}.{minor + 1}", added_later={"x": 1})
    assert isinstance(manifest_from_json(data), Manifest)


def test_not_json_and_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Artifact.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Artifact.open(tmp_path)


def test_truncated_and_modified_files_are_named(mixtral, tmp_path):
    target = tmp_path / "art"
    shutil.copytree(mixtral.artifact(4), target)
    art = Artifact.open(target)
    expert = art.manifest.layers[0].experts["int4"][3]
    with open(target / expert, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ArtifactError, match=re.escape(expert)):
        art.read_bytes(expert)
    layer = art.manifest.layers[1].graph
    data = bytearray((target / layer).read_bytes())
    data[-1] ^= 0xFF
    (target / layer).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        art.read_bytes(layer)
    problems = art.verify()
    assert len(problems) == 2 and any(expert in p for p in problems)


def test_writer_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out) as writer:
            writer.write_bytes("graphs/a.onnx", b"123")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_nonempty_target_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="--force"):
        ArtifactWriter(tmp_path / "out")
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_writer_refuses_paths_outside(tmp_path):
    with ArtifactWriter(tmp_path / "out") as writer:
        for bad in ("../x", "/abs", "a//b", "a\\b"):
            with pytest.raises(ArtifactError):
                writer.write_bytes(bad, b"")


def test_compiler_families_are_known_to_the_runtime():
    """What every model type compiles as (its own family, or the one transformers loads it with) is a
    family the runtime knows; and every family the runtime knows is compiled by some model type."""
    from fate.compiler.families import family_for, supported

    written = {family_for({"model_type": t}).model_type for t in supported()}
    assert written == set(schema.KNOWN_FAMILIES)


def test_checked_files_trust_only_a_stat_recorded_when_it_was_old_and_unchanged(tmp_path, monkeypatch):
    """artifacts.checked, on made-up stats: a file that passed is recorded only where its stat is the one taken
    at open and it had not changed for RACY_NS before; trusted later only while its stat is the recorded one;
    records merge across runs, and a cache that cannot be written or read back costs nothing but hashing."""
    from fate.artifacts import checked

    monkeypatch.setenv(checked.CACHE_ENV, str(tmp_path / "cache"))
    old, young = (1, 2, 10, 5, 1_000), (1, 3, 10, 5, 9_000_000_000)
    stats = {"a": old, "b": young, "c": old}
    opened = {"a": old, "b": young, "c": (1, 2, 10, 5, 999)}  # c changed between the open and its check

    first = checked.CheckedFiles("d1", stats.get, dict(opened), 10_000_000_000)
    assert not first.trusted("a")
    for path in stats:
        first.passed(path)
    assert first.trusted("a") and not first.trusted("b") and not first.trusted("c")
    first.save()
    second = checked.CheckedFiles("d1", stats.get, dict(stats), 10_000_000_000)
    assert second.trusted("a") and not second.trusted("b")
    stats["a"] = (1, 2, 10, 5, 1_001)  # written since: its change time moved
    assert not second.trusted("a")
    stats["c"] = old
    second.passed("c")
    second.save()
    third = checked.CheckedFiles("d1", stats.get, dict(stats), 10_000_000_000)
    assert third.trusted("c") and not third.trusted("a")
    assert not checked.CheckedFiles("d2", stats.get, dict(stats), 10_000_000_000).trusted("c")  # another artifact
    monkeypatch.setattr(checked, "SAVE_EVERY", 1)  # a long-running process writes as it goes, not only at the end
    checked.CheckedFiles("d3", stats.get, dict(stats), 10_000_000_000).passed("c")
    assert checked.CheckedFiles("d3", stats.get, dict(stats), 10_000_000_000).trusted("c")

    record = tmp_path / "cache" / "checked" / "d1.json"
    for junk in ("not json", "[1, 2]", '{"c": [1, 2]}', '{"c": ["1", 2, 10, 5, 1000]}'):
        record.write_text(junk)
        assert not checked.CheckedFiles("d1", stats.get, dict(stats), 10_000_000_000).trusted("c")
    shutil.rmtree(record.parent)
    record.parent.write_text("a file where the directory would go")
    unwritable = checked.CheckedFiles("d1", stats.get, dict(stats), 10_000_000_000)
    unwritable.passed("c")
    unwritable.save()  # nothing raised, nothing written
    assert record.parent.is_file()


def test_a_file_an_earlier_run_hashed_is_not_hashed_again_until_it_changes(mixtral, tmp_path, monkeypatch):
    """fate-verify hashes every file and records them; the next open reads them unhashed; a file replaced
    since (another inode, the same size) is hashed again and refused, naming it."""
    import hashlib

    from fate.artifacts import checked, store

    monkeypatch.setenv(checked.CACHE_ENV, str(tmp_path / "cache"))
    target = tmp_path / "art"
    shutil.copytree(mixtral.artifact(4), target)
    monkeypatch.setattr(checked, "RACY_NS", -10**18)  # the copy was just made: old enough for this test
    assert Artifact.open(target).verify() == []
    hashed, sha256 = [], hashlib.sha256
    monkeypatch.setattr(store.hashlib, "sha256", lambda data=b"": hashed.append(1) or sha256(data))
    art = Artifact.open(target)
    hashed.clear()
    for entry in art.manifest.files:
        art.read_bytes(entry.path)
    assert not hashed
    assert len(art.verify()) == 0 and len(hashed) == len(art.manifest.files)  # fate-verify hashes all the same
    expert = art.manifest.layers[0].experts["int4"][3]
    data = bytearray((target / expert).read_bytes())
    data[0] ^= 0xFF
    (target / f"{expert}.new").write_bytes(bytes(data))
    (target / f"{expert}.new").replace(target / expert)
    with pytest.raises(ArtifactError, match=re.escape(expert)):
        Artifact.open(target).read_bytes(expert)
