"""onnxruntime sessions, built one way everywhere."""

from __future__ import annotations

import onnxruntime as ort

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def make_session(model: bytes | str, threads: int = 0, providers: tuple[str, ...] = DEFAULT_PROVIDERS,
                 lean: bool = False) -> ort.InferenceSession:
    """A session over serialized ONNX bytes (or an .onnx file path). threads=0 lets onnxruntime pick (all cores);
    experts use 1: their matmuls are too small to split, and each session owns its pool.
    `lean` trades speed for memory (no prepacked weight copies): for one-off runs."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if lean:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle pool threads must not spin: prefetch threads load experts on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=list(providers))

