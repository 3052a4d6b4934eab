"""The console entry points of every Fate command. Each imports its command only here, inside a
handler: a Ctrl-C while onnxruntime, numpy or torch are still loading ends in one line and exit 130,
not a traceback. A package of its own, standard library only: importing fate.runtime would already
load onnxruntime."""

from __future__ import annotations

import importlib
import sys


def run(command: str, target: str) -> None:
    module, _, name = target.partition(":")
    try:
        main = getattr(importlib.import_module(module), name)
    except KeyboardInterrupt:
        print(f"{command}: interrupted while starting", file=sys.stderr, flush=True)
        sys.exit(130)
    main()


def fate_compile() -> None:
    run("fate-compile", "fate.compiler.cli:main")


def fate_run() -> None:
    run("fate-run", "fate.runtime.cli:main")


def fate_inspect() -> None:
    run("fate-inspect", "fate.runtime.inspect_cli:main")


def fate_bench() -> None:
    run("fate-bench", "fate.runtime.bench:main")


def fate_pack() -> None:
    run("fate-pack", "fate.runtime.artifact_cli:pack")


def fate_unpack() -> None:
    run("fate-unpack", "fate.runtime.artifact_cli:unpack")


def fate_verify() -> None:
    run("fate-verify", "fate.runtime.artifact_cli:verify")


def fate_eval() -> None:
    run("fate-eval", "fate.runtime.eval_cli:main")
