"""Token generation: sampling, the prefill/decode loop, and its timings."""

from __future__ import annotations

import collections
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np

from fate.artifacts import GenerationError
from fate.artifacts.schema import sampling_problem

from .model import FateModel, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    """greedy=True takes the argmax; otherwise temperature, then top-k, top-p (nucleus) and min-p.
    Before either: the penalties (presence and frequency on the generated tokens, as OpenAI's;
    repetition on prompt and generated tokens, as transformers' and vLLM's) and `logit_bias`
    (token id, bias) pairs. The defaults change nothing."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        problem = sampling_problem(self.temperature, self.top_p, self.top_k) or penalty_problem(
            self.min_p, self.presence_penalty, self.frequency_penalty, self.repetition_penalty)
        if problem:
            raise GenerationError(problem)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise GenerationError(f"seed must be in [0, 2^64), got {self.seed}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def penalty_problem(min_p: float, presence: float, frequency: float, repetition: float, sep: str = "_") -> str | None:
    """What is wrong with the penalties and min-p, or None (OpenAI's ranges for its two penalties)."""
    def real(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (real(min_p) and 0 <= min_p <= 1):
        return f"min{sep}p must be in [0, 1], got {min_p!r}"
    for name, value in (("presence", presence), ("frequency", frequency)):
        if not (real(value) and -2 <= value <= 2):
            return f"{name}{sep}penalty must be in [-2, 2], got {value!r}"
    if not (real(repetition) and 0 < repetition <= 10):
        return f"repetition{sep}penalty must be in (0, 10], got {repetition!r}"
    return None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (before sampling settings), and the `top` most
    likely tokens' (id, logprob), most likely first. None for a prompt's first token (nothing before it)."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    scores = logits.astype(np.float64)
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprob(logprobs: np.ndarray, token: int, top: int) -> TokenLogprob:
    """`logprobs` one row of log_softmax; the `top` best of it."""
    best = np.argpartition(-logprobs, top - 1)[:top] if 0 < top < logprobs.size else np.arange(logprobs.size if top else 0)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return TokenLogprob(token, float(logprobs[token]), tuple((int(i), float(logprobs[i])) for i in best))


class Constraint(Protocol):
    """What a grammar does to decoding (runtime.grammar): which tokens may come next, the token
    taken, and whether the grammar is complete."""

    def allowed(self) -> np.ndarray: ...  # bool [vocab]

    def accept(self, token: int) -> None: ...

    @property
    def finished(self) -> bool: ...


class Sampler:
    """Chooses each next token from the model's logits: penalties and bias, a grammar's mask,
    then greedy or sampling. `logprobs`: record each chosen token's log-probability (and that many
    alternatives) in `self.last`; None records nothing."""

    def __init__(self, config: SamplingConfig, prompt_ids: list[int] = (), constraint: Constraint | None = None,
                 logprobs: int | None = None):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.constraint = constraint
        self.logprobs = logprobs
        self.last: TokenLogprob | None = None
        self.generated: collections.Counter = collections.Counter()
        self.seen = set(int(t) for t in prompt_ids) if config.repetition_penalty != 1.0 else set()

    def __call__(self, logits: np.ndarray) -> int:
        scores = self._adjusted(logits)
        token = int(np.argmax(scores)) if self.config.greedy else self._draw(scores)
        if self.logprobs is not None:
            self.last = token_logprob(log_softmax(logits), token, self.logprobs)
        self.generated[token] += 1
        if self.config.repetition_penalty != 1.0:
            self.seen.add(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        return token

    @property
    def finished(self) -> bool:
        """A grammar was given and its text is complete."""
        return self.constraint is not None and self.constraint.finished

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        c = self.config
        if not (c.penalized or c.logit_bias or self.constraint is not None):
            return logits
        scores = logits.astype(np.float64)
        if c.repetition_penalty != 1.0 and self.seen:
            ids = np.fromiter(self.seen, dtype=np.int64)
            seen = scores[ids]
            scores[ids] = np.where(seen > 0, seen / c.repetition_penalty, seen * c.repetition_penalty)
        if (c.presence_penalty or c.frequency_penalty) and self.generated:
            ids = np.fromiter(self.generated.keys(), dtype=np.int64)
            counts = np.fromiter(self.generated.values(), dtype=np.float64)
            scores[ids] -= c.frequency_penalty * counts + c.presence_penalty
        for token, bias in c.logit_bias:
            scores[token] += bias
        if self.constraint is not None:
            allowed = self.constraint.allowed()
            if not allowed.any():
                raise GenerationError("the grammar allows no next token")
            scores[~allowed] = -np.inf
        return scores

    def _draw(self, scores: np.ndarray) -> int:
        c = self.config
        scores = scores.astype(np.float64) / c.temperature
        if 0 < c.top_k < scores.size:
            kth = np.partition(scores, -c.top_k)[-c.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if c.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, c.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        if c.min_p > 0.0:  # tokens less likely than min_p times the most likely one are dropped
            probs = np.where(probs < c.min_p * probs.max(), 0.0, probs)
            probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # of the prompt, whose keys and values came from a previous turn
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    time_to_first_token_s: float = 0.0
    stop_reason: str = ""
    # what the sequence holds at its end: attention's keys and values plus any fixed-size layer state
    cache_bytes: int = 0
    state_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first generated token comes out of the prefill; decode steps make the rest
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token_ids entry, when asked for
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per prompt token, when asked for


def stream_tokens(model: FateModel, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
                  eos_ids: set[int], result: GenerationResult | None = None, cache: KVCache | None = None, *,
                  constraint: Constraint | None = None, logprobs: int | None = None,
                  prompt_logprobs: bool = False) -> Iterator[int]:
    """Yield generated token ids one by one. `result`, when given, is filled as it goes, so a
    caller interrupted mid-way (Ctrl-C) still has the partial output and its timings. `cache`, when
    given, holds the keys and values of the prompt's first `cache.length` tokens (a conversation's
    earlier turns): only the rest is prefilled, and the cache is extended in place.

    `constraint`: a grammar the output follows (it ends when the grammar is complete, stop reason
    "grammar"); `logprobs`: record each token's log-probability and that many alternatives in
    `result.logprobs`; `prompt_logprobs`: the prompt's own, in `result.prompt_logprobs` (every
    prompt row runs the head, so no reused cache)."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    limit = model.context
    if len(prompt_ids) > limit:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    result = result or GenerationResult(list(prompt_ids))
    stats = result.stats
    stats.prompt_tokens = len(prompt_ids)
    sample = Sampler(sampling, prompt_ids, constraint, logprobs)
    cache = cache if cache is not None else model.new_cache()
    if not 0 <= cache.length < len(prompt_ids):
        raise GenerationError(f"a reused cache of {cache.length} tokens leaves nothing of a {len(prompt_ids)}-token "
                              "prompt to prefill")
    if prompt_logprobs and cache.length:
        raise GenerationError("the prompt's log-probabilities need the whole prompt run, not a reused cache")
    stats.reused_tokens = cache.length
    stats.stop_reason = "length"

    stats.state_bytes = model.manifest.state_bytes
    start = time.perf_counter()
    hidden = model.forward(np.asarray(prompt_ids[cache.length:]), cache)
    stats.cache_bytes = cache.nbytes
    if prompt_logprobs:
        every = model.head_logits(hidden)
        rows = log_softmax(every)
        result.prompt_logprobs = [TokenLogprob(int(prompt_ids[0]), None)] + [token_logprob(rows[i], int(prompt_ids[i + 1]), logprobs or 0)
                                           for i in range(len(prompt_ids) - 1)]
        last = every[-1]
    else:
        last = model.head_logits(hidden[:, -1:])[-1]
    token = sample(last)
    stats.prefill_s = stats.time_to_first_token_s = time.perf_counter() - start
    decode_start = time.perf_counter()
    for _ in range(max_new_tokens):
        result.token_ids.append(token)
        if sample.last is not None:
            result.logprobs.append(sample.last)
        stats.generated_tokens += 1
        yield token
        if token in eos_ids:
            stats.stop_reason = "eos"
            break
        if sample.finished:
            stats.stop_reason = "grammar"
            break
        if len(result.token_ids) == max_new_tokens:
            break
        if cache.length >= limit:
            stats.stop_reason = "context"
            break
        hidden = model.forward(np.asarray([token]), cache)
        stats.cache_bytes = cache.nbytes
        token = sample(model.head_logits(hidden)[-1])
        stats.decode_s = time.perf_counter() - decode_start


def generate(model: FateModel, prompt_ids: list[int], max_new_tokens: int = 64,
             sampling: SamplingConfig = SamplingConfig(), eos_ids: set[int] | None = None,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate up to max_new_tokens after prompt_ids; stops at an eos id (the artifact's by default)."""
    eos = set(model.manifest.tokenizer.eos_token_ids) if eos_ids is None else eos_ids
    result = GenerationResult(list(prompt_ids))
    for token in stream_tokens(model, prompt_ids, max_new_tokens, sampling, eos, result):
        if on_token:
            on_token(token)
    return result
