"""The console entry points of every Fate command. Each imports its command only here, inside a
handler: a Ctrl-C while onnxruntime, numpy or torch are still loading ends in one line and exit 130,
not a traceback. A package of its own, standard library only: importing fate.runtime would already
load onnxruntime."""

from __future__ import annotations

import importlib
import signal
import sys
from functools import partial


def on_sigterm(command: str):
    """SIGTERM (a service manager, `kill`, a CI timeout) unwinds like Ctrl-C does: what the command
    was writing is removed by its own cleanup instead of being left beside the output; one line, 143."""
    def terminated(signum, frame) -> None:
        print(f"{command}: terminated", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    return terminated


# The extra a command's own imports come from (pyproject.toml's optional-dependencies).
EXTRAS = {"fate-compile": "compile", "fate-serve": "serve"}
TORCH_FIRST = " (torch's CPU build first, so pip does not pull a CUDA one: pip install torch==2.13.0 " \
              "--index-url https://download.pytorch.org/whl/cpu)"


def run(command: str, target: str) -> None:
    signal.signal(signal.SIGTERM, on_sigterm(command))
    module, _, name = target.partition(":")
    try:
        main = getattr(importlib.import_module(module), name)
    except KeyboardInterrupt:
        print(f"{command}: interrupted while starting", file=sys.stderr, flush=True)
        sys.exit(130)
    except ModuleNotFoundError as e:  # a runtime-only install running the compiler, say: name the extra
        if e.name is None or e.name.split(".")[0] == "fate":
            raise
        extra = EXTRAS.get(command)
        how = f"pip install 'fate[{extra}]'" + (TORCH_FIRST if extra == "compile" else "") if extra else \
            "reinstall Fate"
        print(f"{command}: error: {e.name} is not installed; {how}", file=sys.stderr, flush=True)
        sys.exit(1)
    import click

    try:
        main(standalone_mode=False)
    except click.exceptions.Exit as e:  # --help, --version
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        print(f"{command}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except click.ClickException as e:  # a flag or argument click refused: one line, not its usage block
        hint = f" (see {command} --help)" if isinstance(e, click.UsageError) else ""
        print(f"{command}: error: {e.format_message().rstrip('.')}{hint}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)


# One per console script in pyproject.toml: the command's name and where its click command lives.
fate_compile = partial(run, "fate-compile", "fate.compiler.cli:main")
fate_run = partial(run, "fate-run", "fate.runtime.cli:main")
fate_inspect = partial(run, "fate-inspect", "fate.runtime.inspect_cli:main")
fate_bench = partial(run, "fate-bench", "fate.runtime.bench:main")
fate_pack = partial(run, "fate-pack", "fate.runtime.artifact_cli:pack")
fate_unpack = partial(run, "fate-unpack", "fate.runtime.artifact_cli:unpack")
fate_verify = partial(run, "fate-verify", "fate.runtime.artifact_cli:verify")
fate_eval = partial(run, "fate-eval", "fate.runtime.eval_cli:main")
fate_serve = partial(run, "fate-serve", "fate.runtime.serve_cli:main")
fate_replay = partial(run, "fate-replay", "fate.runtime.replay_cli:main")
