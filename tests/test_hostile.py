"""Hostile inputs: crafted archives, manifests and graphs give one clear line and a non-zero exit,
never a traceback, a write outside the target, or a hang. And a fuzz pass over both readers."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fate.artifacts import Artifact, ArtifactError, pack_artifact
from fate.artifacts.archive import scan
from fate.artifacts.schema import manifest_from_json

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def one_line_error(*args, timeout: int = 60) -> str:
    proc = subprocess.run([str(BIN / a) if i == 0 else str(a) for i, a in enumerate(args)],
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def packed(mixtral, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "model.fate"
    return pack_artifact(mixtral.artifact(4), out)


def members_of(archive: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


HOSTILE = {
    "absolute": lambda m: m[:1] + [(file_info("/tmp/fate-evil", 4), b"evil")] + m[1:],
    "dotdot": lambda m: m[:1] + [(file_info("../fate-evil", 4), b"evil")] + m[1:],
    "symlink": lambda m: m[:1] + [(special("graphs/evil.onnx", tarfile.SYMTYPE, "/etc/passwd"), None)] + m[1:],
    "hardlink": lambda m: m[:1] + [(special("graphs/evil.onnx", tarfile.LNKTYPE, "manifest.json"), None)] + m[1:],
    "device": lambda m: m[:1] + [(special("graphs/evil", tarfile.CHRTYPE), None)] + m[1:],
    "duplicate": lambda m: m + [m[1]],
    "manifest-not-first": lambda m: m[1:] + m[:1],
    "unlisted": lambda m: m + [(file_info("extra.bin", 3), b"abc")],
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archive_members(packed, tmp_path, kind):
    members = HOSTILE[kind](members_of(packed))
    bad = write_tar(tmp_path / "bad.fate", members)
    for command in (["fate-run", bad, "-p", "hi"], ["fate-verify", bad], ["fate-unpack", bad, "-o", tmp_path / "out"]):
        one_line_error(*command)
    assert not (tmp_path / "out").exists() and not Path("/tmp/fate-evil").exists()
    assert not (tmp_path.parent / "fate-evil").exists()


def test_huge_declared_size_and_truncation(packed, tmp_path):
    data = packed.read_bytes()
    truncated = tmp_path / "truncated.fate"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error("fate-run", truncated, "-p", "hi")
    # a header declaring 7 GB for a member of a small file (a "bomb"): refused before any read
    manifest_info, manifest_data = members_of(packed)[0]
    pad = b"\0" * (-len(manifest_data) % 512)
    huge = file_info("graphs/embed.onnx", 7 << 30)
    raw = (manifest_info.tobuf(tarfile.USTAR_FORMAT) + manifest_data + pad +
           huge.tobuf(tarfile.USTAR_FORMAT) + b"x" * 4096)
    bomb = tmp_path / "bomb.fate"
    bomb.write_bytes(raw)
    assert "past the end" in one_line_error("fate-verify", bomb)


@pytest.mark.parametrize("content", [b"", b"not an archive at all", b"\x1f\x8b" + b"\0" * 600])
def test_not_an_archive(tmp_path, content):
    bad = tmp_path / "x.fate"
    bad.write_bytes(content)
    one_line_error("fate-run", bad, "-p", "hi")


def rewrite_graph(art: Path, mutate) -> str:
    """Replace the first layer graph by a mutated one, with a matching manifest entry."""
    import hashlib

    import onnx

    data = json.loads((art / "manifest.json").read_text())
    path = data["layers"][0]["graph"]
    model = onnx.load(art / path)
    mutate(model)
    raw = model.SerializeToString()
    (art / path).write_bytes(raw)
    for entry in data["files"]:
        if entry["path"] == path:
            entry.update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (art / "manifest.json").write_text(json.dumps(data))
    return path


def external_data(model):
    from onnx import TensorProto

    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"


def custom_op(model):
    model.graph.node[0].domain = "evil.ops"
    model.opset_import.add(domain="evil.ops", version=1)


def unexpected_op(model):
    model.graph.node[0].op_type = "Loop"


def _body(op_type: str):
    from onnx import TensorProto, helper

    return helper.make_graph([helper.make_node(op_type, ["a"], ["b"])], "body",
                             [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                             [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])


def subgraph_on_another_op(model):
    from onnx import helper

    model.graph.node[0].attribute.append(helper.make_attribute("body", _body("Identity")))


def loop_inside_a_scan(model):
    from onnx import helper

    model.graph.node[0].op_type = "Scan"
    model.graph.node[0].attribute.append(helper.make_attribute("body", _body("Loop")))


@pytest.mark.parametrize("mutate,message", [(external_data, "external data"), (custom_op, "domain"),
                                            (unexpected_op, "Loop"), (subgraph_on_another_op, "carries a subgraph"),
                                            (loop_inside_a_scan, "Loop")])
def test_hostile_graphs_are_refused(mixtral, tmp_path, mutate, message):
    art = tmp_path / "art"
    shutil.copytree(mixtral.artifact(4), art)
    path = rewrite_graph(art, mutate)
    line = one_line_error("fate-run", art, "-p", "hi")
    assert message in line and Path(path).name in line
    proc = subprocess.run([str(BIN / "fate-verify"), str(art)], capture_output=True, text=True)
    assert proc.returncode == 1 and message in proc.stdout


def wrong_attention_heads(model):
    (node,) = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for attribute in node.attribute:
        if attribute.name == "num_heads":
            attribute.i = 3  # the projections hold 4 heads: onnxruntime must refuse it, not read past them


def test_fused_attention_with_wrong_numbers_is_one_line(mixtral, tmp_path):
    """The fused attention's attributes are the artifact's to state: numbers that do not match its
    inputs stop generation with one line naming what failed, never a crash or a traceback."""
    art = tmp_path / "art"
    shutil.copytree(mixtral.artifact(4), art)
    rewrite_graph(art, wrong_attention_heads)
    line = one_line_error("fate-run", art, "-p", "hi")
    assert "GroupQueryAttention" in line or "num_heads" in line, line


def test_no_pickles_and_no_remote_code():
    pattern = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|torch\.load\(|trust_remote_code\s*=\s*True")
    for part in ("artifacts", "runtime", "compiler"):
        for path in (ROOT / part).rglob("*.py"):
            assert not pattern.search(path.read_text()), path


def test_newer_major_schema_names_the_version_to_install(mixtral, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(mixtral.artifact(4), art)
    data = json.loads((art / "manifest.json").read_text())
    data.update(schema_version="9.0", fate_version="9.1.0")
    (art / "manifest.json").write_text(json.dumps(data))
    assert "9.1.0" in one_line_error("fate-run", art, "-p", "hi")


# ------------------------------------------------------------------------------------- fuzz

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                      max_size=4), max_leaves=20)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_fuzz_manifest_reader(mixtral, fuzz_examples, data):
    """Random JSON and random edits of a real manifest (one with decode steps): an ArtifactError or a
    valid manifest."""
    base = json.loads((mixtral.artifact(4, dense_bits=4) / "manifest.json").read_text())
    doc = data.draw(st.one_of(JSON, st.just(base)))
    if isinstance(doc, dict) and doc is base:
        doc = json.loads(json.dumps(base))
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from(sorted(doc)))
            doc[key] = data.draw(JSON)
    try:
        manifest_from_json(doc)
    except ArtifactError:
        pass


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(data=st.data())
def test_fuzz_decode_steps(mixtral, fuzz_examples, data):
    """Random values in a layer's decode step and the head step, their numbers and their tensor views
    (what native code reads through): an ArtifactError or a valid manifest."""
    doc = json.loads((mixtral.artifact(4, dense_bits=4) / "manifest.json").read_text())
    steps = [layer["decode_step"] for layer in doc["layers"] if layer.get("decode_step")] + [doc["head_step"]]
    value = st.integers(-2**63, 2**63 - 1) | st.sampled_from([-1, 0, 1, 3, 16, 10**9]) | JSON
    for _ in range(data.draw(st.integers(1, 4))):
        step = data.draw(st.sampled_from(steps))
        views = step["tensors"] if isinstance(step["tensors"], list) else []
        target = data.draw(st.sampled_from(views)) if views and data.draw(st.booleans()) else step
        if isinstance(target, dict) and target:
            target[data.draw(st.sampled_from(sorted(target)))] = data.draw(value)
    try:
        manifest_from_json(doc)
    except ArtifactError:
        pass


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
@given(cut=st.integers(0, 10**9), flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), max_size=6))
def test_fuzz_archive_reader(packed, tmp_path_factory, cut, flips):
    """Truncated and bit-flipped archives: opening either works or raises ArtifactError."""
    raw = bytearray(packed.read_bytes())
    raw = raw[: max(1, cut % (len(raw) + 1))]
    for position, mask in flips:
        raw[position % len(raw)] ^= mask
    path = tmp_path_factory.mktemp("fuzz") / "f.fate"
    path.write_bytes(bytes(raw))
    try:
        scan(path)
        Artifact.open(path)
    except ArtifactError:
        pass
