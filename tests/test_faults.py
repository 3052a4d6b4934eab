"""Faults and hostile input found in December, each held by a test that failed before its fix:
resources a user asks for are bounded, damaged profiles and manifests are refused with one line,
files that vanish mid-run fall back as missing ones do, and stderr holds only Fate's lines."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_hostile import one_line_error

BIN = Path(sys.executable).parent


def run(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True,
                          timeout=timeout, env=env)


def replace_file(art: Path, path: str, raw: bytes) -> None:
    """Write an artifact's file anew, its manifest entry (size, SHA-256) to match: damage that
    passes the integrity checks, as a faulty compiler or a hand edit would leave it."""
    (art / path).write_bytes(raw)
    manifest = json.loads((art / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == path:
            entry.update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (art / "manifest.json").write_text(json.dumps(manifest))


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """The example model compiled calibrated, so with a profile, and with INT2 copies (asked for)."""
    out = tmp_path_factory.mktemp("faults") / "tiny-moe"
    proc = run("fate-compile", EXAMPLE, "-o", out, "--bits", "4", "--int2-copies", "-q")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def art(calibrated, tmp_path) -> Path:
    out = tmp_path / "art"
    shutil.copytree(calibrated, out)
    return out


def test_thread_counts_are_bounded(art):
    """--threads 10000 gave every session 10,000 threads (no answer in a minute); now the usable
    cores, said in one line. --prefetch-threads 10000 started 10,000 threads; now refused."""
    proc = run("fate-run", art, "-p", "hi", "-n", "2", "--greedy", "--threads", "10000", "--memory-budget", "50%")
    assert proc.returncode == 0, proc.stderr
    assert "--threads 10000 is more than the" in proc.stderr
    line = one_line_error("fate-run", art, "-p", "hi", "--memory-budget", "50%", "--prefetch-threads", "10000")
    assert "--prefetch-threads" in line


def test_a_budget_of_hundreds_of_digits_is_one_line(art):
    assert "more bytes than any machine has" in one_line_error("fate-run", art, "-p", "hi", "--memory-budget", "9" * 400 + "GB")


@pytest.mark.parametrize("damage, fragment", [
    (lambda layer: layer.update(miss_curve=[], miss_curve_slots=[]), "miss curve has no points"),
    (lambda layer: layer.update(miss_curve_slots=layer["miss_curve_slots"][::-1]), "not at increasing counts"),
    (lambda layer: layer["miss_curve"].__setitem__(0, 7.0), "outside [0, 1]"),
])
def test_a_profile_with_a_broken_curve_is_one_line(art, damage, fragment):
    profile = json.loads((art / "profile.json").read_text())
    damage(profile["layers"][0])
    replace_file(art, "profile.json", json.dumps(profile).encode())
    assert fragment in one_line_error("fate-run", art, "-p", "hi", "--memory-budget", "50%")


def test_expert_files_removed_mid_run_fall_back_to_their_other_copy(art):
    """A read that fails with an OSError (the folder deleted under a running process) is a missing
    file: the stored copy at another precision is used, with a warning, as the README says."""
    from fate.artifacts.budget import parse_budget
    from fate.runtime import Engine, OffloadOptions, SamplingConfig
    from fate.runtime.options import EngineOptions

    manifest = json.loads((art / "manifest.json").read_text())
    precisions = list(manifest["layers"][0]["experts"])
    assert len(precisions) > 1, precisions  # the calibrated artifact keeps INT2 copies
    engine = Engine.load(art, EngineOptions(offload=OffloadOptions(budget=parse_budget("25%"))))
    try:
        engine.generate("The quick brown fox", 4, SamplingConfig())
        shutil.rmtree(art / "experts" / precisions[0])
        out = engine.generate("A mixture of experts routes every token", 12, SamplingConfig())
        assert len(out.result.token_ids) == 12
    finally:
        engine.close()


def test_stderr_holds_only_fates_lines_without_a_writable_home(art, tmp_path):
    """onnxruntime's telemetry warns on stderr where it cannot keep its device id (a service user
    without a writable HOME): Fate loads it with stderr silenced."""
    env = {**os.environ, "HOME": "/proc/nonexistent", "XDG_CACHE_HOME": "/proc/nonexistent"}
    proc = run("fate-run", art, "-p", "hi", "-n", "2", "--greedy", "--json", env=env)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    json.loads(proc.stdout)


def test_a_sparse_archive_member_is_refused(art, tmp_path):
    """A GNU sparse member (here one data region, so its bytes even lie in place) ran: archives are
    read where their members lie, so any sparse member is refused."""
    from fate.artifacts import pack_artifact
    from test_hostile import members_of, write_tar

    members = members_of(pack_artifact(art, tmp_path / "model.fate"))
    info, data = members[1]
    info.pax_headers = {"GNU.sparse.numblocks": "1", "GNU.sparse.offset": "0", "GNU.sparse.numbytes": str(len(data)),
                        "GNU.sparse.map": f"0,{len(data)}", "GNU.sparse.size": str(len(data)),
                        "GNU.sparse.name": info.name}
    bad = write_tar(tmp_path / "sparse.fate", members)
    for command in (["fate-run", bad, "-p", "hi"], ["fate-verify", bad]):
        assert "sparse" in one_line_error(*command)


def test_manifests_with_repeated_keys_and_policies_out_of_range_are_refused(art):
    manifest = (art / "manifest.json").read_text()
    (art / "manifest.json").write_text(manifest.replace('"schema_version":', '"schema_version": "9.9", "schema_version":', 1))
    assert "repeats the key 'schema_version'" in one_line_error("fate-run", art, "-p", "hi")
    data = json.loads(manifest)
    data["policy"]["budget"] = -0.5
    (art / "manifest.json").write_text(json.dumps(data))
    assert "policy.budget = -0.5 is out of range" in one_line_error("fate-run", art, "-p", "hi")


def test_a_tokenizer_that_panics_is_one_line(art):
    """A normalizer whose regex matches the empty string makes the tokenizers library panic on every
    text: Rust printed its message and a backtrace of a hundred lines (with RUST_BACKTRACE set) before
    Fate's one line. The panic's lines are held off stderr; Fate's line names the file."""
    tokenizer = json.loads((art / "tokenizer" / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Replace", "pattern": {"Regex": "(?=)"}, "content": "x"}
    replace_file(art, "tokenizer/tokenizer.json", json.dumps(tokenizer).encode())
    env = {**os.environ, "RUST_BACKTRACE": "1"}
    proc = run("fate-run", art, "-p", "hi", env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "tokenizer.json: the tokenizer cannot" in lines[0], proc.stderr


def compile_command(out: Path, *flags: str) -> list[str]:
    return [str(BIN / "fate-compile"), str(EXAMPLE), "-o", str(out), "--bits", "4", *flags]


def test_sigterm_during_a_compile_leaves_nothing_beside_the_output(tmp_path):
    """SIGTERM left `.NAME.partial-*` beside the output; it now unwinds as Ctrl-C does. Sent once the
    compile has begun writing (its partial folder exists: an event, not a sleep)."""
    import signal

    out = tmp_path / "art"
    proc = subprocess.Popen(compile_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(60_000):  # at most 5 minutes, each turn a wait on the process itself
        if any(p.name.startswith(".art.partial-") for p in tmp_path.iterdir()):
            break
        try:
            proc.wait(timeout=0.005)
            break
        except subprocess.TimeoutExpired:
            pass
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the compile finished before the signal came")
    assert proc.returncode == 143 and "terminated" in proc.stderr.read()
    assert list(tmp_path.iterdir()) == []


def test_artifacts_are_published_with_the_users_umask_and_a_full_disk_names_the_file(tmp_path):
    """Artifacts came out 0700 (mkdtemp's mode): other users and service accounts could not read
    them. And a write that fails for space named no file: here a file-size limit makes the same
    failed write (EFBIG instead of ENOSPC) without a full disk."""
    import resource
    import signal
    import stat

    out = tmp_path / "art"
    proc = subprocess.run(compile_command(out, "-q"), capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o755

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = subprocess.run(compile_command(tmp_path / "small", "-q"), capture_output=True, text=True, timeout=300,
                          preexec_fn=small_files)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert f"cannot write {tmp_path / 'small'}/" in lines[0] and "File too large" in lines[0]
    assert list(p.name for p in tmp_path.iterdir()) == ["art"]
    # fate-unpack writes through the same writer: the same line, naming its output's file
    from fate.artifacts import pack_artifact

    archive = pack_artifact(out, tmp_path / "model.fate")
    proc = subprocess.run([str(BIN / "fate-unpack"), str(archive), "-o", str(tmp_path / "unpacked")],
                          capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert f"cannot write {tmp_path / 'unpacked'}/" in lines[0] and "File too large" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "model.fate"]


def test_a_decode_step_whose_numbers_disagree_with_its_graph_is_refused(art):
    """Prefill ran the graph's attention scale, decode the manifest's: different tokens, and
    fate-verify passed. Each native step now runs once beside its graph at load."""
    original = (art / "manifest.json").read_text()
    for field, factor, fragment in (("attention_scale", 0.8, "decode step has attention scale"),
                                    ("norm_eps", 1e6, "decode step computes"),
                                    ("routed_scaling", 3.0, "decode step computes expert_weights")):
        manifest = json.loads(original)
        layer = next(layer for layer in manifest["layers"] if layer.get("decode_step"))
        layer["decode_step"][field] *= factor
        (art / "manifest.json").write_text(json.dumps(manifest))
        line = one_line_error("fate-run", art, "-p", "hi")
        assert fragment in line and layer["graph"] in line, (field, line)
        proc = run("fate-verify", art)
        assert proc.returncode == 1 and fragment in proc.stdout, (field, proc.stdout)


def test_a_layer_cannot_lose_its_combine_graph(tmp_path):
    """A FlexOlmo layer whose combine_graph the manifest dropped ran, adding its routed sum
    unnormalized: different tokens. Its graph now says it needs one."""
    from conftest import Built

    built = Built(tmp_path / "flex", family="flex_olmo", seed=49)
    art = built.artifact(32)
    manifest = json.loads((art / "manifest.json").read_text())
    layer = next(layer for layer in manifest["layers"] if layer.get("combine_graph"))
    layer["combine_graph"] = None
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert "through a combine graph" in one_line_error("fate-run", art, "-p", "hi")
