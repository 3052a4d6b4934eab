"""onnxruntime sessions, built one way everywhere."""

from __future__ import annotations

import importlib
import os
import sys

from fate.artifacts import ArtifactError
from fate.artifacts.inputs import with_stderr_held


def _import_onnxruntime_quietly():
    """onnxruntime (1.32's Linux wheels) starts its 1DS telemetry as it is imported: it keeps a device
    id under ~/.cache/Microsoft and, where it cannot (a service user without a writable HOME), warns on
    stderr. Fate's stderr holds Fate's own lines (--json readers parse stdout, services log stderr):
    what the library writes while it loads is dropped, and its telemetry events are turned off."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    onnxruntime = with_stderr_held(lambda: importlib.import_module("onnxruntime"), keep=False)
    onnxruntime.disable_telemetry_events()
    return onnxruntime


ort = _import_onnxruntime_quietly()

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


class NamedSession:
    """A session of an artifact's graph that names the file when a run fails. onnxruntime checks what
    its kernels rely on (a fused attention's head counts against its inputs, shapes against
    reshapes) and raises; a graph whose numbers do not fit (damaged, or hostile) then stops with one
    line naming it instead of onnxruntime's traceback."""

    def __init__(self, session: ort.InferenceSession, label: str):
        self.session = session
        self.label = label
        # onnxruntime's Python `run` checks the feed's names in Python before its C++ session checks
        # them again (names, types, shapes): Fate's calls go straight to the C++ session, which
        # raises the same errors, where this onnxruntime has it
        inner = getattr(session, "_sess", None)
        self._run = inner.run if callable(getattr(inner, "run", None)) else session.run

    def run(self, names, feeds):
        try:
            return self._run(names, feeds, None)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types; the file is what is wrong
            raise self._refused(e) from None

    def run_in_place(self, names, feeds, shared: dict[str, str]):
        """run(names, feeds), each output of `shared` written into the array fed as the input it
        names (shared[output] = input) instead of a new one: that array is the output returned."""
        try:
            binding = self.session.io_binding()
            values = {}
            for name, value in feeds.items():
                if name in shared.values():
                    values[name] = ort.OrtValue.ortvalue_from_numpy(value)  # the array's own memory
                    binding.bind_ortvalue_input(name, values[name])
                else:
                    binding.bind_cpu_input(name, value)
            for name in names:
                if name in shared:
                    binding.bind_ortvalue_output(name, values[shared[name]])
                else:
                    binding.bind_output(name)
            self.session.run_with_iobinding(binding)
            results = binding.get_outputs()
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types; the file is what is wrong
            raise self._refused(e) from None
        return [feeds[shared[name]] if name in shared else value.numpy() for name, value in zip(names, results)]

    def _refused(self, error: Exception) -> ArtifactError:
        return ArtifactError(f"{self.label}: onnxruntime could not run it: {str(error).splitlines()[0][:300]}")

    def __getattr__(self, name: str):
        return getattr(self.session, name)


# Graphs with fewer bytes than this run on one thread unless the thread count is given: waking
# onnxruntime's pool threads (which do not spin) costs more than such a graph's products
# (tiny-moe decode, 82 KB layer graphs: 610-750 tok/s on one thread against 480-540 on two).
SMALL_GRAPH_BYTES = 4 << 20


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def graph_threads(threads: int, graph_bytes: int) -> int:
    """The intra-op threads of a dense graph: as given (at most the usable cores: more only wait on
    each other, and each costs onnxruntime a thread pool slot at start), else one for a small graph,
    else all cores (0)."""
    if threads > 0:
        return min(threads, usable_cores())
    return 1 if graph_bytes < SMALL_GRAPH_BYTES else 0


def make_session(model: bytes | str, threads: int = 0, providers: tuple[str, ...] = DEFAULT_PROVIDERS,
                 lean: bool = False, label: str | None = None):
    """A session over serialized ONNX bytes (or an .onnx file path). threads=0 lets onnxruntime pick (all cores);
    experts get their own (make_expert_session).
    `lean` trades speed for memory (no prepacked weight copies): for one-off runs.
    `label` (an artifact's file): a NamedSession, whose failed runs name it.
    """
    options = _options(threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No arena: a run's activations go back to the allocator when it returns instead of staying
    # reserved at the largest run's size (a prefill chunk's: at qwen shapes 55 MB of scratch kept for
    # the process's life); memory.release_freed_memory then hands them to the system
    options.enable_cpu_mem_arena = False
    if lean:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.add_session_config_entry("session.disable_prepacking", "1")
    return _named(_without_model_bytes(ort.InferenceSession(model, sess_options=options, providers=list(providers))),
                  label)


def _named(session: ort.InferenceSession, label: str | None):
    return session if label is None else NamedSession(session, label)


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Pool threads spin between a run's operators (a sleeping thread takes tens of microseconds to
    # wake, once per operator) and stop the moment the run returns, leaving the cores to the
    # expert kernel and the I/O threads between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 4  # fatal only: Fate reports a failed load or run itself, in one line
    return options


def make_expert_session(model: bytes, providers: tuple[str, ...] = DEFAULT_PROVIDERS, label: str | None = None):
    """A session for one routed expert: one thread, and only basic graph optimizations (constant
    folding, which fp16 experts need for their weight Cast). The extended passes find nothing to
    fuse in a hand-written eight-node graph but cost a third of a small expert's creation time
    (measured: 0.53 -> 0.36 ms for a 32 KB INT4 expert, 9.0 -> 7.3 ms for a 5.5 MB one), and
    creation is what every cache miss pays."""
    options = _options(threads=1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return _named(_without_model_bytes(ort.InferenceSession(model, sess_options=options, providers=list(providers))),
                  label)


def _without_model_bytes(session: ort.InferenceSession) -> ort.InferenceSession:
    """onnxruntime's Python wrapper keeps the serialized model it was given for the life of the
    session (only to rebuild it if a provider fails and falls back), on top of the copy the C++
    session made: measured, 2.25x an INT4 expert file resident instead of 1.25x, so a budget held
    half as many experts. Fate turns the fallback off and lets the bytes go."""
    if getattr(session, "_model_bytes", None) is not None:
        session.disable_fallback()
        session._model_bytes = None
    return session

