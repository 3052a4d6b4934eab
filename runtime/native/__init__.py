"""The native expert kernel (runtime/native/experts.c), seen from Python: availability, and the
layout vector it takes. Where the extension was not built, `KERNEL` is None and the runtime runs
experts as onnxruntime sessions (runtime.experts.executors), saying so once."""

from __future__ import annotations

import sys

import numpy as np
from fate.artifacts import ExpertLayout
from fate.artifacts.native_contract import ACTIVATIONS, LAYOUT

try:
    from . import _kernel as KERNEL  # type: ignore[attr-defined]
except ImportError:  # not built: no compiler, or an unusual platform
    KERNEL = None

_warned = False


def available() -> bool:
    return KERNEL is not None


def kernel_name() -> str:
    return KERNEL.kernel() if KERNEL is not None else "none"


def warn_unavailable() -> None:
    global _warned
    if not _warned:
        _warned = True
        print("fate: the native expert kernel is not built; experts run as onnxruntime sessions "
              "(reinstall with a C compiler for the fast path)", file=sys.stderr)


def layout_vector(layout: ExpertLayout) -> np.ndarray:
    """The int64[19] the kernel reads: sizes, bits, block, accuracy, activation, bias, and the
    offset of every tensor (-1 where a projection has no bias)."""
    values = dict(hidden=layout.hidden_size, inter=layout.intermediate_size, bits=layout.bits,
                  block=layout.block_size, accuracy=layout.accuracy_level,
                  activation=ACTIVATIONS.index(layout.activation), has_bias=layout.has_bias)
    return np.asarray(LAYOUT.vector(values, {v.name: v.offset for v in layout.tensors}), dtype=np.int64)


def run_experts(layout: ExpertLayout, vector: np.ndarray, buffers: list, x: np.ndarray, starts: np.ndarray,
                rows: np.ndarray, dest: np.ndarray, y: np.ndarray, threads: int) -> None:
    """y[dest[a]] = expert_e(x[rows[a]]) for a in starts[e]..starts[e+1], expert e's file bytes
    in buffers[e]; one native call (GIL released) for all of them."""
    KERNEL.run_experts(vector, buffers, x, starts, rows, dest, y, threads,
                       layout.swiglu_limit or 0.0, layout.swiglu_alpha or 0.0)


def add_routed(routed, ids: np.ndarray, weights: np.ndarray, x: np.ndarray, residual: np.ndarray, threads: int) -> bool:
    """One token's routed experts, resident in `routed` (runtime.experts.store.RoutedExperts), run on x [H]
    and added to residual [H] in the router's order as the decode step adds them (the same bits): True, or
    False, the residual untouched, where a chosen expert is not in the pool."""
    return KERNEL.add_routed(tuple(routed), ids, weights, x, residual, threads)
