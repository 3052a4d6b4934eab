"""fate-compile MODEL_DIR -o ARTIFACT_DIR [--bits 4] [--block-size 32] [--force]"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fate.artifacts import FateError

from .export import CompileOptions, compile_checkpoint


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Artifact directory to create.")
@click.option("--bits", "bits", multiple=True, type=click.Choice(["32", "16", "8", "4"]), default=("4",),
              show_default=True,
              help="Expert precision; repeat to store several (e.g. --bits 4 --bits 8). "
                   "32 is unquantized float32, 16 float16 weights, 8 and 4 block-wise MatMulNBits.")
@click.option("--block-size", default=32, show_default=True, help="Quantization group size along K.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it already exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def main(model_dir: Path, out_dir: Path, bits: tuple[str, ...], block_size: int, force: bool, quiet: bool) -> None:
    """Compile the Hugging Face MoE checkpoint in MODEL_DIR into a Fate artifact."""
    options = CompileOptions(model_dir=model_dir, out_dir=out_dir, bits=tuple(sorted({int(b) for b in bits}, reverse=True)),
                             block_size=block_size, force=force)
    log = (lambda _msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    try:
        compile_checkpoint(options, log=log)
    except FateError as e:
        click.echo(f"fate-compile: error: {e}", err=True)
        sys.exit(1)
    except ValueError as e:  # e.g. an invalid block size reaching the quantizer
        click.echo(f"fate-compile: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("fate-compile: interrupted; nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
