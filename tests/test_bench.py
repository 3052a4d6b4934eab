"""fate-bench plumbing (not its timings): every configuration runs and lands in the table and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from browser import colours, picture

BIN = Path(sys.executable).parent


def test_bench_runs_every_configuration(mixtral, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([str(BIN / "fate-bench"), str(mixtral.artifact(4)), "--budgets", "50%,100%",
                           "--prefetch", "none,cross-layer", "--repeat", "1", "--prompt-len", "8", "--gen-len", "4",
                           "--json", str(out), "--plot", str(tmp_path / "plot.svg")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["storage_bytes_per_s"] > 0 and "GB/s" in proc.stdout
    assert set(results) == {"all-resident", "50% none", "50% cross-layer", "100% none", "100% cross-layer"}
    for label, row in results.items():
        assert row["decode_tok_s"] > 0 and row["peak_rss_mb"] > 0, label
    for label in results:
        assert label in proc.stdout
    svg = (tmp_path / "plot.svg").read_text()
    assert svg.startswith("<svg") and "cross-layer" in svg and "all experts resident" in svg and "GB" in svg
    assert "fastest here at 50%: --memory-budget 50% --prefetch" in proc.stdout and "columns: x resident" in proc.stdout


def test_the_bench_plot_is_a_picture_worth_looking_at(tmp_path):
    """Rendered by a browser: wide enough, every configuration its own colour."""
    from fate.runtime.bench import plot_svg

    results = {"all-resident": {"decode_tok_s": 100.0}}
    for i, mode in enumerate(["none", "eap", "cross-layer", "policy"]):
        for mb in (200, 400, 800):
            speed = 20 + 10 * i + mb / 20
            results[f"{mb}MB {mode}"] = {"decode_tok_s": speed, "decode_tok_s_min": speed - 3, "budget_mb": mb,
                                         "decode_tok_s_max": speed + 2, "decode_mb_per_token": 40 - mb / 40,
                                         "total_expert_mb": 1600}
    svg = tmp_path / "plot.svg"
    svg.write_text(plot_svg(results, "qwen3-30b", 2e9))
    image = picture(svg, tmp_path / "plot.png")
    assert image.width >= 800 and image.height >= 400
    assert len(colours(image)) >= 4, colours(image)  # the four modes (references are grey)
    text = svg.read_text()
    assert "share of all experts" in text and "50%" in text and "I/O bound" in text and "qwen3-30b" in text


def test_bench_table_ratios_are_within_one_executor():
    """x resident, x on-demand and x I/O bound, from synthetic numbers: bound = min(resident,
    bandwidth / bytes per decode token)."""
    from fate.runtime.bench import table

    results = {
        "all-resident [native]": {"decode_tok_s": 100.0},
        "all-resident [session]": {"decode_tok_s": 50.0},
        "25% none [native]": {"decode_tok_s": 40.0, "decode_mb_per_token": 10.0},
        "25% policy [native]": {"decode_tok_s": 60.0, "decode_mb_per_token": 10.0},
        "25% policy [session]": {"decode_tok_s": 20.0, "decode_mb_per_token": 1.0},
    }
    rows = {line.split("]")[0] + "]": line.split("]")[1].split() for line in table(results, 1e9).splitlines()[1:]}
    # columns after the label: prefill, decode, (spread), x resident, x on-demand, x I/O bound
    assert rows["25% none [native]"][3:6] == ["0.40", "-", "0.40"]  # bound = 1000 MB/s / 10 MB = 100 tok/s
    assert rows["25% policy [native]"][3:6] == ["0.60", "1.50", "0.60"]
    assert rows["25% policy [session]"][3:6] == ["0.40", "-", "0.40"]  # bound = its own resident speed, 50


def test_bench_refuses_bad_budget(mixtral):
    proc = subprocess.run([str(BIN / "fate-bench"), str(mixtral.artifact(4)), "--budgets", "lots"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "budget" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_reports_perplexity_and_agreement(mixtral, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    proc = subprocess.run([str(BIN / "fate-eval"), str(mixtral.artifact(4)), "--text", str(text),
                           "--reference", str(mixtral.artifact(32)), "--window", "32", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["perplexity"] > 1 and out["reference_perplexity"] > 1
    assert out["ratio"] == out["perplexity"] / out["reference_perplexity"]
    assert 0 <= out["next_token_agreement"] <= 1


def test_eval_identical_artifacts_agree_fully(mixtral, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Hello, world! Numbers like 12345 appear too. " * 20)
    proc = subprocess.run([str(BIN / "fate-eval"), str(mixtral.artifact(32)), "--text", str(text),
                           "--reference", str(mixtral.artifact(32)), "--window", "16", "--json"],
                          capture_output=True, text=True, timeout=300)
    out = json.loads(proc.stdout)
    assert out["ratio"] == 1.0 and out["next_token_agreement"] == 1.0


def test_eval_text_too_short_is_an_error(mixtral, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("hi")
    proc = subprocess.run([str(BIN / "fate-eval"), str(mixtral.artifact(4)), "--text", str(text)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "too short" in proc.stderr and "Traceback" not in proc.stderr


FAKE_LLAMA = """#!/bin/sh
# stands in for llama-completion: says what it was asked, and prints llama.cpp's timing lines
echo "args: $*" >&2
echo "llama_perf_context_print: prompt eval time =     200.00 ms /    50 tokens (    4.00 ms per token,   250.00 tokens per second)" >&2
echo "llama_perf_context_print:        eval time =    1000.00 ms /    20 runs   (   50.00 ms per token,    20.00 tokens per second)" >&2
"""


def test_the_llama_cpp_peer_runs_memory_mapped_and_reads_its_own_timings(tmp_path, monkeypatch):
    from fate.artifacts import FateError
    from fate.runtime.bench_peers import LlamaCpp

    binary = tmp_path / "llama-completion"
    binary.write_text(FAKE_LLAMA)
    binary.chmod(0o755)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    peer = LlamaCpp.find(str(tmp_path), str(gguf), 2)
    command = peer.command("Once upon a time", 21)
    assert "--no-repack" in command and "--no-mmap" not in command and command[command.index("-n") + 1] == "21"
    row = peer.run("Once upon a time", 21, None)
    assert row["prefill_tok_s"] == 250.0 and row["decode_tok_s"] == 20.0
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(FateError, match="llama-completion"):
        LlamaCpp.find(str(tmp_path / "nowhere"), str(gguf), 2)
    binary.write_text("#!/bin/sh\necho 'no timings here' >&2\n")
    with pytest.raises(FateError, match="no timings"):
        peer.run("Once", 4, None)


def test_bench_peer_needs_a_gguf_and_limits(mixtral):
    proc = subprocess.run([str(BIN / "fate-bench"), str(mixtral.artifact(4)), "--peer", "llama.cpp"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "--gguf" in proc.stderr and "Traceback" not in proc.stderr
