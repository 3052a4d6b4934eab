"""Generation with a memory budget: same tokens whatever the policy, the budget honoured and
refused when too small, and faults reported clearly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from fate.artifacts import Artifact, ArtifactError, FateError
from fate.artifacts.budget import parse_budget
from fate.compiler import CompileOptions, compile_checkpoint
from fate.compiler.profile import CalibrationOptions
from fate.runtime import FateModel, OffloadOptions, SamplingConfig, generate
from fate.runtime.cgroup import MemoryCgroup
from fate.runtime.experts import loads as loader_module
from fate.runtime.experts.eviction import POLICIES
from fate.runtime.experts.executors import assignments
from fate.runtime.experts.pool import INLINE_READ_BYTES, SlotPool, SlotRead, native_reads
from fate.runtime.experts.residency import BudgetError
from fate.runtime.experts.trace import read_trace
from fate.runtime.options import EngineOptions
from fate.runtime.sessions import SMALL_GRAPH_BYTES, graph_threads

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe"
BIN = Path(sys.executable).parent
PROMPT = [5, 17, 99, 3, 250, 41, 7, 300, 12, 1000, 4, 9]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("offload") / "art"
    compile_checkpoint(CompileOptions(EXAMPLE, out, bits=(4,), calibration=CalibrationOptions(tokens=1024),
                                      int2_copies=True), log=lambda _m: None)
    return out


def tokens(path: Path, offload: OffloadOptions | None, n: int = 24) -> list[int]:
    model = FateModel.load(path, EngineOptions(offload=offload))
    try:
        return generate(model, PROMPT, n, SamplingConfig(), eos_ids=set()).token_ids
    finally:
        model.close()


def test_router_decides_same_tokens_whatever_budget_cache_or_prefetch(calibrated):
    reference = tokens(calibrated, None)
    for budget in ("20%", "50%", "100%"):
        for prefetch in ("none", "eap", "cross-layer", "policy"):
            for cache, allocation, pool in (("arc", "policy", "global"), ("lru", "uniform", "per-layer"),
                                            ("lfru", "policy", "global"), ("s3fifo", "policy", "per-layer")):
                options = OffloadOptions(parse_budget(budget), prefetch=prefetch, cache=cache, pool=pool,
                                         allocation=allocation, low_bit_prefill="off")
                assert tokens(calibrated, options) == reference, (budget, prefetch, cache, allocation, pool)


@pytest.mark.skipif(not native_reads(), reason="the native extension is not built")
def test_a_decode_steps_misses_join_its_residual_in_the_kernel_with_the_resident_bits(calibrated, monkeypatch):
    """Small experts a native decode step did not have: once read, the kernel adds them to the step's residual
    (native.add_routed), and the tokens are all-resident's. The kernel's entry refuses what does not fit and
    leaves the residual untouched where a chosen expert is not in the pool."""
    from fate.runtime import native

    calls = []
    add = native.add_routed

    def counted(*args):
        calls.append(add(*args))
        return calls[-1]

    monkeypatch.setattr(native, "add_routed", counted)
    reference = tokens(calibrated, None, 32)
    model = FateModel.load(calibrated, EngineOptions(executor="native", offload=OffloadOptions(
        parse_budget("20%"), prefetch="none", low_bit_prefill="off")))
    try:
        assert generate(model, PROMPT, 32, SamplingConfig(), eos_ids=set()).token_ids == reference
        assert calls and all(calls)
        layer = model.manifest.moe_layers[0].index
        routed = model.experts.native_layer(layer)
        h, k = model.spec.hidden_size, model.manifest.layers[layer].routing.top_k
        x, residual = np.ones(h, np.float32), np.full(h, 2.0, np.float32)
        absent = int(np.flatnonzero(routed.where < 0)[0])
        ids, weights = np.full(k, absent, np.int64), np.full(k, 0.5, np.float32)
        assert add(routed, ids, weights, x, residual, 1) is False and (residual == 2.0).all()
        with pytest.raises(IndexError):
            add(routed, np.full(k, len(routed.where), np.int64), weights, x, residual, 1)
        with pytest.raises(ValueError):
            add(routed, ids, weights, x, residual[:-1], 1)
    finally:
        model.close()


def test_int2_prefill_is_used_only_for_prefill(calibrated, tmp_path):
    import dataclasses

    art = tmp_path / "art"
    shutil.copytree(calibrated, art)
    a = Artifact.open(art)
    policy = a.manifest.policy
    forced = dataclasses.replace(policy, layers=[dataclasses.replace(lp, prefill_precision="int2", prefill_low_share=0.5)
                                                 for lp in policy.layers])
    a.replace_manifest(dataclasses.replace(a.manifest, policy=forced))
    model = FateModel.load(art, EngineOptions(offload=OffloadOptions(parse_budget("30%"), low_bit_prefill="on")))
    try:
        generate(model, PROMPT * 3, 6, SamplingConfig(), eos_ids=set())
        report = model.experts.report()
    finally:
        model.close()
    assert report.prefill.int2_loads > 0
    assert report.decode.int2_loads == 0
    assert all(layer.precision != "int2" for layer in report.layers.values())  # never resident


def test_too_small_budget_is_refused_with_the_minimum(calibrated):
    with pytest.raises(BudgetError, match="the minimum is"):
        FateModel.load(calibrated, EngineOptions(offload=OffloadOptions(parse_budget("1%"))))
    proc = subprocess.run([str(BIN / "fate-run"), str(calibrated), "-p", "hi", "--memory-budget", "10KB"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "minimum is" in proc.stderr and "Traceback" not in proc.stderr


def test_stats_report_per_phase_and_layer(calibrated):
    proc = subprocess.run([str(BIN / "fate-run"), str(calibrated), "-p", "The quick brown fox jumps", "-n", "8",
                           "--greedy", "--memory-budget", "40%", "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)["offload"]
    for phase in ("prefill", "decode"):
        for key in ("tokens_per_s", "stall_s", "experts_loaded", "bytes_read", "hit_rate_per_layer", "covered_rate",
                    "prefetch_recall_per_layer", "prefetch_precision_per_layer", "loop_s", "loads_waited"):
            assert key in out[phase]
        # the loop's own time is a part of the phase's (the hand-off less its waits and expert runs)
        assert 0 <= out[phase]["loop_s"] <= out[phase]["seconds"]
    assert out["decode"]["tokens"] == 7 and out["prefill"]["tokens"] == len(json.loads(proc.stdout)["prompt_ids"])
    assert 0 < out["resident_bytes"] <= out["budget_bytes"] < out["total_expert_bytes"]
    assert out["decode"]["hit_rate"] <= out["decode"]["covered_rate"] <= 1
    recalls = [r for r in out["decode"]["prefetch_recall_per_layer"].values() if r is not None]
    assert recalls and all(0 <= r <= 1 for r in recalls)


def test_prefetch_width_leaves_room_for_the_experts_in_use(calibrated):
    """A prediction wider than the free slots evicts the experts the layer is running with: at
    most slots - top_k experts are prefetched, and layers with room still prefetch."""
    model = FateModel.load(calibrated, EngineOptions(offload=OffloadOptions(parse_budget("50%"))))
    try:
        plans = model.experts.plans
        top_k = {spec.index: spec.routing.top_k for spec in Artifact.open(calibrated).manifest.moe_layers}
    finally:
        model.close()
    assert all(0 <= p.width <= p.slots - top_k[p.index] for p in plans.values())
    assert any(p.width > 0 for p in plans.values())


def test_misses_load_in_parallel_within_a_window(calibrated):
    """Session experts: the misses of a layer load in helper threads while the loop runs its
    resident experts, at most --prefetch-threads at a time (what is held beyond the cache stays a
    few experts)."""
    model = FateModel.load(calibrated, EngineOptions(executor="session", offload=OffloadOptions(
        parse_budget("20%"), prefetch="none", threads=2, low_bit_prefill="off")))
    store = model.experts
    changed = threading.Condition()
    active, peak, waited = [0], [0], [False]
    load = store.loader.load

    def overlapping_load(*args, **kwargs):
        """The first load waits (an event, not a sleep) until a second one is under way beside it,
        so that two loads allowed to overlap do; if none is ever allowed to, it gives up."""
        with changed:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            changed.notify_all()
            if not waited[0]:
                waited[0] = True
                changed.wait_for(lambda: peak[0] >= 2, timeout=10)
        try:
            return load(*args, **kwargs)
        finally:
            with changed:
                active[0] -= 1

    store.loader.load = overlapping_load
    try:
        generate(model, PROMPT * 3, 2, SamplingConfig(), eos_ids=set())
    finally:
        model.close()
    assert peak[0] == 2


@pytest.mark.skipif(not native_reads(), reason="the native extension is not built")
def test_native_misses_are_read_together_and_waited_for_in_the_loop(calibrated):
    """Native experts: the loop begins up to --prefetch-threads loads of a layer's misses before it waits
    for the first (their reads on the native I/O threads, or, small ones, made as they are waited for), and
    waits itself (no helper thread loads)."""
    model = FateModel.load(calibrated, EngineOptions(executor="native", offload=OffloadOptions(
        parse_budget("20%"), prefetch="none", threads=2, low_bit_prefill="off")))
    store = model.experts
    outstanding, peak, threads = [0], [0], set()
    start = store.loader.start

    def counted_start(*args, **kwargs):
        pending = start(*args, **kwargs)
        outstanding[0] += 1
        peak[0] = max(peak[0], outstanding[0])
        result = pending.result

        def finished():
            threads.add(threading.current_thread().name)
            outstanding[0] -= 1
            return result()

        pending.result = finished
        return pending

    store.loader.start = counted_start
    try:
        generate(model, PROMPT * 3, 2, SamplingConfig(), eos_ids=set())
    finally:
        model.close()
    assert peak[0] == 2 and outstanding[0] == 0
    assert threading.main_thread().name in threads


def only_int4(art: Path) -> None:
    """Keep only the int4 experts, so that a broken one has no other copy to fall back to."""
    data = json.loads((art / "manifest.json").read_text())
    for layer in data["layers"]:
        layer["experts"].pop("int2", None)
        layer.get("expert_layouts", {}).pop("int2", None)
    if data["policy"]:
        for lp in data["policy"]["layers"]:
            lp["prefill_precision"] = None
    (art / "manifest.json").write_text(json.dumps(data))


def damage(art: Path, layer: int, expert: int, precision: str, how: str) -> str:
    path = Artifact.open(art).manifest.layers[layer].experts[precision][expert]
    target = art / path
    if how == "missing":
        target.unlink()
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["missing", "truncated", "corrupt", "corrupt-hashed-ahead"])
def test_broken_expert_without_alternative_is_named(calibrated, tmp_path, how, monkeypatch):
    if how == "corrupt-hashed-ahead":  # every file hashed on the hashing threads, as large ones are
        monkeypatch.setattr(loader_module, "HASH_AHEAD_BYTES", 0)
        how = "corrupt"
    art = tmp_path / "art"
    shutil.copytree(calibrated, art)
    only_int4(art)
    path = damage(art, 0, 0, "int4", how)
    budget = OffloadOptions(parse_budget("100%"), low_bit_prefill="off")
    if how != "corrupt":  # missing and truncated files are caught when the artifact is opened
        with pytest.raises(ArtifactError, match=Path(path).name):
            FateModel.load(art, EngineOptions(offload=budget))
        return
    with pytest.raises(ArtifactError, match=Path(path).name):  # at load (the cost probe) or when needed
        model = FateModel.load(art, EngineOptions(offload=budget))
        try:
            for start in range(0, 2000, 40):  # until expert 0 of layer 0 is needed
                model.logits(list(range(start, start + 40)))
        finally:
            model.close()


def test_a_corrupt_expert_found_in_decode_is_named_and_leaves_nothing_pinned(calibrated, tmp_path):
    """A decode miss whose file fails its check raises, naming the file, and the experts the layer held for
    its one run (small experts: hits and misses run together) are given back to eviction."""
    art = tmp_path / "art"
    shutil.copytree(calibrated, art)
    only_int4(art)
    path = damage(art, 1, 3, "int4", "corrupt")
    model = FateModel.load(art, EngineOptions(executor="native" if native_reads() else "auto", offload=OffloadOptions(
        parse_budget("20%"), prefetch="none", low_bit_prefill="off")))
    try:
        with pytest.raises(ArtifactError, match=Path(path).name):
            for token in range(0, 2000, 7):  # one-token prompts: the layer's misses come in decode
                generate(model, [token], 12, SamplingConfig(), eos_ids=set())
        assert model.experts._phase == "decode"
        assert not model.experts.cache._pins
    finally:
        model.close()


@pytest.mark.parametrize("ahead", [False, True])
def test_all_resident_load_names_a_corrupt_expert_and_leaves_no_read_behind(calibrated, tmp_path, monkeypatch, ahead):
    """Every expert read at start, several ahead of the one being checked: a corrupt one (no other
    copy) is named, and the reads begun after it are given up or waited for before the error."""
    if ahead:
        monkeypatch.setattr(loader_module, "HASH_AHEAD_BYTES", 0)
    art = tmp_path / "art"
    shutil.copytree(calibrated, art)
    only_int4(art)
    path = damage(art, 0, 1, "int4", "corrupt")
    with pytest.raises(ArtifactError, match=Path(path).name):
        FateModel.load(art)
    assert not [t for t in threading.enumerate() if t.name.startswith("fate-hash")]


def test_corrupt_expert_falls_back_to_another_precision_with_a_warning(calibrated, tmp_path, capfd):
    art = tmp_path / "art"
    shutil.copytree(calibrated, art)
    damage(art, 2, 3, "int4", "corrupt")
    reference = tokens(calibrated, OffloadOptions(parse_budget("100%"), low_bit_prefill="off"))
    got = tokens(art, OffloadOptions(parse_budget("100%"), low_bit_prefill="off"))
    assert len(got) == len(reference)
    err = capfd.readouterr().err
    if "using the int2 copy" not in err:  # expert 3 of layer 2 may simply not have been needed
        pytest.skip("the damaged expert was not routed to by this prompt")


def test_a_fallback_copy_is_not_run_by_the_decode_step(calibrated, tmp_path, capfd):
    """An expert read from another precision's copy does not fit its layer's layout: the step leaves it
    to the executor, which runs it at its own precision."""
    art = tmp_path / "art"
    shutil.copytree(calibrated, art)
    damage(art, 2, 3, "int4", "corrupt")
    model = FateModel.load(art)
    try:
        assert "using the int2 copy of layer 2 expert 3" in capfd.readouterr().err
        where = model.experts.native_layer(2).where
        assert where[3] == -1 and (np.delete(where, 3) >= 0).all()
    finally:
        model.close()


def decode_logits(model: FateModel, ids: list[int], steps: int) -> np.ndarray:
    cache = model.new_cache()
    rows = [model.head_logits(model.forward(np.asarray(ids), cache))[-1:]]
    for _ in range(steps):
        rows.append(model.head_logits(model.forward(np.asarray([int(rows[-1].argmax())]), cache)))
    return np.concatenate(rows)


def test_offloaded_decode_steps_run_the_resident_experts_with_all_resident_bits(calibrated, monkeypatch):
    """At a tight budget a decode step runs its experts itself where every one it chose is resident,
    and hands the others to `compute`: both happen, and every logit has the bits of all-resident."""
    if not native_reads():
        pytest.skip("native reads not built")
    model = FateModel.load(calibrated)
    try:
        reference = decode_logits(model, PROMPT, 40)
    finally:
        model.close()
    model = FateModel.load(calibrated, EngineOptions(offload=OffloadOptions(parse_budget("25%"), low_bit_prefill="off")))
    ran = {"step": 0, "compute": 0}
    for name, how in (("ran_in_step", "step"), ("compute", "compute")):
        original = getattr(model.experts, name)

        def counted(*args, original=original, how=how):
            ran[how] += 1
            return original(*args)
        monkeypatch.setattr(model.experts, name, counted)
    try:
        assert model.steps and all(step.routed is not None for step in model.steps.values())
        got = decode_logits(model, PROMPT, 40)
        report = model.experts.report()
    finally:
        model.close()
    np.testing.assert_array_equal(got, reference)
    assert ran["step"] > 0 and ran["compute"] > 0, ran
    assert report.prefill.layers_run_in_step + report.decode.layers_run_in_step == ran["step"]
    assert report.decode.hit_rate is not None and 0 < report.decode.hit_rate < 1


def as_from_a_terminal() -> None:
    """In the child before it starts: SIGINT delivered and handled by default, as a command started
    from a shell gets it. A child inherits its parent's signal mask and ignored signals; in a whole
    test session (not in this module alone) something leaves SIGINT blocked or ignored in the
    pytest process, and the run went on to the end of its context with the signal never seen."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_cleanly_with_partial_output(calibrated):
    """SIGINT once the first generated text is on stdout (an event, not a sleep): the run stops
    at the next token, keeps what it printed and exits 130. Greedy: sampled text from a small model
    can be a run of incomplete UTF-8 bytes that streams nothing until the end. On a loaded machine this process can
    be descheduled long enough for the run to reach the end of its context before the signal is
    sent; such an attempt says nothing about interruption and is repeated (hashing every load
    keeps the run long)."""
    prompt = "Once upon a time"
    for _attempt in range(5):
        proc = subprocess.Popen([str(BIN / "fate-run"), str(calibrated), "-p", prompt, "-n", "100000",
                                 "--memory-budget", "50%", "--greedy", "--ignore-eos", "--verify-every-load"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=as_from_a_terminal)
        seen = b""
        while len(seen) <= len(prompt):  # the prompt is echoed first; wait for generated text after it
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"fate-run ended before generating: {proc.communicate()[1].decode()}"
            seen += chunk
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
        out, err = (seen + rest).decode(), err.decode()
        if proc.returncode == 0 and "stop: context" in err:
            continue  # finished before the signal was sent
        break
    assert proc.returncode == 130, (err, out[:300], signal.pthread_sigmask(signal.SIG_BLOCK, []),
                                    signal.getsignal(signal.SIGINT))
    assert "Traceback" not in err and "stop: interrupted" in err
    assert out.startswith(prompt) and len(out) > len(prompt)


def test_resident_memory_tracks_the_budget(tmp_path):
    """Peak RSS of whole runs: lower budgets use measurably less memory than all-resident, and
    the cache never accounts more than the budget. Experts are made large enough (64 of about
    0.85 MB) that they dominate the process's memory."""
    from tiny_models import make_model

    make_model("mixtral", tmp_path / "ckpt", hidden_size=512, intermediate_size=1024, num_local_experts=16,
               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    art = tmp_path / "art"
    subprocess.run([str(BIN / "fate-compile"), str(tmp_path / "ckpt"), "-o", str(art), "--calib", "none", "-q"],
                   check=True)
    expert_files = sum(f.size for f in Artifact.open(art).manifest.files if f.path.startswith("experts/"))

    def run(budget: str | None) -> dict:
        args = [str(BIN / "fate-run"), str(art), "-p", "hello world", "-n", "24", "--ignore-eos", "--json"]
        proc = subprocess.run(args + (["--memory-budget", budget] if budget else []), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    resident, quarter, half = run(None), run("25%"), run("50%")
    for out in (quarter, half):
        assert out["offload"]["resident_bytes"] <= out["offload"]["budget_bytes"]
    assert quarter["peak_rss_bytes"] < half["peak_rss_bytes"] <= resident["peak_rss_bytes"] * 1.05
    # a quarter of the experts resident saves at least half of what the other three quarters weigh on disk
    assert resident["peak_rss_bytes"] - quarter["peak_rss_bytes"] > 0.5 * 0.75 * expert_files


@pytest.mark.parametrize("executor", ["native", "session"])
def test_tokens_identical_in_20_runs_at_a_tight_budget(calibrated, executor):
    """The standing determinism test: one prompt, 20 runs at a budget where prefetch threads are
    busy and misses load in parallel, every run equal to all-resident with the same executor."""
    from fate.runtime import native

    if executor == "native" and not native.available():
        pytest.skip("native kernel not built")
    model = FateModel.load(calibrated, EngineOptions(executor=executor))
    try:
        reference = generate(model, PROMPT * 2, 32, SamplingConfig(), eos_ids=set()).token_ids
    finally:
        model.close()
    for run in range(20):
        options = EngineOptions(executor=executor, threads=1 + run % 2, offload=OffloadOptions(
            parse_budget(("20%", "30%")[run % 2]), prefetch=("policy", "none", "eap")[run % 3],
            cache=("arc", "lru")[run % 2], low_bit_prefill="off", threads=1 + run % 3))
        model = FateModel.load(calibrated, options)
        try:
            got = generate(model, PROMPT * 2, 32, SamplingConfig(), eos_ids=set()).token_ids
        finally:
            model.close()
        assert got == reference, (run, options)


def test_slot_budget_is_exact(calibrated):
    """The budget is slots x slot size: every slot holds the layer's largest file in whole pages."""
    from fate.runtime.experts.pool import PAGE

    model = FateModel.load(calibrated, EngineOptions(offload=OffloadOptions(parse_budget("40%"))))
    try:
        store = model.experts
        plans = store.plans.values()
        if store.runner.native_for(next(iter(plans)).index, next(iter(plans)).precision):
            assert store.pool.total_bytes == store.run_plan.budget_bytes
        assert store.run_plan.budget_bytes <= parse_budget("40%").bytes_of(store.total_expert_bytes)
        assert all(p.slot_bytes % PAGE == 0 for p in plans)
    finally:
        model.close()


@pytest.mark.parametrize("case", ["flex_olmo", "afmoe"])
def test_a_post_norm_moe_layer_offloaded_gives_the_resident_tokens(tmp_path, case):
    """The combine graph (residual + norm(routed sum + shared experts)) serves the offloaded store as well."""
    from conftest import CASES, Built

    built = Built(tmp_path / case, **CASES[case])
    art = tmp_path / "art"
    compile_checkpoint(CompileOptions(built.ckpt, art, bits=(4,), calibration=CalibrationOptions(tokens=512)),
                       log=lambda _m: None)
    prompt = [5, 17, 99, 3, 250, 41, 7, 64, 128]
    resident = generate(FateModel.load(art), prompt, max_new_tokens=10, sampling=SamplingConfig(), eos_ids=set())
    model = FateModel.load(art, EngineOptions(offload=OffloadOptions(parse_budget("30%"), low_bit_prefill="off")))
    try:
        assert generate(model, prompt, max_new_tokens=10, sampling=SamplingConfig(),
                        eos_ids=set()).token_ids == resident.token_ids
    finally:
        model.close()


@pytest.mark.parametrize("ids", [[[7, 3, 12, 1]], [[5, 5]], [[2, 9], [9, 1]], [[4, 0, 4], [0, 4, 4]]],
                         ids=["decode", "decode-repeated", "two-tokens", "repeats"])
def test_assignments_cover_every_routing_slot_once(ids):
    """Each (token, k) slot of the router's choice is one output row of its expert, whatever the
    shape (decode takes a shortcut): y row t * k + j must come from expert ids[t][j] on token t."""
    routing = np.asarray(ids)
    seen = {}
    for expert, (rows, dest) in assignments(routing).items():
        assert list(rows) == [int(d) // routing.shape[1] for d in dest]
        for d in dest:
            assert int(d) not in seen
            seen[int(d)] = expert
    assert seen == {t * routing.shape[1] + j: int(e) for t, row in enumerate(ids) for j, e in enumerate(row)}


def test_a_read_hashed_ahead_is_never_one_its_waiter_makes():
    from fate.runtime.experts.loads import HASH_AHEAD_BYTES

    assert INLINE_READ_BYTES < HASH_AHEAD_BYTES


def test_a_slot_read_gives_the_files_bytes_or_names_what_failed(tmp_path):
    """A read into a slot (on the native I/O threads where built) gives exactly the file's bytes
    at any offset, refuses a file shorter than asked, and names a file that is gone."""
    data = os.urandom(20000)
    path = tmp_path / "expert.onnx"
    path.write_bytes(data)
    pool = SlotPool({0: 2}, {0: len(data)})
    try:
        for inline in (False, True):  # handed to the I/O threads, or (small) made by wait() itself
            for offset, size in ((0, 20000), (512, 9000), (5000, 15000), (4096, 1)):
                read = SlotRead(pool.buffer(0, 1), path, offset, size, pool, True, inline)
                assert bytes(read.wait()) == data[offset:offset + size] and read.done()
            with pytest.raises(ArtifactError, match="shorter than the manifest says"):
                SlotRead(pool.buffer(0, 0), path, 10000, 12000, pool, True, inline).wait()
            with pytest.raises(FileNotFoundError, match="gone.onnx"):
                SlotRead(pool.buffer(0, 0), tmp_path / "gone.onnx", 0, 100, pool, True, inline).wait()
        pool.buffer(0, 0)[:16] = bytes(16)
        given_up = SlotRead(pool.buffer(0, 0), path, 0, 20000, pool, urgent=True, inline=True)
        assert not given_up.done()
        assert given_up.cancel() and bytes(pool.buffer(0, 0)[:16]) == bytes(16)  # never made: nothing written
        assert given_up.done() and not given_up.cancel()  # as a native read given up: over, nothing more to give up
        with pytest.raises(OSError) as cancelled:
            given_up.wait()
        assert cancelled.value.errno == errno.ECANCELED
        with pytest.raises(FileNotFoundError, match="gone.onnx"):  # the same through the Python read
            pool.read_into(0, 0, tmp_path / "gone.onnx", 0, 100)
        assert pool.direct == hasattr(os, "O_DIRECT")  # a missing file is not the file system refusing O_DIRECT
        pool.direct_failed()  # once refused, every later read is buffered, and reads the same bytes
        assert not pool.direct and pool.mode.startswith("buffered")
        assert bytes(SlotRead(pool.buffer(0, 1), path, 512, 9000, pool).wait()) == data[512:9512]
        assert bytes(pool.read_into(0, 1, path, 512, 9000)) == data[512:9512]
    finally:
        pool.close()


@pytest.mark.skipif(not native_reads() or not hasattr(os, "mkfifo"), reason="needs the native reads and FIFOs")
def test_prefetch_reads_leave_threads_to_stalls_and_can_be_given_up_while_queued(tmp_path):
    """Background (prefetch) reads hold at most half the I/O threads: with two of them stuck (on
    FIFOs nobody writes yet), an urgent read still finishes, and a third background read stays
    queued, so it can be given up (cancel) and never touches its buffer."""
    data = os.urandom(8192)
    path = tmp_path / "expert.onnx"
    path.write_bytes(data)
    fifos = [tmp_path / f"stuck{i}" for i in range(2)]
    for fifo in fifos:
        os.mkfifo(fifo)
    pool = SlotPool({0: 4}, {0: len(data)})
    pool.direct_failed()  # FIFOs refuse O_DIRECT; keep every read here on the same path
    stuck = [SlotRead(pool.buffer(0, i), fifo, 0, 1, pool) for i, fifo in enumerate(fifos)]
    try:
        queued = SlotRead(pool.buffer(0, 2), path, 0, len(data), pool)
        urgent = SlotRead(pool.buffer(0, 3), path, 0, len(data), pool, urgent=True)
        assert bytes(urgent.wait()) == data
        assert queued.cancel() and queued.done()
        with pytest.raises(OSError) as cancelled:
            queued.wait()
        assert cancelled.value.errno == errno.ECANCELED
        assert not urgent.cancel()  # over: nothing to give up
        assert bytes(pool.buffer(0, 2)[:16]) == bytes(16)  # the given-up read wrote nothing
    finally:
        for fifo in fifos:  # a writer that opens and closes: the stuck opens return (a FIFO cannot pread)
            os.close(os.open(fifo, os.O_WRONLY))
        for read in stuck:
            with pytest.raises(OSError, match="stuck"):
                read.wait()
        pool.close()


def test_small_dense_graphs_run_on_one_thread_unless_told():
    """Waking onnxruntime's pool costs more than a small graph's products: auto (0) gives them one
    thread and large graphs every core; a thread count given is used as given, up to the cores this
    process may use (more only wait on each other: --threads 10000 took minutes to start)."""
    from fate.runtime.sessions import usable_cores

    assert graph_threads(0, 80_000) == 1 and graph_threads(0, SMALL_GRAPH_BYTES) == 0
    assert graph_threads(2, 80_000) == min(2, usable_cores()) and graph_threads(1, 50 << 20) == 1
    assert graph_threads(10_000, 80_000) == usable_cores()


def test_fate_run_writes_a_trace_that_fate_replay_reads(calibrated, tmp_path):
    trace = tmp_path / "run.jsonl"
    run = subprocess.run([sys.executable, "-m", "fate.runtime.cli", str(calibrated), "--prompt", "Once upon a time",
                          "-n", "6", "--greedy", "--ignore-eos", "--memory-budget", "30%", "--trace", str(trace)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    head, records = read_trace(trace)
    decode = [r for r in records if r.phase == "decode"]
    assert len({r.step for r in decode}) == 5 and {r.layer for r in decode} == {l.layer for l in head.layers}
    assert any(r.predicted for r in decode)
    out = subprocess.run([sys.executable, "-m", "fate.runtime.replay_cli", str(trace), "--json",
                          "--capacity", "30%,60%"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    assert [r["capacity"] for r in results] == ["30%", "60%"]
    for result in results:
        rows = {row["name"]: row for row in result["rows"]}
        assert rows["belady global"]["x_belady"] == 1.0
        assert all(rows[f"{p} global"]["decode_mb_per_token"] >= rows["belady global"]["decode_mb_per_token"]
                   for p in POLICIES)


def run_json(args: list[str]) -> dict:
    run = subprocess.run([sys.executable, "-m", "fate.runtime.cli", *args, "--json"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_memory_limit_plans_the_whole_process_and_keeps_the_tokens(calibrated):
    args = [str(calibrated), "--prompt", "Once upon a time", "-n", "12", "--greedy", "--ignore-eos"]
    resident = run_json(args)
    roomy = run_json(args + ["--memory-limit", "4GB"])
    plan = roomy["memory"]["plan"]
    assert plan["pool"] == plan["limit"] - plan["floor"] and plan["floor"] > plan["baseline"] > 0
    # a limit that leaves the experts about a third of what they need
    experts = resident["memory"]["measured"]["expert_pool_bytes"]
    limit = plan["floor"] + experts // 3
    tight = run_json(args + ["--memory-limit", f"{limit}B"])
    assert tight["token_ids"] == resident["token_ids"]
    assert 0 < tight["offload"]["budget_bytes"] <= limit - tight["memory"]["plan"]["floor"] + 4096
    assert tight["memory"]["measured"]["peak_rss_bytes"] <= limit


def test_a_memory_limit_too_small_names_the_least_that_would_do(calibrated):
    run = subprocess.run([str(BIN / "fate-run"), str(calibrated), "--prompt", "Hi", "--memory-limit", "20MB"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "the least limit is" in run.stderr and "Traceback" not in run.stderr
    both = subprocess.run([str(BIN / "fate-run"), str(calibrated), "--prompt", "Hi", "--memory-limit", "2GB",
                           "--memory-budget", "50%"], capture_output=True, text=True, timeout=300)
    assert both.returncode != 0 and "not both" in both.stderr
    share = subprocess.run([str(BIN / "fate-run"), str(calibrated), "--prompt", "Hi", "--memory-limit", "50%"],
                           capture_output=True, text=True, timeout=300)
    assert share.returncode != 0 and "not a share" in share.stderr


def test_under_a_memory_cgroup_of_the_limit_the_run_completes_within_it(calibrated):
    args = [str(calibrated), "--prompt", "Once upon a time", "-n", "12", "--greedy", "--ignore-eos"]
    resident = run_json(args)
    plan = run_json(args + ["--memory-limit", "4GB"])["memory"]["plan"]
    limit = plan["floor"] + resident["memory"]["measured"]["expert_pool_bytes"] // 2
    try:
        group = MemoryCgroup(limit, name="fate-test")
    except FateError as e:
        pytest.skip(str(e))
    with group:
        run = group.run([sys.executable, "-m", "fate.runtime.cli", *args, "--memory-limit", f"{limit}B", "--json"])
    assert run.returncode == 0 and not run.oom_killed, run.stderr
    capped = json.loads(run.stdout)
    assert capped["token_ids"] == resident["token_ids"]
    assert capped["memory"]["measured"]["peak_rss_bytes"] <= limit and run.peak_bytes <= limit


def test_the_memory_plan_counts_each_graph_once_and_what_the_command_reserves(calibrated):
    from fate.runtime.memory import DENSE_HOLD, plan_memory

    m = Artifact.open(calibrated).manifest
    graphs = {g: 1000 for g in [m.embed_graph, m.head_graph, *(l.graph for l in m.layers)]}
    stepped = {l.graph for l in m.layers if l.decode_step is not None} | ({m.head_graph} if m.head_step else set())
    assert stepped
    with_steps = plan_memory(m, graphs, 10**9, 100, steps=True, baseline=0)
    graphs_only = plan_memory(m, graphs, 10**9, 100, steps=False, baseline=0, reserved=5000)
    assert with_steps.steps == 1000 * len(stepped)
    assert with_steps.dense == int(1000 * (len(graphs) - len(stepped)) * DENSE_HOLD)
    assert graphs_only.steps == 0 and graphs_only.dense == int(1000 * len(graphs) * DENSE_HOLD)
    assert graphs_only.floor - plan_memory(m, graphs, 10**9, 100, steps=False, baseline=0).floor == 5000
    assert with_steps.pool == 10**9 - with_steps.floor and with_steps.kv_cache == 2 * plan_memory(
        m, graphs, 10**9, 50, steps=True, baseline=0).kv_cache


def test_the_lossy_int2_prefill_says_what_it_costs(calibrated, tmp_path):
    """Stored only when asked (--int2-copies), measured end to end at compile time where the policy moves
    any prefill at INT2, shown by fate-inspect, and named by a run that turns it on."""
    import json
    import subprocess
    import sys

    from fate.artifacts import Artifact

    bin_dir = Path(sys.executable).parent
    policy = Artifact.open(calibrated).manifest.policy
    if not any(lp.prefill_precision for lp in policy.layers):
        assert policy.int2_prefill_perplexity_ratio is None
        pytest.skip("the policy moves no prefill at INT2 on this model")
    assert 0.5 < policy.int2_prefill_perplexity_ratio < 2.0
    inspect = subprocess.run([str(bin_dir / "fate-inspect"), str(calibrated)], capture_output=True, text=True,
                             check=True).stdout
    assert f"x{policy.int2_prefill_perplexity_ratio:.4f}" in inspect
    run = subprocess.run([str(bin_dir / "fate-run"), str(calibrated), "-p", "Once upon a time", "-n", "4", "--json",
                          "--memory-budget", "30%", "--int2-prefill", "on"], capture_output=True, text=True, check=True)
    lossy = json.loads(run.stdout)["lossy"]
    assert lossy and lossy[0]["measured_perplexity_ratio"] == pytest.approx(policy.int2_prefill_perplexity_ratio)
    plain = subprocess.run([str(bin_dir / "fate-run"), str(calibrated), "-p", "Once upon a time", "-n", "4", "--json",
                            "--memory-budget", "30%"], capture_output=True, text=True, check=True)
    assert json.loads(plain.stdout)["lossy"] == []


def test_a_step_with_a_shared_expert_begins_its_misses_before_computing_it(tmp_path, monkeypatch):
    """Offloaded, a native decode step with a shared expert stops at its routing: the reads of the experts
    not resident begin, then the shared expert runs beside them (LayerOutputs.finish); the tokens are
    all-resident's. A step that fails after the reads began leaves nothing pinned."""
    from conftest import CASES, Built
    from fate.runtime import native
    from fate.runtime.decode_step import NativeDecodeStep
    from fate.runtime.experts.offload import OffloadedExperts

    if not native_reads():
        pytest.skip("the native extension is not built")
    built = Built(tmp_path / "qwen2_moe", **CASES["qwen2_moe"])
    art = built.artifact(4, dense_bits=4)
    prompt = [t % 300 for t in PROMPT]
    resident = FateModel.load(art)
    assert all(step.splits for step in resident.steps.values()) and resident.steps and native.available()
    reference = generate(resident, prompt, 16, SamplingConfig(), eos_ids=set()).token_ids
    events = []
    begin, finish = OffloadedExperts.begin, NativeDecodeStep.finish

    def begun(store, layer, ids):
        batch = begin(store, layer, ids)
        events.append(("begin", layer, batch is not None and bool(batch.running)))
        return batch

    def finished(step, out):
        events.append(("finish", step.index))
        return finish(step, out)

    monkeypatch.setattr(OffloadedExperts, "begin", begun)
    monkeypatch.setattr(NativeDecodeStep, "finish", finished)
    model = FateModel.load(art, EngineOptions(offload=OffloadOptions(parse_budget("40%"), low_bit_prefill="off")))
    try:
        assert generate(model, prompt, 16, SamplingConfig(), eos_ids=set()).token_ids == reference
        reading = [i for i, event in enumerate(events) if event[0] == "begin" and event[2]]
        assert reading, "no decode step found a miss"  # 40% of the experts (the least is 33%): misses
        assert all(events[i + 1] == ("finish", events[i][1]) for i in reading)

        def failing(step, out):
            if store.phases["decode"].waits > waits:  # once a miss is being read
                raise RuntimeError("the step failed")
            return finish(step, out)

        store, waits = model.experts, model.experts.phases["decode"].waits
        monkeypatch.setattr(NativeDecodeStep, "finish", failing)
        with pytest.raises(RuntimeError, match="the step failed"):
            generate(model, prompt[::-1], 16, SamplingConfig(), eos_ids=set())
        assert not store.cache._pins
    finally:
        model.close()


def test_the_embedding_predicts_the_first_layers_experts_before_it_runs(calibrated, tmp_path, monkeypatch):
    """Layer 0 is an MoE layer: the embedding graph predicts its experts (Manifest.embed_predicts_next), the
    store has that prediction before layer 0 runs at every step, prefill reads layer 0's experts ahead with it,
    and the tokens are all-resident's. A manifest whose policy names the prediction without it is refused."""
    from fate.runtime.experts.offload import OffloadedExperts

    assert Artifact.open(calibrated).manifest.embed_predicts_next
    reference = tokens(calibrated, None, 8)
    events = []
    hint, observe = OffloadedExperts.hint, OffloadedExperts.observe

    def hinted(store, layer, predictions):
        events.append(("hint", layer))
        return hint(store, layer, predictions)

    def observed(store, layer, ids):
        events.append(("observe", layer))
        return observe(store, layer, ids)

    monkeypatch.setattr(OffloadedExperts, "hint", hinted)
    monkeypatch.setattr(OffloadedExperts, "observe", observed)
    model = FateModel.load(calibrated, EngineOptions(offload=OffloadOptions(parse_budget("25%"), low_bit_prefill="off")))
    try:
        plan = model.experts.plans[0]
        assert plan.predictor in ("cross_layer", "cross_layer_norm") and plan.width > 0
        assert generate(model, PROMPT, 8, SamplingConfig(), eos_ids=set()).token_ids == reference
        first = [event for event in events if event[1] == 0]
        assert len(first) == 2 * 8 and first == [("hint", 0), ("observe", 0)] * 8  # prefill and 7 decode steps
        assert model.experts.phases["prefill"].cache.layer(0).prefetched > 0
    finally:
        model.close()
    target = tmp_path / "art"
    shutil.copytree(calibrated, target)
    data = json.loads((target / "manifest.json").read_text())
    data["embed_predicts_next"] = False
    (target / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="layer 0 has no cross-layer prediction"):
        Artifact.open(target)
