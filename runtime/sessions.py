"""onnxruntime sessions, built one way everywhere."""

from __future__ import annotations

import onnxruntime as ort

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def make_session(model: bytes, threads: int = 0, providers: tuple[str, ...] = DEFAULT_PROVIDERS) -> ort.InferenceSession:
    """A session over serialized ONNX bytes. threads=0 lets onnxruntime pick (all cores);
    experts use 1: their matmuls are too small to split, and each session owns its pool."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=list(providers))
