"""Token generation: sampling, the prefill/decode loop, and its timings."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from fate.artifacts import GenerationError
from fate.artifacts.schema import sampling_problem

from .model import FateModel, KVCache


@dataclass(frozen=True)
class SamplingConfig:
    """greedy=True takes the argmax; otherwise temperature, then top-k, then top-p (nucleus)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        problem = sampling_problem(self.temperature, self.top_p, self.top_k)
        if problem:
            raise GenerationError(problem)
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise GenerationError(f"seed must be in [0, 2^64), got {self.seed}")


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        c = self.config
        if c.greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / c.temperature
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


def stream_tokens(model: FateModel, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig,
                  eos_ids: set[int], result: GenerationResult | None = None,
                  cache: KVCache | None = None) -> Iterator[int]:
    """Yield generated token ids one by one. `result`, when given, is filled as it goes, so a
    caller interrupted mid-way (Ctrl-C) still has the partial output and its timings. `cache`, when
    given, holds the keys and values of the prompt's first `cache.length` tokens (a conversation's
    earlier turns): only the rest is prefilled, and the cache is extended in place."""
    if not prompt_ids:
        raise GenerationError("the prompt is empty")
    limit = model.context
    if len(prompt_ids) > limit:
        raise GenerationError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    result = result or GenerationResult(list(prompt_ids))
    stats = result.stats
    stats.prompt_tokens = len(prompt_ids)
    sample = Sampler(sampling)
    cache = cache if cache is not None else model.new_cache()
    if not 0 <= cache.length < len(prompt_ids):
        raise GenerationError(f"a reused cache of {cache.length} tokens leaves nothing of a {len(prompt_ids)}-token "
                              "prompt to prefill")
    stats.reused_tokens = cache.length
    stats.stop_reason = "length"

    stats.state_bytes = model.manifest.state_bytes
    start = time.perf_counter()
    hidden = model.forward(np.asarray(prompt_ids[cache.length:]), cache)
    stats.cache_bytes = cache.nbytes
    token = sample(model.head_logits(hidden[:, -1:])[-1])
    stats.prefill_s = stats.time_to_first_token_s = time.perf_counter() - start
    decode_start = time.perf_counter()
    for _ in range(max_new_tokens):
        result.token_ids.append(token)
        stats.generated_tokens += 1
        yield token
        if token in eos_ids:
            stats.stop_reason = "eos"
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
