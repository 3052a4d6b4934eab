"""fate-eval ARTIFACT --text FILE [--reference ARTIFACT] [--window 128] [--memory-budget 25%] [--json]

Perplexity on a text and, against a reference (a higher-precision artifact of the same model),
the perplexity ratio and next-token agreement on the same windows. With --memory-budget the run
goes through the offloading runtime, so the INT2 prefill hybrid carries its quality cost too.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from fate.artifacts.budget import parse_budget
from fate.artifacts.errors import USER_ERRORS, exit_with
from fate.artifacts.inputs import read_text_file

from .api import Engine
from .clihelp import command
from .evaluate import perplexity, windows
from .experts.offload import OffloadOptions
from .experts.plan import LOW_BIT_PREFILL_MODES
from .options import EngineOptions


def agreement(model_logits, reference_logits, ids: list[int], window: int) -> float:
    """Share of positions where both models' most likely next token is the same."""
    same = total = 0
    for chunk in windows(ids, window):
        same += int((model_logits(chunk).argmax(-1) == reference_logits(chunk).argmax(-1)).sum())
        total += len(chunk)
    return same / total if total else float("nan")


@command("fate-eval", examples=(
    ("fate-eval qwen3-30b.fate --text heldout.txt", "perplexity on a text"),
    ("fate-eval q4.fate --text heldout.txt --reference fp32.fate --memory-budget 25%",
     "against another artifact, offloaded"),
))
@click.argument("artifact")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="UTF-8 text to measure perplexity on.")
@click.option("--reference", default=None, help="A reference artifact of the same model (e.g. compiled with --bits 32).")
@click.option("--window", default=128, show_default=True, type=click.IntRange(min=2), help="Tokens per scored window.")
@click.option("--max-tokens", default=0, show_default=True, type=click.IntRange(min=0), help="0: the whole text.")
@click.option("--memory-budget", default=None, help="Evaluate through the offloading runtime at this budget.")
@click.option("--int2-prefill", type=click.Choice(LOW_BIT_PREFILL_MODES), default="off", show_default=True,
              help="Lossy: prefill with the INT2 copies the compiler stored where it measured them worth it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(artifact, text_file, reference, window, max_tokens, memory_budget, int2_prefill, as_json) -> None:
    """Quality of a Fate ARTIFACT on a text: perplexity, and agreement with a reference."""
    try:
        offload = None if memory_budget is None else OffloadOptions(parse_budget(memory_budget),
                                                                    low_bit_prefill=int2_prefill)
        engine = Engine.load(artifact, EngineOptions(offload=offload))
        ids = engine.encode(read_text_file(text_file, "evaluation text"))
        if max_tokens:
            ids = ids[:max_tokens]
        result = perplexity(engine.logits, ids, window)
        out = {"artifact": artifact, "tokens": result.tokens, "perplexity": result.value}
        if reference:
            ref = Engine.load(reference)
            ref_result = perplexity(ref.logits, ids, window)
            out.update(reference=reference, reference_perplexity=ref_result.value,
                       ratio=result.value / ref_result.value,
                       next_token_agreement=agreement(engine.logits, ref.logits, ids, window))
            ref.close()
        engine.close()
    except (*USER_ERRORS, ValueError) as e:
        exit_with("fate-eval", e)
    if as_json:
        click.echo(json.dumps(out))
        return
    line = f"{artifact}: perplexity {out['perplexity']:.3f} over {out['tokens']} predicted tokens"
    if reference:
        line += (f"; reference {out['reference_perplexity']:.3f} (ratio {out['ratio']:.4f}), "
                 f"next-token agreement {out['next_token_agreement']:.1%}")
    click.echo(line)


if __name__ == "__main__":
    main()
