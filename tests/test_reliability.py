"""Nothing lost, nothing half-done, one line for bad input, tried the way a user gets it wrong.

- Outputs (fate.artifacts.outputs): an input, a folder holding an input, or a folder Fate did not
  write is never replaced, with or without --force; what a killed writer left is reclaimed by the
  next write; reports are written whole.
- Text from users (prompt, calibration files) and from artifacts (chat templates, which are code
  and render in a bounded sandbox), and sampling numbers (NaN, negative seeds)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fate.artifacts import Artifact, ArtifactError, FateError
from fate.artifacts.outputs import check_output, reclaim_stale, write_report
from fate.runtime import text

BIN = Path(sys.executable).parent


def run(cmd: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / cmd), *map(str, args)], capture_output=True, text=True, timeout=300)


def refused(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def digest(root: Path) -> str:
    """Every file under root, names and bytes."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def workspace(mixtral, tmp_path):
    """A checkpoint with a user's file beside it, and a compiled artifact."""
    ckpt = tmp_path / "models" / "ckpt"
    shutil.copytree(mixtral.ckpt, ckpt)
    (tmp_path / "models" / "notes.txt").write_text("mine")
    art = tmp_path / "art"
    assert run("fate-compile", ckpt, "-o", art, "--calib", "none", "-q").returncode == 0
    return ckpt, art


def test_compile_never_writes_over_its_checkpoint(workspace):
    ckpt, _ = workspace
    before = digest(ckpt.parent)
    refused(run("fate-compile", ckpt, "-o", ckpt, "--force", "-q"), "is the input")
    refused(run("fate-compile", ckpt, "-o", ckpt.parent, "--force", "-q"), "contains the input")
    refused(run("fate-compile", ckpt, "-o", ckpt / "art", "--force", "-q"), "inside the input")
    calib = ckpt.parent / "notes.txt"
    refused(run("fate-compile", ckpt, "-o", calib, "--calib", calib, "--force", "-q"), "is the input")
    assert digest(ckpt.parent) == before


def test_force_replaces_only_what_fate_wrote(workspace, tmp_path):
    ckpt, art = workspace
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    refused(run("fate-compile", ckpt, "-o", other, "--force", "-q"), "not a Fate artifact")
    assert (other / "cat.jpg").read_bytes() == b"\xff\xd8"
    # an artifact a user put a file into: --force would delete that file, so it is refused too
    (art / "graphs" / "my-notes.txt").write_text("keep")
    refused(run("fate-compile", ckpt, "-o", art, "--force", "-q"), "graphs/my-notes.txt")
    (art / "graphs" / "my-notes.txt").unlink()
    assert run("fate-compile", ckpt, "-o", art, "--force", "--calib", "none", "-q").returncode == 0
    Artifact.open(art)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("fate-compile", ckpt, "-o", empty, "--calib", "none", "-q").returncode == 0  # no --force needed


def test_pack_and_unpack_never_replace_their_input(workspace, tmp_path):
    _, art = workspace
    before = digest(art)
    refused(run("fate-pack", art, "-o", art / "manifest.json"), "inside the input")
    refused(run("fate-pack", art, "-o", art, "--force"), "is the input")
    assert digest(art) == before
    archive = tmp_path / "dist" / "model.fate"
    archive.parent.mkdir()
    assert run("fate-pack", art, "-o", archive).returncode == 0
    refused(run("fate-pack", art, "-o", archive), "--force")  # an existing file needs --force
    assert run("fate-pack", art, "-o", archive, "--force").returncode == 0
    letter = tmp_path / "letter.txt"
    letter.write_text("dear")
    refused(run("fate-pack", art, "-o", letter, "--force"), "not a Fate archive")
    assert letter.read_text() == "dear"
    packed = archive.read_bytes()
    refused(run("fate-unpack", archive, "-o", archive.parent, "--force"), "contains the input")
    refused(run("fate-unpack", archive, "-o", archive, "--force"), "is the input")
    assert archive.read_bytes() == packed
    assert run("fate-unpack", archive, "-o", tmp_path / "unpacked").returncode == 0
    assert digest(tmp_path / "unpacked") == before


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writer_is_cleaned_up_and_an_old_output_restored(tmp_path):
    out = tmp_path / "art"
    pid = dead_pid()
    partial = tmp_path / f".art.partial-{pid}-abc"
    (partial / "graphs").mkdir(parents=True)
    (partial / "graphs" / "x.onnx").write_bytes(b"half")
    old = tmp_path / f".art.old-{pid}"
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    mine = tmp_path / f".art.partial-{os.getpid()}-live"  # a write in progress here: left alone
    mine.mkdir()
    reclaim_stale(out)
    assert not partial.exists() and mine.exists()
    assert (out / "manifest.json").read_text() == "{}"  # killed between its two renames: put back


def test_compile_after_sigkill_succeeds(workspace, tmp_path):
    ckpt, _ = workspace
    out = tmp_path / "again"
    stale = tmp_path / f".again.partial-{dead_pid()}-x"
    stale.mkdir()
    assert run("fate-compile", ckpt, "-o", out, "--calib", "none", "-q").returncode == 0
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".again")) == []


def test_reports_are_written_whole_and_never_over_an_input(workspace, tmp_path):
    _, art = workspace
    refused(run("fate-inspect", art, "--html", tmp_path / "missing" / "r.html"), "not a directory")
    with pytest.raises(ArtifactError, match="is the input"):
        write_report(art / "manifest.json", "x", inputs=[art / "manifest.json"])
    report = tmp_path / "r.json"
    write_report(report, "{}", inputs=[art])
    assert report.read_text() == "{}"
    with pytest.raises(ArtifactError, match="directory"):
        check_output(art, [], True, "report")


def test_text_files_that_are_not_utf8_or_missing(workspace, tmp_path):
    ckpt, art = workspace
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    refused(run("fate-compile", ckpt, "-o", tmp_path / "o", "--calib", bad, "-q"), "not UTF-8")
    refused(run("fate-bench", art, "--prompts", bad), "not UTF-8")
    refused(run("fate-bench", art, "--prompts", tmp_path / "nowhere.txt"), "cannot read")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refused(run("fate-bench", art, "--prompts", empty), "no tokens")  # once an endless loop


@pytest.mark.parametrize("template, reason", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{% for a in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "more than"),
    ("{{ 'x' * 10**9 }}", "too large"),
    ("{{ 2 ** 100000000 }}", "too large"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "stopped"),
    ("{{ ''.__class__.__mro__ }}", "failed"),
])
def test_chat_templates_run_in_a_bounded_sandbox(template, reason, monkeypatch):
    monkeypatch.setattr(text, "TEMPLATE_SECONDS", 0.5)
    monkeypatch.setattr(text, "TEMPLATE_MAX_CHARS", 100_000)
    with pytest.raises(FateError, match=reason):
        text.render_template(template, messages=[])
    assert text.render_template("{{ messages[0].content }}!", messages=[{"content": "hi"}]) == "hi!"


@pytest.mark.parametrize("flags, fragment", [
    (["--temperature", "nan"], "temperature"), (["--temperature", "inf"], "temperature"),
    (["--temperature", "0.7", "--seed", "-1"], "seed"), (["--top-p", "nan"], "top-p"),
])
def test_sampling_flags_that_are_not_numbers_are_refused(workspace, flags, fragment):
    _, art = workspace
    refused(run("fate-run", art, "-p", "hello", "-n", "2", *flags), fragment)


@pytest.mark.parametrize("every_load", [False, True])
def test_an_expert_changed_after_its_first_load(mixtral, tmp_path, every_load):
    """Hashes are checked once per process unless --verify-every-load: the README says which."""
    from fate.runtime.experts.executors import ExpertRunner
    from fate.runtime.experts.loads import ExpertLoader
    from fate.runtime.experts.pool import scratch_buffer

    art = tmp_path / "art"
    shutil.copytree(mixtral.artifact(4), art)
    artifact = Artifact.open(art)
    from fate.runtime import native

    if not native.available():
        pytest.skip("the native kernel is not built: a changed byte would fail the session's parse instead")
    layer = artifact.manifest.moe_layers[0].index
    path = artifact.manifest.layers[layer].experts["int4"][0]
    loader = ExpertLoader(artifact, ExpertRunner(artifact, "native", 1), every_load=every_load)
    buffer = scratch_buffer(artifact.entry(path).size)
    loader.load(layer, 0, "int4", buffer, None)
    data = bytearray((art / path).read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    (art / path).write_bytes(bytes(data))
    if every_load:
        with pytest.raises(ArtifactError, match="SHA-256"):
            loader.load(layer, 0, "int4", buffer, None)
    else:
        loader.load(layer, 0, "int4", buffer, None)


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.replace('"hidden_size": ', '"hidden_size": NaN, "x": ', 1), "not a finite number"),
    (lambda t: t.replace('"hidden_size": ', '"hidden_size": 1e999, "x": ', 1), "not a finite number"),
    (lambda t: t.replace('"hidden_size": ', '"deep": ' + "[" * 100000 + "]" * 100000 + ', "hidden_size": ', 1),
     "nested too deeply"),
    (lambda t: t.replace('"hidden_size": ', '"big": ' + "9" * 5000 + ', "hidden_size": ', 1), "not valid JSON"),
])
def test_manifest_numbers_that_are_not_numbers(workspace, tmp_path, edit, fragment):
    """The one JSON reader (fate.artifacts.inputs.load_json) for manifests, profiles and headers."""
    _, art = workspace
    manifest = art / "manifest.json"
    text = manifest.read_text()
    assert '"hidden_size": ' in text
    manifest.write_text(edit(text))
    refused(run("fate-run", art, "-p", "hello", "-n", "1"), fragment)
    refused(run("fate-verify", art), fragment)


def _fewer_kv_heads(m):
    m["model"]["num_kv_heads"] = max(1, m["model"]["num_kv_heads"] // 2)


def _shorter_rotary(m):
    m["model"]["rope_inv_freq"] = m["model"]["rope_inv_freq"][:-1]


def _fewer_experts_than_routed(m):
    moe = next(layer for layer in m["layers"] if layer["kind"] == "moe")
    moe["routing"]["num_experts"] -= 1
    for files in moe["experts"].values():
        files.pop()


def _top_k(m):
    moe = next(layer for layer in m["layers"] if layer["kind"] == "moe")
    moe["routing"]["top_k"] -= 1


def _predicts_past_the_last_layer(m):
    m["layers"][-1]["predicts_next"] = True


def _positions_of_the_other_kind(m):
    for layer in m["layers"]:
        if layer.get("mixer", "attention") == "attention":
            layer["positions"] = "tables" if layer.get("positions", "per_token") == "per_token" else "per_token"


@pytest.mark.parametrize("edit, fragment", [
    (_fewer_kv_heads, "past_key is declared"), (_shorter_rotary, "cos_cache is declared"),
    (_fewer_experts_than_routed, "router_logits is declared"), (_top_k, "expert_ids is declared"),
    (_predicts_past_the_last_layer, "no MoE layer follows"),
    (_positions_of_the_other_kind, "wants inputs the runtime does not feed")
])
def test_manifest_numbers_that_contradict_the_graphs(workspace, edit, fragment):
    """What the graphs declare is checked against the manifest when they load: one line naming the
    graph, never an onnxruntime error mid-generation or an expert index out of range."""
    import json

    _, art = workspace
    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    for layer in manifest["layers"]:  # a decode step's own checks refuse some of these first (test_decode_step)
        layer.pop("decode_step", None)
    edit(manifest)
    path.write_text(json.dumps(manifest))
    refused(run("fate-run", art, "-p", "hello", "-n", "2"), fragment)
    refused(run("fate-run", art, "-p", "hello", "-n", "2", "--memory-budget", "50%"), fragment)


def test_an_embedding_graph_without_the_prediction_its_manifest_promises_is_one_line(workspace):
    """Layer 0 is an MoE layer, so the manifest says the embedding graph predicts its experts
    (embed_predicts_next); a graph whose outputs are named otherwise (hand-edited to the same size, so
    --no-verify gets past the hashes) is refused when it loads, by name, resident or offloaded."""
    _, art = workspace
    assert json.loads((art / "manifest.json").read_text())["embed_predicts_next"]
    path = art / "graphs" / "embed.onnx"
    data = path.read_bytes()
    assert data.count(b"next_router_logits") >= 2
    path.write_bytes(data.replace(b"next_router_logits", b"next_router_logitX"))
    for budget in ("100%", "50%"):
        refused(run("fate-run", art, "-p", "hello", "-n", "2", "--no-verify", "--memory-budget", budget),
                "has no output 'next_router_logits'")

def test_a_graph_onnxruntime_refuses_is_one_line(workspace):
    """An initializer whose dims claim more than its bytes (hand-edited, so --no-verify past the
    hashes): onnxruntime's refusal becomes one line naming the graph."""
    import onnx

    _, art = workspace
    path = sorted((art / "graphs").glob("layer_*.onnx"))[0]
    model = onnx.load(path)
    big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    big.dims[0] *= 1024
    path.write_bytes(model.SerializeToString())
    refused(run("fate-run", art, "-p", "hello", "-n", "2", "--no-verify"), path.name)


def test_checkpoint_weights_that_are_nan_are_refused_by_name(mixtral, tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(mixtral.ckpt, ckpt)
    files = sorted(ckpt.glob("*.safetensors"))
    tensors = load_file(files[0])
    name = sorted(n for n in tensors if "q_proj" in n)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[3] = np.nan
    save_file(tensors, files[0], metadata={"format": "pt"})
    refused(run("fate-compile", ckpt, "-o", tmp_path / "out", "--calib", "none", "-q"), name)
    assert not (tmp_path / "out").exists()


def rewrite_header(path: Path, edit) -> None:
    """Apply edit(header) to a safetensors file's JSON header, keeping its data as it is."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:])


def _first_two(header):
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])[:2]


def _string_offsets(header):
    name = _first_two(header)[0]
    header[name]["data_offsets"] = [str(v) for v in header[name]["data_offsets"]]


def _overlap(header):
    a, b = _first_two(header)
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    begin = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [begin, begin + size]


def _integer_weight(header):
    name = sorted(n for n in header if "q_proj" in n)[0]
    header[name]["dtype"] = {"F32": "I32", "BF16": "I16", "F16": "I16"}[header[name]["dtype"]]


@pytest.mark.parametrize("edit, fragment", [(_string_offsets, "whole numbers"), (_overlap, "overlap"),
                                            (_integer_weight, "is stored as I")])
def test_safetensors_headers_that_lie(mixtral, tmp_path, edit, fragment):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(mixtral.ckpt, ckpt)
    for path in sorted(ckpt.glob("*.safetensors")):
        rewrite_header(path, edit)
    refused(run("fate-compile", ckpt, "-o", tmp_path / "out", "--calib", "none", "-q"), fragment)
    assert not (tmp_path / "out").exists()


def test_an_artifact_has_an_identity_that_covers_its_manifest(workspace, tmp_path):
    """fate-verify checks files against the manifest; --expect checks the manifest itself."""
    _, art = workspace
    archive = tmp_path / "model.fate"
    packed = run("fate-pack", art, "-o", archive)
    digest = packed.stdout.split("sha256:")[1].strip()
    assert digest == Artifact.open(art).digest == Artifact.open(archive).digest  # packing keeps it
    assert f"sha256:{digest}" in run("fate-inspect", art).stdout
    ok = run("fate-verify", archive, "--expect", f"sha256:{digest}")
    assert ok.returncode == 0 and digest in ok.stdout
    manifest = art / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"max_positions": ', '"max_positions": 1', 1))
    assert run("fate-verify", art).returncode == 0  # every file still matches the edited manifest
    edited = run("fate-verify", art, "--expect", digest)
    assert edited.returncode == 1 and "not the expected" in edited.stdout


@pytest.mark.parametrize("size", ["8", "48", str(2**40)])
def test_block_sizes_outside_what_readers_accept(workspace, tmp_path, size):
    ckpt, _ = workspace
    refused(run("fate-compile", ckpt, "-o", tmp_path / "o", "--block-size", size, "--calib", "none", "-q"),
            "--block-size")


@pytest.mark.parametrize("file, content, fragment", [
    ("generation_config.json", '{"temperature": "hot", "eos_token_id": 0}', "temperature"),
    ("generation_config.json", '{"top_k": -1, "eos_token_id": 0}', "top_k"),
    ("generation_config.json", '{"temperature": NaN, "eos_token_id": 0}', "temperature"),
    ("generation_config.json", '{"eos_token_id": "</s>"}', "token id"),
    ("chat_template.jinja", b"{{ caf\xe9 }}", "not UTF-8"),
])
def test_checkpoint_settings_the_runtime_would_refuse_are_refused_at_compile(workspace, tmp_path, file, content,
                                                                               fragment):
    """What the compiler writes, the runtime accepts: a setting it could not is refused by name."""
    ckpt, _ = workspace
    target = ckpt / file
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(run("fate-compile", ckpt, "-o", tmp_path / "o", "--calib", "none", "-q"), fragment)
    assert not (tmp_path / "o").exists()


def test_a_failing_file_system_is_one_line(workspace):
    """OSErrors (here: a folder that cannot be created) end every command in one line."""
    ckpt, art = workspace
    refused(run("fate-compile", ckpt, "-o", "/proc/self/fate-out", "--calib", "none", "-q"), "/proc/self")
    refused(run("fate-unpack", "/proc/self/nothing.fate", "-o", "/proc/self/x"), "nothing.fate")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    from fate.compiler import CompileOptions, compile_checkpoint
    from fate.compiler.profile import CalibrationOptions

    out = tmp_path_factory.mktemp("calibrated") / "art"
    compile_checkpoint(CompileOptions(Path(__file__).parent.parent / "examples" / "tiny-moe", out, bits=(4,),
                                      calibration=CalibrationOptions(tokens=1024)), log=lambda _m: None)
    return out


@pytest.mark.parametrize("damage", ["short popularity", "transition shape", "missing layer"])
def test_profiles_that_do_not_fit_the_manifest(calibrated, damage):
    """Profile lists the runtime indexes by expert are checked against the manifest (Profile.check)."""
    import json

    from fate.artifacts.profile import profile_from_bytes

    art = Artifact.open(calibrated)
    profile = json.loads(art.read_bytes(art.manifest.profile))
    layer = profile["layers"][-1]
    if damage == "short popularity":
        layer["popularity"] = layer["popularity"][:-1]
    elif damage == "transition shape":
        layer["transitions"] = [row[:-1] for row in layer["transitions"]]
    else:
        profile["layers"] = profile["layers"][:-1]
    with pytest.raises(ArtifactError, match="profile.json"):
        profile_from_bytes(json.dumps(profile).encode()).check(art.manifest.experts_per_layer)
    profile_from_bytes(art.read_bytes(art.manifest.profile)).check(art.manifest.experts_per_layer)


@pytest.mark.parametrize("key, value, fragment", [
    ("num_attention_heads", 0, "num_attention_heads"),
    ("head_dim", "32", "head_dim"),
    ("rope_theta", "big", "rope_theta"),
    ("model_type", ["mixtral"], "unsupported model type"),
    ("sliding_window", "4096", "sliding window"),
    ("num_key_value_heads", 3, "multiple"),
    ("num_experts_per_tok", 99, "top-99"),
])
def test_config_values_of_the_wrong_kind_are_refused_by_name(workspace, tmp_path, key, value, fragment):
    """ArchConfig checks what every family read; typed getters refuse strings where numbers belong."""
    import json

    ckpt, _ = workspace
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("rope_parameters", None) if key == "rope_theta" else None
    config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    refused(run("fate-compile", ckpt, "-o", tmp_path / "o", "--calib", "none", "-q"), fragment)


def test_ctrl_c_while_a_command_starts_is_one_line(tmp_path):
    """The entry points import their command inside a handler (fate.entry): an interrupt
    during the heavy imports, made deterministic here by a module whose import is interrupted."""
    (tmp_path / "slow_to_import.py").write_text("raise KeyboardInterrupt\n")
    code = "from fate.entry import run; run('fate-x', 'slow_to_import:main')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert proc.returncode == 130 and proc.stderr.strip() == "fate-x: interrupted while starting", proc.stderr


def test_the_entry_module_loads_no_heavy_package():
    code = ("import sys, fate.entry, fate.compiler; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'onnxruntime', 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


class _ByteCodec:
    """Token id = one byte; decoded as byte-level tokenizers do (invalid bytes become U+FFFD)."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamed_text_holds_back_only_a_character_that_can_still_complete():
    stream = text.StreamDecoder(_ByteCodec())
    euro = "€".encode()  # three bytes: held until the third arrives
    pieces = [stream.push(b) for b in b"ab" + euro]
    assert pieces == ["a", "b", "", "", "€"]
    # stray continuation bytes never complete: they stream after at most MAX_HELD tokens, not at the end
    stray = [stream.push(0x80) for _ in range(12)]
    assert "".join(stray).count("\ufffd") >= 12 - text.StreamDecoder.MAX_HELD
    assert "".join(pieces + stray) + stream.flush() == (b"ab" + euro + b"\x80" * 12).decode("utf-8", "replace")


def test_streamed_text_over_many_windows_is_the_whole_text():
    """The decoder restarts its window as it goes: characters of every width, split across tokens
    anywhere, and stray bytes still add up to the decoded whole."""
    data = ("naïve café — 北京 😀 " * 12).encode() + b"\x80\x80\xe2" + "ok €".encode()
    stream = text.StreamDecoder(_ByteCodec())
    pieces = [stream.push(b) for b in data]
    assert stream.start > 0  # the window moved
    assert "".join(pieces) + stream.flush() == data.decode("utf-8", "replace")


def test_a_tokenizer_that_panics_is_one_error(workspace):
    """tokenizers turns a Rust panic into pyo3's PanicException, a BaseException that `except
    Exception` lets through as a traceback."""
    _, art = workspace

    class PanicException(BaseException):
        pass

    codec = text.TextCodec(Artifact.open(art))

    class Panicking:
        def encode(self, *_args, **_kwargs):
            raise PanicException("regex engine: retry limit exceeded")

        decode = encode

    codec.tokenizer = Panicking()
    with pytest.raises(ArtifactError, match="tokenizer cannot encode text: regex engine"):
        codec.encode("hello")
    with pytest.raises(ArtifactError, match="tokenizer cannot decode tokens"):
        codec.decode([1, 2])
    broken = art / "tokenizer" / "tokenizer.json"
    size = broken.stat().st_size  # the size is checked even without hashes: keep it
    broken.write_text('{"model": {"type": "nothing"}}'.ljust(size))
    refused(run("fate-run", art, "-p", "hello", "-n", "1", "--no-verify"), "tokenizer cannot load")


def test_expert_files_deleted_while_generating(workspace, tmp_path):
    """The files go once the first text is out (an event, not a sleep); at a 25% budget the run
    must reload experts later, and ends in one line, exit 1, never a traceback or a hang. An attempt
    that reached the end of the model's short context before the files went (this process
    descheduled on a loaded machine) says nothing and is repeated."""
    _, art = workspace
    for attempt in range(5):
        copy = tmp_path / f"copy{attempt}"
        shutil.copytree(art, copy)
        proc = subprocess.Popen([str(BIN / "fate-run"), str(copy), "-p", "hello", "-n", "100000", "--greedy",
                                 "--ignore-eos", "--memory-budget", "25%"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = b""
        while len(seen) <= len("hello"):
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, proc.communicate()[1].decode()
            seen += chunk
        shutil.rmtree(copy / "experts")
        _, err = proc.communicate(timeout=120)
        err = err.decode()
        if not (proc.returncode == 0 and "stop: context" in err):
            break
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "fate-run" in lines[0] and "expert" in lines[0], err


@pytest.mark.parametrize("executor", ["native", "session"])
def test_nan_expert_weights_are_refused_not_sampled(workspace, executor):
    """Scales of every expert of the first MoE layer set to NaN, in place (so --no-verify gets past
    the hashes, as an artifact published damaged would without it): one line, exit 1."""
    _, art = workspace
    manifest = Artifact.open(art).manifest
    layer = manifest.moe_layers[0]
    for precision, layout in layer.expert_layouts.items():  # whichever precision the run picks
        scales = next(v for v in layout.tensors if v.name == "gate.scales")
        for path in layer.experts[precision]:
            with open(art / path, "r+b") as f:
                f.seek(scales.offset)
                f.write(np.full(int(np.prod(scales.shape)), np.nan, np.float32).tobytes())
    refused(run("fate-run", art, "-p", "hello", "-n", "2", "--no-verify", "--executor", executor), "NaN")
