"""fate-compile MODEL_DIR -o ARTIFACT_DIR [--bits 4] [--calib builtin|FILE|none] [--budget 50%] ...
fate-compile --policy-only ARTIFACT_DIR --budget 25%"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fate.artifacts import FateError
from fate.artifacts.budget import parse_budget
from fate.artifacts.errors import USER_ERRORS, exit_with
from fate.runtime.clihelp import command

from .export import CompileOptions, compile_checkpoint
from .policy import PlanTargets, replan
from .profile import BUILTIN, CalibrationOptions


@command("fate-compile", sections=(
    ("Output", ["out_dir", "force", "quiet"]),
    ("Precision", ["bits", "dense_bits", "block_size", "accuracy_level", "max_quant_error", "int2_copies",
                   "max_low_bit_error"]),
    ("Calibration and policy", ["calib", "calib_tokens", "budget", "target_recall", "policy_only"]),
), examples=(
    ("huggingface-cli download Qwen/Qwen3-30B-A3B --local-dir Qwen3-30B-A3B && "
     "fate-compile Qwen3-30B-A3B -o qwen3-30b.fate", "a checkpoint from the hub, compiled at INT4"),
    ("fate-compile examples/tiny-moe -o out/tiny-moe --bits 8", "the bundled example, experts at INT8"),
    ("fate-compile --policy-only qwen3-30b.fate --budget 25%", "re-plan for another budget from the saved profile"),
))
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), help="Artifact directory to create.")
@click.option("--bits", "bits", multiple=True, type=click.Choice(["32", "16", "8", "4", "2"]), default=("4",),
              show_default=True,
              help="Expert precision; repeat to store several (e.g. --bits 4 --bits 8). 32 is unquantized "
                   "float32, 16 float16 weights, 8/4/2 block-wise MatMulNBits. Only what is asked for is stored; "
                   "a layer whose INT4 error passes --max-quant-error is named, with the flag that would help.")
@click.option("--block-size", type=int, default=None,
              help="Quantization group size along K, a power of two >= 16. Default: 128 for 8 and 4 bits "
                   "(faster to load and run), 32 for 2 bits.")
@click.option("--dense-bits", default="auto", show_default=True, type=click.Choice(["auto", "32", "8", "4"]),
              help="Weights of attention, dense and shared MLPs and the LM head: INT8/INT4 MatMulNBits or "
                   "float32; the embedding is INT8 per row unless 32. auto: 8 when the experts are 4 bits or "
                   "fewer, else 32. Routers stay float32.")
@click.option("--accuracy-level", default=4, show_default=True, type=click.Choice([0, 4]),
              help="Quantized experts compute with int8 activations (4, about 3x faster) or in float32 (0).")
@click.option("--calib", default=BUILTIN, show_default=True,
              help="Calibration text: 'builtin' (shipped with Fate), a text file, or 'none' (no profile/policy).")
@click.option("--calib-tokens", default=4096, show_default=True, type=click.IntRange(min=64),
              help="Tokens of calibration text run through the model to measure routing and errors.")
@click.option("--budget", default="50%", show_default=True,
              help="Device budget the policy is planned for: a share of all experts (25%) or bytes (300MB).")
@click.option("--target-recall", default=0.97, show_default=True, type=click.FloatRange(0, 1),
              help="Decode prefetch recall the prefetch width must reach.")
@click.option("--max-quant-error", default=0.10, show_default=True, type=click.FloatRange(0),
              help="Largest relative error of a layer's experts output at its resident precision.")
@click.option("--max-low-bit-error", default=0.05, show_default=True, type=click.FloatRange(0),
              help="Largest error INT2 prefill transfers may add to a layer's experts output.")
@click.option("--int2-copies", is_flag=True,
              help="Lossy speed mode: also store INT2 copies of the experts, which fate-run --int2-prefill may "
                   "move during prefill where calibration measured their error within --max-low-bit-error.")
@click.option("--policy-only", is_flag=True,
              help="MODEL_DIR is an existing artifact: re-plan its policy from its profile for --budget.")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if it is an artifact Fate wrote (never an input or a folder holding one).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def main(model_dir: Path, out_dir: Path | None, bits: tuple[str, ...], block_size: int, dense_bits: str,
         accuracy_level: int,
         calib: str, calib_tokens: int,
         budget: str, target_recall: float, max_quant_error: float, max_low_bit_error: float, int2_copies: bool,
         policy_only: bool, force: bool, quiet: bool) -> None:
    """Compile the Hugging Face MoE checkpoint in MODEL_DIR into a Fate artifact."""
    log = (lambda _msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    try:
        targets = PlanTargets(target_recall=target_recall, max_quant_error=max_quant_error,
                              max_low_bit_error=max_low_bit_error)
        if policy_only:
            policy = replan(model_dir, parse_budget(budget), targets)
            log(f"re-planned {model_dir} for a budget of {policy.budget:.1%} of the experts")
            return
        if out_dir is None:
            raise FateError("missing -o/--output ARTIFACT_DIR")
        calibration = None if calib == "none" else CalibrationOptions(source=calib, tokens=calib_tokens)
        options = CompileOptions(model_dir=model_dir, out_dir=out_dir,
                                 bits=tuple(sorted({int(b) for b in bits}, reverse=True)),
                                 block_size=block_size, accuracy_level=accuracy_level, force=force,
                                 dense_bits=None if dense_bits == "auto" else int(dense_bits),
                                 calibration=calibration,
                                 budget=parse_budget(budget), targets=targets, int2_copies=int2_copies)
        compile_checkpoint(options, log=log)
    except USER_ERRORS as e:
        exit_with("fate-compile", e)
    except KeyboardInterrupt:
        click.echo("fate-compile: interrupted; nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
