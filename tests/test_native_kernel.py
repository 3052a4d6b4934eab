"""The native expert kernel against a numpy reference of the same int8-activation math, for every
precision, block size and activation the compiler emits, on odd shapes; against the expert's own
onnxruntime session; and hostile slot layouts refused before a byte is read."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fate.artifacts import ArtifactError, ExpertLayout
from fate.artifacts.layout import GraphIO
from fate.artifacts.slots import check_layout, initializer_ranges, layout_of
from fate.compiler import graphs
from fate.compiler.quantize import dequantize, quantize
from fate.runtime import native
from fate.runtime.sessions import make_expert_session

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernel not built")


@dataclasses.dataclass
class Cfg:  # what expert_graph reads of an ArchConfig
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702


def make_expert(h: int, i: int, bits: int, block: int, bias: bool, activation: str, accuracy: int, seed: int = 0):
    """An expert file and its layout: `activation` swiglu, swiglu_clamped or relu2 (no gate projection)."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(s).astype(np.float32) * 0.2 for s in ((i, h), (i, h), (h, i))]
    biases = tuple(rng.standard_normal(n).astype(np.float32) * 0.1 for n in (i, i, h)) if bias else None
    q = [None if activation == "relu2" and n == 0 else quantize(w, bits, block) for n, w in enumerate(weights)]
    clamped = activation == "swiglu_clamped"
    cfg = Cfg(swiglu_limit=1.5 if clamped else None)
    data = graphs.expert_graph(*q, accuracy_level=accuracy, biases=biases, cfg=cfg).SerializeToString()
    template = ExpertLayout(hidden_size=h, intermediate_size=i, bits=bits, block_size=block, accuracy_level=accuracy,
                            activation=activation, has_bias=bias, tensors=[],
                            swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha if clamped else None)
    return data, layout_of(data, template), q, biases


def quantize_activations(x: np.ndarray, block: int) -> np.ndarray:
    """x rounded to what int8 per-block symmetric quantization keeps (scale max|x| / 127)."""
    n, k = x.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float64)
    padded[:, :k] = x
    b = padded.reshape(n, blocks, block)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, 127.0 / np.where(amax > 0, amax, 1), 0.0)
    q = np.clip(np.rint((b * inv).astype(np.float32)), -127, 127)
    return (q * (amax / 127.0)).reshape(n, -1)[:, :k]


def reference(x, q, biases, layout: ExpertLayout) -> np.ndarray:
    """The expert in float64 from dequantized weights, activations quantized where the layout says."""
    int8 = layout.accuracy_level == 4

    def proj(inp, weight, bias):
        a = quantize_activations(inp, layout.block_size) if int8 else inp
        y = a @ dequantize(weight).astype(np.float64).T
        return y if bias is None else y + bias

    bg, bu, bd = biases if biases is not None else (None, None, None)
    u = proj(x, q[1], bu)
    g = None if q[0] is None else proj(x, q[0], bg)
    if layout.activation == "relu2":
        act = np.square(np.maximum(u, 0))
    elif layout.activation == "swiglu":
        act = g / (1 + np.exp(-g)) * u
    else:
        lim, alpha = layout.swiglu_limit, layout.swiglu_alpha
        g, u = np.minimum(g, lim), np.clip(u, -lim, lim)
        act = (u + 1) * g / (1 + np.exp(-alpha * g))
    return proj(act.astype(np.float32), q[2], bd)


def run_native(data: bytes, layout: ExpertLayout, x: np.ndarray, threads: int = 1) -> np.ndarray:
    n = len(x)
    y = np.zeros_like(x)
    native.run_experts(layout, native.layout_vector(layout), [data], x, np.array([0, n], np.int32),
                       np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), y, threads)
    return y


S, C, R = "swiglu", "swiglu_clamped", "relu2"
CASES = [  # hidden, intermediate, bits, block, bias, activation, accuracy
    (64, 96, 4, 32, False, S, 4), (64, 96, 4, 128, False, S, 4), (70, 40, 4, 32, False, S, 4),
    (64, 96, 8, 128, False, S, 4), (50, 33, 8, 32, True, C, 4), (64, 96, 2, 32, False, S, 4),
    (96, 72, 2, 64, True, S, 4), (64, 48, 4, 16, False, S, 4), (48, 40, 2, 16, True, C, 4),
    (64, 96, 4, 32, True, C, 0), (40, 24, 8, 64, False, S, 0), (33, 17, 2, 16, False, S, 0),
    (64, 96, 4, 32, False, R, 4), (50, 33, 8, 32, True, R, 4), (33, 17, 2, 16, False, R, 0),
]


KERNELS = sorted(set(native.KERNEL.kernels())) if native.available() else []


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}-i{}-int{}-b{}{}-{}-acc{}".format(
    c[0], c[1], c[2], c[3], "-bias" if c[4] else "", c[5], c[6]))
def test_kernel_matches_the_numpy_reference(case, kernel):
    h, i, bits, block, bias, activation, accuracy = case
    data, layout, q, biases = make_expert(h, i, bits, block, bias, activation, accuracy)
    rng = np.random.default_rng(1)
    native.KERNEL.set_kernel(kernel)
    try:
        for tokens in (1, 3, 8, 19):  # decode, a partial tile, a whole tile, several tiles
            x = rng.standard_normal((tokens, h)).astype(np.float32)
            got = run_native(data, layout, x, threads=2)
            want = reference(x, q, biases, layout)
            # the same integers; float sums in another order, and the hidden activations requantized
            # from float32 values that differ in the last bits, can move one int8 step
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= 2e-2 * scale, (tokens, np.abs(got - want).max(), scale)
    finally:
        native.KERNEL.set_kernel("best")


def test_pool_threads_split_a_large_layer_without_changing_a_bit():
    """A call with enough weight bytes wakes pool threads (small ones stay on the caller's: a wake
    costs more than they do); either way each (token, expert) row is computed by one task, so the
    result is the same bits on one thread or four."""
    data, layout, _, _ = make_expert(512, 1024, 8, 128, False, S, 4)  # 1.6 MB a pass: helpers wake
    experts = [data, make_expert(512, 1024, 8, 128, False, S, 4, seed=1)[0], data]
    x = np.random.default_rng(5).standard_normal((19, 512)).astype(np.float32)
    starts = np.array([0, 7, 12, 19], np.int32)
    rows, dest = np.arange(19, dtype=np.int32)[::-1].copy(), np.arange(19, dtype=np.int32)
    outputs = []
    for threads in (1, 4, 1, 4):
        y = np.zeros_like(x)
        native.run_experts(layout, native.layout_vector(layout), experts, x, starts, rows, dest, y, threads)
        outputs.append(y)
    assert all(np.array_equal(outputs[0], y) for y in outputs[1:]) and np.abs(outputs[0]).sum() > 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES[:9], ids=str)
def test_a_token_gets_the_same_bits_alone_or_in_a_tile(case, kernel):
    """Decode (one token: four weight rows per pass) and prefill tiles (up to eight tokens per pass)
    are different loops; a token's result must not depend on which one ran it, so that prefill and
    decode of the same text agree bit for bit."""
    data, layout, _, _ = make_expert(*case)
    x = np.random.default_rng(3).standard_normal((11, case[0])).astype(np.float32)
    native.KERNEL.set_kernel(kernel)
    try:
        together = run_native(data, layout, x)
        alone = np.concatenate([run_native(data, layout, x[t:t + 1]) for t in range(len(x))])
    finally:
        native.KERNEL.set_kernel("best")
    np.testing.assert_array_equal(alone, together)


@pytest.mark.parametrize("case", CASES[:9], ids=str)
def test_every_kernel_computes_the_same(case):
    data, layout, _, _ = make_expert(*case)
    x = np.random.default_rng(2).standard_normal((11, case[0])).astype(np.float32)
    results = {}
    try:
        for kernel in KERNELS:
            native.KERNEL.set_kernel(kernel)
            results[kernel] = run_native(data, layout, x)
    finally:
        native.KERNEL.set_kernel("best")
    portable = results["portable"]
    for kernel, got in results.items():
        np.testing.assert_allclose(got, portable, rtol=1e-5, atol=1e-5 * np.abs(portable).max(), err_msg=kernel)


@pytest.mark.parametrize("activation", [S, R])
@pytest.mark.parametrize("bits,block,accuracy", [(4, 128, 4), (4, 32, 4), (8, 128, 4), (2, 32, 4), (4, 32, 0)])
def test_kernel_agrees_with_the_expert_session(bits, block, accuracy, activation):
    data, layout, _, _ = make_expert(128, 192, bits, block, False, activation, accuracy)
    x = np.random.default_rng(3).standard_normal((5, 128)).astype(np.float32)
    session = make_expert_session(data).run([GraphIO.EXPERT_OUT], {GraphIO.EXPERT_IN: x})[0]
    got = run_native(data, layout, x)
    assert np.abs(got - session).max() <= 3e-2 * np.abs(session).max()


def test_one_call_runs_many_experts_into_their_rows():
    experts = [make_expert(64, 96, 4, 32, False, S, 4, seed=s) for s in range(3)]
    layout = experts[0][1]
    assert all(e[1] == layout for e in experts)  # one layout serves every expert of a layer
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    rows = np.array([0, 2, 1, 2, 3, 0], np.int32)  # expert 0: tokens 0, 2; expert 1: 1, 2, 3; expert 2: 0
    dest = np.array([0, 1, 2, 3, 4, 5], np.int32)
    starts = np.array([0, 2, 5, 6], np.int32)
    y = np.zeros((6, 64), np.float32)
    native.run_experts(layout, native.layout_vector(layout), [e[0] for e in experts], x, starts, rows, dest, y, 2)
    for e, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
        np.testing.assert_array_equal(y[dest[lo:hi]], run_native(experts[e][0], layout, x[rows[lo:hi]]))


def test_hostile_layouts_are_refused():
    data, layout, _, _ = make_expert(64, 96, 4, 32, False, S, 4)
    check_layout(layout, len(data), "expert")
    from fate.artifacts.slots import nbytes

    last_end = max(v.offset + nbytes(v) for v in layout.tensors)
    check_layout(layout, last_end, "expert")
    with pytest.raises(ArtifactError, match="outside"):
        check_layout(layout, last_end - 1, "expert")
    views = list(layout.tensors)
    past_end = dataclasses.replace(layout, tensors=[dataclasses.replace(views[0], offset=len(data))] + views[1:])
    with pytest.raises(ArtifactError, match="outside"):
        check_layout(past_end, len(data), "expert")
    negative = dataclasses.replace(layout, tensors=[dataclasses.replace(views[0], offset=-8)] + views[1:])
    with pytest.raises(ArtifactError, match="outside"):
        check_layout(negative, len(data), "expert")
    overlap = dataclasses.replace(layout, tensors=[dataclasses.replace(views[1], offset=views[0].offset)] +
                                  [views[0]] + views[2:])
    with pytest.raises(ArtifactError, match="overlap"):
        check_layout(overlap, len(data), "expert")
    reshaped = dataclasses.replace(layout, tensors=[dataclasses.replace(views[0], shape=[1, 1, 1])] + views[1:])
    with pytest.raises(ArtifactError, match="expected"):
        check_layout(reshaped, len(data), "expert")
    with pytest.raises(ArtifactError, match="places"):
        check_layout(dataclasses.replace(layout, tensors=views[1:]), len(data), "expert")
    with pytest.raises(ArtifactError, match="unsupported"):
        check_layout(dataclasses.replace(layout, bits=3), len(data), "expert")
    # the squared ReLU has no gate: a layout that places one (or a gated one that does not) is refused
    with pytest.raises(ArtifactError, match="places"):
        check_layout(dataclasses.replace(layout, activation="relu2"), len(data), "expert")
    relu2_data, relu2, _, _ = make_expert(64, 96, 4, 32, False, R, 4)
    assert not any(v.name.startswith("gate.") for v in relu2.tensors)
    with pytest.raises(ArtifactError, match="places"):
        check_layout(dataclasses.replace(relu2, activation="swiglu"), len(relu2_data), "expert")
    # the kernel checks its buffers too: a short buffer or an index out of range never reads past the end
    x = np.zeros((1, 64), np.float32)
    one, y = np.array([0, 1], np.int32), np.zeros((1, 64), np.float32)
    with pytest.raises(ValueError, match="needs"):
        native.run_experts(layout, native.layout_vector(layout), [data[:last_end - 1]], x, one, np.zeros(1, np.int32),
                           np.zeros(1, np.int32), y, 1)
    with pytest.raises(IndexError):
        native.run_experts(layout, native.layout_vector(layout), [data], x, one, np.array([1], np.int32),
                           np.zeros(1, np.int32), y, 1)
    with pytest.raises(IndexError):
        native.run_experts(layout, native.layout_vector(layout), [data], x, one, np.zeros(1, np.int32),
                           np.array([5], np.int32), y, 1)
    bad = native.layout_vector(layout).copy()
    bad[7] = 1 << 40
    with pytest.raises(ValueError):
        native.run_experts(layout, bad, [data], x, one, np.zeros(1, np.int32), np.zeros(1, np.int32), y, 1)


def test_wire_walk_finds_every_initializer():
    import onnx

    data, _, _, _ = make_expert(64, 96, 4, 32, True, S, 4)
    ranges = initializer_ranges(data)
    model = onnx.load_from_string(data)
    for init in model.graph.initializer:
        offset, length = ranges[init.name]
        assert data[offset:offset + length] == init.raw_data


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_nan_reaches_the_output_instead_of_quantizing_to_zero(kernel):
    """int8 activation quantization scales by max|x|; a NaN compares false with everything, so
    without care it would quantize to zeros and a damaged weight would pass unseen."""
    data, layout, _, _ = make_expert(64, 96, 4, 32, False, S, 4)
    x = np.random.default_rng(4).standard_normal((3, 64)).astype(np.float32)
    x[1, 5] = np.nan
    x[2, 7] = np.inf
    native.KERNEL.set_kernel(kernel)
    try:
        y = run_native(data, layout, x)
    finally:
        native.KERNEL.set_kernel("best")
    assert np.isfinite(y[0]).all() and not np.isfinite(y[1]).any() and not np.isfinite(y[2]).any()


# ------------------------------------------------------------------ the kernel without Python

ROOT = Path(__file__).resolve().parents[1]
HARNESS = [ROOT / "tests" / "native" / "kernel_check.c", ROOT / "runtime" / "native" / "kernel.c"]


def build_and_run(compiler: str, runner: list[str], tmp_path: Path, *flags: str) -> str:
    """Build tests/native/kernel_check.c with the kernel and run it; its report."""
    exe = tmp_path / "kernel_check"
    built = subprocess.run([compiler, "-O2", "-std=c11", "-pthread", *flags, *map(str, HARNESS), "-lm", "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    done = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_kernel_of_this_cpu_agrees_with_portable_c(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    report = build_and_run(compiler, [], tmp_path)
    assert " 0 disagree" in report, report


def test_the_neon_kernel_agrees_with_portable_c_under_qemu(tmp_path):
    """The aarch64 build of the kernel, NEON included, run by qemu-user: edge boards' path."""
    compiler, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if compiler is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)")
    report = build_and_run(compiler, [qemu], tmp_path, "-static")
    assert report.startswith("kernels: neon portable;") and " 0 disagree" in report, report


def c_enums(header: str) -> list[list[str]]:
    """Every `enum { ... }` of a C header, as its member names in order (values and comments left out)."""
    import re

    text = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    return [[m.split("=")[0].strip() for m in body.split(",") if m.strip()]
            for body in re.findall(r"enum\s*\{(.*?)\}", text, flags=re.S)]


def test_the_native_contract_is_kernel_h_s_order():
    """artifacts/native_contract.py declares each vector once; kernel.h's enums must list the same
    fields and tensors in the same order (a field added on one side only fails here)."""
    from fate.artifacts.native_contract import ACTIVATIONS, HEAD, LAYOUT, STEP, TENSOR_PARTS

    header = (Path(native.__file__).parent / "kernel.h").read_text()
    enums = {tuple(e)[0]: e for e in c_enums(header)}
    step = enums["S_HIDDEN"]
    assert step[:step.index("S_OFFSETS")] == ["S_" + c for _, c in STEP.fields]
    assert enums["T_ATTN_NORM"] == ["T_" + c for _, c in STEP.tensors] + ["STEP_TENSORS"]
    assert enums["H_HIDDEN"] == ["H_" + c for _, c in HEAD.fields + HEAD.tensors] + ["H_SIZE"]
    layout = enums["L_HIDDEN"]
    assert layout[:layout.index("L_TENSORS")] == ["L_" + c for _, c in LAYOUT.fields]
    assert enums["T_QWEIGHT"] == ["T_" + c for _, c in TENSOR_PARTS]
    assert enums["ACT_SWIGLU"] == ["ACT_" + a.upper() for a in ACTIVATIONS]
    with pytest.raises(ValueError, match="missing or unknown"):
        STEP.vector({"hidden": 1}, {})
