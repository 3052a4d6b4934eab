"""What constrained decoding (fate-serve's response_format and forced tool calls) costs per token.

    python examples/constrained_cost.py out/tiny-moe [--tokens 64] [--vocab 32000,151000]

1. On ARTIFACT, side by side in one run: greedy decoding of the same prompts with no grammar and with
   a JSON schema; the grammar's own time per token (llguidance's mask over the vocabulary, the mask
   applied, the token consumed) is timed inside the sampler.
2. The mask's cost against the vocabulary's size: byte-level BPE tokenizers trained here (on the Python
   sources of this environment: nothing is downloaded) to each --vocab size, the matcher driven through
   the schema by random logits (no model of that vocabulary is at hand), as many tokens as step 1.
   Also what a request's new schema costs before its first token, and, where outlines-core is installed
   (`pip install outlines-core`, not a Fate dependency), what its per-schema index costs on the same
   tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fate.runtime import Engine
from fate.runtime.generate import GenerationResult, SamplingConfig, stream_tokens
from fate.runtime.grammar import GrammarConstraint, Vocabulary, json_grammar

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 4}},
          "required": ["name", "age", "tags"]}
PROMPTS = ["Once upon a time", "The secret of a happy life is", "Describe a person:", "Tom and his dog"]


class Timed:
    """A constraint whose calls are timed."""

    def __init__(self, inner: GrammarConstraint):
        self.inner, self.seconds, self.steps = inner, 0.0, 0

    def allowed(self):
        start = time.perf_counter()
        out = self.inner.allowed()
        self.seconds += time.perf_counter() - start
        self.steps += 1
        return out

    def accept(self, token):
        start = time.perf_counter()
        self.inner.accept(token)
        self.seconds += time.perf_counter() - start

    @property
    def finished(self):
        return self.inner.finished


def on_artifact(path: str, tokens: int) -> dict:
    engine = Engine.load(path)
    vocabulary = Vocabulary(engine.codec, engine.model.spec.vocab_size)
    grammar = json_grammar(PERSON)
    free_s = free_n = bound_s = bound_n = grammar_s = grammar_n = 0.0
    for prompt in PROMPTS * 2:
        ids = engine.encode(prompt)
        for constrained in (False, True):
            timed = Timed(vocabulary.matcher(grammar)) if constrained else None
            result = GenerationResult(ids)
            list(stream_tokens(engine.model, ids, tokens, SamplingConfig(), set() if not constrained
                               else engine.codec.eos_ids, result, constraint=timed))
            steps = max(result.stats.generated_tokens - 1, 0)
            if constrained:
                bound_s, bound_n = bound_s + result.stats.decode_s, bound_n + steps
                grammar_s, grammar_n = grammar_s + timed.seconds, grammar_n + timed.steps
            else:
                free_s, free_n = free_s + result.stats.decode_s, free_n + steps
    engine.close()
    return {"artifact": path, "vocab": engine.model.spec.vocab_size,
            "free_tok_s": free_n / free_s, "constrained_tok_s": bound_n / bound_s,
            "grammar_ms_per_token": 1e3 * grammar_s / grammar_n, "free_ms_per_token": 1e3 * free_s / free_n}


def trained_tokenizer(size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(str(p) for p in Path(np.__file__).parents[1].rglob("*.py"))[:6000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train(files, trainer)
    return tokenizer


def on_vocabulary(size: int, tokens: int) -> dict:
    import llguidance

    tokenizer = trained_tokenizer(size)
    ll = llguidance.LLTokenizer(tokenizer.to_str(), eos_token=0)
    vocab = ll.vocab_size

    class Codec:  # what runtime.grammar.Vocabulary reads of a TextCodec
        eos_ids = {0}

    Codec.tokenizer = tokenizer
    start = time.perf_counter()
    vocabulary = Vocabulary(Codec(), vocab)
    view_s = time.perf_counter() - start
    start = time.perf_counter()
    grammar = json_grammar(PERSON)
    vocabulary.matcher(grammar).allowed()
    first_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    seconds = steps = 0
    for _ in range(8):
        timed = Timed(vocabulary.matcher(grammar))
        for _ in range(tokens):
            logits = rng.standard_normal(vocab)
            allowed = timed.allowed()
            logits[~allowed] = -np.inf
            timed.accept(int(np.argmax(logits)))
            if timed.finished:
                break
        seconds, steps = seconds + timed.seconds, steps + timed.steps
    return {"vocab": vocab, "grammar_ms_per_token": 1e3 * seconds / steps, "steps": steps,
            "tokenizer_view_s": view_s, "schema_to_first_mask_s": first_s, "outlines_index_s": outlines(tokenizer)}


def outlines(tokenizer) -> float | None:
    """outlines-core's index for the same schema and tokenizer, in seconds (None: not installed)."""
    try:
        import outlines_core
    except ImportError:
        return None
    tokens: dict[str, list[int]] = {}
    for text, i in tokenizer.get_vocab().items():
        if i != 0:
            tokens.setdefault(text, []).append(i)
    vocabulary = outlines_core.Vocabulary(0, tokens)
    start = time.perf_counter()
    outlines_core.Index(outlines_core.json_schema.build_regex_from_schema(
        json.dumps({**PERSON, "additionalProperties": False})), vocabulary)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", nargs="*")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--vocab", default="32000,151000")
    args = parser.parse_args()
    for path in args.artifact:
        row = on_artifact(path, args.tokens)
        print(json.dumps(row))
        print(f"{path} (vocab {row['vocab']}): decode {row['free_tok_s']:.0f} tok/s free, "
              f"{row['constrained_tok_s']:.0f} tok/s constrained ({row['constrained_tok_s'] / row['free_tok_s']:.2f}x); "
              f"grammar {row['grammar_ms_per_token']:.3f} ms/token of {row['free_ms_per_token']:.3f} ms", file=sys.stderr)
    for size in (int(v) for v in args.vocab.split(",") if v):
        row = on_vocabulary(size, args.tokens)
        print(json.dumps(row))
        rival = f", outlines-core's index {row['outlines_index_s']:.3f} s" if row["outlines_index_s"] else ""
        print(f"trained BPE, vocab {row['vocab']}: grammar {row['grammar_ms_per_token']:.3f} ms/token "
              f"({row['steps']} steps); tokenizer view {row['tokenizer_view_s']:.3f} s, a schema to its first "
              f"mask {1e3 * row['schema_to_first_mask_s']:.1f} ms{rival}", file=sys.stderr)


if __name__ == "__main__":
    main()
