"""How an artifact runs: one frozen record whose fields are the engine flags of fate-run, fate-serve,
fate-bench and fate-eval (runtime.cli builds it from them), taken by `Engine.load` and
`FateModel.load`. Vary it with `dataclasses.replace`.

    from fate.artifacts.budget import parse_budget
    from fate.runtime import Engine, EngineOptions, OffloadOptions
    engine = Engine.load("artifact_dir", EngineOptions(memory_limit=8 * 2**30))
    engine = Engine.load("artifact_dir", EngineOptions(offload=OffloadOptions(parse_budget("25%"))))
"""

from __future__ import annotations

from dataclasses import dataclass

from .experts.offload import OffloadOptions
from .experts.store import ExpertOptions


@dataclass(frozen=True)
class EngineOptions:
    precision: str | None = None  # the stored expert precision to run (None: the policy's per layer)
    threads: int = 0  # compute threads of the sessions and the native kernel (0: every core)
    verify: bool = True  # SHA-256 of every file on its first read (where no earlier run hashed it: artifacts.checked)
    verify_every_load: bool = False  # and on every read of an expert
    executor: str = "auto"  # experts computed by the native kernel, onnxruntime sessions, or auto
    decode_steps: bool = True  # layers with a native decode step run it (where the experts' executor is native)
    # the whole process, in bytes: the expert pool is what the rest leaves (runtime.model.plan_limit);
    # `offload` then gives the other offloading options
    memory_limit: int | None = None
    context: int | None = None  # tokens a sequence may hold (default: the model's, at most DEFAULT_CONTEXT)
    reserved: int = 0  # bytes the caller holds itself within memory_limit (fate-serve's conversation cache)
    offload: OffloadOptions | None = None  # a budget of experts resident, the rest read ahead of need

    @property
    def experts(self) -> ExpertOptions:
        return ExpertOptions(self.precision, self.executor, self.threads, self.verify, self.verify_every_load)
