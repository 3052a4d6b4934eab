"""The two commands as a user runs them: output, streaming, JSON, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fate.artifacts import Artifact
from fate.compiler.families import supported

BIN = Path(sys.executable).parent
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe"


def run(cmd: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / cmd), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_compile_and_run_json(mixtral, tmp_path):
    art = tmp_path / "art"
    run("fate-compile", mixtral.ckpt, "-o", art, "--bits", "4")
    proc = run("fate-run", art, "--prompt", "The quick brown fox", "-n", "6", "--greedy", "--json")
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 6 or out["stats"]["stop_reason"] == "eos"
    assert out["stats"]["prompt_tokens"] == len(out["prompt_ids"]) > 0
    assert out["experts"]["runs"] > 0 and isinstance(out["text"], str)
    assert Artifact.open(art).manifest.model.dense_precision == "int8"  # quantized experts: quantized dense


def test_dense_precision_follows_the_experts_unless_asked():
    from fate.compiler import CompileOptions

    def dense(**kwargs) -> int:
        return CompileOptions(Path("ckpt"), Path("out"), **kwargs).resolved_dense_bits

    assert dense(bits=(32,)) == dense(bits=(16,)) == dense(bits=(8,)) == 32  # --bits 32: exact everywhere
    assert dense(bits=(4,)) == dense(bits=(8, 4)) == dense(bits=(2,)) == dense() == 8
    assert dense(bits=(32,), dense_bits=8) == 8 and dense(bits=(4,), dense_bits=32) == 32


def test_streamed_text_equals_decoded_ids(mixtral):
    from fate.runtime import Engine, GenerationResult, SamplingConfig

    engine = Engine.load(mixtral.artifact(4))
    result = GenerationResult([])
    pieces = list(engine.stream("Hello, world!", 60, SamplingConfig(greedy=False, seed=3), result=result))
    eos = engine.codec.eos_ids
    assert "".join(pieces) == engine.decode([t for t in result.token_ids if t not in eos])


def test_sampling_is_reproducible_with_a_seed(mixtral):
    args = [mixtral.artifact(4), "-p", "Once upon a time", "-n", "8", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "50", "--seed", "7", "--json"]
    first, second = (json.loads(run("fate-run", *args).stdout)["token_ids"] for _ in range(2))
    assert first == second


def test_chat_template_is_applied(mixtral):
    from fate.runtime import Engine

    engine = Engine.load(mixtral.artifact(4))
    ids = engine.prompt_ids("hi there", chat=True)
    text = engine.codec.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|user|>hi there") and text.endswith("<|assistant|>")


def test_chat_without_template_is_refused(tmp_path):
    from tiny_models import make_model

    make_model("mixtral", tmp_path / "ckpt")
    run("fate-compile", tmp_path / "ckpt", "-o", tmp_path / "art", "-q")
    assert_one_line_error(run("fate-run", tmp_path / "art", "-p", "hi", "--chat", check=False), "chat template")


def test_prompt_longer_than_context(mixtral):
    proc = run("fate-run", mixtral.artifact(4), "-p", "word " * 400, check=False)
    assert_one_line_error(proc, "context")


def test_greedy_conflicts_with_sampling_flags(mixtral):
    proc = run("fate-run", mixtral.artifact(4), "-p", "x", "--greedy", "--temperature", "0.5", check=False)
    assert_one_line_error(proc, "--greedy")


def test_existing_output_refused_without_force(mixtral, tmp_path):
    out = tmp_path / "out"
    run("fate-compile", mixtral.ckpt, "-o", out, "--calib", "none", "-q")
    assert_one_line_error(run("fate-compile", mixtral.ckpt, "-o", out, check=False), "--force")
    run("fate-compile", mixtral.ckpt, "-o", out, "--force", "-q")
    assert (out / "manifest.json").exists()


def broken_checkpoint(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    if how == "unsupported":
        config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    elif how == "shapes":
        config.update(hidden_size=config["hidden_size"] * 2)
    elif how == "no-weights":
        (dst / "model.safetensors").unlink()
    elif how == "truncated":
        with open(dst / "model.safetensors", "r+b") as f:
            f.truncate((dst / "model.safetensors").stat().st_size - 100)
    elif how == "no-tokenizer":
        (dst / "tokenizer.json").unlink()
    elif how == "bad-config":
        (dst / "config.json").write_text("{oops")
        return dst
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("how,fragment", [
    ("unsupported", "supported: " + ", ".join(supported())),
    ("shapes", "config.json implies"),
    ("no-weights", "model.safetensors"),
    ("truncated", "safetensors"),
    ("no-tokenizer", "tokenizer.json"),
    ("bad-config", "config.json"),
])
def test_bad_checkpoints_give_one_line_errors_and_no_artifact(mixtral, tmp_path, how, fragment):
    ckpt = broken_checkpoint(mixtral.ckpt, tmp_path / "ckpt", how)
    proc = run("fate-compile", ckpt, "-o", tmp_path / "art", check=False)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "art").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no leftover temporary directory


def test_unmapped_tensor_is_named(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from tiny_models import make_model

    make_model("mixtral", tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    weights["model.layers.0.mystery.weight"] = torch.zeros(3)
    save_file(weights, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    proc = run("fate-compile", tmp_path / "ckpt", "-o", tmp_path / "art", check=False)
    assert_one_line_error(proc, "model.layers.0.mystery.weight")


@pytest.mark.parametrize("damage", ["no-manifest", "missing-file", "bad-schema"])
def test_incomplete_or_invalid_artifact_is_refused(mixtral, tmp_path, damage):
    art = tmp_path / "art"
    shutil.copytree(mixtral.artifact(4), art)
    if damage == "no-manifest":
        (art / "manifest.json").unlink()
    elif damage == "missing-file":
        (art / "graphs" / "layer_001.onnx").unlink()
    else:
        data = json.loads((art / "manifest.json").read_text())
        data["model"]["num_heads"] = "four"
        (art / "manifest.json").write_text(json.dumps(data))
    assert_one_line_error(run("fate-run", art, "-p", "hello", check=False))


@pytest.mark.parametrize("flags, fragment", [
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--presence-penalty", "5"], "--presence-penalty"),
    (["--min-p", "1.5"], "--min-p"),
    (["--greedy", "--min-p", "0.1"], "--min-p"),
])
def test_penalty_flags_are_checked(mixtral, flags, fragment):
    assert_one_line_error(run("fate-run", mixtral.artifact(4), "-p", "hello", *flags, check=False), fragment)


def test_a_repetition_penalty_changes_greedy_output(mixtral):
    def text(*flags):
        return json.loads(run("fate-run", mixtral.artifact(4), "-p", "hello hello hello", "-n", "16", "--greedy",
                              "--ignore-eos", "--json", *flags).stdout)["token_ids"]
    assert text() != text("--repetition-penalty", "3", "--frequency-penalty", "2")


def test_prompts_from_standard_input_and_a_file(mixtral, tmp_path):
    def ids(*args, stdin=None):
        proc = subprocess.run([str(BIN / "fate-run"), str(mixtral.artifact(4)), "-n", "4", "--greedy", "--json", *args],
                              input=stdin, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["prompt_ids"]
    (tmp_path / "prompt.txt").write_text("Hello there\n", encoding="utf-8")
    assert ids("-p", "-", stdin="Hello there\n") == ids("--prompt-file", tmp_path / "prompt.txt") == \
        ids("-p", "Hello there\n")
    assert_one_line_error(subprocess.run([str(BIN / "fate-run"), str(mixtral.artifact(4)), "-p", "-"], input="  \n",
                                         capture_output=True, text=True, timeout=300), "empty")
    assert_one_line_error(run("fate-run", mixtral.artifact(4), "--json", check=False), "--json needs a prompt")


def test_the_terminal_chat_on_a_pseudo_terminal(example):
    """fate-run with no prompt, as a person types: a turn, /reset, another turn, Ctrl-D."""
    import os
    import pty
    import select

    main, side = pty.openpty()
    proc = subprocess.Popen([str(BIN / "fate-run"), str(example), "-n", "12", "--greedy"], stdin=side, stdout=side,
                            stderr=side, close_fds=True)
    os.close(side)
    seen = ""

    def until(text: str, count: int = 1) -> str:
        nonlocal seen
        while seen.count(text) < count:
            ready, _, _ = select.select([main], [], [], 300)
            assert ready, f"no {text!r} in: {seen}"
            seen += os.read(main, 4096).decode("utf-8", errors="replace")
        return seen

    try:
        until("> ")
        assert "a chat (the model's template)" in seen and "/reset" in seen
        os.write(main, b"Tell me a story\n")
        until("tok/s")
        until("> ", 2)
        os.write(main, b"/reset\n")
        until("forgotten")
        os.write(main, b"And another\n")
        until("tok/s", 2)
        until("> ", 4)
        os.write(main, b"\x04")
        assert proc.wait(timeout=120) == 0, seen
        assert "Traceback" not in seen
    finally:
        proc.kill()
        os.close(main)


def test_the_chat_keeps_history_and_reuses_its_cache(example):
    from fate.runtime import Engine
    from fate.runtime.chat import Chat
    from fate.runtime.generate import SamplingConfig

    engine = Engine.load(example)
    chat = Chat(engine, SamplingConfig(), 6)
    first = chat.reply("Hello", lambda piece: None)
    second = chat.reply("And then?", lambda piece: None)
    assert len(chat.history) == 4 and second.stats.reused_tokens >= first.stats.prompt_tokens
    chat.reset()
    assert chat.history == [] and chat.reply("Hello", lambda piece: None).token_ids == first.token_ids
    engine.codec.chat_template = None  # a model without a template: each line a prompt of its own
    loop = Chat(engine, SamplingConfig(), 6)
    assert loop.prompt_ids("Once upon a time") == engine.encode("Once upon a time")
    loop.reply("Once upon a time", lambda piece: None)
    assert loop.history == []
    engine.close()


def test_what_users_already_have_gets_a_hint(mixtral, tmp_path):
    gguf = tmp_path / "model-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    for cmd in ("fate-run", "fate-compile"):
        args = ["-p", "hi"] if cmd == "fate-run" else ["-o", tmp_path / "out"]
        assert_one_line_error(run(cmd, gguf, *args, check=False), "GGUF file", "fate-compile")
        assert_one_line_error(run(cmd, "Qwen/Qwen3-30B-A3B", *args, check=False),
                              "huggingface-cli download Qwen/Qwen3-30B-A3B --local-dir Qwen3-30B-A3B")
    assert_one_line_error(run("fate-run", mixtral.ckpt, "-p", "hi", check=False),
                          "Hugging Face checkpoint", f"fate-compile {mixtral.ckpt} -o")
    assert_one_line_error(run("fate-compile", mixtral.artifact(4), "-o", tmp_path / "out", check=False),
                          "already a Fate artifact")
    dense = tmp_path / "dense"
    shutil.copytree(mixtral.ckpt, dense)
    config = json.loads((dense / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    (dense / "config.json").write_text(json.dumps({**config, "model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    assert_one_line_error(run("fate-compile", dense, "-o", tmp_path / "out", check=False), "dense model",
                          "Mixture-of-Experts")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget, fragment", [("10", "10GB (bytes) or 10%"), ("12 parsecs", "with a unit")])
def test_budgets_need_units(mixtral, budget, fragment):
    assert_one_line_error(run("fate-run", mixtral.artifact(4), "-p", "hi", "--memory-budget", budget, check=False),
                          fragment)


def test_budgets_as_people_write_them():
    from fate.artifacts.budget import parse_budget

    assert parse_budget("10G").bytes == 10 * 2**30 and parse_budget("512M").bytes == 512 * 2**20
    assert parse_budget("1.5GiB").bytes == int(1.5 * 2**30) and parse_budget("8GB").bytes == 8 * 10**9
    assert parse_budget("25%").share == 0.25


def test_compile_and_inspect_show_sizes_and_needs_and_the_report_is_a_picture(tmp_path):
    from browser import colours, picture

    example = tmp_path / "tiny-moe"
    compiled = run("fate-compile", EXAMPLE, "-o", example, "--bits", "4").stderr
    assert "MB on disk (experts: int4" in compiled.splitlines()[-1]
    out = run("fate-inspect", example, "--html", tmp_path / "report.html").stdout
    size = next(line for line in out.splitlines() if line.startswith("size: "))
    total = sum(p.stat().st_size for p in example.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert f"{total / 1e6:.1f} MB on disk" in compiled
    assert f"{total / 1e6:.1f} MB on disk" in size and "experts: int4" in size and "context 1024 tokens" in size
    assert "chat template: yes, with tools" in size
    needs = next(line for line in out.splitlines() if line.startswith("to run"))
    assert "every expert resident about" in needs and "the least --memory-limit" in needs
    page = (tmp_path / "report.html").read_text()
    assert "identity: sha256:" in page and "<h2>Columns</h2>" in page and "recall@width" in page
    image = picture(tmp_path / "report.html", tmp_path / "report.png")
    assert image.width >= 800 and len(colours(image)) >= 3


def readme_commands() -> list[str]:
    """Every command line in the README's shell blocks (the serving section's are run by test_serve_agents)."""
    readme = (EXAMPLE.parents[1] / "README.md").read_text(encoding="utf-8")
    readme = readme.split("## Serving: OpenAI's HTTP API")[0] + readme.split("## Python API")[1]
    blocks = [b for b in readme.split("```")[1::2] if not b.startswith("python")]
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_the_readme_commands_run_on_the_bundled_model(tmp_path):
    """Those on the bundled model run as written (out/ moved into a scratch folder); those on a model
    that is not here are checked flag by flag against their command's --help."""
    ran = checked = 0
    for line in readme_commands():
        if line.startswith(("pip ", "huggingface-cli ", "make ")):
            continue
        pipeline = line.split(" | ")
        command = pipeline[-1].split()
        assert command[0].startswith("fate-"), line
        if "tiny-moe" in line:
            line = line.replace("out/", f"{tmp_path}/out/").replace("examples/", f"{EXAMPLE.parent}/")
            proc = subprocess.run(line.replace("fate-", f"{BIN}/fate-"), shell=True, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, (line, proc.stderr)
            ran += 1
        else:
            usage = run(command[0], "--help").stdout
            for flag in (w.split("=")[0] for w in command if w.startswith("-")):
                assert flag in usage, (line, flag)
            checked += 1
    assert ran >= 5 and checked >= 3 and (tmp_path / "out" / "bench.svg").exists()


COMMANDS = {"fate-compile": "fate.compiler.cli:main", "fate-run": "fate.runtime.cli:main",
            "fate-inspect": "fate.runtime.inspect_cli:main", "fate-bench": "fate.runtime.bench:main",
            "fate-pack": "fate.runtime.artifact_cli:pack", "fate-unpack": "fate.runtime.artifact_cli:unpack",
            "fate-verify": "fate.runtime.artifact_cli:verify", "fate-eval": "fate.runtime.eval_cli:main",
            "fate-serve": "fate.runtime.serve_cli:main", "fate-replay": "fate.runtime.replay_cli:main"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_that_teaches_and_a_version(name):
    import importlib

    import click

    module, function = COMMANDS[name].split(":")
    command = getattr(importlib.import_module(module), function)
    undocumented = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert not undocumented, f"{name}: {undocumented} have no help"
    usage = run(name, "--help").stdout
    assert "Examples:" in usage and "--version" in usage
    assert run(name, "--version").stdout.strip().startswith(f"{name} ")
