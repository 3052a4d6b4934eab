"""This process's memory, as the budget and the benchmarks measure it (Linux /proc)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss() -> int:
    """Peak resident memory of this program, in bytes. VmHWM starts afresh at exec, unlike
    getrusage's ru_maxrss, which a child inherits from the process that forked it."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so that resident
    memory measures what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current_rss() -> int:
    """Resident memory of this program now, in bytes (0 where /proc does not say)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


# What a whole-process memory limit plans for besides the expert slots (plan_memory). Each figure was
# measured at Qwen1.5-MoE-A2.7B shapes (hidden 2048, int8 dense graphs of 55 MB a layer) and on the
# bundled example; fate-run --json reports the measured ones beside the plan.
DENSE_HOLD = 1.15  # onnxruntime holds a graph's weights with its prepacked copies: measured 1.07x
LOAD_TRANSIENT = 3  # while a graph loads: its bytes, onnxruntime's parse, prepacking (measured 2.5-2.8x)
SCRATCH_ROWS = 72  # a prefill chunk's activations through graphs, in hidden-size rows per token (measured 46-66)
STEP_SCRATCH_ROWS = 20  # the same where every attention layer runs native steps (tiles; measured 12-15)
HEADROOM = 64 << 20  # the tokenizer, thread stacks, allocator slack
# A long prompt runs this many tokens at a time (runtime.model): what a step holds besides the weights (the
# attention's mask and scores, each token's routed experts' outputs) grows with its tokens, and with the
# whole sequence for attention; at qwen shapes a 4,096-token prompt in one step peaked 2.9 GB above the model
PREFILL_CHUNK = 256


@dataclass(frozen=True)
class MemoryPlan:
    """A whole-process memory limit split into what the process needs besides the expert slots
    and what is left for them (the pool). Bytes."""

    limit: int
    baseline: int  # this process before loading: the interpreter and the libraries
    dense: int  # the non-expert graphs onnxruntime runs, as it holds them
    steps: int  # the graphs the native steps run instead (held once, their file's bytes)
    kv_cache: int  # keys and values at `context` tokens (fixed-size layer state is the pool's: run plan)
    context: int
    scratch: int  # a prefill chunk's activations
    load_transient: int  # a graph's load (before the pool takes its memory: SlotPool.populate)
    headroom: int = HEADROOM
    reserved: int = 0  # what the command holds beside the model (fate-serve's conversation cache)

    @property
    def floor(self) -> int:
        """What the process holds while generating, besides the pool."""
        return self.baseline + self.dense + self.steps + self.kv_cache + self.scratch + self.headroom + self.reserved

    @property
    def loading(self) -> int:
        """What the process holds at most while loading (the pool not yet touched)."""
        return self.baseline + self.dense + self.steps + self.load_transient + self.headroom

    @property
    def pool(self) -> int:
        return self.limit - self.floor


def plan_memory(manifest, graph_bytes: dict[str, int], limit: int, context: int, steps: bool,
                baseline: int | None = None, reserved: int = 0) -> MemoryPlan:
    """The plan for `limit` bytes: graph_bytes: each non-expert graph's file size; `steps`: whether
    the layers (and head) with a native step run it (their graphs then held once, by the step);
    `reserved`: what the command holds beside the model."""
    spec = manifest.model
    stepped = {layer.graph for layer in manifest.layers if layer.decode_step is not None} if steps else set()
    if steps and manifest.head_step is not None:
        stepped.add(manifest.head_graph)
    dense = int(sum(size for graph, size in graph_bytes.items() if graph not in stepped) * DENSE_HOLD)
    attention = [layer for layer in manifest.layers if layer.mixer == "attention"]
    kv = context * 4 * sum(spec.kv_heads(layer) for layer in attention) * (spec.key_dim + spec.value_dim)
    rows = STEP_SCRATCH_ROWS if all(layer.graph in stepped for layer in attention) else SCRATCH_ROWS
    scratch = min(PREFILL_CHUNK, context) * spec.hidden_size * 4 * rows
    return MemoryPlan(limit, current_rss() if baseline is None else baseline, dense,
                      sum(graph_bytes[g] for g in stepped), kv, context, scratch,
                      LOAD_TRANSIENT * max(graph_bytes.values(), default=0), reserved=reserved)
