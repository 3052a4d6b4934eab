"""Constrained decoding: output that follows a JSON schema, any JSON object, or a tool call, by
masking at each step the tokens a grammar cannot take next.

llguidance (the Rust library llama.cpp and vLLM use for this; a wheel, no torch) compiles the
grammar against the artifact's own tokenizer.json and computes each step's mask over the whole
vocabulary; the mask is applied in runtime.generate.Sampler before greedy choice or sampling, so a
constrained greedy run is still deterministic. llguidance is the `serve` extra: fate-run and the
Python API run without it until a grammar is asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from fate.artifacts import GenerationError

from .text import TextCodec

# JSON as a compact single line: no whitespace for a small model to wander off into (llguidance's
# default lets any amount of it between tokens).
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
ANY_JSON_OBJECT = {"type": "object"}


class GrammarError(GenerationError):
    """A schema or grammar that cannot be compiled: the request's fault."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GenerationError("structured output needs llguidance: pip install 'fate[serve]'") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """A compiled-once grammar text (llguidance's JSON form) and what it is for, in words."""

    text: str
    label: str


def closed(schema):
    """`schema` with objects that list their properties closed to others where it does not say
    (additionalProperties false), as llama.cpp's grammars and OpenAI's strict mode take them: a
    client that lists properties wants those, not whatever else the model adds."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k in NESTED else v for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(k), dict):
            out[k] = {name: closed(s) for name, s in schema[k].items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


NESTED = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "not", "additionalProperties", "if", "then", "else")


def json_grammar(schema: dict | None) -> Grammar:
    """Any JSON object (None), or JSON that matches `schema` (closed, above)."""
    ll = _llguidance()
    try:
        text = ll.LLMatcher.grammar_from_json_schema(closed(schema) if schema is not None else ANY_JSON_OBJECT,
                                                     defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema cannot be used: {e}") from None
    return Grammar(text, "a JSON object" if schema is None else "the JSON schema")


def lark_grammar(lark: str, label: str) -> Grammar:
    return Grammar(_llguidance().LLMatcher.grammar_from_lark(lark), label)


def json_rule(schema: dict) -> str:
    """A Lark rule body that is JSON matching `schema` (llguidance's %json extension)."""
    return "%json " + json.dumps({**closed(schema), "x-guidance": JSON_OPTIONS})


class Vocabulary:
    """llguidance's view of one artifact's tokenizer, built once (about 1 s for a 150k vocabulary)."""

    def __init__(self, codec: TextCodec, vocab_size: int):
        ll = _llguidance()
        self.size = vocab_size
        data = codec.tokenizer.to_str()
        self.tokenizer = ll.LLTokenizer(data, n_vocab=vocab_size, eos_token=sorted(codec.eos_ids))

    def matcher(self, grammar: Grammar) -> "GrammarConstraint":
        return GrammarConstraint(self, grammar)


class GrammarConstraint:
    """One generation's place in a grammar: runtime.generate.Constraint."""

    def __init__(self, vocabulary: Vocabulary, grammar: Grammar):
        ll = _llguidance()
        self.matcher = ll.LLMatcher(vocabulary.tokenizer, grammar.text, log_level=0)  # compiles it, once
        if self.matcher.is_error():  # an invalid grammar or schema: the matcher says why, it never raises
            problem = (self.matcher.get_error().splitlines() or ["invalid"])[0]
            raise GrammarError(f"{grammar.label} cannot be used: {problem}")
        self.size = vocabulary.size
        self.words = np.empty((vocabulary.size + 31) // 32, dtype=np.int32)
        self.label = grammar.label

    def allowed(self) -> np.ndarray:
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        self._check()
        return np.unpackbits(self.words.view(np.uint8), bitorder="little")[: self.size].astype(bool)

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)
        self._check()

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise GenerationError(f"constrained decoding failed ({self.label}): {self.matcher.get_error()}")
